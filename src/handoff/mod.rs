//! Human handoff: a conversation handed to a person.
//!
//! A conversation is handed over by entering a stage marked `handoff = true`, by an action
//! result its `handoff_on` names, or by an operator (`icmp handoff start`). While it is, the
//! pipeline stores each user message and acknowledges it (status `handoff`, the business's
//! `[business.handoff] reply`) without any LLM call, and the worker passes it to the agents'
//! stream ([`to_agents`], once per message). Agents answer on the agent-replies stream; the
//! [`desk`] (one process of the fleet at a time) stores each answer as a message of role
//! `agent` and publishes it to the user once, in the agents' order; an answer with `end` gives
//! the conversation back to the bot. A handoff nobody answers in time gets the business's
//! timeout reply, once.

pub mod desk;

use std::collections::HashMap;

use uuid::Uuid;

use crate::config::{HandoffConfig, StreamsConfig};
use crate::error::CacheError;
use crate::protocol::reply::{ReplyStatus, Unprompted};
use crate::redis_connection::RedisConnection;
use crate::store::handoffs::UserAddress;
use crate::stream::once::{Keep, Published, publish_once, publish_unprompted};

/// What a handoff's timeout reply sees (`[business.handoff] timeout_reply` is an `upon`
/// template of it): the business, the user, the conversation and the handoff.
#[derive(Debug, serde::Serialize)]
pub struct TimeoutContext<'a> {
    pub business: serde_json::Value,
    pub user: serde_json::Value,
    pub conversation: serde_json::Value,
    pub handoff: &'a crate::model::HandoffState,
}

impl<'a> TimeoutContext<'a> {
    pub fn new(
        business: &crate::model::Business,
        user_id: &str,
        conversation_id: Uuid,
        handoff: &'a crate::model::HandoffState,
    ) -> TimeoutContext<'a> {
        TimeoutContext {
            business: serde_json::json!({ "id": business.id, "name": business.name }),
            user: serde_json::json!({ "id": user_id }),
            conversation: serde_json::json!({ "id": conversation_id }),
            handoff,
        }
    }
}

/// Renders a handoff text (`[business.handoff] reply` against the message's context,
/// `timeout_reply` against [`TimeoutContext`]), trimmed.
///
/// # Errors
/// A text that does not compile or render.
pub fn render(
    engine: &upon::Engine<'static>,
    source: &str,
    ctx: &impl serde::Serialize,
) -> Result<String, String> {
    let template = engine.compile(source).map_err(|e| e.to_string())?;
    let text = template
        .render(engine, ctx)
        .to_string()
        .map_err(|e| e.to_string())?;
    Ok(text.trim().to_owned())
}

/// A user message passed to the agents.
#[derive(Debug, Clone)]
pub struct ToAgents<'a> {
    /// `message` (received while handed off) or `started` (the message that handed over).
    pub kind: &'static str,
    pub business_id: Uuid,
    pub conversation_id: Uuid,
    pub user_id: &'a str,
    /// The message's idempotency key.
    pub message_id: &'a str,
    pub content: &'a str,
    /// The id of the message's answer (the entry's dedupe id).
    pub reply_id: Uuid,
    /// What started the handoff, and when (unix ms: a `started` entry's dedupe id).
    pub by: &'a str,
    pub since_ms: i64,
}

/// Passes a user message to the agents' stream, once per `reply_id` (a `started` entry once
/// per handoff).
///
/// # Errors
/// Redis failures.
pub async fn to_agents(
    conn: &RedisConnection,
    config: &HandoffConfig,
    m: &ToAgents<'_>,
) -> Result<Published, CacheError> {
    let mut fields = vec![
        ("kind", m.kind.to_owned()),
        ("business_id", m.business_id.to_string()),
        ("conversation_id", m.conversation_id.to_string()),
        ("user_id", m.user_id.to_owned()),
        ("message_id", m.message_id.to_owned()),
        ("content", m.content.to_owned()),
        ("reply_id", m.reply_id.to_string()),
        ("by", m.by.to_owned()),
        ("transcript", transcript(m.conversation_id)),
        ("at", chrono::Utc::now().to_rfc3339()),
    ];
    fields.extend(crate::telemetry::trace_context::current());
    let keep = Keep {
        maxlen: config.agents_maxlen,
        ttl_secs: 0,
    };
    let id = if m.kind == "started" {
        format!("started:{}:{}", m.conversation_id, m.since_ms)
    } else {
        format!("{}:{}", m.kind, m.reply_id)
    };
    publish_once(conn, &config.agents, &id, keep, &fields).await
}

/// Tells the agents a handoff started (once per handoff) and notes it on the conversation, so
/// that the desk's sweep tells them when this does not get through.
///
/// # Errors
/// Redis or database failures.
pub async fn tell_started(
    store: &crate::store::Store,
    conn: &RedisConnection,
    config: &HandoffConfig,
    m: &ToAgents<'_>,
) -> Result<Published, crate::error::PipelineError> {
    let sent = to_agents(conn, config, m).await?;
    store
        .handoff_told(m.business_id, m.conversation_id, m.since_ms)
        .await?;
    Ok(sent)
}

/// Where an agent reads the conversation: the console's page (`icmp conversation show ID`
/// prints the same).
pub fn transcript(conversation_id: Uuid) -> String {
    format!("/conversations/{conversation_id}")
}

/// An error about an agent's entry, on the agents' stream (kind `error`), so that the desk
/// that sent it sees why nothing happened; once per answer (business, conversation, key), or
/// per entry when those are missing.
///
/// # Errors
/// Redis failures.
pub async fn agent_error(
    conn: &RedisConnection,
    config: &HandoffConfig,
    entry_id: &str,
    fields: &HashMap<String, String>,
    e: &AgentEntryError,
) -> Result<Published, CacheError> {
    let field = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let out = [
        ("kind", "error".to_owned()),
        ("entry_id", entry_id.to_owned()),
        ("business_id", field("business_id")),
        ("conversation_id", field("conversation_id")),
        ("message_id", field("message_id")),
        ("error_code", e.code().to_owned()),
        ("error", e.to_string()),
    ];
    let keep = Keep {
        maxlen: config.agents_maxlen,
        ttl_secs: 0,
    };
    // One report per answer: an answer sent twice (the same key) is refused once.
    let id = match (
        field("business_id"),
        field("conversation_id"),
        field("message_id"),
    ) {
        (b, c, m) if !b.is_empty() && !c.is_empty() && !m.is_empty() => {
            format!("error:{b}:{c}:{m}")
        }
        _ => format!("error:{entry_id}"),
    };
    publish_once(conn, &config.agents, &id, keep, &out).await
}

/// An agent's entry, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEntry {
    pub business_id: Uuid,
    pub conversation_id: Uuid,
    pub agent_id: String,
    /// The agent's idempotency key.
    pub message_id: String,
    pub text: String,
    /// Give the conversation back to the bot (after `text`, if any).
    pub end: bool,
}

/// Why an agent's entry did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentEntryError {
    #[error("field `{0}` is missing or invalid")]
    Invalid(&'static str),
    #[error("the text is longer than {0} characters")]
    TooLong(usize),
    #[error("no conversation of that business has this id")]
    UnknownConversation,
    #[error("the conversation is not with a person (the handoff ended, or never started)")]
    NotActive,
    #[error("this message_id answered another conversation of the user")]
    KeyReused,
    #[error("the answer cannot be stored or delivered: {0}")]
    Refused(String),
}

impl AgentEntryError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            AgentEntryError::Invalid(_) => "handoff.invalid_entry",
            AgentEntryError::TooLong(_) => "handoff.text_too_long",
            AgentEntryError::UnknownConversation => "handoff.unknown_conversation",
            AgentEntryError::NotActive => "handoff.not_active",
            AgentEntryError::KeyReused => "handoff.key_reused",
            AgentEntryError::Refused(_) => "handoff.refused",
        }
    }
}

/// Decodes an agent's entry: `business_id`, `conversation_id`, `agent_id`, `message_id` (at
/// most 128 characters), `text` (at most `max_text` characters; may be empty with `end`),
/// `end` (`true` or `1` ends the handoff).
///
/// # Errors
/// A missing or invalid field.
pub fn decode(
    fields: &HashMap<String, String>,
    max_text: usize,
) -> Result<AgentEntry, AgentEntryError> {
    let get = |k: &'static str| fields.get(k).map(|v| v.trim());
    let uuid = |k: &'static str| {
        get(k)
            .and_then(|v| Uuid::parse_str(v).ok())
            .ok_or(AgentEntryError::Invalid(k))
    };
    let text = fields.get("text").cloned().unwrap_or_default();
    if text.contains('\0') {
        return Err(AgentEntryError::Invalid("text"));
    }
    let end = matches!(get("end"), Some("true" | "1"));
    let agent_id = get("agent_id")
        .filter(|a| !a.is_empty() && a.chars().count() <= 128 && !a.contains('\0'))
        .ok_or(AgentEntryError::Invalid("agent_id"))?;
    let message_id = get("message_id")
        .filter(|m| !m.is_empty() && m.chars().count() <= 128 && !m.contains('\0'))
        .ok_or(AgentEntryError::Invalid("message_id"))?;
    if text.trim().is_empty() && !end {
        return Err(AgentEntryError::Invalid("text"));
    }
    if text.chars().count() > max_text {
        return Err(AgentEntryError::TooLong(max_text));
    }
    Ok(AgentEntry {
        business_id: uuid("business_id")?,
        conversation_id: uuid("conversation_id")?,
        agent_id: agent_id.to_owned(),
        message_id: message_id.to_owned(),
        text: text.trim().to_owned(),
        end,
    })
}

/// A message to a user of a conversation with a person (an agent's answer, a timeout reply).
#[derive(Debug, Clone)]
pub struct ToUser<'a> {
    pub business_id: Uuid,
    pub conversation_id: Uuid,
    pub to: &'a UserAddress,
    /// The stored message's id.
    pub reply_id: Uuid,
    /// The agent's key (empty for a timeout reply).
    pub message_id: &'a str,
    pub status: ReplyStatus,
    pub content: &'a str,
    pub agent_id: &'a str,
}

/// Publishes a message to the user's reply destination, once per `reply_id`.
///
/// # Errors
/// Redis failures, or a destination key of another type.
pub async fn to_user(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    m: &ToUser<'_>,
) -> Result<Published, CacheError> {
    let message = Unprompted {
        business_id: m.business_id,
        conversation_id: m.conversation_id,
        user_id: &m.to.user_id,
        reply_to: m.to.reply_to.as_deref(),
        reply_id: m.reply_id,
        message_id: m.message_id,
        status: m.status,
        content: m.content,
        stage: &m.to.stage,
        log_id: m.reply_id,
    };
    let extra = if m.agent_id.is_empty() {
        Vec::new()
    } else {
        vec![("agent_id", m.agent_id.to_owned())]
    };
    publish_unprompted(conn, streams, &message, &extra).await
}

/// An operator hands a conversation to a person (`icmp handoff start`, the console): the
/// handoff starts, the user's cached state is dropped, the agents are told. `false`: no such
/// conversation, or one with a person already.
///
/// # Errors
/// Database or Redis failures.
pub async fn start_by_operator(
    store: &crate::store::Store,
    cache: &crate::cache::Cache,
    config: &HandoffConfig,
    conversation_id: Uuid,
) -> Result<bool, crate::error::PipelineError> {
    let Some(business_id) = store.business_of_conversation(conversation_id).await? else {
        return Ok(false);
    };
    let timeout_ms = match store.load_business(business_id).await? {
        Some(b) => b.policy.handoff.timeout_ms,
        None => 0,
    };
    let state = crate::model::HandoffState::starting("operator".into(), None, timeout_ms);
    let Some(user) = store
        .start_handoff(business_id, conversation_id, &state)
        .await?
    else {
        return Ok(false);
    };
    crate::telemetry::metrics::handoff("started_operator");
    // Told by the desk's sweep when this does not get through.
    let told = tell_started(
        store,
        &cache.connection(),
        config,
        &ToAgents {
            kind: "started",
            business_id,
            conversation_id,
            user_id: &user,
            message_id: "",
            content: "",
            reply_id: Uuid::now_v7(),
            by: &state.by,
            since_ms: state.since_ms,
        },
    )
    .await;
    cache.invalidate_conversation(business_id, &user).await?;
    told?;
    Ok(true)
}

/// An operator gives a conversation back to the bot (`icmp handoff end`, the console): the
/// handoff ends (a conversation in a handoff stage goes back to the initial stage), the user's
/// cached state is dropped. `false`: no such conversation, or one not with a person.
///
/// # Errors
/// Database or Redis failures.
pub async fn end_by_operator(
    store: &crate::store::Store,
    cache: &crate::cache::Cache,
    conversation_id: Uuid,
) -> Result<bool, crate::error::PipelineError> {
    let Some(business_id) = store.business_of_conversation(conversation_id).await? else {
        return Ok(false);
    };
    let back_to = match store.load_business(business_id).await? {
        Some(b) => crate::store::handoffs::BackTo::of(&b),
        None => crate::store::handoffs::BackTo::default(),
    };
    let Some(user) = store
        .end_handoff(business_id, conversation_id, &back_to)
        .await?
    else {
        return Ok(false);
    };
    cache.invalidate_conversation(business_id, &user).await?;
    crate::telemetry::metrics::handoff("ended_by_operator");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn an_agent_entry_needs_its_ids_and_text_unless_it_ends_the_handoff() {
        let b = "7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001";
        let c = "0192a4c1-0000-7000-8000-000000000001";
        let good = [
            ("business_id", b),
            ("conversation_id", c),
            ("agent_id", "ann"),
            ("message_id", "m1"),
            ("text", " Hello, Ann here. "),
        ];
        let e = decode(&entry(&good), 100).expect("valid");
        assert_eq!((e.text.as_str(), e.end), ("Hello, Ann here.", false));
        let mut ending = good.to_vec();
        ending[4] = ("text", "");
        ending.push(("end", "true"));
        assert!(decode(&entry(&ending), 100).expect("an end alone").end);
        ending.pop();
        assert_eq!(
            decode(&entry(&ending), 100),
            Err(AgentEntryError::Invalid("text"))
        );
        for (i, name) in ["business_id", "conversation_id", "agent_id", "message_id"]
            .into_iter()
            .enumerate()
        {
            let mut bad = good.to_vec();
            bad[i] = (name, "");
            assert_eq!(
                decode(&entry(&bad), 100),
                Err(AgentEntryError::Invalid(name))
            );
        }
        assert_eq!(decode(&entry(&good), 5), Err(AgentEntryError::TooLong(5)));
        assert_eq!(AgentEntryError::NotActive.code(), "handoff.not_active");
    }
}
