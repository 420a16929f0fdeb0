//! Steps 3–5, the read phase: what the message's processing needs to know, read with short
//! autocommit queries (most served from Redis): the conversation (step 3), its current stage and
//! that stage's template ids (step 4), the history window and the extracted data, and the
//! template context built from all of it (step 5). A continuing conversation's state (the
//! user's latest conversation, the conversation, its history window and extracted data) comes
//! from the cache the last commit wrote, so its read phase needs no PostgreSQL query.

use chrono::Utc;

use super::context::{self, ContextInputs};
use super::conversation::{self, Known};
use crate::cache::Cache;
use crate::definitions::StageService;
use crate::error::PipelineError;
use crate::model::{Business, Conversation, Extracted, StageInfo, StageTemplates};
use crate::protocol::InboundMessage;
use crate::store::Store;
use crate::template::Context;

/// What the read phase found: the conversation as it stands before this message.
#[derive(Debug)]
pub struct Snapshot<'b> {
    /// The conversation as read (not stored yet when `is_new`).
    pub conversation: Conversation,
    pub is_new: bool,
    /// The stage before this message.
    pub stage: &'b StageInfo,
    /// That stage's template ids.
    pub templates: StageTemplates,
    /// The data extracted from earlier messages.
    pub extracted: Extracted,
    /// The template context (step 5).
    pub context: Context,
    /// The idempotency keys the user's cached state remembered (empty when it was not used).
    pub recent_keys: Vec<String>,
}

/// What the read phase reads from.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    pub store: &'a Store,
    pub cache: &'a Cache,
    pub stages: &'a StageService,
    /// Turns of history given to templates.
    pub history_turns: usize,
}

/// Runs the read phase. `fresh` reads conversation state from PostgreSQL, not the cache (after
/// a version conflict).
///
/// # Errors
/// An unknown conversation (validation), database failures, an inconsistent definition.
pub async fn read<'b>(
    src: Sources<'_>,
    msg: &InboundMessage,
    business: &'b Business,
    fresh: bool,
) -> Result<Snapshot<'b>, PipelineError> {
    let known = if fresh {
        Known::Unknown
    } else {
        conversation::cached_state(src.cache, business.id, &msg.user_id)
            .await
            .map_or(Known::Unknown, Known::Cached)
    };
    read_from(src, msg, business, known).await
}

/// The read phase with what is `known` of the user's conversation already at hand.
///
/// # Errors
/// As [`read`].
pub async fn read_from<'b>(
    src: Sources<'_>,
    msg: &InboundMessage,
    business: &'b Business,
    known: Known,
) -> Result<Snapshot<'b>, PipelineError> {
    // Step 3: the conversation (with its history and extracted data when cached).
    let resolved = conversation::resolve(
        src.store,
        business.id,
        business.initial_stage_id,
        &msg.user_id,
        msg.conversation_id,
        src.history_turns,
        known,
    )
    .await?;
    let conv = resolved.conversation;
    // Step 4: the current stage and its templates.
    let stage = src.stages.current(business, Some(conv.stage_id))?;
    let templates = src.stages.templates(business.id, stage.id).await?;
    // Step 5: the variables.
    let (history, extracted) = match resolved.cached {
        Some(cached) => cached,
        None if resolved.is_new => (Vec::new(), Extracted::new()),
        None => (
            src.store
                .history(business.id, conv.id, src.history_turns, conv.summarized_seq)
                .await?,
            src.store.extracted(business.id, conv.id).await?,
        ),
    };
    let context = context::build(ContextInputs {
        business,
        user_id: &msg.user_id,
        conversation_id: conv.id,
        is_new: resolved.is_new,
        stage,
        content: &msg.content,
        metadata: msg.metadata.as_ref(),
        history,
        summary: &conv.summary,
        extracted: &extracted,
        now: Utc::now(),
        actions: &conv.actions,
    });
    Ok(Snapshot {
        conversation: conv,
        is_new: resolved.is_new,
        stage,
        templates,
        extracted,
        context,
        recent_keys: resolved.recent_keys,
    })
}
