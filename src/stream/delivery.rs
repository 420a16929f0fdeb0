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

/// `KEYS[1]` = inbound stream, `KEYS[2]` = queue index, `KEYS[3]` = queued entries, `KEYS[4]` =
/// the group's delivery mark; `ARGV` = group, consumer, count, queue key prefix.
/// Returns `{last_id, {{id, fields, 1, queue_key, at_head}, …}}`: the stream's last id when the
/// script ran, and the entries it delivered (first delivery) and queued. `at_head` is 1 when the
/// entry is its queue's head: it was just delivered to this consumer, so it is pending here and
/// may start without a head check. A queue is added to the index when it gets its head (a
/// queue that is not empty is always indexed; the sweep removes empty ones).
pub(crate) const CLAIM_SCRIPT: &str = script!("claim");

/// `KEYS[1]` = inbound stream, `KEYS[2]` = queue index, `KEYS[3]` = queued entries, `KEYS[4]` =
/// processing attempts; `ARGV` = group, consumer, min idle ms, cursor, count, queue key prefix.
/// Returns `{next_cursor, {{id, fields, deliveries, queue_key}, …}, deleted_ids}`. A reclaimed
/// entry is (re)queued: it is pending, so it belongs in its queue. An entry taken over after its
/// first delivery that is its queue's head gets that delivery counted as an attempt (see
/// [`Streams::start_attempts`]).
pub(crate) const RECLAIM_SCRIPT: &str = script!("reclaim");

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
            counted: n > 1,
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
            .key(&self.keys.attempts)
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
    ///
    /// The start of an entry's first delivery as its turn's head is not counted here: it is
    /// attempt 1 by construction, and counting it would cost two commands per message (this
    /// and the finish's delete). Should that delivery's holder die, the takeover (the reclaim
    /// script) counts it when the entry is its queue's head, the only place it can have
    /// started; an entry that only waited behind another counts nothing. (The one overcount:
    /// a head whose holder died before it started, while waiting for a processing slot.)
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
