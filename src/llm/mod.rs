//! The LLM: the [`LlmService`] trait the pipeline calls, the OpenAI-compatible client, and the
//! mock server used by tests, demos and benchmarks.

pub mod circuit;
pub mod client;
pub mod mock;
pub mod transport;

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::error::LlmError;
pub use circuit::CircuitBreaker;
pub use client::OpenAiClient;

/// One chat message of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "system".into(),
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "assistant".into(),
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
    /// Ask for a JSON object (`response_format: {"type": "json_object"}`).
    pub json_mode: bool,
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
}

/// Something that answers chat completions.
pub trait LlmService: Send + Sync + 'static {
    /// One call, no retries (the caller decides, see `retry`).
    fn chat(
        &self,
        request: &ChatRequest,
    ) -> impl Future<Output = Result<ChatResponse, LlmError>> + Send;
}
