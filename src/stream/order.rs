//! Per-user order across any number of workers (DESIGN §3).
//!
//! The order key is `(business_id, user_id)` in canonical form. The claim script adds every
//! entry it delivers to the sorted set `{prefix}order:{tag}:{group}:{business}:{user}`; members
//! all have score 0 and are the zero-padded entry id, so the set's lexicographic order is the
//! stream's order. An entry is processed only when it is the head of its queue; the fenced
//! finish removes it and announces the queue on the wake channel.
//!
//! The head check ([`HEAD_SCRIPT`]) is also what keeps queues from sticking: a head whose entry
//! is no longer pending in the group (its consumer was deleted, it was XDEL'd or trimmed, the
//! group was recreated) is removed, and if the entry is still in the stream it goes to the
//! dead-letter stream as `stream.orphaned` so that nothing is lost silently (an operator can
//! replay it). An entry that is pending but missing from its queue (say, after a Redis restart
//! without AOF) is put back in its place.

use redis::Value;

use super::{Streams, array, text};
use crate::error::StreamError;

/// `KEYS[1]` = inbound stream, `KEYS[2]` = queue, `KEYS[3]` = dead-letter stream, `KEYS[4]` =
/// queue index, `KEYS[5]` = queued entries, `KEYS[6]` = processing attempts, `KEYS[7]` =
/// stream events;
/// `ARGV` = group, member, entry id, wake channel, dead-letter max length, now (RFC 3339),
/// queue key prefix.
///
/// A stale head still in the stream is dead-lettered as `stream.orphaned` with its fields; one
/// gone from the stream (a producer's `MAXLEN`, `XTRIM`, `XDEL`) as `stream.trimmed` with
/// what its queue key tells (business and user), counted in the events hash.
/// Returns `{verdict, healed, trimmed}`: `go` (the entry is the head), `wait` (an earlier entry
/// is pending) or `gone` (the entry is no longer pending), how many stale heads it removed, and
/// how many of those were gone from the stream.
/// With an empty member (the sweep of queues nobody here waits on) it only heals: `wait` when
/// the head is pending, `gone` when the queue is empty.
pub(crate) const HEAD_SCRIPT: &str = script!("head");

/// A wake-up: a queue changed; with the member of its new head when the finish that dequeued
/// its old head announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    pub key: Vec<u8>,
    pub head: Option<String>,
}

/// Length of a queue member: 20 digits, `-`, 20 digits.
const MEMBER_LEN: usize = 41;

impl Wake {
    /// Decodes a wake channel payload: `member .. key` from the finish, or a bare key.
    pub fn decode(payload: &[u8]) -> Wake {
        let is_member = |m: &[u8]| {
            m.len() == MEMBER_LEN
                && m.iter().enumerate().all(|(i, b)| {
                    if i == 20 {
                        *b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                })
        };
        match payload.split_at_checked(MEMBER_LEN) {
            Some((m, key)) if is_member(m) && !key.is_empty() => Wake {
                key: key.to_vec(),
                head: Some(String::from_utf8_lossy(m).into_owned()),
            },
            _ => Wake {
                key: payload.to_vec(),
                head: None,
            },
        }
    }
}

/// What [`Streams::listen_for_wake_ups`] forwards when it has (re)subscribed (no wake-up is
/// empty).
pub const RESUBSCRIBED: &[u8] = b"";

/// The queue member of a stream entry id (`ms-seq`, both parts zero-padded to 20 digits).
pub fn member(entry_id: &str) -> String {
    let (ms, seq) = entry_id.split_once('-').unwrap_or((entry_id, "0"));
    format!("{ms:0>20}-{seq:0>20}")
}

/// The stream entry id of a queue member (the inverse of [`member`]).
pub fn entry_id(member: &str) -> Option<String> {
    let (ms, seq) = member.split_once('-')?;
    Some(format!(
        "{}-{}",
        ms.parse::<u64>().ok()?,
        seq.parse::<u64>().ok()?
    ))
}

/// Where an entry waits for its turn.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueSlot {
    pub key: Vec<u8>,
    pub member: String,
}

/// The head check's verdict for one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// It is the head of its queue: process it.
    Go,
    /// An earlier entry of the same user is pending: wait for a wake-up.
    Wait,
    /// It is no longer pending (another consumer finished or took it, or it was deleted).
    Gone,
}

/// One head check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadCheck {
    pub head: Head,
    /// Stale heads removed on the way (each one counted and dead-lettered: as
    /// `stream.orphaned` if still in the stream, else as `stream.trimmed`).
    pub healed: u64,
    /// Of those, the heads gone from the stream.
    pub trimmed: u64,
}

impl Streams {
    /// The business and user a queue key names (`None` for the queue of entries without them).
    pub fn queue_owner<'k>(&self, key: &'k [u8]) -> Option<(&'k [u8], &'k [u8])> {
        let rest = key.strip_prefix(self.keys.queue_prefix.as_bytes())?;
        let colon = rest.iter().position(|b| *b == b':')?;
        Some((&rest[..colon], &rest[colon + 1..]))
    }

    /// Checks, in one round trip, whether each `(slot, entry id)` is the head of its queue,
    /// healing stale heads on the way.
    pub async fn check_heads(
        &self,
        slots: &[(&QueueSlot, &str)],
    ) -> Result<Vec<HeadCheck>, StreamError> {
        let checks: Vec<(&[u8], &str, &str)> = slots
            .iter()
            .map(|(slot, id)| (slot.key.as_slice(), slot.member.as_str(), *id))
            .collect();
        self.run_head_checks(&checks).await
    }

    /// Heals the heads of the given queues (whoever waits on them), in one round trip;
    /// returns how many stale heads were removed, and how many of those were gone from the
    /// stream.
    pub async fn heal_queues(&self, keys: &[Vec<u8>]) -> Result<(u64, u64), StreamError> {
        let checks: Vec<(&[u8], &str, &str)> =
            keys.iter().map(|k| (k.as_slice(), "", "")).collect();
        Ok(self
            .run_head_checks(&checks)
            .await?
            .iter()
            .fold((0, 0), |(h, t), c| (h + c.healed, t + c.trimmed)))
    }

    async fn run_head_checks(
        &self,
        checks: &[(&[u8], &str, &str)],
    ) -> Result<Vec<HeadCheck>, StreamError> {
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let now = chrono::Utc::now().to_rfc3339();
        let mut pipe = redis::pipe();
        for (key, member, id) in checks {
            let mut inv = self.scripts.head.prepare_invoke();
            inv.key(&self.config.inbound)
                .key(*key)
                .key(&self.config.dead_letter)
                .key(&self.keys.queue_index)
                .key(&self.keys.queued)
                .key(&self.keys.attempts)
                .key(&self.keys.events)
                .arg(&self.config.group)
                .arg(*member)
                .arg(*id)
                .arg(&self.keys.wake_channel)
                .arg(self.config.dead_letter_maxlen)
                .arg(&now)
                .arg(&self.keys.queue_prefix);
            pipe.invoke_script(&inv);
        }
        let replies = super::query_scripts(self.conn(), &pipe, &self.scripts.head).await?;
        replies
            .into_iter()
            .map(|r| {
                let mut p = array(r).unwrap_or_default().into_iter();
                let head = match p.next().and_then(text).as_deref() {
                    Some("go") => Head::Go,
                    Some("wait") => Head::Wait,
                    Some("gone") => Head::Gone,
                    _ => return Err(StreamError::UnexpectedReply("head check".into())),
                };
                let mut count = || match p.next() {
                    Some(Value::Int(n)) => u64::try_from(n).unwrap_or(0),
                    _ => 0,
                };
                let healed = count();
                let trimmed = count();
                Ok(HeadCheck {
                    head,
                    healed,
                    trimmed,
                })
            })
            .collect()
    }

    /// The entries waiting behind `slot` in its queue (up to `max`, in stream order), with
    /// their fields; stops at the first one no longer in the stream or no longer pending in
    /// the group (its consumer was deleted: the head check dead-letters it). Two round trips.
    pub async fn waiting_behind(
        &self,
        slot: &QueueSlot,
        max: usize,
    ) -> Result<Vec<(String, super::Fields)>, StreamError> {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(slot.key.as_slice())
            .arg(format!("({}", slot.member))
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(max)
            .query_async(&mut self.conn())
            .await?;
        let ids: Vec<String> = members.iter().filter_map(|m| entry_id(m)).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("XRANGE").arg(&self.config.inbound).arg(id).arg(id);
            pipe.cmd("XPENDING")
                .arg(&self.config.inbound)
                .arg(&self.config.group)
                .arg(id)
                .arg(id)
                .arg(1);
        }
        let replies: Vec<Value> = pipe.query_async(&mut self.conn()).await?;
        let mut out = Vec::with_capacity(ids.len());
        let mut replies = replies.into_iter();
        for id in ids {
            let (Some(range), Some(pending)) = (replies.next(), replies.next()) else {
                break;
            };
            let pending = matches!(pending, Value::Array(ref a) if !a.is_empty());
            match super::entry_in_range(range, &id) {
                Some(fields) if pending => out.push((id, fields)),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Forwards the queue keys announced on the wake channel (by any worker) to `tx`, until
    /// `stop` is cancelled or `tx` is closed. Subscribes again after a Redis restart; the
    /// worker's slow poll covers what is missed meanwhile, and every (re)subscription is
    /// forwarded as an empty payload ([`RESUBSCRIBED`]): wake-ups may have been missed, so
    /// every waiting queue is checked. Each attempt to subscribe goes to the next of `clients`
    /// (the seed nodes: on a cluster every node relays every wake-up, so any reachable one
    /// serves).
    pub async fn listen_for_wake_ups(
        &self,
        clients: Vec<redis::Client>,
        tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        use futures::StreamExt;
        let mut backoff = crate::retry::Backoff::new(
            std::time::Duration::from_millis(250),
            std::time::Duration::from_secs(2),
        );
        let mut next = 0;
        while !stop.is_cancelled() {
            let Some(client) = clients.get(next % clients.len().max(1)) else {
                return;
            };
            next += 1;
            let subscribed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&self.keys.wake_channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let mut pubsub = match subscribed.await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "wake-up subscription failed; polling meanwhile");
                    if backoff.wait(&stop).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            if tx.send(RESUBSCRIBED.to_vec()).is_err() {
                return;
            }
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    msg = messages.next() => match msg {
                        Some(msg) => {
                            if tx.send(msg.get_payload_bytes().to_vec()).is_err() {
                                return;
                            }
                        }
                        None => break,
                    },
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_carries_the_next_head_or_only_the_key() {
        let m = member("1700000000000-3");
        let mut payload = m.clone().into_bytes();
        payload.extend_from_slice(b"order:{in}:g:b:u");
        assert_eq!(
            Wake::decode(&payload),
            Wake {
                key: b"order:{in}:g:b:u".to_vec(),
                head: Some(m)
            }
        );
        assert_eq!(Wake::decode(b"order:{in}:g:b:u").head, None);
        assert_eq!(Wake::decode(b"short").key, b"short".to_vec());
    }

    #[test]
    fn a_member_gives_its_entry_id_back() {
        assert_eq!(
            entry_id(&member("1700000000000-12")).as_deref(),
            Some("1700000000000-12")
        );
        assert_eq!(entry_id(&member("0-0")).as_deref(), Some("0-0"));
        assert_eq!(entry_id("junk"), None);
    }

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
}
