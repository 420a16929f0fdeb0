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

/// An outbox row as an operator sees it (`icmp actions`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ActionRow {
    pub id: Uuid,
    pub business_id: Uuid,
    pub conversation_id: Uuid,
    pub message_id: Option<Uuid>,
    pub action: String,
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub latency_ms: Option<i32>,
    pub response: Option<String>,
    pub idempotency_key: String,
    pub body: serde_json::Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

const ROW_COLUMNS: &str = "id, business_id, conversation_id, message_id, action, status, attempts, \
     max_attempts, last_status, last_error, latency_ms, response, idempotency_key, body, \
     created_at, updated_at";

fn action_row(r: &tokio_postgres::Row) -> ActionRow {
    ActionRow {
        id: r.get(0),
        business_id: r.get(1),
        conversation_id: r.get(2),
        message_id: r.get(3),
        action: r.get(4),
        status: r.get(5),
        attempts: r.get(6),
        max_attempts: r.get(7),
        last_status: r.get(8),
        last_error: r.get(9),
        latency_ms: r.get(10),
        response: r.get(11),
        idempotency_key: r.get(12),
        body: r
            .get::<_, tokio_postgres::types::Json<serde_json::Value>>(13)
            .0,
        created_at: r.get(14),
        updated_at: r.get(15),
    }
}

impl Store {
    /// Outbox rows, the newest first, of one business and status when given (an operator's
    /// read, as the tables' owner).
    pub async fn list_actions(
        &self,
        business: Option<Uuid>,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ActionRow>, StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM action_outbox WHERE ($1::uuid IS NULL OR business_id = $1) \
             AND ($2::text IS NULL OR status = $2) ORDER BY created_at DESC LIMIT $3"
        );
        Ok(client
            .query(&sql, &[&business, &status, &limit])
            .await?
            .iter()
            .map(action_row)
            .collect())
    }

    /// One outbox row by id.
    pub async fn action(&self, id: Uuid) -> Result<Option<ActionRow>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {ROW_COLUMNS} FROM action_outbox WHERE id = $1");
        Ok(client
            .query_opt(&sql, &[&id])
            .await?
            .as_ref()
            .map(action_row))
    }

    /// Sends rows that ended (`dead`, `rejected`, `cancelled`) again: pending now, with one more
    /// attempt than they used (a `delivered` row is never sent again). Returns the ids changed.
    pub async fn retry_actions(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "UPDATE action_outbox SET status = 'pending', next_attempt_at = now(), \
                 claimed_until = NULL, max_attempts = greatest(max_attempts, attempts + 1), \
                 updated_at = now() \
                 WHERE id = ANY($1) AND status IN ('dead', 'rejected', 'cancelled') RETURNING id",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Cancels pending rows (a request under way still ends, and its outcome is not recorded
    /// over the cancellation). Returns the ids changed.
    pub async fn cancel_actions(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "UPDATE action_outbox SET status = 'cancelled', claimed_until = NULL, \
                 updated_at = now() WHERE id = ANY($1) AND status = 'pending' RETURNING id",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}
