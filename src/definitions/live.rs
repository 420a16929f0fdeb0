//! Live definitions: a watch on PostgreSQL's `icmp_definitions` notifications (migration V4's
//! trigger fires on every change of a business, stage or template, from `icmp import` or a
//! direct SQL edit) drops that business's definitions in this process and in Redis, so a new
//! template version is used by the next message. While the watch is connected the in-process
//! tier serves; when it is lost the tier is off (Redis and PostgreSQL serve) until it is back.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cache::Cache;
use crate::retry::Backoff;
use crate::store::Store;
use crate::store::listen::DEFINITIONS_CHANNEL;
use crate::telemetry::metrics;

/// Runs the watch until `stop` is cancelled, reconnecting after failures.
pub async fn watch_definitions(store: Store, cache: Cache, stop: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match store.listen(DEFINITIONS_CHANNEL).await {
            Ok(mut notifications) => {
                backoff.reset();
                cache.local().enable();
                tracing::debug!("definitions watch connected");
                loop {
                    tokio::select! {
                        () = stop.cancelled() => {
                            cache.local().disable();
                            return;
                        }
                        payload = notifications.next() => match payload {
                            Some(payload) => changed(&store, &cache, &payload).await,
                            None => break,
                        },
                    }
                }
                cache.local().disable();
                tracing::warn!(
                    "definitions watch lost its connection; in-process definitions are off until it is back"
                );
            }
            Err(e) => metrics::record_error(&e, "definitions watch"),
        }
        if backoff.wait(&stop).await {
            return;
        }
    }
}

/// One business's definitions changed: drop its copies here and in Redis.
async fn changed(store: &Store, cache: &Cache, payload: &str) {
    let Ok(business_id) = Uuid::parse_str(payload) else {
        tracing::warn!("ignoring a definitions notification that is not a business id");
        return;
    };
    cache.local().forget_business(business_id);
    metrics::definitions_changed();
    match store.definition_ids(business_id).await {
        Ok((stages, templates)) => {
            if let Err(e) = cache
                .invalidate_definitions(business_id, &stages, &templates)
                .await
            {
                metrics::record_error(&e, "definitions invalidation");
            }
        }
        // The Redis copies expire after `cache.definition_ttl_secs`.
        Err(e) => metrics::record_error(&e, "definitions invalidation"),
    }
}
