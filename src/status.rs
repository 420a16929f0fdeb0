//! `icmp status`: what an operator asks first. Is the group keeping up (lag, pending)? Which
//! consumers hold what, and since when? How many order queues are in use, and how many dead
//! letters wait? How is each business doing over the last minutes (replies, fallbacks, errors)?
//! Read from Redis and PostgreSQL as they are now; nothing is changed.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{RedisConfig, StreamsConfig};
use crate::error::StreamError;
use crate::redis_connection::RedisConnection;
use crate::store::{Store, StoreError};
use crate::stream::{self, ConsumerInfo, Keys, group_info};

/// The status report: the figures of the inbound streams (totals over every shard), each
/// shard's own, and each business's activity.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Over every shard (the first shard's stream name).
    #[serde(flatten)]
    pub totals: StreamFigures,
    pub group: String,
    /// `streams.dead_letter_maxlen`: at this many dead letters the oldest are evicted (per
    /// shard).
    pub dead_letter_limit: u64,
    /// Each inbound shard's figures (one with `streams.shards = 1`).
    pub shards: Vec<ShardStatus>,
    /// The window the per-business figures cover.
    pub window_minutes: u64,
    pub businesses: Vec<BusinessActivity>,
}

/// One inbound shard's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ShardStatus {
    pub shard: u32,
    #[serde(flatten)]
    pub figures: StreamFigures,
}

/// The state of an inbound stream and its group.
#[derive(Debug, Clone, Serialize)]
pub struct StreamFigures {
    pub stream: String,
    /// Whether the consumer group exists (no worker ever ran when it does not).
    pub group_exists: bool,
    /// Entries not yet delivered to the group (Redis ≥ 7).
    pub lag: Option<u64>,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
    pub consumers: Vec<ConsumerInfo>,
    /// Users with messages waiting in an order queue.
    pub queues_in_use: u64,
    pub dead_letters: u64,
    /// Stream events an operator must see, from the workers' counters: `trimmed` (entries
    /// removed from the stream before they were answered, dead-lettered as `stream.trimmed`),
    /// `group_recreated` (the group disappeared and was recreated at its delivery mark), with
    /// when they last happened.
    pub events: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BusinessActivity {
    pub business_id: String,
    pub name: String,
    pub replies: i64,
    pub fallbacks: i64,
    /// Error replies on the outbound stream in the window (bad input, dead letters).
    pub errors: u64,
    pub fallback_ratio: f64,
    pub error_ratio: f64,
}

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl crate::error::Classify for StatusError {
    fn code(&self) -> &'static str {
        match self {
            StatusError::Stream(e) => e.code(),
            StatusError::Store(e) => e.code(),
        }
    }
    fn category(&self) -> crate::error::Category {
        match self {
            StatusError::Stream(e) => e.category(),
            StatusError::Store(e) => e.category(),
        }
    }
    fn status_code(&self) -> u16 {
        match self {
            StatusError::Stream(e) => e.status_code(),
            StatusError::Store(e) => e.status_code(),
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            StatusError::Stream(e) => e.is_retryable(),
            StatusError::Store(e) => e.is_retryable(),
        }
    }
}

impl From<redis::ParsingError> for StatusError {
    fn from(e: redis::ParsingError) -> Self {
        StatusError::Stream(StreamError::UnexpectedReply(e.to_string()))
    }
}

impl From<redis::RedisError> for StatusError {
    fn from(e: redis::RedisError) -> Self {
        StatusError::Stream(e.into())
    }
}

/// Reads the status now; per-business figures cover the last `window_minutes`.
///
/// # Errors
/// Redis or PostgreSQL failures.
pub async fn read(
    conn: &RedisConnection,
    redis: &RedisConfig,
    streams: &StreamsConfig,
    store: &Store,
    window_minutes: u64,
) -> Result<Status, StatusError> {
    let mut shards = Vec::new();
    let mut errors = BTreeMap::new();
    for shard in streams.all_shards() {
        shards.push(read_shard(conn, redis, &shard).await?);
        for (business, n) in error_replies(conn, &shard, window_minutes).await? {
            *errors.entry(business).or_insert(0) += n;
        }
    }
    let mut businesses = Vec::new();
    for (id, name, replies, fallbacks) in store.recent_activity(window_minutes).await? {
        let errors = errors.get(&id).copied().unwrap_or(0);
        let answered = (replies as f64 + errors as f64).max(1.0);
        businesses.push(BusinessActivity {
            fallback_ratio: fallbacks as f64 / (replies as f64).max(1.0),
            error_ratio: errors as f64 / answered,
            business_id: id,
            name,
            replies,
            fallbacks,
            errors,
        });
    }
    Ok(Status {
        totals: StreamFigures::sum(shards.iter().map(|s| &s.figures)),
        group: streams.group.clone(),
        dead_letter_limit: streams.dead_letter_maxlen as u64,
        shards,
        window_minutes,
        businesses,
    })
}

/// One shard's figures.
async fn read_shard(
    conn: &RedisConnection,
    redis: &RedisConfig,
    streams: &StreamsConfig,
) -> Result<ShardStatus, StatusError> {
    let group = group_info(conn, &streams.inbound, &streams.group).await?;
    let consumers = if group.is_some() {
        stream::consumers(conn, &streams.inbound, &streams.group).await?
    } else {
        Vec::new()
    };
    let mut c = conn.clone();
    let keys = Keys::new(streams, &redis.key_prefix);
    let queues_in_use: u64 = redis::cmd("SCARD")
        .arg(&keys.queue_index)
        .query_async(&mut c)
        .await?;
    let dead_letters: u64 = redis::cmd("XLEN")
        .arg(&streams.dead_letter)
        .query_async(&mut c)
        .await?;
    let events: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(&keys.events)
        .query_async(&mut c)
        .await?;
    Ok(ShardStatus {
        shard: streams.shard.unwrap_or(0),
        figures: StreamFigures {
            stream: streams.inbound.clone(),
            group_exists: group.is_some(),
            lag: group.and_then(|g| g.lag),
            pending: group.map_or(0, |g| g.pending),
            consumers,
            queues_in_use,
            dead_letters,
            events,
        },
    })
}

impl StreamFigures {
    /// Several shards' figures together: counts added up (a lag unknown on one is unknown),
    /// each consumer once with what it holds everywhere and its shortest idle time, event
    /// counts added up and the latest of every other event field (times and entry ids sort as
    /// text); the first shard's stream name.
    fn sum<'a>(shards: impl Iterator<Item = &'a StreamFigures> + Clone) -> StreamFigures {
        let mut consumers: BTreeMap<&str, ConsumerInfo> = BTreeMap::new();
        let mut events: BTreeMap<String, String> = BTreeMap::new();
        for s in shards.clone() {
            for c in &s.consumers {
                consumers
                    .entry(&c.name)
                    .and_modify(|m| {
                        m.pending += c.pending;
                        m.idle_ms = m.idle_ms.min(c.idle_ms);
                    })
                    .or_insert_with(|| c.clone());
            }
            for (k, v) in &s.events {
                let merged = match events.get(k) {
                    Some(old) => match (old.parse::<u64>(), v.parse::<u64>()) {
                        (Ok(a), Ok(b)) => (a + b).to_string(),
                        _ if old >= v => continue,
                        _ => v.clone(),
                    },
                    None => v.clone(),
                };
                events.insert(k.clone(), merged);
            }
        }
        let mut all = shards.clone();
        StreamFigures {
            stream: all.next().map(|s| s.stream.clone()).unwrap_or_default(),
            group_exists: shards.clone().all(|s| s.group_exists),
            lag: shards.clone().map(|s| s.lag).sum(),
            pending: shards.clone().map(|s| s.pending).sum(),
            consumers: consumers.into_values().collect(),
            queues_in_use: shards.clone().map(|s| s.queues_in_use).sum(),
            dead_letters: shards.map(|s| s.dead_letters).sum(),
            events,
        }
    }
}

/// Error replies on the outbound stream in the window, by business id.
async fn error_replies(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    window_minutes: u64,
) -> Result<BTreeMap<String, u64>, StatusError> {
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    let from = format!("{}-0", now_ms.saturating_sub(window_minutes * 60_000));
    let errors = stream::scan_entries(conn, &streams.outbound, &from, usize::MAX, |f| {
        f.get("status").map(String::as_str) == Some("error")
    })
    .await?;
    let mut out = BTreeMap::new();
    for (_, f) in errors {
        *out.entry(f.get("business_id").cloned().unwrap_or_default())
            .or_default() += 1;
    }
    Ok(out)
}

impl Status {
    /// Whether the dead letters waiting have reached 80 % of the stream's bound.
    pub fn dead_letters_nearly_full(&self) -> bool {
        self.totals.dead_letters.saturating_mul(10) >= self.dead_letter_limit.saturating_mul(8)
    }
}

impl Status {
    /// Each shard's line (with several) and each consumer's.
    fn fmt_shards_and_consumers(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.shards.len() > 1 {
            for s in &self.shards {
                let lag = s
                    .figures
                    .lag
                    .map_or("unknown".to_owned(), |l| l.to_string());
                writeln!(
                    f,
                    "  shard {:>3} {}: lag {lag} · pending {} · queues {} · dead letters {}{}",
                    s.shard,
                    s.figures.stream,
                    s.figures.pending,
                    s.figures.queues_in_use,
                    s.figures.dead_letters,
                    if s.figures.group_exists {
                        ""
                    } else {
                        " · no group yet"
                    }
                )?;
            }
        }
        for c in &self.totals.consumers {
            writeln!(
                f,
                "  consumer {:<32} holds {:>6} · idle {:.1} s",
                c.name,
                c.pending,
                c.idle_ms as f64 / 1000.0
            )?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.totals.group_exists {
            writeln!(
                f,
                "stream {}: no group {} yet (no worker has run)",
                self.totals.stream, self.group
            )?;
        } else {
            let lag = self
                .totals
                .lag
                .map_or("unknown".to_owned(), |l| l.to_string());
            writeln!(
                f,
                "stream {} · group {}: lag {lag} · pending {}",
                self.totals.stream, self.group, self.totals.pending
            )?;
        }
        self.fmt_shards_and_consumers(f)?;
        writeln!(f, "order queues in use: {}", self.totals.queues_in_use)?;
        write!(
            f,
            "dead letters: {} of at most {}",
            self.totals.dead_letters, self.dead_letter_limit
        )?;
        if self.dead_letters_nearly_full() {
            write!(
                f,
                " · WARNING: nearly full; at the bound the oldest are evicted: replay or purge \
                 them (icmp dlq)"
            )?;
        }
        writeln!(f)?;
        let event = |name: &str| self.totals.events.get(name).map(String::as_str);
        if let Some(n) = event("trimmed") {
            writeln!(
                f,
                "WARNING: {n} entries were removed from the stream before they were answered \
                 (a producer's MAXLEN, XTRIM or XDEL; last {} at {}); dead-lettered as \
                 stream.trimmed",
                event("trimmed_last_id").unwrap_or("?"),
                event("trimmed_last_at").unwrap_or("?")
            )?;
        }
        if let Some(n) = event("group_recreated") {
            writeln!(
                f,
                "WARNING: the consumer group disappeared and was recreated {n} time(s) (last at \
                 {}, at entry {}); what it held unanswered was dead-lettered as stream.orphaned",
                event("group_recreated_at").unwrap_or("?"),
                event("group_recreated_mark").unwrap_or("?")
            )?;
        }
        writeln!(f, "last {} minutes, by business:", self.window_minutes)?;
        if self.businesses.is_empty() {
            writeln!(f, "  (no replies)")?;
        }
        for b in &self.businesses {
            writeln!(
                f,
                "  {} ({}): {} replies · fallback {:.1} % · errors {} ({:.1} %)",
                b.name,
                b.business_id,
                b.replies,
                b.fallback_ratio * 100.0,
                b.errors,
                b.error_ratio * 100.0
            )?;
        }
        Ok(())
    }
}
