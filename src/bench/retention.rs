//! `icmp bench --retention-backlog N`: the retention sweep's cost to the pipeline. Before the
//! measured run, N conversations of 10 messages (with their LLM calls) are stored 60 days old
//! for the benchmark's business, which then keeps messages 30 days and prompts 7; the sweep runs
//! back to back (as a worker's would when it finds that much to do) for the whole measured run.

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::BenchError;
use crate::config::Config;
use crate::personal_data::retention::{Sweeper, Swept};
use crate::store::{Store, StoreError};

/// Messages per seeded conversation.
const MESSAGES_PER_CONVERSATION: i64 = 10;

/// Stores `conversations` old conversations of `business` and gives it a retention policy
/// that makes all of them due.
///
/// # Errors
/// Database errors.
pub async fn seed(store: &Store, business: Uuid, conversations: usize) -> Result<(), BenchError> {
    let client = store.client().await?;
    // The run's own users (the database keeps what earlier runs left).
    let tag = format!("retention-{}-", Uuid::new_v4().simple());
    let like = format!("{tag}%");
    let n = i64::try_from(conversations).unwrap_or(i64::MAX);
    client
        .execute(
            "INSERT INTO users (business_id, external_id, last_seen_at) \
             SELECT $1, $3 || g, now() - interval '60 days' \
               FROM generate_series(1::bigint, $2::bigint) g",
            &[&business, &n, &tag],
        )
        .await
        .map_err(StoreError::from)?;
    client
        .execute(
            "INSERT INTO conversations (id, business_id, user_id, current_stage_id, created_at, \
                                        updated_at, last_seq) \
             SELECT gen_random_uuid(), u.business_id, u.id, \
                    (SELECT id FROM stages WHERE business_id = $1 AND is_initial), \
                    now() - interval '60 days', now() - interval '60 days', $2::bigint \
               FROM users u WHERE u.business_id = $1 AND u.external_id LIKE $3",
            &[&business, &MESSAGES_PER_CONVERSATION, &like],
        )
        .await
        .map_err(StoreError::from)?;
    client
        .execute(
            "INSERT INTO messages (id, business_id, conversation_id, seq, role, content, \
                                   idempotency_key, log_id, user_id, created_at) \
             SELECT gen_random_uuid(), c.business_id, c.id, s, \
                    CASE WHEN s % 2 = 1 THEN 'user' ELSE 'assistant' END, repeat('x', 200), \
                    'retention-' || c.id || '-' || ((s + 1) / 2), gen_random_uuid(), c.user_id, \
                    now() - interval '60 days' \
               FROM conversations c JOIN users u ON u.business_id = c.business_id AND u.id = c.user_id, \
                    generate_series(1::bigint, $2::bigint) s \
              WHERE c.business_id = $1 AND u.external_id LIKE $3",
            &[&business, &MESSAGES_PER_CONVERSATION, &like],
        )
        .await
        .map_err(StoreError::from)?;
    client
        .execute(
            "INSERT INTO llm_calls (id, business_id, conversation_id, message_id, purpose, model, \
                                    prompt, output, latency_ms, outcome, log_id, created_at) \
             SELECT gen_random_uuid(), m.business_id, m.conversation_id, m.id, 'response', 'm', \
                    repeat('p', 1000), repeat('o', 200), 1, 'ok', m.log_id, m.created_at \
               FROM messages m WHERE m.business_id = $1 AND m.role = 'user' \
                AND m.idempotency_key LIKE 'retention-%' \
                AND m.created_at < now() - interval '59 days'",
            &[&business],
        )
        .await
        .map_err(StoreError::from)?;
    client
        .execute(
            "UPDATE businesses SET policy = policy || \
               '{\"retention\": {\"messages_days\": 30, \"llm_prompts_days\": 7}}'::jsonb \
             WHERE id = $1",
            &[&business],
        )
        .await
        .map_err(StoreError::from)?;
    client
        .batch_execute("ANALYZE")
        .await
        .map_err(StoreError::from)?;
    Ok(())
}

/// The sweep, run back to back until stopped.
pub struct SweepLoop {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Swept>,
}

impl SweepLoop {
    /// With `--retention-backlog`: seeds it and starts sweeping; else nothing.
    ///
    /// # Errors
    /// Database errors, an invalid database or Redis configuration.
    pub async fn start_with(
        config: &Config,
        options: &super::BenchOptions,
        store: &Store,
        business: Uuid,
    ) -> Result<Option<SweepLoop>, BenchError> {
        if options.retention_backlog == 0 {
            return Ok(None);
        }
        seed(store, business, options.retention_backlog).await?;
        Ok(Some(SweepLoop::start(config).await?))
    }

    /// Stops `sweep`, if there is one; returns what it removed.
    pub async fn stop_any(sweep: Option<SweepLoop>) -> Option<Swept> {
        match sweep {
            Some(s) => Some(s.stop().await),
            None => None,
        }
    }

    /// Starts sweeping as a worker does (the worker role, `config.retention`'s batches).
    ///
    /// # Errors
    /// An invalid database or Redis configuration.
    pub async fn start(config: &Config) -> Result<SweepLoop, BenchError> {
        let sweeper = Sweeper::new(
            Store::connect_worker(&config.database)?,
            crate::redis_connection::connect(&config.redis).await?,
            config.streams.clone(),
            config.redis.key_prefix.clone(),
            config.retention.clone(),
        );
        let stop = CancellationToken::new();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut total = Swept::default();
            while !flag.is_cancelled() {
                match sweeper.sweep(chrono::Utc::now(), &flag).await {
                    Ok(s) if s == Swept::default() => {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Ok(s) => {
                        total.messages += s.messages;
                        total.llm_prompts += s.llm_prompts;
                        total.conversations += s.conversations;
                        total.users += s.users;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the retention sweep failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
            total
        });
        Ok(SweepLoop { stop, task })
    }

    /// Stops it after its current batch; returns what it removed.
    pub async fn stop(self) -> Swept {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}
