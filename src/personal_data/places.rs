//! Where a user's data is in Redis: entries naming them (`business_id` and `user_id`) in every
//! shard's inbound, outbound, `reply_to` and dead-letter streams and in the agents' stream, and
//! their cached conversation state. Streams are read whole, in pages.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Subject;
use crate::config::{HandoffConfig, StreamsConfig};
use crate::redis_connection::RedisConnection;
use crate::status::StatusError;
use crate::stream::scan_entries;
use crate::trace::Entry;

/// A stream entry and the stream it is in.
#[derive(Debug, Clone, Serialize)]
pub struct Placed {
    /// The stream's key.
    pub stream: String,
    #[serde(flatten)]
    pub entry: Entry,
}

/// A user's entries, by kind of stream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Found {
    /// Every shard's inbound stream.
    pub inbound: Vec<Placed>,
    /// Every shard's outbound stream and `reply_to` streams.
    pub replies: Vec<Placed>,
    /// Every shard's dead-letter stream.
    pub dead_letters: Vec<Placed>,
    /// The agents' stream (messages passed to people).
    pub agents: Vec<Placed>,
}

impl Found {
    /// Entries per kind of stream.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        [
            ("inbound", &self.inbound),
            ("replies", &self.replies),
            ("dead_letters", &self.dead_letters),
            ("agents", &self.agents),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.len() as u64))
        .collect()
    }
}

/// The streams to look in.
#[derive(Debug, Clone, Copy)]
pub struct Streams<'a> {
    /// The inbound, outbound, reply and dead-letter streams (every shard).
    pub streams: &'a StreamsConfig,
    /// The agents' stream.
    pub handoff: &'a HandoffConfig,
}

/// Every entry naming `subject` that `keep` accepts.
///
/// # Errors
/// Redis failures.
pub async fn find(
    conn: &RedisConnection,
    at: Streams<'_>,
    subject: &Subject,
    keep: impl Fn(&Entry) -> bool,
) -> Result<Found, StatusError> {
    Ok(Found {
        inbound: inbound(conn, at, subject, &keep).await?,
        ..outside_inbound(conn, at, subject, &keep).await?
    })
}

/// The user's inbound entries that `keep` accepts, on every shard.
///
/// # Errors
/// Redis failures.
pub async fn inbound(
    conn: &RedisConnection,
    at: Streams<'_>,
    subject: &Subject,
    keep: impl Fn(&Entry) -> bool,
) -> Result<Vec<Placed>, StatusError> {
    let mut out = Vec::new();
    for shard in at.streams.all_shards() {
        out.extend(named(conn, &shard.inbound, subject, &keep).await?);
    }
    Ok(out)
}

/// [`find`] without the inbound streams (left empty): replies, dead letters, agents' entries.
///
/// # Errors
/// Redis failures.
pub async fn outside_inbound(
    conn: &RedisConnection,
    at: Streams<'_>,
    subject: &Subject,
    keep: impl Fn(&Entry) -> bool,
) -> Result<Found, StatusError> {
    let mut found = Found::default();
    for shard in at.streams.all_shards() {
        for stream in reply_streams(conn, &shard).await? {
            found
                .replies
                .extend(named(conn, &stream, subject, &keep).await?);
        }
        found
            .dead_letters
            .extend(named(conn, &shard.dead_letter, subject, &keep).await?);
    }
    found.agents = named(conn, &at.handoff.agents, subject, &keep).await?;
    Ok(found)
}

/// The entries of `stream` naming `subject` that `keep` accepts.
async fn named(
    conn: &RedisConnection,
    stream: &str,
    subject: &Subject,
    keep: impl Fn(&Entry) -> bool,
) -> Result<Vec<Placed>, StatusError> {
    let found = scan_entries(conn, stream, "-", usize::MAX, |f| subject.named_by(f)).await?;
    Ok(found
        .into_iter()
        .map(|(id, fields)| Entry { id, fields })
        .filter(|e| keep(e))
        .map(|entry| Placed {
            stream: stream.to_owned(),
            entry,
        })
        .collect())
}

/// A shard's outbound stream and every `reply_to` stream under its reply prefix (found with
/// `SCAN` on the node of the shard's slot, where the prefix's hash tag puts them on a cluster).
async fn reply_streams(
    conn: &RedisConnection,
    shard: &StreamsConfig,
) -> Result<Vec<String>, StatusError> {
    let mut out = vec![shard.outbound.clone()];
    let pattern = format!("{}*", glob_escape(&shard.reply_prefix));
    let mut cursor = 0u64;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("stream");
        let reply = conn
            .clone()
            .query_on_master_of(&shard.inbound, &cmd)
            .await?;
        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)?;
        out.extend(keys.into_iter().filter(|k| *k != shard.outbound));
        if next == 0 {
            break;
        }
        cursor = next;
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `s` with the glob pattern's special characters escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The user's cached conversation state, as stored (JSON), if any.
///
/// # Errors
/// Redis failures.
pub async fn cached_state(
    conn: &RedisConnection,
    key: &str,
) -> Result<Option<serde_json::Value>, StatusError> {
    let raw: Option<Vec<u8>> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn.clone())
        .await?;
    Ok(raw.map(|bytes| {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()))
    }))
}

/// Removes `ids` from `stream`; returns how many were there.
///
/// # Errors
/// Redis failures.
pub async fn remove(
    conn: &RedisConnection,
    stream: &str,
    ids: &[&str],
) -> Result<u64, StatusError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let n: u64 = redis::cmd("XDEL")
        .arg(stream)
        .arg(ids)
        .query_async(&mut conn.clone())
        .await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_prefix_is_matched_literally() {
        assert_eq!(glob_escape("icmp:reply:{s1}:"), "icmp:reply:{s1}:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
