//! The reply published on the outbound stream (fields of DESIGN §5, docs/protocol.md).

use std::collections::HashMap;

use chrono::Utc;
use uuid::Uuid;

use super::validate::InboundMessage;
use crate::error::Classify;
use crate::model::StoredReply;

/// `ok`, `fallback` or `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    Ok,
    Fallback,
    Error,
}

impl ReplyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyStatus::Ok => "ok",
            ReplyStatus::Fallback => "fallback",
            ReplyStatus::Error => "error",
        }
    }
}

/// A reply and the stream it goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The stream to publish on: the message's `reply_to`, else the outbound stream.
    pub destination: String,
    /// The idempotency key (the producer's `message_id`, else the inbound entry id).
    pub message_id: String,
    pub inbound_id: String,
    pub business_id: String,
    pub user_id: String,
    pub conversation_id: String,
    pub status: ReplyStatus,
    pub content: String,
    pub stage: String,
    pub error_code: String,
    pub error: String,
    pub status_code: u16,
    pub log_id: Uuid,
    pub processed_at: String,
}

impl Reply {
    /// The stream fields, in protocol order.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("message_id", self.message_id.clone()),
            ("inbound_id", self.inbound_id.clone()),
            ("business_id", self.business_id.clone()),
            ("user_id", self.user_id.clone()),
            ("conversation_id", self.conversation_id.clone()),
            ("status", self.status.as_str().to_owned()),
            ("content", self.content.clone()),
            ("stage", self.stage.clone()),
            ("error_code", self.error_code.clone()),
            ("error", self.error.clone()),
            ("status_code", self.status_code.to_string()),
            ("log_id", self.log_id.to_string()),
            ("processed_at", self.processed_at.clone()),
        ]
    }

    /// A successful (or fallback) reply to `msg`, sent to its `reply_to` or to `outbound`.
    pub fn answer(
        msg: &InboundMessage,
        outbound: &str,
        conversation_id: Uuid,
        fallback: bool,
        content: String,
        stage: String,
        log_id: Uuid,
    ) -> Reply {
        Reply {
            destination: msg.reply_to.clone().unwrap_or_else(|| outbound.to_owned()),
            message_id: msg.idempotency_key().to_owned(),
            inbound_id: msg.inbound_id.clone(),
            business_id: msg.business_id.to_string(),
            user_id: msg.user_id.clone(),
            conversation_id: conversation_id.to_string(),
            status: if fallback {
                ReplyStatus::Fallback
            } else {
                ReplyStatus::Ok
            },
            content,
            stage,
            error_code: String::new(),
            error: String::new(),
            status_code: 200,
            log_id,
            processed_at: Utc::now().to_rfc3339(),
        }
    }

    /// The reply already committed for `msg`, published again.
    pub fn from_stored(stored: &StoredReply, msg: &InboundMessage, outbound: &str) -> Reply {
        Reply::answer(
            msg,
            outbound,
            stored.conversation_id,
            stored.status == "fallback",
            stored.content.clone(),
            stored.stage.clone().unwrap_or_default(),
            stored.log_id,
        )
    }

    /// An error reply built from whatever the raw entry carries (it may be invalid).
    /// `reply_to` is honoured only when it is within `reply_prefix`.
    pub fn error(
        inbound_id: &str,
        raw: &HashMap<String, Vec<u8>>,
        err: &dyn Classify,
        log_id: Uuid,
        outbound: &str,
        reply_prefix: &str,
    ) -> Reply {
        let field = |name: &str| {
            raw.get(name)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let reply_to = field("reply_to");
        let destination = if super::validate::check_reply_to(&reply_to, reply_prefix).is_ok() {
            reply_to
        } else {
            outbound.to_owned()
        };
        let message_id = Some(field("message_id"))
            .filter(|m| !m.is_empty() && m.chars().count() <= 128)
            .unwrap_or_else(|| inbound_id.to_owned());
        let truncate = |s: String, max: usize| s.chars().take(max).collect::<String>();
        Reply {
            destination,
            message_id,
            inbound_id: inbound_id.to_owned(),
            business_id: truncate(field("business_id"), 64),
            user_id: truncate(field("user_id"), 256),
            conversation_id: truncate(field("conversation_id"), 64),
            status: ReplyStatus::Error,
            content: String::new(),
            stage: String::new(),
            error_code: err.code().to_owned(),
            error: err.user_message(),
            status_code: err.status_code(),
            log_id,
            processed_at: Utc::now().to_rfc3339(),
        }
    }
}
