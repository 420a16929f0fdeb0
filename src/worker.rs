//! The worker: takes entries from the inbound stream (new ones, and stale ones of dead
//! consumers), runs each through the pipeline under a concurrency bound, and decides from the
//! outcome whether to publish and ack, leave it pending for redelivery, or dead-letter it.

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;
use uuid::Uuid;

use crate::cache::{self, Cache};
use crate::config::Config;
use crate::error::{CacheError, Classify, PipelineError};
use crate::llm::{CircuitBreaker, LlmService, OpenAiClient};
use crate::pipeline::failpoint::{self, Failpoints};
use crate::pipeline::{MessageHandler, Processed, Reply};
use crate::retry::RetryPolicy;
use crate::store::Store;
use crate::stream::{StreamEntry, Streams, Turn};
use crate::telemetry::metrics::{self, MessageOutcome};
use crate::telemetry::server;

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

impl<L: LlmService> Worker<L> {
    /// Reads and processes entries until `shutdown` completes; then stops reading, gives
    /// in-flight messages `worker.shutdown_grace_ms` to finish and returns. Entries still
    /// unfinished stay pending for other workers.
    ///
    /// Up to `WAITING_FACTOR × concurrency` entries may be held (most of them waiting for
    /// their turn in their conversation); `concurrency` of them are processed at once. Stale
    /// entries of dead consumers are claimed on a timer even when that bound is reached, so a
    /// dead consumer's queue heads are always taken over.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });

        while let Err(e) = self.streams.ensure_group().await {
            metrics::record_error(&e, "consumer group");
            if wait_or_stop(&mut stop_rx, Duration::from_secs(1)).await {
                return;
            }
        }
        let concurrency = self.config.worker.concurrency.max(1);
        let admission = Arc::new(Semaphore::new(concurrency * WAITING_FACTOR));
        let mut tasks = JoinSet::new();
        let claim_every = Duration::from_millis((self.config.streams.claim_idle_ms / 2).max(100));
        let mut next_claim = tokio::time::Instant::now();
        let mut last_gauges = Instant::now();
        let mut cursor = "0-0".to_owned();
        let mut failures = 0u32;
        tracing::info!(
            consumer = self.streams.consumer(),
            concurrency,
            "worker started"
        );

        loop {
            while tasks.try_join_next().is_some() {}
            if *stop_rx.borrow() {
                break;
            }
            let first = tokio::select! {
                p = admission.clone().acquire_owned() => match p { Ok(p) => Some(p), Err(_) => break },
                _ = tokio::time::sleep_until(next_claim) => None,
                _ = stop_rx.changed() => continue,
            };
            let mut batch: Vec<(StreamEntry, Option<OwnedSemaphorePermit>)> = Vec::new();
            let mut result = Ok(());
            if tokio::time::Instant::now() >= next_claim {
                next_claim = tokio::time::Instant::now() + claim_every;
                match self
                    .streams
                    .claim_stale(self.config.streams.read_count.max(1))
                    .await
                {
                    Ok(stale) => batch.extend(stale.into_iter().map(|e| (e, None))),
                    Err(e) => result = Err(e),
                }
            }
            if let (Some(first), Ok(())) = (first, &result) {
                let mut permits = vec![first];
                while permits.len() < self.config.streams.read_count.max(1) {
                    match admission.clone().try_acquire_owned() {
                        Ok(p) => permits.push(p),
                        Err(_) => break,
                    }
                }
                match self.streams.read_new(permits.len(), &mut cursor).await {
                    Ok(entries) => {
                        batch.extend(entries.into_iter().zip(permits.into_iter().map(Some)));
                    }
                    Err(e) => result = Err(e),
                }
            }
            for (entry, permit) in batch {
                if !self.hold(&entry.id) {
                    continue;
                }
                let worker = self.clone();
                tasks.spawn(async move {
                    let _admitted = permit;
                    let outcome = worker.handle_entry(&entry).await;
                    worker.release(&entry.id);
                    outcome
                });
            }
            match result {
                Ok(()) => failures = 0,
                Err(e) => {
                    metrics::record_error(&e, "stream read");
                    if is_nogroup(&e) {
                        let _ = self.streams.ensure_group().await;
                    }
                    failures = failures.saturating_add(1);
                    let wait = Duration::from_millis(100 * u64::from(failures.min(20)));
                    if wait_or_stop(&mut stop_rx, wait).await {
                        break;
                    }
                }
            }
            metrics::inflight(concurrency - self.processing.available_permits());
            if last_gauges.elapsed() >= Duration::from_secs(5) {
                last_gauges = Instant::now();
                if let Ok((pending, lag)) = self.streams.group_state().await {
                    metrics::stream_state(pending, lag);
                }
                let (idle, busy) = self.handler.store().pool_usage();
                metrics::db_pool(idle, busy);
            }
        }

        tracing::info!(held = tasks.len(), "stopping: finishing in-flight messages");
        let grace = Duration::from_millis(self.config.worker.shutdown_grace_ms);
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "grace period over; unfinished messages stay pending"
            );
            tasks.abort_all();
        }
        tracing::info!("worker stopped");
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

fn is_nogroup(e: &CacheError) -> bool {
    matches!(e, CacheError::Redis(r) if r.code() == Some("NOGROUP"))
}

/// Sleeps for `d` unless the stop signal comes first; returns whether to stop.
async fn wait_or_stop(rx: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *rx.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *rx.borrow(),
        _ = rx.changed() => true,
    }
}

/// Connects everything the configuration names and runs one worker until `shutdown`.
///
/// # Errors
/// Invalid configuration (URLs), or a telemetry address that cannot be bound.
pub async fn run_until_stopped(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let handle = metrics::install();
    let store = Store::connect(&config.database)?;
    let conn = connect_redis_patiently(&config).await?;
    let reader = connect_redis_patiently(&config).await?;
    let cache = Cache::new(conn.clone(), &config.redis, &config.cache);
    let llm = CircuitBreaker::new(OpenAiClient::new(&config.llm)?, &config.llm);
    let handler = Arc::new(MessageHandler::new(
        config.clone(),
        store.clone(),
        cache.clone(),
        llm,
        Failpoints::from_env(),
    ));
    let streams = Streams::new(
        reader,
        conn,
        config.streams.clone(),
        &config.redis.key_prefix,
    );
    let worker = Arc::new(Worker::new(config.clone(), handler, streams));

    let (stop_tx, stop_rx) = watch::channel(false);
    let telemetry = if config.telemetry.listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&config.telemetry.listen)
            .await
            .map_err(WorkerError::Telemetry)?;
        tracing::info!(addr = %config.telemetry.listen, "serving /metrics, /healthz, /readyz");
        let (s, c) = (store.clone(), cache.clone());
        let ready: server::ReadyCheck = Arc::new(move || {
            let (s, c) = (s.clone(), c.clone());
            Box::pin(async move {
                s.ping().await.map_err(|e| format!("postgres: {e}"))?;
                c.ping().await.map_err(|e| format!("redis: {e}"))?;
                let (idle, busy) = s.pool_usage();
                metrics::db_pool(idle, busy);
                Ok(())
            })
        });
        let mut rx = stop_rx.clone();
        Some(tokio::spawn(server::serve(
            listener,
            handle,
            ready,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )))
    };
    worker
        .run(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    if let Some(t) = telemetry {
        let _ = t.await;
    }
    drop(stop_rx);
    Ok(())
}

async fn connect_redis_patiently(
    config: &Config,
) -> Result<redis::aio::ConnectionManager, CacheError> {
    let mut attempt = 0u32;
    loop {
        match cache::connect(&config.redis).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_retryable() && attempt < 60 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "redis not reachable yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
