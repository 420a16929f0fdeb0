//! The dead-letter stream seen from the operator's side (`icmp dlq`): list what is there
//! (filtered by business, error code and age), show one entry, replay entries onto the inbound
//! stream once their cause is fixed, and purge them. Entries are read as raw
//! bytes, so a dead letter whose original fields are not UTF-8 lists and replays like any other.

use redis::Value;

use super::range_entries;
use crate::config::StreamsConfig;
use crate::error::StreamError;
use crate::protocol::{self, dead_letter::replay_fields};
use crate::redis_connection::RedisConnection;

/// One dead-lettered entry.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl DeadLetter {
    /// A field as text (lossy), empty when absent.
    pub fn field(&self, name: &str) -> String {
        protocol::raw_field(&self.fields, name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }
}

async fn range(
    conn: &RedisConnection,
    stream: &str,
    from: &str,
    to: &str,
    count: usize,
) -> Result<Vec<DeadLetter>, StreamError> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(from)
        .arg(to)
        .arg("COUNT")
        .arg(count)
        .query_async(&mut conn.clone())
        .await?;
    Ok(range_entries(reply)
        .into_iter()
        .map(|(id, fields)| DeadLetter { id, fields })
        .collect())
}

/// Which dead letters an operator command is about.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this business (as written in the entry).
    pub business: Option<String>,
    /// Only this error code.
    pub code: Option<String>,
    /// Only entries dead-lettered at least this long ago.
    pub older_than: Option<std::time::Duration>,
}

impl Filter {
    pub fn matches(&self, d: &DeadLetter, now_ms: u64) -> bool {
        let business_ok = self
            .business
            .as_ref()
            .is_none_or(|b| d.field("business_id").trim().eq_ignore_ascii_case(b.trim()));
        let code_ok = self
            .code
            .as_ref()
            .is_none_or(|c| &d.field("error_code") == c);
        let age_ok = self.older_than.is_none_or(|age| {
            let at = super::entry_time_ms(&d.id).unwrap_or(u64::MAX);
            now_ms.saturating_sub(at) >= age.as_millis() as u64
        });
        business_ok && code_ok && age_ok
    }
}

impl DeadLetter {
    /// Every field as text (lossy), the stream id under `id`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        map.insert("id".into(), self.id.clone().into());
        for (k, v) in &self.fields {
            map.insert(
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned().into(),
            );
        }
        serde_json::Value::Object(map)
    }
}

/// The oldest dead letters that match `filter`, up to `count`, over every shard's dead-letter
/// stream (each scanned in pages).
pub async fn find(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    filter: &Filter,
    count: usize,
) -> Result<Vec<DeadLetter>, StreamError> {
    let mut all = Vec::new();
    for shard in streams.all_shards() {
        all.extend(find_in(conn, &shard.dead_letter, filter, count).await?);
    }
    Ok(oldest(all, count))
}

/// The oldest `count` of dead letters of several streams (ids are times).
fn oldest(mut letters: Vec<DeadLetter>, count: usize) -> Vec<DeadLetter> {
    letters.sort_by_key(|d| {
        let (ms, seq) = d.id.split_once('-').unwrap_or((&d.id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    });
    letters.truncate(count);
    letters
}

async fn find_in(
    conn: &RedisConnection,
    dead_letter: &str,
    filter: &Filter,
    count: usize,
) -> Result<Vec<DeadLetter>, StreamError> {
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    let mut out = Vec::new();
    let mut from = "-".to_owned();
    while out.len() < count {
        let page = range(conn, dead_letter, &from, "+", 500).await?;
        let Some(last) = page.last().map(|d| d.id.clone()) else {
            break;
        };
        let full = page.len() == 500;
        out.extend(
            page.into_iter()
                .filter(|d| filter.matches(d, now_ms))
                .take(count - out.len()),
        );
        if !full {
            break;
        }
        from = format!("({last}");
    }
    Ok(out)
}

/// One dead letter by its stream id (on whichever shard holds it).
pub async fn show(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    id: &str,
) -> Result<Option<DeadLetter>, StreamError> {
    Ok(locate(conn, streams, id).await?.map(|(_, d)| d))
}

/// The shard whose dead-letter stream holds `id`, and the dead letter.
async fn locate(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    id: &str,
) -> Result<Option<(StreamsConfig, DeadLetter)>, StreamError> {
    for shard in streams.all_shards() {
        let found = range(conn, &shard.dead_letter, id, id, 1)
            .await?
            .into_iter()
            .find(|d| d.id == id);
        if let Some(d) = found {
            return Ok(Some((shard, d)));
        }
    }
    Ok(None)
}

/// Deletes the given dead letters (from every shard's stream); returns the ids that were
/// there.
pub async fn purge(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    ids: &[String],
) -> Result<Vec<String>, StreamError> {
    let mut removed = Vec::new();
    for id in ids {
        for shard in streams.all_shards() {
            let n: u64 = redis::cmd("XDEL")
                .arg(&shard.dead_letter)
                .arg(id)
                .query_async(&mut conn.clone())
                .await?;
            if n == 1 {
                removed.push(id.clone());
                break;
            }
        }
    }
    Ok(removed)
}

/// The oldest `count` dead letters, over every shard.
pub async fn list(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    count: usize,
) -> Result<Vec<DeadLetter>, StreamError> {
    let mut all = Vec::new();
    for shard in streams.all_shards() {
        all.extend(range(conn, &shard.dead_letter, "-", "+", count).await?);
    }
    Ok(oldest(all, count))
}

/// Moves the given dead letters back onto their shard's inbound stream (each in one `MULTI`:
/// XADD to inbound, XDEL from the dead-letter stream, both in the shard's slot). Returns the ids that were found and replayed.
/// A `stream.trimmed` dead letter is not replayed (the message's text was trimmed away with
/// its entry: there is nothing to answer); it stays until purged.
pub async fn replay(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    ids: &[String],
) -> Result<Vec<String>, StreamError> {
    let mut replayed = Vec::new();
    for id in ids {
        // Back onto the shard it came from, which is its user's.
        let Some((streams, letter)) = locate(conn, streams, id).await? else {
            continue;
        };
        if letter.field("error_code") == crate::worker::TRIMMED {
            continue;
        }
        let _: () = redis::pipe()
            .atomic()
            .xadd(&streams.inbound, "*", &replay_fields(&letter.fields))
            .ignore()
            .xdel(&streams.dead_letter, &[&letter.id])
            .ignore()
            .query_async(&mut conn.clone())
            .await?;
        replayed.push(letter.id);
    }
    Ok(replayed)
}
