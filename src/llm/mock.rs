//! A deterministic OpenAI-compatible mock LLM (`icmp mock-llm`), served over real HTTP.
//!
//! It answers `POST /v1/chat/completions` and `GET /v1/models` in the OpenAI wire format.
//! Answers follow fixed rules keyed on the prompt's purpose and the user's words:
//! - JSON mode (`response_format` of type `json_object` or `json_schema`; the schema is not
//!   enforced, `--refuse-json-schema` refuses the latter) and a prompt that speaks of
//!   *extract*ing: the fields it can find in the user's
//!   words (`name` from "my name is …", `date` from an ISO date or a weekday, `reason` from
//!   "for …"/"because …").
//! - A user message containing `MALFORMED-ONCE` gets prose instead of JSON in JSON mode, and a
//!   proper answer to the repair prompt that follows; `MALFORMED-ALWAYS` gets prose every time.
//! - JSON mode otherwise (stage selection): `{"stage": …}` from keywords ("book" → `booking`,
//!   "bye"/"thank" → `farewell`, "hello"/"hi" → `welcome`, "talk to a human" → `human`), else
//!   the prompt's `Current stage: X` line.
//! - Plain mode: a short reply that quotes the user's words.
//!
//! The user's words are what follows the last `User message:` marker of the last user
//! message, or that whole message. Latency, jitter and faults (500, 429 with `Retry-After`,
//! hangs past any client timeout, malformed JSON) are injected per call from a seeded RNG.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

/// Behaviour of the mock: latency and fault injection. Rates are shares of calls in `0..=1`.
/// Also the options of `icmp mock-llm`; their defaults there are [`MockOptions::default`]'s.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct MockOptions {
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Share of calls answered `500`.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Share of calls answered `429` with `Retry-After: retry_after_secs`.
    #[arg(long, default_value_t = 0.0)]
    pub rate_limit_rate: f64,
    #[arg(long, default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Share of calls that hang for `hang_ms` before answering (a client timeout).
    #[arg(long, default_value_t = 0.0)]
    pub timeout_rate: f64,
    #[arg(long, default_value_t = 60_000)]
    pub hang_ms: u64,
    /// Share of calls answered `200` with a truncated JSON body.
    #[arg(long, default_value_t = 0.0)]
    pub malformed_rate: f64,
    /// RNG seed; the same seed and call order give the same faults.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Serve HTTP/1.1 only (as most self-hosted servers do); else HTTP/1.1 and cleartext
    /// HTTP/2 on the same port.
    #[arg(long)]
    pub http1_only: bool,
    /// Refuse `response_format: {type: "json_schema"}` with a 400 naming `response_format`
    /// (as endpoints without structured outputs do); `json_object` is still taken.
    #[arg(long)]
    pub refuse_json_schema: bool,
    /// Milliseconds between the chunks of a streamed answer (`stream: true`, one word each).
    #[arg(long, default_value_t = 0)]
    pub stream_chunk_ms: u64,
    /// The key stage actions sign their requests with: the webhook receiver
    /// (`/webhooks/{action}`) refuses requests not signed with it; unset: it checks nothing.
    #[arg(long, env = "ICMP_MOCK_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            latency_ms: 0,
            jitter_ms: 0,
            error_rate: 0.0,
            rate_limit_rate: 0.0,
            retry_after_secs: 1,
            timeout_rate: 0.0,
            hang_ms: 60_000,
            malformed_rate: 0.0,
            seed: 42,
            http1_only: false,
            refuse_json_schema: false,
            stream_chunk_ms: 0,
            webhook_secret: None,
        }
    }
}

/// Counters of what the mock did, readable by tests.
#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub faults: AtomicU64,
    /// Requests being answered now, and the most at once so far.
    pub in_flight: AtomicU64,
    pub peak_in_flight: AtomicU64,
    /// Connections accepted (an HTTP/2 client sends all its calls over one).
    pub connections: AtomicU64,
    /// `GET /v1/models` requests answered (a worker's HTTP version probe sends one).
    pub models_requests: AtomicU64,
    /// Requests by `response_format`: `json_schema`, `json_object` (with or without a schema),
    /// none; and those refused (`refuse_json_schema`).
    pub json_schema_requests: AtomicU64,
    pub json_object_requests: AtomicU64,
    pub text_requests: AtomicU64,
    pub refused_formats: AtomicU64,
    /// Requests answered as a stream.
    pub streamed_requests: AtomicU64,
    /// Streams broken on purpose (`BREAK-STREAM-ONCE`).
    pub broken_streams: AtomicU64,
}

/// Counts a request in flight until dropped.
struct InFlight<'a>(&'a MockStats);

impl<'a> InFlight<'a> {
    fn enter(stats: &'a MockStats) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct MockState {
    options: MockOptions,
    rng: Mutex<StdRng>,
    stats: Arc<MockStats>,
}

/// A running mock server.
#[derive(Debug)]
pub struct MockServer {
    pub addr: SocketAddr,
    pub stats: Arc<MockStats>,
    /// What the webhook receiver saw.
    pub receiver: Arc<crate::actions::receiver::ReceiverStats>,
    task: tokio::task::JoinHandle<()>,
}

impl MockServer {
    /// `http://addr/v1`, ready for `llm.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the mock on `listener` in a background task.
pub fn spawn(listener: TcpListener, options: MockOptions) -> std::io::Result<MockServer> {
    let addr = listener.local_addr()?;
    let stats = Arc::new(MockStats::default());
    let receiver = Arc::new(crate::actions::receiver::ReceiverStats::default());
    let http1_only = options.http1_only;
    let app = router(options, stats.clone(), receiver.clone());
    let task = tokio::spawn(serve_router(
        listener,
        app,
        stats.clone(),
        http1_only,
        std::future::pending(),
    ));
    Ok(MockServer {
        addr,
        stats,
        receiver,
        task,
    })
}

/// Serves the mock on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    options: MockOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stats = Arc::new(MockStats::default());
    let http1_only = options.http1_only;
    let app = router(options, stats.clone(), Arc::default());
    serve_router(listener, app, stats, http1_only, shutdown).await;
    Ok(())
}

/// Streams one HTTP/2 connection may carry at once: as many as clients send (a worker sends
/// all its calls over one HTTP/2 connection).
const MAX_STREAMS: u32 = 100_000;

/// Accepts connections until `shutdown`, each served as HTTP/1.1 or, when it opens with the
/// HTTP/2 preface (and not `http1_only`), as cleartext HTTP/2 (prior knowledge).
async fn serve_router(
    listener: TcpListener,
    app: Router,
    stats: Arc<MockStats>,
    http1_only: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(MAX_STREAMS);
    if http1_only {
        builder = builder.http1_only();
    }
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: wait a moment rather than spin.
                tracing::warn!(error = %e, "mock LLM could not accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let (builder, service) = (builder.clone(), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn router(
    options: MockOptions,
    stats: Arc<MockStats>,
    receiver: Arc<crate::actions::receiver::ReceiverStats>,
) -> Router {
    let webhooks = crate::actions::receiver::router(options.webhook_secret.clone(), receiver);
    let state = Arc::new(MockState {
        rng: Mutex::new(StdRng::seed_from_u64(options.seed)),
        options,
        stats,
    });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .with_state(state)
        .merge(webhooks)
}

async fn models(State(state): State<Arc<MockState>>) -> Json<Value> {
    state.stats.models_requests.fetch_add(1, Ordering::Relaxed);
    Json(json!({
        "object": "list",
        "data": [{"id": "mock-1", "object": "model", "created": 0, "owned_by": "icmp"}]
    }))
}

#[derive(Debug, Deserialize)]
struct Request {
    #[serde(default)]
    model: String,
    #[serde(default)]
    messages: Vec<RequestMessage>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    stream: bool,
}

#[derive(Debug, Deserialize)]
struct RequestMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

enum Fault {
    None,
    ServerError,
    RateLimited,
    Hang,
    Malformed,
}

async fn chat_completions(State(state): State<Arc<MockState>>, body: String) -> Response {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(&state.stats);
    let (delay, fault) = roll(&state).await;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if !matches!(fault, Fault::None) {
        state.stats.faults.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(response) = injected(&state.options, fault).await {
        return response;
    }
    let request: Request = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"message": format!("invalid request: {e}")}})),
            )
                .into_response();
        }
    };
    if let Some(refusal) = refused(&state, &request) {
        return refusal;
    }
    let answer = answer(&request);
    let prompt_tokens: usize = request
        .messages
        .iter()
        .map(|m| word_count(&text_of(m)))
        .sum();
    let completion_tokens = word_count(&answer);
    let model = if request.model.is_empty() {
        "mock-1".to_owned()
    } else {
        request.model.clone()
    };
    if request.stream {
        return stream_answer(&state, &answer, &model, (prompt_tokens, completion_tokens));
    }
    Json(json!({
        "id": format!("chatcmpl-mock-{}", state.stats.requests.load(Ordering::Relaxed)),
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        }
    }))
    .into_response()
}

/// Counts the request by its `response_format`; the refusal of `json_schema` when the mock
/// refuses it, and a 500 for a summary request that asks for one (`FAIL-SUMMARY`).
fn refused(state: &MockState, request: &Request) -> Option<Response> {
    let prompt = prompt_of(request);
    if let Some(Err(())) = summary(&prompt) {
        return Some(
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": {"message": "summary failed", "type": "server_error"}})),
            )
                .into_response(),
        );
    }
    let format = request
        .response_format
        .as_ref()
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str);
    let counter = match format {
        Some("json_schema") => &state.stats.json_schema_requests,
        Some(_) => &state.stats.json_object_requests,
        None => &state.stats.text_requests,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if format == Some("json_schema") && state.options.refuse_json_schema {
        state.stats.refused_formats.fetch_add(1, Ordering::Relaxed);
        return Some(
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {
                    "message": "response_format of type json_schema is not supported by this model",
                    "type": "invalid_request_error",
                    "param": "response_format"
                }})),
            )
                .into_response(),
        );
    }
    None
}

/// Streams `answer`; the first stream of an answer carrying `BREAK-STREAM-ONCE` ends halfway,
/// without `[DONE]`.
fn stream_answer(state: &MockState, answer: &str, model: &str, tokens: (usize, usize)) -> Response {
    state
        .stats
        .streamed_requests
        .fetch_add(1, Ordering::Relaxed);
    let break_after = (answer.contains("BREAK-STREAM-ONCE")
        && state.stats.broken_streams.fetch_add(1, Ordering::Relaxed) == 0)
        .then(|| word_count(answer) / 2);
    streamed(
        answer,
        model,
        tokens,
        state.options.stream_chunk_ms,
        break_after,
    )
}

/// An answer as an OpenAI event stream: a role chunk, one chunk per word (`chunk_ms` apart),
/// the finish chunk, a usage chunk, `[DONE]`; with `break_after`, only that many words.
fn streamed(
    answer: &str,
    model: &str,
    (prompt, completion): (usize, usize),
    chunk_ms: u64,
    break_after: Option<usize>,
) -> Response {
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let mut events = vec![chunk(json!({"role": "assistant"}), Value::Null)];
    let mut first = true;
    for word in answer.split(' ') {
        let piece = if first {
            word.to_owned()
        } else {
            format!(" {word}")
        };
        first = false;
        events.push(chunk(json!({"content": piece}), Value::Null));
    }
    if let Some(words) = break_after {
        events.truncate(words + 1);
    } else {
        events.push(chunk(json!({}), json!("stop")));
        events.push(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
               "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
               "total_tokens": prompt + completion}})
        ));
        events.push("data: [DONE]\n\n".to_owned());
    }
    let body =
        futures::stream::iter(events.into_iter().enumerate()).then(move |(i, event)| async move {
            if i > 0 && chunk_ms > 0 {
                tokio::time::sleep(Duration::from_millis(chunk_ms)).await;
            }
            Ok::<_, std::convert::Infallible>(event)
        });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// This call's latency (with jitter) and fault, from the seeded RNG.
async fn roll(state: &MockState) -> (u64, Fault) {
    let o = &state.options;
    let mut rng = state.rng.lock().await;
    let jitter = if o.jitter_ms > 0 {
        rng.random_range(0..=o.jitter_ms)
    } else {
        0
    };
    let roll: f64 = rng.random();
    let mut edge = 0.0;
    let mut pick = |rate: f64| {
        edge += rate;
        roll < edge
    };
    let fault = if pick(o.error_rate) {
        Fault::ServerError
    } else if pick(o.rate_limit_rate) {
        Fault::RateLimited
    } else if pick(o.timeout_rate) {
        Fault::Hang
    } else if pick(o.malformed_rate) {
        Fault::Malformed
    } else {
        Fault::None
    };
    (o.latency_ms + jitter, fault)
}

/// The response of an injected fault (`None`: answer normally, after a hang's wait).
async fn injected(options: &MockOptions, fault: Fault) -> Option<Response> {
    match fault {
        Fault::ServerError => Some(
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": {"message": "injected failure", "type": "server_error"}})),
            )
                .into_response(),
        ),
        Fault::RateLimited => {
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"error": {"message": "rate limited", "type": "rate_limit"}})),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&options.retry_after_secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Some(r)
        }
        Fault::Hang => {
            tokio::time::sleep(Duration::from_millis(options.hang_ms)).await;
            None
        }
        Fault::Malformed => Some(
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                "{\"id\": \"x\", \"choices\": [{\"message\": ",
            )
                .into_response(),
        ),
        Fault::None => None,
    }
}

fn word_count(s: &str) -> usize {
    s.split_whitespace().count()
}

fn text_of(m: &RequestMessage) -> String {
    match &m.content {
        Value::String(s) => s.clone(),
        // Content parts: [{"type": "text", "text": "..."}]
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Every message's text, one after another.
fn prompt_of(request: &Request) -> String {
    request
        .messages
        .iter()
        .map(text_of)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The deterministic answer to a request.
fn answer(request: &Request) -> String {
    let prompt = prompt_of(request);
    let users: Vec<String> = request
        .messages
        .iter()
        .filter(|m| m.role == "user")
        .map(text_of)
        .collect();
    let last = users.last().cloned().unwrap_or_default();
    // A repair turn: answer the original request again (the message before the repair prompt).
    let repairing = last.starts_with(crate::pipeline::llm_call::REPAIR_PREFIX);
    let last_user = if repairing {
        users.first().cloned().unwrap_or_default()
    } else {
        last
    };
    let words = match last_user.rfind("User message:") {
        Some(i) => last_user[i + "User message:".len()..].trim().to_owned(),
        None => last_user.trim().to_owned(),
    };
    let json_mode = matches!(
        request
            .response_format
            .as_ref()
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str),
        Some("json_object" | "json_schema")
    );
    if json_mode {
        // Scripted structured-output failures: malformed once (the repair succeeds) or always.
        if words.contains("MALFORMED-ALWAYS") || (words.contains("MALFORMED-ONCE") && !repairing) {
            return "Sure! Here is what I found, in prose rather than JSON.".to_owned();
        }
        if prompt.to_lowercase().contains("extract") {
            Value::Object(extract(&words)).to_string()
        } else {
            json!({"stage": select(&words, &prompt)}).to_string()
        }
    } else if let Some(Ok(summary)) = summary(&prompt) {
        summary
    } else {
        respond(&words, &prompt)
    }
}

/// A summary request (a prompt asking to "Summarize the conversation"): `Summary: ` and the
/// user's lines (`user: …`) joined by `; `; a 500 when one of them carries `FAIL-SUMMARY`.
fn summary(prompt: &str) -> Option<Result<String, ()>> {
    if !prompt.contains("Summarize the conversation") {
        return None;
    }
    let said: Vec<&str> = prompt
        .lines()
        .filter_map(|l| l.trim().strip_prefix("user: "))
        .collect();
    if said.iter().any(|l| l.contains("FAIL-SUMMARY")) {
        return Some(Err(()));
    }
    Some(Ok(format!("Summary: {}", said.join("; "))))
}

/// Plain replies. A prompt line `Known so far: a=1, b=` makes the mock ask for the missing
/// fields (or confirm when none is missing); `Booking: …` makes it say goodbye with a summary.
fn respond(words: &str, prompt: &str) -> String {
    let first_line = words.lines().next().unwrap_or("").trim();
    let known = |prefix: &str| {
        prompt
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|rest| {
                rest.split(", ")
                    .filter_map(|pair| pair.split_once('='))
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .collect::<Vec<_>>()
            })
    };
    if let Some(fields) = known("Known so far:") {
        let missing: Vec<&str> = fields
            .iter()
            .filter(|(_, v)| v.is_empty())
            .map(|(k, _)| k.as_str())
            .collect();
        return if missing.is_empty() {
            let summary: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!(
                "Great, you're booked ({}). Anything else?",
                summary.join(", ")
            )
        } else {
            format!(
                "Happy to help with \"{first_line}\". Could you tell me your {}?",
                missing.join(" and ")
            )
        };
    }
    if let Some(fields) = known("Booking:") {
        let set: Vec<String> = fields
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        return if set.is_empty() {
            "Thanks for chatting with us. Goodbye!".to_owned()
        } else {
            format!(
                "Thanks! Your booking ({}) is noted. Goodbye!",
                set.join(", ")
            )
        };
    }
    format!("Thanks for your message: \"{first_line}\". How else can I help?")
}

fn has_word(haystack: &str, words: &[&str]) -> bool {
    haystack
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .any(|w| words.iter().any(|k| w.starts_with(k)))
}

fn select(words: &str, prompt: &str) -> Value {
    let lower = words.to_lowercase();
    if lower.contains("talk to a human") {
        return json!("human");
    }
    if has_word(&lower, &["book", "appointment", "schedul", "reserv"]) {
        return json!("booking");
    }
    if has_word(&lower, &["bye", "thank", "goodbye"]) {
        return json!("farewell");
    }
    if has_word(&lower, &["hello", "hi", "hey"]) {
        return json!("welcome");
    }
    prompt
        .lines()
        .find_map(|l| l.trim().strip_prefix("Current stage:"))
        .map(|s| json!(s.trim()))
        .unwrap_or(Value::Null)
}

const WEEKDAYS: [&str; 9] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "today",
    "tomorrow",
];

fn extract(words: &str) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let lower = words.to_lowercase();
    for marker in ["my name is ", "i am ", "i'm ", "this is "] {
        if let Some(i) = lower.find(marker) {
            let rest = &words[i + marker.len()..];
            let name: Vec<&str> = rest
                .split_whitespace()
                .take(2)
                .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
                .take_while(|w| w.chars().next().is_some_and(char::is_uppercase))
                .collect();
            if !name.is_empty() {
                out.insert("name".into(), json!(name.join(" ")));
                break;
            }
        }
    }
    let tokens: Vec<&str> = words
        .split(|c: char| c.is_whitespace() || c == ',' || c == '.' || c == '!' || c == '?')
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(date) = tokens.iter().find(|t| is_iso_date(t)) {
        out.insert("date".into(), json!(date));
    } else if let Some(day) = tokens
        .iter()
        .map(|t| t.to_lowercase())
        .find(|t| WEEKDAYS.contains(&t.as_str()))
    {
        out.insert("date".into(), json!(day));
    }
    for marker in [" because ", " for a ", " for an ", " for my ", " for "] {
        if let Some(i) = lower.find(marker) {
            let reason = words[i + marker.len()..]
                .split(['.', '!', '?', ','])
                .next()
                .unwrap_or("")
                .trim();
            if !reason.is_empty() && !WEEKDAYS.contains(&reason.to_lowercase().as_str()) {
                out.insert("reason".into(), json!(reason));
                break;
            }
        }
    }
    out
}

fn is_iso_date(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_defaults_are_the_default_options() {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            options: MockOptions,
        }
        let parsed = <Command as clap::Parser>::parse_from(["mock-llm"]);
        assert_eq!(parsed.options, MockOptions::default());
    }

    fn request(json_mode: bool, system: &str, user: &str) -> Request {
        Request {
            model: "m".into(),
            messages: vec![
                RequestMessage {
                    role: "system".into(),
                    content: json!(system),
                },
                RequestMessage {
                    role: "user".into(),
                    content: json!(user),
                },
            ],
            response_format: json_mode.then(|| json!({"type": "json_object"})),
            stream: false,
        }
    }

    #[test]
    fn selection_follows_keywords_then_the_current_stage() {
        let r = request(
            true,
            "Pick the stage",
            "Current stage: welcome\nUser message: I want to book a cleaning",
        );
        assert_eq!(answer(&r), r#"{"stage":"booking"}"#);
        let r = request(
            true,
            "Pick the stage",
            "Current stage: booking\nUser message: next week maybe",
        );
        assert_eq!(answer(&r), r#"{"stage":"booking"}"#);
    }

    #[test]
    fn extraction_finds_name_date_and_reason() {
        let r = request(
            true,
            "Extract the details",
            "User message: Hi, my name is Alice Smith, I'd like to come on 2026-12-03 for a cleaning.",
        );
        let v: Value = serde_json::from_str(&answer(&r)).expect("json");
        assert_eq!(v["name"], "Alice Smith");
        assert_eq!(v["date"], "2026-12-03");
        assert_eq!(v["reason"], "cleaning");
    }

    #[test]
    fn plain_mode_asks_for_missing_fields() {
        let r = request(
            false,
            "Book",
            "Known so far: name=Al, date=, reason=\nUser message: hi",
        );
        assert_eq!(
            answer(&r),
            "Happy to help with \"hi\". Could you tell me your date and reason?"
        );
        let r = request(
            false,
            "Book",
            "Known so far: name=Al, date=friday, reason=pain\nUser message: ok",
        );
        assert!(answer(&r).contains("you're booked (name: Al, date: friday, reason: pain)"));
    }

    #[test]
    fn plain_mode_quotes_the_user() {
        let r = request(false, "Be kind", "history...\nUser message: where are you?");
        assert!(answer(&r).contains("where are you?"));
    }
}
