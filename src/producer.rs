//! A producer's side of the protocol: enqueue one message on the inbound stream with a private
//! `reply_to` stream and wait for its reply (`icmp send`, `icmp chat`, `icmp replay`, tests).

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use uuid::Uuid;

use crate::config::StreamsConfig;
use crate::error::CacheError;
use crate::redis_connection::RedisConnection;

/// A message to send.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    pub business_id: String,
    pub user_id: String,
    pub content: String,
    pub conversation_id: Option<String>,
    pub message_id: Option<String>,
    pub metadata: Option<String>,
}

/// Why no reply came.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Redis(#[from] CacheError),
    #[error("no reply within {0:?} (is a worker running?)")]
    Timeout(Duration),
}

impl crate::error::Classify for SendError {
    fn code(&self) -> &'static str {
        match self {
            SendError::Redis(e) => e.code(),
            SendError::Timeout(_) => "client.no_reply",
        }
    }
    fn category(&self) -> crate::error::Category {
        match self {
            SendError::Redis(e) => e.category(),
            SendError::Timeout(_) => crate::error::Category::System,
        }
    }
    fn status_code(&self) -> u16 {
        match self {
            SendError::Redis(e) => e.status_code(),
            SendError::Timeout(_) => 504,
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            SendError::Redis(e) => e.is_retryable(),
            SendError::Timeout(_) => true,
        }
    }
}

impl From<redis::RedisError> for SendError {
    fn from(e: redis::RedisError) -> Self {
        SendError::Redis(e.into())
    }
}

/// Enqueues `msg` on its user's shard of the inbound stream, with a `reply_to` stream in that
/// shard's slot, and waits up to `timeout` for its reply; returns the reply's fields.
///
/// # Errors
/// Redis failures, or no reply in time.
pub async fn send_and_wait(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    msg: &Outgoing,
    timeout: Duration,
) -> Result<HashMap<String, String>, SendError> {
    let streams = &streams.for_fields(&msg.business_id, &msg.user_id);
    let reply_to = format!("{}{}", streams.reply_prefix, Uuid::new_v4());
    let mut fields: Vec<(&str, &str)> = vec![
        ("business_id", &msg.business_id),
        ("user_id", &msg.user_id),
        ("content", &msg.content),
        ("reply_to", &reply_to),
    ];
    if let Some(c) = &msg.conversation_id {
        fields.push(("conversation_id", c));
    }
    if let Some(m) = &msg.message_id {
        fields.push(("message_id", m));
    }
    if let Some(m) = &msg.metadata {
        fields.push(("metadata", m));
    }
    let mut c = conn.clone();
    let _: String = c.xadd(&streams.inbound, "*", &fields).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            let _: Result<(), _> = c.del(&reply_to).await;
            return Err(SendError::Timeout(timeout));
        }
        // Short blocks keep the shared connection usable for other callers.
        let block = left.min(Duration::from_millis(500));
        let opts = StreamReadOptions::default()
            .count(1)
            .block(block.as_millis() as usize);
        let reply: Option<StreamReadReply> = c.xread_options(&[&reply_to], &["0"], &opts).await?;
        if let Some(entry) = reply
            .and_then(|r| r.keys.into_iter().next())
            .and_then(|k| k.ids.into_iter().next())
        {
            let _: Result<(), _> = c.del(&reply_to).await;
            return Ok(fields_to_strings(entry.map));
        }
    }
}

/// Stream entry fields as text (invalid UTF-8 replaced).
pub fn fields_to_strings(map: HashMap<String, redis::Value>) -> HashMap<String, String> {
    map.into_iter()
        .map(|(k, v)| {
            let s = match v {
                redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                redis::Value::SimpleString(s) => s,
                other => format!("{other:?}"),
            };
            (k, s)
        })
        .collect()
}
