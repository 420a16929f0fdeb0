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
pub(crate) const TRIM_SCRIPT: &str = r"
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local floor = ARGV[1]
local queued = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if queued then
  local ms, seq = string.match(queued, '^0*(%d-)-0*(%d-)$')
  if ms == '' then ms = '0' end
  if seq == '' then seq = '0' end
  local oldest = ms .. '-' .. seq
  if older(oldest, floor) then floor = oldest end
end
for _, g in ipairs(groups) do
  local name, last, pending
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'last-delivered-id' then last = g[i + 1]
    elseif g[i] == 'pending' then pending = g[i + 1] end
  end
  if older(last, floor) then floor = last end
  if pending > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], name)[2]
    if oldest and older(oldest, floor) then floor = oldest end
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
";

/// `KEYS[1]` = inbound; `ARGV` = group, this consumer, idle ms. Deletes every other consumer
/// that has nothing pending and has been idle that long. Returns how many it deleted.
pub(crate) const PRUNE_SCRIPT: &str = r"
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name ~= ARGV[2] and pending == 0 and idle >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed = removed + 1
  end
end
return removed
";

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
