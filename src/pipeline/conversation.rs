//! Step 3: the conversation. A given `conversation_id` must exist and belong to the message's
//! business and user; without one, the user's latest conversation continues, or a new one
//! starts (it is inserted by the write phase).

use chrono::Utc;
use uuid::Uuid;

use crate::cache::{self, Cache};
use crate::error::{PipelineError, ValidationError};
use crate::model::{Conversation, ConversationState, Extracted, Turn};
use crate::store::Store;

/// The conversation a message belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub conversation: Conversation,
    /// Not stored yet: the write phase inserts it.
    pub is_new: bool,
    /// The conversation's history window and extracted data, when its state came from the
    /// cache (else they are read from PostgreSQL).
    pub cached: Option<(Vec<Turn>, Extracted)>,
    /// The idempotency keys the cached state remembered (empty when it did not serve).
    pub recent_keys: Vec<String>,
}

/// What is known of the user's conversation before the read phase.
#[derive(Debug, Default)]
pub enum Known {
    /// Nothing (after a version conflict, or no state is cached): it is read.
    #[default]
    Unknown,
    /// The user's state as the last commit cached it. (Boxed, as the other variant: a message's
    /// task holds what is known in several of its phases' states, which would each keep a
    /// whole state otherwise.)
    Cached(Box<ConversationState>),
    /// The user's latest conversation, just read from the store (`None`: they have none).
    Stored(Option<Box<Conversation>>),
}

impl Known {
    /// The cached state, if that is what is known.
    pub fn cached(&self) -> Option<&ConversationState> {
        match self {
            Known::Cached(s) => Some(s),
            _ => None,
        }
    }
}

/// Finds or starts the conversation. What is `known` serves a message that names no
/// conversation (a cached state also one that names the conversation it holds); a cached
/// history window of another length than `window` is not used.
#[allow(clippy::too_many_arguments)]
pub async fn resolve(
    store: &Store,
    business_id: Uuid,
    initial_stage_id: Uuid,
    user_id: &str,
    requested: Option<Uuid>,
    window: usize,
    known: Known,
) -> Result<Resolved, PipelineError> {
    let existing = match (known, requested) {
        (Known::Cached(state), _) if requested.is_none_or(|id| id == state.conversation.id) => {
            let cached = (state.window == window).then_some((state.history, state.extracted));
            return Ok(Resolved {
                conversation: state.conversation,
                is_new: false,
                cached,
                recent_keys: state.recent_keys,
            });
        }
        (Known::Stored(latest), None) => latest.map(|c| *c),
        (_, Some(id)) => {
            // Someone else's conversation is reported as unknown: its existence is not leaked.
            match store.load_conversation(business_id, id).await? {
                Some(c) if c.business_id == business_id && c.user_external_id == user_id => Some(c),
                _ => return Err(ValidationError::UnknownConversation.into()),
            }
        }
        (_, None) => store.latest_conversation(business_id, user_id).await?,
    };
    Ok(match existing {
        Some(conversation) => Resolved {
            conversation,
            is_new: false,
            cached: None,
            recent_keys: Vec::new(),
        },
        None => {
            let now = Utc::now();
            Resolved {
                conversation: Conversation {
                    id: Uuid::now_v7(),
                    business_id,
                    user_external_id: user_id.to_owned(),
                    stage_id: initial_stage_id,
                    version: 0,
                    created_at: now,
                    updated_at: now,
                    summary: String::new(),
                    summarized_seq: 0,
                    actions: serde_json::Map::new(),
                    handoff: None,
                },
                is_new: true,
                cached: None,
                recent_keys: Vec::new(),
            }
        }
    })
}

/// The user's state as the last commit cached it, when it belongs to this business and user.
pub async fn cached_state(
    cache: &Cache,
    business_id: Uuid,
    user_id: &str,
) -> Option<Box<ConversationState>> {
    cache::observed("conversation", cache.get_state(business_id, user_id).await)
        .filter(|s| {
            s.conversation.business_id == business_id && s.conversation.user_external_id == user_id
        })
        .map(Box::new)
}
