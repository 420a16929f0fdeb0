//! Coalesced turns: a message taken together with the later messages of its user that wait
//! behind it (same business, user, conversation and reply destination). The turn reads as one
//! message carrying every text in order; every message is stored; one answer is made, and each
//! later message gets a `coalesced` reply that refers to it. A turn that cannot be taken
//! together (a later message stored before, or a failure one of them causes) is answered
//! alone, and the others get turns of their own.

use crate::model::{Answer, AnswerStatus};
use crate::protocol::InboundMessage;

/// One turn: a message, the later messages answered with it, and whether it is over budget.
#[derive(Debug, Clone, Copy)]
pub struct Turn<'a> {
    pub msg: &'a InboundMessage,
    pub followers: &'a [InboundMessage],
    pub throttled: bool,
    /// The outbound stream of the shard the message came from (where its reply goes without
    /// a `reply_to`).
    pub outbound: &'a str,
}

impl Turn<'_> {
    /// The turn as the pipeline reads it: the message itself, or, coalesced, one message
    /// carrying every text, in order.
    pub fn as_one_message(&self) -> std::borrow::Cow<'_, InboundMessage> {
        if self.followers.is_empty() {
            return std::borrow::Cow::Borrowed(self.msg);
        }
        std::borrow::Cow::Owned(InboundMessage {
            content: std::iter::once(self.msg)
                .chain(self.followers)
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            ..self.msg.clone()
        })
    }

    /// The same turn without its later messages.
    pub fn alone(self) -> Self {
        Turn {
            followers: &[],
            ..self
        }
    }

    /// The later messages' answers: each `coalesced`, stored as `ids` (in order), referring
    /// to `answer`.
    pub fn follower_answers(
        &self,
        answer: &Answer,
        ids: &[uuid::Uuid],
    ) -> Vec<(InboundMessage, Answer)> {
        self.followers
            .iter()
            .zip(ids)
            .map(|(m, id)| {
                let reference = Answer {
                    reply_id: *id,
                    status: AnswerStatus::Coalesced,
                    content: String::new(),
                    answered_by: Some(answer.reply_id),
                    ..answer.clone()
                };
                (m.clone(), reference)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, content: &str) -> InboundMessage {
        InboundMessage {
            inbound_id: format!("{id}-entry"),
            message_id: Some(id.to_owned()),
            business_id: uuid::Uuid::from_u128(1),
            user_id: "u".into(),
            content: content.into(),
            conversation_id: None,
            metadata: None,
            reply_to: None,
            supersedes: None,
        }
    }

    #[test]
    fn a_coalesced_turn_reads_as_one_message_with_every_text_in_order() {
        let first = message("a", "Hello");
        let later = [message("b", "I would like"), message("c", "to book")];
        let turn = Turn {
            msg: &first,
            followers: &later,
            throttled: false,
            outbound: "out",
        };
        let seen = turn.as_one_message();
        assert_eq!(seen.content, "Hello\nI would like\nto book");
        assert_eq!(seen.message_id.as_deref(), Some("a"));
        assert!(matches!(
            turn.alone().as_one_message(),
            std::borrow::Cow::Borrowed(m) if m.content == "Hello"
        ));
    }
}
