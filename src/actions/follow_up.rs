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
use crate::stream::once::{Keep, Published, publish_once};

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
    let keep = if f.reply_to.is_none() {
        Keep {
            maxlen: streams.outbound_maxlen,
            ttl_secs: 0,
        }
    } else {
        Keep {
            maxlen: 0,
            ttl_secs: REPLY_STREAM_TTL_SECS,
        }
    };
    let mut fields = reply.fields();
    fields.push(("action", f.action.clone()));
    publish_once(
        conn,
        &reply.destination,
        &reply.reply_id.to_string(),
        keep,
        &fields,
    )
    .await
}
