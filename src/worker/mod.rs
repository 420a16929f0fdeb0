//! The worker: holds entries from the moment the group delivers them (or it reclaims them from a
//! dead consumer) until it finishes them, runs each through the pipeline when its turn comes,
//! and decides from the outcome whether to publish and ack, leave it pending for redelivery, or
//! dead-letter it.
//!
//! - [`run`](Worker::run): the loop: reading, reclaiming, the heartbeat, retention, and the
//!   waiting room that starts each user's entries in stream order;
//! - `room`: the waiting room (which held entry waits, which is ready, which runs);
//! - [`slots`]: the processing slots the shard loops of one process share, fairly;
//! - this module: one entry's path, from decoding to the fenced finish.

mod room;
mod run;
pub mod slots;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tracing::Instrument;
use uuid::Uuid;

use crate::cache::CacheWrite;
use crate::config::Config;
use crate::error::{Classify, PipelineError, StoreError, StreamError, ValidationError};
use crate::llm::LlmService;
use crate::model::{AnswerStatus, Business};
use crate::pipeline::{Attempt, MessageHandler, Processed, failpoint};
use crate::protocol::{self, InboundMessage, Reply};
use crate::retry::RetryPolicy;
use crate::stream::order::{self, QueueSlot};
use crate::stream::{Finish, StreamEntry, Streams, resharding};
use crate::telemetry::metrics::{self, MessageOutcome, StreamEvent};
use crate::telemetry::trace_context;
use crate::telemetry::traces::phase_span;

/// The dead-letter code of an entry gone from the stream before it was answered.
pub const TRIMMED: &str = "stream.trimmed";

/// A statement the server cancelled this close to the message's deadline was cancelled by it.
const DEADLINE_SLACK: Duration = Duration::from_millis(250);

/// The most later messages one coalesced turn takes in.
pub const MAX_COALESCED: usize = 20;
/// The texts of one coalesced turn together are at most this many times
/// `limits.max_content_bytes`.
pub const MAX_COALESCED_CONTENTS: usize = 4;

/// What happened to one entry (the loop and the tests match on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryOutcome {
    /// Answered (`ok` or `fallback`), published and acked.
    Replied,
    /// Already answered before: the stored answer was published again and the entry acked.
    Duplicate,
    /// Invalid input: an error reply was published and the entry acked; nothing was stored.
    Rejected,
    /// A transient failure: left pending, to be reclaimed after `claim_idle_ms`.
    RetryLater,
    /// Failed for good (or too often): moved to the dead-letter stream, error reply published.
    DeadLettered,
    /// Another holder finished it first: this worker published nothing.
    AlreadyDone,
    /// Another consumer took it over, or it left the pending list, while this worker held it:
    /// its work here was dropped.
    Lost,
    /// It was removed from the stream while it waited for its turn: acked and dead-lettered
    /// as `stream.trimmed` (no reply: where it should go is gone with it).
    Vanished,
    /// Its user was erased after it arrived (`icmp user erase`): acked without a reply, nothing
    /// stored.
    Erased,
}

/// The metric label of an answer's status.
fn answered_as(status: AnswerStatus) -> MessageOutcome {
    match status {
        AnswerStatus::Fallback => MessageOutcome::Fallback,
        AnswerStatus::Throttled => MessageOutcome::Throttled,
        AnswerStatus::Ok | AnswerStatus::Coalesced | AnswerStatus::Handoff => MessageOutcome::Ok,
    }
}

impl EntryOutcome {
    /// The outcome's name in traces.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            EntryOutcome::Replied => "replied",
            EntryOutcome::Duplicate => "duplicate",
            EntryOutcome::Rejected => "rejected",
            EntryOutcome::RetryLater => "retry_later",
            EntryOutcome::DeadLettered => "dead_lettered",
            EntryOutcome::AlreadyDone => "already_done",
            EntryOutcome::Lost => "lost",
            EntryOutcome::Vanished => "vanished",
            EntryOutcome::Erased => "erased",
        }
    }
}

/// When an entry came to this worker and when its turn came (the head of its user's queue),
/// for the `wait for turn` and `wait for a slot` spans of its trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct Waits {
    pub received: Option<std::time::SystemTime>,
    pub turn: Option<std::time::SystemTime>,
}

impl Waits {
    fn add_to(&self, trace: &trace_context::MessageSpan) {
        let now = std::time::SystemTime::now();
        if let Some(received) = self.received {
            let turn = self.turn.unwrap_or(now);
            trace.waited("wait for turn", received, turn);
            trace.waited("wait for a slot", turn, now);
        }
    }
}

/// Counters of one worker, for its own tests and for `icmp status`-like introspection; the
/// same events also go to the process-wide metrics.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub replied: AtomicU64,
    pub rejected: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub duplicates: AtomicU64,
    pub retries_later: AtomicU64,
    /// Finishes that found the entry acknowledged by another holder (published nothing).
    pub fenced: AtomicU64,
    /// Held entries dropped because another consumer owns them now.
    pub lost_taken: AtomicU64,
    /// Held entries dropped because they left the pending list.
    pub lost_gone: AtomicU64,
    /// Stale queue heads removed.
    pub heads_healed: AtomicU64,
    /// Queue keys announced by any worker that this worker waited on.
    pub wakes: AtomicU64,
    /// Head checks run because of the slow safety-net poll.
    pub polled_checks: AtomicU64,
    pub vanished: AtomicU64,
    /// Messages dropped because their user was erased after they arrived.
    pub erased: AtomicU64,
    /// Messages answered by the reply of an earlier message of their user (coalesced turns).
    pub coalesced: AtomicU64,
    pub trimmed: AtomicU64,
    pub consumers_pruned: AtomicU64,
    /// Messages being processed now, and the most at once so far.
    pub running: AtomicU64,
    pub peak_running: AtomicU64,
}

impl WorkerStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn started(&self) {
        let now = self.running.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_running.fetch_max(now, Ordering::Relaxed);
    }

    fn ended(&self) {
        self.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One worker process's loop over its streams and pipeline.
pub struct Worker<L> {
    handler: Arc<MessageHandler<L>>,
    streams: Streams,
    /// Where wake-ups are subscribed, in turn while one is unreachable (the seed nodes of a
    /// cluster, which broadcasts them); none: the slow poll alone.
    wake_ups: Vec<redis::Client>,
    config: Config,
    finish_retry: RetryPolicy,
    stats: Arc<WorkerStats>,
    /// The processing slots, shared with the process's other shard loops, and this loop's
    /// place among them.
    slots: Arc<slots::Slots>,
    place: usize,
    /// Its part in a move between shard layouts, while one is under way.
    part: Option<resharding::Part>,
}

impl<L> std::fmt::Debug for Worker<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl<L> Worker<L> {
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    pub fn streams(&self) -> &Streams {
        &self.streams
    }
}

impl<L: LlmService> Worker<L> {
    /// The pipeline this worker runs (shared by the process's workers).
    pub fn handler(&self) -> &Arc<MessageHandler<L>> {
        &self.handler
    }

    pub fn new(
        config: Config,
        handler: Arc<MessageHandler<L>>,
        streams: Streams,
        wake_ups: Vec<redis::Client>,
    ) -> Self {
        Worker {
            finish_retry: RetryPolicy::new(config.retry.clone()),
            stats: Arc::new(WorkerStats::default()),
            slots: slots::Slots::new(config.worker.concurrency, 1),
            place: 0,
            part: None,
            handler,
            streams,
            wake_ups,
            config,
        }
    }

    /// This worker as the loop of one shard among several of one process: at `place` in
    /// `slots`, counting into `stats`.
    #[must_use]
    pub fn sharing(
        mut self,
        slots: Arc<slots::Slots>,
        place: usize,
        stats: Arc<WorkerStats>,
    ) -> Self {
        self.slots = slots;
        self.place = place;
        self.stats = stats;
        self
    }

    /// This worker as a loop of the new or of the previous layout during a move.
    #[must_use]
    pub fn moving(mut self, part: resharding::Part) -> Self {
        self.part = Some(part);
        self
    }

    /// Processes one entry whose turn has come (or that has no queue) and carries out what its
    /// outcome requires.
    pub async fn handle_entry(&self, entry: &StreamEntry) -> EntryOutcome {
        self.handle_entry_after(entry, &Waits::default()).await
    }

    /// [`Worker::handle_entry`] of an entry that waited in this worker before it started (the
    /// waits become spans of its trace).
    pub async fn handle_entry_after(&self, entry: &StreamEntry, waits: &Waits) -> EntryOutcome {
        let log_id = Uuid::now_v7();
        let streams = self.streams.config();
        let trace = trace_context::MessageSpan::start(
            &entry.fields,
            trace_context::Delivery {
                stream: &streams.inbound,
                group: &streams.group,
                entry_id: &entry.id,
                deliveries: entry.deliveries,
            },
        );
        waits.add_to(&trace);
        // Decoded before the span is made, so that the span starts with what the message says:
        // the JSON log layer re-serializes all of a span's fields on every later `record`.
        let decoded = self.decode(&entry.id, &entry.fields);
        let msg = decoded.as_ref().ok();
        let counted;
        let entry = match msg {
            Some(m) if self.may_have_followed(entry, m) => {
                counted = StreamEntry {
                    counted: true,
                    ..entry.clone()
                };
                &counted
            }
            _ => entry,
        };
        let span = tracing::info_span!(
            "message",
            log_id = %log_id,
            inbound.id = %entry.id,
            deliveries = entry.deliveries,
            // A first delivery's start is attempt 1 without a count ([`Worker::count_attempt`]).
            attempt = msg.filter(|_| !entry.counted).map(|_| 1u64),
            message.id = msg.map(InboundMessage::idempotency_key),
            business.id = msg.map(|m| tracing::field::display(m.business_id)),
            conversation.id = tracing::field::Empty,
            stage = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        trace.adopt(&span);
        let outcome = async {
            let started = Instant::now();
            let (outcome, label) = self.handle_inner(entry, &decoded, log_id).await;
            let took = started.elapsed();
            if let Some(label) = label {
                metrics::message(label, took);
            }
            let counter = match outcome {
                EntryOutcome::Replied => Some(&self.stats.replied),
                EntryOutcome::Duplicate => Some(&self.stats.duplicates),
                EntryOutcome::Rejected => Some(&self.stats.rejected),
                EntryOutcome::RetryLater => Some(&self.stats.retries_later),
                EntryOutcome::DeadLettered => Some(&self.stats.dead_lettered),
                EntryOutcome::AlreadyDone => Some(&self.stats.fenced),
                EntryOutcome::Erased => Some(&self.stats.erased),
                EntryOutcome::Lost | EntryOutcome::Vanished => None,
            };
            if let Some(c) = counter {
                WorkerStats::add(c, 1);
            }
            tracing::Span::current().record("outcome", outcome.as_str());
            tracing::debug!(
                outcome = ?outcome,
                duration_ms = took.as_millis() as u64,
                "message done"
            );
            outcome
        }
        .instrument(span)
        .await;
        trace.end(outcome.as_str());
        outcome
    }

    async fn handle_inner(
        &self,
        entry: &StreamEntry,
        decoded: &Result<InboundMessage, ValidationError>,
        log_id: Uuid,
    ) -> (EntryOutcome, Option<MessageOutcome>) {
        // By reference: a message moved in would be kept twice in the task.
        let msg = match decoded {
            Ok(msg) => msg,
            Err(e) => {
                return self
                    .reject(entry, &PipelineError::from(e.clone()), log_id)
                    .await;
            }
        };
        let attempt = match self.count_attempt(entry).await {
            Ok(attempt) => attempt,
            Err(e) => {
                metrics::record_error(&e, "attempt count");
                return (EntryOutcome::RetryLater, Some(MessageOutcome::Retry));
            }
        };
        if entry.counted {
            tracing::Span::current().record("attempt", attempt.number);
        }
        if attempt.number > self.config.streams.max_deliveries {
            let err = PipelineError::TooManyDeliveries(attempt.number);
            metrics::record_error(&err, "message");
            return self.dead_letter(entry, &err, log_id).await;
        }
        let processed = self.process(entry, msg, log_id, attempt).await;
        self.conclude(entry, msg, processed, attempt, log_id).await
    }

    /// An entry's message, valid and on its user's shard.
    fn decode(
        &self,
        id: &str,
        fields: &protocol::RawFields,
    ) -> Result<InboundMessage, ValidationError> {
        let streams = &self.config.streams;
        let msg =
            protocol::inbound::decode(id, fields, &self.config.limits, &streams.reply_prefix)?;
        if let Some(refusal) = self
            .part
            .as_ref()
            .and_then(|p| p.refusal(&msg.business_id, &msg.user_id))
        {
            return Err(refusal);
        }
        protocol::shard::check(&msg, streams)?;
        Ok(msg)
    }

    /// Whether an entry on its first delivery may have been counted as a follower of a
    /// coalesced turn (so its start must be counted too): not when it was its queue's head as it
    /// was delivered (nothing was ahead of it to take it in), nor when its business is known
    /// here not to coalesce.
    fn may_have_followed(&self, entry: &StreamEntry, msg: &InboundMessage) -> bool {
        if entry.counted || entry.at_head == Some(true) {
            return false;
        }
        self.handler
            .cache()
            .local()
            .business(msg.business_id)
            .is_none_or(|b| b.policy.coalesce_window().is_some())
    }

    /// Counts a processing attempt of the entry. Poison protection counts attempts, not
    /// deliveries: a takeover of an entry that only waited for its turn costs it nothing.
    async fn count_attempt(&self, entry: &StreamEntry) -> Result<Attempt, StreamError> {
        if !entry.counted {
            // A first delivery's start: attempt 1, counted by a takeover only should this
            // worker die ([`Streams::start_attempts`]).
            return Ok(Attempt {
                number: 1,
                deliveries: entry.deliveries,
            });
        }
        let ids = [entry.id.as_str()];
        let counts = self
            .finish_retry
            .run("redis.attempts", || self.streams.start_attempts(&ids))
            .await?;
        Ok(Attempt {
            number: counts.first().copied().unwrap_or(1),
            deliveries: entry.deliveries,
        })
    }

    /// Runs the pipeline for the message (with the later messages of its user when its
    /// business coalesces bursts), a panic turned into a retryable error and the whole of it
    /// bounded by `worker.message_deadline_ms`.
    async fn process(
        &self,
        entry: &StreamEntry,
        msg: &InboundMessage,
        log_id: Uuid,
        attempt: Attempt,
    ) -> Result<Processed, PipelineError> {
        let gather = async |business: &Business| match business.policy.coalesce_window() {
            Some(window) => self.gather_followers(entry, msg, attempt, window).await,
            None => (Vec::new(), 0),
        };
        // A panic in one message must not take the worker down: it becomes a retryable error,
        // so a message that always panics ends in the dead-letter stream.
        let processing = AssertUnwindSafe(self.handler.process_turn(
            msg,
            &self.config.streams.outbound,
            log_id,
            attempt,
            gather,
        ))
        .catch_unwind()
        .map(|r| {
            r.unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(PipelineError::Panicked(what))
            })
        });
        // Whatever it waits on (a row lock held by another session, a dependency that hangs),
        // a message gives up at its deadline and is retried by redelivery.
        let deadline_ms = self.config.worker.message_deadline_ms;
        if deadline_ms == 0 {
            return processing.await;
        }
        let budget = Duration::from_millis(deadline_ms);
        // The server ends the message's write transactions at the deadline too (see
        // `store::DEADLINE`): a write given up here never commits later.
        let start = Instant::now();
        let until = crate::store::DEADLINE.scope(start + budget, processing);
        let exceeded = || {
            metrics::stream_event(StreamEvent::DeadlineExceeded, 1);
            tracing::warn!(
                deadline_ms,
                "the message ran past its deadline; giving it up"
            );
            Err(PipelineError::DeadlineExceeded(deadline_ms))
        };
        match tokio::time::timeout(budget, until).await {
            // The server's end of the deadline (its statement_timeout) came first.
            Ok(Err(e))
                if e.code() == "db.statement_timeout"
                    && start.elapsed() + DEADLINE_SLACK >= budget =>
            {
                exceeded()
            }
            Ok(p) => p,
            Err(_) => exceeded(),
        }
    }

    /// Finishes the entry as its processing decided: the answer (or the stored one) published
    /// and acked, an error reply for invalid input, left pending for a retry, or dead-lettered.
    async fn conclude(
        &self,
        entry: &StreamEntry,
        msg: &InboundMessage,
        processed: Result<Processed, PipelineError>,
        attempt: Attempt,
        log_id: Uuid,
    ) -> (EntryOutcome, Option<MessageOutcome>) {
        let outbound = &self.config.streams.outbound;
        match processed {
            Ok(Processed::Answered {
                answer,
                followers: answered,
                state,
                summary,
                fired_actions,
                to_agents,
            }) => {
                // Made once the answer is published (the finish below), off its path.
                let _later = summary.map(|due| Later(&self.handler, due));
                // Its actions are sent once it is published, so that a follow-up comes after.
                let _wake = fired_actions.then(|| WakeOnDrop(self.handler.actions_wake()));
                if self
                    .handler
                    .failpoints()
                    .is_on(failpoint::AFTER_COMMIT_CRASH)
                {
                    tracing::error!("failpoint: crashing after commit, before publish");
                    std::process::exit(86);
                }
                // The agents get the message before its answer is published (and the user's
                // next message starts): once each, in the user's order.
                if let Some(t) = &to_agents
                    && let Err(e) = self.pass_to_agents(msg, &answer, &answered, t).await
                {
                    metrics::record_error(&e, "handoff");
                    return (EntryOutcome::RetryLater, Some(MessageOutcome::Retry));
                }
                let label = answered_as(answer.status);
                let trace = trace_context::outgoing(&entry.fields);
                let reply = Reply::answer(msg, &answer, outbound).traced(trace.clone());
                let state = state.as_ref();
                if answered.is_empty() {
                    return self
                        .finish_with(entry, &reply, None, state, EntryOutcome::Replied, label)
                        .await;
                }
                let replies: Vec<Reply> = answered
                    .iter()
                    .map(|(m, a)| Reply::answer(m, a, outbound).traced(trace.clone()))
                    .collect();
                self.finish_coalesced(entry, &reply, &replies, state, label)
                    .await
            }
            Ok(Processed::Duplicate(answer)) => {
                tracing::info!("already answered; publishing the stored answer again");
                // A message received while handed over: the agents may not have got it.
                if answer.status == AnswerStatus::Handoff
                    && let Err(e) = self.pass_to_agents(msg, &answer, &[], &AGAIN).await
                {
                    metrics::record_error(&e, "handoff");
                    return (EntryOutcome::RetryLater, Some(MessageOutcome::Retry));
                }
                let reply = Reply::answer(msg, &answer, outbound)
                    .traced(trace_context::outgoing(&entry.fields));
                self.finish(
                    entry,
                    &reply,
                    None,
                    EntryOutcome::Duplicate,
                    MessageOutcome::Duplicate,
                )
                .await
            }
            Err(err @ PipelineError::Validation(_)) => self.reject(entry, &err, log_id).await,
            Err(PipelineError::Store(StoreError::Erased)) => self.drop_erased(entry).await,
            Err(err)
                if err.is_retryable() && attempt.number < self.config.streams.max_deliveries =>
            {
                metrics::record_error(&err, "message");
                (EntryOutcome::RetryLater, Some(MessageOutcome::Retry))
            }
            Err(err) => {
                metrics::record_error(&err, "message");
                self.dead_letter(entry, &err, log_id).await
            }
        }
    }

    /// A message of a user erased after it arrived: acked without a reply or a dead letter
    /// (either would keep what the erase removed), nothing stored.
    async fn drop_erased(&self, entry: &StreamEntry) -> (EntryOutcome, Option<MessageOutcome>) {
        tracing::info!("the user was erased after this message arrived; dropped");
        let finish = Finish {
            reply: None,
            dead_letter: None,
            counted: entry.counted,
        };
        let result = self
            .finish_retry
            .run("redis.finish", || {
                self.streams
                    .finish(&entry.id, entry.slot.as_ref(), &finish, None)
            })
            .await;
        match result {
            Ok(true) => (EntryOutcome::Erased, Some(MessageOutcome::Erased)),
            Ok(false) => (EntryOutcome::AlreadyDone, None),
            Err(e) => {
                metrics::record_error(&e, "finish");
                (EntryOutcome::RetryLater, Some(MessageOutcome::Retry))
            }
        }
    }

    /// Invalid input: an error reply published, the entry acked, nothing stored.
    async fn reject(
        &self,
        entry: &StreamEntry,
        err: &PipelineError,
        log_id: Uuid,
    ) -> (EntryOutcome, Option<MessageOutcome>) {
        metrics::record_error(err, "message");
        let reply = self.error_reply(entry, err, log_id);
        self.finish(
            entry,
            &reply,
            None,
            EntryOutcome::Rejected,
            MessageOutcome::Error,
        )
        .await
    }

    fn error_reply(&self, entry: &StreamEntry, err: &PipelineError, log_id: Uuid) -> Reply {
        Reply::error(
            &entry.id,
            &entry.fields,
            err,
            log_id,
            &self.config.streams.outbound,
            &self.config.streams.reply_prefix,
        )
        .traced(trace_context::outgoing(&entry.fields))
    }

    /// The fenced finish, retried on transient failures (safe: a finish that already took
    /// effect publishes nothing the second time).
    async fn finish(
        &self,
        entry: &StreamEntry,
        reply: &Reply,
        dead_letter: Option<Vec<(Vec<u8>, Vec<u8>)>>,
        done: EntryOutcome,
        label: MessageOutcome,
    ) -> (EntryOutcome, Option<MessageOutcome>) {
        self.finish_with(entry, reply, dead_letter, None, done, label)
            .await
    }

    /// [`Worker::finish`] with a cache write sent in the same round trip (the committed
    /// conversation state), on the first attempt only: an attempt whose answer was lost may
    /// have taken effect, and the next message of the user may have cached a newer state
    /// since, which a repeated write would overwrite. After a failed first attempt the key is
    /// dropped instead (a miss reads PostgreSQL; a stale state would cost a re-run).
    async fn finish_with(
        &self,
        entry: &StreamEntry,
        reply: &Reply,
        dead_letter: Option<Vec<(Vec<u8>, Vec<u8>)>>,
        cache: Option<&CacheWrite>,
        done: EntryOutcome,
        label: MessageOutcome,
    ) -> (EntryOutcome, Option<MessageOutcome>) {
        let finish = Finish {
            reply: Some((reply.destination.as_str(), reply.fields())),
            dead_letter,
            counted: entry.counted,
        };
        let mut attempts = 0u32;
        let result = self
            .finish_retry
            .run("redis.finish", || {
                attempts += 1;
                let cache = cache.filter(|_| attempts == 1);
                self.streams
                    .finish(&entry.id, entry.slot.as_ref(), &finish, cache)
            })
            .instrument(phase_span!("finish"))
            .await;
        if attempts > 1
            && let Some(write) = cache
        {
            self.forget_state(write).await;
        }
        match result {
            Ok(true) => (done, Some(label)),
            Ok(false) => {
                metrics::stream_event(StreamEvent::Fenced, 1);
                tracing::info!("another holder finished this entry first; published nothing");
                (EntryOutcome::AlreadyDone, None)
            }
            Err(e) => {
                // The entry stays pending; its redelivery finds the committed answer.
                metrics::record_error(&e, "finish");
                (EntryOutcome::RetryLater, Some(MessageOutcome::Retry))
            }
        }
    }

    /// The later messages of the entry's user waiting behind it, for a business that
    /// coalesces bursts: after waiting until `window` past the entry's arrival, the contiguous
    /// run of waiting entries of the same business, user, conversation and reply destination (at most
    /// [`MAX_COALESCED`], and their texts together at most [`MAX_COALESCED_CONTENTS`] times
    /// `limits.max_content_bytes`). Nothing on any doubt: an entry on a later attempt is
    /// answered alone, and an entry that does not decode, another conversation or reply
    /// destination, a replay or a repeated key ends the run. Each follower's processing attempt
    /// is counted; returns the followers and how many of them start for the first time (what
    /// the business's budget counts).
    async fn gather_followers(
        &self,
        entry: &StreamEntry,
        msg: &protocol::InboundMessage,
        attempt: Attempt,
        window: Duration,
    ) -> (Vec<protocol::InboundMessage>, u64) {
        let Some(slot) = &entry.slot else {
            return (Vec::new(), 0);
        };
        if msg.supersedes.is_some() || attempt.number > 1 {
            return (Vec::new(), 0);
        }
        if let Some(arrived) = crate::stream::entry_time_ms(&entry.id) {
            let until = arrived.saturating_add(window.as_millis() as u64);
            let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
            let left = Duration::from_millis(until.saturating_sub(now)).min(window);
            if !left.is_zero() {
                tokio::time::sleep(left).await;
            }
        }
        let waiting = match self.streams.waiting_behind(slot, MAX_COALESCED).await {
            Ok(w) => w,
            Err(e) => {
                metrics::record_error(&e, "coalesce");
                return (Vec::new(), 0);
            }
        };
        let mut keys = std::collections::HashSet::from([msg.idempotency_key().to_owned()]);
        let mut room = self.config.limits.max_content_bytes * MAX_COALESCED_CONTENTS;
        room = room.saturating_sub(msg.content.len());
        let mut followers = Vec::new();
        for (id, fields) in waiting {
            let Ok(next) = self.decode(&id, &fields) else {
                break;
            };
            // One turn has one reply destination: a later message that wants its answer
            // elsewhere must see an answer there, so it gets a turn of its own.
            let same_turn = next.business_id == msg.business_id
                && next.user_id == msg.user_id
                && next.conversation_id == msg.conversation_id
                && next.reply_to == msg.reply_to
                && next.supersedes.is_none();
            if !same_turn || next.content.len() > room {
                break;
            }
            if !keys.insert(next.idempotency_key().to_owned()) {
                break;
            }
            room -= next.content.len();
            followers.push(next);
        }
        if followers.is_empty() {
            return (followers, 0);
        }
        let ids: Vec<&str> = followers.iter().map(|m| m.inbound_id.as_str()).collect();
        match self.streams.start_attempts(&ids).await {
            Ok(counts) => {
                let first = counts.iter().filter(|n| **n == 1).count() as u64;
                (followers, first)
            }
            Err(e) => {
                // Uncounted, they wait for turns of their own.
                metrics::record_error(&e, "coalesce");
                (Vec::new(), 0)
            }
        }
    }

    /// Finishes a coalesced turn: the committed state's cache write, the entry with its
    /// answer, then each later message with its reference reply, in one transaction
    /// ([`Worker::finish_turn_steps`]).
    async fn finish_coalesced(
        &self,
        entry: &StreamEntry,
        reply: &Reply,
        replies: &[Reply],
        state: Option<&CacheWrite>,
        label: MessageOutcome,
    ) -> (EntryOutcome, Option<MessageOutcome>) {
        // The state is written before the transaction, not inside it: its key lives outside
        // the streams' hash slot (a coalesced turn is rare; one round trip more is fine).
        if let Some(write) = state
            && let Err(e) = self.handler.cache().apply(write).await
        {
            metrics::record_error(&e, "cache write");
            self.forget_state(write).await;
        }
        let (answered, result) = match self.finish_turn_steps(entry, reply, replies).await {
            Ok((answered, later)) => (answered, later),
            Err(e) => (false, Err(e)),
        };
        match result {
            Ok(done) => {
                let followers = done.iter().filter(|d| **d).count() as u64;
                metrics::coalesced(followers);
                WorkerStats::add(&self.stats.coalesced, followers);
                tracing::info!(coalesced = followers, "answered a burst as one turn");
                let unacked = replies.len() as u64 - followers;
                if unacked > 0 {
                    // Stored and answered, but no longer pending here (their consumer was
                    // deleted meanwhile): the head check dead-letters them as orphans, and a
                    // replay publishes their stored reference.
                    metrics::stream_event(StreamEvent::Fenced, unacked);
                    tracing::warn!(
                        count = unacked,
                        "later messages of a coalesced turn were no longer pending"
                    );
                }
                if answered {
                    (EntryOutcome::Replied, Some(label))
                } else {
                    metrics::stream_event(StreamEvent::Fenced, 1);
                    (EntryOutcome::AlreadyDone, None)
                }
            }
            Err(e) => {
                // The entries not finished stay pending; their redeliveries find the committed
                // answers (a retry of the transaction publishes nothing twice).
                metrics::record_error(&e, "finish");
                if let Some(write) = state {
                    self.forget_state(write).await;
                }
                if answered {
                    (EntryOutcome::Replied, Some(label))
                } else {
                    (EntryOutcome::RetryLater, Some(MessageOutcome::Retry))
                }
            }
        }
    }

    /// The finish of a coalesced turn, in two steps, each retried: the entry with its answer
    /// (not announcing its queue's next head, which is the turn's), then the later messages
    /// with their references in one transaction. The references carry the answer's text
    /// unless the first step published it: when that finish took no effect (the entry left
    /// the pending list meanwhile) the later messages' senders would otherwise never see it.
    /// Returns whether the first step took effect and which later entries did.
    async fn finish_turn_steps(
        &self,
        entry: &StreamEntry,
        reply: &Reply,
        replies: &[Reply],
    ) -> Result<(bool, Result<Vec<bool>, StreamError>), StreamError> {
        fn finish(r: &Reply, counted: bool) -> Finish<'_> {
            Finish {
                reply: Some((r.destination.as_str(), r.fields())),
                dead_letter: None,
                counted,
            }
        }
        let first = [(
            entry.id.as_str(),
            entry.slot.as_ref(),
            finish(reply, entry.counted),
        )];
        let answered = self
            .finish_retry
            .run("redis.finish", || self.streams.finish_turn(&first, false))
            .instrument(phase_span!("finish"))
            .await?
            .first()
            == Some(&true);
        let references: Vec<Reply> = replies
            .iter()
            .map(|r| Reply {
                content: if answered {
                    r.content.clone()
                } else {
                    reply.content.clone()
                },
                ..r.clone()
            })
            .collect();
        let slots: Vec<Option<QueueSlot>> = references
            .iter()
            .map(|r| {
                entry.slot.as_ref().map(|s| QueueSlot {
                    key: s.key.clone(),
                    member: order::member(&r.inbound_id),
                })
            })
            .collect();
        let entries: Vec<_> = references
            .iter()
            .zip(&slots)
            .map(|(r, slot)| (r.inbound_id.as_str(), slot.as_ref(), finish(r, true)))
            .collect();
        let later = self
            .finish_retry
            .run("redis.finish", || self.streams.finish_turn(&entries, true))
            .instrument(phase_span!("finish"))
            .await;
        Ok((answered, later))
    }

    /// Drops the key a state write was for (the write may not have happened, and the value
    /// there may be older than the commit; best effort: Redis may be what failed).
    async fn forget_state(&self, write: &CacheWrite) {
        if let Err(e) = self.handler.cache().forget(write).await {
            metrics::record_error(&e, "cache invalidation");
        }
    }

    async fn dead_letter(
        &self,
        entry: &StreamEntry,
        err: &PipelineError,
        log_id: Uuid,
    ) -> (EntryOutcome, Option<MessageOutcome>) {
        let reply = self.error_reply(entry, err, log_id);
        let failure = protocol::dead_letter::Failure {
            code: err.code(),
            detail: err.to_string(),
            deliveries: entry.deliveries,
            log_id,
            error_reply_id: Some(reply.reply_id),
        };
        let fields =
            protocol::dead_letter::fields(&entry.id, &entry.fields, &failure, &reply.trace);
        let (outcome, label) = self
            .finish(
                entry,
                &reply,
                Some(fields),
                EntryOutcome::DeadLettered,
                MessageOutcome::DeadLettered,
            )
            .await;
        if outcome == EntryOutcome::DeadLettered {
            metrics::dead_letter();
            tracing::warn!(
                error.code = err.code(),
                "entry moved to the dead-letter stream"
            );
        }
        (outcome, label)
    }

    /// Finishes an entry that vanished from the stream while it waited (a producer's `MAXLEN`,
    /// `XTRIM`, `XDEL`): ack, dequeue and dead-letter it as `stream.trimmed` with what is
    /// known (its id, and the business and user its queue names); no reply, since where it
    /// should go is gone with it. Counted for `icmp status`.
    async fn vanished(&self, entry: &StreamEntry) -> EntryOutcome {
        let known: Vec<(Vec<u8>, Vec<u8>)> = entry
            .slot
            .as_ref()
            .and_then(|s| self.streams.queue_owner(&s.key))
            .map(|(business, user)| {
                vec![
                    (b"business_id".to_vec(), business.to_vec()),
                    (b"user_id".to_vec(), user.to_vec()),
                ]
            })
            .unwrap_or_default();
        let failure = protocol::dead_letter::Failure {
            code: TRIMMED,
            detail: "the entry was removed from the stream (MAXLEN, XTRIM or XDEL) before it was \
                     answered"
                .into(),
            deliveries: entry.deliveries,
            log_id: Uuid::now_v7(),
            error_reply_id: None,
        };
        let finish = Finish {
            reply: None,
            counted: entry.counted,
            dead_letter: Some(protocol::dead_letter::fields(
                &entry.id,
                &known,
                &failure,
                &trace_context::outgoing(&known),
            )),
        };
        match self
            .finish_retry
            .run("redis.finish", || {
                self.streams
                    .finish(&entry.id, entry.slot.as_ref(), &finish, None)
            })
            .await
        {
            Ok(done) => {
                if done {
                    // Counted where this finish took effect (else its holder counted it).
                    metrics::stream_event(StreamEvent::Vanished, 1);
                    metrics::stream_event(StreamEvent::EntryTrimmed, 1);
                    WorkerStats::add(&self.stats.vanished, 1);
                    tracing::warn!(
                        inbound.id = %entry.id,
                        "entry removed from the stream before its turn; dead-lettered"
                    );
                    if let Err(e) = self.streams.record_trimmed(&entry.id).await {
                        metrics::record_error(&e, "stream events");
                    }
                }
                EntryOutcome::Vanished
            }
            Err(e) => {
                metrics::record_error(&e, "finish");
                EntryOutcome::RetryLater
            }
        }
    }
}

/// A message passed to the agents again (a redelivery of one received while handed over).
const AGAIN: crate::pipeline::handoff::ToAgents = crate::pipeline::handoff::ToAgents {
    kind: "message",
    by: String::new(),
    since_ms: 0,
};

impl<L: LlmService> Worker<L> {
    /// Passes a turn's messages to the agents' stream, once each: the first as `started` when
    /// the turn handed the conversation over (and the conversation notes the agents were told),
    /// the others as messages.
    async fn pass_to_agents(
        &self,
        msg: &InboundMessage,
        answer: &crate::model::Answer,
        followers: &[(InboundMessage, crate::model::Answer)],
        t: &crate::pipeline::handoff::ToAgents,
    ) -> Result<(), crate::error::PipelineError> {
        let conn = self.handler.cache().connection();
        let all = std::iter::once((msg, answer)).chain(followers.iter().map(|(m, a)| (m, a)));
        for (i, (m, a)) in all.enumerate() {
            let kind = if i == 0 { t.kind } else { "message" };
            let entry = crate::handoff::ToAgents {
                kind,
                business_id: m.business_id,
                conversation_id: a.conversation_id,
                user_id: &m.user_id,
                message_id: m.idempotency_key(),
                content: &m.content,
                reply_id: a.reply_id,
                by: &t.by,
                since_ms: t.since_ms,
            };
            let sent = if kind == "started" {
                crate::handoff::tell_started(
                    self.handler.store(),
                    &conn,
                    &self.config.handoff,
                    &entry,
                )
                .await?
            } else {
                crate::handoff::to_agents(&conn, &self.config.handoff, &entry).await?
            };
            if sent == crate::stream::once::Published::Now {
                metrics::handoff(if kind == "started" {
                    "started_stage"
                } else {
                    "message"
                });
            }
        }
        Ok(())
    }
}

/// Wakes the actions' dispatcher when dropped: after the finish that publishes the answer.
struct WakeOnDrop(Arc<tokio::sync::Notify>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// Starts a conversation's summary when dropped: after the finish that publishes the answer,
/// whichever way the function returns.
struct Later<'a, L: LlmService>(
    &'a Arc<MessageHandler<L>>,
    crate::pipeline::summary::SummaryDue,
);

impl<L: LlmService> Drop for Later<'_, L> {
    fn drop(&mut self) {
        self.0.summarize_later(self.1.clone());
    }
}
