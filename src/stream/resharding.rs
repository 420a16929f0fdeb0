//! Moving from one shard layout to another (`streams.shards` from N to M) without breaking any
//! user's order: a user's messages move to another stream, so the new layout must not start a
//! message of a user while an older one of that user is still in the old layout.
//!
//! The switch is one marker key, written once the old layout has drained:
//!
//! 1. Workers run with `streams.shards = M` and `streams.previous_shards = N`. They read the old
//!    layout's shards as before; the new layout's loops are *held*: they read nothing.
//! 2. Producers move to M shards; new messages wait, unread, in the new layout.
//! 3. `icmp reshard` waits until every old shard has drained (lag 0, nothing pending, no order
//!    queue in use), then writes the marker ([`Keys`](super::Keys)-independent:
//!    `{key_prefix}reshard:{group}:{N}to{M}`).
//! 4. Every worker sees the marker within a second: the new layout's loops start reading, and
//!    the old layout is *retired*: an entry that still reaches it (a producer that did not
//!    move) is answered with `validation.wrong_shard`, naming its user's new shard.
//!
//! Messages sent between steps 2 and 3 wait for the old backlog to drain; nothing is answered
//! out of order, twice, or not at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::StreamsConfig;
use crate::error::StreamError;
use crate::redis_connection::RedisConnection;
use crate::stream::{Keys, group_info};

/// How often workers look for the marker.
const MARKER_POLL: Duration = Duration::from_millis(500);

/// The marker that ends a move from `previous` to `streams.shards` shards.
pub fn marker_key(streams: &StreamsConfig, key_prefix: &str, previous: u32) -> String {
    format!(
        "{key_prefix}reshard:{}:{previous}to{}",
        streams.group, streams.shards
    )
}

/// The layout a worker moves away from: `streams.previous_shards` shards under the same names.
pub fn previous_layout(streams: &StreamsConfig) -> Option<StreamsConfig> {
    let previous = streams.previous_shards;
    if previous == 0 {
        return None;
    }
    let mut old = streams.clone();
    if let Some(names) = &streams.configured_names {
        let [inbound, outbound, dead_letter, reply_prefix] = &**names;
        old.inbound.clone_from(inbound);
        old.outbound.clone_from(outbound);
        old.dead_letter.clone_from(dead_letter);
        old.reply_prefix.clone_from(reply_prefix);
    }
    old.shard = None;
    old.shards = previous;
    old.previous_shards = 0;
    old.read_shards = Vec::new();
    Some(old)
}

/// Whether the switch to the new layout happened, shared by every loop of a process.
#[derive(Debug, Default)]
pub struct Switch {
    done: AtomicBool,
    changed: Notify,
}

impl Switch {
    /// A switch that has already happened (no move under way).
    pub fn done() -> Arc<Self> {
        let s = Switch::default();
        s.done.store(true, Ordering::Relaxed);
        Arc::new(s)
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Resolves once the switch happened (at once if it has), or when `stop` is cancelled.
    pub async fn wait(&self, stop: &CancellationToken) {
        loop {
            let changed = self.changed.notified();
            if self.is_done() || stop.is_cancelled() {
                return;
            }
            tokio::select! {
                () = changed => {}
                () = stop.cancelled() => return,
            }
        }
    }

    fn set(&self) {
        self.done.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Looks for `marker` every half second until it exists (or `stop`), then flips the
    /// switch.
    pub async fn watch(
        self: Arc<Self>,
        conn: RedisConnection,
        marker: String,
        stop: CancellationToken,
    ) {
        use redis::AsyncCommands;
        loop {
            match conn.clone().exists::<_, bool>(&marker).await {
                Ok(true) => {
                    tracing::info!(%marker, "the previous shard layout has drained: switching");
                    self.set();
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "reading the reshard marker"),
            }
            tokio::select! {
                () = tokio::time::sleep(MARKER_POLL) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// A worker loop's part in a move between layouts.
#[derive(Debug, Clone)]
pub enum Part {
    /// A shard of the new layout: it reads nothing until the switch.
    New(Arc<Switch>),
    /// A shard of the previous layout: after the switch every entry on it is refused as on the
    /// wrong shard of the new layout (given here).
    Old(Arc<Switch>, Box<StreamsConfig>),
}

impl Part {
    /// For an entry of `business`' `user` on a retired shard: the error naming the user's shard
    /// in the new layout.
    pub fn refusal(
        &self,
        business: &uuid::Uuid,
        user: &str,
    ) -> Option<crate::error::ValidationError> {
        match self {
            Part::Old(switch, layout) if switch.is_done() => {
                let shard = layout.for_user(business, user);
                Some(crate::error::ValidationError::WrongShard {
                    expected: shard.shard.unwrap_or(0),
                    shards: layout.shards,
                    stream: shard.inbound,
                })
            }
            _ => None,
        }
    }
}

/// One old shard's remains: what keeps the layout from being drained.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Remains {
    pub stream: String,
    /// Entries not yet delivered (`None`: Redis cannot tell).
    pub lag: Option<u64>,
    pub pending: u64,
    pub queues_in_use: u64,
}

impl Remains {
    pub fn drained(&self) -> bool {
        self.lag == Some(0) && self.pending == 0 && self.queues_in_use == 0
    }
}

/// What is left in each shard of `layout`.
///
/// # Errors
/// Redis failures.
pub async fn remains(
    conn: &RedisConnection,
    layout: &StreamsConfig,
    key_prefix: &str,
) -> Result<Vec<Remains>, StreamError> {
    let mut out = Vec::new();
    for shard in layout.all_shards() {
        let group = group_info(conn, &shard.inbound, &shard.group).await?;
        let keys = Keys::new(&shard, key_prefix);
        let queues_in_use: u64 = redis::cmd("SCARD")
            .arg(&keys.queue_index)
            .query_async(&mut conn.clone())
            .await?;
        out.push(Remains {
            // A shard no worker ever read has nothing to drain.
            lag: group.map_or(Some(0), |g| g.lag),
            pending: group.map_or(0, |g| g.pending),
            queues_in_use,
            stream: shard.inbound,
        });
    }
    Ok(out)
}

/// Writes the marker that switches every worker to the new layout; returns whether this call
/// wrote it (false: it was there already).
///
/// # Errors
/// Redis failures.
pub async fn mark_switched(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    key_prefix: &str,
) -> Result<bool, StreamError> {
    let key = marker_key(streams, key_prefix, streams.previous_shards);
    let written: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(chrono::Utc::now().to_rfc3339())
        .arg("NX")
        .query_async(&mut conn.clone())
        .await?;
    Ok(written.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_layout_has_the_same_names_and_its_own_shard_count() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
        let mut c = crate::config::Config::load(std::path::Path::new(path), None)
            .expect("default config")
            .streams;
        assert!(previous_layout(&c).is_none());
        c.shards = 3;
        c.previous_shards = 1;
        let old = previous_layout(&c).expect("a previous layout");
        assert_eq!(old.all_shards().len(), 1);
        assert_eq!(old.shard(0).inbound, "icmp:inbound");
        // From a shard's configuration too.
        let old = previous_layout(&c.shard(2)).expect("a previous layout");
        assert_eq!(old.inbound, "icmp:inbound");
        assert_eq!(old.shard(0).inbound, "icmp:inbound");
        c.previous_shards = 2;
        let old = previous_layout(&c).expect("a previous layout");
        let names: Vec<String> = old.all_shards().into_iter().map(|s| s.inbound).collect();
        let new: Vec<String> = c.all_shards().into_iter().map(|s| s.inbound).collect();
        assert_eq!(names.len(), 2);
        assert!(names.iter().all(|n| !new.contains(n)), "{names:?} {new:?}");
        assert_eq!(marker_key(&c, "p:", 2), "p:reshard:icmp-workers:2to3");
    }

    #[tokio::test]
    async fn waiting_ends_when_the_switch_is_set() {
        let switch = Arc::new(Switch::default());
        let stop = CancellationToken::new();
        let waiter = {
            let (switch, stop) = (switch.clone(), stop.clone());
            tokio::spawn(async move { switch.wait(&stop).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        switch.set();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert!(Switch::done().is_done());
    }
}
