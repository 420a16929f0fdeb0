//! Redis Streams mechanics: the consumer group, per-user order queues, keeping held entries
//! alive, the fenced finish, and retention. Knows nothing of conversations or of the pipeline,
//! and no field name but the two that key the order queues (through [`crate::protocol`]'s
//! canonical forms, mirrored in the claim script).
//!
//! - [`delivery`]: delivering new entries (and queueing them, atomically), reclaiming entries of
//!   dead consumers with their delivery counts;
//! - [`order`]: order queues: the head check that heals stale heads, wake-ups;
//! - [`heartbeat`]: one refresh of every held entry, which also detects lost ownership;
//! - [`finish`]: the fenced finish: ack, and only if that acked, publish;
//! - [`retention`]: trimming the inbound stream behind every group, pruning idle consumers;
//! - [`dlq`]: the dead-letter stream seen from the operator's side (`icmp dlq`);
//! - [`removal`]: removing an entry from the inbound stream once no worker needs it;
//! - [`resharding`]: moving from one shard layout to another without breaking any user's order.
//!
//! Every script receives the keys it writes in `KEYS`, except the claim scripts, whose queue
//! keys come from the entries they deliver: those keys carry the inbound stream's hash tag, so
//! on Redis Cluster they live in the stream's slot (docs/design-notes.md). The queue index (a
//! set of the queue keys that hold entries) lets the sweep visit every queue without scanning
//! the keyspace.
//!
//! The Lua scripts are files in `lua/`, each run with the shared `lua/prelude.lua` (entry ids,
//! queue members and keys) in front of it.

/// A script of `lua/`, with the shared prelude in front of it.
macro_rules! script {
    ($name:literal) => {
        concat!(
            include_str!("lua/prelude.lua"),
            include_str!(concat!("lua/", $name, ".lua"))
        )
    };
}

pub mod delivery;
pub mod dlq;
pub mod finish;
pub mod heartbeat;
pub mod once;
pub mod order;
pub mod removal;
pub mod resharding;
pub mod retention;

use std::sync::Arc;

use redis::Value;

use crate::config::StreamsConfig;
use crate::error::StreamError;
use crate::redis_connection::RedisConnection;
pub use finish::Finish;
pub use heartbeat::Refresh;
pub use order::{Head, QueueSlot};

/// Raw field names and values of one entry, in entry order.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One inbound entry as Redis delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub id: String,
    /// Raw field names and values, in entry order (see [`crate::protocol::RawFields`]).
    pub fields: Fields,
    /// How many times the group delivered it (1 on first delivery).
    pub deliveries: u64,
    /// Its place in its user's order queue; `None` for entries without a usable business and
    /// user (they are invalid and answered at once).
    pub slot: Option<QueueSlot>,
    /// What the claim saw as it delivered it: `Some(true)` at its queue's head (so it is pending
    /// to this consumer and may start without a head check), `Some(false)` behind an earlier
    /// entry (it waits for the wake-up naming it), `None` unknown (a reclaimed entry: checked).
    pub at_head: Option<bool>,
    /// Whether its processing attempts are counted in the attempts hash: on a later delivery,
    /// or when it may have been counted as a follower of a coalesced turn (the worker decides
    /// that once it knows the business). A first delivery's start as its turn's head is
    /// attempt 1 by construction and is not written (see [`Streams::start_attempts`]).
    pub counted: bool,
}

/// Names derived from the configuration: queue keys, the wake-up channel.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `{key_prefix}order:{<hash tag>}:{group}:`; a queue key appends `business:user`.
    pub queue_prefix: String,
    /// The set of this stream's and group's queue keys that hold entries (for the sweep).
    pub queue_index: String,
    /// Every queued entry of this stream and group (members as in a queue): trimming never
    /// passes the oldest, so an entry that left the pending list unanswered is still in the
    /// stream when its head is healed.
    pub queued: String,
    /// Where finishing an entry announces its queue key.
    pub wake_channel: String,
    /// Processing attempts per entry id (a hash): how often an entry started the pipeline,
    /// which is what poison protection counts (a takeover of an entry that only waited its
    /// turn adds a delivery, not an attempt). The finish and the head check remove an entry's
    /// field.
    pub attempts: String,
    /// The id of the last entry the group delivered (a string, written by the claim): a
    /// group that disappears (`XGROUP DESTROY`, a restore without it) is recreated there, not
    /// at the beginning of the stream, so that nothing is answered twice.
    pub mark: String,
    /// Counters of stream events an operator must see (`icmp status`): trimmed entries, group
    /// recreations, dead letters evicted (a hash).
    pub events: String,
    /// Written by the durable-wake task before each `WAIT`/`WAITAOF` (a counter).
    pub durability: String,
}

impl Keys {
    pub fn new(config: &StreamsConfig, key_prefix: &str) -> Self {
        let tag = hash_tag(&config.inbound);
        Keys {
            queue_prefix: format!("{key_prefix}order:{{{tag}}}:{}:", config.group),
            queue_index: format!("{key_prefix}order-index:{{{tag}}}:{}", config.group),
            queued: format!("{key_prefix}order-queued:{{{tag}}}:{}", config.group),
            wake_channel: format!("{key_prefix}order-wake:{}:{}", config.inbound, config.group),
            attempts: format!("{key_prefix}attempts:{{{tag}}}:{}", config.group),
            mark: format!("{key_prefix}group-mark:{{{tag}}}:{}", config.group),
            events: format!("{key_prefix}stream-events:{{{tag}}}:{}", config.group),
            durability: format!("{key_prefix}durability:{{{tag}}}:{}", config.group),
        }
    }
}

impl Keys {
    /// The order queue of `user` of `business` (both canonical, as the inbound decoding leaves
    /// them): what the scripts' `queue_key` (lua/prelude.lua) computes from an entry's fields.
    pub fn queue_key(&self, business: uuid::Uuid, user: &str) -> String {
        format!("{}{business}:{}", self.queue_prefix, user.trim())
    }

    /// Every key the streams' scripts and transactions touch together, named: the streams, a
    /// `reply_to` stream under `streams.reply_prefix`, a queue key (standing for all of them)
    /// and the group's other keys. On a Redis Cluster they must all be in one slot.
    pub fn script_keys(&self, config: &StreamsConfig) -> Vec<(&'static str, String)> {
        let mut keys = vec![
            ("streams.inbound", config.inbound.clone()),
            ("streams.outbound", config.outbound.clone()),
            ("streams.dead_letter", config.dead_letter.clone()),
            (
                "an order queue",
                format!("{}business:user", self.queue_prefix),
            ),
            ("the queue index", self.queue_index.clone()),
            ("the queued entries", self.queued.clone()),
            ("the attempt counts", self.attempts.clone()),
            ("the delivery mark", self.mark.clone()),
            ("the stream events", self.events.clone()),
            ("the durability counter", self.durability.clone()),
        ];
        if !config.reply_prefix.is_empty() {
            keys.push((
                "streams.reply_prefix",
                format!("{}stream", config.reply_prefix),
            ));
        }
        keys
    }
}

/// Checks that every key the streams' scripts touch together ([`Keys::script_keys`]) is in
/// the inbound stream's Redis Cluster slot: a script or transaction whose keys span slots
/// fails with `CROSSSLOT`, and a finish that cannot run leaves its user's queue stuck.
///
/// # Errors
/// The first key out of that slot, and how to name the streams instead.
pub fn check_one_slot(config: &StreamsConfig, key_prefix: &str) -> Result<(), String> {
    use redis::cluster_routing::Slot;
    let keys = Keys::new(config, key_prefix);
    let slot = Slot::for_key(&config.inbound);
    match keys
        .script_keys(config)
        .into_iter()
        .find(|(_, key)| Slot::for_key(key) != slot)
    {
        None => Ok(()),
        Some((what, key)) => Err(format!(
            "on a Redis Cluster every stream key must be in one slot, but {what} (`{key}`) is \
             not in the slot of streams.inbound (`{}`): name the streams with one hash tag, \
             e.g. `{{icmp}}:inbound`, `{{icmp}}:outbound`, `{{icmp}}:dead`, reply prefix \
             `{{icmp}}:reply:`, and keep braces out of redis.key_prefix",
            config.inbound
        )),
    }
}

/// The time part of a stream entry id (`<ms>-<seq>`): when Redis added the entry, in
/// milliseconds since the epoch.
pub fn entry_time_ms(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

/// A stream entry id's two parts (`<ms>-<seq>`), which order entries as the stream does.
pub fn entry_id_parts(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Whether `s` has the shape of a stream entry id (`<ms>-<seq>`), so that it can be given to
/// `XRANGE` without Redis rejecting it.
pub fn is_entry_id(s: &str) -> bool {
    s.split_once('-').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

/// The part of a key Redis Cluster hashes: the text inside the first `{…}` when there is one
/// and it is not empty, else the whole name. A key `{tag}…` lands in the same slot as the
/// stream.
pub fn hash_tag(name: &str) -> &str {
    if let Some(open) = name.find('{')
        && let Some(len) = name[open + 1..].find('}')
        && len > 0
    {
        return &name[open + 1..open + 1 + len];
    }
    name
}

/// The streams of one worker: a connection for blocking reads, one for everything else, and
/// the scripts.
#[derive(Clone)]
pub struct Streams {
    reader: RedisConnection,
    conn: RedisConnection,
    config: StreamsConfig,
    consumer: String,
    keys: Keys,
    scripts: Arc<Scripts>,
    /// Queues whose next head is woken once the finish that dequeued their head is durable
    /// (`None`: the finish script wakes it at once).
    durable_wakes: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
}

/// `KEYS[1]` = inbound stream, `KEYS[2]` = delivery mark, `KEYS[3]` = events hash; `ARGV` =
/// group, now (RFC 3339). Returns `{created, mark}`: `{0, ''}` when the group exists, `{1, ''}`
/// when it was created at the beginning, `{1, mark}` when it was recreated at its mark.
const ENSURE_GROUP_SCRIPT: &str = script!("ensure_group");

struct Scripts {
    ensure_group: redis::Script,
    claim: redis::Script,
    reclaim: redis::Script,
    head: redis::Script,
    finish: redis::Script,
    keep_alive: redis::Script,
    trim: redis::Script,
    prune: redis::Script,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl Streams {
    /// `reader` must be a connection of its own: blocking reads hold it. Queue keys take
    /// `key_prefix` (the cache's `redis.key_prefix`).
    pub fn new(
        reader: RedisConnection,
        conn: RedisConnection,
        config: StreamsConfig,
        key_prefix: &str,
    ) -> Self {
        Streams {
            reader,
            conn,
            consumer: config.consumer_name(),
            keys: Keys::new(&config, key_prefix),
            config,
            durable_wakes: None,
            scripts: Arc::new(Scripts {
                ensure_group: redis::Script::new(ENSURE_GROUP_SCRIPT),
                claim: redis::Script::new(delivery::CLAIM_SCRIPT),
                reclaim: redis::Script::new(delivery::RECLAIM_SCRIPT),
                head: redis::Script::new(order::HEAD_SCRIPT),
                finish: redis::Script::new(finish::FINISH_SCRIPT),
                keep_alive: redis::Script::new(heartbeat::KEEP_ALIVE_SCRIPT),
                trim: redis::Script::new(retention::TRIM_SCRIPT),
                prune: redis::Script::new(retention::PRUNE_SCRIPT),
            }),
        }
    }

    /// With `streams.wait_replicas` or `wait_aof` set: the next head of a user's queue is woken
    /// only once the finish before it is durable, by a task of its own on `conn` (a connection
    /// of its own: `WAIT` blocks the connection it runs on). Without them, unchanged.
    #[must_use]
    pub fn with_durable_wakes(mut self, conn: RedisConnection) -> Self {
        if self.config.wait_replicas > 0 || self.config.wait_aof {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(finish::durable_wakes(
                conn,
                self.config.clone(),
                self.keys.clone(),
                rx,
            ));
            self.durable_wakes = Some(tx);
        }
        self
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    pub fn config(&self) -> &StreamsConfig {
        &self.config
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn conn(&self) -> RedisConnection {
        self.conn.clone()
    }

    /// Creates the consumer group (and the stream) if missing. A group that never existed
    /// starts at the beginning of the stream, so entries added before the first worker are
    /// processed; a group that existed and disappeared (`XGROUP DESTROY`, a restore without
    /// it) is recreated at its delivery mark ([`Keys::mark`]), so that nothing it delivered is
    /// delivered again: what it held unanswered is found in the order queues and
    /// dead-lettered as `stream.orphaned`. Returns the mark when it recreated the group there
    /// (the caller says so loudly).
    pub async fn ensure_group(&self) -> Result<Option<String>, StreamError> {
        let reply: Value = self
            .scripts
            .ensure_group
            .key(&self.config.inbound)
            .key(&self.keys.mark)
            .key(&self.keys.events)
            .arg(&self.config.group)
            .arg(chrono::Utc::now().to_rfc3339())
            .invoke_async(&mut self.conn())
            .await?;
        let mut parts = array(reply).unwrap_or_default().into_iter();
        match (parts.next(), parts.next().and_then(text)) {
            (Some(Value::Int(1)), Some(mark)) if !mark.is_empty() => Ok(Some(mark)),
            (Some(Value::Int(_)), _) => Ok(None),
            other => Err(StreamError::UnexpectedReply(format!(
                "ensure group: {other:?}"
            ))),
        }
    }

    /// Dead letters waiting for a replay or a purge (the dead-letter stream's length).
    ///
    /// # Errors
    /// Redis failures.
    pub async fn dead_letters_waiting(&self) -> Result<u64, StreamError> {
        Ok(redis::cmd("XLEN")
            .arg(&self.config.dead_letter)
            .query_async(&mut self.conn())
            .await?)
    }

    /// The group's pending count (delivered, not acked) and lag (entries not yet delivered;
    /// `None` when Redis cannot tell).
    pub async fn group_state(&self) -> Result<(u64, Option<u64>), StreamError> {
        let info = group_info(&self.conn, &self.config.inbound, &self.config.group).await?;
        Ok(info.map_or((0, None), |g| (g.pending, g.lag)))
    }
}

/// A consumer group's state, from `XINFO GROUPS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    /// Delivered, not acknowledged.
    pub pending: u64,
    /// Not yet delivered (`None` when Redis cannot tell).
    pub lag: Option<u64>,
}

/// A consumer of a group, from `XINFO CONSUMERS`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    /// Entries it holds (delivered, not acknowledged).
    pub pending: u64,
    pub idle_ms: u64,
}

/// Group `group` of stream `inbound`; `None` when the stream or the group does not exist.
///
/// # Errors
/// Redis failures (the stream deleted between the check for it and the query among them).
pub async fn group_info(
    conn: &RedisConnection,
    inbound: &str,
    group: &str,
) -> Result<Option<GroupInfo>, StreamError> {
    use redis::AsyncCommands;
    let mut conn = conn.clone();
    // `XINFO GROUPS` of a missing key is an error whose only mark is its text.
    if !conn.exists::<_, bool>(inbound).await? {
        return Ok(None);
    }
    let reply: redis::streams::StreamInfoGroupsReply = conn.xinfo_groups(inbound).await?;
    Ok(reply
        .groups
        .into_iter()
        .find(|g| g.name == group)
        .map(|g| GroupInfo {
            pending: g.pending as u64,
            lag: g.lag.map(|n| n as u64),
        }))
}

/// The consumers of group `group` of stream `inbound`.
///
/// # Errors
/// Redis failures (a missing group among them).
pub async fn consumers(
    conn: &RedisConnection,
    inbound: &str,
    group: &str,
) -> Result<Vec<ConsumerInfo>, StreamError> {
    use redis::AsyncCommands;
    let reply: redis::streams::StreamInfoConsumersReply =
        conn.clone().xinfo_consumers(inbound, group).await?;
    Ok(reply
        .consumers
        .into_iter()
        .map(|c| ConsumerInfo {
            name: c.name,
            pending: c.pending as u64,
            idle_ms: c.idle as u64,
        })
        .collect())
}

/// A bulk or simple string's bytes.
pub(crate) fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

pub(crate) fn text(v: Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

pub(crate) fn array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) => Some(a),
        _ => None,
    }
}

/// An entry's raw fields from a flat `[name, value, …]` array. `None` when the shape is not
/// that (a deleted entry reads as nil).
pub(crate) fn raw_fields(v: Value) -> Option<Fields> {
    let items = array(v)?;
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((bytes(k)?, bytes(v)?));
    }
    Some(out)
}

/// Runs a pipeline of invocations of `script` on `conn`; when Redis answers that it does not
/// know the script (a restarted Redis forgot it: nothing ran), loads it and runs the pipeline
/// again.
pub(crate) async fn query_scripts(
    mut conn: RedisConnection,
    pipe: &redis::Pipeline,
    script: &redis::Script,
) -> Result<Vec<Value>, StreamError> {
    match pipe.query_async(&mut conn).await {
        Ok(r) => Ok(r),
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.prepare_invoke().load_async(&mut conn).await?;
            Ok(pipe.query_async(&mut conn).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// The fields of entry `id` in an `XRANGE id id` reply; `None` when it is not in the stream.
pub(crate) fn entry_in_range(v: Value, id: &str) -> Option<Fields> {
    range_entries(v)
        .into_iter()
        .find(|(i, _)| i == id)
        .map(|(_, f)| f)
}

/// Entries of an `XRANGE`-shaped reply: `[[id, [k, v, …]], …]`, each decoded on its own; an
/// element that is not of that shape is skipped.
pub(crate) fn range_entries(v: Value) -> Vec<(String, Fields)> {
    array(v)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let mut parts = array(e)?.into_iter();
            let id = text(parts.next()?)?;
            let fields = raw_fields(parts.next()?)?;
            Some((id, fields))
        })
        .collect()
}

/// Like [`range_entries`], with names and values as text (lossy), for reports.
pub fn string_entries(v: Value) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    range_entries(v)
        .into_iter()
        .map(|(id, fields)| {
            let map = fields
                .into_iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(&k).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    )
                })
                .collect();
            (id, map)
        })
        .collect()
}

/// Entry `id`'s place on `group`'s pending list: (consumer, idle ms, deliveries), `None` when
/// it is not pending.
///
/// # Errors
/// Redis failures (a missing group among them).
pub async fn pending_entry(
    conn: &RedisConnection,
    stream: &str,
    group: &str,
    id: &str,
) -> Result<Option<(String, u64, u64)>, StreamError> {
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(&mut conn.clone())
        .await?;
    let Value::Array(items) = reply else {
        return Ok(None);
    };
    let Some(Value::Array(p)) = items.into_iter().next() else {
        return Ok(None);
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    };
    let number = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    Ok((p.len() == 4).then(|| (text(&p[1]), number(&p[2]), number(&p[3]))))
}

/// The entries of `stream` from `from` on (an `XRANGE` start: `-`, an id, or `(id`) that `keep`
/// accepts, read in pages of 1,000, at most `limit` entries read; for reports.
///
/// # Errors
/// Redis failures.
pub async fn scan_entries(
    conn: &RedisConnection,
    stream: &str,
    from: &str,
    limit: usize,
    keep: impl Fn(&std::collections::BTreeMap<String, String>) -> bool,
) -> Result<Vec<(String, std::collections::BTreeMap<String, String>)>, StreamError> {
    let mut out = Vec::new();
    let mut from = from.to_owned();
    let mut read = 0;
    while read < limit {
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn.clone())
            .await?;
        let page = string_entries(reply);
        read += page.len();
        let full = page.len() == 1000;
        let last = page.last().map(|(id, _)| id.clone());
        out.extend(page.into_iter().filter(|(_, f)| keep(f)));
        match last {
            Some(id) if full => from = format!("({id}"),
            _ => break,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams(inbound: &str, outbound: &str, dead: &str, reply: &str) -> StreamsConfig {
        let mut c = crate::config::Config::load(
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml")),
            None,
        )
        .expect("defaults")
        .streams;
        c.inbound = inbound.into();
        c.outbound = outbound.into();
        c.dead_letter = dead.into();
        c.reply_prefix = reply.into();
        c
    }

    #[test]
    fn on_a_cluster_every_stream_key_must_share_the_inbound_streams_slot() {
        let tagged = streams(
            "{icmp}:inbound",
            "{icmp}:outbound",
            "{icmp}:dead",
            "{icmp}:reply:",
        );
        assert_eq!(check_one_slot(&tagged, ""), Ok(()));
        assert_eq!(check_one_slot(&tagged, "tenant-a:"), Ok(()));
        // Today's defaults name no tag: the outbound stream is elsewhere.
        let plain = streams("icmp:inbound", "icmp:outbound", "icmp:dead", "icmp:reply:");
        let err = check_one_slot(&plain, "").expect_err("untagged streams");
        assert!(err.contains("streams.outbound"), "{err}");
        // A reply prefix outside the tag, or braces in the key prefix, are found too.
        let reply = streams(
            "{icmp}:inbound",
            "{icmp}:outbound",
            "{icmp}:dead",
            "replies:",
        );
        let err = check_one_slot(&reply, "").expect_err("reply prefix");
        assert!(err.contains("streams.reply_prefix"), "{err}");
        let err = check_one_slot(&tagged, "{tenant}:").expect_err("braces in the key prefix");
        assert!(err.contains("order queue"), "{err}");
    }

    #[test]
    fn queue_keys_share_the_streams_hash_slot_and_name_stream_and_group() {
        assert_eq!(hash_tag("icmp:inbound"), "icmp:inbound");
        assert_eq!(hash_tag("{icmp}:inbound"), "icmp");
        assert_eq!(hash_tag("a{}b"), "a{}b");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
        let mut config = crate::config::Config::load(std::path::Path::new(path), None)
            .expect("default config")
            .streams;
        config.inbound = "in".into();
        config.group = "g".into();
        let keys = Keys::new(&config, "p:");
        assert_eq!(keys.queue_prefix, "p:order:{in}:g:");
        assert_eq!(keys.queue_index, "p:order-index:{in}:g");
        assert_eq!(keys.wake_channel, "p:order-wake:in:g");
    }

    #[test]
    fn undecodable_elements_of_a_range_reply_are_skipped_alone() {
        let good = Value::Array(vec![
            Value::BulkString(b"1-0".to_vec()),
            Value::Array(vec![
                Value::BulkString(vec![0xff]),
                Value::BulkString(b"v".to_vec()),
            ]),
        ]);
        let deleted = Value::Array(vec![Value::BulkString(b"2-0".to_vec()), Value::Nil]);
        let entries = range_entries(Value::Array(vec![deleted, good]));
        assert_eq!(
            entries,
            vec![("1-0".to_owned(), vec![(vec![0xff], b"v".to_vec())])]
        );
    }
}
