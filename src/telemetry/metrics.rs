//! Every metric of icmp (DESIGN §9), declared in one place: names as constants, help text at
//! start-up, label values from fixed lists only (never user, conversation or message ids).
//!
//! Histogram buckets: message and LLM durations span 5 ms .. 60 s because LLM latency dominates;
//! step durations start at 0.5 ms to show cache and database steps.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::Classify;

pub const MESSAGES_TOTAL: &str = "icmp_messages_total";
pub const MESSAGE_DURATION: &str = "icmp_message_duration_seconds";
pub const STEP_DURATION: &str = "icmp_step_duration_seconds";
pub const LLM_REQUESTS_TOTAL: &str = "icmp_llm_requests_total";
pub const LLM_REQUEST_DURATION: &str = "icmp_llm_request_duration_seconds";
pub const LLM_TOKENS_TOTAL: &str = "icmp_llm_tokens_total";
pub const ERRORS_TOTAL: &str = "icmp_errors_total";
pub const RETRIES_TOTAL: &str = "icmp_retries_total";
pub const CACHE_REQUESTS_TOTAL: &str = "icmp_cache_requests_total";
pub const STAGE_TRANSITIONS_TOTAL: &str = "icmp_stage_transitions_total";
pub const DEFINITION_CHANGES_TOTAL: &str = "icmp_definition_changes_total";
pub const UNKNOWN_STAGES_TOTAL: &str = "icmp_unknown_stages_total";
pub const DEGRADED_TOTAL: &str = "icmp_degraded_total";
pub const OUTPUT_REPAIRS_TOTAL: &str = "icmp_output_repairs_total";
pub const DEAD_LETTERS_TOTAL: &str = "icmp_dead_letters_total";
pub const STREAM_EVENTS_TOTAL: &str = "icmp_stream_events_total";
pub const HELD_ENTRIES: &str = "icmp_held_entries";
pub const LLM_CIRCUIT_OPEN: &str = "icmp_llm_circuit_open";
pub const INFLIGHT_MESSAGES: &str = "icmp_inflight_messages";
pub const STREAM_PENDING: &str = "icmp_stream_pending_messages";
pub const STREAM_LAG: &str = "icmp_stream_lag";
pub const DB_POOL_CONNECTIONS: &str = "icmp_db_pool_connections";
pub const THROTTLED_TOTAL: &str = "icmp_throttled_total";
pub const COALESCED_TOTAL: &str = "icmp_coalesced_messages_total";
pub const DEAD_LETTER_ENTRIES: &str = "icmp_dead_letter_entries";
pub const DEAD_LETTER_FILL_RATIO: &str = "icmp_dead_letter_fill_ratio";
pub const STRUCTURED_OUTPUT_DOWNGRADES_TOTAL: &str = "icmp_llm_structured_output_downgrades_total";
pub const LLM_FALLBACKS_TOTAL: &str = "icmp_llm_fallbacks_total";
pub const PARTIALS_TOTAL: &str = "icmp_partial_replies_total";
pub const SUMMARIES_TOTAL: &str = "icmp_conversation_summaries_total";
pub const ACTIONS_TOTAL: &str = "icmp_actions_total";
pub const ACTION_ATTEMPTS_TOTAL: &str = "icmp_action_attempts_total";
pub const ACTION_DURATION: &str = "icmp_action_duration_seconds";
pub const HANDOFF_EVENTS_TOTAL: &str = "icmp_handoff_events_total";
pub const COMMIT_BATCH_MESSAGES: &str = "icmp_commit_batch_messages";
pub const COMMIT_BATCH_RERUNS_TOTAL: &str = "icmp_commit_batch_reruns_total";
pub const RETENTION_REMOVED_TOTAL: &str = "icmp_retention_removed_total";
pub const TRACE_EXPORT_SPANS_TOTAL: &str = "icmp_trace_export_spans_total";

const SLOW_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
const STEP_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(STEP_DURATION.into()), &STEP_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(COMMIT_BATCH_MESSAGES.into()),
                        &BATCH_BUCKETS,
                    )
                })
                .and_then(|b| b.set_buckets(&SLOW_BUCKETS));
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only when another recorder is installed; keep ours for rendering anyway.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

#[expect(
    clippy::too_many_lines,
    reason = "one description per metric, nothing to split"
)]
fn describe() {
    describe_counter!(MESSAGES_TOTAL, "Inbound messages finished, by outcome.");
    describe_histogram!(
        MESSAGE_DURATION,
        metrics::Unit::Seconds,
        "Time from read to reply, by outcome."
    );
    describe_histogram!(
        STEP_DURATION,
        metrics::Unit::Seconds,
        "Time per pipeline step."
    );
    describe_counter!(LLM_REQUESTS_TOTAL, "LLM calls, by purpose and outcome.");
    describe_histogram!(
        LLM_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "LLM call latency, by purpose."
    );
    describe_counter!(
        LLM_TOKENS_TOTAL,
        "LLM tokens, by purpose and kind (prompt, completion)."
    );
    describe_counter!(
        STRUCTURED_OUTPUT_DOWNGRADES_TOTAL,
        "An endpoint and model refused a structured output format and are asked in a weaker one \
         from now on, by endpoint, model and the format used now."
    );
    describe_counter!(
        LLM_FALLBACKS_TOTAL,
        "LLM calls moved from one entry of a template's model chain to the next, by purpose, the \
         endpoint left and the reason (failure, circuit_open)."
    );
    describe_counter!(
        ACTIONS_TOTAL,
        "Stage actions settled, by action and outcome (delivered, rejected, dead, body_failed)."
    );
    describe_counter!(
        HANDOFF_EVENTS_TOTAL,
        "Human handoff events: started_stage, started_action, started_operator, message (a user \
         message passed to the agents), agent_answer, ended_by_agent, ended_by_operator, \
         timeout, or a refused agent entry's error code."
    );
    describe_histogram!(
        COMMIT_BATCH_MESSAGES,
        "Write sets committed together by group commit, per batch."
    );
    describe_counter!(
        COMMIT_BATCH_RERUNS_TOTAL,
        "Group-commit batches run again or given up, by reason (member_failed: one member's \
         statement was refused and the batch ran again without it; batch_failed: the batch \
         failed for no member's fault and its members committed alone; gave_up)."
    );
    describe_counter!(
        RETENTION_REMOVED_TOTAL,
        "What the retention sweep removed, by what: messages, conversations, users, \
         llm_prompts (blanked), dead_letters."
    );
    describe_counter!(
        TRACE_EXPORT_SPANS_TOTAL,
        "Spans sent to the OTLP collector, by outcome: exported, failed (the batch was \
         refused or the collector unreachable; the spans are dropped)."
    );
    describe_counter!(
        ACTION_ATTEMPTS_TOTAL,
        "Stage action requests sent, by action and outcome (delivered, rejected, failed)."
    );
    describe_histogram!(
        ACTION_DURATION,
        metrics::Unit::Seconds,
        "Stage action request latency, by action."
    );
    describe_counter!(
        SUMMARIES_TOTAL,
        "Conversation summaries attempted after a reply, by outcome (saved, skipped, failed)."
    );
    describe_counter!(
        PARTIALS_TOTAL,
        "Partial replies of streamed responses, by outcome (published, failed)."
    );
    describe_counter!(ERRORS_TOTAL, "Errors, by category and stable code.");
    describe_counter!(RETRIES_TOTAL, "Retries of transient faults, by operation.");
    describe_counter!(
        CACHE_REQUESTS_TOTAL,
        "Cache lookups, by cache and result (hit, miss, error)."
    );
    describe_counter!(STAGE_TRANSITIONS_TOTAL, "Committed stage transitions.");
    describe_counter!(
        DEFINITION_CHANGES_TOTAL,
        "Definition change notifications received (each drops a business's cached definitions)."
    );
    describe_counter!(
        UNKNOWN_STAGES_TOTAL,
        "Stage selections naming a stage the business lacks."
    );
    describe_counter!(
        OUTPUT_REPAIRS_TOTAL,
        "Repair prompts sent after unparseable or invalid structured output, by step and outcome."
    );
    describe_counter!(
        DEGRADED_TOTAL,
        "Steps that degraded after an LLM failure, by step."
    );
    describe_counter!(
        DEAD_LETTERS_TOTAL,
        "Entries moved to the dead-letter stream."
    );
    describe_gauge!(
        LLM_CIRCUIT_OPEN,
        "1 while the LLM circuit breaker refuses calls, else 0."
    );
    describe_counter!(
        STREAM_EVENTS_TOTAL,
        "Stream housekeeping events, by event (see StreamEvent)."
    );
    describe_gauge!(
        HELD_ENTRIES,
        "Entries this worker holds (waiting for their turn, ready, or being processed)."
    );
    describe_gauge!(
        INFLIGHT_MESSAGES,
        "Messages being processed by this worker."
    );
    describe_gauge!(
        STREAM_PENDING,
        "Entries delivered to the group but not acknowledged."
    );
    describe_gauge!(
        STREAM_LAG,
        "Entries in the inbound stream not yet delivered to the group."
    );
    describe_gauge!(
        DEAD_LETTER_ENTRIES,
        "Dead letters waiting for a replay or a purge."
    );
    describe_gauge!(
        DEAD_LETTER_FILL_RATIO,
        "Dead letters waiting, as a share of streams.dead_letter_maxlen (at 1 the oldest are evicted)."
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "Database pool connections, by state (idle, busy)."
    );
}

/// Message outcomes (label `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageOutcome {
    Ok,
    Fallback,
    Throttled,
    Error,
    Duplicate,
    Retry,
    DeadLettered,
    /// Dropped: its user was erased after it arrived.
    Erased,
}

impl MessageOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageOutcome::Ok => "ok",
            MessageOutcome::Fallback => "fallback",
            MessageOutcome::Throttled => "throttled",
            MessageOutcome::Error => "error",
            MessageOutcome::Duplicate => "duplicate",
            MessageOutcome::Retry => "retry",
            MessageOutcome::DeadLettered => "dead_lettered",
            MessageOutcome::Erased => "erased",
        }
    }
}

pub fn message(outcome: MessageOutcome, took: Duration) {
    counter!(MESSAGES_TOTAL, "outcome" => outcome.as_str()).increment(1);
    histogram!(MESSAGE_DURATION, "outcome" => outcome.as_str()).record(took.as_secs_f64());
}

pub fn step(step: &'static str, took: Duration) {
    histogram!(STEP_DURATION, "step" => step).record(took.as_secs_f64());
}

pub fn llm_request(purpose: &'static str, outcome: &'static str, took: Duration) {
    counter!(LLM_REQUESTS_TOTAL, "purpose" => purpose, "outcome" => outcome).increment(1);
    histogram!(LLM_REQUEST_DURATION, "purpose" => purpose).record(took.as_secs_f64());
}

pub fn llm_tokens(purpose: &'static str, prompt: u32, completion: u32) {
    counter!(LLM_TOKENS_TOTAL, "purpose" => purpose, "kind" => "prompt").increment(prompt.into());
    counter!(LLM_TOKENS_TOTAL, "purpose" => purpose, "kind" => "completion")
        .increment(completion.into());
}

/// Counts an error and writes its log line: one place for both.
pub fn record_error(err: &dyn Classify, context: &'static str) {
    counter!(ERRORS_TOTAL, "category" => err.category().as_str(), "code" => err.code())
        .increment(1);
    if err.is_retryable() {
        tracing::warn!(error.code = err.code(), error.category = %err.category(), context, error = %err, "transient failure");
    } else if err.status_code() >= 500 {
        tracing::error!(error.code = err.code(), error.category = %err.category(), context, error = %err, "failure");
    } else {
        tracing::info!(error.code = err.code(), error.category = %err.category(), context, error = %err, "rejected");
    }
}

pub fn retry(operation: &'static str) {
    counter!(RETRIES_TOTAL, "operation" => operation).increment(1);
}

/// Cache lookups: `result` is `hit`, `miss` or `error`.
pub fn cache(cache: &'static str, result: &'static str) {
    counter!(CACHE_REQUESTS_TOTAL, "cache" => cache, "result" => result).increment(1);
}

pub fn definitions_changed() {
    counter!(DEFINITION_CHANGES_TOTAL).increment(1);
}

pub fn stage_transition() {
    counter!(STAGE_TRANSITIONS_TOTAL).increment(1);
}

pub fn unknown_stage() {
    counter!(UNKNOWN_STAGES_TOTAL).increment(1);
}

/// A repair prompt for structured output, by step and outcome (`repaired` or `failed`).
pub fn output_repair(step: &'static str, outcome: &'static str) {
    counter!(OUTPUT_REPAIRS_TOTAL, "step" => step, "outcome" => outcome).increment(1);
}

/// Messages over their business's budget, by budget (`messages_per_minute`, `tokens_per_day`).
pub fn throttled(budget: &'static str, messages: u64) {
    counter!(THROTTLED_TOTAL, "budget" => budget).increment(messages);
}

/// Messages answered by the reply of an earlier message of their user (a coalesced turn).
pub fn coalesced(n: u64) {
    counter!(COALESCED_TOTAL).increment(n);
}

pub fn degraded(step: &'static str) {
    counter!(DEGRADED_TOTAL, "step" => step).increment(1);
}

/// An endpoint and model now asked for structured output in the form `now`.
pub fn structured_output_downgrade(endpoint: &str, model: &str, now: &'static str) {
    counter!(STRUCTURED_OUTPUT_DOWNGRADES_TOTAL, "endpoint" => endpoint.to_owned(),
        "model" => model.to_owned(), "now" => now)
    .increment(1);
}

/// A call left `endpoint` for the next entry of its model chain.
pub fn llm_fallback(purpose: &'static str, endpoint: &str, reason: &'static str) {
    counter!(LLM_FALLBACKS_TOTAL, "purpose" => purpose, "endpoint" => endpoint.to_owned(),
        "reason" => reason)
    .increment(1);
}

/// A stage action settled: `delivered`, `rejected`, `dead` or `body_failed`.
pub fn action(action: &str, outcome: &'static str) {
    counter!(ACTIONS_TOTAL, "action" => action.to_owned(), "outcome" => outcome).increment(1);
}

/// A handoff event: `started` (by a stage, an action or an operator), `message` (a user
/// message passed to the agents), `agent_answer`, `ended_by_agent`, `ended_by_operator`,
/// `timeout`, or a refused agent entry's error code.
pub fn handoff(event: &'static str) {
    counter!(HANDOFF_EVENTS_TOTAL, "event" => event).increment(1);
}

/// One request of a stage action and how it ended.
pub fn action_attempt(action: &str, outcome: &'static str, took: Duration) {
    counter!(ACTION_ATTEMPTS_TOTAL, "action" => action.to_owned(), "outcome" => outcome)
        .increment(1);
    histogram!(ACTION_DURATION, "action" => action.to_owned()).record(took.as_secs_f64());
}

/// A group-commit batch of `n` write sets started.
pub fn commit_batch(n: usize) {
    histogram!(COMMIT_BATCH_MESSAGES).record(n as f64);
}

/// The retention sweep removed `n` of `what`.
pub fn retention_removed(what: &'static str, n: u64) {
    if n > 0 {
        counter!(RETENTION_REMOVED_TOTAL, "what" => what).increment(n);
    }
}

/// A batch of `n` spans went to the OTLP collector (`ok`) or did not.
pub fn trace_export(ok: bool, n: u64) {
    let outcome = if ok { "exported" } else { "failed" };
    counter!(TRACE_EXPORT_SPANS_TOTAL, "outcome" => outcome).increment(n);
}

/// A group-commit batch ran again without a member, or was given up (`reason`).
pub fn commit_batch_rerun(reason: &'static str) {
    counter!(COMMIT_BATCH_RERUNS_TOTAL, "reason" => reason).increment(1);
}

/// A conversation summary: `saved`, `skipped` (nothing to fold, or another summariser won) or
/// `failed`.
pub fn summary(outcome: &'static str) {
    counter!(SUMMARIES_TOTAL, "outcome" => outcome).increment(1);
}

/// A partial reply, `published` or `failed`.
pub fn partial(outcome: &'static str) {
    counter!(PARTIALS_TOTAL, "outcome" => outcome).increment(1);
}

pub fn llm_circuit(endpoint: &str, open: bool) {
    gauge!(LLM_CIRCUIT_OPEN, "endpoint" => endpoint.to_owned()).set(if open { 1.0 } else { 0.0 });
}

/// What the stream machinery did besides answering messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// A held entry was found owned by another consumer and dropped here.
    LostTaken,
    /// A held entry was found no longer pending (acked elsewhere, deleted, consumer removed).
    LostGone,
    /// A finish found the entry already acknowledged: nothing was published.
    Fenced,
    /// A stale queue head (entry no longer pending) was removed.
    HeadHealed,
    /// An entry that waited without its fields was gone from the stream when its turn came.
    Vanished,
    /// Pending entries that no longer exist in the stream, dropped by XAUTOCLAIM.
    Deleted,
    /// Inbound entries trimmed behind the groups.
    Trimmed,
    /// Idle consumers with nothing pending removed from the group.
    ConsumerPruned,
    /// The consumer group was missing and was recreated at its delivery mark.
    GroupRecreated,
    /// An entry a worker had seen was gone from the stream (a producer's `MAXLEN`, `XTRIM`,
    /// `XDEL`) before it was answered: dead-lettered as `stream.trimmed`.
    EntryTrimmed,
    /// A message ran past `worker.message_deadline_ms` and was given up.
    DeadlineExceeded,
    /// A finish was not on as many replicas (or on the local AOF) as `streams.wait_replicas` /
    /// `wait_aof` ask within `wait_timeout_ms`; the next message was woken anyway.
    DurabilityShortfall,
}

impl StreamEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEvent::LostTaken => "lost_taken",
            StreamEvent::LostGone => "lost_gone",
            StreamEvent::Fenced => "fenced",
            StreamEvent::HeadHealed => "head_healed",
            StreamEvent::Vanished => "vanished",
            StreamEvent::Deleted => "deleted",
            StreamEvent::Trimmed => "trimmed",
            StreamEvent::ConsumerPruned => "consumer_pruned",
            StreamEvent::GroupRecreated => "group_recreated",
            StreamEvent::EntryTrimmed => "entry_trimmed",
            StreamEvent::DeadlineExceeded => "deadline_exceeded",
            StreamEvent::DurabilityShortfall => "durability_shortfall",
        }
    }
}

pub fn stream_event(event: StreamEvent, n: u64) {
    if n > 0 {
        counter!(STREAM_EVENTS_TOTAL, "event" => event.as_str()).increment(n);
    }
}

/// Entries the loop of inbound shard `shard` holds.
pub fn held(shard: u32, n: usize) {
    gauge!(HELD_ENTRIES, "shard" => shard.to_string()).set(n as f64);
}

pub fn dead_letter() {
    counter!(DEAD_LETTERS_TOTAL).increment(1);
}

pub fn inflight(n: usize) {
    gauge!(INFLIGHT_MESSAGES).set(n as f64);
}

/// The group's pending entries and lag on inbound shard `shard`.
pub fn stream_state(shard: u32, pending: u64, lag: Option<u64>) {
    let shard = shard.to_string();
    gauge!(STREAM_PENDING, "shard" => shard.clone()).set(pending as f64);
    if let Some(lag) = lag {
        gauge!(STREAM_LAG, "shard" => shard).set(lag as f64);
    }
}

/// The dead letters waiting on shard `shard`, and their share of the dead-letter stream's
/// bound.
pub fn dead_letters_waiting(shard: u32, n: u64, maxlen: u64) {
    let shard = shard.to_string();
    gauge!(DEAD_LETTER_ENTRIES, "shard" => shard.clone()).set(n as f64);
    gauge!(DEAD_LETTER_FILL_RATIO, "shard" => shard).set(n as f64 / maxlen.max(1) as f64);
}

pub fn db_pool(idle: usize, busy: usize) {
    gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(idle as f64);
    gauge!(DB_POOL_CONNECTIONS, "state" => "busy").set(busy as f64);
}
