//! Removing one entry from the inbound stream without pulling it from under a worker
//! (`icmp user erase`): an entry the group never delivered is removed at once, one that a
//! worker holds or that waits in its order queue is left until it is finished, one that is
//! finished is removed. The check and the removal are one script.

use redis::Value;

use super::Keys;
use crate::config::StreamsConfig;
use crate::error::StreamError;
use crate::redis_connection::RedisConnection;

/// `KEYS[1]` = inbound, `KEYS[2]` = the group's queued entries; `ARGV` = group, entry id.
const REMOVE_SETTLED_SCRIPT: &str = script!("remove_settled");

/// What [`remove_settled`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Removed before the group delivered it: no worker will see it.
    Undelivered,
    /// Removed: it was finished (or will never be delivered).
    Settled,
    /// Left alone: a worker holds it, or it waits in its order queue.
    InFlight,
    /// Not in the stream (trimmed, or removed before).
    Absent,
}

/// Removes entry `id` from `streams.inbound` unless it is in flight (see [`Removal`]).
///
/// # Errors
/// Redis failures.
pub async fn remove_settled(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    key_prefix: &str,
    id: &str,
) -> Result<Removal, StreamError> {
    let keys = Keys::new(streams, key_prefix);
    let reply: Value = redis::Script::new(REMOVE_SETTLED_SCRIPT)
        .key(&streams.inbound)
        .key(&keys.queued)
        .arg(&streams.group)
        .arg(id)
        .invoke_async(&mut conn.clone())
        .await?;
    let text = match &reply {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => {
            return Err(StreamError::UnexpectedReply(format!(
                "remove_settled: {other:?}"
            )));
        }
    };
    match text.as_str() {
        "undelivered" => Ok(Removal::Undelivered),
        "settled" => Ok(Removal::Settled),
        "in_flight" => Ok(Removal::InFlight),
        "absent" => Ok(Removal::Absent),
        other => Err(StreamError::UnexpectedReply(format!(
            "remove_settled: {other}"
        ))),
    }
}
