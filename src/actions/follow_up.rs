//! Follow-ups: an action's message to the user once its result is in. The dispatcher stores it
//! (in the transaction that records the result) as the conversation's next assistant message,
//! then publishes it here to where the firing message's reply went, with its own `reply_id`.
//! A marker key beside the stream (same slot), set in the script that publishes, makes a second
//! publication of the same `reply_id` (a retry after an ambiguous failure, or another process's
//! sweep) publish nothing: one entry per follow-up.

use redis::Value;

use crate::config::StreamsConfig;
use crate::error::CacheError;
use crate::protocol::reply::{Reply, ReplyStatus};
use crate::redis_connection::RedisConnection;
use crate::store::outbox::FollowUp;
use crate::stream::finish::REPLY_STREAM_TTL_SECS;

const PUBLISH_ONCE: &str = include_str!("lua/publish_once.lua");

/// How long a publication's marker is kept (a retry comes within minutes).
const MARKER_TTL_SECS: u64 = 7 * 24 * 3600;

/// The marker of `reply_id` on stream `destination`, in the stream's slot: the stream's own
/// hash tag when it has one, else its whole name as the tag. (A name with a brace that makes
/// no tag, such as `a{}b`, cannot be given a key of its slot: on a Redis Cluster, give reply
/// streams names without braces or with a tag.)
pub fn marker_key(destination: &str, reply_id: uuid::Uuid) -> String {
    if crate::stream::hash_tag(destination) != destination {
        format!("{destination}:published:{reply_id}")
    } else {
        format!("{{{destination}}}:published:{reply_id}")
    }
}

/// The reply entry of a follow-up: status `follow_up`, the action's name, the firing message's
/// key as `message_id`.
pub fn reply(f: &FollowUp, streams: &StreamsConfig) -> Reply {
    let shard = streams.for_user(&f.business_id, &f.user_id);
    Reply {
        destination: f.reply_to.clone().unwrap_or(shard.outbound),
        reply_id: f.reply_id,
        message_id: f.message_key.clone(),
        inbound_id: String::new(),
        business_id: f.business_id.to_string(),
        user_id: f.user_id.clone(),
        conversation_id: f.conversation_id.to_string(),
        status: ReplyStatus::FollowUp,
        content: f.text.clone(),
        stage: f.stage.clone(),
        error_code: String::new(),
        error: String::new(),
        status_code: 200,
        log_id: f.outbox_id,
        processed_at: chrono::Utc::now().to_rfc3339(),
        supersedes: String::new(),
        answered_by: String::new(),
        model: String::new(),
        endpoint: String::new(),
    }
}

/// Whether a publication happened now or before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Now,
    Before,
}

/// Whether the entry of the message that fired the action is still pending in its group (its
/// reply is not published yet: the follow-up must wait, so that it comes after the reply).
///
/// # Errors
/// Redis failures.
pub async fn firing_message_pending(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    f: &FollowUp,
) -> Result<bool, CacheError> {
    let Some(id) = &f.inbound_id else {
        return Ok(false);
    };
    let shard = streams.for_user(&f.business_id, &f.user_id);
    let pending: Vec<Value> = redis::cmd("XPENDING")
        .arg(&shard.inbound)
        .arg(&shard.group)
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(&mut conn.clone())
        .await?;
    Ok(!pending.is_empty())
}

/// Publishes the follow-up once per `reply_id`, to the firing message's `reply_to`, else to
/// the user's outbound stream.
///
/// # Errors
/// Redis failures, or a destination key of another type (nothing published).
pub async fn publish(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    f: &FollowUp,
) -> Result<Published, CacheError> {
    let reply = reply(f, streams);
    let (maxlen, ttl) = if f.reply_to.is_none() {
        (streams.outbound_maxlen, 0)
    } else {
        (0, REPLY_STREAM_TTL_SECS)
    };
    let script = redis::Script::new(PUBLISH_ONCE);
    let mut call = script.key(&reply.destination);
    call.key(marker_key(&reply.destination, reply.reply_id))
        .arg(MARKER_TTL_SECS)
        .arg(maxlen)
        .arg(ttl);
    for (name, value) in reply.fields() {
        call.arg(name).arg(value);
    }
    call.arg("action").arg(&f.action);
    let answer: Value = call.invoke_async(&mut conn.clone()).await?;
    match answer {
        Value::Int(1) => Ok(Published::Now),
        Value::Int(0) => Ok(Published::Before),
        _ => Err(CacheError::Decode(format!(
            "the reply stream {} holds another type",
            reply.destination
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_shares_its_streams_slot() {
        let id = uuid::Uuid::from_u128(7);
        let m = marker_key("icmp:replies:{s3}:abc", id);
        assert!(m.starts_with("icmp:replies:{s3}:abc:published:"));
        assert_eq!(
            crate::protocol::shard::slot(&m),
            crate::protocol::shard::slot("icmp:replies:{s3}:abc")
        );
        let m = marker_key("icmp:outbound", id);
        assert_eq!(
            crate::protocol::shard::slot(&m),
            crate::protocol::shard::slot("icmp:outbound")
        );
    }
}
