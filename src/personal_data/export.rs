//! `icmp user export`: everything stored of one user as one JSON document (docs/operations.md,
//! "Personal data": its shape). Read-only.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Subject;
use super::places::{self, Found, Streams};
use crate::redis_connection::RedisConnection;
use crate::status::StatusError;
use crate::store::Store;

/// One user's data, wherever icmp keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct Export {
    pub business_id: String,
    pub user_id: String,
    /// When the document was made (RFC 3339).
    pub exported_at: String,
    /// PostgreSQL's rows, per table (`users`, `conversations`, `messages`, `extracted_data`,
    /// `stage_transitions`, `llm_calls` with their prompts and outputs, `action_outbox`).
    pub database: BTreeMap<&'static str, Vec<serde_json::Value>>,
    /// The cached conversation state (Redis), as stored.
    pub cached_state: Option<serde_json::Value>,
    /// Entries naming the user in the streams.
    pub streams: Found,
    /// Those of the inbound entries that a worker holds (delivered, not yet acknowledged).
    pub pending: Vec<Pending>,
}

/// An inbound entry on the consumer group's pending list.
#[derive(Debug, Clone, Serialize)]
pub struct Pending {
    /// The inbound stream and the entry's id.
    pub stream: String,
    pub id: String,
    /// The consumer (worker) holding it, for how long, and how many times it was delivered.
    pub consumer: String,
    pub idle_ms: u64,
    pub deliveries: u64,
}

impl Export {
    /// Items per place: rows per table, entries per kind of stream, the cached state.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = self
            .database
            .iter()
            .map(|(t, rows)| ((*t).to_owned(), rows.len() as u64))
            .collect();
        out.extend(self.streams.counts());
        out.insert(
            "cached_state".to_owned(),
            u64::from(self.cached_state.is_some()),
        );
        out
    }

    /// Whether nothing at all was found.
    pub fn is_empty(&self) -> bool {
        self.counts().values().all(|&n| n == 0)
    }
}

/// Everything stored of `subject`.
///
/// # Errors
/// Redis or PostgreSQL failures.
pub async fn export(
    store: &Store,
    conn: &RedisConnection,
    key_prefix: &str,
    at: Streams<'_>,
    subject: &Subject,
) -> Result<Export, StatusError> {
    let rows = store.user_rows(subject.business, &subject.user).await?;
    let state_key = crate::cache::state_key(key_prefix, subject.business, &subject.user);
    let streams = places::find(conn, at, subject, |_| true).await?;
    let mut pending = Vec::new();
    for p in &streams.inbound {
        let held = crate::stream::pending_entry(conn, &p.stream, &at.streams.group, &p.entry.id)
            .await
            .ok()
            .flatten();
        if let Some((consumer, idle_ms, deliveries)) = held {
            pending.push(Pending {
                stream: p.stream.clone(),
                id: p.entry.id.clone(),
                consumer,
                idle_ms,
                deliveries,
            });
        }
    }
    Ok(Export {
        business_id: subject.business.to_string(),
        user_id: subject.user.clone(),
        exported_at: chrono::Utc::now().to_rfc3339(),
        database: rows.tables,
        cached_state: places::cached_state(conn, &state_key).await?,
        streams,
        pending,
    })
}
