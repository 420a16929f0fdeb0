//! `icmp trace ID`: everything known about one message, by its `message_id`, `log_id` or
//! inbound entry id. That covers the inbound entry and its pending state, both stored rows with
//! the step timings and the template each reply came from, every LLM call (purpose, template and
//! version, model, latency, tokens, outcome), the stage transition, the data it taught, and the
//! reply or dead-letter entries. Read-only; works after the fact, since the step timings are
//! stored with the message.

use std::collections::BTreeMap;

use redis::Value;
use serde::Serialize;

use crate::config::StreamsConfig;
use crate::redis_connection::RedisConnection;
use crate::status::StatusError;
use crate::store::Store;
use crate::stream::{is_entry_id, scan_entries, string_entries};

/// Everything found about one message.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Trace {
    pub query: String,
    /// The inbound entry, if it is still in the stream.
    pub inbound: Option<Entry>,
    /// Its pending state: (consumer, idle ms, deliveries), when not yet acknowledged.
    pub pending: Option<(String, u64, u64)>,
    pub messages: Vec<BTreeMap<String, serde_json::Value>>,
    pub llm_calls: Vec<BTreeMap<String, serde_json::Value>>,
    pub transitions: Vec<(String, String)>,
    pub extracted: BTreeMap<String, serde_json::Value>,
    pub replies: Vec<Entry>,
    pub dead_letters: Vec<Entry>,
}

/// A stream entry, as text.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub id: String,
    pub fields: BTreeMap<String, String>,
}

impl Trace {
    /// The business of the message traced, as stored or as its entry names it.
    pub fn business_id(&self) -> Option<uuid::Uuid> {
        let stored = self
            .messages
            .first()
            .and_then(|m| m.get("business_id")?.as_str()?.parse().ok());
        stored.or_else(|| {
            let entry = self.inbound.as_ref()?;
            crate::protocol::inbound::canonical_business(entry.fields.get("business_id")?)
        })
    }

    /// How the audit trail names the message traced: its inbound entry id or its log id (not
    /// the query, which may be a producer's `message_id`, made of anything).
    pub fn reference(&self) -> String {
        let stored = |k: &str| {
            self.messages
                .first()
                .and_then(|m| m.get(k)?.as_str().map(str::to_owned))
                .filter(|v| !v.is_empty())
        };
        stored("inbound_id")
            .or_else(|| self.inbound.as_ref().map(|e| e.id.clone()))
            .or_else(|| stored("log_id"))
            .unwrap_or_default()
    }

    /// Whether anything at all was found.
    pub fn found(&self) -> bool {
        self.inbound.is_some()
            || !self.messages.is_empty()
            || !self.replies.is_empty()
            || !self.dead_letters.is_empty()
    }
}

/// How many entries of the outbound and dead-letter streams a trace reads at most.
const SCAN_LIMIT: usize = 20_000;

async fn scan(
    conn: &RedisConnection,
    stream: &str,
    from: &str,
    keep: impl Fn(&BTreeMap<String, String>) -> bool,
) -> Result<Vec<Entry>, StatusError> {
    Ok(scan_entries(conn, stream, from, SCAN_LIMIT, keep)
        .await?
        .into_iter()
        .map(|(id, fields)| Entry { id, fields })
        .collect())
}

/// Traces the message `id` (a `message_id`, `log_id` or inbound entry id).
///
/// # Errors
/// Redis or PostgreSQL failures.
pub async fn trace(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    store: &Store,
    id: &str,
) -> Result<Trace, StatusError> {
    let mut t = Trace {
        query: id.to_owned(),
        ..Trace::default()
    };
    let rows = store.trace_rows(id).await?;
    t.messages = rows.messages;
    t.llm_calls = rows.llm_calls;
    t.transitions = rows.transitions;
    t.extracted = rows.extracted;
    let text = |m: &BTreeMap<String, serde_json::Value>, k: &str| {
        m.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let inbound_id = t
        .messages
        .first()
        .map(|m| text(m, "inbound_id"))
        .filter(|s| !s.is_empty())
        .or_else(|| is_entry_id(id).then(|| id.to_owned()));
    let key = t
        .messages
        .first()
        .map(|m| text(m, "message_id"))
        .unwrap_or_else(|| id.to_owned());
    let shards = streams.all_shards();
    if let Some(inbound) = &inbound_id {
        inbound_state(conn, &shards, inbound, &mut t).await?;
    }
    // Replies come after their inbound entry: scan from its time (or everything).
    let from = inbound_id
        .as_deref()
        .and_then(crate::stream::entry_time_ms)
        .map_or("-".to_owned(), |ms| format!("{ms}-0"));
    let matches = |f: &BTreeMap<String, String>| {
        inbound_id
            .as_deref()
            .is_some_and(|i| f.get("inbound_id").map(String::as_str) == Some(i))
            || f.get("message_id") == Some(&key)
            || f.get("log_id").map(String::as_str) == Some(id)
    };
    for shard in &shards {
        t.replies
            .extend(scan(conn, &shard.outbound, &from, matches).await?);
        t.dead_letters
            .extend(scan(conn, &shard.dead_letter, "-", matches).await?);
    }
    Ok(t)
}

/// The inbound entry `inbound` (on whichever shard holds it) and its pending state.
async fn inbound_state(
    conn: &RedisConnection,
    shards: &[StreamsConfig],
    inbound: &str,
    t: &mut Trace,
) -> Result<(), StatusError> {
    let mut streams = &shards[0];
    // The shard whose stream holds the entry (the first, when none does any more).
    for shard in shards {
        let reply: Value = redis::cmd("XRANGE")
            .arg(&shard.inbound)
            .arg(inbound)
            .arg(inbound)
            .query_async(&mut conn.clone())
            .await?;
        t.inbound = string_entries(reply)
            .into_iter()
            .next()
            .map(|(id, fields)| Entry { id, fields });
        if t.inbound.is_some() {
            streams = shard;
            break;
        }
    }
    t.pending = crate::stream::pending_entry(conn, &streams.inbound, &streams.group, inbound)
        .await
        .ok()
        .flatten();
    Ok(())
}

impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "trace of {}", self.query)?;
        match &self.inbound {
            Some(e) => writeln!(f, "inbound entry {}: {:?}", e.id, e.fields)?,
            None => writeln!(
                f,
                "inbound entry: not in the stream (trimmed, or never seen)"
            )?,
        }
        match &self.pending {
            Some((consumer, idle, deliveries)) => writeln!(
                f,
                "pending: held by {consumer}, idle {idle} ms, {deliveries} deliveries"
            )?,
            None => writeln!(f, "pending: no (acknowledged, or never delivered)")?,
        }
        for m in &self.messages {
            let get = |k: &str| m.get(k).map(|v| v.to_string()).unwrap_or_default();
            writeln!(
                f,
                "stored {} {} · stage {} · status {} · template {} v{} · timings {} · log {}",
                get("role"),
                get("id"),
                get("stage"),
                get("status"),
                get("template"),
                get("template_version"),
                get("timings"),
                get("log_id"),
            )?;
            writeln!(f, "    {}", get("content"))?;
        }
        for c in &self.llm_calls {
            let get = |k: &str| c.get(k).map(|v| v.to_string()).unwrap_or_default();
            writeln!(
                f,
                "llm call {} · template {} v{} · model {} on {} · {} ms · tokens {}/{} · {}",
                get("purpose"),
                get("template"),
                get("template_version"),
                get("model"),
                get("endpoint"),
                get("latency_ms"),
                get("prompt_tokens"),
                get("completion_tokens"),
                get("outcome"),
            )?;
        }
        for (from, to) in &self.transitions {
            writeln!(f, "stage transition: {from} → {to}")?;
        }
        if !self.extracted.is_empty() {
            writeln!(
                f,
                "extracted from it: {}",
                serde_json::to_string(&self.extracted).unwrap_or_default()
            )?;
        }
        for r in &self.replies {
            writeln!(f, "reply {}: {:?}", r.id, r.fields)?;
        }
        for d in &self.dead_letters {
            writeln!(f, "dead letter {}: {:?}", d.id, d.fields)?;
        }
        if !self.found() {
            writeln!(f, "nothing found")?;
        }
        Ok(())
    }
}
