//! The read loop of a worker: admission, reading new entries, reclaiming stale ones, and the
//! graceful stop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use super::{WAITING_FACTOR, Worker};
use crate::error::CacheError;
use crate::llm::LlmService;
use crate::stream::StreamEntry;
use crate::telemetry::metrics;

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

        let listener = {
            let (worker, rx) = (self.clone(), stop_rx.clone());
            tokio::spawn(async move { worker.streams.listen_for_wake_ups(rx).await })
        };
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
        listener.abort();
        tracing::info!("worker stopped");
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
