//! The write phase (DESIGN §2): everything one message changes, in ONE transaction.
//!
//! User upsert, conversation insert or version check-and-bump, both messages with the
//! idempotency key, the stage transition, extracted data, the LLM call rows; then COMMIT.
//! Either all of it is stored or none of it.

use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::{Store, StoreError, is_unique_violation};
use crate::model::Extracted;

/// One LLM call, as logged in `llm_calls`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmCallRecord {
    pub id: Uuid,
    /// `selection`, `extraction` or `response`.
    pub purpose: &'static str,
    pub template_id: Uuid,
    pub template_version: i32,
    pub model: String,
    pub prompt: String,
    pub output: Option<String>,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    pub latency_ms: u32,
    /// `ok` or an error code.
    pub outcome: &'static str,
}

/// The conversation's state as the write phase committed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommittedConversation {
    pub version: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Everything the write phase stores for one message.
#[derive(Debug, Clone)]
pub struct WriteSet {
    pub business_id: Uuid,
    pub log_id: Uuid,
    pub user_external_id: String,
    pub conversation_id: Uuid,
    /// `None` for a new conversation; else the version the read phase saw.
    pub expected_version: Option<i64>,
    /// The stage after this message.
    pub stage_id: Uuid,
    /// (from, to) when selection moved the stage.
    pub transition: Option<(Uuid, Uuid)>,
    /// Fields extracted from this message.
    pub extracted: Extracted,
    pub idempotency_key: String,
    pub inbound_id: String,
    pub user_message_id: Uuid,
    pub user_content: String,
    pub metadata: Option<serde_json::Value>,
    /// Stage the user message was received in.
    pub user_stage_id: Uuid,
    pub assistant_message_id: Uuid,
    pub assistant_content: String,
    /// `ok` or `fallback`.
    pub assistant_status: &'static str,
    /// The fallback template (id, version) a fallback reply was rendered from.
    pub fallback_template: Option<(Uuid, i32)>,
    pub llm_calls: Vec<LlmCallRecord>,
}

impl Store {
    /// Commits a write set and returns the conversation as committed.
    ///
    /// `before_commit` runs inside the transaction after every write (a fault-injection point);
    /// an error from it rolls everything back.
    ///
    /// # Errors
    /// [`StoreError::VersionConflict`] when the conversation changed since the read phase,
    /// [`StoreError::Duplicate`] when the idempotency key is already committed, database errors.
    pub async fn commit_write_set(
        &self,
        ws: &WriteSet,
        before_commit: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<CommittedConversation, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let user_id = upsert_user(&tx, ws).await?;
        let committed = advance_conversation(&tx, ws, user_id).await?;
        insert_messages(&tx, ws, user_id).await?;
        insert_transition(&tx, ws).await?;
        upsert_extracted(&tx, ws).await?;
        insert_llm_calls(&tx, ws).await?;
        before_commit()?;
        tx.commit().await?;
        Ok(committed)
    }
}

/// The user (created on first contact); returns its id.
async fn upsert_user(tx: &Transaction<'_>, ws: &WriteSet) -> Result<Uuid, StoreError> {
    let b = &ws.business_id;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO users (business_id, external_id) VALUES ($1, $2) \
             ON CONFLICT (business_id, external_id) DO UPDATE SET last_seen_at = now() \
             RETURNING id",
        )
        .await?;
    let user_id: Uuid = tx
        .query_one(&stmt, &[b, &ws.user_external_id])
        .await?
        .get(0);
    Ok(user_id)
}

/// Inserts a new conversation or bumps the version the read phase saw (a different version is
/// a [`StoreError::VersionConflict`]); returns the committed state.
async fn advance_conversation(
    tx: &Transaction<'_>,
    ws: &WriteSet,
    user_id: Uuid,
) -> Result<CommittedConversation, StoreError> {
    let b = &ws.business_id;
    let row = match ws.expected_version {
        None => {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO conversations (id, business_id, user_id, current_stage_id) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING \
                     RETURNING version, created_at, updated_at",
                )
                .await?;
            tx.query_opt(&stmt, &[&ws.conversation_id, b, &user_id, &ws.stage_id])
                .await?
                .ok_or(StoreError::VersionConflict)?
        }
        Some(expected) => {
            let stmt = tx
                .prepare_cached(
                    "UPDATE conversations SET version = version + 1, current_stage_id = $4, \
                     updated_at = now() \
                     WHERE business_id = $1 AND id = $2 AND version = $3 AND user_id = $5 \
                     RETURNING version, created_at, updated_at",
                )
                .await?;
            tx.query_opt(
                &stmt,
                &[b, &ws.conversation_id, &expected, &ws.stage_id, &user_id],
            )
            .await?
            .ok_or(StoreError::VersionConflict)?
        }
    };
    let committed = CommittedConversation {
        version: row.get(0),
        created_at: row.get(1),
        updated_at: row.get(2),
    };
    Ok(committed)
}

/// The user's message and the reply; the idempotency key makes a second copy of either a
/// unique violation, reported as [`StoreError::Duplicate`].
async fn insert_messages(
    tx: &Transaction<'_>,
    ws: &WriteSet,
    user_id: Uuid,
) -> Result<(), StoreError> {
    let b = &ws.business_id;
    let insert_message = tx
        .prepare_cached(
            "INSERT INTO messages (id, business_id, conversation_id, role, content, \
             idempotency_key, stage_id, status, metadata, inbound_id, log_id, user_id, \
             fallback_template_id, fallback_template_version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .await?;
    let rows = [
        (
            ws.user_message_id,
            "user",
            ws.user_content.as_str(),
            ws.user_stage_id,
            None,
            ws.metadata.as_ref(),
            None,
        ),
        (
            ws.assistant_message_id,
            "assistant",
            ws.assistant_content.as_str(),
            ws.stage_id,
            Some(ws.assistant_status),
            None,
            ws.fallback_template,
        ),
    ];
    for (id, role, content, stage, status, metadata, fallback) in rows {
        tx.execute(
            &insert_message,
            &[
                &id,
                b,
                &ws.conversation_id,
                &role,
                &content,
                &ws.idempotency_key,
                &stage,
                &status,
                &metadata,
                &ws.inbound_id,
                &ws.log_id,
                &user_id,
                &fallback.map(|(id, _)| id),
                &fallback.map(|(_, version)| version),
            ],
        )
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Duplicate
            } else {
                e.into()
            }
        })?;
    }
    Ok(())
}

async fn insert_transition(tx: &Transaction<'_>, ws: &WriteSet) -> Result<(), StoreError> {
    let b = &ws.business_id;
    if let Some((from, to)) = ws.transition {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO stage_transitions (business_id, conversation_id, from_stage_id, \
                 to_stage_id, message_id, log_id) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await?;
        tx.execute(
            &stmt,
            &[
                b,
                &ws.conversation_id,
                &from,
                &to,
                &ws.user_message_id,
                &ws.log_id,
            ],
        )
        .await?;
    }
    Ok(())
}

async fn upsert_extracted(tx: &Transaction<'_>, ws: &WriteSet) -> Result<(), StoreError> {
    let b = &ws.business_id;
    if !ws.extracted.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO extracted_data (business_id, conversation_id, field, value, \
                 source_message_id) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (conversation_id, field) DO UPDATE SET value = EXCLUDED.value, \
                 source_message_id = EXCLUDED.source_message_id, updated_at = now()",
            )
            .await?;
        for (field, value) in &ws.extracted {
            tx.execute(
                &stmt,
                &[b, &ws.conversation_id, field, value, &ws.user_message_id],
            )
            .await?;
        }
    }
    Ok(())
}

async fn insert_llm_calls(tx: &Transaction<'_>, ws: &WriteSet) -> Result<(), StoreError> {
    let b = &ws.business_id;
    if !ws.llm_calls.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO llm_calls (id, business_id, conversation_id, message_id, purpose, \
                 template_id, template_version, model, prompt, output, prompt_tokens, \
                 completion_tokens, latency_ms, outcome, log_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .await?;
        for c in &ws.llm_calls {
            tx.execute(
                &stmt,
                &[
                    &c.id,
                    b,
                    &ws.conversation_id,
                    &ws.user_message_id,
                    &c.purpose,
                    &c.template_id,
                    &c.template_version,
                    &c.model,
                    &c.prompt,
                    &c.output,
                    &c.prompt_tokens.map(|t| t as i32),
                    &c.completion_tokens.map(|t| t as i32),
                    &(c.latency_ms as i32),
                    &c.outcome,
                    &ws.log_id,
                ],
            )
            .await?;
        }
    }
    Ok(())
}
