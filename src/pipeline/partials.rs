//! Partial replies: while a streamed response is written, the text so far is published to the
//! message's reply destination as `partial` entries, for chat front ends that show typing.
//!
//! Partials are best-effort and documented as such (docs/protocol.md): each carries the whole
//! text so far (not a delta, so a consumer that misses one still shows the right text), a
//! `sequence` that grows within one attempt, and the `reply_id` the final reply will have if
//! this attempt commits. They are published at most every `llm.partial_interval_ms`, only
//! while the call runs and before the call returns, so every partial precedes the final reply,
//! which the fenced finish still publishes exactly once. A failed publication is counted and
//! skipped; nothing waits for it beyond the call. A message answered from storage, by a
//! fallback or throttled template (an empty answer included: partials start with the first
//! visible text), or by an endpoint that cannot stream gets no partials; a call that fails
//! after streaming part of an answer leaves the partials it published, and its final reply
//! (then a fallback) replaces them, as every final reply does.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::protocol::InboundMessage;
use crate::redis_connection::RedisConnection;
use crate::telemetry::metrics;

/// Where and as what the partials of one message are published.
#[derive(Debug, Clone)]
pub struct Partials {
    pub conn: RedisConnection,
    /// The reply destination (`reply_to`, else the outbound stream).
    pub destination: String,
    /// `MAXLEN ~` of the destination (the outbound stream's), 0: none.
    pub maxlen: usize,
    /// Seconds a `reply_to` stream lives (as the finish sets), 0: no expiry.
    pub ttl_secs: u64,
    pub interval: Duration,
    /// The fields every partial carries (ids), before `sequence` and `content`.
    pub fields: Vec<(&'static str, String)>,
}

impl Partials {
    /// The partials of `msg`'s reply `reply_id` in `conversation`.
    pub fn of(
        conn: RedisConnection,
        msg: &InboundMessage,
        outbound: &str,
        streams: &crate::config::StreamsConfig,
        conversation: Uuid,
        reply_id: Uuid,
        interval: Duration,
    ) -> Partials {
        let destination = msg.reply_to.clone().unwrap_or_else(|| outbound.to_owned());
        let (maxlen, ttl_secs) = if destination == outbound {
            (streams.outbound_maxlen, 0)
        } else {
            (0, crate::stream::finish::REPLY_STREAM_TTL_SECS)
        };
        Partials {
            conn,
            destination,
            maxlen,
            ttl_secs,
            interval,
            fields: vec![
                ("message_id", msg.idempotency_key().to_owned()),
                ("reply_id", reply_id.to_string()),
                ("inbound_id", msg.inbound_id.clone()),
                ("business_id", msg.business_id.to_string()),
                ("user_id", msg.user_id.clone()),
                ("conversation_id", conversation.to_string()),
                ("status", "partial".to_owned()),
            ],
        }
    }

    /// Publishes the text in `text` as it grows, until `done`; returns how many partials were
    /// published. Between two publications at least `interval` passes; a publication under
    /// way when `done` fires is finished (so none lands after the caller goes on).
    pub async fn publish_until(
        mut self,
        mut text: watch::Receiver<String>,
        done: CancellationToken,
    ) -> u64 {
        let mut sequence = 0u64;
        let mut last = String::new();
        loop {
            tokio::select! {
                biased;
                () = done.cancelled() => return sequence,
                changed = text.changed() => if changed.is_err() { return sequence },
            }
            let now = text.borrow_and_update().clone();
            // Nothing visible yet (a model may open with whitespace, or answer nothing, which
            // falls back): no partial.
            if now.trim().is_empty() || now == last {
                continue;
            }
            sequence += 1;
            match self.publish(sequence, &now).await {
                Ok(()) => metrics::partial("published"),
                Err(e) => {
                    metrics::partial("failed");
                    tracing::debug!(error = %e, "a partial reply was not published");
                }
            }
            last = now;
            tokio::select! {
                biased;
                () = done.cancelled() => return sequence,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    async fn publish(&mut self, sequence: u64, content: &str) -> redis::RedisResult<()> {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&self.destination);
        if self.maxlen > 0 {
            xadd.arg("MAXLEN").arg("~").arg(self.maxlen);
        }
        xadd.arg("*");
        for (name, value) in &self.fields {
            xadd.arg(*name).arg(value);
        }
        xadd.arg("sequence")
            .arg(sequence)
            .arg("content")
            .arg(content);
        let mut pipe = redis::pipe();
        pipe.add_command(xadd).ignore();
        if self.ttl_secs > 0 {
            pipe.cmd("EXPIRE")
                .arg(&self.destination)
                .arg(self.ttl_secs)
                .ignore();
        }
        pipe.query_async(&mut self.conn).await
    }
}
