//! The reply published for every inbound entry (fields of DESIGN §5, docs/protocol.md).

use chrono::Utc;
use uuid::Uuid;

use super::inbound::{InboundMessage, check_reply_to};
use super::{RawFields, raw_field};
use crate::error::Classify;
use crate::model::{Answer, AnswerStatus};
use crate::telemetry::trace_context::{TRACEPARENT, TRACESTATE};

/// `ok`, `fallback`, `throttled`, `coalesced`, `error`, `follow_up`, `handoff` or `agent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    Ok,
    Fallback,
    /// Over the business's budget: a reply from its throttled template.
    Throttled,
    /// Answered by the reply named in `answered_by` (a coalesced turn); no content.
    Coalesced,
    Error,
    /// A stage action's follow-up: a message of its own, after the reply to the message that
    /// fired the action (`action` names it).
    FollowUp,
    /// A message received while a person has the conversation (passed to the agents; the
    /// business's handoff reply, possibly empty), or the timeout reply of a handoff nobody
    /// answered (`message_id` empty).
    Handoff,
    /// A person's answer (`agent_id` names them).
    Agent,
}

impl ReplyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyStatus::Ok => "ok",
            ReplyStatus::Fallback => "fallback",
            ReplyStatus::Throttled => "throttled",
            ReplyStatus::Coalesced => "coalesced",
            ReplyStatus::Error => "error",
            ReplyStatus::FollowUp => "follow_up",
            ReplyStatus::Handoff => "handoff",
            ReplyStatus::Agent => "agent",
        }
    }

    fn parse(s: &str) -> Option<ReplyStatus> {
        [
            ReplyStatus::Ok,
            ReplyStatus::Fallback,
            ReplyStatus::Throttled,
            ReplyStatus::Coalesced,
            ReplyStatus::Error,
            ReplyStatus::FollowUp,
            ReplyStatus::Handoff,
            ReplyStatus::Agent,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

impl From<AnswerStatus> for ReplyStatus {
    fn from(s: AnswerStatus) -> ReplyStatus {
        match s {
            AnswerStatus::Ok => ReplyStatus::Ok,
            AnswerStatus::Fallback => ReplyStatus::Fallback,
            AnswerStatus::Throttled => ReplyStatus::Throttled,
            AnswerStatus::Coalesced => ReplyStatus::Coalesced,
            AnswerStatus::Handoff => ReplyStatus::Handoff,
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
    /// The `reply_id` of an earlier error reply this one replaces (a replayed dead letter);
    /// empty otherwise.
    pub supersedes: String,
    /// `coalesced` replies: the `reply_id` of the reply that answered this message together
    /// with earlier ones; empty otherwise.
    pub answered_by: String,
    /// The model and the LLM endpoint that wrote `content` (empty when none did: fallback,
    /// throttled and error replies).
    pub model: String,
    pub endpoint: String,
    /// The W3C trace context of the span that wrote the reply (`traceparent`, and `tracestate`
    /// when there is one; docs/protocol.md): empty when the message had no trace.
    pub trace: Vec<(&'static str, String)>,
}

impl Reply {
    /// The reply with the trace context `trace` ([`crate::telemetry::trace_context`]).
    #[must_use]
    pub fn traced(mut self, trace: Vec<(&'static str, String)>) -> Reply {
        self.trace = trace;
        self
    }

    /// The stream fields, in protocol order (the trace context last, when there is one).
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
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
            ("supersedes", self.supersedes.clone()),
            ("answered_by", self.answered_by.clone()),
            ("model", self.model.clone()),
            ("endpoint", self.endpoint.clone()),
        ];
        fields.extend(self.trace.iter().cloned());
        fields
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
            status: answer.status.into(),
            content: answer.content.clone(),
            stage: answer.stage.clone(),
            error_code: String::new(),
            error: String::new(),
            status_code: 200,
            log_id: answer.log_id,
            processed_at: Utc::now().to_rfc3339(),
            supersedes: msg.supersedes.map(|s| s.to_string()).unwrap_or_default(),
            answered_by: answer
                .answered_by
                .map(|a| a.to_string())
                .unwrap_or_default(),
            model: answer.model.clone(),
            endpoint: answer.endpoint.clone(),
            trace: Vec::new(),
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
            supersedes: Some(field("supersedes"))
                .filter(|s| Uuid::parse_str(s).is_ok())
                .unwrap_or_default(),
            answered_by: String::new(),
            model: String::new(),
            endpoint: String::new(),
            trace: Vec::new(),
        }
    }
}

/// A message to a user that answers no inbound entry of theirs: an action's follow-up, an
/// agent's answer, a handoff's timeout reply.
#[derive(Debug, Clone)]
pub struct Unprompted<'a> {
    pub business_id: Uuid,
    pub conversation_id: Uuid,
    pub user_id: &'a str,
    /// Where the user's message asked its reply (`None`: the user's outbound stream).
    pub reply_to: Option<&'a str>,
    /// The stored message's id.
    pub reply_id: Uuid,
    /// The key it relates to (the firing message's, the agent's; empty: none).
    pub message_id: &'a str,
    pub status: ReplyStatus,
    pub content: &'a str,
    pub stage: &'a str,
    pub log_id: Uuid,
}

impl Reply {
    /// The reply entry of an unprompted message, to its user's `reply_to` or outbound stream.
    pub fn unprompted(m: &Unprompted<'_>, streams: &crate::config::StreamsConfig) -> Reply {
        Reply {
            destination: m.reply_to.map_or_else(
                || streams.for_user(&m.business_id, m.user_id).outbound,
                str::to_owned,
            ),
            reply_id: m.reply_id,
            message_id: m.message_id.to_owned(),
            inbound_id: String::new(),
            business_id: m.business_id.to_string(),
            user_id: m.user_id.to_owned(),
            conversation_id: m.conversation_id.to_string(),
            status: m.status,
            content: m.content.to_owned(),
            stage: m.stage.to_owned(),
            error_code: String::new(),
            error: String::new(),
            status_code: 200,
            log_id: m.log_id,
            processed_at: Utc::now().to_rfc3339(),
            supersedes: String::new(),
            answered_by: String::new(),
            model: String::new(),
            endpoint: String::new(),
            trace: Vec::new(),
        }
    }
}

/// Why reply fields could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reply field `{field}`: {problem}")]
pub struct ReplyDecodeError {
    pub field: &'static str,
    pub problem: String,
}

impl Reply {
    /// Reads a reply back from its stream fields (what a consumer does); `destination` is the
    /// stream it was read from.
    ///
    /// # Errors
    /// A missing field, or one that is not what the protocol says.
    pub fn decode(
        destination: &str,
        fields: &std::collections::HashMap<String, String>,
    ) -> Result<Reply, ReplyDecodeError> {
        let get = |name: &'static str| {
            fields.get(name).cloned().ok_or(ReplyDecodeError {
                field: name,
                problem: "missing".into(),
            })
        };
        let bad = |name: &'static str, problem: String| ReplyDecodeError {
            field: name,
            problem,
        };
        let uuid = |name: &'static str| {
            let v = get(name)?;
            Uuid::parse_str(&v).map_err(|e| bad(name, e.to_string()))
        };
        let status = get("status")?;
        let status = ReplyStatus::parse(&status)
            .ok_or_else(|| bad("status", format!("unknown status {status:?}")))?;
        Ok(Reply {
            destination: destination.to_owned(),
            reply_id: uuid("reply_id")?,
            message_id: get("message_id")?,
            inbound_id: get("inbound_id")?,
            business_id: get("business_id")?,
            user_id: get("user_id")?,
            conversation_id: get("conversation_id")?,
            status,
            content: get("content")?,
            stage: get("stage")?,
            error_code: get("error_code")?,
            error: get("error")?,
            status_code: get("status_code")?
                .parse()
                .map_err(|e: std::num::ParseIntError| bad("status_code", e.to_string()))?,
            log_id: uuid("log_id")?,
            processed_at: get("processed_at")?,
            // Optional: replies published before the field existed have none.
            supersedes: fields.get("supersedes").cloned().unwrap_or_default(),
            answered_by: fields.get("answered_by").cloned().unwrap_or_default(),
            model: fields.get("model").cloned().unwrap_or_default(),
            endpoint: fields.get("endpoint").cloned().unwrap_or_default(),
            trace: [TRACEPARENT, TRACESTATE]
                .into_iter()
                .filter_map(|k| fields.get(k).map(|v| (k, v.clone())))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ValidationError;
    use proptest::prelude::*;

    fn reply() -> impl Strategy<Value = Reply> {
        let status = proptest::sample::select(vec![
            ReplyStatus::Ok,
            ReplyStatus::Fallback,
            ReplyStatus::Throttled,
            ReplyStatus::Coalesced,
            ReplyStatus::Error,
        ]);
        (
            (any::<u128>(), any::<u128>(), status, any::<u16>()),
            proptest::collection::vec(any::<String>(), 15),
        )
            .prop_map(|((reply_id, log_id, status, code), s)| Reply {
                destination: "out".into(),
                reply_id: Uuid::from_u128(reply_id),
                message_id: s[0].clone(),
                inbound_id: s[1].clone(),
                business_id: s[2].clone(),
                user_id: s[3].clone(),
                conversation_id: s[4].clone(),
                status,
                content: s[5].clone(),
                stage: s[6].clone(),
                error_code: s[7].clone(),
                error: s[8].clone(),
                status_code: code,
                log_id: Uuid::from_u128(log_id),
                processed_at: s[9].clone(),
                supersedes: s[10].clone(),
                answered_by: s[11].clone(),
                model: s[12].clone(),
                endpoint: s[13].clone(),
                trace: if s[14].is_empty() {
                    Vec::new()
                } else {
                    vec![(TRACEPARENT, s[14].clone())]
                },
            })
    }

    proptest! {
        /// Whatever a reply carries (any text in any field), a consumer reads back exactly
        /// what was published.
        #[test]
        fn a_reply_reads_back_as_published(r in reply()) {
            let fields: std::collections::HashMap<String, String> = r
                .fields()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            prop_assert_eq!(fields.len(), 18 + r.trace.len(), "every field once");
            prop_assert_eq!(Reply::decode("out", &fields), Ok(r));
        }
    }

    #[test]
    fn a_reply_missing_a_field_or_with_a_bad_one_is_named() {
        let mut fields: std::collections::HashMap<String, String> = Reply::error(
            "1-0",
            &[],
            &ValidationError::UnreadableFieldName,
            Uuid::nil(),
            "out",
            "r:",
        )
        .fields()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        fields.insert("status".into(), "maybe".into());
        let e = Reply::decode("out", &fields).expect_err("bad status");
        assert_eq!(e.field, "status");
        fields.remove("log_id");
        fields.insert("status".into(), "ok".into());
        assert_eq!(
            Reply::decode("out", &fields).expect_err("missing").field,
            "log_id"
        );
    }

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
