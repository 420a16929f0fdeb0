//! Publishing an entry once per id, on a stream no consumer group guards: an action's
//! follow-up, a message passed to the agents, an agent's answer. The script adds the entry and
//! sets a marker key beside the stream (in its slot), so a second publication of the same id (a
//! retry after an ambiguous failure, another process's sweep, a redelivered message) adds
//! nothing.

use redis::Value;

use crate::error::CacheError;
use crate::redis_connection::RedisConnection;

const PUBLISH_ONCE: &str = include_str!("lua/publish_once.lua");

/// How long a publication's marker is kept (a retry comes within minutes).
const MARKER_TTL_SECS: u64 = 7 * 24 * 3600;

/// The marker of `id` on stream `destination`, in the stream's slot: the stream's own hash tag
/// when it has one, else its whole name as the tag. (A name with a brace that makes no tag,
/// such as `a{}b`, cannot be given a key of its slot: on a Redis Cluster, give such streams
/// names without braces or with a tag.)
pub fn marker_key(destination: &str, id: &str) -> String {
    if super::hash_tag(destination) != destination {
        format!("{destination}:published:{id}")
    } else {
        format!("{{{destination}}}:published:{id}")
    }
}

/// Whether a publication happened now or before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Now,
    Before,
}

/// How a stream is kept: trimmed to about `maxlen` entries, or expiring `ttl_secs` after its
/// last entry (0: neither).
#[derive(Debug, Clone, Copy, Default)]
pub struct Keep {
    pub maxlen: usize,
    pub ttl_secs: u64,
}

/// Adds `fields` to `destination` unless an entry of `id` was added before.
///
/// # Errors
/// Redis failures, or a destination key of another type (nothing published).
pub async fn publish_once(
    conn: &RedisConnection,
    destination: &str,
    id: &str,
    keep: Keep,
    fields: &[(&str, String)],
) -> Result<Published, CacheError> {
    let script = redis::Script::new(PUBLISH_ONCE);
    let mut call = script.key(destination);
    call.key(marker_key(destination, id))
        .arg(MARKER_TTL_SECS)
        .arg(keep.maxlen)
        .arg(keep.ttl_secs);
    for (name, value) in fields {
        call.arg(*name).arg(value);
    }
    let answer: Value = call.invoke_async(&mut conn.clone()).await?;
    match answer {
        Value::Int(1) => Ok(Published::Now),
        Value::Int(0) => Ok(Published::Before),
        _ => Err(CacheError::Decode(format!(
            "the stream {destination} holds another type"
        ))),
    }
}

/// Publishes an unprompted message to its user (with `extra` fields), once per `reply_id`: a
/// `reply_to` stream expires an hour after it, the outbound stream is trimmed as configured.
///
/// # Errors
/// Redis failures, or a destination key of another type (nothing published).
pub async fn publish_unprompted(
    conn: &RedisConnection,
    streams: &crate::config::StreamsConfig,
    m: &crate::protocol::reply::Unprompted<'_>,
    extra: &[(&'static str, String)],
) -> Result<Published, CacheError> {
    let reply = crate::protocol::reply::Reply::unprompted(m, streams)
        .traced(crate::telemetry::trace_context::current());
    let keep = match m.reply_to {
        None => Keep {
            maxlen: streams.outbound_maxlen,
            ttl_secs: 0,
        },
        Some(_) => Keep {
            maxlen: 0,
            ttl_secs: super::finish::REPLY_STREAM_TTL_SECS,
        },
    };
    let mut fields = reply.fields();
    fields.extend(extra.iter().cloned());
    publish_once(
        conn,
        &reply.destination,
        &reply.reply_id.to_string(),
        keep,
        &fields,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_shares_its_streams_slot() {
        let m = marker_key("icmp:replies:{s3}:abc", "7");
        assert_eq!(m, "icmp:replies:{s3}:abc:published:7");
        assert_eq!(
            crate::protocol::shard::slot(&m),
            crate::protocol::shard::slot("icmp:replies:{s3}:abc")
        );
        let m = marker_key("icmp:outbound", "7");
        assert_eq!(
            crate::protocol::shard::slot(&m),
            crate::protocol::shard::slot("icmp:outbound")
        );
    }
}
