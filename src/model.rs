//! Domain records shared by the store, the cache and the pipeline.
//!
//! They are plain data (serde) so that the same value can come from PostgreSQL or from its
//! cached copy in Redis.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A business and the stage list templates see (`stages`), cached as `business:{id}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Business {
    pub id: Uuid,
    pub name: String,
    pub initial_stage_id: Uuid,
    pub stages: Vec<StageInfo>,
    /// Field names declared by the business's extraction schemas; `extracted` always has them.
    pub extraction_fields: Vec<String>,
    /// Burst policy and budgets (`[business.burst]`, `[business.budget]`).
    #[serde(default)]
    pub policy: Policy,
    /// The template a throttled reply is rendered from (`budget.throttled_template`, resolved).
    #[serde(default)]
    pub throttled_template_id: Option<Uuid>,
    /// The template the rolling summary is made with (`history.summary_template`, resolved).
    #[serde(default)]
    pub summary_template_id: Option<Uuid>,
}

impl Business {
    pub fn stage(&self, id: Uuid) -> Option<&StageInfo> {
        self.stages.iter().find(|s| s.id == id)
    }
    pub fn stage_by_name(&self, name: &str) -> Option<&StageInfo> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// How quick successive messages of one user are answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BurstPolicy {
    /// One turn per message, in order.
    #[default]
    Queue,
    /// Messages waiting behind the head (or arriving within `window_ms` of it) are answered as
    /// one turn: all stored, one reply, every entry answered with a reference to it.
    Coalesce,
}

/// `[business.burst]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Burst {
    /// `queue` (default) or `coalesce`.
    pub policy: BurstPolicy,
    /// How long after its arrival a coalescing head waits for more messages of its user.
    pub window_ms: u32,
}

/// `[business.budget]`: limits of one business; absent keys: no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budget {
    /// Messages accepted per calendar minute (UTC), over every worker.
    pub messages_per_minute: Option<u32>,
    /// LLM tokens (prompt and completion) per calendar day (UTC), over every worker.
    pub tokens_per_day: Option<u64>,
    /// Messages of this business processed at once by one worker.
    pub max_in_flight: Option<u32>,
    /// A `fallback` template the reply to a message over budget is rendered from (absent: the
    /// configured `worker.throttled_reply`).
    pub throttled_template: Option<String>,
}

/// A business's burst policy and budgets, stored as `businesses.policy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// How quick successive messages are answered.
    pub burst: Burst,
    /// What the business may use.
    pub budget: Budget,
    /// How replies reach its users. (Left out when default, so that workers of an earlier
    /// release, which refuse unknown keys, read the policies of businesses that do not use it.)
    #[serde(skip_serializing_if = "Replies::is_default")]
    pub replies: Replies,
    /// The rolling summary of long conversations. (Left out when default, as `replies`.)
    #[serde(skip_serializing_if = "History::is_default")]
    pub history: History,
    /// Stage actions' signing. (Left out when default, as `replies`.)
    #[serde(skip_serializing_if = "Actions::is_default")]
    pub actions: Actions,
    /// What users are told while a person has their conversation. (Left out when default, as
    /// `replies`.)
    #[serde(skip_serializing_if = "HandoffPolicy::is_default")]
    pub handoff: HandoffPolicy,
    /// How long its users' data is kept. (Left out when default, as `replies`.)
    #[serde(skip_serializing_if = "Retention::is_default")]
    pub retention: Retention,
}

/// `[business.retention]`: how many days the business keeps its users' data (absent: for
/// ever). The retention sweep deletes messages older than `messages_days` (with their LLM
/// calls and stage transitions; a conversation and a user left without any go too), blanks
/// LLM prompts and outputs older than `llm_prompts_days`, and deletes dead letters older than
/// `dead_letters_days`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Messages (with their LLM calls, transitions and action requests) older than this.
    pub messages_days: Option<u32>,
    /// LLM prompts and outputs older than this are blanked (at most `messages_days`).
    pub llm_prompts_days: Option<u32>,
    /// Dead letters older than this.
    pub dead_letters_days: Option<u32>,
}

impl Retention {
    fn is_default(&self) -> bool {
        *self == Retention::default()
    }

    /// Whether it limits anything.
    pub fn limits_anything(&self) -> bool {
        !self.is_default()
    }

    /// What is wrong with it: a period of 0 days, or prompts kept longer than their messages.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, days) in [
            ("messages_days", self.messages_days),
            ("llm_prompts_days", self.llm_prompts_days),
            ("dead_letters_days", self.dead_letters_days),
        ] {
            if days == Some(0) {
                out.push(format!("retention.{name} must be at least 1"));
            }
        }
        if let (Some(prompts), Some(messages)) = (self.llm_prompts_days, self.messages_days)
            && prompts > messages
        {
            out.push(
                "retention.llm_prompts_days must not exceed messages_days (prompts go with \
                 their messages)"
                    .into(),
            );
        }
        out
    }
}

/// `[business.handoff]`: what users are told while their conversation is with a person.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HandoffPolicy {
    /// The reply to each message while handed over (status `handoff`; empty: an empty reply,
    /// which tells a front end the message reached the person without showing anything).
    pub reply: String,
    /// A handoff no agent has answered after this long gets `timeout_reply`, once (0: never).
    pub timeout_ms: u64,
    pub timeout_reply: String,
}

impl HandoffPolicy {
    fn is_default(&self) -> bool {
        *self == HandoffPolicy::default()
    }
}

/// `[business.actions]`: how the business's action requests are signed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Actions {
    /// The environment variable holding the HMAC-SHA256 key every request is signed with
    /// (required when a stage has actions).
    pub secret_env: Option<String>,
}

impl Actions {
    fn is_default(&self) -> bool {
        *self == Actions::default()
    }
}

/// `[business.history]`: when a conversation's history is folded into its rolling summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct History {
    /// A `summary` template; absent: no summary.
    pub summary_template: Option<String>,
    /// A summary is made (after the reply) once the history since the last one takes more
    /// than this many tokens.
    pub summarize_after_tokens: u32,
    /// The newest turns left out of the summary (they stay in the history); 4 by default.
    pub keep_turns: u32,
}

impl Default for History {
    fn default() -> Self {
        History {
            summary_template: None,
            summarize_after_tokens: 0,
            keep_turns: 4,
        }
    }
}

impl History {
    fn is_default(&self) -> bool {
        *self == History::default()
    }
}

/// `[business.replies]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Replies {
    /// Stream the response from the LLM and publish `partial` entries of the text so far to
    /// the reply destination while it is written (`llm.partial_interval_ms` apart at most).
    pub stream: bool,
}

impl Replies {
    fn is_default(&self) -> bool {
        *self == Replies::default()
    }
}

impl Policy {
    /// How long a head waits for more messages of its user, when the business coalesces.
    pub fn coalesce_window(&self) -> Option<std::time::Duration> {
        (self.burst.policy == BurstPolicy::Coalesce)
            .then(|| std::time::Duration::from_millis(u64::from(self.burst.window_ms)))
    }
}

/// When a stage action fires (`on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionTrigger {
    /// On the message that brings the conversation into the stage (a new conversation's first
    /// message enters its initial stage).
    Enter,
    /// On the message after which every field of `fields` is known, in the stage, for the
    /// first time.
    FieldsComplete,
    /// On every message answered in the stage.
    Message,
}

/// A stage action (`[[stages.actions]]`): an HTTP `POST` of a JSON body rendered from the
/// message's template context, written to the outbox with the message and delivered by the
/// dispatcher (docs/templates.md, "Stage actions").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionDef {
    pub name: String,
    pub on: ActionTrigger,
    /// The fields `fields_complete` waits for.
    #[serde(default)]
    pub fields: Vec<String>,
    /// The URL, as configured (never a template); or `url_env`, the variable holding it.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_env: Option<String>,
    /// An `upon` template of the context that renders to JSON (`{{ x | json }}` quotes a value).
    pub body: String,
    /// How long one request may take.
    #[serde(default = "default_action_timeout_ms")]
    pub timeout_ms: u32,
    /// Attempts before the request is given up (`dead`).
    #[serde(default = "default_action_attempts")]
    pub max_attempts: u32,
    /// A message to the user once the result is in: an `upon` template of `action`, `request`
    /// (the body sent) and `result` (as `actions.<name>`), published once with its own
    /// `reply_id`. (Left out when absent, so that a stage without one reads as before.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_up: Option<String>,
    /// The results (`delivered`, `rejected`, `dead`) that hand the conversation to a person.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handoff_on: Vec<String>,
}

fn default_action_timeout_ms() -> u32 {
    5_000
}

fn default_action_attempts() -> u32 {
    8
}

/// Name and description of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageInfo {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// The stages selection may move to from this one; `None`: any.
    #[serde(default)]
    pub next: Option<Vec<Uuid>>,
    /// Its actions.
    #[serde(default)]
    pub actions: Vec<ActionDef>,
    /// A conversation entering it is handed to a person.
    #[serde(default)]
    pub handoff: bool,
}

impl StageInfo {
    /// Whether selection may move a conversation from this stage to `to`.
    pub fn may_move_to(&self, to: Uuid) -> bool {
        to == self.id || self.next.as_ref().is_none_or(|next| next.contains(&to))
    }
}

/// The template ids of one stage: the seed's `stage:{id}` hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTemplates {
    pub selection: Option<Uuid>,
    pub extraction: Option<Uuid>,
    pub response: Uuid,
    pub fallback: Option<Uuid>,
}

/// What a template is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateKind {
    Selection,
    Extraction,
    Response,
    Fallback,
    /// Folds older turns into a conversation's rolling summary (`[business.history]`).
    Summary,
}

impl TemplateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateKind::Selection => "selection",
            TemplateKind::Extraction => "extraction",
            TemplateKind::Response => "response",
            TemplateKind::Fallback => "fallback",
            TemplateKind::Summary => "summary",
        }
    }
    pub fn parse(s: &str) -> Option<TemplateKind> {
        match s {
            "selection" => Some(TemplateKind::Selection),
            "extraction" => Some(TemplateKind::Extraction),
            "response" => Some(TemplateKind::Response),
            "fallback" => Some(TemplateKind::Fallback),
            "summary" => Some(TemplateKind::Summary),
            _ => None,
        }
    }
}

/// A stored template: source text, model parameters and version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub id: Uuid,
    pub business_id: Uuid,
    pub name: String,
    pub kind: TemplateKind,
    /// System prompt (also a template).
    pub system: String,
    pub body: String,
    pub model: Option<String>,
    /// The models a call tries in order (`models = [...]`); empty: `model`, else
    /// `llm.default_model`. (Absent from templates cached by earlier releases.)
    #[serde(default)]
    pub models: Vec<String>,
    /// The most tokens the history may take in this template's prompt (`None`:
    /// `llm.context_tokens`); the newest turns that fit are kept.
    #[serde(default)]
    pub context_tokens: Option<i32>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<i32>,
    /// JSON Schema the extraction output must satisfy.
    pub output_schema: Option<serde_json::Value>,
    pub version: i32,
}

/// A business definition as `icmp import` stores it: plain records whose references are by
/// name (the store resolves them to ids in its transaction).
#[derive(Debug, Clone, PartialEq)]
pub struct DefinitionRecord {
    pub business_id: Uuid,
    pub name: String,
    /// The stage new conversations start in.
    pub initial_stage: String,
    /// Burst policy and budgets.
    pub policy: Policy,
    pub stages: Vec<StageDefinition>,
    /// Templates (their `id` and `version` are assigned by the store).
    pub templates: Vec<TemplateRecord>,
}

/// One stage of a [`DefinitionRecord`], naming its templates.
#[derive(Debug, Clone, PartialEq)]
pub struct StageDefinition {
    pub name: String,
    pub description: String,
    pub selection_template: Option<String>,
    pub extraction_template: Option<String>,
    pub response_template: String,
    pub fallback_template: Option<String>,
    /// Stage names selection may move to (`None`: any).
    pub transitions: Option<Vec<String>>,
    pub actions: Vec<ActionDef>,
    pub handoff: bool,
}

/// A conversation's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: Uuid,
    pub business_id: Uuid,
    /// The user's id inside the business (the inbound `user_id`).
    pub user_external_id: String,
    pub stage_id: Uuid,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The rolling summary of the turns folded out of the history (empty: none).
    #[serde(default)]
    pub summary: String,
    /// The last message (`seq`) the summary covers; the history starts after it.
    #[serde(default)]
    pub summarized_seq: i64,
    /// The latest result of each stage action (`actions.<name>` in templates).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub actions: serde_json::Map<String, serde_json::Value>,
    /// Set while a person has the conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffState>,
}

/// A conversation's handoff, as `conversations.handoff` stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffState {
    /// When it started (RFC 3339) and the same in unix milliseconds (what the timeout sweep
    /// compares).
    pub since: String,
    pub since_ms: i64,
    /// When the timeout reply is due (unix ms; `None`: the business has no timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_ms: Option<i64>,
    /// What started it: `stage:<name>`, `action:<name>` or `operator`.
    pub by: String,
    /// Where the user's latest message asked its reply (agents' answers go there; `None`:
    /// the outbound stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// An agent has answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered: Option<bool>,
    /// The timeout reply was stored (and its message id), and published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_reply_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_published: Option<bool>,
    /// The agents were told it started (the `started` entry is on their stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub told: Option<bool>,
}

impl HandoffState {
    /// A handoff starting now, timing out after `timeout_ms` (0: never).
    pub fn starting(by: String, reply_to: Option<String>, timeout_ms: u64) -> HandoffState {
        let now = Utc::now();
        HandoffState {
            since: now.to_rfc3339(),
            since_ms: now.timestamp_millis(),
            due_ms: (timeout_ms > 0).then(|| {
                now.timestamp_millis()
                    .saturating_add(i64::try_from(timeout_ms).unwrap_or(i64::MAX))
            }),
            by,
            reply_to,
            answered: None,
            timed_out: None,
            timeout_reply_id: None,
            timeout_published: None,
            told: None,
        }
    }
}

/// What the next message of a user needs of their current conversation, as the last commit
/// left it: cached as one value (`conv:{business}:{user}`), so a continuing conversation's read
/// phase is one Redis `GET`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationState {
    pub conversation: Conversation,
    /// Every field extracted so far.
    pub extracted: Extracted,
    /// The last `window` turns, oldest first.
    pub history: Vec<Turn>,
    /// The history window's length limit it was cut to (`worker.history_turns`).
    pub window: usize,
    /// The idempotency keys of the user's latest committed messages (at most
    /// [`ConversationState::RECENT_KEYS`], oldest first): a repeated message found here is
    /// answered from the store at once; one not found here (older, or committed while this
    /// state was not kept) is still caught when its write set commits.
    #[serde(default)]
    pub recent_keys: Vec<String>,
}

impl ConversationState {
    /// How many idempotency keys a cached state remembers.
    pub const RECENT_KEYS: usize = 64;
}

/// A stored conversation as an operator reads it (`icmp conversation show`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConversationRecord {
    pub id: Uuid,
    pub business_id: Uuid,
    pub user_id: String,
    /// The current stage's name.
    pub stage: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub messages: Vec<StoredMessage>,
    pub extracted: Extracted,
    /// Set while a person has the conversation (`null` otherwise).
    pub handoff: Option<HandoffState>,
}

/// One line of a business's list of conversations, as operators browse it (`icmp console`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConversationSummary {
    pub id: Uuid,
    /// The user's external id.
    pub user_id: String,
    /// The current stage's name.
    pub stage: String,
    /// Stored messages (user and assistant rows).
    pub messages: i64,
    pub updated_at: DateTime<Utc>,
}

/// One stored message of a [`ConversationRecord`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredMessage {
    pub id: Uuid,
    pub role: String,
    pub content: String,
    /// The stage it was written in (user) or answered from (assistant).
    pub stage: Option<String>,
    /// Assistant rows: `ok` or `fallback`.
    pub status: Option<String>,
    /// Assistant rows: the template (name and version) the reply came from.
    pub template: Option<String>,
    pub template_version: Option<i32>,
    pub message_id: String,
    pub log_id: Uuid,
    pub created_at: DateTime<Utc>,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    /// A person who had the conversation (human handoff).
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Agent => "agent",
        }
    }

    /// The role of a stored row (`messages.role`).
    pub fn parse(s: &str) -> Role {
        match s {
            "assistant" => Role::Assistant,
            "agent" => Role::Agent,
            _ => Role::User,
        }
    }
}

/// One earlier message, as templates see it in `history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

/// Extracted data of a conversation: field → JSON value.
pub type Extracted = serde_json::Map<String, serde_json::Value>;

/// The answer to one message, as committed with it (and found again for a repeat).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The stored assistant message's id.
    pub reply_id: Uuid,
    pub conversation_id: Uuid,
    pub status: AnswerStatus,
    pub content: String,
    /// The conversation's stage after this message (empty when unknown).
    pub stage: String,
    pub log_id: Uuid,
    /// The model and the endpoint that answered (empty when no LLM did).
    pub model: String,
    pub endpoint: String,
    /// A message of a coalesced turn answered by another message's reply: that reply's id
    /// (`reply_id` is then the message's own stored id, and `content` is empty).
    pub answered_by: Option<Uuid>,
}

/// Where an answer came from (the reply's `status`, the assistant row's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerStatus {
    /// From the LLM.
    Ok,
    /// Rendered from a fallback template (or the last-resort text) because the LLM failed.
    Fallback,
    /// Over the business's budget: rendered from its throttled template, no LLM call.
    Throttled,
    /// Answered together with earlier messages of the user by the reply `answered_by`.
    Coalesced,
    /// Received while a person has the conversation: passed to the agents, no LLM call.
    Handoff,
}

impl AnswerStatus {
    /// The reply's `status` (and the assistant row's, but for `coalesced`).
    pub fn as_str(self) -> &'static str {
        match self {
            AnswerStatus::Ok => "ok",
            AnswerStatus::Fallback => "fallback",
            AnswerStatus::Throttled => "throttled",
            AnswerStatus::Coalesced => "coalesced",
            AnswerStatus::Handoff => "handoff",
        }
    }

    /// The status stored on an assistant row (`NULL` reads as `ok`).
    pub fn from_stored(s: &str) -> AnswerStatus {
        match s {
            "fallback" => AnswerStatus::Fallback,
            "throttled" => AnswerStatus::Throttled,
            "handoff" => AnswerStatus::Handoff,
            _ => AnswerStatus::Ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_moves_only_where_its_transitions_allow() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let mut stage = StageInfo {
            id: a,
            name: "a".into(),
            description: String::new(),
            next: None,
            actions: Vec::new(),
            handoff: false,
        };
        assert!(
            stage.may_move_to(b) && stage.may_move_to(c),
            "no rules: anywhere"
        );
        stage.next = Some(vec![b]);
        assert!(stage.may_move_to(b));
        assert!(!stage.may_move_to(c));
        assert!(stage.may_move_to(a), "staying is always allowed");
        stage.next = Some(Vec::new());
        assert!(!stage.may_move_to(b), "an empty list: nowhere");
    }

    /// Values the previous release cached in Redis (its exact JSON) are read by this one: the
    /// fields this release added take their defaults, nothing is refused.
    #[test]
    fn the_previous_releases_cached_values_are_read() {
        let state: ConversationState = serde_json::from_str(
            r#"{"conversation": {"id": "00000000-0000-0000-0000-000000000001",
                "business_id": "00000000-0000-0000-0000-000000000002",
                "user_external_id": "ann", "stage_id": "00000000-0000-0000-0000-000000000003",
                "version": 4, "created_at": "2026-12-01T10:00:00Z",
                "updated_at": "2026-12-01T10:05:00Z"},
              "extracted": {"name": "Ann"},
              "history": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
              "window": 20, "recent_keys": ["m1"]}"#,
        )
        .expect("a cached state of the previous release");
        assert_eq!(state.conversation.version, 4);
        assert_eq!(
            (
                state.conversation.summary.as_str(),
                state.conversation.summarized_seq
            ),
            ("", 0)
        );
        assert_eq!(state.history.len(), 2);
        let template: TemplateRecord = serde_json::from_str(
            r#"{"id": "00000000-0000-0000-0000-000000000004",
                "business_id": "00000000-0000-0000-0000-000000000002", "name": "welcome_reply",
                "kind": "response", "system": "", "body": "hi", "model": "mock-1",
                "temperature": null, "max_tokens": null, "output_schema": null, "version": 2}"#,
        )
        .expect("a cached template of the previous release");
        assert_eq!(template.model.as_deref(), Some("mock-1"));
        assert!(template.models.is_empty());
        assert_eq!(template.context_tokens, None);
        let business: Business = serde_json::from_str(
            r#"{"id": "00000000-0000-0000-0000-000000000002", "name": "demo",
                "initial_stage_id": "00000000-0000-0000-0000-000000000003", "stages": [],
                "extraction_fields": [], "policy": {"burst": {"policy": "queue", "window_ms": 0},
                "budget": {"messages_per_minute": null, "tokens_per_day": null,
                "max_in_flight": null, "throttled_template": null}},
                "throttled_template_id": null}"#,
        )
        .expect("a cached business of the previous release");
        assert_eq!(business.policy.replies, Replies::default());
        assert_eq!(business.policy.history, History::default());
        assert_eq!(business.summary_template_id, None);
        // And a policy this release writes for a business that uses neither reads as the
        // previous release wrote it (its workers refuse unknown keys).
        let written = serde_json::to_value(&business.policy).expect("policy");
        assert!(written.get("replies").is_none() && written.get("history").is_none());
    }
}
