//! The LLM: the [`LlmService`] trait the pipeline calls, the OpenAI-compatible client, and the
//! mock server used by tests, demos and benchmarks.

pub mod circuit;
pub mod client;
pub mod endpoints;
pub mod mock;
pub mod structured;
pub mod tokens;
pub mod transport;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use crate::error::LlmError;
pub use circuit::CircuitBreaker;
pub use client::OpenAiClient;
pub use endpoints::Endpoints;
pub use structured::OutputFormat;

/// One chat message of a request. The content is shared: a rendered prompt is not copied
/// into each request that carries it (thousands of calls are in flight at once).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: &'static str,
    #[serde(serialize_with = "as_str")]
    pub content: Arc<str>,
}

fn as_str<S: serde::Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

impl ChatMessage {
    pub fn system(content: impl Into<Arc<str>>) -> Self {
        ChatMessage {
            role: "system",
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<Arc<str>>) -> Self {
        ChatMessage {
            role: "user",
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<Arc<str>>) -> Self {
        ChatMessage {
            role: "assistant",
            content: content.into(),
        }
    }
}

/// A chat completion request, independent of the wire format.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// Text, or JSON of a schema (see [`structured`]).
    pub format: OutputFormat,
    /// The endpoint of a [`Target`] (an index into the service's endpoints).
    pub endpoint: usize,
}

/// The answer to a [`ChatRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub content: String,
    /// The model that answered, as the endpoint reports it.
    pub model: String,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    pub latency: Duration,
    /// How JSON was asked for (`None`: a text request).
    pub format: Option<structured::Level>,
    /// Why the model stopped (`stop`, `length` …), as the endpoint reports it.
    pub finish_reason: Option<String>,
}

/// One entry of a call's model chain: a model on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The endpoint's index (for [`ChatRequest::endpoint`]).
    pub endpoint: usize,
    /// The endpoint's name (`llm.endpoints[].name`).
    pub endpoint_name: Arc<str>,
    pub model: String,
}

/// Something that answers chat completions.
pub trait LlmService: Send + Sync + 'static {
    /// One call, no retries (the caller decides, see `retry`).
    fn chat(
        &self,
        request: &ChatRequest,
    ) -> impl Future<Output = Result<ChatResponse, LlmError>> + Send;

    /// One call whose answer is streamed (`stream: true`): `partial` holds the text so far as
    /// it grows (emptied when an attempt starts over). A service that cannot stream answers
    /// whole and never touches `partial` (the default).
    fn chat_streamed(
        &self,
        request: &ChatRequest,
        partial: &tokio::sync::watch::Sender<String>,
    ) -> impl Future<Output = Result<ChatResponse, LlmError>> + Send {
        let _ = partial;
        self.chat(request)
    }

    /// The entries a call tries in order, for a template's ordered `models` (see
    /// [`Endpoints::chain`]). A service of one endpoint tries each model there.
    fn chain(&self, models: &[&str]) -> Vec<Target> {
        models
            .iter()
            .map(|m| Target {
                endpoint: 0,
                endpoint_name: Arc::from(endpoints::DEFAULT_NAME),
                model: (*m).to_owned(),
            })
            .collect()
    }
}
