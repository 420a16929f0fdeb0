//! Reads of conversations, their history and extracted data, and of committed replies.

use crate::store::Prepared;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::model::{
    Answer, AnswerStatus, Conversation, ConversationRecord, ConversationSummary, Extracted, Role,
    StoredMessage, Turn,
};

macro_rules! conversation_columns {
    () => {
        "SELECT c.id, c.business_id, u.external_id, c.current_stage_id, c.version, c.created_at, \
         c.updated_at, c.summary, c.summarized_seq, c.actions, c.handoff "
    };
}

// The read phase's statements (the hot path): each filters `business_id` on every table it
// reads, so that on Citus it is a router query to one shard (tested with EXPLAIN).

/// A conversation of this business: `$1` business, `$2` conversation.
pub const LOAD_CONVERSATION: &str = concat!(
    conversation_columns!(),
    "FROM conversations c \
     JOIN users u ON u.business_id = c.business_id AND u.id = c.user_id \
     WHERE c.business_id = $1 AND c.id = $2"
);

/// The user's latest conversation: `$1` business, `$2` user's external id.
pub const LATEST_CONVERSATION: &str = concat!(
    conversation_columns!(),
    "FROM users u \
     JOIN conversations c ON c.business_id = u.business_id AND c.user_id = u.id \
     WHERE u.business_id = $1 AND u.external_id = $2 \
     ORDER BY c.updated_at DESC, c.id DESC LIMIT 1"
);

/// The last `$3` messages of conversation `$2` after message `$4` (the last one its summary
/// covers), oldest first.
pub const HISTORY: &str = "SELECT role, content FROM (SELECT role, content, seq FROM messages \
     WHERE business_id = $1 AND conversation_id = $2 AND seq > $4 \
     AND status IS DISTINCT FROM 'handoff' ORDER BY seq DESC LIMIT $3) t \
     ORDER BY seq ASC";

/// The extracted data of conversation `$2`.
pub const EXTRACTED: &str = "SELECT field, value FROM extracted_data \
     WHERE business_id = $1 AND conversation_id = $2";

/// The idempotency lookup: the reply stored under key `$3` of user `$2`, else (a later message
/// of a coalesced turn) a reference to the reply that answered the key's user row, with that
/// reply's text.
pub const FIND_REPLY: &str = "SELECT m.id, m.conversation_id, m.content, coalesce(m.status, 'ok'), s.name, \
     m.log_id, NULL::uuid, m.model, m.endpoint \
     FROM messages m \
     JOIN users u ON u.business_id = m.business_id AND u.id = m.user_id \
     LEFT JOIN stages s ON s.business_id = m.business_id AND s.id = m.stage_id \
     WHERE m.business_id = $1 AND u.external_id = $2 AND m.idempotency_key = $3 \
     AND m.role = 'assistant' \
     UNION ALL \
     SELECT q.id, q.conversation_id, a.content, 'coalesced', s.name, q.log_id, a.id, a.model, \
     a.endpoint \
     FROM messages q \
     JOIN users u ON u.business_id = q.business_id AND u.id = q.user_id \
     JOIN messages a ON a.business_id = q.business_id AND a.id = q.answered_by \
     LEFT JOIN stages s ON s.business_id = a.business_id AND s.id = a.stage_id \
     WHERE q.business_id = $1 AND u.external_id = $2 AND q.idempotency_key = $3 \
     AND q.role = 'user' AND q.answered_by IS NOT NULL \
     LIMIT 1";

fn conversation_from_row(r: &Row) -> Conversation {
    Conversation {
        id: r.get(0),
        business_id: r.get(1),
        user_external_id: r.get(2),
        stage_id: r.get(3),
        version: r.get(4),
        created_at: r.get(5),
        updated_at: r.get(6),
        summary: r.get(7),
        summarized_seq: r.get(8),
        actions: match r
            .get::<_, tokio_postgres::types::Json<serde_json::Value>>(9)
            .0
        {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        },
        handoff: r
            .get::<_, Option<tokio_postgres::types::Json<serde_json::Value>>>(10)
            .and_then(|j| serde_json::from_value(j.0).ok()),
    }
}

impl Store {
    /// A conversation of this business.
    pub async fn load_conversation(
        &self,
        business_id: Uuid,
        id: Uuid,
    ) -> Result<Option<Conversation>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepared(LOAD_CONVERSATION).await?;
        Ok(self
            .scoped(&client, business_id, &stmt, &[&business_id, &id])
            .await?
            .into_iter()
            .next()
            .as_ref()
            .map(conversation_from_row))
    }

    /// The user's most recently active conversation with this business.
    pub async fn latest_conversation(
        &self,
        business_id: Uuid,
        user_external_id: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepared(LATEST_CONVERSATION).await?;
        Ok(self
            .scoped(
                &client,
                business_id,
                &stmt,
                &[&business_id, &user_external_id],
            )
            .await?
            .into_iter()
            .next()
            .as_ref()
            .map(conversation_from_row))
    }

    /// The last `limit` messages of a conversation after message `after_seq`, oldest first.
    pub async fn history(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
        limit: usize,
        after_seq: i64,
    ) -> Result<Vec<Turn>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepared(HISTORY).await?;
        let rows = self
            .scoped(
                &client,
                business_id,
                &stmt,
                &[&business_id, &conversation_id, &(limit as i64), &after_seq],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Turn {
                role: Role::parse(r.get(0)),
                content: r.get(1),
            })
            .collect())
    }

    /// The extracted data of a conversation.
    pub async fn extracted(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
    ) -> Result<Extracted, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepared(EXTRACTED).await?;
        let rows = self
            .scoped(
                &client,
                business_id,
                &stmt,
                &[&business_id, &conversation_id],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The answer committed for a message of this user, if that message was already processed.
    /// The key is scoped to the user: another user's `message_id` never matches.
    pub async fn find_reply(
        &self,
        business_id: Uuid,
        user_external_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<Answer>, StoreError> {
        let client = self.client().await?;
        // The reply it refers to may never have been published where this one goes (its
        // entry trimmed or orphaned before its finish took effect), and its sender must see it.
        let stmt = client.prepared(FIND_REPLY).await?;
        Ok(self
            .scoped(
                &client,
                business_id,
                &stmt,
                &[&business_id, &user_external_id, &idempotency_key],
            )
            .await?
            .into_iter()
            .next()
            .map(|r| {
                let answered_by: Option<Uuid> = r.get(6);
                Answer {
                    reply_id: r.get(0),
                    conversation_id: r.get(1),
                    content: r.get(2),
                    status: if answered_by.is_some() {
                        AnswerStatus::Coalesced
                    } else {
                        AnswerStatus::from_stored(r.get(3))
                    },
                    stage: r.get::<_, Option<String>>(4).unwrap_or_default(),
                    log_id: r.get(5),
                    answered_by,
                    model: r.get::<_, Option<String>>(7).unwrap_or_default(),
                    endpoint: r.get::<_, Option<String>>(8).unwrap_or_default(),
                }
            }))
    }

    /// Milliseconds spent in LLM calls per user message, by idempotency key (the benchmark's
    /// overhead figure).
    pub async fn llm_time_by_key(
        &self,
        business_id: Uuid,
        keys: &[&str],
    ) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(
                "SELECT m.idempotency_key, sum(c.latency_ms)::bigint FROM messages m \
                 JOIN llm_calls c ON c.business_id = m.business_id AND c.message_id = m.id \
                 WHERE m.business_id = $1 AND m.role = 'user' AND m.idempotency_key = ANY($2) \
                 GROUP BY 1",
            )
            .await?;
        let rows = self
            .scoped(&client, business_id, &stmt, &[&business_id, &keys])
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The business's `limit` most recently active conversations, newest first, for operators.
    pub async fn recent_conversations(
        &self,
        business_id: Uuid,
        limit: i64,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(
                "SELECT c.id, u.external_id, s.name, \
                 (SELECT count(*) FROM messages m \
                  WHERE m.business_id = c.business_id AND m.conversation_id = c.id), \
                 c.updated_at FROM conversations c \
                 JOIN users u ON u.business_id = c.business_id AND u.id = c.user_id \
                 JOIN stages s ON s.business_id = c.business_id AND s.id = c.current_stage_id \
                 WHERE c.business_id = $1 ORDER BY c.updated_at DESC, c.id DESC LIMIT $2",
            )
            .await?;
        Ok(self
            .scoped(&client, business_id, &stmt, &[&business_id, &limit])
            .await?
            .iter()
            .map(|r| ConversationSummary {
                id: r.get(0),
                user_id: r.get(1),
                stage: r.get(2),
                messages: r.get(3),
                updated_at: r.get(4),
            })
            .collect())
    }

    /// A conversation with every message, for operators; by id, or the latest of a user.
    pub async fn conversation_record(
        &self,
        which: ConversationRef<'_>,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        let client = self.client().await?;
        let head = match which {
            ConversationRef::Id(id) => {
                // The business is not known yet: read it first (operators run as the owner).
                let find = client
                    .prepared("SELECT business_id FROM conversations WHERE id = $1")
                    .await?;
                let Some(row) = client.query_opt(&find, &[&id]).await? else {
                    return Ok(None);
                };
                let business_id: Uuid = row.get(0);
                self.load_conversation(business_id, id).await?
            }
            ConversationRef::Latest { business_id, user } => {
                self.latest_conversation(business_id, user).await?
            }
        };
        let Some(conv) = head else {
            return Ok(None);
        };
        let b = conv.business_id;
        let stmt = client
            .prepared(
                "SELECT m.id, m.role, m.content, s.name, m.status, t.name, m.template_version, \
                 m.idempotency_key, m.log_id, m.created_at FROM messages m \
                 LEFT JOIN stages s ON s.business_id = m.business_id AND s.id = m.stage_id \
                 LEFT JOIN templates t ON t.business_id = m.business_id AND t.id = m.template_id \
                 WHERE m.business_id = $1 AND m.conversation_id = $2 ORDER BY m.seq",
            )
            .await?;
        let messages = self
            .scoped(&client, b, &stmt, &[&b, &conv.id])
            .await?
            .iter()
            .map(|r| StoredMessage {
                id: r.get(0),
                role: r.get(1),
                content: r.get(2),
                stage: r.get(3),
                status: r.get(4),
                template: r.get(5),
                template_version: r.get(6),
                message_id: r.get(7),
                log_id: r.get(8),
                created_at: r.get(9),
            })
            .collect();
        let stage_stmt = client
            .prepared("SELECT name FROM stages WHERE business_id = $1 AND id = $2")
            .await?;
        let stage = self
            .scoped(&client, b, &stage_stmt, &[&b, &conv.stage_id])
            .await?
            .first()
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default();
        let extracted = self.extracted(b, conv.id).await?;
        Ok(Some(ConversationRecord {
            id: conv.id,
            business_id: b,
            user_id: conv.user_external_id,
            stage,
            version: conv.version,
            created_at: conv.created_at,
            updated_at: conv.updated_at,
            messages,
            extracted,
            handoff: conv.handoff,
        }))
    }
}

/// Which conversation an operator asks for.
#[derive(Debug, Clone, Copy)]
pub enum ConversationRef<'a> {
    Id(Uuid),
    Latest { business_id: Uuid, user: &'a str },
}

/// What the database holds about one message (see `trace`).
#[derive(Debug, Default)]
pub struct TraceRows {
    pub messages: Vec<std::collections::BTreeMap<String, serde_json::Value>>,
    pub llm_calls: Vec<std::collections::BTreeMap<String, serde_json::Value>>,
    pub transitions: Vec<(String, String)>,
    pub extracted: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Store {
    /// The rows of the message with this `message_id`, `log_id` or inbound entry id, for
    /// operators (who run as the owner). When a key matches several users' messages, the
    /// latest one is traced.
    pub async fn trace_rows(&self, key: &str) -> Result<TraceRows, StoreError> {
        let client = self.client().await?;
        let find = client
            .prepared(
                "SELECT to_jsonb(x) FROM (SELECT m.id, m.role, m.content, s.name AS stage, \
                 m.status, t.name AS template, m.template_version, m.timings, m.log_id, \
                 m.inbound_id, m.idempotency_key AS message_id, m.business_id, \
                 m.conversation_id, m.created_at FROM messages m \
                 LEFT JOIN stages s ON s.business_id = m.business_id AND s.id = m.stage_id \
                 LEFT JOIN templates t ON t.business_id = m.business_id AND t.id = m.template_id \
                 WHERE m.log_id::text = $1 OR m.inbound_id = $1 OR (m.idempotency_key = $1 \
                   AND m.log_id = (SELECT log_id FROM messages WHERE idempotency_key = $1 \
                                   ORDER BY seq DESC LIMIT 1)) \
                 ORDER BY m.seq) x",
            )
            .await?;
        self.count_round_trip();
        let as_map = |v: serde_json::Value| match v {
            serde_json::Value::Object(m) => m.into_iter().collect(),
            _ => std::collections::BTreeMap::new(),
        };
        let messages: Vec<std::collections::BTreeMap<String, serde_json::Value>> = client
            .query(&find, &[&key])
            .await?
            .into_iter()
            .map(|r| as_map(r.get(0)))
            .collect();
        let mut rows = TraceRows {
            messages,
            ..TraceRows::default()
        };
        let user_message = rows
            .messages
            .iter()
            .find(|m| m.get("role").and_then(|r| r.as_str()) == Some("user"))
            .and_then(|m| m.get("id")?.as_str()?.parse::<Uuid>().ok());
        let Some(message) = user_message else {
            return Ok(rows);
        };
        let calls = client
            .prepared(
                "SELECT to_jsonb(x) FROM (SELECT c.purpose, t.name AS template, \
                 c.template_version, c.model, c.endpoint, c.response_format, c.latency_ms, \
                 c.prompt_tokens, c.completion_tokens, c.outcome, c.created_at FROM llm_calls c \
                 LEFT JOIN templates t ON t.business_id = c.business_id AND t.id = c.template_id \
                 WHERE c.message_id = $1 ORDER BY c.id) x",
            )
            .await?;
        rows.llm_calls = client
            .query(&calls, &[&message])
            .await?
            .into_iter()
            .map(|r| as_map(r.get(0)))
            .collect();
        let transitions = client
            .prepared(
                "SELECT f.name, t.name FROM stage_transitions st \
                 JOIN stages f ON f.business_id = st.business_id AND f.id = st.from_stage_id \
                 JOIN stages t ON t.business_id = st.business_id AND t.id = st.to_stage_id \
                 WHERE st.message_id = $1",
            )
            .await?;
        rows.transitions = client
            .query(&transitions, &[&message])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let extracted = client
            .prepared("SELECT field, value FROM extracted_data WHERE source_message_id = $1")
            .await?;
        rows.extracted = client
            .query(&extracted, &[&message])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(rows)
    }
}
