//! Step 2, idempotency: a message whose (business, user, key) is already committed gets its
//! stored answer again, not a second one.
//!
//! The user's cached state (the read phase needs it anyway) names the keys of their latest
//! messages: a key it names is answered from the store; with the state at hand and the key
//! not in it, a first delivery is new (a repeat of an older message is still caught by the
//! unique key when its write set commits, or looked up before any error is returned). The
//! store is asked without a cached state, and for a redelivery or a replay: those are the
//! messages most likely committed already (a crash between the commit and the cache write
//! leaves the older state).

use super::conversation::Known;
use super::{Attempt, Processed};
use crate::cache::Cache;
use crate::error::PipelineError;
use crate::model::{Answer, ConversationState};
use crate::protocol::InboundMessage;
use crate::retry::RetryPolicy;
use crate::store::Store;
use crate::telemetry::metrics;

/// Whether the store must be asked for `msg`'s answer before it is processed (see the module
/// docs); when not, the unique key and [`Ledger::stored_answer`] after a failure cover it.
pub fn must_look_up(
    msg: &InboundMessage,
    attempt: Attempt,
    state: Option<&ConversationState>,
) -> bool {
    let key = msg.idempotency_key();
    !attempt.is_first()
        || msg.supersedes.is_some()
        || state.is_none_or(|s| s.recent_keys.iter().any(|k| k == key))
}

/// Whether the user's latest conversation is read before the stored answer is looked up:
/// without a cached state, for a first delivery naming no conversation (most often a new
/// user's first message). A user with no conversation has no message stored, so for them the
/// one query answers both; for the others the answer is looked up next, and the conversation
/// read serves the read phase.
pub fn latest_first(msg: &InboundMessage, attempt: Attempt, known: &Known) -> bool {
    matches!(known, Known::Unknown)
        && attempt.is_first()
        && msg.supersedes.is_none()
        && msg.conversation_id.is_none()
}

/// Where committed answers are found.
#[derive(Debug, Clone, Copy)]
pub struct Ledger<'a> {
    pub store: &'a Store,
    pub cache: &'a Cache,
    pub retry: &'a RetryPolicy,
}

impl Ledger<'_> {
    /// The message's stored answer, as a duplicate, if it was committed before. With
    /// `forget`, the user's cached conversation state is dropped then: a stored answer means a
    /// commit whose cache write may never have happened (a crash between COMMIT and the cache,
    /// a lost COMMIT acknowledgement), so the state may be stale.
    ///
    /// # Errors
    /// The store failing past its retries.
    pub async fn answered(
        &self,
        msg: &InboundMessage,
        forget: bool,
    ) -> Result<Option<Processed>, PipelineError> {
        let Some(answer) = self.stored_answer(msg).await? else {
            return Ok(None);
        };
        if forget
            && let Err(e) = self
                .cache
                .invalidate_conversation(msg.business_id, &msg.user_id)
                .await
        {
            metrics::record_error(&e, "cache invalidation");
        }
        Ok(Some(Processed::Duplicate(answer)))
    }

    /// The message's stored answer, if it was committed before.
    ///
    /// # Errors
    /// The store failing past its retries.
    pub async fn stored_answer(
        &self,
        msg: &InboundMessage,
    ) -> Result<Option<Answer>, PipelineError> {
        let key = msg.idempotency_key();
        Ok(self
            .retry
            .run("db.find_reply", || {
                self.store.find_reply(msg.business_id, &msg.user_id, key)
            })
            .await?)
    }
}
