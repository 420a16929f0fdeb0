//! Typed configuration (DESIGN §11): `config/default.toml`, an optional profile file, then
//! `ICMP__SECTION__KEY` environment variables. Unknown keys are rejected; secrets (the database
//! password, the LLM API key) are accepted from the environment only and never printed.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;

/// Keys that hold secrets: they may come from the environment only.
const SECRET_KEYS: [&str; 2] = ["database.password", "llm.api_key"];

/// Keys that hold URLs: a URL with a secret in it may come from the environment only.
const URL_KEYS: [&str; 5] = [
    "database.url",
    "redis.url",
    "redis.urls",
    "llm.base_url",
    "telemetry.otlp_endpoint",
];

/// Every key with its default, compiled in.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// Where `--config` points unless told otherwise.
pub const DEFAULT_PATH: &str = "config/default.toml";

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration is invalid: {0}")]
    Invalid(String),
    #[error("`{0}` is a secret and may only be set from the environment ({1})")]
    SecretInFile(&'static str, String),
    #[error(
        "`{0}` carries a secret (a password or key in the URL) and may only be set from the environment ({1})"
    )]
    SecretInUrl(&'static str, String),
}

impl crate::error::Classify for ConfigError {
    fn code(&self) -> &'static str {
        match self {
            ConfigError::Invalid(_) => "config.invalid",
            ConfigError::SecretInFile(..) | ConfigError::SecretInUrl(..) => "config.secret_in_file",
        }
    }
    fn category(&self) -> crate::error::Category {
        crate::error::Category::System
    }
    fn status_code(&self) -> u16 {
        500
    }
    fn is_retryable(&self) -> bool {
        match self {
            ConfigError::Invalid(_)
            | ConfigError::SecretInFile(..)
            | ConfigError::SecretInUrl(..) => false,
        }
    }
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        // figment's Display names the key and where its value came from.
        let all: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
        ConfigError::Invalid(all.join("; "))
    }
}

/// The whole configuration, one section per concern.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub llm: LlmConfig,
    pub streams: StreamsConfig,
    pub worker: WorkerConfig,
    pub limits: LimitsConfig,
    pub cache: CacheConfig,
    pub retry: RetryConfig,
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub actions: ActionsConfig,
    #[serde(default)]
    pub handoff: HandoffConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// `[retention]`: the sweep that applies each business's `[business.retention]`
/// (`crate::personal_data::retention`), run by every worker process.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// How often a worker sweeps (0: never).
    pub sweep_interval_ms: u64,
    /// Rows per transaction: each batch holds its locks that briefly.
    pub batch_rows: i64,
    /// The pause between two batches, so that a sweep never takes the database for itself.
    pub pause_ms: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            sweep_interval_ms: 600_000,
            batch_rows: 500,
            pause_ms: 200,
        }
    }
}

/// `[handoff]`: the agents' streams and the desk (`crate::handoff`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HandoffConfig {
    /// Where user messages of conversations with a person are passed (one entry each).
    pub agents: String,
    /// Approximate MAXLEN of the agents' stream.
    pub agents_maxlen: usize,
    /// Where agents answer.
    pub agent_replies: String,
    /// The desks' consumer group on `agent_replies`.
    pub group: String,
    /// How often the desk holding the lease reads agents' answers and looks for timeouts.
    pub poll_ms: u64,
    /// How long the lease outlives its last renewal (another process's desk takes over then).
    pub lease_ms: u64,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            agents: "icmp:agents".into(),
            agents_maxlen: 100_000,
            agent_replies: "icmp:agent_replies".into(),
            group: "icmp-desk".into(),
            poll_ms: 250,
            lease_ms: 10_000,
        }
    }
}

/// `[actions]`: the dispatcher of stage actions (`crate::actions::dispatcher`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActionsConfig {
    /// How often due rows are looked for (besides right after a commit that wrote some).
    pub poll_ms: u64,
    /// Requests in flight at once, per process.
    pub concurrency: usize,
    /// The wait before the second attempt; it doubles with each attempt, up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// How long a claim keeps other dispatchers off a request: longer than any action's
    /// `timeout_ms` (at most 60 s), so that a request is sent again only when the process that
    /// claimed it is gone.
    pub claim_hold_ms: u64,
}

impl Default for ActionsConfig {
    fn default() -> Self {
        ActionsConfig {
            poll_ms: 1_000,
            concurrency: 16,
            retry_initial_ms: 1_000,
            retry_max_ms: 300_000,
            claim_hold_ms: 65_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL URL (`postgres://user@host:port/db`); a password belongs in `password`.
    pub url: RedactedUrl,
    /// From `ICMP__DATABASE__PASSWORD` only.
    #[serde(default)]
    pub password: Option<SecretString>,
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    pub pool_wait_timeout_ms: u64,
    /// PEM file of the certificate authorities a TLS server certificate is checked against
    /// (empty: the system's roots). TLS itself follows `sslmode` in the URL (see `tls`).
    #[serde(default)]
    pub ca_file: String,
    /// The role workers switch to after connecting, so that row-level security applies to them
    /// (`icmp migrate` creates `icmp_worker` and grants it to its user). Empty: workers run as
    /// the connecting user, which, as the tables' owner, row-level security does not restrict.
    #[serde(default)]
    pub worker_role: String,
    /// Worker sessions: PostgreSQL's `lock_timeout` (0: none).
    #[serde(default)]
    pub lock_timeout_ms: u64,
    /// Worker sessions: `statement_timeout` and `idle_in_transaction_session_timeout` (0: none).
    #[serde(default)]
    pub statement_timeout_ms: u64,
    /// Worker sessions on Citus: what a statement that spans several shards does
    /// (`citus.multi_task_query_log_level`): every statement of a message is meant to run on the
    /// one shard of its business. `off`, a log level (`warning`: logged by the coordinator),
    /// or `error`: refused (the test suite's setting). Ignored by plain PostgreSQL.
    #[serde(default = "default_multi_shard")]
    pub multi_shard: String,
}

fn default_multi_shard() -> String {
    "warning".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// One server, or a Redis Cluster whose seed node `url` is.
    #[serde(default)]
    pub mode: RedisMode,
    pub url: RedactedUrl,
    /// More seed nodes of a Redis Cluster besides `url` (any reachable one serves to learn the
    /// topology, and to subscribe to wake-ups while `url` is down).
    #[serde(default)]
    pub urls: Vec<RedactedUrl>,
    /// Prefix of every cache and queue key; lets several deployments (or tests) share a server.
    pub key_prefix: String,
    pub response_timeout_ms: u64,
    /// PEM file of the certificate authorities a `rediss://` server is checked against (empty:
    /// the system's roots).
    #[serde(default)]
    pub ca_file: String,
}

/// How icmp talks to Redis (see [`crate::redis_connection`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server (with replicas or not).
    #[default]
    Standalone,
    /// A Redis Cluster: `redis.url` is a seed node; the rest is learnt from it.
    Cluster,
}

impl RedisConfig {
    /// Every seed node: `url`, then `urls`.
    pub fn seeds(&self) -> Vec<&str> {
        std::iter::once(self.url.expose())
            .chain(self.urls.iter().map(RedactedUrl::expose))
            .collect()
    }
}

impl RedisMode {
    /// The name in configuration (`standalone`, `cluster`).
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// `http://host:port/v1`; the client appends `/chat/completions`.
    pub base_url: String,
    /// From `ICMP__LLM__API_KEY` only.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    pub default_model: String,
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// The largest response body read from the endpoint; a larger one is an error
    /// (`llm.response_too_large`) and the message degrades as for any failed call.
    pub max_response_bytes: usize,
    /// Calls to the endpoint at once from one process (each HTTP/1.1 call holds a connection
    /// and its buffers); further calls wait for one to end. 0: no limit.
    #[serde(default)]
    pub max_concurrent_calls: usize,
    /// The HTTP version to the endpoint: `auto` (HTTP/2 where the endpoint speaks it), `1.1`
    /// or `2` (see [`crate::llm::transport`]).
    #[serde(default)]
    pub http_version: crate::llm::transport::HttpVersion,
    /// Calls the circuit breaker judges the endpoint by (0 disables the breaker).
    pub circuit_window: usize,
    /// Share of failed calls in the window that opens the circuit.
    pub circuit_failure_ratio: f64,
    /// How long an open circuit refuses calls before one probe is let through.
    pub circuit_open_ms: u64,
    /// How JSON is asked for at first (see [`crate::llm::structured`]): `auto` (the strongest
    /// form, stepping down when refused), `json_schema`, `json_object_schema`, `json_object` or
    /// `prompt`.
    #[serde(default)]
    pub structured_output: crate::llm::structured::Level,
    /// A PEM file of CA certificates an `https://` endpoint may be signed by, besides the
    /// system's; empty: the system's only.
    #[serde(default)]
    pub ca_file: String,
    /// The most tokens the history may take in a prompt whose template sets no
    /// `context_tokens` (0: no bound but `worker.history_turns`).
    #[serde(default = "default_context_tokens")]
    pub context_tokens: usize,
    /// The least time between two `partial` entries of a streamed reply.
    #[serde(default = "default_partial_interval_ms")]
    pub partial_interval_ms: u64,
    /// The most time one entry of a template's model chain takes (retries included) before
    /// the call moves to the next entry; 0: the LLM retry policy's budget.
    #[serde(default)]
    pub fallback_after_ms: u64,
    /// Several endpoints (`[[llm.endpoints]]`); empty: the one described by this table,
    /// named `default`.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
}

/// One endpoint of `[[llm.endpoints]]`; what it leaves out is taken from `[llm]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Its name in call records, replies and metrics.
    pub name: String,
    pub base_url: String,
    /// The environment variable holding its API key (keys never sit in files).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The models it serves; a template's model goes to every endpoint that lists it, in this
    /// order. Empty: any model no endpoint lists.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub http_version: Option<crate::llm::transport::HttpVersion>,
    #[serde(default)]
    pub max_concurrent_calls: Option<usize>,
    #[serde(default)]
    pub request_timeout_ms: Option<u64>,
    #[serde(default)]
    pub structured_output: Option<crate::llm::structured::Level>,
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_context_tokens() -> usize {
    2048
}

fn default_partial_interval_ms() -> u64 {
    200
}

impl LlmConfig {
    /// Each endpoint's name, served models and complete configuration: `[llm]` itself as
    /// `default` when no `[[llm.endpoints]]` are given.
    ///
    /// # Errors
    /// A nameless or repeated endpoint, a key in a URL, or an `api_key_env` that is not set.
    pub fn endpoint_configs(&self) -> Result<Vec<(String, Vec<String>, LlmConfig)>, ConfigError> {
        if self.endpoints.is_empty() {
            return Ok(vec![(
                crate::llm::endpoints::DEFAULT_NAME.to_owned(),
                Vec::new(),
                self.clone(),
            )]);
        }
        let mut out: Vec<(String, Vec<String>, LlmConfig)> = Vec::new();
        for e in &self.endpoints {
            let invalid = |what: String| ConfigError::Invalid(format!("llm.endpoints: {what}"));
            if e.name.trim().is_empty() {
                return Err(invalid("every endpoint needs a name".into()));
            }
            if out.iter().any(|(n, ..)| *n == e.name) {
                return Err(invalid(format!("two endpoints are named {:?}", e.name)));
            }
            if RedactedUrl::new(e.base_url.clone()).has_secret() {
                return Err(invalid(format!(
                    "{}: base_url carries a secret; name its variable in api_key_env",
                    e.name
                )));
            }
            let api_key = match &e.api_key_env {
                Some(var) => Some(SecretString::from(std::env::var(var).map_err(|_| {
                    invalid(format!(
                        "{}: the variable {var} (api_key_env) is not set",
                        e.name
                    ))
                })?)),
                None => None,
            };
            let mut c = self.clone();
            c.endpoints = Vec::new();
            c.base_url = e.base_url.clone();
            c.api_key = api_key;
            c.http_version = e.http_version.unwrap_or(self.http_version);
            c.max_concurrent_calls = e.max_concurrent_calls.unwrap_or(self.max_concurrent_calls);
            c.request_timeout_ms = e.request_timeout_ms.unwrap_or(self.request_timeout_ms);
            c.structured_output = e.structured_output.unwrap_or(self.structured_output);
            c.ca_file = e.ca_file.clone().unwrap_or_else(|| self.ca_file.clone());
            out.push((e.name.clone(), e.models.clone(), c));
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    pub inbound: String,
    pub outbound: String,
    pub dead_letter: String,
    pub group: String,
    /// Consumer name in the group; empty means `<host>-<pid>`.
    pub consumer: String,
    pub reply_prefix: String,
    pub read_count: usize,
    pub block_ms: u64,
    pub claim_idle_ms: u64,
    pub max_deliveries: u64,
    pub outbound_maxlen: usize,
    /// Approximate MAXLEN of the dead-letter stream.
    pub dead_letter_maxlen: usize,
    /// Acknowledged inbound entries are kept at least this long, then trimmed (entries
    /// pending or not yet delivered to any group are never trimmed).
    pub inbound_retain_ms: u64,
    /// Consumers idle this long with nothing pending are removed from the group.
    pub consumer_idle_ms: u64,
    /// How often a worker trims the inbound stream and prunes idle consumers.
    pub retention_interval_ms: u64,
    /// Before the next message of a user is woken, wait until this many replicas hold the
    /// finish that answered the previous one (`WAIT`); 0: do not wait.
    #[serde(default)]
    pub wait_replicas: u32,
    /// Before the next message of a user is woken, wait until the finish is fsynced to the
    /// local AOF (`WAITAOF`, Redis 7.2 or later: a worker refuses to start without it).
    #[serde(default)]
    pub wait_aof: bool,
    /// The longest either wait takes; past it the next message is woken anyway (counted as
    /// `durability_shortfall`).
    #[serde(default = "default_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
    /// Inbound shards, each a stream of its own with its own hash tag (docs/protocol.md,
    /// "Shards"); 1: one stream, named as configured.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// The shards this process reads; empty: every shard.
    #[serde(default)]
    pub read_shards: Vec<u32>,
    /// While moving from another shard count to `shards`: that count (0: no move under way).
    /// Workers then drain the previous layout before they read the new one
    /// ([`crate::stream::resharding`], `icmp reshard`).
    #[serde(default)]
    pub previous_shards: u32,
    /// The shard these names are of (set by [`StreamsConfig::shard`]); `None`: the layout as
    /// configured.
    #[serde(skip)]
    pub shard: Option<u32>,
    /// The names as configured (inbound, outbound, dead letter, reply prefix), which every
    /// shard's names derive from; `None` until [`StreamsConfig::shard`] derived them.
    #[serde(skip)]
    pub configured_names: Option<Box<[String; 4]>>,
}

fn default_shards() -> u32 {
    1
}

fn default_wait_timeout_ms() -> u64 {
    500
}

impl StreamsConfig {
    /// The consumer name this process uses.
    pub fn consumer_name(&self) -> String {
        if self.consumer.is_empty() {
            let host = gethostname::gethostname().to_string_lossy().into_owned();
            format!("{host}-{}", std::process::id())
        } else {
            self.consumer.clone()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Messages processed at once (pipeline running: reads, LLM calls, the write).
    pub concurrency: usize,
    /// Entries one worker may hold at once, most of them waiting for their turn behind an
    /// earlier message of the same user (a waiting entry costs its id, not its fields).
    pub max_held: usize,
    /// Safety net for lost wake-ups: how often waiting queues are checked anyway.
    pub queue_poll_ms: u64,
    pub shutdown_grace_ms: u64,
    pub max_conflict_retries: u32,
    pub history_turns: usize,
    pub last_resort_reply: String,
    /// Sent to a message over its business's budget when the business has no throttled
    /// template.
    pub throttled_reply: String,
    /// Messages of one business this worker processes at once, unless its definition sets
    /// `budget.max_in_flight` (0: no cap). Ready messages of different businesses take the
    /// free slots in turn whatever the cap.
    pub max_in_flight_per_business: usize,
    /// One message's processing is given up after this long (retried by redelivery, then
    /// dead-lettered); 0: no deadline.
    pub message_deadline_ms: u64,
    /// Write sets committed in one transaction at most (1: each message alone).
    pub commit_batch_max: usize,
    /// With other batches committing, how long a batch that is not full waits for more.
    pub commit_batch_wait_us: u64,
    /// Batches committing at once.
    pub commit_batches_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_content_bytes: usize,
    pub max_metadata_bytes: usize,
    pub max_message_id_chars: usize,
    pub max_user_id_chars: usize,
    /// All field names and values of one inbound entry together.
    pub max_entry_bytes: usize,
    /// Fields one extraction answer may set, and the size of each value (its JSON text).
    pub max_extracted_fields: usize,
    pub max_extracted_value_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub definition_ttl_secs: u64,
    pub conversation_ttl_secs: u64,
}

/// Exponential backoff with jitter for transient faults (see `retry`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    pub initial_interval_ms: u64,
    pub multiplier: f64,
    pub randomization_factor: f64,
    pub max_interval_ms: u64,
    pub max_elapsed_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Address of the /metrics, /healthz, /readyz endpoint; empty disables it.
    pub listen: String,
    pub log_format: LogFormat,
    pub log_filter: String,
    /// Where spans go over OTLP (`http://collector:4317` for gRPC, `http://collector:4318` for
    /// HTTP); empty: no export, and no OpenTelemetry layer at all. Headers (an API key) come
    /// from `OTEL_EXPORTER_OTLP_HEADERS` in the environment.
    #[serde(default)]
    pub otlp_endpoint: String,
    #[serde(default)]
    pub otlp_protocol: OtlpProtocol,
    /// Share of the traces this process starts that are kept (a producer's sampled flag is
    /// followed); 0.0–1.0.
    #[serde(default = "one")]
    pub sampling_ratio: f64,
    /// Whether spans carry message content and LLM prompts and outputs (personal data).
    #[serde(default)]
    pub capture_content: bool,
    /// The `service.name` resource attribute of exported spans.
    #[serde(default = "service_name")]
    pub service_name: String,
}

fn one() -> f64 {
    1.0
}

fn service_name() -> String {
    "icmp".to_owned()
}

/// How spans travel to `telemetry.otlp_endpoint`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (port 4317 by convention).
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318 by convention), posted to `/v1/traces`.
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// A URL whose `Debug` hides any password it carries.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct RedactedUrl(String);

impl RedactedUrl {
    pub fn new(url: impl Into<String>) -> Self {
        RedactedUrl(url.into())
    }
    /// The URL itself; do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with every secret replaced by `***`: the password of its user info, and the
    /// value of any query parameter (or key=value pair of a libpq DSN) whose name says secret.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// Whether the URL carries a secret (see [`RedactedUrl::redacted`]).
    pub fn has_secret(&self) -> bool {
        redact_url(&self.0) != self.0
    }
}

/// Query parameter or DSN key names whose values are secrets.
fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "key"
        || n == "pass"
        || [
            "password",
            "passwd",
            "pwd",
            "secret",
            "token",
            "apikey",
            "api_key",
            "api-key",
            "access_key",
            "auth",
            "credential",
        ]
        .iter()
        .any(|s| n.contains(s))
}

fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.has_host() || u.password().is_some() => {
            let mut changed = false;
            if u.password().is_some() && u.set_password(Some("***")).is_ok() {
                changed = true;
            }
            let pairs: Vec<(String, String)> = u.query_pairs().into_owned().collect();
            if pairs.iter().any(|(k, _)| is_secret_name(k)) {
                let redacted: Vec<(String, String)> = pairs
                    .into_iter()
                    .map(|(k, v)| {
                        let v = if is_secret_name(&k) { "***".into() } else { v };
                        (k, v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(redacted);
                changed = true;
            }
            if changed { u.to_string() } else { s.to_owned() }
        }
        // A libpq key=value DSN (`host=db password=…`), or no URL at all.
        _ => redact_dsn(s),
    }
}

/// Replaces the values of secret keys in a libpq `key=value` connection string, read as
/// tokio-postgres (which connects with it) reads it: any Unicode whitespace separates, spaces
/// may surround `=`, and a value is either single-quoted (where `\` escapes the next character)
/// or runs to the next unescaped whitespace. Text that is not such a string is returned as it
/// is, except that anything after a secret key is hidden.
fn redact_dsn(s: &str) -> String {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let at = |k: usize| chars.get(k).map_or(s.len(), |&(i, _)| i);
    let is_ws = |k: usize| chars.get(k).is_some_and(|&(_, c)| c.is_whitespace());
    let is = |k: usize, want: char| chars.get(k).is_some_and(|&(_, c)| c == want);
    let mut out = String::with_capacity(s.len());
    let mut k = 0;
    while k < chars.len() {
        // Whitespace between parameters.
        let start = k;
        while is_ws(k) {
            k += 1;
        }
        out.push_str(&s[at(start)..at(k)]);
        if k == chars.len() {
            break;
        }
        // The key, up to `=` or whitespace.
        let key_start = k;
        while k < chars.len() && !is_ws(k) && !is(k, '=') {
            k += 1;
        }
        let key = &s[at(key_start)..at(k)];
        let mut j = k;
        while is_ws(j) {
            j += 1;
        }
        if !is(j, '=') {
            // A bare word: not a key=value pair.
            out.push_str(key);
            continue;
        }
        j += 1;
        while is_ws(j) {
            j += 1;
        }
        // The value: quoted, or up to the next unescaped whitespace.
        if is(j, '\'') {
            j += 1;
            while j < chars.len() && !is(j, '\'') {
                j += if is(j, '\\') { 2 } else { 1 };
            }
            j += 1;
        } else {
            while j < chars.len() && !is_ws(j) {
                j += if is(j, '\\') { 2 } else { 1 };
            }
        }
        let j = j.min(chars.len());
        if is_secret_name(key) {
            out.push_str(key);
            out.push_str("=***");
        } else {
            out.push_str(&s[at(key_start)..at(j)]);
        }
        k = j;
    }
    out
}

impl std::fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Config {
    /// The `ICMP__…` variables that point a child `icmp` process at this configuration's
    /// services, key prefix, streams (the agents' too) and LLM endpoint (the rest it takes from
    /// its own files).
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        let s = &self.streams;
        let mut env = vec![
            ("ICMP__DATABASE__URL", self.database.url.expose().to_owned()),
            ("ICMP__REDIS__MODE", self.redis.mode.as_str().to_owned()),
            ("ICMP__REDIS__URL", self.redis.url.expose().to_owned()),
            ("ICMP__REDIS__KEY_PREFIX", self.redis.key_prefix.clone()),
            ("ICMP__LLM__BASE_URL", self.llm.base_url.clone()),
            (
                "ICMP__LLM__HTTP_VERSION",
                self.llm.http_version.as_str().to_owned(),
            ),
            ("ICMP__STREAMS__INBOUND", s.inbound.clone()),
            ("ICMP__STREAMS__OUTBOUND", s.outbound.clone()),
            ("ICMP__STREAMS__DEAD_LETTER", s.dead_letter.clone()),
            ("ICMP__STREAMS__GROUP", s.group.clone()),
            ("ICMP__STREAMS__REPLY_PREFIX", s.reply_prefix.clone()),
            ("ICMP__STREAMS__SHARDS", s.shards.to_string()),
            (
                "ICMP__STREAMS__PREVIOUS_SHARDS",
                s.previous_shards.to_string(),
            ),
            ("ICMP__HANDOFF__AGENTS", self.handoff.agents.clone()),
            (
                "ICMP__HANDOFF__AGENT_REPLIES",
                self.handoff.agent_replies.clone(),
            ),
            ("ICMP__HANDOFF__GROUP", self.handoff.group.clone()),
            (
                "ICMP__TELEMETRY__OTLP_ENDPOINT",
                self.telemetry.otlp_endpoint.clone(),
            ),
            (
                "ICMP__TELEMETRY__OTLP_PROTOCOL",
                match self.telemetry.otlp_protocol {
                    OtlpProtocol::Grpc => "grpc",
                    OtlpProtocol::Http => "http",
                }
                .to_owned(),
            ),
        ];
        if !self.redis.urls.is_empty() {
            let quoted: Vec<String> = self
                .redis
                .urls
                .iter()
                .map(|u| format!("{:?}", u.expose()))
                .collect();
            env.push(("ICMP__REDIS__URLS", format!("[{}]", quoted.join(", "))));
        }
        env
    }
}

impl Config {
    /// Loads the defaults compiled into the binary (`config/default.toml` as built), then
    /// `path`, then `<profile>.toml` next to it when a profile is given (or `ICMP_PROFILE` is
    /// set), then the `ICMP__` environment. `path` may be missing when it is the default path,
    /// so the binary runs with no configuration file and only `ICMP__…` variables.
    pub fn load(path: &Path, profile: Option<&str>) -> Result<Config, ConfigError> {
        let profile = profile
            .map(str::to_owned)
            .or_else(|| std::env::var("ICMP_PROFILE").ok().filter(|p| !p.is_empty()));
        let mut files = Figment::new().merge(Toml::string(DEFAULTS));
        if path.exists() || path != Path::new(DEFAULT_PATH) {
            files = files.merge(Toml::file_exact(path));
        }
        if let Some(profile) = profile {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            files = files.merge(Toml::file_exact(dir.join(format!("{profile}.toml"))));
        }
        Self::from_layers(files, Env::prefixed("ICMP__").split("__"))
    }

    /// Builds the configuration from file layers plus an environment layer, enforcing that
    /// secrets come from the environment layer only.
    pub fn from_layers(files: Figment, env: Env) -> Result<Config, ConfigError> {
        for key in URL_KEYS {
            let in_file = files.find_value(key).ok().is_some_and(|v| {
                // A URL, or a list of them (`redis.urls`).
                let urls = match v.clone().into_array() {
                    Some(items) => items.into_iter().filter_map(|i| i.into_string()).collect(),
                    None => v.into_string().into_iter().collect::<Vec<_>>(),
                };
                urls.into_iter()
                    .any(|url| RedactedUrl::new(url).has_secret())
            });
            if in_file {
                let source = files
                    .find_metadata(key)
                    .map(|m| m.name.to_string())
                    .unwrap_or_default();
                return Err(ConfigError::SecretInUrl(key, source));
            }
        }
        for key in SECRET_KEYS {
            if files.find_value(key).is_ok() {
                let source = files
                    .find_metadata(key)
                    .map(|m| m.name.to_string())
                    .unwrap_or_default();
                return Err(ConfigError::SecretInFile(key, source));
            }
        }
        let config: Config = files.merge(env).extract()?;
        config
            .streams
            .check_layout()
            .map_err(ConfigError::Invalid)?;
        let ratio = config.telemetry.sampling_ratio;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(ConfigError::Invalid(format!(
                "telemetry.sampling_ratio is {ratio}; it must be between 0.0 and 1.0"
            )));
        }
        Ok(config)
    }
}

#[cfg(test)]
#[expect(clippy::result_large_err, reason = "figment::Jail's closure signature")]
mod tests {
    use super::*;
    use figment::Jail;
    use secrecy::ExposeSecret;

    const DEFAULT: &str = include_str!("../config/default.toml");

    fn load_in(jail: &mut Jail, profile: Option<&str>) -> Result<Config, ConfigError> {
        jail.create_file("default.toml", DEFAULT).expect("write");
        Config::load(Path::new("default.toml"), profile)
    }

    #[test]
    fn the_compiled_in_defaults_serve_when_there_is_no_file() {
        Jail::expect_with(|jail| {
            jail.set_env("ICMP__WORKER__CONCURRENCY", "7");
            let c = Config::load(Path::new(DEFAULT_PATH), None).expect("defaults");
            assert_eq!(c.worker.concurrency, 7);
            assert_eq!(c.streams.inbound, "icmp:inbound");
            assert!(
                Config::load(Path::new("elsewhere.toml"), None).is_err(),
                "a file named explicitly must exist"
            );
            Ok(())
        });
    }

    #[test]
    fn the_llm_http_version_reads_from_the_environment_as_a_child_process_gets_it() {
        use crate::llm::transport::HttpVersion;
        for version in [HttpVersion::Auto, HttpVersion::Http1, HttpVersion::Http2] {
            Jail::expect_with(|jail| {
                let mut config = Config::load(Path::new(DEFAULT_PATH), None).expect("defaults");
                assert_eq!(config.llm.http_version, HttpVersion::Auto, "the default");
                config.llm.http_version = version;
                for (key, value) in config.child_env() {
                    jail.set_env(key, value);
                }
                let child = Config::load(Path::new(DEFAULT_PATH), None).expect("child");
                assert_eq!(child.llm.http_version, version);
                Ok(())
            });
        }
    }

    #[test]
    fn environment_overrides_file_and_profile() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "ci.toml",
                "[worker]\nconcurrency = 7\n[streams]\ngroup = \"g1\"",
            )?;
            jail.set_env("ICMP__STREAMS__GROUP", "from-env");
            let c = load_in(jail, Some("ci")).expect("config");
            assert_eq!(c.worker.concurrency, 7);
            assert_eq!(c.streams.group, "from-env");
            assert_eq!(c.streams.inbound, "icmp:inbound");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        Jail::expect_with(|jail| {
            jail.set_env("ICMP__WORKER__CONCURENCY", "3");
            let err = load_in(jail, None).expect_err("must fail").to_string();
            assert!(err.contains("concurency"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secrets_come_from_the_environment_and_never_print() {
        Jail::expect_with(|jail| {
            jail.set_env("ICMP__LLM__API_KEY", "sk-very-secret");
            jail.set_env("ICMP__DATABASE__PASSWORD", "hunter2");
            jail.set_env("ICMP__REDIS__URL", "redis://:redispass@127.0.0.1:1/");
            let c = load_in(jail, None).expect("config");
            let key = c.llm.api_key.as_ref().expect("key");
            assert_eq!(key.expose_secret(), "sk-very-secret");
            let debug = format!("{c:?}");
            for secret in ["sk-very-secret", "hunter2", "redispass"] {
                assert!(!debug.contains(secret), "{secret} leaked in {debug}");
            }
            Ok(())
        });
    }

    #[test]
    fn more_seed_nodes_come_from_a_list_and_reach_child_processes() {
        Jail::expect_with(|jail| {
            jail.set_env(
                "ICMP__REDIS__URLS",
                r#"["redis://127.0.0.1:7102/", "redis://127.0.0.1:7103/"]"#,
            );
            let c = load_in(jail, None).expect("config");
            assert_eq!(
                c.redis.seeds(),
                [
                    "redis://127.0.0.1:63799/",
                    "redis://127.0.0.1:7102/",
                    "redis://127.0.0.1:7103/"
                ]
            );
            let (_, passed) = c
                .child_env()
                .into_iter()
                .find(|(k, _)| *k == "ICMP__REDIS__URLS")
                .expect("passed on");
            jail.set_env("ICMP__REDIS__URLS", passed);
            let child = load_in(jail, None).expect("config");
            assert_eq!(child.redis.seeds(), c.redis.seeds());
            // A password in a seed of a file is refused like one in `url`.
            jail.create_file(
                "leaky.toml",
                "[redis]\nurls = [\"redis://:hunter2@b:6379/\"]",
            )?;
            let err = load_in(jail, Some("leaky"))
                .expect_err("secret")
                .to_string();
            assert!(
                err.contains("redis.urls") && !err.contains("hunter2"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_secret_in_a_file_is_refused() {
        Jail::expect_with(|jail| {
            jail.create_file("leaky.toml", "[llm]\napi_key = \"sk-in-file\"")?;
            let err = load_in(jail, Some("leaky"))
                .expect_err("must fail")
                .to_string();
            assert!(err.contains("llm.api_key"), "{err}");
            assert!(!err.contains("sk-in-file"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_password_inside_a_url_in_a_file_is_refused_naming_the_key() {
        for (section, url) in [
            ("database", "postgres://icmp:hunter2@db:5432/icmp"),
            ("database", "postgres://icmp@db:5432/icmp?password=hunter2"),
            ("redis", "redis://:hunter2@cache:6379/"),
            ("llm", "https://llm.example/v1?api_key=hunter2"),
        ] {
            Jail::expect_with(|jail| {
                jail.create_file("leaky.toml", &format!("[{section}]\nurl = \"{url}\""))?;
                if section == "llm" {
                    jail.create_file("leaky.toml", &format!("[llm]\nbase_url = \"{url}\""))?;
                }
                let err = load_in(jail, Some("leaky")).expect_err(url);
                let key = if section == "llm" {
                    "llm.base_url"
                } else {
                    &format!("{section}.url")
                };
                let text = err.to_string();
                assert!(text.contains(key), "{text}");
                assert!(!text.contains("hunter2"), "{text}");
                assert_eq!(crate::error::Classify::code(&err), "config.secret_in_file");
                Ok(())
            });
        }
    }

    #[test]
    fn urls_are_redacted_by_a_real_parser() {
        let r = |u: &str| RedactedUrl::new(u).redacted();
        assert_eq!(
            r("postgres://icmp:p%40ss@db/icmp"),
            "postgres://icmp:***@db/icmp"
        );
        assert_eq!(
            r("postgres://icmp@db/icmp?sslmode=require&password=x"),
            "postgres://icmp@db/icmp?sslmode=require&password=***"
        );
        assert_eq!(r("redis://:pw@cache:6379/0"), "redis://:***@cache:6379/0");
        assert_eq!(
            r("host=db user=icmp password=x dbname=icmp"),
            "host=db user=icmp password=*** dbname=icmp"
        );
        // libpq's quoting: a quoted value may hold spaces and escaped quotes, and spaces may
        // surround `=`.
        assert_eq!(
            r("host=db password='a b' dbname=icmp"),
            "host=db password=*** dbname=icmp"
        );
        assert_eq!(
            r(r"host=db password = 'it\'s a b\\' user=icmp"),
            "host=db password=*** user=icmp"
        );
        assert_eq!(
            r(r"password=a\ b sslmode=require"),
            "password=*** sslmode=require"
        );
        assert_eq!(r("password='unterminated x y"), "password=***");
        assert_eq!(r("host=db  password="), "host=db  password=***");
        assert_eq!(
            r("application_name='my app' host=db"),
            "application_name='my app' host=db"
        );
        assert_eq!(
            r("https://llm/v1?api_key=sk-1&model=m"),
            "https://llm/v1?api_key=***&model=m"
        );
        assert_eq!(r("postgres://icmp@db/icmp"), "postgres://icmp@db/icmp");
        assert!(!RedactedUrl::new("redis://127.0.0.1:6379/").has_secret());
        // File paths of client certificates are no secrets.
        assert!(
            !RedactedUrl::new("postgres://icmp@db/icmp?sslkey=/k.pem&sslcert=/c.pem").has_secret()
        );
    }

    proptest::proptest! {
        /// Any password, quoted as libpq reads it (checked against tokio-postgres's parser),
        /// is hidden whole.
        #[test]
        fn a_quoted_dsn_password_is_hidden_whole(
            password in "[ -~\u{a0}\u{b}é]{0,24}",
            separator in "[ \t\u{a0}\u{b}\u{2003}]{1,3}",
        ) {
            let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
            let dsn = format!("host=db{separator}password='{quoted}'{separator}user=icmp");
            let parsed: tokio_postgres::Config = dsn.parse().expect("a valid DSN");
            proptest::prop_assert_eq!(parsed.get_password(), Some(password.as_bytes()));
            proptest::prop_assert_eq!(
                RedactedUrl::new(dsn).redacted(),
                format!("host=db{separator}password=***{separator}user=icmp")
            );
        }

        /// An unquoted password (its whitespace and backslashes escaped) is hidden whole too.
        #[test]
        fn an_unquoted_dsn_password_is_hidden_whole(
            password in "[!-~\u{a0}é ]{1,24}",
            separator in "[ \t\u{a0}\u{2003}]{1,3}",
        ) {
            let escaped: String = password
                .chars()
                .flat_map(|c| {
                    let escape = c == '\\' || c == '\'' || c.is_whitespace();
                    escape.then_some('\\').into_iter().chain(std::iter::once(c))
                })
                .collect();
            let dsn = format!("password={escaped}{separator}host=db");
            let parsed: tokio_postgres::Config = dsn.parse().expect("a valid DSN");
            proptest::prop_assert_eq!(parsed.get_password(), Some(password.as_bytes()));
            proptest::prop_assert_eq!(
                RedactedUrl::new(dsn).redacted(),
                format!("password=***{separator}host=db")
            );
        }
    }

    #[test]
    fn redacted_url_hides_the_password_only() {
        let u = RedactedUrl::new("postgres://icmp:pw@db:5432/icmp");
        assert_eq!(u.redacted(), "postgres://icmp:***@db:5432/icmp");
        assert_eq!(
            RedactedUrl::new("redis://127.0.0.1/").redacted(),
            "redis://127.0.0.1/"
        );
    }
}
