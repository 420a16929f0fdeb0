//! The error taxonomy (DESIGN §8): categories, stable codes, HTTP-like statuses and retryability.
//!
//! Every layer has its own `thiserror` enum (`LlmError`, `StoreError`, `CacheError`,
//! `TemplateError`, `ValidationError`); they all implement [`Classify`], so the worker, the
//! metrics and the error replies treat them alike. `is_retryable()` is written out per variant
//! (no catch-all arm) so that adding a variant forces a decision.

use std::fmt;

/// The seed's three error categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    /// Input, template, stage transition or extraction output that is not acceptable.
    Validation,
    /// A dependency failed while processing: LLM, rendering, database, Redis, rate limit.
    Processing,
    /// Connections, resources, timeouts, configuration, cache consistency.
    System,
}

impl Category {
    /// Label value used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Validation => "validation",
            Category::Processing => "processing",
            Category::System => "system",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What every error of this crate can say about itself.
pub trait Classify: std::error::Error {
    /// Stable dotted code, e.g. `validation.missing_field`; part of the wire protocol.
    fn code(&self) -> &'static str;
    /// The seed's category.
    fn category(&self) -> Category;
    /// HTTP-like status carried in error replies (400/404/409/410/422/429/500/502/503/504).
    fn status_code(&self) -> u16;
    /// Whether trying the same operation again may succeed.
    fn is_retryable(&self) -> bool;
    /// A message that is safe to show to the end user (no internals, no secrets).
    fn user_message(&self) -> String {
        match self.category() {
            Category::Validation => self.to_string(),
            Category::Processing | Category::System => {
                "Sorry, something went wrong on our side. Please try again shortly.".to_owned()
            }
        }
    }
}

/// Bad input on the inbound stream. Never retried; answered with an error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("the field `{0}` is required")]
    MissingField(&'static str),
    #[error("the field `{field}` is invalid: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("the field `{0}` is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("the message content is empty")]
    EmptyContent,
    #[error("the message content is {size} bytes; the limit is {limit}")]
    ContentTooLarge { size: usize, limit: usize },
    #[error("the metadata must be a JSON object: {0}")]
    InvalidMetadata(String),
    #[error("the metadata is {size} bytes; the limit is {limit}")]
    MetadataTooLarge { size: usize, limit: usize },
    #[error("replies may only go to streams starting with `{0}`")]
    ReplyToNotAllowed(String),
    #[error("unknown business")]
    UnknownBusiness,
    #[error("unknown conversation")]
    UnknownConversation,
    #[error("a field name is not valid UTF-8")]
    UnreadableFieldName,
    #[error("the field `{0}` appears more than once")]
    DuplicateField(String),
    #[error("the entry is {size} bytes; the limit is {limit}")]
    EntryTooLarge { size: usize, limit: usize },
    #[error("the entry has {count} fields; the limit is {limit}")]
    TooManyFields { count: usize, limit: usize },
    #[error(
        "this user's messages go to shard {expected} of {shards}, the stream `{stream}` \
         (docs/protocol.md, \"Shards\"; `icmp shard BUSINESS USER` names it)"
    )]
    WrongShard {
        expected: u32,
        shards: u32,
        stream: String,
    },
}

impl Classify for ValidationError {
    fn code(&self) -> &'static str {
        match self {
            ValidationError::MissingField(_) => "validation.missing_field",
            ValidationError::InvalidField { .. } => "validation.invalid_field",
            ValidationError::InvalidUtf8(_) => "validation.invalid_utf8",
            ValidationError::EmptyContent => "validation.empty_content",
            ValidationError::ContentTooLarge { .. } => "validation.content_too_large",
            ValidationError::InvalidMetadata(_) => "validation.invalid_metadata",
            ValidationError::MetadataTooLarge { .. } => "validation.metadata_too_large",
            ValidationError::ReplyToNotAllowed(_) => "validation.reply_to_not_allowed",
            ValidationError::UnknownBusiness => "validation.unknown_business",
            ValidationError::UnknownConversation => "validation.unknown_conversation",
            ValidationError::UnreadableFieldName => "validation.unreadable_field_name",
            ValidationError::DuplicateField(_) => "validation.duplicate_field",
            ValidationError::EntryTooLarge { .. } => "validation.entry_too_large",
            ValidationError::TooManyFields { .. } => "validation.too_many_fields",
            ValidationError::WrongShard { .. } => "validation.wrong_shard",
        }
    }
    fn category(&self) -> Category {
        Category::Validation
    }
    fn status_code(&self) -> u16 {
        match self {
            ValidationError::UnknownBusiness | ValidationError::UnknownConversation => 404,
            // Misdirected: the same message is fine on its user's shard.
            ValidationError::WrongShard { .. } => 421,
            ValidationError::ContentTooLarge { .. }
            | ValidationError::MetadataTooLarge { .. }
            | ValidationError::EntryTooLarge { .. }
            | ValidationError::TooManyFields { .. } => 422,
            ValidationError::UnreadableFieldName
            | ValidationError::DuplicateField(_)
            | ValidationError::MissingField(_)
            | ValidationError::InvalidField { .. }
            | ValidationError::InvalidUtf8(_)
            | ValidationError::EmptyContent
            | ValidationError::InvalidMetadata(_)
            | ValidationError::ReplyToNotAllowed(_) => 400,
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            ValidationError::MissingField(_)
            | ValidationError::InvalidField { .. }
            | ValidationError::InvalidUtf8(_)
            | ValidationError::EmptyContent
            | ValidationError::ContentTooLarge { .. }
            | ValidationError::InvalidMetadata(_)
            | ValidationError::MetadataTooLarge { .. }
            | ValidationError::ReplyToNotAllowed(_)
            | ValidationError::UnknownBusiness
            | ValidationError::UnknownConversation
            | ValidationError::UnreadableFieldName
            | ValidationError::DuplicateField(_)
            | ValidationError::EntryTooLarge { .. }
            | ValidationError::TooManyFields { .. }
            | ValidationError::WrongShard { .. } => false,
        }
    }
}

/// A failed call to the LLM endpoint.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("the LLM request timed out after {0} ms")]
    Timeout(u64),
    #[error("could not reach the LLM endpoint: {0}")]
    Connect(String),
    #[error("the LLM endpoint is rate limiting (retry after {retry_after_ms:?} ms)")]
    RateLimited { retry_after_ms: Option<u64> },
    #[error("the LLM endpoint answered {status}: {body}")]
    Server { status: u16, body: String },
    #[error("the LLM endpoint rejected the request with {status}: {body}")]
    Rejected { status: u16, body: String },
    #[error("the LLM answer could not be decoded: {0}")]
    MalformedResponse(String),
    #[error("the LLM output is not what the template asked for: {0}")]
    InvalidOutput(String),
    #[error("the LLM circuit is open; not calling the endpoint")]
    CircuitOpen,
    #[error("the LLM answer is larger than {limit} bytes")]
    ResponseTooLarge { limit: usize },
    #[error("the LLM output is larger than allowed: {0}")]
    OutputTooLarge(String),
    #[error("selection chose stage `{to}`, which stage `{from}` may not move to")]
    TransitionNotAllowed { from: String, to: String },
}

impl Classify for LlmError {
    fn code(&self) -> &'static str {
        match self {
            LlmError::Timeout(_) => "llm.timeout",
            LlmError::Connect(_) => "llm.unavailable",
            LlmError::RateLimited { .. } => "llm.rate_limited",
            LlmError::Server { .. } => "llm.server_error",
            LlmError::Rejected { .. } => "llm.rejected",
            LlmError::MalformedResponse(_) => "llm.malformed_response",
            LlmError::InvalidOutput(_) => "llm.invalid_output",
            LlmError::CircuitOpen => "llm.circuit_open",
            LlmError::ResponseTooLarge { .. } => "llm.response_too_large",
            LlmError::OutputTooLarge(_) => "llm.output_too_large",
            LlmError::TransitionNotAllowed { .. } => "validation.stage_transition",
        }
    }
    fn category(&self) -> Category {
        match self {
            LlmError::Timeout(_) | LlmError::Connect(_) | LlmError::CircuitOpen => Category::System,
            LlmError::InvalidOutput(_)
            | LlmError::OutputTooLarge(_)
            | LlmError::TransitionNotAllowed { .. } => Category::Validation,
            LlmError::ResponseTooLarge { .. }
            | LlmError::RateLimited { .. }
            | LlmError::Server { .. }
            | LlmError::Rejected { .. }
            | LlmError::MalformedResponse(_) => Category::Processing,
        }
    }
    fn status_code(&self) -> u16 {
        match self {
            LlmError::Timeout(_) => 504,
            LlmError::RateLimited { .. } => 429,
            LlmError::Connect(_) | LlmError::CircuitOpen => 503,
            LlmError::Server { .. }
            | LlmError::Rejected { .. }
            | LlmError::MalformedResponse(_)
            | LlmError::InvalidOutput(_)
            | LlmError::ResponseTooLarge { .. }
            | LlmError::OutputTooLarge(_) => 502,
            LlmError::TransitionNotAllowed { .. } => 422,
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            LlmError::Timeout(_)
            | LlmError::Connect(_)
            | LlmError::RateLimited { .. }
            | LlmError::Server { .. }
            | LlmError::MalformedResponse(_) => true,
            LlmError::Rejected { .. }
            | LlmError::InvalidOutput(_)
            | LlmError::CircuitOpen
            | LlmError::ResponseTooLarge { .. }
            | LlmError::OutputTooLarge(_)
            | LlmError::TransitionNotAllowed { .. } => false,
        }
    }
}

/// A PostgreSQL failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no database connection: {0}")]
    Pool(String),
    #[error("database error: {}", pg_error_text(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("the conversation changed while this message was processed")]
    VersionConflict,
    #[error("this message was already stored")]
    Duplicate,
    /// The user was erased after this message arrived (`icmp user erase`): it is dropped,
    /// acknowledged without a reply, and nothing of it is stored.
    #[error("the user was erased after this message arrived")]
    Erased,
    #[error("stored data is inconsistent: {0}")]
    Inconsistent(String),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("injected fault at {0}")]
    Injected(&'static str),
}

/// Whether an error is a Citus worker node's connection failing under a command: Citus relays a
/// node's error that has no SQLSTATE (libpq's own, such as "server closed the connection
/// unexpectedly" while the node restarts) as `XX000`, in the context "while executing command
/// on <node>". A node's real internal error carries its own SQLSTATE.
fn relayed_connection_failure(sqlstate: &str, context: Option<&str>) -> bool {
    sqlstate == "XX000" && context.is_some_and(|w| w.contains("while executing command on"))
}

/// Whether an error is Citus ending a transaction because a worker node's connection broke
/// under it (the node stopped or restarted at that moment), raised as `XX000` with no context:
/// under its `COMMIT` (after the warning "failed to commit transaction on <node>"), under a
/// two-phase commit's `PREPARE`, or on a connection the transaction had written through. The
/// node may have committed; retrying is safe because a message's idempotency key turns a
/// committed write into its stored answer.
fn node_transaction_failure(sqlstate: &str, message: &str) -> bool {
    const BROKEN: [&str; 3] = [
        "could not commit transaction for shard",
        "failed to prepare transaction",
        "failure on connection marked as essential",
    ];
    sqlstate == "XX000" && BROKEN.iter().any(|b| message.starts_with(b))
}

/// A PostgreSQL error with what its `Display` leaves out: the server's SQLSTATE and message
/// (never its detail, which may quote row values), or the chain of causes (a TLS handshake's
/// reason, an I/O error).
fn pg_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}", db.code().code(), db.message());
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

impl StoreError {
    fn sqlstate(&self) -> Option<&str> {
        match self {
            StoreError::Db(e) => e.code().map(|c| c.code()),
            StoreError::Pool(_)
            | StoreError::VersionConflict
            | StoreError::Duplicate
            | StoreError::Erased
            | StoreError::Inconsistent(_)
            | StoreError::Migration(_)
            | StoreError::Injected(_) => None,
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Db(e),
            other => StoreError::Pool(other.to_string()),
        }
    }
}

impl Classify for StoreError {
    fn code(&self) -> &'static str {
        match self {
            StoreError::Pool(_) => "db.unavailable",
            StoreError::Db(_) => match self.sqlstate() {
                Some("40001") => "db.serialization_failure",
                Some("40P01") => "db.deadlock",
                Some("55P03") => "db.lock_timeout",
                Some("57014") => "db.statement_timeout",
                // invalid authorization: a pg_hba.conf rule (say, TLS only) or credentials.
                Some(c) if c.starts_with("28") => "db.auth_rejected",
                _ if self.is_retryable() => "db.unavailable",
                _ => "db.error",
            },
            StoreError::VersionConflict => "db.version_conflict",
            StoreError::Duplicate => "db.duplicate",
            StoreError::Erased => "user.erased",
            StoreError::Inconsistent(_) => "db.inconsistent",
            StoreError::Migration(_) => "db.migration",
            StoreError::Injected(_) => "db.injected_fault",
        }
    }
    fn category(&self) -> Category {
        if self.sqlstate().is_some_and(|c| c.starts_with("28")) {
            return Category::System;
        }
        match self {
            StoreError::Pool(_)
            | StoreError::Inconsistent(_)
            | StoreError::Migration(_)
            | StoreError::Injected(_) => Category::System,
            StoreError::Db(_)
            | StoreError::VersionConflict
            | StoreError::Duplicate
            | StoreError::Erased => Category::Processing,
        }
    }
    fn status_code(&self) -> u16 {
        match self {
            StoreError::VersionConflict | StoreError::Duplicate => 409,
            StoreError::Erased => 410,
            StoreError::Pool(_) => 503,
            StoreError::Db(_) if self.is_retryable() => 503,
            StoreError::Db(_)
            | StoreError::Inconsistent(_)
            | StoreError::Migration(_)
            | StoreError::Injected(_) => 500,
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            StoreError::Pool(_) | StoreError::VersionConflict => true,
            StoreError::Db(e) => {
                if e.is_closed() {
                    return true;
                }
                let db = e.as_db_error();
                let context = db.and_then(|d| d.where_());
                let message = db.map_or("", |d| d.message());
                match e.code().map(|c| c.code()) {
                    Some(c) if relayed_connection_failure(c, context) => true,
                    Some(c) if node_transaction_failure(c, message) => true,
                    // serialization failure, deadlock, connection exceptions, admin shutdown,
                    // cannot connect now, too many connections
                    Some(c) => {
                        c == "40001"
                            || c == "40P01"
                            // lock_timeout, statement_timeout: another session held a lock
                            // (or the server was slow); it may be gone on the next try.
                            || c == "55P03"
                            || c == "57014"
                            || c.starts_with("08")
                            || c.starts_with("57P")
                            || c == "53300"
                    }
                    // No SQLSTATE: an I/O error talking to the server.
                    None => true,
                }
            }
            StoreError::Duplicate
            | StoreError::Erased
            | StoreError::Inconsistent(_)
            | StoreError::Migration(_)
            | StoreError::Injected(_) => false,
        }
    }
}

/// A Redis failure (cache or streams).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cached value could not be decoded: {0}")]
    Decode(String),
}

impl Classify for CacheError {
    fn code(&self) -> &'static str {
        match self {
            CacheError::Redis(_) => "redis.unavailable",
            CacheError::Decode(_) => "cache.inconsistent",
        }
    }
    fn category(&self) -> Category {
        match self {
            CacheError::Redis(_) => Category::Processing,
            CacheError::Decode(_) => Category::System,
        }
    }
    fn status_code(&self) -> u16 {
        match self {
            CacheError::Redis(_) => 503,
            CacheError::Decode(_) => 500,
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            CacheError::Redis(e) => redis_is_transient(e),
            CacheError::Decode(_) => false,
        }
    }
}

/// Whether a Redis failure may pass: the connection, a timeout, a server still loading.
fn redis_is_transient(e: &redis::RedisError) -> bool {
    use redis::ServerErrorKind as S;
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        // A Redis Cluster in the middle of a failover or a slot move (what redis-rs's own
        // retries did not outlast); `EXECABORT` is how a transaction meets a moved slot.
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                S::BusyLoading
                    | S::Moved
                    | S::Ask
                    | S::TryAgain
                    | S::ClusterDown
                    | S::MasterDown
                    | S::ReadOnly
                    | S::ExecAbort
            )
        )
}

/// A failure of the Redis Streams machinery (reading, queues, finishing, retention): not a
/// cache error, since the message itself cannot move on without Redis.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// A script answered in a shape it never produces: a bug or a foreign script of that name.
    #[error("unexpected reply from redis: {0}")]
    UnexpectedReply(String),
}

impl StreamError {
    /// The consumer group (or its stream) does not exist (someone destroyed it).
    pub fn is_no_group(&self) -> bool {
        matches!(self, StreamError::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

impl Classify for StreamError {
    fn code(&self) -> &'static str {
        match self {
            StreamError::Redis(e) if redis_is_transient(e) => "redis.unavailable",
            StreamError::Redis(_) => "redis.error",
            StreamError::UnexpectedReply(_) => "redis.unexpected_reply",
        }
    }
    fn category(&self) -> Category {
        match self {
            StreamError::Redis(_) => Category::Processing,
            StreamError::UnexpectedReply(_) => Category::System,
        }
    }
    fn status_code(&self) -> u16 {
        match self {
            StreamError::Redis(_) => 503,
            StreamError::UnexpectedReply(_) => 500,
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            // NOGROUP heals when the group is created again; OOM and the like when an operator
            // acts. The worker keeps trying either way, so every Redis error counts as passing.
            StreamError::Redis(_) => true,
            StreamError::UnexpectedReply(_) => false,
        }
    }
}

/// A template that does not compile or render.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TemplateError {
    #[error("template `{name}` does not compile: {detail}")]
    Compile { name: String, detail: String },
    #[error("template `{name}` failed to render: {detail}")]
    Render { name: String, detail: String },
    #[error("template `{name}` is invalid: {detail}")]
    Invalid { name: String, detail: String },
}

impl Classify for TemplateError {
    fn code(&self) -> &'static str {
        match self {
            TemplateError::Compile { .. } => "template.syntax",
            TemplateError::Render { .. } => "template.render",
            TemplateError::Invalid { .. } => "template.invalid",
        }
    }
    fn category(&self) -> Category {
        match self {
            TemplateError::Compile { .. } | TemplateError::Invalid { .. } => Category::Validation,
            TemplateError::Render { .. } => Category::Processing,
        }
    }
    fn status_code(&self) -> u16 {
        500
    }
    fn is_retryable(&self) -> bool {
        match self {
            TemplateError::Compile { .. }
            | TemplateError::Render { .. }
            | TemplateError::Invalid { .. } => false,
        }
    }
    fn user_message(&self) -> String {
        "Sorry, this assistant is misconfigured right now. Please try again later.".to_owned()
    }
}

/// Everything that can end the processing of one message.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("the business definition is inconsistent: {0}")]
    Definition(String),
    #[error("processing panicked: {0}")]
    Panicked(String),
    #[error("processed {0} times without success")]
    TooManyDeliveries(u64),
    #[error("processing took longer than the message deadline ({0} ms)")]
    DeadlineExceeded(u64),
}

impl PipelineError {
    fn inner(&self) -> Option<&dyn Classify> {
        match self {
            PipelineError::Validation(e) => Some(e),
            PipelineError::Llm(e) => Some(e),
            PipelineError::Store(e) => Some(e),
            PipelineError::Cache(e) => Some(e),
            PipelineError::Template(e) => Some(e),
            PipelineError::Definition(_)
            | PipelineError::Panicked(_)
            | PipelineError::TooManyDeliveries(_)
            | PipelineError::DeadlineExceeded(_) => None,
        }
    }
}

impl Classify for PipelineError {
    fn code(&self) -> &'static str {
        match self {
            PipelineError::Panicked(_) => "internal.panic",
            PipelineError::TooManyDeliveries(_) => "stream.max_deliveries",
            PipelineError::DeadlineExceeded(_) => "worker.deadline_exceeded",
            PipelineError::Definition(_) => "config.definition",
            PipelineError::Validation(_)
            | PipelineError::Llm(_)
            | PipelineError::Store(_)
            | PipelineError::Cache(_)
            | PipelineError::Template(_) => self.inner().map_or("config.definition", |e| e.code()),
        }
    }
    fn category(&self) -> Category {
        self.inner().map_or(Category::System, |e| e.category())
    }
    fn status_code(&self) -> u16 {
        if let PipelineError::DeadlineExceeded(_) = self {
            return 504;
        }
        self.inner().map_or(500, |e| e.status_code())
    }
    fn is_retryable(&self) -> bool {
        match self {
            // A panic may be a passing condition; redelivery decides (up to max_deliveries).
            PipelineError::Panicked(_) => true,
            // What it waited on (a lock, a slow dependency) may be gone on the next attempt.
            PipelineError::DeadlineExceeded(_) => true,
            PipelineError::TooManyDeliveries(_) | PipelineError::Definition(_) => false,
            PipelineError::Validation(_)
            | PipelineError::Llm(_)
            | PipelineError::Store(_)
            | PipelineError::Cache(_)
            | PipelineError::Template(_) => self.inner().is_some_and(|e| e.is_retryable()),
        }
    }
    fn user_message(&self) -> String {
        match self.inner() {
            Some(e) => e.user_message(),
            None => "Sorry, this assistant is misconfigured right now. Please try again later."
                .to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_citus_node_s_broken_connection_is_transient_and_its_own_internal_error_is_not() {
        let relayed = Some("while executing command on 127.0.0.1:25441");
        assert!(relayed_connection_failure("XX000", relayed));
        assert!(!relayed_connection_failure("XX000", None));
        assert!(!relayed_connection_failure(
            "XX000",
            Some("PL/pgSQL function f() line 3 at RAISE")
        ));
        assert!(!relayed_connection_failure("23505", relayed));
    }

    #[test]
    fn a_transaction_a_citus_node_could_not_finish_is_transient() {
        for message in [
            "could not commit transaction for shard 102035 on at least one active node",
            "failed to prepare transaction 'citus_0_1_2_3' on host 127.0.0.1:25441",
            "failure on connection marked as essential: 127.0.0.1:25441",
        ] {
            assert!(node_transaction_failure("XX000", message), "{message}");
            assert!(!node_transaction_failure("23505", message), "{message}");
        }
        assert!(!node_transaction_failure(
            "XX000",
            "could not open relation"
        ));
    }

    #[test]
    fn a_cluster_in_failover_is_transient() {
        use redis::{ErrorKind, ServerErrorKind as S};
        let error = |kind| redis::RedisError::from((ErrorKind::Server(kind), "failover"));
        for kind in [
            S::ClusterDown,
            S::MasterDown,
            S::TryAgain,
            S::Moved,
            S::ExecAbort,
        ] {
            assert!(CacheError::Redis(error(kind)).is_retryable(), "{kind:?}");
            assert_eq!(StreamError::Redis(error(kind)).code(), "redis.unavailable");
        }
        assert!(!CacheError::Redis(error(S::NoPerm)).is_retryable());
        assert_eq!(StreamError::Redis(error(S::NoPerm)).code(), "redis.error");
    }

    #[test]
    fn validation_errors_are_never_retryable_and_carry_client_statuses() {
        let all = [
            ValidationError::MissingField("content"),
            ValidationError::EmptyContent,
            ValidationError::ContentTooLarge { size: 9, limit: 8 },
            ValidationError::UnknownBusiness,
        ];
        for e in all {
            assert!(!e.is_retryable(), "{e}");
            assert!(e.code().starts_with("validation."));
            assert!((400..500).contains(&e.status_code()));
            assert_eq!(e.user_message(), e.to_string());
        }
    }

    #[test]
    fn llm_errors_retry_transient_faults_only() {
        assert!(LlmError::Timeout(10).is_retryable());
        assert!(
            LlmError::RateLimited {
                retry_after_ms: Some(1)
            }
            .is_retryable()
        );
        assert!(
            LlmError::Server {
                status: 500,
                body: String::new()
            }
            .is_retryable()
        );
        assert!(
            !LlmError::Rejected {
                status: 400,
                body: String::new()
            }
            .is_retryable()
        );
        assert_eq!(LlmError::Timeout(1).status_code(), 504);
        assert_eq!(
            LlmError::RateLimited {
                retry_after_ms: None
            }
            .status_code(),
            429
        );
    }

    #[test]
    fn pipeline_error_takes_its_code_from_the_layer() {
        let e = PipelineError::from(ValidationError::EmptyContent);
        assert_eq!(e.code(), "validation.empty_content");
        assert_eq!(e.status_code(), 400);
        let e = PipelineError::from(StoreError::VersionConflict);
        assert!(e.is_retryable());
        assert!(!e.user_message().contains("conversation changed"));
    }
}
