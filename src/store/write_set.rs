//! The write phase (DESIGN §2): everything one message changes, in ONE statement.
//!
//! User upsert, conversation insert or version check-and-bump, both messages with the
//! idempotency key, the stage transition, extracted data, the LLM call rows: one `INSERT …`
//! with data-modifying CTEs, so the whole write set is one round trip and one (implicit)
//! transaction. Every write hangs off the conversation CTE: when the version check finds another
//! version, the statement writes nothing and returns no row. Either all of it is stored or none
//! of it.

use crate::store::Prepared;
use tokio_postgres::types::{Json, ToSql};
use uuid::Uuid;

use super::{Store, StoreError, is_unique_violation};
use crate::model::Extracted;

/// One LLM call, as logged in `llm_calls` (serialised as a row of the write set's
/// `jsonb_to_recordset`: the field names are its columns).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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

/// A later message of a coalesced turn: stored as a user row answered by the turn's reply
/// (serialised as a row of the write set's `jsonb_to_recordset`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FollowerRow {
    /// Its place after the turn's first message (1, 2, …).
    pub ord: i64,
    /// The user row's id (the `reply_id` of its `coalesced` reply).
    pub id: Uuid,
    /// The message's own text.
    pub content: String,
    /// Its idempotency key (a later delivery of it finds the reference by this key).
    pub idempotency_key: String,
    /// Its inbound stream entry id.
    pub inbound_id: String,
    /// Its `metadata`, when it had any.
    pub metadata: Option<serde_json::Value>,
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
    /// The template (id, version) the reply came from (response or fallback).
    pub reply_template: Option<(Uuid, i32)>,
    /// Step durations in milliseconds, stored with the reply.
    pub timings: serde_json::Value,
    pub llm_calls: Vec<LlmCallRecord>,
    /// The later messages of a coalesced turn (empty otherwise), stored between the first
    /// message and the reply.
    pub followers: Vec<FollowerRow>,
}

/// The conversation of a continuing conversation: the version the read phase saw is bumped;
/// the user must own it. `$1` business, `$2` conversation, `$3` new stage, `$4` user external id,
/// `$5` expected version.
const CONTINUE_CONVERSATION: &str = "\
c AS (
  UPDATE conversations AS c SET version = c.version + 1, current_stage_id = $3, updated_at = now()
    FROM users AS u
   WHERE c.business_id = $1 AND c.id = $2 AND c.version = $5
     AND u.business_id = $1 AND u.external_id = $4 AND c.user_id = u.id
  RETURNING c.id, c.user_id, c.version, c.created_at, c.updated_at
),
seen AS (
  UPDATE users SET last_seen_at = now() FROM c WHERE users.business_id = $1 AND users.id = c.user_id
),";

/// The conversation of a new conversation, and its user (created on first contact). A
/// conversation id that exists already is a unique violation of `conversations_pkey`.
/// `$5` is unused (NULL) so that both forms take the same parameters.
const NEW_CONVERSATION: &str = "\
u AS (
  INSERT INTO users (business_id, external_id) VALUES ($1, $4)
  ON CONFLICT (business_id, external_id) DO UPDATE SET last_seen_at = now()
  RETURNING id
),
c AS (
  INSERT INTO conversations (id, business_id, user_id, current_stage_id)
  SELECT $2, $1, u.id, $3 FROM u WHERE $5::bigint IS NULL
  RETURNING id, user_id, version, created_at, updated_at
),";

/// Everything else, each row joined to `c`. `$6` idempotency key, `$7` inbound id, `$8` log id,
/// `$9` user message id, `$10` user content, `$11` user stage, `$12` metadata, `$13` assistant
/// message id, `$14` assistant content, `$15` status, `$16`/`$17` fallback template and version,
/// `$18`/`$19` transition from/to, `$20` extracted fields (object), `$21` LLM calls (array),
/// `$22`/`$23` the reply's template and version, `$24` the step timings (object), `$25` the
/// later messages of a coalesced turn (array). The rows are inserted in conversation order (the
/// first message, the later ones, the reply), which is the order of their `seq`.
const WRITES: &str = "\
m AS (
  INSERT INTO messages (id, business_id, conversation_id, role, content, idempotency_key,
                        stage_id, status, metadata, inbound_id, log_id, user_id,
                        fallback_template_id, fallback_template_version, template_id,
                        template_version, timings, answered_by)
  SELECT v.id, $1, c.id, v.role, v.content, v.key, v.stage, v.status, v.metadata, v.inbound,
         $8, c.user_id, v.fb_id, v.fb_version, v.t_id, v.t_version, v.timings, v.answered_by
    FROM c, (VALUES (0::bigint, $9::uuid, 'user'::text, $10::text, $6::text, $7::text,
                     $11::uuid, NULL::text, $12::jsonb, NULL::uuid, NULL::integer, NULL::uuid,
                     NULL::integer, NULL::jsonb, NULL::uuid),
                    (9223372036854775807, $13::uuid, 'assistant', $14::text, $6::text,
                     $7::text, $3::uuid, $15::text, NULL::jsonb, $16::uuid, $17::integer,
                     $22::uuid, $23::integer, $24::jsonb, NULL::uuid)
             UNION ALL
             SELECT f.ord, f.id, 'user', f.content, f.idempotency_key, f.inbound_id, $11::uuid,
                    NULL::text, f.metadata, NULL::uuid, NULL::integer, NULL::uuid,
                    NULL::integer, NULL::jsonb, $13::uuid
               FROM jsonb_to_recordset($25::jsonb) AS f(ord bigint, id uuid, content text,
                    idempotency_key text, inbound_id text, metadata jsonb))
         AS v(ord, id, role, content, key, inbound, stage, status, metadata, fb_id, fb_version,
              t_id, t_version, timings, answered_by)
   ORDER BY v.ord
),
t AS (
  INSERT INTO stage_transitions (business_id, conversation_id, from_stage_id, to_stage_id,
                                 message_id, log_id)
  SELECT $1, c.id, $18, $19, $9, $8 FROM c WHERE $18::uuid IS NOT NULL
),
x AS (
  INSERT INTO extracted_data (business_id, conversation_id, field, value, source_message_id)
  SELECT $1, c.id, f.key, f.value, $9 FROM c, jsonb_each($20::jsonb) AS f
  ON CONFLICT (conversation_id, field) DO UPDATE SET value = EXCLUDED.value,
     source_message_id = EXCLUDED.source_message_id, updated_at = now()
),
l AS (
  INSERT INTO llm_calls (id, business_id, conversation_id, message_id, purpose, template_id,
                         template_version, model, prompt, output, prompt_tokens,
                         completion_tokens, latency_ms, outcome, log_id)
  SELECT k.id, $1, c.id, $9, k.purpose, k.template_id, k.template_version, k.model, k.prompt,
         k.output, k.prompt_tokens, k.completion_tokens, k.latency_ms, k.outcome, $8
    FROM c, jsonb_to_recordset($21::jsonb) AS k(id uuid, purpose text, template_id uuid,
         template_version integer, model text, prompt text, output text, prompt_tokens integer,
         completion_tokens integer, latency_ms integer, outcome text)
)
SELECT version, created_at, updated_at FROM c";

/// The write-set statement for a new or a continuing conversation.
pub(crate) fn statement(new_conversation: bool) -> String {
    let conversation = if new_conversation {
        NEW_CONVERSATION
    } else {
        CONTINUE_CONVERSATION
    };
    format!("WITH {conversation}\n{WRITES}")
}

impl Store {
    /// Commits a write set (one statement in a scoped transaction, one round trip) and returns the conversation as
    /// committed.
    ///
    /// `before_commit` is a fault-injection point: when it fails, the statement runs inside an
    /// explicit transaction that is then rolled back, and its error is returned.
    ///
    /// # Errors
    /// [`StoreError::VersionConflict`] when the conversation changed since the read phase (or a
    /// new conversation's id exists), [`StoreError::Duplicate`] when the idempotency key is
    /// already committed, database errors.
    pub async fn commit_write_set(
        &self,
        ws: &WriteSet,
        before_commit: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<CommittedConversation, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(&statement(ws.expected_version.is_none()))
            .await?;
        let extracted = Json(&ws.extracted);
        let calls = Json(&ws.llm_calls);
        let (transition_from, transition_to) = ws.transition.unzip();
        let (fallback_id, fallback_version) = ws.fallback_template.unzip();
        let (template_id, template_version) = ws.reply_template.unzip();
        let followers = Json(&ws.followers);
        let params: [&(dyn ToSql + Sync); 25] = [
            &ws.business_id,
            &ws.conversation_id,
            &ws.stage_id,
            &ws.user_external_id,
            &ws.expected_version,
            &ws.idempotency_key,
            &ws.inbound_id,
            &ws.log_id,
            &ws.user_message_id,
            &ws.user_content,
            &ws.user_stage_id,
            &ws.metadata,
            &ws.assistant_message_id,
            &ws.assistant_content,
            &ws.assistant_status,
            &fallback_id,
            &fallback_version,
            &transition_from,
            &transition_to,
            &extracted,
            &calls,
            &template_id,
            &template_version,
            &ws.timings,
            &followers,
        ];
        // The fault-injection point decides the end: its error rolls the statement back.
        let (end, injected) = match before_commit() {
            Ok(()) => ("COMMIT", None),
            Err(e) => ("ROLLBACK", Some(e)),
        };
        let rows = self
            .scoped_with_end(&client, ws.business_id, &stmt, &params, end)
            .await
            .map_err(classify)?;
        if let Some(e) = injected {
            return Err(e);
        }
        let row = rows.into_iter().next().ok_or(StoreError::VersionConflict)?;
        Ok(CommittedConversation {
            version: row.get(0),
            created_at: row.get(1),
            updated_at: row.get(2),
        })
    }
}

/// A unique violation is a new conversation whose id exists (a version conflict) or a message
/// whose idempotency key is committed (a duplicate); any other stays a database error.
fn classify(e: StoreError) -> StoreError {
    let StoreError::Db(e) = e else {
        return e;
    };
    if !is_unique_violation(&e) {
        return StoreError::Db(e);
    }
    match e.as_db_error().and_then(|d| d.constraint()) {
        Some("conversations_pkey") => StoreError::VersionConflict,
        Some("messages_idempotency_key") => StoreError::Duplicate,
        _ => StoreError::Db(e),
    }
}
