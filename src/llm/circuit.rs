//! A circuit breaker in front of the LLM: when at least `circuit_failure_ratio` of the last
//! `circuit_window` calls failed, calls fail at once with [`LlmError::CircuitOpen`] for
//! `circuit_open_ms`; then one probe call is let through, and its outcome closes the circuit or
//! opens it again. While the LLM is down, messages therefore get their fallback reply without
//! waiting for timeouts and retry budgets, and the endpoint is not hammered.
//!
//! It judges a failure *ratio* over a window, not a run of consecutive failures: under
//! concurrency a flaky endpoint whose retries mostly succeed produces long runs of failures by
//! chance and would be cut off (measured: 44 of 100 messages fell back at a 45 % fault rate
//! with "10 in a row", none with a 90 % ratio over 20 calls); a dead one fails every call.
//!
//! Only failures that say the endpoint is unwell count (timeouts, connection errors, 5xx, 429,
//! malformed bodies); a rejected request (other 4xx) is the request's fault and does not.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{ChatRequest, ChatResponse, LlmError, LlmService};
use crate::config::LlmConfig;
use crate::error::Classify;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// One probe is under way.
    HalfOpen,
}

/// Wraps an [`LlmService`] with a circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker<L> {
    inner: L,
    /// The endpoint's name (logs, the `icmp_llm_circuit_open` label).
    name: std::sync::Arc<str>,
    window: usize,
    ratio: f64,
    open_for: Duration,
    /// The state and the last `window` outcomes (true = failed).
    state: Mutex<(State, VecDeque<bool>)>,
}

impl<L> CircuitBreaker<L> {
    /// A `circuit_window` of 0 disables the breaker.
    pub fn new(inner: L, config: &LlmConfig) -> Self {
        CircuitBreaker {
            inner,
            name: super::endpoints::DEFAULT_NAME.into(),
            window: config.circuit_window,
            ratio: config.circuit_failure_ratio,
            open_for: Duration::from_millis(config.circuit_open_ms),
            state: Mutex::new((
                State::Closed,
                VecDeque::with_capacity(config.circuit_window),
            )),
        }
    }

    /// The breaker of endpoint `name`.
    #[must_use]
    pub fn named(mut self, name: std::sync::Arc<str>) -> Self {
        self.name = name;
        self
    }

    /// Whether the circuit currently refuses calls.
    pub fn is_open(&self) -> bool {
        matches!(self.state.lock().map(|s| s.0), Ok(State::Open { until }) if Instant::now() < until)
    }

    /// Decides whether a call may go out now.
    fn admit(&self) -> bool {
        if self.window == 0 {
            return true;
        }
        let Ok(mut guard) = self.state.lock() else {
            return true;
        };
        match guard.0 {
            State::Closed => true,
            State::Open { until } if Instant::now() >= until => {
                guard.0 = State::HalfOpen;
                true
            }
            State::Open { .. } | State::HalfOpen => false,
        }
    }

    fn record(&self, outcome: &Result<ChatResponse, LlmError>) {
        if self.window == 0 {
            return;
        }
        let unwell = match outcome {
            Ok(_) => false,
            Err(e) => e.is_retryable(),
        };
        let Ok(mut guard) = self.state.lock() else {
            return;
        };
        let (state, recent) = &mut *guard;
        if recent.len() == self.window {
            recent.pop_front();
        }
        recent.push_back(unwell);
        let failed = recent.iter().filter(|f| **f).count();
        let tripped =
            recent.len() == self.window && failed as f64 >= self.ratio * self.window as f64;
        let next = match (*state, unwell) {
            (State::HalfOpen, false) => {
                recent.clear();
                State::Closed
            }
            (State::HalfOpen, true) => State::Open {
                until: Instant::now() + self.open_for,
            },
            (State::Closed, _) if tripped => State::Open {
                until: Instant::now() + self.open_for,
            },
            (current, _) => current,
        };
        match (*state, next) {
            (State::Closed | State::HalfOpen, State::Open { .. }) => {
                crate::telemetry::metrics::llm_circuit(&self.name, true);
                tracing::warn!(
                    endpoint = %self.name,
                    open_ms = self.open_for.as_millis() as u64,
                    "LLM circuit opened"
                );
            }
            (State::HalfOpen, State::Closed) => {
                crate::telemetry::metrics::llm_circuit(&self.name, false);
                tracing::info!(endpoint = %self.name, "LLM circuit closed");
            }
            _ => {}
        }
        *state = next;
    }
}

impl<L: LlmService> LlmService for CircuitBreaker<L> {
    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
        if !self.admit() {
            return Err(LlmError::CircuitOpen);
        }
        let outcome = self.inner.chat(request).await;
        self.record(&outcome);
        outcome
    }

    async fn chat_streamed(
        &self,
        request: &ChatRequest,
        partial: &tokio::sync::watch::Sender<String>,
    ) -> Result<ChatResponse, LlmError> {
        if !self.admit() {
            return Err(LlmError::CircuitOpen);
        }
        let outcome = self.inner.chat_streamed(request, partial).await;
        self.record(&outcome);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    struct Flaky {
        calls: AtomicU32,
        healthy: AtomicBool,
    }

    impl LlmService for Flaky {
        async fn chat(&self, _: &ChatRequest) -> Result<ChatResponse, LlmError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.healthy.load(Ordering::SeqCst) {
                Ok(ChatResponse {
                    content: "ok".into(),
                    model: "m".into(),
                    prompt_tokens: None,
                    completion_tokens: None,
                    latency: Duration::ZERO,
                    format: None,
                    finish_reason: None,
                })
            } else {
                Err(LlmError::Server {
                    status: 503,
                    body: String::new(),
                })
            }
        }
    }

    fn request() -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: vec![],
            temperature: None,
            max_tokens: None,
            format: crate::llm::OutputFormat::Text,
            endpoint: 0,
        }
    }

    fn breaker() -> CircuitBreaker<Flaky> {
        // Built here, not loaded: the environment belongs to the config tests' jails.
        let config = LlmConfig {
            base_url: String::new(),
            api_key: None,
            default_model: "m".into(),
            request_timeout_ms: 1_000,
            connect_timeout_ms: 1_000,
            max_concurrent_calls: 0,
            http_version: Default::default(),
            max_response_bytes: 1 << 20,
            circuit_window: 3,
            circuit_failure_ratio: 1.0,
            circuit_open_ms: 1_000,
            structured_output: Default::default(),
            ca_file: String::new(),
            fallback_after_ms: 0,
            partial_interval_ms: 200,
            context_tokens: 2048,
            endpoints: Vec::new(),
        };
        CircuitBreaker::new(
            Flaky {
                calls: AtomicU32::new(0),
                healthy: AtomicBool::new(false),
            },
            &config,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_when_the_window_fails_and_closes_after_a_good_probe() {
        let b = breaker();
        for _ in 0..3 {
            assert!(matches!(
                b.chat(&request()).await,
                Err(LlmError::Server { .. })
            ));
        }
        assert!(b.is_open());
        // Refused without calling the endpoint.
        assert!(matches!(
            b.chat(&request()).await,
            Err(LlmError::CircuitOpen)
        ));
        assert_eq!(b.inner.calls.load(Ordering::SeqCst), 3);

        tokio::time::advance(Duration::from_millis(1_001)).await;
        // The probe fails: open again.
        assert!(matches!(
            b.chat(&request()).await,
            Err(LlmError::Server { .. })
        ));
        assert!(matches!(
            b.chat(&request()).await,
            Err(LlmError::CircuitOpen)
        ));
        assert_eq!(b.inner.calls.load(Ordering::SeqCst), 4);

        tokio::time::advance(Duration::from_millis(1_001)).await;
        b.inner.healthy.store(true, Ordering::SeqCst);
        assert!(b.chat(&request()).await.is_ok());
        assert!(!b.is_open());
        assert!(b.chat(&request()).await.is_ok());
    }

    #[tokio::test]
    async fn a_flaky_endpoint_below_the_ratio_stays_in_use() {
        let b = breaker();
        for i in 0..30 {
            let outcome = if i % 3 == 2 {
                Ok(ChatResponse {
                    content: String::new(),
                    model: String::new(),
                    prompt_tokens: None,
                    completion_tokens: None,
                    latency: Duration::ZERO,
                    format: None,
                    finish_reason: None,
                })
            } else {
                Err(LlmError::Timeout(1))
            };
            b.record(&outcome);
            assert!(
                !b.is_open(),
                "two failures in three calls stay under a ratio of 1.0"
            );
        }
    }

    #[tokio::test]
    async fn rejected_requests_do_not_trip_the_breaker() {
        let b = breaker();
        for _ in 0..10 {
            b.record(&Err(LlmError::Rejected {
                status: 400,
                body: String::new(),
            }));
        }
        assert!(!b.is_open());
    }
}
