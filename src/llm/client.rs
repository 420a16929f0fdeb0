//! OpenAI-compatible chat completions over reqwest.
//!
//! `base_url` follows the OpenAI SDK convention (`http://host:port/v1`); the client appends
//! `/chat/completions`, so the same value works for OpenAI, vLLM, Ollama, LiteLLM and the mock.
//! Status handling follows the usual HTTP client practice: 408, 429 and 5xx are transient, any
//! other 4xx is the request's fault and never retried.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::structured::{self, Learned};
use super::transport::Transport;
use super::{ChatMessage, ChatRequest, ChatResponse, LlmError, LlmService};
use crate::config::LlmConfig;

/// Longest error body kept in an error (bodies can be large HTML pages).
const MAX_ERROR_BODY: usize = 512;

/// A client of one OpenAI-compatible endpoint.
#[derive(Clone)]
pub struct OpenAiClient {
    http: Transport,
    /// Bounds the calls in flight (`llm.max_concurrent_calls`).
    calls: std::sync::Arc<tokio::sync::Semaphore>,
    /// `llm.max_response_bytes`.
    max_response_bytes: usize,
    /// `…/chat/completions`, parsed once (not per call).
    url: reqwest::Url,
    api_key: Option<SecretString>,
    timeout: Duration,
    /// What this endpoint's models accept as structured output.
    learned: std::sync::Arc<Learned>,
}

impl std::fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<structured::ResponseFormat<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    /// Asks a streaming endpoint for the token counts in its last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// One chunk of a streamed answer (`data: {…}` of the event stream).
#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    model: String,
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    delta: WireDelta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireDelta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: String,
    choices: Vec<WireChoice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
}

impl OpenAiClient {
    /// Builds a client from the `[llm]` configuration (the endpoint named `default`).
    ///
    /// # Errors
    /// When the TLS backend cannot be initialised.
    pub fn new(config: &LlmConfig) -> Result<OpenAiClient, LlmError> {
        Self::named(super::endpoints::DEFAULT_NAME, config)
    }

    /// Builds the client of endpoint `name`, configured by `config` (see
    /// [`LlmConfig::endpoint_configs`]).
    ///
    /// # Errors
    /// When the TLS backend cannot be initialised or `ca_file` cannot be read.
    pub fn named(name: &str, config: &LlmConfig) -> Result<OpenAiClient, LlmError> {
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let ca = if config.ca_file.is_empty() {
            None
        } else {
            let pem = std::fs::read(&config.ca_file).map_err(|e| {
                LlmError::Connect(format!("endpoint {name}: ca_file {}: {e}", config.ca_file))
            })?;
            Some(reqwest::Certificate::from_pem(&pem).map_err(|e| {
                LlmError::Connect(format!("endpoint {name}: ca_file {}: {e}", config.ca_file))
            })?)
        };
        let builder = || {
            let b = reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(connect_timeout)
                .pool_max_idle_per_host(1024)
                // An OpenAI-compatible API does not redirect its calls; a POST followed to
                // another place would lose its body (and the policy costs every call).
                .redirect(reqwest::redirect::Policy::none());
            match &ca {
                Some(cert) => b.add_root_certificate(cert.clone()),
                None => b,
            }
        };
        let http = Transport::new(
            config.http_version,
            &config.base_url,
            connect_timeout,
            builder,
        )
        .map_err(|e| LlmError::Connect(e.to_string()))?;
        let url = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        let url = reqwest::Url::parse(&url)
            .map_err(|e| LlmError::Connect(format!("endpoint {name}: base_url: {e}")))?;
        let permits = match config.max_concurrent_calls {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n,
        };
        Ok(OpenAiClient {
            max_response_bytes: config.max_response_bytes,
            calls: std::sync::Arc::new(tokio::sync::Semaphore::new(permits)),
            http,
            url,
            api_key: config.api_key.clone(),
            timeout,
            learned: std::sync::Arc::new(Learned::new(name.into(), config.structured_output)),
        })
    }

    /// Settles the HTTP version to a cleartext endpoint with `llm.http_version = "auto"` (see
    /// [`Transport::settle`]): `Some(true)` when calls go over HTTP/2.
    pub async fn settle_http_version(&self) -> Option<bool> {
        self.http.settle().await
    }

    /// An endpoint may echo the request's key in an error body: it never reaches an error text.
    fn scrub(&self, body: String) -> String {
        match &self.api_key {
            Some(key) if !key.expose_secret().is_empty() => {
                body.replace(key.expose_secret(), "***")
            }
            _ => body,
        }
    }

    fn classify_transport(&self, e: &reqwest::Error) -> LlmError {
        if e.is_timeout() {
            LlmError::Timeout(self.timeout.as_millis() as u64)
        } else if e.is_decode() || e.is_body() {
            LlmError::MalformedResponse(without_url(e))
        } else {
            // Connection refused/reset, DNS, TLS: the endpoint is unreachable.
            LlmError::Connect(without_url(e))
        }
    }
}

/// reqwest errors include the URL; keep only the cause chain (the URL may carry a key in a
/// query string with some proxies).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if !s.is_empty() {
            s.push_str(": ");
        }
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    if s.is_empty() {
        "request failed".to_owned()
    } else {
        s
    }
}

/// How much of an error body is read.
const ERROR_BODY_READ: usize = 2048;

/// A body read up to a limit.
enum Body {
    Whole(Vec<u8>),
    /// The first `limit` bytes of a longer body (the rest was not read).
    Cut(Vec<u8>),
}

/// Reads at most `limit` bytes of a response body: a declared or actual length beyond it stops
/// the read, so a hostile or broken endpoint cannot make the worker buffer without bound.
async fn read_body(mut response: reqwest::Response, limit: usize) -> Result<Body, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Ok(Body::Cut(Vec::new()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok(Body::Cut(body));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Body::Whole(body))
}

impl OpenAiClient {
    /// Reads a streamed answer (server-sent events, `data: {chunk}` lines up to
    /// `data: [DONE]`), growing `partial` with each content delta. At most
    /// `max_response_bytes` of the stream are read.
    async fn read_stream(
        &self,
        request: &ChatRequest,
        mut response: reqwest::Response,
        partial: &tokio::sync::watch::Sender<String>,
        started: Instant,
    ) -> Result<ChatResponse, LlmError> {
        let mut pending: Vec<u8> = Vec::new();
        let mut read = 0usize;
        let mut content = String::new();
        let mut model = String::new();
        let mut usage: Option<WireUsage> = None;
        let mut done = false;
        // Whether a chunk said why the answer ended: a stream that reaches `[DONE]` without one
        // was cut short (llama-cpp-python ends an interrupted stream that way).
        let mut finish_reason: Option<String> = None;
        while !done {
            let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| self.classify_transport(&e))?
            else {
                break;
            };
            read += chunk.len();
            if read > self.max_response_bytes {
                return Err(LlmError::ResponseTooLarge {
                    limit: self.max_response_bytes,
                });
            }
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else {
                    continue; // blank separators, comments, `event:` lines
                };
                if data == "[DONE]" {
                    done = true;
                    break;
                }
                let chunk: WireChunk = serde_json::from_str(data)
                    .map_err(|e| LlmError::MalformedResponse(format!("stream chunk: {e}")))?;
                if model.is_empty() {
                    model = chunk.model;
                }
                if chunk.usage.is_some() {
                    usage = chunk.usage;
                }
                let Some(choice) = chunk.choices.into_iter().next() else {
                    continue;
                };
                if choice.finish_reason.is_some() {
                    finish_reason = choice.finish_reason;
                }
                if let Some(delta) = choice.delta.content.filter(|d| !d.is_empty()) {
                    content.push_str(&delta);
                    partial.send_modify(|text| text.push_str(&delta));
                }
            }
        }
        if !done || finish_reason.is_none() {
            return Err(LlmError::MalformedResponse(
                "the stream ended before the answer did".into(),
            ));
        }
        Ok(ChatResponse {
            content,
            model: if model.is_empty() {
                request.model.clone()
            } else {
                model
            },
            prompt_tokens: usage.as_ref().and_then(|u| u.prompt_tokens),
            completion_tokens: usage.as_ref().and_then(|u| u.completion_tokens),
            latency: started.elapsed(),
            format: None,
            finish_reason,
        })
    }
}

/// Parses `Retry-After` as seconds (the HTTP-date form is treated as absent).
fn retry_after_ms(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some((secs * 1000.0) as u64)
}

fn truncate(mut body: String) -> String {
    if body.len() > MAX_ERROR_BODY {
        let mut cut = MAX_ERROR_BODY;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
        body.push('…');
    }
    body
}

impl LlmService for OpenAiClient {
    async fn chat_streamed(
        &self,
        request: &ChatRequest,
        partial: &tokio::sync::watch::Sender<String>,
    ) -> Result<ChatResponse, LlmError> {
        let _permit = self.calls.acquire().await.ok();
        // An attempt starts the text over (a retry after a broken stream).
        partial.send_modify(String::clear);
        self.send(request, None, Instant::now(), Some(partial))
            .await
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
        // The semaphore is never closed; a failure here would only mean "no limit".
        let _permit = self.calls.acquire().await.ok();
        let started = Instant::now();
        let mut level = self.learned.level(&request.model, &request.format);
        loop {
            let result = self.send(request, level, started, None).await;
            // The endpoint refused this form of structured output: ask again, weaker.
            if let Err(LlmError::Rejected { status, body } | LlmError::Server { status, body }) =
                &result
                && let Some(used) = level
                && structured::refuses_response_format(*status, body)
                && let Some(weaker) = self.learned.refused(&request.model, used)
            {
                level = Some(weaker);
                continue;
            }
            return result;
        }
    }
}

impl OpenAiClient {
    /// One request, asking for structured output at `level`; streamed into `partial` when
    /// given.
    async fn send(
        &self,
        request: &ChatRequest,
        level: Option<structured::Level>,
        started: Instant,
        partial: Option<&tokio::sync::watch::Sender<String>>,
    ) -> Result<ChatResponse, LlmError> {
        let wire = WireRequest {
            model: &request.model,
            messages: &request.messages,
            temperature: request.temperature,
            max_tokens: request.max_tokens,
            response_format: structured::response_format(&request.format, level),
            stream: partial.is_some(),
            stream_options: partial.map(|_| StreamOptions {
                include_usage: true,
            }),
        };
        let mut builder = self.http.client().post(self.url.clone()).json(&wire);
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key.expose_secret());
        }
        let response = builder
            .send()
            .await
            .map_err(|e| self.classify_transport(&e))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after_ms(response.headers());
            // Only the start of an error body is read: the rest is dropped with the connection.
            let body = match read_body(response, ERROR_BODY_READ).await {
                Ok(Body::Whole(b) | Body::Cut(b)) => {
                    truncate(self.scrub(String::from_utf8_lossy(&b).into()))
                }
                Err(_) => String::new(),
            };
            let code = status.as_u16();
            return Err(match code {
                429 => LlmError::RateLimited {
                    retry_after_ms: retry_after,
                },
                408 | 500..=599 => LlmError::Server { status: code, body },
                _ => LlmError::Rejected { status: code, body },
            });
        }
        if let Some(partial) = partial {
            return self.read_stream(request, response, partial, started).await;
        }
        let bytes = match read_body(response, self.max_response_bytes)
            .await
            .map_err(|e| self.classify_transport(&e))?
        {
            Body::Whole(b) => b,
            Body::Cut(_) => {
                return Err(LlmError::ResponseTooLarge {
                    limit: self.max_response_bytes,
                });
            }
        };
        let parsed: WireResponse = serde_json::from_slice(&bytes)
            .map_err(|e| LlmError::MalformedResponse(e.to_string()))?;
        let choice = parsed
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| LlmError::MalformedResponse("no choices".into()))?;
        let finish_reason = choice.finish_reason;
        let content = choice
            .message
            .content
            .ok_or_else(|| LlmError::MalformedResponse("no message content".into()))?;
        let usage = parsed.usage;
        Ok(ChatResponse {
            content,
            model: if parsed.model.is_empty() {
                request.model.clone()
            } else {
                parsed.model
            },
            prompt_tokens: usage.as_ref().and_then(|u| u.prompt_tokens),
            completion_tokens: usage.as_ref().and_then(|u| u.completion_tokens),
            latency: started.elapsed(),
            format: level,
            finish_reason,
        })
    }
}
