//! Steps 10–14, the write phase and its side effects: the write set (both messages, the
//! conversation's new stage and version, the transition, extracted data, the LLM call log) is
//! assembled from what the read phase found and the LLM phase decided, and committed in one
//! transaction; the committed state is written to the cache after COMMIT, and the
//! conversation's keys are dropped when the transaction fails.

use std::sync::Arc;

use futures::future::Either;
use uuid::Uuid;

use super::decide::Decisions;
use super::failpoint::{self, Failpoints};
use super::read::Snapshot;
use crate::cache::{Cache, CacheWrite};
use crate::error::{PipelineError, StoreError};
use crate::model::{Conversation, ConversationState, Role, Turn};
use crate::protocol::InboundMessage;
use crate::retry::RetryPolicy;
use crate::store::Store;
use crate::store::group_commit::GroupCommit;
use crate::store::write_set::{FollowerRow, WriteSet};
use crate::telemetry::metrics;

/// The state the write phase committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// The conversation as committed, every field extracted so far (this message's included)
    /// and the history window the next message sees (these turns included).
    pub state: ConversationState,
    /// The stored reply's id.
    pub reply_id: Uuid,
    /// The stored ids of the later messages of a coalesced turn, in order.
    pub follower_ids: Vec<Uuid>,
}

/// Where the write phase writes.
#[derive(Debug, Clone, Copy)]
pub struct Sinks<'a> {
    pub store: &'a Store,
    pub cache: &'a Cache,
    pub retry: &'a RetryPolicy,
    pub failpoints: &'a Failpoints,
    /// Turns of history given to templates (the cached window's length).
    pub history_turns: usize,
    /// Group commit; `None`: the message commits alone.
    pub committer: Option<&'a GroupCommit>,
}

/// The write set of one message (and of the later messages of its coalesced turn). The LLM
/// calls' records move from `decisions` into it (their prompts are most of a write set).
pub fn write_set(
    msg: &InboundMessage,
    followers: &[InboundMessage],
    read: &Snapshot<'_>,
    decisions: &mut Decisions<'_>,
    log_id: Uuid,
    read_ms: u64,
) -> WriteSet {
    let conv = &read.conversation;
    WriteSet {
        business_id: conv.business_id,
        log_id,
        user_external_id: msg.user_id.clone(),
        conversation_id: conv.id,
        expected_version: (!read.is_new).then_some(conv.version),
        stage_id: decisions.stage.id,
        transition: decisions.transition,
        extracted: decisions.learned.clone(),
        idempotency_key: msg.idempotency_key().to_owned(),
        inbound_id: msg.inbound_id.clone(),
        user_message_id: Uuid::now_v7(),
        user_content: msg.content.clone(),
        metadata: msg.metadata.clone().map(serde_json::Value::Object),
        user_stage_id: read.stage.id,
        assistant_message_id: decisions.response.reply_id,
        assistant_content: decisions.response.content.clone(),
        assistant_status: decisions.response.status.as_str(),
        fallback_template: decisions.response.fallback_template,
        reply_template: decisions.response.template,
        reply_model: decisions.response.by.clone(),
        timings: serde_json::Value::Object(
            std::iter::once(("read", read_ms))
                .chain(decisions.timings.iter().copied())
                .map(|(k, v)| (k.to_owned(), v.into()))
                .collect(),
        ),
        llm_calls: std::mem::take(&mut decisions.calls),
        actions: decisions.actions.clone(),
        handoff: handoff_change(read, decisions),
        followers: followers
            .iter()
            .zip(1..)
            .map(|(f, ord)| FollowerRow {
                ord,
                id: Uuid::now_v7(),
                content: f.content.clone(),
                idempotency_key: f.idempotency_key().to_owned(),
                inbound_id: f.inbound_id.clone(),
                metadata: f.metadata.clone().map(serde_json::Value::Object),
            })
            .collect(),
    }
}

/// Steps 10–12: commits everything the message changed in one transaction (retried in place
/// on transient faults); on failure the conversation's cache keys are cleared (step 14). The
/// decisions' LLM call records move into the write set ([`write_set`]).
///
/// # Errors
/// [`StoreError::VersionConflict`] (the caller re-runs from the read phase),
/// [`StoreError::Duplicate`] (committed by a concurrent delivery), database failures.
pub async fn write(
    sinks: Sinks<'_>,
    msg: &InboundMessage,
    followers: &[InboundMessage],
    read: &Snapshot<'_>,
    decisions: &mut Decisions<'_>,
    log_id: Uuid,
    read_ms: u64,
) -> Result<Committed, PipelineError> {
    let ws = Arc::new(write_set(msg, followers, read, decisions, log_id, read_ms));
    let injected = || {
        if sinks.failpoints.is_on(failpoint::BEFORE_COMMIT) {
            Err(StoreError::Injected(failpoint::BEFORE_COMMIT))
        } else if !followers.is_empty() && sinks.failpoints.is_on(failpoint::COALESCED_WRITE) {
            Err(StoreError::Injected(failpoint::COALESCED_WRITE))
        } else {
            Ok(())
        }
    };
    // The first attempt goes with a batch; a retry (the batch refused this write set's own
    // statements) and an injected fault commit alone.
    let mut attempts = 0u32;
    let result = sinks
        .retry
        .run("db.write_set", || {
            attempts += 1;
            match sinks.committer {
                Some(group) if attempts == 1 && injected().is_ok() => {
                    let poisoned = sinks.failpoints.is_on(failpoint::POISON_BATCHED)
                        && msg.content.contains("poison");
                    Either::Left(group.commit(ws.clone(), poisoned))
                }
                _ => Either::Right(sinks.store.commit_write_set(&ws, injected)),
            }
        })
        .await;
    let row = match result {
        Ok(row) => row,
        Err(e) => {
            if let Err(c) = sinks
                .cache
                .invalidate_conversation(ws.business_id, &ws.user_external_id)
                .await
            {
                metrics::record_error(&c, "cache invalidation");
            }
            return Err(e.into());
        }
    };
    if decisions.transition.is_some() {
        metrics::stage_transition();
    }
    let mut extracted = read.extracted.clone();
    extracted.extend(decisions.learned.clone());
    let history = history_after(read, msg, followers, decisions, sinks.history_turns);
    let mut recent_keys = read.recent_keys.clone();
    for m in std::iter::once(msg).chain(followers) {
        let key = m.idempotency_key();
        if !recent_keys.iter().any(|k| k == key) {
            recent_keys.push(key.to_owned());
        }
    }
    let excess = recent_keys
        .len()
        .saturating_sub(ConversationState::RECENT_KEYS);
    recent_keys.drain(..excess);
    Ok(Committed {
        state: ConversationState {
            conversation: Conversation {
                stage_id: decisions.stage.id,
                version: row.version,
                created_at: row.created_at,
                updated_at: row.updated_at,
                handoff: decisions.handoff.clone(),
                ..read.conversation.clone()
            },
            extracted,
            history,
            window: sinks.history_turns,
            recent_keys,
        },
        reply_id: ws.assistant_message_id,
        follower_ids: ws.followers.iter().map(|f| f.id).collect(),
    })
}

/// What the turn changes of the conversation's handoff: a handoff it started (its whole
/// state), or the `reply_to` of its message while one is under way.
fn handoff_change(read: &Snapshot<'_>, decisions: &Decisions<'_>) -> Option<serde_json::Value> {
    let after = decisions.handoff.as_ref()?;
    match &read.conversation.handoff {
        None => serde_json::to_value(after).ok(),
        Some(_) => Some(serde_json::json!({ "reply_to": after.reply_to })),
    }
}

/// The history window after the turn: its messages and its reply (a handoff's
/// acknowledgement is not a turn of the conversation), cut to `window` turns.
fn history_after(
    read: &Snapshot<'_>,
    msg: &InboundMessage,
    followers: &[InboundMessage],
    decisions: &Decisions<'_>,
    window: usize,
) -> Vec<Turn> {
    let mut history = read.context.history.clone();
    for m in std::iter::once(msg).chain(followers) {
        history.push(Turn {
            role: Role::User,
            content: m.content.clone(),
        });
    }
    if decisions.response.status != crate::model::AnswerStatus::Handoff {
        history.push(Turn {
            role: Role::Assistant,
            content: decisions.response.content.clone(),
        });
    }
    let excess = history.len().saturating_sub(window);
    history.drain(..excess);
    history
}

/// Step 13, prepared: the write of the committed conversation state to the cache, sent by
/// the worker in the same round trip as the message's finish. `None` when the state cannot be
/// encoded: the user's cached state is dropped then.
pub async fn state_write(cache: &Cache, committed: &Committed) -> Option<CacheWrite> {
    match cache.state_write(&committed.state) {
        Ok(write) => Some(write),
        Err(e) => {
            metrics::record_error(&e, "cache write");
            let c = &committed.state.conversation;
            let _ = cache
                .invalidate_conversation(c.business_id, &c.user_external_id)
                .await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AnswerStatus, Extracted, StageInfo, StageTemplates};
    use crate::pipeline::respond::Response;
    use crate::template::Context;

    fn stage(n: u128, name: &str) -> StageInfo {
        StageInfo {
            id: Uuid::from_u128(n),
            name: name.into(),
            description: String::new(),
            next: None,
            actions: Vec::new(),
            handoff: false,
        }
    }

    #[test]
    fn the_write_set_holds_what_was_read_and_what_was_decided() {
        let (welcome, booking) = (stage(1, "welcome"), stage(2, "booking"));
        let now = chrono::Utc::now();
        let msg = InboundMessage {
            inbound_id: "7-0".into(),
            message_id: None,
            business_id: Uuid::from_u128(9),
            user_id: "ann".into(),
            content: "hello".into(),
            conversation_id: None,
            metadata: None,
            reply_to: None,
            supersedes: None,
        };
        let mut stored = Extracted::new();
        stored.insert("name".into(), serde_json::json!("Ann"));
        let read = Snapshot {
            conversation: Conversation {
                id: Uuid::from_u128(5),
                business_id: msg.business_id,
                user_external_id: "ann".into(),
                stage_id: welcome.id,
                version: 3,
                created_at: now,
                updated_at: now,
                summary: String::new(),
                summarized_seq: 0,
                actions: serde_json::Map::new(),
                handoff: None,
            },
            is_new: false,
            stage: &welcome,
            templates: StageTemplates {
                selection: None,
                extraction: None,
                response: Uuid::from_u128(20),
                fallback: None,
            },
            extracted: stored,
            context: Context::sample("b", &[], &[]),
            recent_keys: Vec::new(),
        };
        let mut learned = Extracted::new();
        learned.insert("date".into(), serde_json::json!("2026-12-01"));
        let mut decisions = Decisions {
            stage: &booking,
            transition: Some((welcome.id, booking.id)),
            learned,
            response: Response {
                reply_id: Uuid::from_u128(99),
                content: "Sorry".into(),
                status: AnswerStatus::Fallback,
                fallback_template: Some((Uuid::from_u128(30), 4)),
                template: Some((Uuid::from_u128(30), 4)),
                by: None,
            },
            calls: Vec::new(),
            timings: vec![("respond", 3)],
            actions: Vec::new(),
            handoff: None,
        };
        let ws = write_set(&msg, &[], &read, &mut decisions, Uuid::from_u128(77), 5);
        assert_eq!(ws.timings, serde_json::json!({"read": 5, "respond": 3}));
        assert_eq!(
            ws.expected_version,
            Some(3),
            "the version the read phase saw"
        );
        assert_eq!(ws.idempotency_key, "7-0", "no message_id: the entry id");
        assert_eq!(
            ws.user_stage_id, welcome.id,
            "the user wrote in the old stage"
        );
        assert_eq!(ws.stage_id, booking.id);
        assert_eq!(ws.transition, Some((welcome.id, booking.id)));
        assert_eq!(ws.extracted.len(), 1, "only what this message taught");
        assert_eq!(ws.assistant_status, "fallback");
        assert_eq!(ws.fallback_template, Some((Uuid::from_u128(30), 4)));
        assert_ne!(ws.user_message_id, ws.assistant_message_id);
    }
}
