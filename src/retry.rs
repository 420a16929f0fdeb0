//! Retries of transient faults with exponential backoff and jitter.
//!
//! This is the only module that knows the `backoff` crate (unmaintained, RUSTSEC-2025-0012):
//! replacing it with `backon` changes this file alone. Errors decide for themselves whether a
//! retry may help ([`Classify::is_retryable`]); a rate-limit answer's `Retry-After` is honoured.

use futures::FutureExt as _;
use std::future::Future;
use std::time::Duration;

use backoff::ExponentialBackoffBuilder;
use tokio_util::sync::CancellationToken;

use crate::config::RetryConfig;
use crate::error::{Classify, LlmError};
use crate::telemetry::metrics;

/// Errors that may ask for a specific wait before the next attempt.
pub trait RetryAfter {
    /// The wait the remote side asked for, if any.
    fn retry_after(&self) -> Option<Duration> {
        None
    }

    /// Whether repeating the same call can help. Some retryable errors need more than a
    /// repeat (a version conflict re-runs the whole message); they say `false` here.
    fn retry_in_place(&self) -> bool {
        true
    }
}

impl RetryAfter for LlmError {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::RateLimited {
                retry_after_ms: Some(ms),
            } => Some(Duration::from_millis(*ms)),
            _ => None,
        }
    }
}

impl RetryAfter for crate::error::StoreError {
    fn retry_in_place(&self) -> bool {
        !matches!(self, crate::error::StoreError::VersionConflict)
    }
}
impl RetryAfter for crate::error::CacheError {}
impl RetryAfter for crate::error::StreamError {}
impl RetryAfter for crate::error::PipelineError {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            crate::error::PipelineError::Llm(e) => e.retry_after(),
            _ => None,
        }
    }
    fn retry_in_place(&self) -> bool {
        match self {
            crate::error::PipelineError::Store(e) => e.retry_in_place(),
            _ => true,
        }
    }
}

/// The retry policy of one kind of operation.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    config: RetryConfig,
}

impl RetryPolicy {
    pub fn new(config: RetryConfig) -> Self {
        RetryPolicy { config }
    }

    /// A policy that never retries (for callers that must fail fast).
    pub fn none() -> Self {
        RetryPolicy {
            config: RetryConfig {
                initial_interval_ms: 0,
                multiplier: 1.0,
                randomization_factor: 0.0,
                max_interval_ms: 0,
                max_elapsed_ms: 0,
            },
        }
    }

    /// Runs `op` until it succeeds, fails with a non-retryable error, or the time budget
    /// (`max_elapsed_ms`) is spent; every retry is counted under `operation`.
    ///
    /// # Errors
    /// The last error of `op`.
    pub async fn run<T, E, F, Fut>(&self, operation: &'static str, mut op: F) -> Result<T, E>
    where
        E: Classify + RetryAfter,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if self.config.max_elapsed_ms == 0 {
            return op().await;
        }
        let c = &self.config;
        let budget = Duration::from_millis(c.max_elapsed_ms);
        let started = std::time::Instant::now();
        let policy = ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(c.initial_interval_ms))
            .with_multiplier(c.multiplier)
            .with_randomization_factor(c.randomization_factor)
            .with_max_interval(Duration::from_millis(c.max_interval_ms))
            .with_max_elapsed_time(Some(Duration::from_millis(c.max_elapsed_ms)))
            .build();
        backoff::future::retry_notify(
            policy,
            || {
                // A combinator, not an `async move` block: awaiting a captured future from an
                // async block keeps two copies of it in the block's state (the capture and the
                // pinned one), which doubled the size of every retried call.
                op().map(|result| {
                    result.map_err(|e| {
                        if e.is_retryable() && e.retry_in_place() {
                            // A `Retry-After` longer than what is left of the budget would
                            // park the caller past it: wait at most what is left.
                            // (`backoff` does not check its budget when told a wait.)
                            let left = budget.saturating_sub(started.elapsed());
                            match e.retry_after() {
                                Some(_) if left.is_zero() => backoff::Error::Permanent(e),
                                asked => backoff::Error::Transient {
                                    err: e,
                                    retry_after: asked.map(|w| w.min(left)),
                                },
                            }
                        } else {
                            backoff::Error::Permanent(e)
                        }
                    })
                })
            },
            |e: E, wait: Duration| {
                metrics::retry(operation);
                tracing::debug!(
                    operation,
                    code = e.code(),
                    wait_ms = wait.as_millis() as u64,
                    "retrying"
                );
            },
        )
        .await
    }
}

/// The waits of a loop that keeps trying until it is told to stop (a reader after a failed
/// read, a watch reconnecting, a start-up waiting for Redis): exponential from `initial` up to
/// `max`, with jitter, never giving up. [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    inner: backoff::ExponentialBackoff,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let inner = ExponentialBackoffBuilder::new()
            .with_initial_interval(initial)
            .with_multiplier(2.0)
            .with_randomization_factor(0.2)
            .with_max_interval(max)
            .with_max_elapsed_time(None)
            .build();
        Backoff { inner }
    }

    /// The next wait (longer each time, up to the maximum).
    pub fn next_wait(&mut self) -> Duration {
        use backoff::backoff::Backoff as _;
        self.inner.next_backoff().unwrap_or(self.inner.max_interval)
    }

    /// Back to the initial wait.
    pub fn reset(&mut self) {
        use backoff::backoff::Backoff as _;
        self.inner.reset();
    }

    /// Sleeps the next wait unless `stop` is cancelled first; returns whether it was.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let wait = self.next_wait();
        stop.run_until_cancelled(tokio::time::sleep(wait))
            .await
            .is_none()
            || stop.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::StoreError;

    #[test]
    fn backoff_waits_grow_to_the_maximum_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_wait();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        let waits: Vec<Duration> = (0..20).map(|_| b.next_wait()).collect();
        assert!(
            waits.iter().all(|w| *w <= Duration::from_millis(1_200)),
            "{waits:?}"
        );
        assert!(waits[19] >= Duration::from_millis(800), "{waits:?}");
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(120));
    }

    #[tokio::test]
    async fn a_backoff_wait_ends_at_a_stop() {
        let stop = CancellationToken::new();
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        stop.cancel();
        let started = std::time::Instant::now();
        assert!(b.wait(&stop).await);
        assert!(started.elapsed() < Duration::from_secs(1));
        let running = CancellationToken::new();
        let mut quick = Backoff::new(Duration::from_millis(1), Duration::from_millis(1));
        assert!(!quick.wait(&running).await);
    }
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick() -> RetryPolicy {
        RetryPolicy::new(RetryConfig {
            initial_interval_ms: 1,
            multiplier: 2.0,
            randomization_factor: 0.5,
            max_interval_ms: 5,
            max_elapsed_ms: 2_000,
        })
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let r: Result<u32, LlmError> = quick()
            .run("test", || async {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < 3 {
                    Err(LlmError::Server {
                        status: 500,
                        body: String::new(),
                    })
                } else {
                    Ok(n)
                }
            })
            .await;
        assert_eq!(r.expect("success"), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<(), StoreError> = quick()
            .run("test", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::Duplicate)
            })
            .await;
        assert!(matches!(r, Err(StoreError::Duplicate)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retry_after_is_honoured() {
        let calls = AtomicU32::new(0);
        let started = std::time::Instant::now();
        let r: Result<(), LlmError> = quick()
            .run("test", || async {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(LlmError::RateLimited {
                        retry_after_ms: Some(300),
                    })
                } else {
                    Ok(())
                }
            })
            .await;
        assert!(r.is_ok());
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_retry_after_past_the_budget_is_clamped_to_it() {
        let calls = AtomicU32::new(0);
        let started = std::time::Instant::now();
        let r: Result<(), LlmError> = quick()
            .run("test", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(LlmError::RateLimited {
                    retry_after_ms: Some(3_600_000),
                })
            })
            .await;
        assert!(matches!(r, Err(LlmError::RateLimited { .. })));
        // The budget is 2 s: one clamped wait, then the budget is spent.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1_900), "{took:?}");
        assert!(took < Duration::from_secs(10), "parked for {took:?}");
    }
}
