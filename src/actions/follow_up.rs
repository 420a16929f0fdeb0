//! Follow-ups: an action's message to the user once its result is in. The dispatcher stores it
//! (in the transaction that records the result) as the conversation's next assistant message,
//! then publishes it here to where the firing message's reply went, with its own `reply_id`.
//! A marker key beside the stream (same slot), set in the script that publishes, makes a second
//! publication of the same `reply_id` (a retry after an ambiguous failure, or another process's
//! sweep) publish nothing: one entry per follow-up.

use redis::Value;

use crate::config::StreamsConfig;
use crate::error::CacheError;
use crate::protocol::reply::{ReplyStatus, Unprompted};
use crate::redis_connection::RedisConnection;
use crate::store::outbox::FollowUp;
use crate::stream::once::{Published, publish_unprompted};

/// Whether the message that fired the action is not finished yet (its reply is not published:
/// the follow-up must wait, so that it comes after the reply). Its entry is unfinished while
/// it is pending in its group, or still in its user's order queue: an operator's `XGROUP
/// DELCONSUMER` takes an entry off the pending list but not out of the queue, where it stays
/// until its finish publishes the reply (or the sweep answers it).
///
/// # Errors
/// Redis failures.
pub async fn firing_message_pending(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    key_prefix: &str,
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
    if !pending.is_empty() {
        return Ok(true);
    }
    let queue = crate::stream::Keys::new(&shard, key_prefix).queue_key(f.business_id, &f.user_id);
    let queued: Option<f64> = redis::cmd("ZSCORE")
        .arg(&queue)
        .arg(crate::stream::order::member(id))
        .query_async(&mut conn.clone())
        .await?;
    Ok(queued.is_some())
}

/// Publishes the follow-up once per `reply_id` (status `follow_up`, the action's name, the
/// firing message's key as `message_id`), to the firing message's `reply_to`, else to the
/// user's outbound stream.
///
/// # Errors
/// Redis failures, or a destination key of another type (nothing published).
pub async fn publish(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    f: &FollowUp,
) -> Result<Published, CacheError> {
    let m = Unprompted {
        business_id: f.business_id,
        conversation_id: f.conversation_id,
        user_id: &f.user_id,
        reply_to: f.reply_to.as_deref(),
        reply_id: f.reply_id,
        message_id: &f.message_key,
        status: ReplyStatus::FollowUp,
        content: &f.text,
        stage: &f.stage,
        log_id: f.outbox_id,
    };
    publish_unprompted(conn, streams, &m, &[("action", f.action.clone())]).await
}
