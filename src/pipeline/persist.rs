//! Steps 10–12 and 14: the write phase and its side effects. One transaction stores everything
//! the message changed; the cache is written only after COMMIT and the conversation's keys are
//! dropped when the transaction fails.

use crate::cache::Cache;
use crate::error::StoreError;
use crate::model::{Conversation, Extracted};
use crate::store::Store;
use crate::store::write_set::WriteSet;
use crate::telemetry::metrics;

use super::failpoint::{self, Failpoints};

/// Commits the write set; on failure the conversation's cache keys are cleared.
/// Returns the conversation's new version.
pub async fn commit(
    store: &Store,
    cache: &Cache,
    ws: &WriteSet,
    failpoints: &Failpoints,
) -> Result<i64, StoreError> {
    let result = store
        .commit_write_set(ws, || {
            if failpoints.is_on(failpoint::BEFORE_COMMIT) {
                Err(StoreError::Injected(failpoint::BEFORE_COMMIT))
            } else {
                Ok(())
            }
        })
        .await;
    if result.is_err()
        && let Err(e) = cache.invalidate_conversation(ws.conversation_id).await
    {
        metrics::record_error(&e, "cache invalidation");
    }
    result
}

/// Writes the committed conversation state and extracted data to the cache.
pub async fn cache_committed(cache: &Cache, conversation: &Conversation, extracted: &Extracted) {
    if let Err(e) = cache.set_conversation(conversation, extracted).await {
        // The next read falls through to PostgreSQL; drop what may be stale.
        metrics::record_error(&e, "cache write");
        let _ = cache.invalidate_conversation(conversation.id).await;
    }
}
