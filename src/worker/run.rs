//! The loop of a worker. Four helpers feed one scheduler:
//!
//! - the *reader* claims new entries while the worker has room (held entries below
//!   `worker.max_held`, ready entries below a few times `worker.concurrency`);
//! - the *reclaimer* takes over entries of dead consumers every `claim_idle_ms / 2`, following
//!   XAUTOCLAIM's cursor, even when the worker is full (a dead consumer's heads must move);
//! - the *heartbeat* refreshes every held entry every `claim_idle_ms / 3` and reports those
//!   that are no longer ours;
//! - the *wake listener* forwards queue keys announced by any worker's finish.
//!
//! The scheduler owns the waiting room: it checks the heads of queues that changed (in one
//! pipelined round trip), starts ready entries on free processing slots, and drops lost ones.
//! Retention (trimming, pruning idle consumers) runs on its own timer.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::room::{Checked, Room};
use super::{EntryOutcome, Worker, WorkerStats};
use crate::llm::LlmService;
use crate::retry::Backoff;
use crate::stream::order::{RESUBSCRIBED, Wake};
use crate::stream::{Refresh, StreamEntry, resharding};
use crate::telemetry::metrics::{self, StreamEvent};

/// Head checks per round trip, and round trips before the loop starts ready entries and takes
/// in events again.
const CHECKS_PER_ROUND: usize = 256;
const CHECK_ROUNDS_PER_TURN: usize = 4;
/// XAUTOCLAIM calls in one reclaim pass before pausing (each scans up to 10 × `read_count`
/// pending entries).
const RECLAIM_CALLS_PER_ROUND: usize = 100;
/// Queues the retention sweep visits per round trip, and per retention round at most: every
/// `retention_interval_ms` (10 s) a worker covers 2,000 active queues, so an orphan is found
/// well within `inbound_retain_ms` (5 min) for up to some 30,000 users with a message in
/// flight, fewer with one worker, more with several.
const SWEEP_BATCH: usize = 500;
const SWEEP_PER_ROUND: usize = 2_000;

/// What the helpers tell the scheduler.
enum Event {
    Entries(Vec<StreamEntry>),
    Lost(Vec<(String, Refresh)>),
    Done(String, EntryOutcome),
}

/// How full the worker is, shared with the reader.
#[derive(Default)]
struct Occupancy {
    held: AtomicUsize,
    ready: AtomicUsize,
    changed: Notify,
}

impl<L: LlmService> Worker<L> {
    /// Reads and processes entries until `stop` is cancelled; then stops reading, gives
    /// running messages `worker.shutdown_grace_ms` to finish and returns. Entries not finished
    /// stay pending for other workers.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
        while let Err(e) = self.ensure_group().await {
            metrics::record_error(&e, "consumer group");
            if backoff.wait(&stop).await {
                return;
            }
        }
        // The helpers stop with the worker, and when it returns (whatever the reason).
        let helpers_stop = stop.child_token();
        let _helpers_stopped = helpers_stop.clone().drop_guard();
        let concurrency = self.config.worker.concurrency.max(1);
        let occupancy = Arc::new(Occupancy::default());
        let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
        let (wake_tx, mut wakes) = mpsc::unbounded_channel::<Vec<u8>>();
        let mut room = Room::default();
        let mut helpers = self.spawn_helpers(&room, &occupancy, &events_tx, wake_tx, &helpers_stop);
        tracing::info!(
            consumer = self.streams.consumer(),
            concurrency,
            "worker started"
        );

        let mut tasks = JoinSet::new();
        let poll_every = Duration::from_millis(self.config.worker.queue_poll_ms.max(10));
        let mut poll =
            tokio::time::interval_at(tokio::time::Instant::now() + poll_every, poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges = tokio::time::interval(Duration::from_secs(5));
        let mut head_backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            if stop.is_cancelled() {
                break;
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(event) = events.recv() => self.on_event(&mut room, event),
                Some(payload) = wakes.recv() => self.on_wake(&mut room, &payload),
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = poll.tick() => {
                    let n = room.touch_quiet(poll_every);
                    WorkerStats::add(&self.stats.polled_checks, n as u64);
                }
                () = self.slots.freed(self.place) => {}
                _ = gauges.tick() => {
                    let worker = self.clone();
                    let held = room.len();
                    tokio::spawn(async move { worker.gauges(held).await });
                }
                // Checks left over from the last turn: continue once events are taken in.
                () = tokio::task::yield_now(), if room.has_checks() => {}
            }
            // Take in everything that arrived meanwhile before the next round trip.
            while let Ok(event) = events.try_recv() {
                self.on_event(&mut room, event);
            }
            while let Ok(payload) = wakes.try_recv() {
                self.on_wake(&mut room, &payload);
            }
            if self.check_heads(&mut room).await {
                head_backoff.reset();
            } else {
                // Redis failed: back off (a stop seen here ends the loop at its top).
                let _ = head_backoff.wait(&stop).await;
            }
            self.start_ready(&mut room, &mut tasks, &events_tx);
            occupancy.held.store(room.len(), Ordering::Relaxed);
            occupancy
                .ready
                .store(room.startable_len(self.business_cap()), Ordering::Relaxed);
            occupancy.changed.notify_one();
        }

        tracing::info!(
            held = room.len(),
            running = tasks.len(),
            "stopping: finishing running messages"
        );
        self.drain(&mut tasks).await;
        helpers.abort_all();
        tracing::info!("worker stopped");
    }

    /// Starts the helpers that feed the scheduler (see the module docs).
    fn spawn_helpers(
        self: &Arc<Self>,
        room: &Room,
        occupancy: &Arc<Occupancy>,
        events: &mpsc::UnboundedSender<Event>,
        wakes: mpsc::UnboundedSender<Vec<u8>>,
        stop: &CancellationToken,
    ) -> JoinSet<()> {
        let mut helpers = JoinSet::new();
        helpers.spawn(
            self.clone()
                .read_loop(occupancy.clone(), events.clone(), stop.clone()),
        );
        helpers.spawn(self.clone().reclaim_loop(events.clone(), stop.clone()));
        helpers.spawn(
            self.clone()
                .heartbeat_loop(room.shared_ids(), events.clone(), stop.clone()),
        );
        helpers.spawn(self.clone().retention_loop(stop.clone()));
        // One watch per process, however many shards it reads.
        if self.place == 0 {
            helpers.spawn(crate::definitions::live::watch_definitions(
                self.handler.store().clone(),
                self.handler.cache().clone(),
                stop.clone(),
            ));
        }
        if !self.wake_ups.is_empty() {
            let clients = self.wake_ups.clone();
            let (worker, stop) = (self.clone(), stop.clone());
            helpers.spawn(async move {
                worker
                    .streams
                    .listen_for_wake_ups(clients, wakes, stop)
                    .await
            });
        }
        helpers
    }

    /// Gives running messages `worker.shutdown_grace_ms` to finish, then aborts the rest
    /// (their entries stay pending for other workers).
    async fn drain(&self, tasks: &mut JoinSet<()>) {
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
    }

    /// Checks the heads of the queues that changed, a few round trips at most per turn;
    /// returns false when Redis failed (the checks stay due).
    async fn check_heads(&self, room: &mut Room) -> bool {
        let mut rounds = 0;
        while room.has_checks() && rounds < CHECK_ROUNDS_PER_TURN {
            rounds += 1;
            let checks = room.next_checks(CHECKS_PER_ROUND);
            let pairs: Vec<_> = checks.iter().map(|(s, id)| (s, id.as_str())).collect();
            match self.streams.check_heads(&pairs).await {
                Ok(results) => {
                    for ((slot, id), check) in checks.iter().zip(results) {
                        self.healed(check.healed, check.trimmed, "head check");
                        if room.apply(slot, id, check) == Checked::Gone {
                            self.lost(Refresh::Gone);
                        }
                    }
                }
                Err(e) => {
                    metrics::record_error(&e, "order queue");
                    for (slot, _) in &checks {
                        room.touch(&slot.key);
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Starts ready entries on free processing slots, each in a task of its own that reports
    /// its outcome (or `Lost` when the heartbeat cancels it).
    fn start_ready(
        self: &Arc<Self>,
        room: &mut Room,
        tasks: &mut JoinSet<()>,
        events: &mpsc::UnboundedSender<Event>,
    ) {
        let cap = self.business_cap();
        while let Some(permit) = self
            .slots
            .try_take(self.place, || room.startable_len(&cap) > 0)
        {
            let token = CancellationToken::new();
            let Some((entry, needs_fields, waits)) = room.start_next(&token, &cap) else {
                drop(permit);
                self.slots.idle(self.place);
                break;
            };
            let worker = self.clone();
            let events = events.clone();
            worker.stats.started();
            tasks.spawn(async move {
                let id = entry.id.clone();
                // A panic outside the pipeline (decoding, finishing) must not leave the entry
                // held forever: it is given up like a transient failure.
                let work = AssertUnwindSafe(worker.run_entry(entry, needs_fields, waits))
                    .catch_unwind()
                    .map(|r| {
                        r.unwrap_or_else(|_| {
                            tracing::error!("an entry's task panicked; it will be redelivered");
                            EntryOutcome::RetryLater
                        })
                    });
                let outcome = tokio::select! {
                    biased;
                    () = token.cancelled() => EntryOutcome::Lost,
                    o = work => o,
                };
                drop(permit);
                worker.stats.ended();
                let _ = events.send(Event::Done(id, outcome));
            });
        }
    }

    /// How many entries of a business may run at once here: its definition's
    /// `budget.max_in_flight` when this process holds it, else `worker.max_in_flight_per_business`
    /// (0: no cap).
    fn business_cap(&self) -> impl Fn(Option<uuid::Uuid>) -> usize + '_ {
        let default = match self.config.worker.max_in_flight_per_business {
            0 => usize::MAX,
            n => n,
        };
        let local = self.handler.cache().local();
        move |business| {
            let Some(id) = business else {
                return usize::MAX;
            };
            // A cap of 0 (refused at import, but possible by SQL) would stall the business.
            match local
                .business(id)
                .and_then(|b| b.policy.budget.max_in_flight)
            {
                Some(n) if n > 0 => n as usize,
                _ => default,
            }
        }
    }

    /// A wake-up, or the news that the wake-up subscription was (re)established.
    fn on_wake(&self, room: &mut Room, payload: &[u8]) {
        if payload == RESUBSCRIBED {
            let n = room.touch_all();
            tracing::debug!(
                queues = n,
                "wake-ups (re)subscribed: checking every waiting queue"
            );
        } else if room.wake(&Wake::decode(payload)) {
            WorkerStats::add(&self.stats.wakes, 1);
        }
    }

    fn on_event(self: &Arc<Self>, room: &mut Room, event: Event) {
        match event {
            Event::Entries(entries) => {
                for entry in entries {
                    if !room.admit(entry) {
                        tracing::debug!("reclaimed an entry this worker still holds");
                    }
                }
            }
            Event::Lost(lost) => {
                let mut unwatched = Vec::new();
                for (id, why) in lost {
                    if room.holds(&id) {
                        self.lost(why);
                        if let Some(slot) = room.remove(&id)
                            && !room.touch(&slot.key)
                            && why == Refresh::Gone
                        {
                            unwatched.push(slot.key);
                        }
                    }
                }
                // An entry gone from the pending list (trimmed, its consumer deleted) may be
                // the head of a queue nobody here waits on any more: heal those queues now, so
                // that it is dead-lettered at once rather than at the next sweep.
                if !unwatched.is_empty() {
                    unwatched.sort();
                    unwatched.dedup();
                    let worker = self.clone();
                    tokio::spawn(async move {
                        match worker.streams.heal_queues(&unwatched).await {
                            Ok((healed, trimmed)) => worker.healed(healed, trimmed, "lost entries"),
                            Err(e) => metrics::record_error(&e, "order queue"),
                        }
                    });
                }
            }
            Event::Done(id, outcome) => {
                if outcome == EntryOutcome::Lost {
                    return;
                }
                if let Some(slot) = room.remove(&id)
                    && matches!(
                        outcome,
                        EntryOutcome::RetryLater | EntryOutcome::AlreadyDone
                    )
                {
                    // Not dequeued here, so no wake-up names the next head: this worker may
                    // hold the next entry of that queue (the check tells).
                    room.touch(&slot.key);
                }
            }
        }
    }

    /// Counts stale queue heads removed by `by` (each dead-lettered), `trimmed` of them gone
    /// from the stream.
    fn healed(&self, healed: u64, trimmed: u64, by: &'static str) {
        if healed == 0 {
            return;
        }
        metrics::stream_event(StreamEvent::HeadHealed, healed);
        metrics::stream_event(StreamEvent::EntryTrimmed, trimmed);
        WorkerStats::add(&self.stats.heads_healed, healed);
        tracing::warn!(healed, trimmed, by, "removed stale queue heads");
    }

    /// Creates the consumer group if it is missing; says loudly when it had disappeared and was
    /// recreated at its delivery mark.
    async fn ensure_group(&self) -> Result<(), crate::error::StreamError> {
        let Some(mark) = self.streams.ensure_group().await? else {
            return Ok(());
        };
        metrics::stream_event(StreamEvent::GroupRecreated, 1);
        tracing::error!(
            group = %self.config.streams.group,
            mark = %mark,
            "the consumer group had disappeared (XGROUP DESTROY, or a restore without it); \
             recreated at the last delivered entry: entries it held unanswered are \
             dead-lettered as stream.orphaned"
        );
        Ok(())
    }

    fn lost(&self, why: Refresh) {
        let (event, counter) = match why {
            Refresh::Taken => (StreamEvent::LostTaken, &self.stats.lost_taken),
            Refresh::Gone | Refresh::Kept => (StreamEvent::LostGone, &self.stats.lost_gone),
        };
        metrics::stream_event(event, 1);
        WorkerStats::add(counter, 1);
    }

    /// One entry whose turn has come: its fields fetched if it waited without them, then
    /// processed.
    async fn run_entry(
        &self,
        mut entry: StreamEntry,
        needs_fields: bool,
        waits: super::Waits,
    ) -> EntryOutcome {
        if needs_fields {
            match self.streams.fetch(&entry.id).await {
                Ok(Some(fields)) => entry.fields = fields,
                Ok(None) => return self.vanished(&entry).await,
                Err(e) => {
                    metrics::record_error(&e, "fetch entry");
                    return EntryOutcome::RetryLater;
                }
            }
        }
        self.handle_entry_after(&entry, &waits).await
    }

    async fn read_loop(
        self: Arc<Self>,
        occupancy: Arc<Occupancy>,
        events: mpsc::UnboundedSender<Event>,
        stop: CancellationToken,
    ) {
        // A shard of the new layout during a move reads once the previous one has drained.
        if let Some(resharding::Part::New(switch)) = &self.part {
            switch.wait(&stop).await;
            tracing::info!(stream = %self.config.streams.inbound, "reading a shard of the new layout");
        }
        let max_held = self.config.worker.max_held.max(1);
        let ready_limit = self.config.worker.concurrency.max(1) * 4;
        let read_count = self.config.streams.read_count.max(1);
        let mut cursor = "0-0".to_owned();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            if stop.is_cancelled() {
                return;
            }
            let held = occupancy.held.load(Ordering::Relaxed);
            if held >= max_held || occupancy.ready.load(Ordering::Relaxed) >= ready_limit {
                tokio::select! {
                    () = occupancy.changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
            let count = read_count.min(max_held - held);
            match self.streams.read_new(count, &mut cursor).await {
                Ok(entries) => {
                    backoff.reset();
                    if !entries.is_empty() {
                        // Counted as held at once, before the scheduler takes them in.
                        occupancy.held.fetch_add(entries.len(), Ordering::Relaxed);
                        if events.send(Event::Entries(entries)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    metrics::record_error(&e, "stream read");
                    if e.is_no_group()
                        && let Err(e) = self.ensure_group().await
                    {
                        metrics::record_error(&e, "consumer group");
                    }
                    if backoff.wait(&stop).await {
                        return;
                    }
                }
            }
        }
    }

    async fn reclaim_loop(
        self: Arc<Self>,
        events: mpsc::UnboundedSender<Event>,
        stop: CancellationToken,
    ) {
        let every = Duration::from_millis((self.config.streams.claim_idle_ms / 2).max(50));
        let count = self.config.streams.read_count.max(1);
        let mut cursor = "0-0".to_owned();
        let mut calls_this_round = 0;
        loop {
            // One XAUTOCLAIM looks at no more than 10 × COUNT pending entries: a pass over a
            // long pending list (live workers hold many) continues at once, up to
            // RECLAIM_CALLS_PER_ROUND calls, and resumes after the pause.
            let mid_scan = cursor != "0-0" && calls_this_round < RECLAIM_CALLS_PER_ROUND;
            if !mid_scan {
                calls_this_round = 0;
                if wait_or_stop(&stop, every).await {
                    return;
                }
            } else if stop.is_cancelled() {
                return;
            }
            calls_this_round += 1;
            match self.streams.reclaim(&cursor, count).await {
                Ok(found) => {
                    cursor = found.cursor;
                    if !found.deleted.is_empty() {
                        metrics::stream_event(StreamEvent::Deleted, found.deleted.len() as u64);
                        tracing::warn!(
                            count = found.deleted.len(),
                            "pending entries no longer in the stream were dropped"
                        );
                    }
                    if !found.entries.is_empty() {
                        tracing::info!(count = found.entries.len(), "reclaimed idle entries");
                        if events.send(Event::Entries(found.entries)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    metrics::record_error(&e, "reclaim");
                    if e.is_no_group() {
                        cursor = "0-0".to_owned();
                    }
                }
            }
        }
    }

    async fn heartbeat_loop(
        self: Arc<Self>,
        held: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
        events: mpsc::UnboundedSender<Event>,
        stop: CancellationToken,
    ) {
        let every = Duration::from_millis((self.config.streams.claim_idle_ms / 3).max(50));
        loop {
            if wait_or_stop(&stop, every).await {
                return;
            }
            let ids: Vec<String> = held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .cloned()
                .collect();
            if ids.is_empty() {
                continue;
            }
            match self.streams.keep_alive(&ids).await {
                Ok(lost) if lost.is_empty() => {}
                Ok(lost) => {
                    tracing::warn!(
                        count = lost.len(),
                        "held entries are no longer ours; dropping them"
                    );
                    if events.send(Event::Lost(lost)).is_err() {
                        return;
                    }
                }
                Err(e) => metrics::record_error(&e, "heartbeat"),
            }
        }
    }

    async fn retention_loop(self: Arc<Self>, stop: CancellationToken) {
        let s = &self.config.streams;
        let every = Duration::from_millis(s.retention_interval_ms.max(100));
        let mut sweep_cursor = 0u64;
        loop {
            if wait_or_stop(&stop, every).await {
                return;
            }
            // Up to SWEEP_PER_ROUND queues a round, in batches, resuming where it stopped.
            let mut visited = 0;
            while visited < SWEEP_PER_ROUND {
                match self.streams.sweep_queues(sweep_cursor, SWEEP_BATCH).await {
                    Ok((next, (healed, trimmed))) => {
                        self.healed(healed, trimmed, "sweep");
                        sweep_cursor = next;
                        visited += SWEEP_BATCH;
                        if next == 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        metrics::record_error(&e, "sweep queues");
                        break;
                    }
                }
            }
            match self.streams.trim_inbound(s.inbound_retain_ms).await {
                Ok(n) => {
                    metrics::stream_event(StreamEvent::Trimmed, n);
                    WorkerStats::add(&self.stats.trimmed, n);
                }
                Err(e) => metrics::record_error(&e, "trim inbound"),
            }
            match self.streams.prune_consumers(s.consumer_idle_ms).await {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(count = n, "removed idle consumers with nothing pending");
                    }
                    metrics::stream_event(StreamEvent::ConsumerPruned, n);
                    WorkerStats::add(&self.stats.consumers_pruned, n);
                }
                Err(e) => metrics::record_error(&e, "prune consumers"),
            }
        }
    }

    async fn gauges(&self, held: usize) {
        let shard = self.config.streams.shard.unwrap_or(0);
        metrics::inflight(self.slots.running());
        metrics::held(shard, held);
        if let Ok((pending, lag)) = self.streams.group_state().await {
            metrics::stream_state(shard, pending, lag);
        }
        if let Ok(n) = self.streams.dead_letters_waiting().await {
            let maxlen = self.config.streams.dead_letter_maxlen as u64;
            metrics::dead_letters_waiting(shard, n, maxlen);
        }
        let (idle, busy) = self.handler.store().pool_usage();
        metrics::db_pool(idle, busy);
    }
}

/// Sleeps for `d` (a helper's period) unless `stop` comes first; returns whether to stop.
async fn wait_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    stop.run_until_cancelled(tokio::time::sleep(d))
        .await
        .is_none()
        || stop.is_cancelled()
}
