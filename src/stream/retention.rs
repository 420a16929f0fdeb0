//! Retention: the inbound stream is trimmed behind every consumer group (nothing pending or
//! undelivered is ever trimmed), consumers that are idle with nothing pending are removed
//! (host-pid consumer names pile up as pods come and go), and every order queue's head is
//! checked now and then, so that an orphaned entry (its consumer deleted while it held it) is
//! found even when nobody waits behind it. The dead-letter and outbound streams
//! are bounded by `MAXLEN ~` where they are written.
//!
//! Both run as scripts, so the check and the act are one atomic step: a consumer that reads
//! an entry between them cannot lose it.

use redis::Value;

use super::Streams;
use crate::error::StreamError;

/// `KEYS[1]` = inbound, `KEYS[2]` = this group's queued entries; `ARGV[1]` = the newest id the
/// retention period allows trimming below. Trims (exactly) every entry below the oldest of: that
/// id, each group's last delivered id, each group's oldest pending id, and this group's oldest
/// queued entry (an entry that left the pending list unanswered stays until it is healed and
/// dead-lettered). Returns how many entries it removed.
pub(crate) const TRIM_SCRIPT: &str = script!("trim");

/// `KEYS[1]` = inbound; `ARGV` = group, this consumer, idle ms. Deletes every other consumer
/// that has nothing pending and has been idle that long. Returns how many it deleted.
pub(crate) const PRUNE_SCRIPT: &str = script!("prune");

impl Streams {
    /// Trims acknowledged entries older than `retain_ms` from the inbound stream; returns how
    /// many were removed.
    pub async fn trim_inbound(&self, retain_ms: u64) -> Result<u64, StreamError> {
        let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        let below = format!("{}-0", now_ms.saturating_sub(retain_ms));
        let reply: Value = self
            .scripts
            .trim
            .key(&self.config.inbound)
            .key(&self.keys.queued)
            .arg(below)
            .invoke_async(&mut self.conn())
            .await?;
        count(reply, "trim")
    }

    /// Deletes other consumers idle for `idle_ms` with nothing pending; returns how many.
    pub async fn prune_consumers(&self, idle_ms: u64) -> Result<u64, StreamError> {
        let reply: Value = self
            .scripts
            .prune
            .key(&self.config.inbound)
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg(idle_ms)
            .invoke_async(&mut self.conn())
            .await?;
        count(reply, "prune")
    }
}

impl Streams {
    /// Checks the heads of up to about `count` order queues of this stream and group (from the
    /// queue index), starting at SSCAN cursor `cursor`; returns the next cursor (0: every queue
    /// was visited), how many stale heads were healed, and how many of those were gone from
    /// the stream.
    pub async fn sweep_queues(
        &self,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, (u64, u64)), StreamError> {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SSCAN")
            .arg(&self.keys.queue_index)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await?;
        let healed = self.heal_queues(&keys).await?;
        Ok((next, healed))
    }
}

fn count(reply: Value, what: &str) -> Result<u64, StreamError> {
    match reply {
        Value::Int(n) => Ok(u64::try_from(n).unwrap_or(0)),
        other => Err(StreamError::UnexpectedReply(format!("{what}: {other:?}"))),
    }
}
