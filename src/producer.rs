//! A producer's side of the protocol: enqueue one message on the inbound stream with a private
//! `reply_to` stream and wait for its reply, and for the follow-ups of the actions it fired when
//! asked (`icmp send`, `icmp chat`, `icmp replay`, tests).

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

/// What came back for one message: its reply, and the follow-ups of the actions it fired that
/// came within the wait asked for.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    pub reply: HashMap<String, String>,
    pub follow_ups: Vec<HashMap<String, String>>,
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
    Ok(exchange(conn, streams, msg, timeout, Duration::ZERO)
        .await?
        .reply)
}

/// As [`send_and_wait`], then waits up to `follow_ups_within` for the first follow-up of an
/// action the message fired (`status = follow_up`, published on the same `reply_to` stream
/// after the reply). Partial replies are skipped.
///
/// # Errors
/// Redis failures, or no reply in time.
pub async fn exchange(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    msg: &Outgoing,
    timeout: Duration,
    follow_ups_within: Duration,
) -> Result<Exchange, SendError> {
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
    let mut deadline = tokio::time::Instant::now() + timeout;
    let mut last = "0".to_owned();
    let mut got = Exchange::default();
    let mut replied = false;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() || (replied && !got.follow_ups.is_empty()) {
            let _: Result<(), _> = c.del(&reply_to).await;
            return if replied {
                Ok(got)
            } else {
                Err(SendError::Timeout(timeout))
            };
        }
        // Short blocks keep the shared connection usable for other callers.
        let block = left.min(Duration::from_millis(500));
        let opts = StreamReadOptions::default()
            .count(16)
            .block(block.as_millis().max(1) as usize);
        let read: Option<StreamReadReply> = c.xread_options(&[&reply_to], &[&last], &opts).await?;
        for entry in read.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            last.clone_from(&entry.id);
            let entry = fields_to_strings(entry.map);
            match entry.get("status").map(String::as_str) {
                Some("partial") => {}
                Some("follow_up") => got.follow_ups.push(entry),
                _ if !replied => {
                    got.reply = entry;
                    replied = true;
                    deadline = tokio::time::Instant::now() + follow_ups_within;
                }
                _ => {}
            }
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
