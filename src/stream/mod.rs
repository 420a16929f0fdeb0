//! Redis Streams mechanics: the consumer group, reading, reclaiming stale entries, publishing,
//! acknowledging and dead-lettering. Knows nothing of conversations or of the pipeline.
//!
//! A publish and the ack of the inbound entry it answers go out in one `MULTI`, so a reply is
//! never published without its entry being acked or the other way round.

use std::collections::HashMap;

use redis::aio::ConnectionManager;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, Value};

use crate::config::StreamsConfig;
use crate::error::CacheError;

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

/// The streams of one worker: a connection for blocking reads and one for everything else.
#[derive(Clone)]
pub struct Streams {
    reader: ConnectionManager,
    conn: ConnectionManager,
    config: StreamsConfig,
    consumer: String,
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
    /// `reader` must be a connection of its own: blocking reads hold it.
    pub fn new(reader: ConnectionManager, conn: ConnectionManager, config: StreamsConfig) -> Self {
        let consumer = config.consumer_name();
        Streams {
            reader,
            conn,
            config,
            consumer,
        }
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    pub fn config(&self) -> &StreamsConfig {
        &self.config
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

    /// New entries for this consumer, waiting up to `block_ms`.
    pub async fn read_new(&self, count: usize) -> Result<Vec<StreamEntry>, CacheError> {
        let opts = StreamReadOptions::default()
            .group(&self.config.group, &self.consumer)
            .count(count)
            .block(self.config.block_ms as usize);
        let reply: Option<StreamReadReply> = self
            .reader
            .clone()
            .xread_options(&[&self.config.inbound], &[">"], &opts)
            .await?;
        Ok(reply
            .map(|r| {
                r.keys
                    .into_iter()
                    .flat_map(|k| entries_of(k.ids, 1))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Takes over entries idle for `claim_idle_ms` (their consumer died), with their delivery
    /// counts.
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

    /// Publishes `fields` on `stream` and acks `entry_id`, atomically.
    pub async fn publish_and_ack(
        &self,
        stream: &str,
        fields: &[(&'static str, String)],
        entry_id: &str,
    ) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.add_publish(&mut pipe, stream, fields);
        pipe.xack(&self.config.inbound, &self.config.group, &[entry_id])
            .ignore();
        let _: () = pipe.query_async(&mut self.conn.clone()).await?;
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
        if stream.starts_with(&self.config.reply_prefix) && !self.config.reply_prefix.is_empty() {
            pipe.expire(stream, REPLY_STREAM_TTL_SECS).ignore();
        }
    }

    /// Moves an entry to the dead-letter stream, publishes its error reply and acks it, in one
    /// `MULTI`.
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
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.xadd(&self.config.dead_letter, "*", &dead).ignore();
        self.add_publish(&mut pipe, reply_stream, reply);
        pipe.xack(&self.config.inbound, &self.config.group, &[&entry.id])
            .ignore();
        let _: () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Entries delivered to the group and not yet acked.
    pub async fn pending_count(&self) -> Result<u64, CacheError> {
        let reply: redis::streams::StreamPendingReply = self
            .conn
            .clone()
            .xpending(&self.config.inbound, &self.config.group)
            .await?;
        Ok(reply.count() as u64)
    }
}
