//! `icmp user erase`: removes one user's data everywhere icmp keeps it, safely while workers
//! run (docs/operations.md, "Personal data").
//!
//! 1. PostgreSQL, in one transaction ([`Store::erase_user`]): the user's row is taken (waiting
//!    for a worker that is writing it), the instant of the erase is read from the user's
//!    inbound stream (its last entry id), the erase is noted under the user's key, and every row
//!    is deleted. From then on a message whose entry id is not later than that cannot store
//!    anything (the write set refuses it; the worker acknowledges it without a reply); a later
//!    one is a new user's.
//! 2. The user's inbound entries up to that instant: removed at once when the group has not
//!    delivered them, else once no worker needs them (finished: acknowledged and out of the
//!    order queue), waiting up to `wait` for those in flight.
//! 3. The cached state (again after the wait: a worker that committed before the erase writes
//!    it with its finish), and the entries of the reply, dead-letter and agents' streams that
//!    belong to the erased period (their message arrived until the instant, or they name an
//!    erased conversation).
//!
//! Idempotent: running it again removes what is left.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::Subject;
use super::places::{self, Placed, Streams};
use crate::error::Classify as _;
use crate::redis_connection::RedisConnection;
use crate::status::StatusError;
use crate::store::Store;
use crate::stream::removal::{Removal, remove_settled};
use crate::stream::{entry_id_parts, is_entry_id};
use crate::trace::Entry;

/// What an erase removed, per place, and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Erasure {
    /// The instant of the erase: the last entry id of the user's inbound stream when the erase
    /// took the user's row. Their messages up to it are dropped; later ones are a new user's.
    pub erased_at: String,
    /// Items removed per place: PostgreSQL tables, `cached_state`, `inbound` (finished
    /// entries), `inbound_undelivered`, `replies`, `dead_letters`, `agents`.
    pub counts: BTreeMap<String, u64>,
    /// Inbound entries still held by a worker when the wait ran out (run the erase again).
    pub in_flight: Vec<String>,
}

/// How often in-flight entries are looked at again while the erase waits for them.
const POLL: Duration = Duration::from_millis(100);

/// How many times the database part is tried when it fails for a reason that may pass.
const ATTEMPTS: u32 = 5;

/// Erases `subject` (see the module's documentation).
///
/// # Errors
/// Redis or PostgreSQL failures; a failure after the database's transaction leaves the rest
/// to a second run.
pub async fn erase(
    store: &Store,
    conn: &RedisConnection,
    key_prefix: &str,
    at: Streams<'_>,
    subject: &Subject,
    wait: Duration,
) -> Result<Erasure, StatusError> {
    let user_shard = at.streams.for_user(&subject.business, &subject.user);
    // A deadlock with a retention sweep (or a worker) is broken by PostgreSQL: tried again.
    let mut attempt = 0;
    let rows = loop {
        attempt += 1;
        let done = store
            .erase_user(subject.business, &subject.user, async || {
                last_id(conn, &user_shard.inbound).await
            })
            .await;
        match done {
            Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                tokio::time::sleep(POLL * attempt).await;
            }
            other => break other?,
        }
    };
    let erased = rows.erased;
    let mut counts = rows.counts;
    let state_key = crate::cache::state_key(key_prefix, subject.business, &subject.user);
    let mut cached = delete(conn, &state_key).await?;

    let conversations: HashSet<String> =
        rows.conversations.iter().map(ToString::to_string).collect();
    let instant = (
        u64::try_from(erased.0).unwrap_or(0),
        u64::try_from(erased.1).unwrap_or(0),
    );
    let not_later = |id: &str| entry_id_parts(id).is_some_and(|id| id <= instant);
    let arrived_before = |entry: &Entry| not_later(&entry.id);
    // A reply, dead letter or agents' entry is of the erased period when its message arrived
    // until the instant or it names an erased conversation; one without a message (an agent's
    // answer) when it was written before the instant's millisecond was over.
    let of_erased_period = |entry: &Entry| {
        let message = entry.fields.get("inbound_id").filter(|i| is_entry_id(i));
        let before = match message {
            Some(id) => not_later(id),
            None => entry_id_parts(&entry.id).is_some_and(|(ms, _)| ms <= instant.0),
        };
        before
            || entry
                .fields
                .get("conversation_id")
                .is_some_and(|c| conversations.contains(c))
    };

    let inbound = places::inbound(conn, at, subject, arrived_before).await?;
    let in_flight = settle_inbound(conn, at, key_prefix, inbound, wait, &mut counts).await?;
    cached += delete(conn, &state_key).await?;
    counts.insert("cached_state".to_owned(), cached);

    let found = places::outside_inbound(conn, at, subject, &of_erased_period).await?;
    for (place, entries) in [
        ("replies", &found.replies),
        ("dead_letters", &found.dead_letters),
        ("agents", &found.agents),
    ] {
        counts.insert(place.to_owned(), remove_all(conn, entries).await?);
    }
    counts.entry("inbound".to_owned()).or_default();
    counts.entry("inbound_undelivered".to_owned()).or_default();
    Ok(Erasure {
        erased_at: format!("{}-{}", erased.0, erased.1),
        counts,
        in_flight,
    })
}

/// Removes the user's inbound entries: at once those no worker needs, the others once they
/// are finished, waiting up to `wait` (counted in `counts`); returns those still in flight.
async fn settle_inbound(
    conn: &RedisConnection,
    at: Streams<'_>,
    key_prefix: &str,
    inbound: Vec<Placed>,
    wait: Duration,
    counts: &mut BTreeMap<String, u64>,
) -> Result<Vec<String>, StatusError> {
    let shards = at.streams.all_shards();
    let mut pending: Vec<Placed> = Vec::new();
    let settle = async |placed: Placed,
                        counts: &mut BTreeMap<String, u64>,
                        pending: &mut Vec<Placed>|
           -> Result<(), StatusError> {
        let Some(shard) = shards.iter().find(|s| s.inbound == placed.stream) else {
            return Ok(());
        };
        match remove_settled(conn, shard, key_prefix, &placed.entry.id).await? {
            Removal::Settled => *counts.entry("inbound".to_owned()).or_default() += 1,
            Removal::Undelivered => {
                *counts.entry("inbound_undelivered".to_owned()).or_default() += 1;
            }
            Removal::InFlight => pending.push(placed),
            Removal::Absent => {}
        }
        Ok(())
    };
    for placed in inbound {
        settle(placed, counts, &mut pending).await?;
    }
    let until = tokio::time::Instant::now() + wait;
    while !pending.is_empty() && tokio::time::Instant::now() < until {
        tokio::time::sleep(POLL).await;
        for placed in std::mem::take(&mut pending) {
            settle(placed, counts, &mut pending).await?;
        }
    }
    Ok(pending.into_iter().map(|p| p.entry.id).collect())
}

/// Removes `entries` from their streams; returns how many were there.
async fn remove_all(conn: &RedisConnection, entries: &[Placed]) -> Result<u64, StatusError> {
    let mut by_stream: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in entries {
        by_stream
            .entry(p.stream.as_str())
            .or_default()
            .push(p.entry.id.as_str());
    }
    let mut n = 0;
    for (stream, ids) in by_stream {
        n += places::remove(conn, stream, &ids).await?;
    }
    Ok(n)
}

/// The last entry id stream `key` gave (`0-0` for a stream that does not exist): every entry
/// added to it later has a greater id.
async fn last_id(conn: &RedisConnection, key: &str) -> Result<(i64, i64), StatusError> {
    let exists: bool = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut conn.clone())
        .await?;
    if !exists {
        // No entry was ever added.
        return Ok((0, 0));
    }
    let info: redis::Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(&mut conn.clone())
        .await?;
    let fields: std::collections::HashMap<String, redis::Value> = redis::from_redis_value(info)?;
    let last: String = fields
        .get("last-generated-id")
        .cloned()
        .map(redis::from_redis_value)
        .transpose()?
        .unwrap_or_else(|| "0-0".to_owned());
    let (ms, seq) = entry_id_parts(&last).unwrap_or_default();
    Ok((
        i64::try_from(ms).unwrap_or(i64::MAX),
        i64::try_from(seq).unwrap_or(i64::MAX),
    ))
}

async fn delete(conn: &RedisConnection, key: &str) -> Result<u64, StatusError> {
    let n: u64 = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut conn.clone())
        .await?;
    Ok(n)
}
