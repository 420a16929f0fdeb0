//! The reply published for every inbound entry (fields of DESIGN §5, docs/protocol.md).

use chrono::Utc;
use uuid::Uuid;

use super::inbound::{InboundMessage, check_reply_to};
use super::{RawFields, raw_field};
use crate::error::Classify;
use crate::model::Answer;

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
    /// What a consumer dedupes on: the id of the stored answer (the same for every publication
    /// of one answer), or a fresh id for an error reply.
    pub reply_id: Uuid,
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
            ("reply_id", self.reply_id.to_string()),
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

    /// The reply carrying `answer` to `msg`, sent to its `reply_to` or to `outbound`.
    pub fn answer(msg: &InboundMessage, answer: &Answer, outbound: &str) -> Reply {
        Reply {
            destination: msg.reply_to.clone().unwrap_or_else(|| outbound.to_owned()),
            reply_id: answer.reply_id,
            message_id: msg.idempotency_key().to_owned(),
            inbound_id: msg.inbound_id.clone(),
            business_id: msg.business_id.to_string(),
            user_id: msg.user_id.clone(),
            conversation_id: answer.conversation_id.to_string(),
            status: if answer.fallback {
                ReplyStatus::Fallback
            } else {
                ReplyStatus::Ok
            },
            content: answer.content.clone(),
            stage: answer.stage.clone(),
            error_code: String::new(),
            error: String::new(),
            status_code: 200,
            log_id: answer.log_id,
            processed_at: Utc::now().to_rfc3339(),
        }
    }

    /// An error reply built from whatever the raw entry carries (it may be undecodable).
    /// `reply_to` is honoured only when it is within `reply_prefix`.
    pub fn error(
        inbound_id: &str,
        raw: &RawFields,
        err: &dyn Classify,
        log_id: Uuid,
        outbound: &str,
        reply_prefix: &str,
    ) -> Reply {
        let field = |name: &str| {
            raw_field(raw, name)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let reply_to = field("reply_to");
        let destination = if check_reply_to(&reply_to, reply_prefix).is_ok() {
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
            reply_id: Uuid::now_v7(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ValidationError;

    #[test]
    fn an_error_reply_reads_what_it_can_of_a_broken_entry() {
        let raw = vec![
            (vec![0xff], b"x".to_vec()),
            (b"user_id".to_vec(), vec![b'a', 0xfe]),
            (b"message_id".to_vec(), vec![b'm'; 300]),
            (b"reply_to".to_vec(), b"elsewhere".to_vec()),
        ];
        let r = Reply::error(
            "5-0",
            &raw,
            &ValidationError::UnreadableFieldName,
            Uuid::nil(),
            "out",
            "r:",
        );
        assert_eq!(r.destination, "out");
        assert_eq!(r.message_id, "5-0", "an oversized message_id is not echoed");
        assert_eq!(r.user_id, "a\u{fffd}");
        assert_eq!(r.error_code, "validation.unreadable_field_name");
        assert_eq!(r.status_code, 400);
    }
}
