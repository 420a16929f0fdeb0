//! The worker: takes entries from the inbound stream (new ones, and stale ones of dead
//! consumers), runs each through the pipeline under a concurrency bound, and decides from the
//! outcome whether to publish and ack, leave it pending for redelivery, or dead-letter it.
//!
//! - [`run`](Worker::run): the read loop (admission, reclaiming, shutdown);
//! - `startup`: [`run_until_stopped`], wiring a worker from the configuration;
//! - this module: one entry's path, from its turn in the conversation to publish, ack or
//!   dead-letter.

mod run;
mod startup;

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::FutureExt;
use tokio::sync::Semaphore;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::Config;
use crate::error::{CacheError, Classify, PipelineError};
use crate::llm::LlmService;
use crate::pipeline::failpoint;
use crate::pipeline::{MessageHandler, Processed, Reply};
use crate::retry::RetryPolicy;
use crate::stream::{StreamEntry, Streams, Turn};
use crate::telemetry::metrics::{self, MessageOutcome};

pub use startup::run_until_stopped;

/// What happened to one entry (the loop and the tests match on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (`ok` or `fallback`), published and acked.
    Replied,
    /// Already answered before: the stored reply was published again and the entry acked.
    Duplicate,
    /// Invalid input: an error reply was published and the entry acked; nothing was stored.
    Rejected,
    /// A transient failure: left pending, to be redelivered after `claim_idle_ms`.
    RetryLater,
    /// Failed for good (or too often): moved to the dead-letter stream, error reply published.
    DeadLettered,
    /// Another consumer finished it while it waited for its turn.
    AlreadyDone,
}

/// How many entries a worker may hold per processing slot (the rest wait for their turn).
const WAITING_FACTOR: usize = 4;

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
    #[error(transparent)]
    Redis(#[from] CacheError),
    #[error(transparent)]
    Llm(#[from] crate::error::LlmError),
    #[error("telemetry endpoint: {0}")]
    Telemetry(std::io::Error),
}

/// One worker process's loop over its streams and pipeline.
pub struct Worker<L> {
    handler: Arc<MessageHandler<L>>,
    streams: Streams,
    config: Config,
    publish_retry: RetryPolicy,
    /// `worker.concurrency` processing slots.
    processing: Arc<Semaphore>,
    /// Entries this process holds: a reclaim of one of them (it looked idle) is ignored.
    held: Mutex<HashSet<String>>,
}

impl<L> std::fmt::Debug for Worker<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl<L: LlmService> Worker<L> {
    pub fn new(config: Config, handler: Arc<MessageHandler<L>>, streams: Streams) -> Self {
        Worker {
            publish_retry: RetryPolicy::new(config.retry.clone()),
            processing: Arc::new(Semaphore::new(config.worker.concurrency.max(1))),
            held: Mutex::new(HashSet::new()),
            handler,
            streams,
            config,
        }
    }

    /// Waits for the entry's turn in its conversation, processes it and carries out what its
    /// outcome requires.
    pub async fn handle_entry(&self, entry: &StreamEntry) -> Outcome {
        let log_id = Uuid::now_v7();
        let span = tracing::info_span!(
            "message",
            log_id = %log_id,
            inbound.id = %entry.id,
            deliveries = entry.deliveries,
            message.id = tracing::field::Empty,
            business.id = tracing::field::Empty,
            conversation.id = tracing::field::Empty,
        );
        async {
            match self.streams.wait_turn(entry).await {
                Ok(Turn::Go) => {}
                Ok(Turn::Unqueued) => {
                    metrics::order_fail_open();
                    tracing::warn!("order queue missing; processing without waiting");
                }
                Ok(Turn::Gone) => return Outcome::AlreadyDone,
                Err(e) => {
                    metrics::record_error(&e, "order queue");
                    return Outcome::RetryLater;
                }
            }
            let Ok(_slot) = self.processing.acquire().await else {
                return Outcome::RetryLater;
            };
            let started = Instant::now();
            let (outcome, label) = tokio::select! {
                done = self.handle_inner(entry, log_id) => done,
                () = self.streams.keep_alive(&entry.id) => unreachable!("keep_alive never returns"),
            };
            let took = started.elapsed();
            metrics::message(label, took);
            tracing::debug!(
                outcome = label.as_str(),
                duration_ms = took.as_millis() as u64,
                "message done"
            );
            outcome
        }
        .instrument(span)
        .await
    }

    async fn handle_inner(&self, entry: &StreamEntry, log_id: Uuid) -> (Outcome, MessageOutcome) {
        if entry.deliveries > self.config.streams.max_deliveries {
            let err = PipelineError::TooManyDeliveries(entry.deliveries);
            metrics::record_error(&err, "message");
            return self.dead_letter(entry, &err, log_id).await;
        }
        // A panic in one message must not take the worker down: it becomes a retryable error,
        // so a message that always panics ends in the dead-letter stream.
        let processed = AssertUnwindSafe(self.handler.process(&entry.id, &entry.fields, log_id))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(PipelineError::Panicked(what))
            });
        match processed {
            Ok(Processed::Answered(reply)) => {
                if self
                    .handler
                    .failpoints()
                    .is_on(failpoint::AFTER_COMMIT_CRASH)
                {
                    tracing::error!("failpoint: crashing after commit, before publish");
                    std::process::exit(86);
                }
                let label = if reply.status == crate::pipeline::ReplyStatus::Fallback {
                    MessageOutcome::Fallback
                } else {
                    MessageOutcome::Ok
                };
                self.publish(entry, &reply, Outcome::Replied, label).await
            }
            Ok(Processed::Duplicate(reply)) => {
                tracing::info!("already answered; publishing the stored reply again");
                self.publish(entry, &reply, Outcome::Duplicate, MessageOutcome::Duplicate)
                    .await
            }
            Err(err @ PipelineError::Validation(_)) => {
                metrics::record_error(&err, "message");
                let reply = self
                    .handler
                    .error_reply(&entry.id, &entry.fields, &err, log_id);
                self.publish(entry, &reply, Outcome::Rejected, MessageOutcome::Error)
                    .await
            }
            Err(err)
                if err.is_retryable() && entry.deliveries < self.config.streams.max_deliveries =>
            {
                metrics::record_error(&err, "message");
                (Outcome::RetryLater, MessageOutcome::Retry)
            }
            Err(err) => {
                metrics::record_error(&err, "message");
                self.dead_letter(entry, &err, log_id).await
            }
        }
    }

    async fn publish(
        &self,
        entry: &StreamEntry,
        reply: &Reply,
        done: Outcome,
        label: MessageOutcome,
    ) -> (Outcome, MessageOutcome) {
        let fields = reply.fields();
        let result = self
            .publish_retry
            .run("redis.publish", || {
                self.streams
                    .publish_and_ack(&reply.destination, &fields, entry)
            })
            .await;
        match result {
            Ok(()) => (done, label),
            Err(e) => {
                // The message stays pending; its redelivery finds the committed reply.
                metrics::record_error(&e, "publish");
                (Outcome::RetryLater, MessageOutcome::Retry)
            }
        }
    }

    async fn dead_letter(
        &self,
        entry: &StreamEntry,
        err: &PipelineError,
        log_id: Uuid,
    ) -> (Outcome, MessageOutcome) {
        let reply = self
            .handler
            .error_reply(&entry.id, &entry.fields, err, log_id);
        let error_fields = [
            ("error_code", err.code().to_owned()),
            ("error_detail", err.to_string()),
            ("deliveries", entry.deliveries.to_string()),
            ("failed_at", chrono::Utc::now().to_rfc3339()),
            ("log_id", log_id.to_string()),
        ];
        let reply_fields = reply.fields();
        let result = self
            .publish_retry
            .run("redis.dead_letter", || {
                self.streams
                    .dead_letter(entry, &error_fields, &reply.destination, &reply_fields)
            })
            .await;
        match result {
            Ok(()) => {
                metrics::dead_letter();
                tracing::warn!(
                    error.code = err.code(),
                    "entry moved to the dead-letter stream"
                );
                (Outcome::DeadLettered, MessageOutcome::DeadLettered)
            }
            Err(e) => {
                metrics::record_error(&e, "dead letter");
                (Outcome::RetryLater, MessageOutcome::Retry)
            }
        }
    }
}

impl<L> Worker<L> {
    /// Marks an entry as held by this process; false when it already is.
    fn hold(&self, id: &str) -> bool {
        self.held
            .lock()
            .map(|mut h| h.insert(id.to_owned()))
            .unwrap_or(true)
    }

    fn release(&self, id: &str) {
        if let Ok(mut h) = self.held.lock() {
            h.remove(id);
        }
    }
}
