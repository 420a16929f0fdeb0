//! The dispatcher: delivers the action outbox's due rows, in every worker process.
//!
//! It wakes when a message that fired actions commits (so a request leaves at once) and every
//! `actions.poll_ms` (for retries, and for rows a stopped or killed process left behind), finds
//! due rows of every business, and delivers each in a task of its own, at most
//! `actions.concurrency` at once. A row is claimed before it is sent (an attempt counted, and no
//! other dispatcher takes it for `actions.claim_hold_ms`, longer than any request may take), so two processes never
//! send it at once; a process that dies mid-request leaves the claim to expire, and the row is
//! sent again with the same `Idempotency-Key`, which the receiver dedupes on. After a 2xx the row
//! is `delivered` and never sent again; a 4xx other than 408 and 429 is the receiver's final
//! answer (`rejected`, its body kept); anything else is retried after
//! `retry_initial_ms × 2^(attempt−1)` (at most `retry_max_ms`) until `max_attempts`, then `dead`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{SIGNATURE_HEADER, signature};
use crate::cache::Cache;
use crate::config::{ActionsConfig, StreamsConfig};
use crate::pipeline::Failpoints;
use crate::store::Store;
use crate::store::outbox::{Claimed, Outcome, Settlement};
use crate::telemetry::{metrics, trace_context};

/// Delivers outbox rows.
#[derive(Clone)]
pub struct Dispatcher {
    store: Store,
    cache: Cache,
    streams: Arc<StreamsConfig>,
    handoff: Arc<crate::config::HandoffConfig>,
    http: reqwest::Client,
    engine: Arc<upon::Engine<'static>>,
    config: ActionsConfig,
    wake: Arc<Notify>,
    slots: Arc<Semaphore>,
    failpoints: Failpoints,
}

/// What a dispatcher works with besides its configuration.
#[derive(Debug, Clone)]
pub struct Sinks {
    pub store: Store,
    /// Where results drop the user's cached state, and follow-ups are published.
    pub cache: Cache,
    pub streams: StreamsConfig,
    /// Where a result that hands a conversation over tells the agents.
    pub handoff: crate::config::HandoffConfig,
    pub failpoints: Failpoints,
}

/// A stored follow-up not published yet is taken over by any dispatcher after this long.
const UNPUBLISHED_AFTER_MS: i32 = 2_000;

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

/// How long a stopping process waits for its deliveries in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How much of a receiver's answer is kept.
const RESPONSE_KEPT: usize = 4096;

impl Dispatcher {
    /// A dispatcher over `store`, woken by `wake`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS backend).
    pub fn new(
        sinks: Sinks,
        config: ActionsConfig,
        wake: Arc<Notify>,
    ) -> Result<Dispatcher, reqwest::Error> {
        Ok(Dispatcher {
            store: sinks.store,
            cache: sinks.cache,
            streams: Arc::new(sinks.streams),
            handoff: Arc::new(sinks.handoff),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            engine: Arc::new(crate::template::engine()),
            slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
            config,
            wake,
            failpoints: sinks.failpoints,
        })
    }

    /// Runs until `stop`: sweeps when woken and every `poll_ms`. Deliveries under way get up to
    /// [`SHUTDOWN_GRACE`] to finish and record their outcome; one still running then is
    /// abandoned, and its row is sent again (same key) once its claim expires.
    pub async fn run(self, stop: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_ms.max(10));
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(poll) => {}
            }
            if let Err(e) = self.sweep().await {
                metrics::record_error(&e, "actions");
            }
            if let Err(e) = self.publish_left_over().await {
                metrics::record_error(&e, "actions");
            }
        }
        let all = u32::try_from(self.config.concurrency.max(1)).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.slots.acquire_many(all)).await;
    }

    /// One sweep: claims and delivers the due rows there are slots for.
    async fn sweep(&self) -> Result<(), crate::error::StoreError> {
        let free = i32::try_from(self.slots.available_permits()).unwrap_or(i32::MAX);
        if free == 0 {
            return Ok(());
        }
        for (business, id) in self.store.due_actions(free).await? {
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                break;
            };
            let hold = self.config.claim_hold_ms as f64;
            let Some(row) = self.store.claim_action(business, id, hold).await? else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                this.deliver(row).await;
                drop(permit);
            });
        }
        Ok(())
    }

    /// One attempt of a claimed row, and its outcome recorded; a final one with its result on
    /// the conversation and its follow-up, which is then published.
    async fn deliver(&self, row: Claimed) {
        // A client span in the trace of the message that fired it (docs/operations.md,
        // "Traces"); the request's `traceparent` header and the follow-up reply name it.
        let span = tracing::info_span!(
            "action",
            otel.name = %format_args!("POST {}", row.action),
            otel.kind = "client",
            icmp.action = %row.action,
            icmp.attempt = row.attempt,
            http.response.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(trace_context::stored(
            row.traceparent.as_deref(),
            row.tracestate.as_deref(),
        ));
        self.deliver_in_span(row).instrument(span).await;
    }

    async fn deliver_in_span(&self, row: Claimed) {
        let started = Instant::now();
        let outcome = self.attempt(&row).await;
        let label = match &outcome {
            Outcome::Done { status, .. } => *status,
            Outcome::Failed { .. } => "failed",
        };
        metrics::action_attempt(&row.action, label, started.elapsed());
        // A result that hands the conversation over times out as its business says.
        let timeout_ms = if row.handoff_on.is_empty() {
            0
        } else {
            match self.store.load_business(row.business_id).await {
                Ok(Some(b)) => b.policy.handoff.timeout_ms,
                _ => 0,
            }
        };
        let settlement = self.settlement(&row, &outcome, timeout_ms);
        let recorded = match self
            .store
            .record_action(row.business_id, row.id, &outcome, &settlement)
            .await
        {
            Ok(Some(recorded)) => recorded,
            Ok(None) => return,
            Err(e) => return metrics::record_error(&e, "actions"),
        };
        match recorded.status.as_str() {
            "pending" => return,
            "dead" => {
                metrics::action(&row.action, "dead");
                tracing::error!(action = %row.action, row = %row.id, "an action gave up after its last attempt");
            }
            _ => metrics::action(&row.action, label),
        }
        if let (Some(h), Some(user)) = (&settlement.handoff, &recorded.user_id) {
            self.handed_over(&row, h, user).await;
        }
        // The result changed the conversation: its cached state is stale.
        if let Some(user) = &recorded.user_id
            && let Err(e) = self
                .cache
                .invalidate_conversation(row.business_id, user)
                .await
        {
            metrics::record_error(&e, "actions");
        }
        if settlement.follow_up.is_none() {
            return;
        }
        if let Err(e) = self.publish(row.business_id, row.id).await {
            metrics::record_error(&e, "actions");
        }
    }

    /// Tells the agents a result handed the conversation over (when it was not with a person
    /// already, the result's transaction started the handoff; the entry is sent either way,
    /// once per request).
    async fn handed_over(&self, row: &Claimed, h: &crate::model::HandoffState, user: &str) {
        let sent = crate::handoff::tell_started(
            &self.store,
            &self.cache.connection(),
            &self.handoff,
            &crate::handoff::ToAgents {
                kind: "started",
                business_id: row.business_id,
                conversation_id: row.conversation_id,
                user_id: user,
                message_id: "",
                content: "",
                reply_id: row.id,
                by: &h.by,
                since_ms: h.since_ms,
            },
        )
        .await;
        match sent {
            Ok(crate::stream::once::Published::Now) => metrics::handoff("started_action"),
            Ok(_) => {}
            Err(e) => metrics::record_error(&e, "handoff"),
        }
    }

    /// What a final outcome stores besides the row (for an outcome that is not final, what it
    /// would store is not used).
    fn settlement(&self, row: &Claimed, outcome: &Outcome, timeout_ms: u64) -> Settlement {
        let result = match outcome {
            Outcome::Done {
                status,
                http_status,
                response,
                ..
            } => super::result(
                status,
                Some(*http_status),
                Some(response),
                Some(chrono::Utc::now()),
            ),
            Outcome::Failed { http_status, .. } => {
                super::result("dead", *http_status, None, Some(chrono::Utc::now()))
            }
        };
        let follow_up = row.follow_up.as_deref().and_then(|source| {
            let ctx = super::FollowUpContext {
                action: &row.action,
                request: &row.body,
                result: &result,
            };
            match super::render_follow_up(&self.engine, source, &ctx) {
                Ok(text) => text.map(|t| (uuid::Uuid::now_v7(), t)),
                Err(e) => {
                    metrics::action(&row.action, "follow_up_failed");
                    tracing::error!(action = %row.action, error = %e, "an action's follow-up did not render; none is sent");
                    None
                }
            }
        });
        let status = result["status"].as_str().unwrap_or_default();
        let handoff = row.handoff_on.iter().any(|h| h == status).then(|| {
            crate::model::HandoffState::starting(
                format!("action:{}", row.action),
                row.reply_to.clone(),
                timeout_ms,
            )
        });
        Settlement {
            result,
            follow_up,
            handoff,
        }
    }

    /// Publishes a row's stored follow-up (once: a second call publishes nothing) and marks it
    /// published.
    async fn publish(
        &self,
        business: uuid::Uuid,
        id: uuid::Uuid,
    ) -> Result<(), crate::error::PipelineError> {
        if self
            .failpoints
            .is_on(crate::pipeline::failpoint::ACTION_SETTLED_STOP)
        {
            return Ok(());
        }
        let Some(f) = self.store.follow_up(business, id).await? else {
            return Ok(());
        };
        let conn = self.cache.connection();
        if super::follow_up::firing_message_pending(
            &conn,
            &self.streams,
            self.cache.key_prefix(),
            &f,
        )
        .await?
        {
            // Published by a later sweep, after the reply.
            return Ok(());
        }
        // In the trace of the message that fired the action, whichever sweep publishes it.
        let span = tracing::info_span!("publish follow-up", icmp.action = %f.action);
        let _ = span.set_parent(trace_context::stored(
            f.traceparent.as_deref(),
            f.tracestate.as_deref(),
        ));
        let published = super::follow_up::publish(&conn, &self.streams, &f)
            .instrument(span)
            .await?;
        if published == crate::stream::once::Published::Now {
            metrics::action(&f.action, "follow_up");
        }
        self.store.follow_up_published(business, id).await?;
        Ok(())
    }

    /// Publishes the follow-ups stored but left unpublished (their process stopped first).
    async fn publish_left_over(&self) -> Result<(), crate::error::PipelineError> {
        for (business, id) in self
            .store
            .unpublished_follow_ups(64, UNPUBLISHED_AFTER_MS)
            .await?
        {
            // One that fails (a reply stream's key of another type) holds up no other.
            if let Err(e) = self.publish(business, id).await {
                metrics::record_error(&e, "actions");
            }
        }
        Ok(())
    }

    async fn attempt(&self, row: &Claimed) -> Outcome {
        let started = Instant::now();
        let failed = |http_status: Option<i32>, error: String| Outcome::Failed {
            http_status,
            error,
            latency_ms: elapsed_ms(started),
            retry_in_ms: self.retry_in_ms(row.attempt),
        };
        let url = match row.url.strip_prefix("env:") {
            Some(var) => match std::env::var(var) {
                Ok(url) => url,
                Err(_) => return failed(None, format!("the variable {var} (url_env) is not set")),
            },
            None => row.url.clone(),
        };
        let secret = match self.secret(row).await {
            Ok(s) => s,
            Err(e) => return failed(None, e),
        };
        let body = match serde_json::to_vec(&row.body) {
            Ok(b) => b,
            Err(e) => return failed(None, e.to_string()),
        };
        let now = chrono::Utc::now().timestamp();
        let mut request = self.http.post(&url);
        for (name, value) in trace_context::current() {
            request = request.header(name, value);
        }
        let sent = request
            .timeout(Duration::from_millis(
                u64::try_from(row.timeout_ms).unwrap_or(5_000),
            ))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &row.idempotency_key)
            .header(SIGNATURE_HEADER, signature(secret.as_bytes(), now, &body))
            .header("X-Icmp-Action", &row.action)
            .header("X-Icmp-Delivery", row.id.to_string())
            .header("X-Icmp-Attempt", row.attempt.to_string())
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => return failed(None, transport_error(&e)),
        };
        let code = response.status().as_u16();
        tracing::Span::current().record("http.response.status_code", code);
        let text = bounded_text(response).await;
        match code {
            200..=299 | 400..=407 | 409..=428 | 430..=499 => Outcome::Done {
                status: if code < 300 { "delivered" } else { "rejected" },
                http_status: i32::from(code),
                latency_ms: elapsed_ms(started),
                response: text,
            },
            _ => failed(
                Some(i32::from(code)),
                format!("the receiver answered {code}"),
            ),
        }
    }

    /// The signing key of the row's business: the variable its `[business.actions]
    /// secret_env` names.
    async fn secret(&self, row: &Claimed) -> Result<String, String> {
        let business = self
            .store
            .load_business(row.business_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the business is gone".to_owned())?;
        let var = business
            .policy
            .actions
            .secret_env
            .ok_or_else(|| "[business.actions] secret_env is not set".to_owned())?;
        std::env::var(&var).map_err(|_| format!("the variable {var} (secret_env) is not set"))
    }

    fn retry_in_ms(&self, attempt: i32) -> i64 {
        let shift = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(0)
            .min(20);
        let wait = self.config.retry_initial_ms.saturating_mul(1 << shift);
        i64::try_from(wait.min(self.config.retry_max_ms)).unwrap_or(i64::MAX)
    }
}

fn elapsed_ms(started: Instant) -> i32 {
    i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX)
}

/// A transport error without its URL (it may carry a key in a query string).
fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "the request timed out".to_owned()
    } else if e.is_connect() {
        "could not connect to the receiver".to_owned()
    } else {
        "the request failed".to_owned()
    }
}

/// The first [`RESPONSE_KEPT`] bytes of a response body, as text.
async fn bounded_text(mut response: reqwest::Response) -> String {
    let mut kept = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = RESPONSE_KEPT - kept.len();
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if kept.len() >= RESPONSE_KEPT {
            break;
        }
    }
    // PostgreSQL stores no NUL in text (nor in JSON): an answer with one is kept without it.
    String::from_utf8_lossy(&kept).replace('\0', "")
}
