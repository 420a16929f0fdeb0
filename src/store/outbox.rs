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
    /// The firing message's `reply_to`.
    pub reply_to: Option<String>,
    /// The action's follow-up template.
    pub follow_up: Option<String>,
    /// The results that hand the conversation to a person.
    pub handoff_on: Vec<String>,
    /// The trace context of the span that fired it.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// What a final outcome (`delivered`, `rejected`, `dead`) changes besides the outbox row: the
/// result stored on the conversation (`actions.<name>`) and the follow-up message, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    pub result: serde_json::Value,
    /// The follow-up's message id (its `reply_id`) and text.
    pub follow_up: Option<(Uuid, String)>,
    /// The handoff the result starts (when the conversation is not with a person already).
    pub handoff: Option<crate::model::HandoffState>,
}

/// A final result on its conversation, and its follow-up as the conversation's next message
/// (`at`: business, conversation, outbox row); returns the conversation's user.
async fn store_result(
    tx: &deadpool_postgres::Transaction<'_>,
    (result, message): &(tokio_postgres::Statement, tokio_postgres::Statement),
    (business_id, conversation, id): (Uuid, Uuid, Uuid),
    action: &str,
    settlement: &Settlement,
) -> Result<String, StoreError> {
    let room = i64::from(settlement.follow_up.is_some());
    let conv = tx
        .query_one(
            result,
            &[
                &business_id,
                &conversation,
                &action,
                &tokio_postgres::types::Json(&settlement.result),
                &room,
                &settlement.handoff.as_ref().map(tokio_postgres::types::Json),
            ],
        )
        .await?;
    if let Some((reply_id, text)) = &settlement.follow_up {
        let seq: i64 = conv.get(0);
        let user: Uuid = conv.get(1);
        let stage: Uuid = conv.get(2);
        let key = format!("action:{id}:{reply_id}");
        tx.execute(
            message,
            &[
                &business_id,
                &conversation,
                reply_id,
                text,
                &key,
                &Uuid::now_v7(),
                &seq,
                &user,
                &stage,
            ],
        )
        .await?;
    }
    Ok(conv.get(3))
}

/// What recording an outcome did.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The row's status after it.
    pub status: String,
    /// The conversation's user, when a final result changed the conversation.
    pub user_id: Option<String>,
}

/// A settled row's follow-up, as it is published.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUp {
    pub business_id: Uuid,
    pub outbox_id: Uuid,
    pub conversation_id: Uuid,
    pub action: String,
    /// The user's id in the business.
    pub user_id: String,
    pub reply_to: Option<String>,
    pub reply_id: Uuid,
    pub text: String,
    /// The stage the conversation was in when the follow-up was stored.
    pub stage: String,
    /// The idempotency key of the message that fired the action.
    pub message_key: String,
    /// That message's inbound entry: the follow-up waits while it is pending (its reply not
    /// published yet).
    pub inbound_id: Option<String>,
    /// The trace context the action was fired in (`None`: no span export then).
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
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
RETURNING conversation_id, action, idempotency_key, url, body, timeout_ms, max_attempts, attempts,
          reply_to, follow_up, handoff_on, traceparent, tracestate";

/// A final answer (2xx or 4xx), with the follow-up's id and text (`$7`, `$8`; NULL: none).
pub const DONE: &str = "\
UPDATE action_outbox SET status = $3, last_status = $4, latency_ms = $5, response = $6,
       last_error = NULL, claimed_until = NULL, updated_at = now(),
       follow_up_id = $7, follow_up_text = $8
 WHERE business_id = $1 AND id = $2 AND status = 'pending'
RETURNING status, conversation_id, action";

/// A transient failure: retried later, or `dead` (then with the follow-up, `$7`, `$8`).
pub const FAILED: &str = "\
UPDATE action_outbox
   SET status = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'pending' END,
       last_status = $3, last_error = $4, latency_ms = $5, claimed_until = NULL,
       next_attempt_at = now() + $6::float8 * interval '1 millisecond', updated_at = now(),
       follow_up_id = CASE WHEN attempts >= max_attempts THEN $7::uuid END,
       follow_up_text = CASE WHEN attempts >= max_attempts THEN $8::text END
 WHERE business_id = $1 AND id = $2 AND status = 'pending'
RETURNING status, conversation_id, action";

/// A final result on its conversation (`$3` action, `$4` result), which changes the
/// conversation (its version, so that a message read before it re-reads it), with room for
/// the follow-up (`$5`: 1, else 0) and the handoff it starts (`$6`, when none is under way).
/// Returns the user's id and where the follow-up goes.
pub const RESULT: &str = "\
UPDATE conversations AS c
   SET actions = c.actions || jsonb_build_object($3::text, $4::jsonb), version = c.version + 1,
       last_seq = c.last_seq + $5, updated_at = now(), handoff = coalesce(c.handoff, $6::jsonb)
  FROM users AS u
 WHERE c.business_id = $1 AND c.id = $2 AND u.business_id = $1 AND u.id = c.user_id
RETURNING c.last_seq, c.user_id, c.current_stage_id, u.external_id";

/// The follow-up, stored as the conversation's next assistant message (`$3` id, `$4` text,
/// `$5` key, `$6` log id, `$7` seq, `$8` user row id, `$9` stage).
pub const FOLLOW_UP_MESSAGE: &str = "\
INSERT INTO messages (id, business_id, conversation_id, seq, role, content, idempotency_key,
                      stage_id, status, log_id, user_id)
VALUES ($3, $1, $2, $7, 'assistant', $4, $5, $9, 'ok', $6, $8)";

/// A settled row's follow-up, with what its reply carries.
pub const FOLLOW_UP: &str = "\
SELECT o.conversation_id, o.action, u.external_id, o.reply_to, o.follow_up_id, o.follow_up_text,
       coalesce(s.name, ''), coalesce(q.idempotency_key, ''), q.inbound_id, o.traceparent,
       o.tracestate
  FROM action_outbox o
  JOIN conversations c ON c.business_id = o.business_id AND c.id = o.conversation_id
  JOIN users u ON u.business_id = c.business_id AND u.id = c.user_id
  LEFT JOIN messages f ON f.business_id = o.business_id AND f.id = o.follow_up_id
  LEFT JOIN stages s ON s.business_id = o.business_id AND s.id = f.stage_id
  LEFT JOIN messages q ON q.business_id = o.business_id AND q.id = o.message_id
 WHERE o.business_id = $1 AND o.id = $2 AND o.follow_up_id IS NOT NULL
   AND o.follow_up_published_at IS NULL";

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
            reply_to: r.get(8),
            follow_up: r.get(9),
            handoff_on: r
                .get::<_, Option<tokio_postgres::types::Json<Vec<String>>>>(10)
                .map(|j| j.0)
                .unwrap_or_default(),
            traceparent: r.get(11),
            tracestate: r.get(12),
        }))
    }

    /// Records an attempt's outcome; returns the row's status after it (`None`: the row was
    /// not pending any more, cancelled meanwhile). A final outcome also stores `settlement`:
    /// the result on the conversation and the follow-up message, in the same transaction.
    pub async fn record_action(
        &self,
        business_id: Uuid,
        id: Uuid,
        outcome: &Outcome,
        settlement: &Settlement,
    ) -> Result<Option<Recorded>, StoreError> {
        let mut client = self.client().await?;
        let (follow_id, follow_text) = settlement.follow_up.clone().unzip();
        let retry = match outcome {
            Outcome::Failed { retry_in_ms, .. } => *retry_in_ms as f64,
            Outcome::Done { .. } => 0.0,
        };
        let (sql, params): (&str, [&(dyn ToSql + Sync); 8]) = match outcome {
            Outcome::Done {
                status,
                http_status,
                latency_ms,
                response,
            } => (
                DONE,
                [
                    &business_id,
                    &id,
                    status,
                    http_status,
                    latency_ms,
                    response,
                    &follow_id,
                    &follow_text,
                ],
            ),
            Outcome::Failed {
                http_status,
                error,
                latency_ms,
                ..
            } => (
                FAILED,
                [
                    &business_id,
                    &id,
                    http_status,
                    error,
                    latency_ms,
                    &retry,
                    &follow_id,
                    &follow_text,
                ],
            ),
        };
        let outcome_stmt = client.prepared(sql).await?;
        let result_stmts = (
            client.prepared(RESULT).await?,
            client.prepared(FOLLOW_UP_MESSAGE).await?,
        );
        let tx = client.transaction().await?;
        tx.batch_execute(&super::scope_sql(business_id, None))
            .await?;
        let Some(row) = tx.query_opt(&outcome_stmt, &params).await? else {
            return Ok(None);
        };
        let status: String = row.get(0);
        let user_id = if status == "pending" {
            None
        } else {
            let at = (business_id, row.get(1), id);
            Some(store_result(&tx, &result_stmts, at, &row.get::<_, String>(2), settlement).await?)
        };
        tx.commit().await?;
        Ok(Some(Recorded { status, user_id }))
    }

    /// Up to `n` stored follow-ups of every business not published yet, stored at least
    /// `older_ms` ago: (business, outbox row).
    pub async fn unpublished_follow_ups(
        &self,
        n: i32,
        older_ms: i32,
    ) -> Result<Vec<(Uuid, Uuid)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared("SELECT business_id, id FROM icmp_unpublished_follow_ups($1, $2)")
            .await?;
        Ok(client
            .query(&stmt, &[&n, &older_ms])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// A row's follow-up when it is stored and not published yet.
    pub async fn follow_up(
        &self,
        business_id: Uuid,
        id: Uuid,
    ) -> Result<Option<FollowUp>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepared(FOLLOW_UP).await?;
        let rows = self
            .scoped(&client, business_id, &stmt, &[&business_id, &id])
            .await?;
        Ok(rows.first().map(|r| FollowUp {
            business_id,
            outbox_id: id,
            conversation_id: r.get(0),
            action: r.get(1),
            user_id: r.get(2),
            reply_to: r.get(3),
            reply_id: r.get(4),
            text: r.get(5),
            stage: r.get(6),
            message_key: r.get(7),
            inbound_id: r.get(8),
            traceparent: r.get(9),
            tracestate: r.get(10),
        }))
    }

    /// Marks a follow-up published.
    pub async fn follow_up_published(&self, business_id: Uuid, id: Uuid) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(
                "UPDATE action_outbox SET follow_up_published_at = now() \
                 WHERE business_id = $1 AND id = $2",
            )
            .await?;
        self.scoped(&client, business_id, &stmt, &[&business_id, &id])
            .await?;
        Ok(())
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
    /// The follow-up sent to the user, and when it was published.
    pub follow_up_text: Option<String>,
    pub follow_up_published_at: Option<chrono::DateTime<chrono::Utc>>,
}

const ROW_COLUMNS: &str = "id, business_id, conversation_id, message_id, action, status, attempts, \
     max_attempts, last_status, last_error, latency_ms, response, idempotency_key, body, \
     created_at, updated_at, follow_up_text, follow_up_published_at";

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
        follow_up_text: r.get(16),
        follow_up_published_at: r.get(17),
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
                 follow_up_id = NULL, follow_up_text = NULL, follow_up_published_at = NULL, \
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
