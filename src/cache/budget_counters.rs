//! Per-business budget counters in Redis, shared by every worker: messages per calendar minute
//! and LLM tokens per calendar day (UTC), each a counter key that expires after its window.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use redis::AsyncCommands as _;

use super::Cache;
use crate::error::CacheError;

/// A minute's counter outlives its minute a little (a slow worker's late count lands in it).
const MINUTE_TTL_SECS: i64 = 120;
/// A day's counter lives two days.
const DAY_TTL_SECS: i64 = 2 * 86_400;

/// What the counters said when messages were counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Messages of the business this minute, the ones just counted included.
    pub messages_this_minute: u64,
    /// LLM tokens of the business today.
    pub tokens_today: u64,
}

impl Cache {
    fn budget_key(&self, business_id: Uuid, window: &str) -> String {
        format!("{}budget:{business_id}:{window}", self.prefix)
    }

    /// Counts `messages` against the business's current minute (0: only reads it) and reads
    /// its tokens of the day: one round trip, the count and its expiry in one transaction.
    ///
    /// # Errors
    /// Redis failures.
    pub async fn count_messages(
        &self,
        business_id: Uuid,
        messages: u64,
        now: DateTime<Utc>,
    ) -> Result<Usage, CacheError> {
        let minute = self.budget_key(business_id, &now.format("m:%Y%m%d%H%M").to_string());
        let day = self.budget_key(business_id, &now.format("t:%Y%m%d").to_string());
        let mut pipe = redis::pipe();
        pipe.atomic()
            .incr(&minute, messages)
            .expire(&minute, MINUTE_TTL_SECS)
            .ignore();
        let (messages_this_minute, tokens_today): (u64, Option<u64>) = if self.conn.is_cluster() {
            // The two keys are in different slots: the day's count is read on its own.
            let (count,): (u64,) = pipe.query_async(&mut self.conn.clone()).await?;
            (count, self.conn.clone().get(&day).await?)
        } else {
            pipe.get(&day).query_async(&mut self.conn.clone()).await?
        };
        Ok(Usage {
            messages_this_minute,
            tokens_today: tokens_today.unwrap_or(0),
        })
    }

    /// Adds LLM tokens to the business's day.
    ///
    /// # Errors
    /// Redis failures.
    pub async fn add_tokens(
        &self,
        business_id: Uuid,
        tokens: u64,
        now: DateTime<Utc>,
    ) -> Result<(), CacheError> {
        let day = self.budget_key(business_id, &now.format("t:%Y%m%d").to_string());
        let _: (u64,) = redis::pipe()
            .atomic()
            .incr(&day, tokens)
            .expire(&day, DAY_TTL_SECS)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
