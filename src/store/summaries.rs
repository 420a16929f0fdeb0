//! Conversation summaries: the turns not yet folded into a conversation's rolling summary, and
//! the new summary saved with the call that made it. Both are single-shard on Citus (every
//! statement filters the business, and the call rows are selected through the co-located
//! conversation row, as the write set's are).

use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{Prepared, Store, StoreError};
use crate::model::{Role, Turn};
use crate::store::write_set::LlmCallRecord;

/// The most turns one summary folds (older unsummarised turns wait for the next one).
pub const MAX_FOLD: i64 = 200;

/// The summary, the last message it covers and the messages after it (at most `$3`).
pub const UNSUMMARIZED: &str = "\
SELECT c.summary, c.summarized_seq, m.seq, m.role, m.content
  FROM conversations AS c
  LEFT JOIN messages AS m ON m.business_id = c.business_id AND m.conversation_id = c.id
                          AND m.seq > c.summarized_seq AND m.status IS DISTINCT FROM 'handoff'
 WHERE c.business_id = $1 AND c.id = $2
 ORDER BY m.seq
 LIMIT $3";

/// The summary replaced only when it is still the one the summariser read.
pub const SAVE: &str = "\
UPDATE conversations SET summary = $3, summarized_seq = $4
 WHERE business_id = $1 AND id = $2 AND summarized_seq = $5
RETURNING id";

/// The calls that made it, when the summary is the one just saved.
pub const CALLS: &str = "\
INSERT INTO llm_calls (id, business_id, conversation_id, message_id, purpose, template_id,
                       template_version, model, prompt, output, prompt_tokens,
                       completion_tokens, latency_ms, outcome, log_id, endpoint, response_format)
SELECT k.id, c.business_id, c.id, NULL, k.purpose, k.template_id, k.template_version, k.model,
       k.prompt, k.output, k.prompt_tokens, k.completion_tokens, k.latency_ms, k.outcome, $3,
       k.endpoint, k.response_format
  FROM conversations AS c,
       jsonb_to_recordset($4::jsonb) AS k(id uuid, purpose text, template_id uuid,
         template_version integer, model text, prompt text, output text, prompt_tokens integer,
         completion_tokens integer, latency_ms integer, outcome text, endpoint text,
         response_format text)
 WHERE c.business_id = $1 AND c.id = $2 AND c.summarized_seq = $5";

/// A conversation's summary, the last message it covers, and the messages after it (oldest
/// first, with their `seq`, at most [`MAX_FOLD`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Unsummarized {
    pub summary: String,
    pub summarized_seq: i64,
    pub turns: Vec<(i64, Turn)>,
}

impl Store {
    /// What a summary of conversation `conversation_id` would fold (`None`: no such
    /// conversation).
    pub async fn unsummarized(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
    ) -> Result<Option<Unsummarized>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepared(UNSUMMARIZED).await?;
        let rows = self
            .scoped(
                &client,
                business_id,
                &stmt,
                &[&business_id, &conversation_id, &MAX_FOLD],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let mut out = Unsummarized {
            summary: first.get(0),
            summarized_seq: first.get(1),
            turns: Vec::with_capacity(rows.len()),
        };
        for r in &rows {
            if let Some(seq) = r.get::<_, Option<i64>>(2) {
                let role: String = r.get(3);
                out.turns.push((
                    seq,
                    Turn {
                        role: Role::parse(&role),
                        content: r.get(4),
                    },
                ));
            }
        }
        Ok(Some(out))
    }

    /// Saves `summary` as covering the conversation's messages up to `upto`, with the calls
    /// that made it, if its summary still covers `read_seq` (what the summariser read);
    /// returns whether it was saved. One transaction.
    pub async fn save_summary(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
        (read_seq, upto): (i64, i64),
        summary: &str,
        calls: &[LlmCallRecord],
        log_id: Uuid,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let save = client.prepared(SAVE).await?;
        let insert = client.prepared(CALLS).await?;
        let calls = serde_json::to_value(calls)
            .map_err(|e| StoreError::Inconsistent(format!("call records: {e}")))?;
        let calls = tokio_postgres::types::Json(calls);
        let save_params: [&(dyn ToSql + Sync); 5] =
            [&business_id, &conversation_id, &summary, &upto, &read_seq];
        let insert_params: [&(dyn ToSql + Sync); 5] =
            [&business_id, &conversation_id, &log_id, &calls, &upto];
        let rows = self
            .scoped_steps(
                &client,
                business_id,
                &[(&save, &save_params[..]), (&insert, &insert_params[..])],
                "COMMIT",
            )
            .await?;
        Ok(rows.first().is_some_and(|r| !r.is_empty()))
    }
}
