//! The fenced finish: one script acknowledges the inbound entry and, only if that acknowledged
//! it, publishes the reply (and the dead letter). Whichever holder finishes first publishes;
//! any other publishes nothing. A finish retried after an ambiguous failure (the script ran
//! but its answer was lost) therefore publishes nothing the second time: at most one reply per
//! inbound entry, by construction.
//!
//! The same script removes the entry from its order queue and announces the queue on the wake
//! channel, so the next entry of that user starts at once, here or in another worker. The
//! worker's write of the user's committed conversation state rides in the same round trip, a
//! `SET` pipelined before the script, so that the next entry reads it.

use crate::redis_connection::RedisConnection;
use redis::Value;

use crate::cache::CacheWrite;

use super::Streams;
use super::order::QueueSlot;
use crate::error::StreamError;

/// How long an abandoned `reply_to` stream lives.
pub const REPLY_STREAM_TTL_SECS: u64 = 3600;

/// `KEYS[1]` = inbound, `KEYS[2]` = reply stream, `KEYS[3]` = dead-letter stream, `KEYS[4]` =
/// processing attempts, `KEYS[5]` = order queue, `KEYS[6]` = queue index, `KEYS[7]` = queued
/// entries (these three optional);
/// `ARGV` = group, entry id, queue member, wake channel, reply max length (0: none), reply
/// TTL secs (0: none), dead-letter max length, n reply items, n dead-letter items, `1` when the
/// reply stream's type must be checked (a `reply_to` stream), `1` when the queue's next head is
/// not announced (an entry finished together with later entries of its queue), `1` when the
/// entry's attempt count is to be deleted, then the reply's field/value items and the dead
/// letter's. Returns 1 when this call acknowledged the entry (and published), 0
/// when it was no longer pending (someone else had finished it, or it left the pending list),
/// -1 (and does nothing) when the reply stream's key holds another type.
///
/// Dequeuing announces the queue's next head on the wake channel as `member .. queue key`, so
/// the worker holding it starts it without a head check; an emptied queue leaves the index.
pub(crate) const FINISH_SCRIPT: &str = script!("finish");

/// What finishing one entry publishes.
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    /// The reply and its stream; `None` publishes no reply (an entry that vanished).
    pub reply: Option<(&'a str, Vec<(&'static str, String)>)>,
    /// The dead-letter entry, if the entry is dead-lettered.
    pub dead_letter: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Whether the entry may have a processing-attempt count to delete: `false` only for an
    /// entry on its first delivery that started as its turn's head, which counts none (see
    /// [`Streams::start_attempts`]).
    pub counted: bool,
}

impl Streams {
    /// The finish script's invocation for entry `id`.
    fn finish_invocation(
        &self,
        id: &str,
        slot: Option<&QueueSlot>,
        finish: &Finish<'_>,
        quiet: bool,
    ) -> redis::ScriptInvocation<'_> {
        let outbound = self.config.outbound.as_str();
        let reply_stream = finish.reply.as_ref().map_or(outbound, |(s, _)| *s);
        let (maxlen, ttl) = if reply_stream == outbound {
            (self.config.outbound_maxlen, 0)
        } else if !self.config.reply_prefix.is_empty()
            && reply_stream.starts_with(&self.config.reply_prefix)
        {
            (0, REPLY_STREAM_TTL_SECS)
        } else {
            (0, 0)
        };
        let reply_items = finish.reply.as_ref().map_or(0, |(_, f)| f.len() * 2);
        let dead_items = finish.dead_letter.as_ref().map_or(0, |f| f.len() * 2);
        let mut inv = self.scripts.finish.prepare_invoke();
        inv.key(&self.config.inbound)
            .key(reply_stream)
            .key(&self.config.dead_letter)
            .key(&self.keys.attempts);
        if let Some(slot) = slot {
            inv.key(slot.key.as_slice())
                .key(&self.keys.queue_index)
                .key(&self.keys.queued);
        }
        inv.arg(&self.config.group)
            .arg(id)
            .arg(slot.map_or("", |s| s.member.as_str()))
            .arg(&self.keys.wake_channel)
            .arg(maxlen)
            .arg(ttl)
            .arg(self.config.dead_letter_maxlen)
            .arg(reply_items)
            .arg(dead_items)
            .arg(if reply_stream == outbound { "0" } else { "1" })
            .arg(if quiet { "1" } else { "0" })
            .arg(if finish.counted { "1" } else { "0" });
        if let Some((_, fields)) = &finish.reply {
            for (k, v) in fields {
                inv.arg(*k).arg(v.as_str());
            }
        }
        if let Some(fields) = &finish.dead_letter {
            for (k, v) in fields {
                inv.arg(k.as_slice()).arg(v.as_slice());
            }
        }
        inv
    }

    /// Finishes entry `id` (see the module docs). Returns whether this call acknowledged it
    /// (and so published); `false` means another holder had finished it: nothing was published.
    /// `cache`: a write sent before the script, in the same round trip (on a cluster, just
    /// before it): the committed conversation state, which the next message of the user,
    /// started by this finish's wake-up, reads; sent whether or not the finish takes effect,
    /// as it holds committed data.
    /// With `streams.wait_replicas` or `wait_aof`, the queue's next head is woken only once
    /// the finish is durable (see [`Streams::wake_when_durable`]).
    pub async fn finish(
        &self,
        id: &str,
        slot: Option<&QueueSlot>,
        finish: &Finish<'_>,
        cache: Option<&CacheWrite>,
    ) -> Result<bool, StreamError> {
        let acked = self.finish_once(id, slot, finish, cache).await?;
        if acked {
            self.wake_when_durable(slot);
        }
        Ok(acked)
    }

    /// Whether finishes wait for durability before the next head is woken (see
    /// [`Streams::with_durable_wakes`]).
    fn waits_for_durability(&self) -> bool {
        self.durable_wakes.is_some()
    }

    /// After a finish that dequeued `slot` without announcing its next head: hands the queue
    /// to the durable-wake task, which announces it once the finish is durable.
    fn wake_when_durable(&self, slot: Option<&QueueSlot>) {
        if let (Some(tx), Some(slot)) = (&self.durable_wakes, slot)
            && tx.send(slot.key.clone()).is_err()
        {
            // The task is gone (shutting down): the safety poll wakes the queue.
            tracing::debug!("durable-wake task gone; leaving the wake-up to the poll");
        }
    }

    /// One finish, without the durability wait.
    async fn finish_once(
        &self,
        id: &str,
        slot: Option<&QueueSlot>,
        finish: &Finish<'_>,
        cache: Option<&CacheWrite>,
    ) -> Result<bool, StreamError> {
        let invocation = self.finish_invocation(id, slot, finish, self.waits_for_durability());
        let reply = match cache {
            None => invocation.invoke_async(&mut self.conn()).await?,
            // On a cluster the state's key is in another slot than the streams: one pipeline
            // cannot carry both, so the write goes first, on its own.
            Some(write) if self.conn.is_cluster() => {
                let mut pipe = redis::pipe();
                write.add_to(&mut pipe);
                let () = pipe.query_async(&mut self.conn()).await?;
                invocation.invoke_async(&mut self.conn()).await?
            }
            Some(write) => {
                let mut pipe = redis::pipe();
                write.add_to(&mut pipe);
                pipe.invoke_script(&invocation);
                super::query_scripts(self.conn(), &pipe, &self.scripts.finish)
                    .await?
                    .into_iter()
                    .next()
                    .unwrap_or(Value::Nil)
            }
        };
        self.finished(id, slot, finish, reply).await
    }

    /// Reads the finish script's answer; a `reply_to` key that is not a stream is answered on
    /// the outbound stream instead.
    async fn finished(
        &self,
        id: &str,
        slot: Option<&QueueSlot>,
        finish: &Finish<'_>,
        reply: Value,
    ) -> Result<bool, StreamError> {
        let outbound = self.config.outbound.as_str();
        let reply_stream = finish.reply.as_ref().map_or(outbound, |(s, _)| *s);
        match reply {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            Value::Int(-1) if reply_stream != outbound => {
                tracing::warn!("the reply_to key is not a stream; replying on the outbound stream");
                let mut to_outbound = finish.clone();
                if let Some((stream, _)) = &mut to_outbound.reply {
                    *stream = outbound;
                }
                Box::pin(self.finish_once(id, slot, &to_outbound, None)).await
            }
            other => Err(StreamError::UnexpectedReply(format!("finish: {other:?}"))),
        }
    }

    /// Finishes entries of one coalesced turn in one transaction (`MULTI`/`EXEC`), in order;
    /// only the last announces its queue's next head (the others' next heads are finished in
    /// the same transaction), and only when `announce` (a turn finished in two steps
    /// announces with its second). Each finish is fenced as [`Streams::finish`]: an
    /// entry another holder finished first, or that left the pending list, publishes nothing.
    /// Redis does not roll back a transaction whose commands ran: when one finish fails (not
    /// for a missing script, which fails them all), those before it took effect, and a retry
    /// finds them finished. Returns, per entry, whether this call acknowledged it.
    pub async fn finish_turn(
        &self,
        entries: &[(&str, Option<&QueueSlot>, Finish<'_>)],
        announce: bool,
    ) -> Result<Vec<bool>, StreamError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let durable = self.waits_for_durability();
        for (i, (id, slot, finish)) in entries.iter().enumerate() {
            let quiet = durable || !announce || i + 1 < entries.len();
            pipe.invoke_script(&self.finish_invocation(id, *slot, finish, quiet));
        }
        let replies = super::query_scripts(self.conn(), &pipe, &self.scripts.finish).await?;
        let mut done = Vec::with_capacity(entries.len());
        for ((id, slot, finish), reply) in entries.iter().zip(replies) {
            done.push(self.finished(id, *slot, finish, reply).await?);
        }
        if announce && done.iter().any(|d| *d) {
            self.wake_when_durable(entries.last().and_then(|(_, slot, _)| *slot));
        }
        Ok(done)
    }
}

/// The durable-wake task of [`Streams::with_durable_wakes`]: takes the queues of every finish
/// that completed meanwhile, makes one write of its own after them and waits until that write
/// is on `streams.wait_replicas` replicas (`WAIT`) and/or fsynced to the local AOF
/// (`WAITAOF`): replication and the AOF keep the order of writes, so every finish before it is
/// durable too. Then it announces the queues (bare keys: their waiters check the heads). One
/// wait serves every finish of the batch (group durability, as group commit), and it runs on a
/// connection of its own, since `WAIT` blocks the connection it runs on. A wait that falls short
/// within `wait_timeout_ms`, or fails, still wakes the queues: counted, per finish, as
/// `durability_shortfall`. (The worker's safety poll, `worker.queue_poll_ms`, checks a waiting
/// queue anyway: keep `wait_timeout_ms` below it.)
pub(crate) async fn durable_wakes(
    mut conn: RedisConnection,
    config: crate::config::StreamsConfig,
    keys: super::Keys,
    mut queues: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    use crate::telemetry::metrics::{self, StreamEvent};
    while let Some(first) = queues.recv().await {
        let mut batch = vec![first];
        while let Ok(key) = queues.try_recv() {
            batch.push(key);
        }
        let finishes = batch.len() as u64;
        batch.sort();
        batch.dedup();
        // The write goes to the shard's master, and the wait after it to that same master (on
        // a cluster a keyless WAIT would go to every master).
        let mut wait = redis::cmd(if config.wait_aof { "WAITAOF" } else { "WAIT" });
        if config.wait_aof {
            wait.arg(1);
        }
        wait.arg(config.wait_replicas).arg(config.wait_timeout_ms);
        let waited = match redis::cmd("INCR")
            .arg(&keys.durability)
            .query_async::<i64>(&mut conn)
            .await
        {
            Ok(_) => conn
                .query_on_master_of(&keys.durability, &wait)
                .await
                .map(|v| (v,)),
            Err(e) => Err(e),
        };
        let durable = match waited {
            Ok((Value::Int(replicas),)) => replicas >= i64::from(config.wait_replicas),
            Ok((Value::Array(counts),)) => match counts.as_slice() {
                [Value::Int(local), Value::Int(replicas)] => {
                    *local >= 1 && *replicas >= i64::from(config.wait_replicas)
                }
                _ => false,
            },
            Ok(_) => false,
            Err(e) => {
                metrics::record_error(&StreamError::from(e), "finish wait");
                false
            }
        };
        if !durable {
            metrics::stream_event(StreamEvent::DurabilityShortfall, finishes);
            tracing::warn!(
                finishes,
                replicas = config.wait_replicas,
                aof = config.wait_aof,
                "finishes were not durable within streams.wait_timeout_ms; waking the next \
                 messages anyway"
            );
        }
        let mut pipe = redis::pipe();
        for key in &batch {
            pipe.cmd("PUBLISH")
                .arg(&keys.wake_channel)
                .arg(key.as_slice())
                .ignore();
        }
        let published: Result<(), redis::RedisError> = pipe.query_async(&mut conn).await;
        if let Err(e) = published {
            metrics::record_error(&StreamError::from(e), "wake-up");
        }
    }
}
