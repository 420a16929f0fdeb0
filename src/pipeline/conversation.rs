//! Step 3: the conversation. A given `conversation_id` must exist and belong to the message's
//! business and user; without one, the user's latest conversation continues, or a new one
//! starts (it is inserted by the write phase).

use chrono::Utc;
use uuid::Uuid;

use crate::cache::{self, Cache};
use crate::error::{PipelineError, ValidationError};
use crate::model::{Conversation, Extracted};
use crate::store::Store;

/// The conversation a message belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub conversation: Conversation,
    /// Not stored yet: the write phase inserts it.
    pub is_new: bool,
}

/// Finds or starts the conversation. `fresh` bypasses the cache (after a version conflict).
pub async fn resolve(
    store: &Store,
    cache: &Cache,
    business_id: Uuid,
    initial_stage_id: Uuid,
    user_id: &str,
    requested: Option<Uuid>,
    fresh: bool,
) -> Result<Resolved, PipelineError> {
    let existing = match requested {
        Some(id) => {
            let cached = if fresh {
                None
            } else {
                cached_conversation(cache, id).await
            };
            let conv = match cached {
                Some(c) => Some(c),
                None => store.load_conversation(business_id, id).await?,
            };
            // Someone else's conversation is reported as unknown: its existence is not leaked.
            match conv {
                Some(c) if c.business_id == business_id && c.user_external_id == user_id => Some(c),
                _ => return Err(ValidationError::UnknownConversation.into()),
            }
        }
        None => {
            let cached = if fresh {
                None
            } else {
                latest_cached(cache, business_id, user_id).await
            };
            match cached {
                Some(c) => Some(c),
                None => store.latest_conversation(business_id, user_id).await?,
            }
        }
    };
    Ok(match existing {
        Some(conversation) => Resolved {
            conversation,
            is_new: false,
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
                },
                is_new: true,
            }
        }
    })
}

/// The user's latest conversation as the last commit cached it (the pointer and the
/// conversation both), when it belongs to this business and user.
async fn latest_cached(cache: &Cache, business_id: Uuid, user_id: &str) -> Option<Conversation> {
    let id = cache::observed("latest", cache.get_latest(business_id, user_id).await)?;
    cached_conversation(cache, id)
        .await
        .filter(|c| c.business_id == business_id && c.user_external_id == user_id)
}

async fn cached_conversation(cache: &Cache, id: Uuid) -> Option<Conversation> {
    cache::observed("conversation", cache.get_conversation(id).await)
}

/// The conversation's extracted data (`data:{id}`, else PostgreSQL).
pub async fn extracted(
    store: &Store,
    cache: &Cache,
    resolved: &Resolved,
    fresh: bool,
) -> Result<Extracted, PipelineError> {
    if resolved.is_new {
        return Ok(Extracted::new());
    }
    let c = &resolved.conversation;
    if !fresh && let Some(d) = cache::observed("data", cache.get_data(c.id, c.version).await) {
        return Ok(d);
    }
    Ok(store.extracted(c.business_id, c.id).await?)
}
