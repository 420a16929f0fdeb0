//! Delivering entries to this consumer: new ones (queued in their user's order queue in the same
//! script, so each queue's order is the stream's order whichever worker got which entry), and
//! stale ones of dead consumers (with their delivery counts, following XAUTOCLAIM's cursor).
//!
//! Scripts may not block, so when nothing is new the reader waits with a plain `XREAD BLOCK`
//! after the stream's last id (which delivers nothing to the group) and claims again.

use redis::Value;
use redis::streams::StreamReadOptions;

use super::order::{QueueSlot, member};
use super::{StreamEntry, Streams, array, bytes, raw_fields, text};
use crate::error::StreamError;

/// Lua helpers shared by the claim scripts: the canonical business and user ids, exactly as
/// `protocol::inbound::canonical_business` / `canonical_user` compute them for every id they
/// accept (the scripts accept a superset: what Rust then rejects is answered with an error and
/// finished through the key the script reported), and the queue member of an entry id.
const PRELUDE: &str = r"
local function trim(s)
  -- Linear: find the first and the last byte that is not ASCII whitespace (a pattern anchored
  -- at the end backtracks over every run of spaces).
  local first = string.find(s, '[^ \t\n\f\r]')
  if not first then return '' end
  local last = #s
  while true do
    local b = string.byte(s, last)
    if b ~= 32 and b ~= 9 and b ~= 10 and b ~= 12 and b ~= 13 then break end
    last = last - 1
  end
  return string.sub(s, first, last)
end
local function canon_business(s)
  s = string.lower(trim(s))
  if #s > 64 then return nil end
  if string.sub(s, 1, 9) == 'urn:uuid:' then s = string.sub(s, 10) end
  if string.sub(s, 1, 1) == '{' and string.sub(s, -1) == '}' then s = string.sub(s, 2, -2) end
  local h
  if #s == 36 and string.match(s, '^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$') then
    h = string.gsub(s, '%-', '')
  elseif #s == 32 and string.match(s, '^%x+$') then
    h = s
  else
    return nil
  end
  return string.sub(h, 1, 8) .. '-' .. string.sub(h, 9, 12) .. '-' .. string.sub(h, 13, 16)
    .. '-' .. string.sub(h, 17, 20) .. '-' .. string.sub(h, 21, 32)
end
local function queue_key(prefix, fields)
  local b, u
  for i = 1, #fields, 2 do
    if fields[i] == 'business_id' then b = fields[i + 1]
    elseif fields[i] == 'user_id' then u = fields[i + 1] end
  end
  -- Entries without a usable business and user (invalid: answered at once) share one queue,
  -- so that they too are tracked until finished (see order.rs).
  local other = prefix .. '-'
  if not b or not u then return other end
  b = canon_business(b)
  u = trim(u)
  if not b or #u == 0 then return other end
  return prefix .. b .. ':' .. u
end
local function member(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #seq) .. seq
end
";

/// `KEYS[1]` = inbound stream, `KEYS[2]` = queue index, `KEYS[3]` = queued entries, `KEYS[4]` =
/// the group's delivery mark; `ARGV` = group, consumer, count, queue key prefix.
/// Returns `{last_id, {{id, fields, 1, queue_key, at_head}, …}}`: the stream's last id when the
/// script ran, and the entries it delivered (first delivery) and queued. `at_head` is 1 when the
/// entry is its queue's head: it was just delivered to this consumer, so it is pending here and
/// may start without a head check. A queue is added to the index when it gets its head (a
/// queue that is not empty is always indexed; the sweep removes empty ones).
const CLAIM_BODY: &str = r"
local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if last[1] then last_id = last[1][1] end
local out = {}
local queued = {'ZADD', KEYS[3]}
if res then
  for _, e in ipairs(res[1][2]) do
    local key = queue_key(ARGV[4], e[2])
    local m = member(e[1])
    redis.call('ZADD', key, 0, m)
    local at_head = 0
    if redis.call('ZRANGE', key, 0, 0)[1] == m then
      at_head = 1
      redis.call('SADD', KEYS[2], key)
    end
    queued[#queued + 1] = 0
    queued[#queued + 1] = m
    out[#out + 1] = {e[1], e[2], 1, key, at_head}
  end
end
if #queued > 2 then redis.call(unpack(queued)) end
-- The last id the group delivered: where it is recreated should it disappear.
if #out > 0 then redis.call('SET', KEYS[4], out[#out][1]) end
return {last_id, out}
";

/// `KEYS[1]` = inbound stream, `KEYS[2]` = queue index, `KEYS[3]` = queued entries; `ARGV` =
/// group, consumer, min idle ms, cursor, count, queue key prefix. Returns `{next_cursor, {{id, fields, deliveries, queue_key}, …},
/// deleted_ids}`. A reclaimed entry is (re)queued: it is pending, so it belongs in its queue.
const RECLAIM_BODY: &str = r"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = 1
    if p[1] then n = p[1][4] end
    local key = queue_key(ARGV[6], e[2])
    local m = member(e[1])
    redis.call('ZADD', key, 0, m)
    redis.call('SADD', KEYS[2], key)
    redis.call('ZADD', KEYS[3], 0, m)
    out[#out + 1] = {e[1], e[2], n, key}
  end
end
return {r[1], out, r[3] or {}}
";

pub(crate) fn claim_script() -> String {
    format!("{PRELUDE}{CLAIM_BODY}")
}

pub(crate) fn reclaim_script() -> String {
    format!("{PRELUDE}{RECLAIM_BODY}")
}

/// What one reclaim pass found.
#[derive(Debug, Default)]
pub struct Reclaimed {
    pub entries: Vec<StreamEntry>,
    /// Ids that were pending but no longer exist in the stream (XDEL, XTRIM): Redis dropped
    /// them from the pending list.
    pub deleted: Vec<String>,
    /// Where the next pass starts (`0-0`: the scan is complete and starts over).
    pub cursor: String,
}

fn unexpected(what: &str) -> StreamError {
    StreamError::UnexpectedReply(what.to_owned())
}

/// The entries of a claim script's reply, `{{id, fields, deliveries, queue_key}, …}`, each
/// decoded on its own: one of an unexpected shape is skipped and logged, never fails the others.
fn delivered(items: Option<Value>, script: &str) -> Vec<StreamEntry> {
    let items = items.and_then(array).unwrap_or_default();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let mut p = array(item).unwrap_or_default().into_iter();
        let (Some(id), Some(fields), Some(Value::Int(n)), Some(key)) =
            (p.next().and_then(text), p.next(), p.next(), p.next())
        else {
            tracing::warn!(script, "skipping an entry of an unexpected shape");
            continue;
        };
        let at_head = match p.next() {
            Some(Value::Int(n)) => Some(n == 1),
            _ => None,
        };
        out.push(StreamEntry {
            slot: slot_of(&id, key),
            fields: raw_fields(fields).unwrap_or_default(),
            id,
            deliveries: u64::try_from(n).unwrap_or(1),
            at_head,
        });
    }
    out
}

fn slot_of(id: &str, key: Value) -> Option<QueueSlot> {
    bytes(key).map(|key| QueueSlot {
        key,
        member: member(id),
    })
}

impl Streams {
    /// Delivers up to `count` new entries to this consumer and queues each behind the earlier
    /// entries of its user, in one script. Returns the stream's last id too.
    pub async fn claim_new(&self, count: usize) -> Result<(String, Vec<StreamEntry>), StreamError> {
        let reply: Value = self
            .scripts
            .claim
            .key(&self.config.inbound)
            .key(&self.keys.queue_index)
            .key(&self.keys.queued)
            .key(&self.keys.mark)
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg(count.max(1))
            .arg(&self.keys.queue_prefix)
            .invoke_async(&mut self.conn())
            .await?;
        let mut parts = array(reply).ok_or_else(|| unexpected("claim"))?.into_iter();
        let last_id = parts
            .next()
            .and_then(text)
            .ok_or_else(|| unexpected("claim: last id"))?;
        let out = delivered(parts.next(), "claim");
        Ok((last_id, out))
    }

    /// New entries for this consumer. When none are waiting, blocks up to `block_ms` on a
    /// plain `XREAD` after `cursor` (the stream's last id, carried between calls), then claims.
    pub async fn read_new(
        &self,
        count: usize,
        cursor: &mut String,
    ) -> Result<Vec<StreamEntry>, StreamError> {
        let (last, entries) = self.claim_new(count).await?;
        *cursor = last;
        if !entries.is_empty() {
            return Ok(entries);
        }
        let opts = StreamReadOptions::default()
            .count(1)
            .block(self.config.block_ms as usize);
        let _: Value = redis::cmd("XREAD")
            .arg(&opts)
            .arg("STREAMS")
            .arg(&self.config.inbound)
            .arg(cursor.as_str())
            .query_async(&mut self.reader.clone())
            .await?;
        let (last, entries) = self.claim_new(count).await?;
        *cursor = last;
        Ok(entries)
    }

    /// Takes over up to `count` entries idle for `claim_idle_ms` (their consumer died or gave
    /// them up), starting at `cursor`, with their delivery counts.
    pub async fn reclaim(&self, cursor: &str, count: usize) -> Result<Reclaimed, StreamError> {
        let reply: Value = self
            .scripts
            .reclaim
            .key(&self.config.inbound)
            .key(&self.keys.queue_index)
            .key(&self.keys.queued)
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg(self.config.claim_idle_ms)
            .arg(cursor)
            .arg(count.max(1))
            .arg(&self.keys.queue_prefix)
            .invoke_async(&mut self.conn())
            .await?;
        let mut parts = array(reply)
            .ok_or_else(|| unexpected("reclaim"))?
            .into_iter();
        let cursor = parts
            .next()
            .and_then(text)
            .ok_or_else(|| unexpected("reclaim: cursor"))?;
        let entries = delivered(parts.next(), "reclaim");
        let deleted = parts
            .next()
            .and_then(array)
            .unwrap_or_default()
            .into_iter()
            .filter_map(text)
            .collect();
        Ok(Reclaimed {
            entries,
            deleted,
            cursor,
        })
    }

    /// Counts a processing attempt of each entry (it starts the pipeline now, alone or in a
    /// coalesced turn); returns each one's attempts so far, this one included. One round trip.
    pub async fn start_attempts(&self, ids: &[&str]) -> Result<Vec<u64>, StreamError> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HINCRBY").arg(&self.keys.attempts).arg(*id).arg(1);
        }
        let counts: Vec<i64> = pipe.query_async(&mut self.conn()).await?;
        Ok(counts
            .into_iter()
            .map(|n| u64::try_from(n).unwrap_or(1))
            .collect())
    }

    /// Counts an entry that was gone from the stream when its turn came, for `icmp status`.
    pub async fn record_trimmed(&self, id: &str) -> Result<(), StreamError> {
        let _: () = redis::pipe()
            .cmd("HINCRBY")
            .arg(&self.keys.events)
            .arg("trimmed")
            .arg(1)
            .ignore()
            .cmd("HSET")
            .arg(&self.keys.events)
            .arg("trimmed_last_at")
            .arg(chrono::Utc::now().to_rfc3339())
            .arg("trimmed_last_id")
            .arg(id)
            .ignore()
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// The fields of an entry that waited without them (see the worker's waiting room);
    /// `None` when the entry is no longer in the stream.
    pub async fn fetch(&self, id: &str) -> Result<Option<Vec<(Vec<u8>, Vec<u8>)>>, StreamError> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(&self.config.inbound)
            .arg(id)
            .arg(id)
            .query_async(&mut self.conn())
            .await?;
        Ok(super::entry_in_range(reply, id))
    }
}
