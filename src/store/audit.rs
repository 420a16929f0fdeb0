//! The operators' audit trail (`audit_log`, migration V16): appended to, read, never changed.

use uuid::Uuid;

use super::{Store, StoreError};

/// One operator action on user data. Counts and names only, never the data.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// Its place in the trail (0 before it is written).
    pub id: i64,
    pub at: chrono::DateTime<chrono::Utc>,
    /// Who: `ICMP_ACTOR`, else the operating-system user; `console:<address>` in the console.
    pub actor: String,
    /// What: `user.export`, `user.erase`, `dlq.replay`, `dlq.purge`, `actions.retry`,
    /// `actions.cancel`, `handoff.take`, `handoff.release`, `handoff.answer`.
    pub action: String,
    pub business_id: Option<Uuid>,
    /// The user concerned, by key ([`super::write_set::user_key`]).
    pub user_key: Option<String>,
    /// What else the action names (a dead letter's entry id, an action request's id, …).
    pub target: Option<String>,
    /// How many items of each kind it read or changed.
    pub counts: serde_json::Value,
    /// `ok`, or the error code it failed with.
    pub outcome: String,
}

/// Which records to read.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub business_id: Option<Uuid>,
    pub user_key: Option<String>,
    pub action: Option<String>,
    /// At most this many, the newest.
    pub limit: i64,
}

impl Store {
    /// Appends `record` (its `id` and `at` are the database's).
    ///
    /// # Errors
    /// Database errors.
    pub async fn audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO audit_log (actor, action, business_id, user_key, target, counts, outcome) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &record.actor,
                    &record.action,
                    &record.business_id,
                    &record.user_key,
                    &record.target,
                    &record.counts,
                    &record.outcome,
                ],
            )
            .await?;
        Ok(())
    }

    /// The newest records that `filter` admits, newest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, at, actor, action, business_id, user_key, target, counts, outcome \
                   FROM audit_log \
                  WHERE ($1::uuid IS NULL OR business_id = $1) \
                    AND ($2::text IS NULL OR user_key = $2) \
                    AND ($3::text IS NULL OR action = $3) \
                  ORDER BY id DESC LIMIT $4",
                &[
                    &filter.business_id,
                    &filter.user_key,
                    &filter.action,
                    &filter.limit.max(1),
                ],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    actor: r.try_get(2)?,
                    action: r.try_get(3)?,
                    business_id: r.try_get(4)?,
                    user_key: r.try_get(5)?,
                    target: r.try_get(6)?,
                    counts: r.try_get(7)?,
                    outcome: r.try_get(8)?,
                })
            })
            .collect()
    }
}
