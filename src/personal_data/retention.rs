//! The retention sweep (docs/operations.md, "Personal data"): every worker process, every
//! `retention.sweep_interval_ms`, applies each business's `[business.retention]`. It deletes
//! messages past `messages_days` (with what points at them, the conversations and users they
//! leave empty, and the users' cached states), blanks LLM prompts and outputs past
//! `llm_prompts_days`, and deletes dead letters past `dead_letters_days`. PostgreSQL is worked in batches
//! of `retention.batch_rows`, each its own short transaction, with a pause between two; rows
//! another process's sweep holds are skipped, so workers sweeping at once share the work.
//! Counted in `icmp_retention_removed_total{what}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{RetentionConfig, StreamsConfig};
use crate::model::Retention;
use crate::protocol::inbound::canonical_business;
use crate::redis_connection::RedisConnection;
use crate::status::StatusError;
use crate::store::Store;
use crate::store::retention::{Span, Swept as Kind};
use crate::stream::{entry_time_ms, scan_entries};
use crate::telemetry::metrics;

/// What one sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Swept {
    /// LLM calls whose prompt and output were blanked.
    pub llm_prompts: u64,
    /// Messages, conversations and users deleted.
    pub messages: u64,
    pub conversations: u64,
    pub users: u64,
    /// Cached conversation states deleted.
    pub cached_states: u64,
    /// Dead letters deleted.
    pub dead_letters: u64,
}

/// What the sweep works on.
#[derive(Debug, Clone)]
pub struct Sweeper {
    /// The database, under the worker role.
    pub store: Store,
    /// Redis: cached states and dead letters.
    pub conn: RedisConnection,
    /// Where the dead letters are (every shard).
    pub streams: StreamsConfig,
    /// `redis.key_prefix`.
    pub key_prefix: String,
    /// `[retention]`.
    pub config: RetentionConfig,
    /// Where this process's sweep got to, per business and kind of row: it starts there next
    /// time (and from the oldest row after a day, in case another process's sweep gave up rows
    /// it had skipped). Shared by clones.
    pub marks: Marks,
}

/// Per business and kind of row: the end of the time swept through, and when it was reached.
pub type Marks = Arc<Mutex<HashMap<(Uuid, Kind), (DateTime<Utc>, Instant)>>>;

impl Sweeper {
    /// A sweeper over `store` (the worker role) and `conn`, as `config` says.
    pub fn new(
        store: Store,
        conn: RedisConnection,
        streams: StreamsConfig,
        key_prefix: String,
        config: RetentionConfig,
    ) -> Sweeper {
        Sweeper {
            store,
            conn,
            streams,
            key_prefix,
            config,
            marks: Marks::default(),
        }
    }
}

const DAY_MS: i64 = 86_400_000;

/// The slice of time one batch works in.
const SPAN: Duration = Duration::from_secs(86_400);

/// How long a mark is trusted.
const MARK_TTL: Duration = Duration::from_secs(86_400);

impl Sweeper {
    /// Sweeps every `sweep_interval_ms` (the first time after a random part of it, so that
    /// workers started together do not sweep together) until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let every = self.config.sweep_interval_ms;
        if every == 0 {
            return;
        }
        let mut wait = Duration::from_millis(rand::random_range(0..every.max(1)));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = Duration::from_millis(every);
            let now = chrono::Utc::now();
            if let Err(e) = self.sweep(now, &stop).await {
                metrics::record_error(&e, "retention");
                tracing::warn!(
                    error.code = crate::error::Classify::code(&e),
                    "retention sweep failed; trying again at the next"
                );
            }
        }
    }

    /// One sweep as of `now`.
    ///
    /// # Errors
    /// Redis or PostgreSQL failures (what was done stays done).
    pub async fn sweep(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        stop: &CancellationToken,
    ) -> Result<Swept, StatusError> {
        let policies = self.store.retention_policies().await?;
        let mut swept = Swept::default();
        for (business, retention) in &policies {
            if stop.is_cancelled() {
                break;
            }
            // One business's failure (a deadlock with an erase, say) leaves the others' sweep.
            if let Err(e) = self
                .sweep_business(*business, retention, now, stop, &mut swept)
                .await
            {
                metrics::record_error(&e, "retention");
                tracing::warn!(
                    business.id = %business,
                    error.code = crate::error::Classify::code(&e),
                    "retention sweep of a business failed; trying again at the next"
                );
            }
        }
        let dead: HashMap<Uuid, i64> = policies
            .iter()
            .filter_map(|(b, r)| Some((*b, before_ms(now, r.dead_letters_days?))))
            .collect();
        if !dead.is_empty() {
            swept.dead_letters = self.sweep_dead_letters(&dead).await?;
            metrics::retention_removed("dead_letters", swept.dead_letters);
        }
        Ok(swept)
    }

    async fn sweep_business(
        &self,
        business: Uuid,
        retention: &Retention,
        now: DateTime<Utc>,
        stop: &CancellationToken,
        swept: &mut Swept,
    ) -> Result<(), StatusError> {
        // Messages first: their LLM calls go with them, and need no blanking.
        for (what, days) in [
            (Kind::Messages, retention.messages_days),
            (Kind::Prompts, retention.llm_prompts_days),
        ] {
            if let Some(days) = days {
                let before = now - chrono::Duration::days(i64::from(days));
                self.through(business, what, before, stop, swept).await?;
            }
        }
        Ok(())
    }

    /// One batch of `what` in `span`; returns how many rows it took.
    async fn batch(
        &self,
        business: Uuid,
        what: Kind,
        span: Span,
        before: DateTime<Utc>,
        swept: &mut Swept,
    ) -> Result<u64, StatusError> {
        let limit = self.config.batch_rows.max(1);
        if what == Kind::Prompts {
            let n = self.store.blank_prompts(business, span, limit).await?;
            swept.llm_prompts += n;
            metrics::retention_removed("llm_prompts", n);
            return Ok(n);
        }
        let expired = self
            .store
            .expire_messages(business, span, before, limit)
            .await?;
        swept.messages += expired.messages;
        swept.conversations += expired.conversations;
        swept.users += expired.users;
        metrics::retention_removed("messages", expired.messages);
        metrics::retention_removed("conversations", expired.conversations);
        metrics::retention_removed("users", expired.users);
        // Their cached states may hold the messages just deleted.
        for user in &expired.touched_users {
            let key = crate::cache::state_key(&self.key_prefix, business, user);
            let n: u64 = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut self.conn.clone())
                .await?;
            swept.cached_states += n;
        }
        Ok(expired.messages)
    }

    /// Works through the rows of `what` stored before `before` in batches, one day's slice
    /// after the other from this process's mark (else the oldest conversation's start), each
    /// slice until a
    /// batch comes back short, with `retention.pause_ms` after every batch that did something.
    async fn through(
        &self,
        business: Uuid,
        what: Kind,
        before: DateTime<Utc>,
        stop: &CancellationToken,
        swept: &mut Swept,
    ) -> Result<(), StatusError> {
        let limit = self.config.batch_rows.max(1).unsigned_abs();
        let pause = Duration::from_millis(self.config.pause_ms);
        let mark = self
            .marks
            .lock()
            .ok()
            .and_then(|m| m.get(&(business, what)).copied())
            .filter(|(_, at)| at.elapsed() < MARK_TTL)
            .map(|(mark, _)| mark);
        let mut from = match mark {
            Some(m) => m,
            None => match self.store.oldest_conversation(business).await? {
                Some(oldest) => oldest,
                None => return Ok(()),
            },
        };
        let span = chrono::Duration::from_std(SPAN).unwrap_or_else(|_| chrono::Duration::days(1));
        while from < before && !stop.is_cancelled() {
            let to = (from + span).min(before);
            let n = self
                .batch(business, what, Span { from, to }, before, swept)
                .await?;
            if n < limit {
                from = to;
                if let Ok(mut m) = self.marks.lock() {
                    m.insert((business, what), (from, Instant::now()));
                }
            }
            if n > 0 {
                tokio::time::sleep(pause).await;
            }
        }
        Ok(())
    }

    /// Deletes the dead letters of each business in `before` (unix ms) written before it.
    async fn sweep_dead_letters(&self, before: &HashMap<Uuid, i64>) -> Result<u64, StatusError> {
        let mut removed = 0;
        for shard in self.streams.all_shards() {
            let old = |f: &std::collections::BTreeMap<String, String>| {
                f.get("business_id")
                    .and_then(|b| canonical_business(b))
                    .and_then(|b| before.get(&b))
                    .is_some()
            };
            let found = scan_entries(&self.conn, &shard.dead_letter, "-", usize::MAX, old).await?;
            let due: Vec<&str> = found
                .iter()
                .filter(|(id, f)| {
                    let at = entry_time_ms(id).and_then(|ms| i64::try_from(ms).ok());
                    let cutoff = f
                        .get("business_id")
                        .and_then(|b| canonical_business(b))
                        .and_then(|b| before.get(&b));
                    matches!((at, cutoff), (Some(at), Some(c)) if at < *c)
                })
                .map(|(id, _)| id.as_str())
                .collect();
            for chunk in due.chunks(500) {
                let n: u64 = redis::cmd("XDEL")
                    .arg(&shard.dead_letter)
                    .arg(chunk)
                    .query_async(&mut self.conn.clone())
                    .await?;
                removed += n;
            }
        }
        Ok(removed)
    }
}

/// `now` less `days`, in unix ms.
fn before_ms(now: chrono::DateTime<chrono::Utc>, days: u32) -> i64 {
    now.timestamp_millis() - i64::from(days) * DAY_MS
}
