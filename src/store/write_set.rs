//! The write phase (DESIGN §2): everything one message changes, in one transaction and one
//! round trip.
//!
//! User upsert, conversation insert or version check-and-bump, the messages with the
//! idempotency key, the stage transition, extracted data, the LLM call rows: a few statements,
//! pipelined between `BEGIN` and `COMMIT`, each a single-shard statement on Citus
//! (docs/design-notes.md, "Citus"). The conversation statement comes first: when it finds
//! another version (or another user's conversation) it fails, and the transaction with it.
//! Either all of it is stored or none of it.

use crate::store::Prepared;
use tokio_postgres::Statement;
use tokio_postgres::types::{Json, ToSql};
use uuid::Uuid;

use super::{Store, StoreError, is_unique_violation};
use crate::model::Extracted;

/// One LLM call, as logged in `llm_calls` (serialised as a row of the write set's
/// `json_to_recordset`: the field names are its columns).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlmCallRecord {
    pub id: Uuid,
    /// `selection`, `extraction` or `response`.
    pub purpose: &'static str,
    pub template_id: Uuid,
    pub template_version: i32,
    pub model: String,
    /// The endpoint called (`llm.endpoints[].name`).
    pub endpoint: String,
    /// How JSON was asked for (`json_schema`, …); `None` for text and failed calls.
    pub response_format: Option<&'static str>,
    pub prompt: String,
    pub output: Option<String>,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    pub latency_ms: u32,
    /// `ok` or an error code.
    pub outcome: &'static str,
}

/// A later message of a coalesced turn: stored as a user row answered by the turn's reply
/// (serialised as a row of the write set's `json_to_recordset`).
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
    /// The model and endpoint that answered (`None`: no LLM did).
    pub reply_model: Option<(String, String)>,
    /// Step durations in milliseconds, stored with the reply.
    pub timings: serde_json::Value,
    pub llm_calls: Vec<LlmCallRecord>,
    /// The requests of the stage actions this message fired.
    pub actions: Vec<crate::actions::OutboxRow>,
    /// What this message changes of the conversation's handoff (merged into it): a handoff
    /// started (its whole state), or, under way, its `reply_to` noted; `None`: nothing.
    pub handoff: Option<serde_json::Value>,
    /// The later messages of a coalesced turn (empty otherwise), stored between the first
    /// message and the reply.
    pub followers: Vec<FollowerRow>,
}

// The write set's statements, in the order they run. Each is written with the write set's own
// parameter numbers: `$1` business, `$2` conversation, `$3` the stage after this message, `$4`
// the user's external id, `$5` the version the read phase saw (NULL for a new conversation),
// `$6` the message rows (JSON array, see `MessageRow`), `$7` how many, `$8`/`$9` the stage
// transition (from, to), `$10` the user message's id, `$11` the log id, `$12` the extracted
// fields (JSON object), `$13` the LLM calls (JSON array of `LlmCallRecord`), `$14` the actions'
// requests, `$15` the handoff (JSON object), `$16` the user's key (`user_key`), `$17`/`$18` the
// two parts of the message's inbound entry id (its arrival). Each is sent
// renumbered to the parameters it uses ([`Step`]).
//
// Every one is a single-shard statement on Citus (all of it filters or writes one
// `business_id`, and every `INSERT … SELECT` reads the co-located conversation row, so Citus
// pushes it down whole): one task on the node that holds the business (docs/operations.md).
// None takes a value from a sequence, which Citus would draw on the coordinator by pulling the
// rows there (and row-level security forbids that path).

/// A new conversation's user, created on first contact.
const USER_NEW: &str = "\
INSERT INTO users (business_id, external_id) VALUES ($1, $4)
ON CONFLICT (business_id, external_id) DO UPDATE SET last_seen_at = EXCLUDED.last_seen_at";

/// A new conversation, of that user. An id that exists already is a unique violation of
/// `conversations_pkey`: a version conflict. A user erased at or after the arrival of this
/// message (`$16` the user's key, `$17`/`$18` the message's inbound entry id; migration V16)
/// gets no conversation: its `user_id` becomes NULL, which the column refuses ([`StoreError::Erased`]).
/// The check runs here, after the user statement: that one waits for an erase holding the
/// user's row, so this one's snapshot sees the erase once it committed. (The alias keeps Citus
/// from naming the table in the `RETURNING` of the statement it sends to the shard, where it
/// has another name.)
const CONVERSATION_NEW: &str = "\
INSERT INTO conversations AS n (id, business_id, user_id, current_stage_id, last_seq)
SELECT $2, u.business_id,
       CASE WHEN EXISTS (SELECT 1 FROM user_erasures AS e
                          WHERE e.business_id = $1 AND e.user_key = $16
                            AND (e.erased_ms, e.erased_seq) >= ($17, $18))
            THEN NULL ELSE u.id END,
       $3, $7
  FROM users AS u WHERE u.business_id = $1 AND u.external_id = $4
RETURNING n.version, n.created_at, n.updated_at";

/// A continuing conversation's user.
const USER_SEEN: &str =
    "UPDATE users SET last_seen_at = now() WHERE business_id = $1 AND external_id = $4";

/// A continuing conversation: its version bumped when it is the version the read phase saw and
/// the conversation is the user's; otherwise the version becomes 0, which the check
/// `conversations_version_check` refuses, and the whole transaction fails (a version conflict),
/// so that nothing after it is written. Its `last_seq` makes room for this message's rows.
const CONVERSATION_CONTINUE: &str = "\
UPDATE conversations AS c
   SET version = CASE WHEN c.version = $5 AND c.user_id = (SELECT u.id FROM users AS u
                      WHERE u.business_id = $1 AND u.external_id = $4)
                 THEN c.version + 1 ELSE 0 END,
       current_stage_id = $3, last_seq = c.last_seq + $7, updated_at = now()
 WHERE c.business_id = $1 AND c.id = $2
RETURNING c.version, c.created_at, c.updated_at";

/// The message rows (the first message, the later ones of a coalesced turn, the reply), their
/// `seq` the places the conversation statement made for them, in conversation order.
const MESSAGES: &str = "\
INSERT INTO messages (id, business_id, conversation_id, seq, role, content, idempotency_key,
                      stage_id, status, metadata, inbound_id, log_id, user_id,
                      fallback_template_id, fallback_template_version, template_id,
                      template_version, timings, answered_by, model, endpoint)
SELECT r.id, c.business_id, c.id, c.last_seq - $7 + r.pos, r.role, r.content, r.key, r.stage,
       r.status, r.metadata, r.inbound, $11, c.user_id, r.fb_id, r.fb_version, r.t_id,
       r.t_version, r.timings, r.answered_by, r.model, r.endpoint
  FROM conversations AS c,
       json_to_recordset($6::json) AS r(pos bigint, id uuid, role text, content text, key text,
         inbound text, stage uuid, status text, metadata jsonb, fb_id uuid, fb_version integer,
         t_id uuid, t_version integer, timings jsonb, answered_by uuid, model text,
         endpoint text)
 WHERE c.business_id = $1 AND c.id = $2";

/// The stage transition, when selection moved the stage. (`VALUES`, not a read of the
/// conversation row as the other inserts: its `id` comes from a sequence, which Citus draws on
/// the coordinator after pulling an `INSERT … SELECT` there. A conversation that is gone, erased
/// or swept by retention, breaks its foreign key instead: a version conflict, see [`classify`].)
const TRANSITION: &str = "\
INSERT INTO stage_transitions (business_id, conversation_id, from_stage_id, to_stage_id,
                               message_id, log_id)
VALUES ($1, $2, $8, $9, $10, $11)";

/// The fields extracted from this message, when there are any.
const EXTRACTED: &str = "\
INSERT INTO extracted_data (business_id, conversation_id, field, value, source_message_id)
SELECT c.business_id, c.id, f.key, f.value, $10
  FROM conversations AS c, jsonb_each($12::jsonb) AS f
 WHERE c.business_id = $1 AND c.id = $2
ON CONFLICT (business_id, conversation_id, field) DO UPDATE SET value = EXCLUDED.value,
   source_message_id = EXCLUDED.source_message_id, updated_at = EXCLUDED.updated_at";

/// The LLM calls, when there were any.
const LLM_CALLS: &str = "\
INSERT INTO llm_calls (id, business_id, conversation_id, message_id, purpose, template_id,
                       template_version, model, prompt, output, prompt_tokens,
                       completion_tokens, latency_ms, outcome, log_id, endpoint, response_format)
SELECT k.id, c.business_id, c.id, $10, k.purpose, k.template_id, k.template_version, k.model,
       k.prompt, k.output, k.prompt_tokens, k.completion_tokens, k.latency_ms, k.outcome, $11,
       k.endpoint, k.response_format
  FROM conversations AS c,
       json_to_recordset($13::json) AS k(id uuid, purpose text, template_id uuid,
         template_version integer, model text, prompt text, output text, prompt_tokens integer,
         completion_tokens integer, latency_ms integer, outcome text, endpoint text,
         response_format text)
 WHERE c.business_id = $1 AND c.id = $2";

/// The requests of the stage actions this message fired, into the outbox (`$14`: a JSON array
/// of [`crate::actions::OutboxRow`]); a second copy of a request (the same idempotency key) is
/// not written.
const ACTIONS: &str = "\
INSERT INTO action_outbox (business_id, id, conversation_id, message_id, action, idempotency_key,
                           url, body, timeout_ms, max_attempts, reply_to, follow_up, handoff_on,
                           traceparent, tracestate)
SELECT c.business_id, a.id, c.id, $10, a.action, a.key, a.url, a.body, a.timeout_ms,
       a.max_attempts, a.reply_to, a.follow_up, a.handoff_on, a.traceparent, a.tracestate
  FROM conversations AS c,
       json_to_recordset($14::json) AS a(id uuid, action text, key text, url text, body jsonb,
         timeout_ms integer, max_attempts integer, reply_to text, follow_up text, handoff_on jsonb,
         traceparent text, tracestate text)
 WHERE c.business_id = $1 AND c.id = $2
ON CONFLICT (business_id, idempotency_key) DO NOTHING";

/// The conversation's handoff changed by `$15`, merged into it: a handoff started (its whole
/// state), or, under way, the `reply_to` of the user's latest message (what the desk's writes
/// set stays). (No function in it: Citus allows only immutable ones in a `coalesce` here.)
const HANDOFF: &str = "\
UPDATE conversations SET handoff = coalesce(handoff, '{}'::jsonb) || $15::jsonb
 WHERE business_id = $1 AND id = $2";

/// How many parameters the write set has (`$1` … `$18`).
pub const PARAMETERS: usize = 18;

/// The statements of a write set, in order, with the write set's parameter numbers: the user,
/// the conversation (whose rows are the result), the messages, then the transition, the
/// extracted fields, the LLM calls and the actions' requests when there are any.
pub fn statements(
    new_conversation: bool,
    transition: bool,
    extracted: bool,
    llm_calls: bool,
    actions: bool,
    handoff: bool,
) -> Vec<&'static str> {
    let mut out = if new_conversation {
        vec![USER_NEW, CONVERSATION_NEW]
    } else {
        vec![USER_SEEN, CONVERSATION_CONTINUE]
    };
    out.push(MESSAGES);
    if transition {
        out.push(TRANSITION);
    }
    if extracted {
        out.push(EXTRACTED);
    }
    if llm_calls {
        out.push(LLM_CALLS);
    }
    if actions {
        out.push(ACTIONS);
    }
    if handoff {
        out.push(HANDOFF);
    }
    out
}

/// The index of the statement whose rows are the committed conversation.
const CONVERSATION_STEP: usize = 1;

/// A statement renumbered to the parameters it uses: `sql` has `$1…$k`, where `$i` is the write
/// set's parameter `uses[i - 1]` (1-based).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub sql: String,
    pub uses: Vec<usize>,
}

impl Step {
    /// `sql` with the write set's numbering, renumbered.
    pub fn new(sql: &str) -> Step {
        let mut uses: Vec<usize> = Vec::new();
        let sql = bind(sql, |n| {
            let i = match uses.iter().position(|&u| u == n) {
                Some(i) => i,
                None => {
                    uses.push(n);
                    uses.len() - 1
                }
            };
            format!("${}", i + 1)
        });
        Step { sql, uses }
    }
}

/// Replaces each `$n` of `sql` by `value(n)`.
pub fn bind(sql: &str, mut value: impl FnMut(usize) -> String) -> String {
    let mut out = String::with_capacity(sql.len() * 2);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let mut n = 0usize;
        let mut digits = 0;
        while let Some(v) = chars.peek().and_then(|d| d.to_digit(10)) {
            n = n * 10 + v as usize;
            digits += 1;
            chars.next();
        }
        if digits == 0 {
            out.push('$');
        } else {
            out.push_str(&value(n));
        }
    }
    out
}

/// Every statement a write set may run.
const ALL: [&str; 10] = [
    USER_NEW,
    CONVERSATION_NEW,
    USER_SEEN,
    CONVERSATION_CONTINUE,
    MESSAGES,
    TRANSITION,
    EXTRACTED,
    LLM_CALLS,
    ACTIONS,
    HANDOFF,
];

/// The renumbered form of a statement of [`ALL`], made once.
fn step(sql: &str) -> &'static Step {
    static STEPS: std::sync::LazyLock<[Step; 10]> = std::sync::LazyLock::new(|| ALL.map(Step::new));
    let i = ALL
        .iter()
        .position(|s| *s == sql)
        .expect("a statement of the write set");
    &STEPS[i]
}

/// One message row of the write set (`$6`), in conversation order (`pos` 1, 2, …).
#[derive(Debug, serde::Serialize)]
struct MessageRow<'a> {
    pos: i64,
    id: Uuid,
    role: &'static str,
    content: &'a str,
    key: &'a str,
    inbound: &'a str,
    stage: Uuid,
    status: Option<&'static str>,
    metadata: Option<&'a serde_json::Value>,
    fb_id: Option<Uuid>,
    fb_version: Option<i32>,
    t_id: Option<Uuid>,
    t_version: Option<i32>,
    timings: Option<&'a serde_json::Value>,
    answered_by: Option<Uuid>,
    model: Option<&'a str>,
    endpoint: Option<&'a str>,
}

/// The rows a write set stores in `messages`: its first message, the later ones of its turn,
/// the reply.
fn message_rows(ws: &WriteSet) -> Vec<MessageRow<'_>> {
    let mut followers: Vec<&FollowerRow> = ws.followers.iter().collect();
    followers.sort_by_key(|f| f.ord);
    let mut rows = Vec::with_capacity(followers.len() + 2);
    rows.push(MessageRow {
        pos: 1,
        id: ws.user_message_id,
        role: "user",
        content: &ws.user_content,
        key: &ws.idempotency_key,
        inbound: &ws.inbound_id,
        stage: ws.user_stage_id,
        status: None,
        metadata: ws.metadata.as_ref(),
        fb_id: None,
        fb_version: None,
        t_id: None,
        t_version: None,
        timings: None,
        answered_by: None,
        model: None,
        endpoint: None,
    });
    for f in followers {
        rows.push(MessageRow {
            pos: rows.len() as i64 + 1,
            id: f.id,
            role: "user",
            content: &f.content,
            key: &f.idempotency_key,
            inbound: &f.inbound_id,
            stage: ws.user_stage_id,
            status: None,
            metadata: f.metadata.as_ref(),
            fb_id: None,
            fb_version: None,
            t_id: None,
            t_version: None,
            timings: None,
            answered_by: Some(ws.assistant_message_id),
            model: None,
            endpoint: None,
        });
    }
    let (fb_id, fb_version) = ws.fallback_template.unzip();
    let (t_id, t_version) = ws.reply_template.unzip();
    rows.push(MessageRow {
        pos: rows.len() as i64 + 1,
        id: ws.assistant_message_id,
        role: "assistant",
        content: &ws.assistant_content,
        key: &ws.idempotency_key,
        inbound: &ws.inbound_id,
        stage: ws.stage_id,
        status: Some(ws.assistant_status),
        metadata: None,
        fb_id,
        fb_version,
        t_id,
        t_version,
        timings: Some(&ws.timings),
        answered_by: None,
        model: ws.reply_model.as_ref().map(|(m, _)| m.as_str()),
        endpoint: ws.reply_model.as_ref().map(|(_, e)| e.as_str()),
    });
    rows
}

/// The values a write set binds to its statements (owned here, borrowed by the parameters).
struct Values<'a> {
    rows: Json<Vec<MessageRow<'a>>>,
    count: i64,
    extracted: Json<&'a Extracted>,
    calls: Json<&'a [LlmCallRecord]>,
    actions: Json<&'a [crate::actions::OutboxRow]>,
    handoff: Option<Json<&'a serde_json::Value>>,
    transition_from: Option<Uuid>,
    transition_to: Option<Uuid>,
    /// The user's key, for a new conversation's erasure check (empty otherwise: unused).
    user_key: String,
    /// The message's inbound entry id (its arrival), in two parts.
    arrived_ms: i64,
    arrived_seq: i64,
}

impl<'a> Values<'a> {
    fn new(ws: &'a WriteSet) -> Values<'a> {
        let rows = message_rows(ws);
        let (transition_from, transition_to) = ws.transition.unzip();
        // Without an entry id (none today), after every erase.
        let arrived = crate::stream::entry_id_parts(&ws.inbound_id)
            .and_then(|(ms, seq)| Some((i64::try_from(ms).ok()?, i64::try_from(seq).ok()?)))
            .unwrap_or((i64::MAX, i64::MAX));
        Values {
            count: rows.len() as i64,
            rows: Json(rows),
            extracted: Json(&ws.extracted),
            calls: Json(&ws.llm_calls),
            actions: Json(&ws.actions),
            handoff: ws.handoff.as_ref().map(Json),
            transition_from,
            transition_to,
            user_key: if ws.expected_version.is_none() {
                user_key(&ws.user_external_id)
            } else {
                String::new()
            },
            arrived_ms: arrived.0,
            arrived_seq: arrived.1,
        }
    }

    /// The write set's parameters, `$1` … `$18`.
    fn params(&'a self, ws: &'a WriteSet) -> [&'a (dyn ToSql + Sync); PARAMETERS] {
        [
            &ws.business_id,
            &ws.conversation_id,
            &ws.stage_id,
            &ws.user_external_id,
            &ws.expected_version,
            &self.rows,
            &self.count,
            &self.transition_from,
            &self.transition_to,
            &ws.user_message_id,
            &ws.log_id,
            &self.extracted,
            &self.calls,
            &self.actions,
            &self.handoff,
            &self.user_key,
            &self.arrived_ms,
            &self.arrived_seq,
        ]
    }
}

/// How a user is named where their id must not be kept (`user_erasures`, `audit_log`): the
/// SHA-256 of their canonical id, in hex. It proves an erase to whoever knows the id, and does
/// not give the id back.
pub fn user_key(external_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(external_id.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A write set's statements, prepared on `client`, each with the parameters it uses.
pub(crate) struct Bound<'a> {
    values: Values<'a>,
    ws: &'a WriteSet,
    statements: Vec<&'static Step>,
    prepared: Vec<Statement>,
}

impl<'a> Bound<'a> {
    /// Prepares (once per connection: cached) the statements of `ws`.
    pub(crate) async fn prepare(
        client: &deadpool_postgres::Client,
        ws: &'a WriteSet,
    ) -> Result<Bound<'a>, tokio_postgres::Error> {
        let statements: Vec<&'static Step> = statements(
            ws.expected_version.is_none(),
            ws.transition.is_some(),
            !ws.extracted.is_empty(),
            !ws.llm_calls.is_empty(),
            !ws.actions.is_empty(),
            ws.handoff.is_some(),
        )
        .into_iter()
        .map(step)
        .collect();
        let mut prepared = Vec::with_capacity(statements.len());
        for step in &statements {
            prepared.push(client.prepared(&step.sql).await?);
        }
        Ok(Bound {
            values: Values::new(ws),
            ws,
            statements,
            prepared,
        })
    }

    /// Each statement with its parameters, in order.
    pub(crate) fn steps(&self) -> Vec<(&Statement, Vec<&(dyn ToSql + Sync)>)> {
        let params = self.values.params(self.ws);
        self.statements
            .iter()
            .zip(&self.prepared)
            .map(|(step, stmt)| (stmt, step.uses.iter().map(|&n| params[n - 1]).collect()))
            .collect()
    }
}

/// The committed conversation, from the rows of a write set's statements (the conversation
/// statement's row; none: the conversation was not the one read, a version conflict).
pub(crate) fn committed(
    mut results: Vec<Vec<tokio_postgres::Row>>,
) -> Result<CommittedConversation, StoreError> {
    let rows = results
        .get_mut(CONVERSATION_STEP)
        .map(std::mem::take)
        .unwrap_or_default();
    let row = rows.into_iter().next().ok_or(StoreError::VersionConflict)?;
    Ok(CommittedConversation {
        version: row.try_get(0)?,
        created_at: row.try_get(1)?,
        updated_at: row.try_get(2)?,
    })
}

impl Store {
    /// Commits a write set (its statements in a scoped transaction, one round trip) and returns the conversation as
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
        let bound = Bound::prepare(&client, ws).await?;
        let steps = bound.steps();
        // The fault-injection point decides the end: its error rolls the statements back.
        let (end, injected) = match before_commit() {
            Ok(()) => ("COMMIT", None),
            Err(e) => ("ROLLBACK", Some(e)),
        };
        let steps: Vec<(&Statement, &[&(dyn ToSql + Sync)])> = steps
            .iter()
            .map(|(stmt, used)| (*stmt, used.as_slice()))
            .collect();
        let results = self
            .scoped_steps(&client, ws.business_id, &steps, end)
            .await
            .map_err(classify)?;
        if let Some(e) = injected {
            return Err(e);
        }
        committed(results)
    }
}

/// A unique violation is a new conversation whose id exists (a version conflict) or a message
/// whose idempotency key is committed (a duplicate); the version check's violation is a version
/// conflict, and so is the stage transition's reference to a conversation that is gone (erased
/// or swept by retention while the message was processed: its re-run reads the database); the
/// erasure check's refusal is [`StoreError::Erased`]; any other stays a database error.
pub(crate) fn classify(e: StoreError) -> StoreError {
    let StoreError::Db(e) = e else {
        return e;
    };
    if is_erasure(&e) {
        return StoreError::Erased;
    }
    let check = e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION);
    let reference = e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION);
    if !is_unique_violation(&e) && !check && !reference {
        return StoreError::Db(e);
    }
    match e.as_db_error().and_then(constraint_of).map(unsharded) {
        Some(
            "conversations_pkey"
            | "conversations_version_check"
            | "stage_transitions_business_id_conversation_id_fkey",
        ) => StoreError::VersionConflict,
        Some("messages_idempotency_key") => StoreError::Duplicate,
        _ => StoreError::Db(e),
    }
}

/// Whether `e` is the refusal of a new conversation's user by [`CONVERSATION_NEW`]'s erasure
/// check: the only NULL `conversations.user_id` a write set can write. (On Citus the worker
/// node's error arrives with its message alone, naming the shard: `conversations_102008`.)
fn is_erasure(e: &tokio_postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        return false;
    };
    if db.code() != &tokio_postgres::error::SqlState::NOT_NULL_VIOLATION {
        return false;
    }
    match (db.table(), db.column()) {
        (Some(table), Some(column)) => unsharded(table) == "conversations" && column == "user_id",
        _ => {
            db.message().contains("column \"user_id\"")
                && db.message().contains("relation \"conversations")
        }
    }
}

/// The constraint an error names: its field, else (Citus passes a worker node's error on with
/// its message alone) the quoted name after "constraint" in the message.
fn constraint_of(e: &tokio_postgres::error::DbError) -> Option<&str> {
    e.constraint().or_else(|| {
        let rest = &e.message()[e.message().find("constraint \"")? + "constraint \"".len()..];
        rest.split('"').next()
    })
}

/// A constraint's name without the shard id Citus appends to it on a shard
/// (`messages_idempotency_key_102075`).
fn unsharded(name: &str) -> &str {
    match name.rsplit_once('_') {
        Some((base, id)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_replaces_every_numbered_parameter_and_nothing_else() {
        assert_eq!(
            bind("$1, $10, $2$", |n| format!("<{n}>")),
            "<1>, <10>, <2>$"
        );
    }

    #[test]
    fn a_step_is_renumbered_to_the_parameters_it_uses_in_order() {
        let step = Step::new("SELECT $4, $1, $4, $13");
        assert_eq!(step.sql, "SELECT $1, $2, $1, $3");
        assert_eq!(step.uses, vec![4, 1, 13]);
        for sql in statements(true, true, true, true, true, true)
            .into_iter()
            .chain(statements(false, true, true, true, true, true))
        {
            let step = Step::new(sql);
            assert!(
                step.uses.iter().all(|&n| (1..=PARAMETERS).contains(&n)),
                "{sql}"
            );
        }
    }

    #[test]
    fn a_constraint_is_named_the_same_on_a_shard() {
        assert_eq!(
            unsharded("messages_idempotency_key_102075"),
            "messages_idempotency_key"
        );
        assert_eq!(unsharded("conversations_pkey"), "conversations_pkey");
        assert_eq!(
            unsharded("conversations_version_check_7"),
            "conversations_version_check"
        );
    }
}
