//! The retention sweep's reads and writes: the businesses that limit how long they keep data
//! (through `icmp_retention_policies`, migration V17), and, scoped to one business, one batch
//! of what it keeps no longer, each batch its own short transaction (single-shard on Citus).

use uuid::Uuid;

use super::{Store, StoreError, scope_sql};
use crate::model::Retention;

/// The rows stored in `[from, to)`: the slice of time a batch works in, so that a batch reads
/// only the pages of that slice (the BRIN indexes on `created_at`, migration V16), not every
/// row before it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Inclusive.
    pub from: chrono::DateTime<chrono::Utc>,
    /// Exclusive.
    pub to: chrono::DateTime<chrono::Utc>,
}

/// What the sweep works through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Swept {
    /// LLM calls whose prompt or output is not blanked yet.
    Prompts,
    Messages,
}

/// What one batch of expired messages removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expired {
    /// Messages deleted.
    pub messages: u64,
    /// Conversations and users deleted because the batch left them empty.
    pub conversations: u64,
    pub users: u64,
    /// The users whose conversations lost messages: their cached state may hold them.
    pub touched_users: Vec<String>,
}

impl Store {
    /// Every business with a `[business.retention]`, with it.
    ///
    /// # Errors
    /// Database errors.
    pub async fn retention_policies(&self) -> Result<Vec<(Uuid, Retention)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT business_id, retention FROM icmp_retention_policies()",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let business: Uuid = r.get(0);
                let policy: serde_json::Value = r.get(1);
                match serde_json::from_value(policy) {
                    Ok(retention) => Some((business, retention)),
                    Err(e) => {
                        tracing::warn!(business.id = %business, error = %e,
                            "a business's retention policy cannot be read; not swept");
                        None
                    }
                }
            })
            .collect())
    }

    /// When the oldest conversation of `business` started (`None`: it has none): no message
    /// or LLM call of it is older. (The conversations are a tenth of the rows of the messages
    /// and LLM calls, which have no index that finds their oldest row.)
    ///
    /// # Errors
    /// Database errors.
    pub async fn oldest_conversation(
        &self,
        business: Uuid,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(&scope_sql(business, None)).await?;
        let oldest = tx
            .query_one(
                "SELECT min(created_at) FROM conversations WHERE business_id = $1",
                &[&business],
            )
            .await?
            .get(0);
        tx.commit().await?;
        Ok(oldest)
    }

    /// Blanks the prompts and outputs of up to `limit` LLM calls of `business` made in `span`;
    /// returns how many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn blank_prompts(
        &self,
        business: Uuid,
        span: Span,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(&scope_sql(business, None)).await?;
        let n = tx
            .execute(
                "UPDATE llm_calls SET prompt = '', output = NULL \
                  WHERE business_id = $1 AND id IN ( \
                        SELECT id FROM llm_calls \
                         WHERE business_id = $1 AND created_at >= $2 AND created_at < $3 \
                           AND (prompt <> '' OR output IS NOT NULL) \
                         LIMIT $4 FOR UPDATE SKIP LOCKED)",
                &[&business, &span.from, &span.to, &limit],
            )
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Deletes up to `limit` messages of `business` stored in `span`, with what points at
    /// them (LLM calls, stage transitions, action requests; extracted values keep their value
    /// and lose their source), blanks the summaries of their conversations, and deletes the
    /// conversations left without messages and untouched since `before`, and their users when
    /// they have no other conversation and were not seen since.
    ///
    /// # Errors
    /// Database errors.
    pub async fn expire_messages(
        &self,
        business: Uuid,
        span: Span,
        before: chrono::DateTime<chrono::Utc>,
        limit: i64,
    ) -> Result<Expired, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(&scope_sql(business, None)).await?;
        let batch = tx
            .query(
                "SELECT id, conversation_id FROM messages \
                  WHERE business_id = $1 AND created_at >= $2 AND created_at < $3 \
                  LIMIT $4 FOR UPDATE SKIP LOCKED",
                &[&business, &span.from, &span.to, &limit],
            )
            .await?;
        if batch.is_empty() {
            return Ok(Expired::default());
        }
        let ids: Vec<Uuid> = batch.iter().map(|r| r.get(0)).collect();
        let mut conversations: Vec<Uuid> = batch.iter().map(|r| r.get(1)).collect();
        conversations.sort_unstable();
        conversations.dedup();
        // The conversations first, in the order a worker's write set takes its locks (the
        // conversation, then its rows), so that the two never wait for each other in a circle.
        tx.execute(
            "SELECT 1 FROM conversations WHERE business_id = $1 AND id = ANY($2) \
              ORDER BY id FOR UPDATE",
            &[&business, &conversations],
        )
        .await?;
        let messages = delete_messages(&tx, business, &conversations, &ids).await?;
        // The conversations' calls of no message (summaries), which quote them, as old.
        tx.execute(
            "DELETE FROM llm_calls WHERE business_id = $1 AND conversation_id = ANY($2) \
               AND message_id IS NULL AND created_at < $3",
            &[&business, &conversations, &span.to],
        )
        .await?;
        let touched_users = users_of(&tx, business, &conversations).await?;
        let (conversations, users) = drop_emptied(&tx, business, &conversations, before).await?;
        tx.commit().await?;
        Ok(Expired {
            messages,
            conversations,
            users,
            touched_users,
        })
    }
}

/// Deletes messages `ids` (of `conversations`) with what points at them; returns how many
/// messages. Each statement finds its rows through its table's index by conversation (or, for
/// LLM calls, by message).
async fn delete_messages(
    tx: &deadpool_postgres::Transaction<'_>,
    business: Uuid,
    conversations: &[Uuid],
    ids: &[Uuid],
) -> Result<u64, StoreError> {
    tx.execute(
        "DELETE FROM llm_calls WHERE business_id = $1 AND message_id = ANY($2)",
        &[&business, &ids],
    )
    .await?;
    for sql in [
        "DELETE FROM stage_transitions \
          WHERE business_id = $1 AND conversation_id = ANY($2) AND message_id = ANY($3)",
        "DELETE FROM action_outbox \
          WHERE business_id = $1 AND conversation_id = ANY($2) AND message_id = ANY($3)",
        "UPDATE extracted_data SET source_message_id = NULL \
          WHERE business_id = $1 AND conversation_id = ANY($2) AND source_message_id = ANY($3)",
    ] {
        tx.execute(sql, &[&business, &conversations, &ids]).await?;
    }
    Ok(tx
        .execute(
            "DELETE FROM messages WHERE business_id = $1 AND id = ANY($2)",
            &[&business, &ids],
        )
        .await?)
}

/// The users of `conversations`.
async fn users_of(
    tx: &deadpool_postgres::Transaction<'_>,
    business: Uuid,
    conversations: &[Uuid],
) -> Result<Vec<String>, StoreError> {
    Ok(tx
        .query(
            "SELECT DISTINCT u.external_id FROM conversations c JOIN users u \
               ON u.business_id = c.business_id AND u.id = c.user_id \
              WHERE c.business_id = $1 AND u.business_id = $1 AND c.id = ANY($2)",
            &[&business, &conversations],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Blanks the summaries of `conversations` (a summary covers earlier messages: it goes with
/// them), deletes those left without messages and untouched since `before`, then their users
/// left without conversations and not seen since; returns (conversations, users) deleted.
async fn drop_emptied(
    tx: &deadpool_postgres::Transaction<'_>,
    business: Uuid,
    conversations: &[Uuid],
    before: chrono::DateTime<chrono::Utc>,
) -> Result<(u64, u64), StoreError> {
    tx.execute(
        "UPDATE conversations SET summary = '' \
          WHERE business_id = $1 AND id = ANY($2) AND summary <> ''",
        &[&business, &conversations],
    )
    .await?;
    let emptied: Vec<Uuid> = tx
        .query(
            "DELETE FROM conversations c \
              WHERE c.business_id = $1 AND c.id = ANY($2) AND c.updated_at < $3 \
                AND NOT EXISTS (SELECT 1 FROM messages m \
                                 WHERE m.business_id = $1 AND m.conversation_id = c.id) \
             RETURNING c.user_id",
            &[&business, &conversations, &before],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let users = tx
        .execute(
            "DELETE FROM users u \
              WHERE u.business_id = $1 AND u.id = ANY($2) AND u.last_seen_at < $3 \
                AND NOT EXISTS (SELECT 1 FROM conversations c \
                                 WHERE c.business_id = $1 AND c.user_id = u.id)",
            &[&business, &emptied, &before],
        )
        .await?;
    Ok((emptied.len() as u64, users))
}
