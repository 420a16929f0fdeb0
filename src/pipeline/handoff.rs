//! Human handoff in the pipeline: a message of a conversation a person has is stored and
//! acknowledged (status `handoff`, the business's `[business.handoff] reply`) without any LLM
//! call, and the worker passes it to the agents; a message that brings the conversation into a
//! stage marked `handoff = true` starts a handoff (its reply is the stage's, as usual).

use uuid::Uuid;

use super::decide::Decisions;
use super::read::Snapshot;
use super::respond::Response;
use crate::model::{AnswerStatus, Business, Extracted, HandoffState};

/// The agents' side of a turn: the message passed to them (`message`), or the one that
/// started the handoff (`started`), and what started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToAgents {
    pub kind: &'static str,
    pub by: String,
    /// When the handoff started (unix ms).
    pub since_ms: i64,
}

/// The decisions for a message while a person has the conversation: the stage stays, nothing
/// is extracted or fired, the reply is the business's handoff reply (an `upon` template of the
/// message's context), and the handoff notes where the user's latest message asked its reply.
pub fn waiting<'b>(
    engine: &upon::Engine<'static>,
    business: &Business,
    read: &Snapshot<'b>,
    state: &HandoffState,
    reply_to: Option<&str>,
) -> Decisions<'b> {
    // Import rendered it against a sample: only data can break it (then the reply is empty).
    let content = crate::handoff::render(engine, &business.policy.handoff.reply, &read.context)
        .unwrap_or_else(|e| {
            crate::telemetry::metrics::handoff("reply_failed");
            tracing::error!(error = %e, "the handoff reply did not render; an empty one is sent");
            String::new()
        });
    Decisions {
        stage: read.stage,
        transition: None,
        learned: Extracted::new(),
        response: Response {
            reply_id: Uuid::now_v7(),
            content,
            status: AnswerStatus::Handoff,
            fallback_template: None,
            template: None,
            by: None,
        },
        calls: Vec::new(),
        timings: Vec::new(),
        actions: Vec::new(),
        handoff: Some(HandoffState {
            reply_to: reply_to.map(str::to_owned),
            ..state.clone()
        }),
    }
}

/// What the agents get of a turn whose decisions are `d`, made from a conversation whose
/// handoff was `before`.
pub fn to_agents(before: Option<&HandoffState>, d: &Decisions<'_>) -> Option<ToAgents> {
    let state = d.handoff.as_ref()?;
    Some(ToAgents {
        kind: if before.is_some() {
            "message"
        } else {
            "started"
        },
        by: state.by.clone(),
        since_ms: state.since_ms,
    })
}
