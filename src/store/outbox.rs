//! The action outbox's reads and writes for the dispatcher: due rows of every business (through
//! `icmp_due_actions`, the one read that is not scoped to a business), and each row's claim and
//! outcome, scoped to its business (single-shard on Citus).

use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{Prepared, Store, StoreError};

/// A claimed outbox row: what a delivery needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub business_id: Uuid,
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub action: String,
    pub idempotency_key: String,
    pub url: String,
    pub body: serde_json::Value,
    pub timeout_ms: i32,
    pub max_attempts: i32,
    /// This attempt's number (1 for the first).
    pub attempt: i32,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A 2xx (`delivered`) or a final 4xx (`rejected`): the row is done.
    Done {
        status: &'static str,
        http_status: i32,
        latency_ms: i32,
        response: String,
    },
    /// A transient failure: tried again after `retry_in_ms`, or `dead` when no attempt is left.
    Failed {
        http_status: Option<i32>,
        error: String,
        latency_ms: i32,
        retry_in_ms: i64,
    },
}

/// Claims a due row for one attempt.
pub const CLAIM: &str = "\
UPDATE action_outbox SET attempts = attempts + 1, updated_at = now(),
       claimed_until = now() + $3::float8 * interval '1 millisecond'
 WHERE business_id = $1 AND id = $2 AND status = 'pending' AND next_attempt_at <= now()
   AND (claimed_until IS NULL OR claimed_until < now())
RETURNING conversation_id, action, idempotency_key, url, body, timeout_ms, max_attempts, attempts";

/// A final answer (2xx or 4xx).
pub const DONE: &str = "\
UPDATE action_outbox SET status = $3, last_status = $4, latency_ms = $5, response = $6,
       last_error = NULL, claimed_until = NULL, updated_at = now()
 WHERE business_id = $1 AND id = $2 AND status = 'pending'";

/// A transient failure: retried later, or `dead`.
pub const FAILED: &str = "\
UPDATE action_outbox
   SET status = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'pending' END,
       last_status = $3, last_error = $4, latency_ms = $5, claimed_until = NULL,
       next_attempt_at = now() + $6::float8 * interval '1 millisecond', updated_at = now()
 WHERE business_id = $1 AND id = $2 AND status = 'pending'
RETURNING status";

impl Store {
    /// Up to `n` due rows of every business: (business, row id), the oldest first.
    pub async fn due_actions(&self, n: i32) -> Result<Vec<(Uuid, Uuid)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared("SELECT business_id, id FROM icmp_due_actions($1)")
            .await?;
        Ok(client
            .query(&stmt, &[&n])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// Claims a due row for one attempt, held for `hold_ms` (longer than any request may take:
    /// a claim's length cannot depend on the row on Citus, where a stable function of a column
    /// may not be written); `None` when it is not due (done, claimed by another dispatcher, or
    /// not yet time).
    pub async fn claim_action(
        &self,
        business_id: Uuid,
        id: Uuid,
        hold_ms: f64,
    ) -> Result<Option<Claimed>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepared(CLAIM).await?;
        let rows = self
            .scoped(&client, business_id, &stmt, &[&business_id, &id, &hold_ms])
            .await?;
        Ok(rows.first().map(|r| Claimed {
            business_id,
            id,
            conversation_id: r.get(0),
            action: r.get(1),
            idempotency_key: r.get(2),
            url: r.get(3),
            body: r
                .get::<_, tokio_postgres::types::Json<serde_json::Value>>(4)
                .0,
            timeout_ms: r.get(5),
            max_attempts: r.get(6),
            attempt: r.get(7),
        }))
    }

    /// Records an attempt's outcome; returns the row's status after it.
    pub async fn record_action(
        &self,
        business_id: Uuid,
        id: Uuid,
        outcome: &Outcome,
    ) -> Result<String, StoreError> {
        let client = self.client().await?;
        match outcome {
            Outcome::Done {
                status,
                http_status,
                latency_ms,
                response,
            } => {
                let stmt = client.prepared(DONE).await?;
                let params: [&(dyn ToSql + Sync); 6] =
                    [&business_id, &id, status, http_status, latency_ms, response];
                self.scoped(&client, business_id, &stmt, &params).await?;
                Ok((*status).to_owned())
            }
            Outcome::Failed {
                http_status,
                error,
                latency_ms,
                retry_in_ms,
            } => {
                let stmt = client.prepared(FAILED).await?;
                let retry = *retry_in_ms as f64;
                let params: [&(dyn ToSql + Sync); 6] =
                    [&business_id, &id, http_status, error, latency_ms, &retry];
                let rows = self.scoped(&client, business_id, &stmt, &params).await?;
                Ok(rows
                    .first()
                    .map_or_else(|| "pending".to_owned(), |r| r.get(0)))
            }
        }
    }
}
