//! Per-conversation order across any number of workers (DESIGN §3).
//!
//! The order key is `(business_id, user_id)`. Delivery and queueing are one atomic step: the
//! claim script runs `XREADGROUP … COUNT n` (non-blocking) and, for every entry it returns,
//! adds the entry to the sorted set `{prefix}order:{business_id}:{user_id}`. Members all have
//! score 0 and are the zero-padded entry id, so the set's lexicographic order is the stream's
//! order whichever worker got which entry. An entry is processed only when it is the head of
//! its queue; finishing removes it in the same `MULTI` that publishes the reply and acks it.
//!
//! Finishing also publishes the queue's key on `{prefix}order-wake`; every worker subscribes and
//! wakes its waiters of that queue at once. Waiters poll as well (5 ms doubling to 100 ms), so a
//! lost announcement (say, during a Redis restart) costs latency, never progress.
//!
//! A waiter keeps its entry's idle time low (`XCLAIM … JUSTID` to itself) so that other workers
//! reclaim only the entries of dead consumers. A queue that vanished (never expected: keys are
//! not evicted under `noeviction`) lets its entries through at once (fail open, counted).

use std::collections::HashMap;

/// `KEYS[1]` = inbound stream; `ARGV` = group, consumer, count, queue key prefix.
/// Returns `{last_id, entries}`: the stream's last id when the script ran and the entries it
/// delivered (as `XREADGROUP` returns them).
pub(crate) const CLAIM_SCRIPT: &str = r"
local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if last[1] then last_id = last[1][1] end
if not res then return {last_id, {}} end
local entries = res[1][2]
for _, e in ipairs(entries) do
  local id, f = e[1], e[2]
  local b, u
  for i = 1, #f, 2 do
    if f[i] == 'business_id' then b = f[i + 1] elseif f[i] == 'user_id' then u = f[i + 1] end
  end
  if b and u and #b > 0 and #u > 0 and #b <= 64 and #u <= 1024 then
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    local member = string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #seq) .. seq
    redis.call('ZADD', ARGV[4] .. b .. ':' .. u, 0, member)
  end
end
return {last_id, entries}
";

/// The queue member of a stream entry id (`ms-seq`, both parts zero-padded to 20 digits).
pub fn member(entry_id: &str) -> String {
    let (ms, seq) = entry_id.split_once('-').unwrap_or((entry_id, "0"));
    format!("{ms:0>20}-{seq:0>20}")
}

/// Where an entry waits for its turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSlot {
    pub key: Vec<u8>,
    pub member: String,
}

/// The queue slot of an entry, as the claim script computed it; `None` for entries the script
/// does not queue (no business or user: they are invalid and answered at once).
pub fn slot(prefix: &str, entry_id: &str, fields: &HashMap<String, Vec<u8>>) -> Option<QueueSlot> {
    let b = fields
        .get("business_id")
        .filter(|b| !b.is_empty() && b.len() <= 64)?;
    let u = fields
        .get("user_id")
        .filter(|u| !u.is_empty() && u.len() <= 1024)?;
    let mut key = Vec::with_capacity(prefix.len() + b.len() + u.len() + 1);
    key.extend_from_slice(prefix.as_bytes());
    key.extend_from_slice(b);
    key.push(b':');
    key.extend_from_slice(u);
    Some(QueueSlot {
        key,
        member: member(entry_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_sort_like_stream_ids() {
        let ids = [
            "1700000000000-2",
            "1700000000000-10",
            "1700000000001-0",
            "999-0",
        ];
        let mut members: Vec<String> = ids.iter().map(|i| member(i)).collect();
        members.sort();
        assert_eq!(
            members,
            vec![
                member("999-0"),
                member("1700000000000-2"),
                member("1700000000000-10"),
                member("1700000000001-0")
            ]
        );
    }

    #[test]
    fn only_entries_with_business_and_user_are_queued() {
        let mut f = HashMap::new();
        f.insert("business_id".to_owned(), b"b1".to_vec());
        assert_eq!(slot("order:", "1-0", &f), None);
        f.insert("user_id".to_owned(), b"u1".to_vec());
        let s = slot("order:", "1-0", &f).expect("slot");
        assert_eq!(s.key, b"order:b1:u1".to_vec());
        assert_eq!(s.member, format!("{:0>20}-{:0>20}", 1, 0));
    }
}
