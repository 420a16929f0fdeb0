//! Redis Streams mechanics: the consumer group, reading, reclaiming stale entries, publishing,
//! acknowledging and dead-lettering. Knows nothing of conversations or of the pipeline.
//!
//! A publish and the ack of the inbound entry it answers go out in one `MULTI`, so a reply is
//! never published without its entry being acked or the other way round. The same `MULTI`
//! removes the entry from its order queue (see [`order`]).

pub mod dead_letter;
pub mod order;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, Value};
use tokio::sync::Notify;

use crate::config::StreamsConfig;
use crate::error::CacheError;
use order::QueueSlot;

/// How long an abandoned `reply_to` stream lives.
const REPLY_STREAM_TTL_SECS: i64 = 3600;

/// One inbound entry with its raw fields.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub id: String,
    pub fields: HashMap<String, Vec<u8>>,
    /// How many times the group delivered it (1 on first delivery).
    pub deliveries: u64,
}

/// Whether an entry may be processed now (see [`Streams::wait_turn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// It is the head of its queue, or it has no queue: process it.
    Go,
    /// Its queue vanished although it is still pending: process it (fail open).
    Unqueued,
    /// Another consumer finished it meanwhile: nothing to do.
    Gone,
}

/// The streams of one worker: a connection for blocking reads and one for everything else.
#[derive(Clone)]
pub struct Streams {
    reader: ConnectionManager,
    conn: ConnectionManager,
    config: StreamsConfig,
    consumer: String,
    queue_prefix: String,
    claim: Arc<redis::Script>,
    /// Wakes this process's waiters of a queue when one of the queue's entries is finished,
    /// here or (through [`Streams::listen_for_wake_ups`]) by another worker.
    local: Arc<Mutex<HashMap<Vec<u8>, Arc<Notify>>>>,
    /// Where finishing an entry announces its queue; `None`: waiters only poll.
    wake_ups: Option<redis::Client>,
    wake_channel: String,
    /// Announcements received for queues this process waits on.
    wakes_received: Arc<AtomicU64>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

fn bytes_of(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

fn entries_of(ids: Vec<redis::streams::StreamId>, deliveries: u64) -> Vec<StreamEntry> {
    ids.into_iter()
        .map(|sid| StreamEntry {
            id: sid.id,
            fields: sid.map.into_iter().map(|(k, v)| (k, bytes_of(v))).collect(),
            deliveries,
        })
        .collect()
}

impl Streams {
    /// `reader` must be a connection of its own: blocking reads hold it. Queue keys take
    /// `key_prefix` (the cache's `redis.key_prefix`).
    pub fn new(
        reader: ConnectionManager,
        conn: ConnectionManager,
        config: StreamsConfig,
        key_prefix: &str,
    ) -> Self {
        let consumer = config.consumer_name();
        Streams {
            reader,
            conn,
            config,
            consumer,
            queue_prefix: format!("{key_prefix}order:"),
            claim: Arc::new(redis::Script::new(order::CLAIM_SCRIPT)),
            local: Arc::new(Mutex::new(HashMap::new())),
            wake_ups: None,
            wake_channel: format!("{key_prefix}order-wake"),
            wakes_received: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Announces finished entries on a pub/sub channel and lets [`Streams::listen_for_wake_ups`]
    /// subscribe through `client`, so that waiters in other processes start without waiting
    /// for their next poll.
    pub fn with_wake_ups(mut self, client: redis::Client) -> Self {
        self.wake_ups = Some(client);
        self
    }

    /// Wakes this process's waiters of the queues announced by any worker, until `stop` turns
    /// true. Survives Redis restarts (it subscribes again); polling covers the gaps.
    pub async fn listen_for_wake_ups(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        use futures::StreamExt;
        let Some(client) = &self.wake_ups else { return };
        while !*stop.borrow() {
            let subscribed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&self.wake_channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let mut pubsub = match subscribed.await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "wake-up subscription failed; polling meanwhile");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    msg = messages.next() => match msg {
                        Some(msg) => self.wake_key(msg.get_payload_bytes()),
                        None => break,
                    },
                    _ = stop.changed() => return,
                }
            }
        }
    }

    fn wake_key(&self, key: &[u8]) {
        if let Ok(map) = self.local.lock()
            && let Some(n) = map.get(key)
        {
            self.wakes_received.fetch_add(1, Ordering::Relaxed);
            n.notify_waiters();
        }
    }

    /// How many announcements woke waiters of this process.
    pub fn wakes_received(&self) -> u64 {
        self.wakes_received.load(Ordering::Relaxed)
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    pub fn config(&self) -> &StreamsConfig {
        &self.config
    }

    fn slot(&self, entry: &StreamEntry) -> Option<QueueSlot> {
        order::slot(&self.queue_prefix, &entry.id, &entry.fields)
    }

    /// Creates the consumer group (and the stream) if missing; the group starts at the
    /// beginning of the stream so entries added before the first worker are processed.
    pub async fn ensure_group(&self) -> Result<(), CacheError> {
        let r: Result<(), redis::RedisError> = self
            .conn
            .clone()
            .xgroup_create_mkstream(&self.config.inbound, &self.config.group, "0")
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Delivers up to `count` new entries to this consumer and queues each behind the earlier
    /// entries of its conversation, in one script. Returns the stream's last id too.
    async fn claim_new(&self, count: usize) -> Result<(String, Vec<StreamEntry>), CacheError> {
        let reply: Value = self
            .claim
            .key(&self.config.inbound)
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg(count)
            .arg(&self.queue_prefix)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let bad = || CacheError::Decode("unexpected claim script reply".into());
        let Value::Array(mut parts) = reply else {
            return Err(bad());
        };
        if parts.len() != 2 {
            return Err(bad());
        }
        let entries = parts.pop().ok_or_else(bad)?;
        let last_id =
            String::from_utf8(bytes_of(parts.pop().ok_or_else(bad)?)).map_err(|_| bad())?;
        let mut out = Vec::new();
        if let Value::Array(items) = entries {
            for item in items {
                let Value::Array(mut pair) = item else {
                    return Err(bad());
                };
                let (Some(Value::Array(flat)), Some(id)) = (pair.pop(), pair.pop()) else {
                    return Err(bad());
                };
                let id = String::from_utf8(bytes_of(id)).map_err(|_| bad())?;
                let mut fields = HashMap::with_capacity(flat.len() / 2);
                let mut it = flat.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    let k = String::from_utf8(bytes_of(k)).map_err(|_| bad())?;
                    fields.insert(k, bytes_of(v));
                }
                out.push(StreamEntry {
                    id,
                    fields,
                    deliveries: 1,
                });
            }
        }
        Ok((last_id, out))
    }

    /// New entries for this consumer. When none are waiting, blocks up to `block_ms` on a
    /// plain `XREAD` after `cursor` (which delivers nothing to the group; scripts may not
    /// block), then claims. `cursor` carries the stream's last id between calls.
    pub async fn read_new(
        &self,
        count: usize,
        cursor: &mut String,
    ) -> Result<Vec<StreamEntry>, CacheError> {
        let (last, entries) = self.claim_new(count).await?;
        *cursor = last;
        if !entries.is_empty() {
            return Ok(entries);
        }
        let opts = StreamReadOptions::default()
            .count(1)
            .block(self.config.block_ms as usize);
        let _: Option<StreamReadReply> = self
            .reader
            .clone()
            .xread_options(&[&self.config.inbound], &[cursor.as_str()], &opts)
            .await?;
        let (last, entries) = self.claim_new(count).await?;
        *cursor = last;
        Ok(entries)
    }

    /// Takes over entries idle for `claim_idle_ms` (their consumer died), with their delivery
    /// counts. They keep their place in their queues.
    pub async fn claim_stale(&self, count: usize) -> Result<Vec<StreamEntry>, CacheError> {
        let mut conn = self.conn.clone();
        let reply: StreamAutoClaimReply = conn
            .xautoclaim_options(
                &self.config.inbound,
                &self.config.group,
                &self.consumer,
                self.config.claim_idle_ms,
                "0-0",
                StreamAutoClaimOptions::default().count(count),
            )
            .await?;
        let mut entries = entries_of(reply.claimed, 0);
        if entries.is_empty() {
            return Ok(entries);
        }
        let counts = self.delivery_counts(&entries).await?;
        for e in &mut entries {
            e.deliveries = counts.get(&e.id).copied().unwrap_or(1);
        }
        Ok(entries)
    }

    async fn delivery_counts(
        &self,
        entries: &[StreamEntry],
    ) -> Result<HashMap<String, u64>, CacheError> {
        let first = entries.iter().map(|e| e.id.as_str()).min().unwrap_or("-");
        let last = entries.iter().map(|e| e.id.as_str()).max().unwrap_or("+");
        let reply: redis::streams::StreamPendingCountReply = self
            .conn
            .clone()
            .xpending_consumer_count(
                &self.config.inbound,
                &self.config.group,
                first,
                last,
                entries.len() * 2 + 10,
                &self.consumer,
            )
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|p| (p.id, p.times_delivered as u64))
            .collect())
    }

    fn notifier(&self, key: &[u8]) -> Arc<Notify> {
        match self.local.lock() {
            Ok(mut map) => map.entry(key.to_vec()).or_default().clone(),
            Err(_) => Arc::new(Notify::new()),
        }
    }

    fn wake_local(&self, slot: Option<&QueueSlot>) {
        if let Some(slot) = slot
            && let Ok(mut map) = self.local.lock()
            && let Some(n) = map.remove(&slot.key)
        {
            n.notify_waiters();
        }
    }

    /// Resets the idle time of an entry to zero, making it ours; returns whether it is still
    /// pending (not acked by anyone).
    async fn refresh(&self, entry_id: &str) -> Result<bool, CacheError> {
        let claimed: Vec<String> = redis::cmd("XCLAIM")
            .arg(&self.config.inbound)
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(entry_id)
            .arg("JUSTID")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(!claimed.is_empty())
    }

    /// Keeps an entry that is being processed from looking idle, so that no other consumer
    /// (nor this one's reclaim timer) takes it over; runs until dropped.
    pub async fn keep_alive(&self, entry_id: &str) {
        let every = Duration::from_millis((self.config.claim_idle_ms / 3).max(50));
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.refresh(entry_id).await {
                tracing::debug!(error = %e, "could not refresh a pending entry");
            }
        }
    }

    /// Waits until `entry` is the head of its order queue. While it waits it keeps the entry's
    /// idle time low, so that other workers reclaim only the entries of dead consumers.
    pub async fn wait_turn(&self, entry: &StreamEntry) -> Result<Turn, CacheError> {
        let Some(slot) = self.slot(entry) else {
            return Ok(Turn::Go);
        };
        let refresh_every = Duration::from_millis((self.config.claim_idle_ms / 3).max(50));
        let mut last_refresh = Instant::now();
        let mut poll = Duration::from_millis(5);
        loop {
            let notify = self.notifier(&slot.key);
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (head, mine): (Vec<String>, Option<f64>) = redis::pipe()
                .zrange(&slot.key, 0, 0)
                .zscore(&slot.key, &slot.member)
                .query_async(&mut self.conn.clone())
                .await?;
            if mine.is_none() {
                // Finished by another consumer, or the queue vanished (then: fail open).
                let pending = self.refresh(&entry.id).await?;
                return Ok(if pending { Turn::Unqueued } else { Turn::Gone });
            }
            if head.first() == Some(&slot.member) {
                return Ok(Turn::Go);
            }
            if last_refresh.elapsed() >= refresh_every {
                last_refresh = Instant::now();
                if !self.refresh(&entry.id).await? {
                    return Ok(Turn::Gone);
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(poll) => {}
            }
            poll = (poll * 2).min(Duration::from_millis(100));
        }
    }

    /// Publishes `fields` on `stream`, acks the entry and removes it from its queue, in one
    /// `MULTI`.
    pub async fn publish_and_ack(
        &self,
        stream: &str,
        fields: &[(&'static str, String)],
        entry: &StreamEntry,
    ) -> Result<(), CacheError> {
        let slot = self.slot(entry);
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.add_publish(&mut pipe, stream, fields);
        self.add_finish(&mut pipe, entry, slot.as_ref());
        let _: () = pipe.query_async(&mut self.conn.clone()).await?;
        self.wake_local(slot.as_ref());
        Ok(())
    }

    fn add_publish(
        &self,
        pipe: &mut redis::Pipeline,
        stream: &str,
        fields: &[(&'static str, String)],
    ) {
        if self.config.outbound_maxlen > 0 && stream == self.config.outbound {
            pipe.xadd_maxlen(
                stream,
                redis::streams::StreamMaxlen::Approx(self.config.outbound_maxlen),
                "*",
                fields,
            )
            .ignore();
        } else {
            pipe.xadd(stream, "*", fields).ignore();
        }
        if !self.config.reply_prefix.is_empty() && stream.starts_with(&self.config.reply_prefix) {
            pipe.expire(stream, REPLY_STREAM_TTL_SECS).ignore();
        }
    }

    fn add_finish(
        &self,
        pipe: &mut redis::Pipeline,
        entry: &StreamEntry,
        slot: Option<&QueueSlot>,
    ) {
        pipe.xack(&self.config.inbound, &self.config.group, &[&entry.id])
            .ignore();
        if let Some(slot) = slot {
            pipe.zrem(&slot.key, &slot.member).ignore();
            if self.wake_ups.is_some() {
                pipe.publish(&self.wake_channel, &slot.key).ignore();
            }
        }
    }

    /// Moves an entry to the dead-letter stream, publishes its error reply, acks it and
    /// removes it from its queue, in one `MULTI`.
    pub async fn dead_letter(
        &self,
        entry: &StreamEntry,
        error_fields: &[(&'static str, String)],
        reply_stream: &str,
        reply: &[(&'static str, String)],
    ) -> Result<(), CacheError> {
        let mut dead: Vec<(String, Vec<u8>)> = entry
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        dead.sort();
        dead.push(("inbound_id".into(), entry.id.clone().into_bytes()));
        for (k, v) in error_fields {
            dead.push(((*k).to_owned(), v.clone().into_bytes()));
        }
        let slot = self.slot(entry);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.xadd(&self.config.dead_letter, "*", &dead).ignore();
        self.add_publish(&mut pipe, reply_stream, reply);
        self.add_finish(&mut pipe, entry, slot.as_ref());
        let _: () = pipe.query_async(&mut self.conn.clone()).await?;
        self.wake_local(slot.as_ref());
        Ok(())
    }

    /// The group's pending count (delivered, not acked) and lag (entries not yet delivered;
    /// `None` when Redis cannot tell).
    pub async fn group_state(&self) -> Result<(u64, Option<u64>), CacheError> {
        let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.config.inbound)
            .query_async(&mut self.conn.clone())
            .await?;
        let number = |v: Option<&Value>| match v {
            Some(Value::Int(n)) => u64::try_from(*n).ok(),
            _ => None,
        };
        let ours = groups.iter().find(|g| {
            matches!(g.get("name"), Some(v) if bytes_of(v.clone()) == self.config.group.as_bytes())
        });
        Ok(match ours {
            Some(g) => (number(g.get("pending")).unwrap_or(0), number(g.get("lag"))),
            None => (0, None),
        })
    }
}
