//! One user's rows: read them all (`icmp user export`) or erase them so that no message in
//! flight brings them back (`icmp user erase`, migration V16). Runs as the owner (operators'
//! connections), every statement filtered by the business, so that on Citus each is a
//! single-shard statement.

use std::collections::BTreeMap;

use uuid::Uuid;

use tokio_postgres::types::ToSql;

use super::{Store, StoreError};

/// The tables that hold a user's conversations' rows, each with the order its rows are read in
/// (every one has `business_id` and `conversation_id`).
const CONVERSATION_TABLES: [(&str, &str); 5] = [
    ("messages", "conversation_id, seq"),
    ("extracted_data", "conversation_id, field"),
    ("stage_transitions", "conversation_id, id"),
    ("llm_calls", "conversation_id, created_at, id"),
    ("action_outbox", "conversation_id, created_at, id"),
];

/// Everything PostgreSQL holds of one user, table by table (`users` and `conversations` too),
/// each row as JSON with its columns as the table names them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct UserRows {
    pub tables: BTreeMap<&'static str, Vec<serde_json::Value>>,
}

impl UserRows {
    /// The ids of the user's conversations.
    pub fn conversation_ids(&self) -> Vec<String> {
        self.tables
            .get("conversations")
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("id")?.as_str().map(str::to_owned))
            .collect()
    }

    /// Rows per table.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.tables
            .iter()
            .map(|(t, rows)| ((*t).to_owned(), rows.len() as u64))
            .collect()
    }
}

/// What an erase removed from PostgreSQL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErasedRows {
    /// The instant of the erase, as an entry id of the user's inbound stream (ms, seq):
    /// messages whose entry id is not later are dropped.
    pub erased: (i64, i64),
    /// The ids of the conversations removed.
    pub conversations: Vec<Uuid>,
    /// Rows removed per table.
    pub counts: BTreeMap<String, u64>,
}

/// Notes an erase (`$1` business, `$2` user key, `$3`/`$4` the instant), keeping the later
/// of two instants. (No function here: Citus allows only immutable ones in an upsert's SET.)
const NOTE_ERASURE: &str = "\
INSERT INTO user_erasures AS e (business_id, user_key, erased_ms, erased_seq) VALUES ($1, $2, $3, $4)
ON CONFLICT (business_id, user_key) DO UPDATE
   SET (erased_ms, erased_seq) =
         (CASE WHEN (EXCLUDED.erased_ms, EXCLUDED.erased_seq) > (e.erased_ms, e.erased_seq)
               THEN EXCLUDED.erased_ms ELSE e.erased_ms END,
          CASE WHEN (EXCLUDED.erased_ms, EXCLUDED.erased_seq) > (e.erased_ms, e.erased_seq)
               THEN EXCLUDED.erased_seq ELSE e.erased_seq END),
       erased_at = EXCLUDED.erased_at";

/// The rows of `sql` (one JSON column).
async fn json_rows(
    client: &deadpool_postgres::Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<serde_json::Value>, StoreError> {
    Ok(client
        .query(sql, params)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

impl Store {
    /// Every row of user `external_id` of `business`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn user_rows(
        &self,
        business: Uuid,
        external_id: &str,
    ) -> Result<UserRows, StoreError> {
        let client = self.client().await?;
        let mut rows = UserRows::default();
        let who: [&(dyn ToSql + Sync); 2] = [&business, &external_id];
        let users =
            "SELECT to_jsonb(u) FROM users u WHERE u.business_id = $1 AND u.external_id = $2";
        rows.tables
            .insert("users", json_rows(&client, users, &who).await?);
        let conversations = "SELECT to_jsonb(c) FROM conversations c JOIN users u \
                               ON u.business_id = c.business_id AND u.id = c.user_id \
                             WHERE c.business_id = $1 AND u.business_id = $1 AND u.external_id = $2 \
                             ORDER BY c.created_at, c.id";
        let found = json_rows(&client, conversations, &who).await?;
        let ids: Vec<Uuid> = found
            .iter()
            .filter_map(|c| c.get("id")?.as_str()?.parse().ok())
            .collect();
        rows.tables.insert("conversations", found);
        for (table, order) in CONVERSATION_TABLES {
            let sql = format!(
                "SELECT to_jsonb(t) FROM {table} t \
                 WHERE t.business_id = $1 AND t.conversation_id = ANY($2) ORDER BY {order}"
            );
            let found = json_rows(&client, &sql, &[&business, &ids]).await?;
            rows.tables.insert(table, found);
        }
        Ok(rows)
    }

    /// Erases user `external_id` of `business`: their rows in every table, in one transaction
    /// that first takes their `users` row (waiting for a worker's transaction that writes it),
    /// then asks `instant` for the instant of the erase (the last entry id of the user's inbound
    /// stream), notes the erase (`user_erasures`, under the user's key), and deletes. A worker's
    /// write set that comes later waits for this transaction at its user statement and then sees
    /// the erase: a message whose entry id is not later than the instant is refused
    /// ([`StoreError::Erased`]); a later one starts a new user. Idempotent: a second erase finds
    /// nothing to delete and moves the instant forward.
    ///
    /// # Errors
    /// Database errors, or `instant`'s (the transaction is then rolled back).
    pub async fn erase_user<E: From<StoreError>>(
        &self,
        business: Uuid,
        external_id: &str,
        instant: impl AsyncFnOnce() -> Result<(i64, i64), E>,
    ) -> Result<ErasedRows, E> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(StoreError::from)?;
        let existed: i64 = tx
            .query_one(
                "SELECT count(*) FROM users WHERE business_id = $1 AND external_id = $2",
                &[&business, &external_id],
            )
            .await
            .map_err(StoreError::from)?
            .get(0);
        // Takes the row, or waits for the transaction that is inserting it.
        let user: Uuid = tx
            .query_one(
                "INSERT INTO users AS u (business_id, external_id) VALUES ($1, $2) \
                 ON CONFLICT (business_id, external_id) DO UPDATE SET last_seen_at = u.last_seen_at \
                 RETURNING u.id",
                &[&business, &external_id],
            )
            .await
            .map_err(StoreError::from)?
            .get(0);
        let erased = instant().await?;
        let key = super::write_set::user_key(external_id);
        tx.execute(NOTE_ERASURE, &[&business, &key, &erased.0, &erased.1])
            .await
            .map_err(StoreError::from)?;
        let conversations: Vec<Uuid> = tx
            .query(
                "SELECT id FROM conversations WHERE business_id = $1 AND user_id = $2 \
                 ORDER BY id FOR UPDATE",
                &[&business, &user],
            )
            .await
            .map_err(StoreError::from)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut counts = BTreeMap::new();
        // Rows that point at messages go before the messages.
        for table in [
            "llm_calls",
            "stage_transitions",
            "extracted_data",
            "action_outbox",
            "messages",
        ] {
            let sql =
                format!("DELETE FROM {table} WHERE business_id = $1 AND conversation_id = ANY($2)");
            let n = tx
                .execute(&sql, &[&business, &conversations])
                .await
                .map_err(StoreError::from)?;
            counts.insert(table.to_owned(), n);
        }
        let n = tx
            .execute(
                "DELETE FROM conversations WHERE business_id = $1 AND user_id = $2",
                &[&business, &user],
            )
            .await
            .map_err(StoreError::from)?;
        counts.insert("conversations".to_owned(), n);
        tx.execute(
            "DELETE FROM users WHERE business_id = $1 AND id = $2",
            &[&business, &user],
        )
        .await
        .map_err(StoreError::from)?;
        counts.insert("users".to_owned(), u64::try_from(existed).unwrap_or(0));
        tx.commit().await.map_err(StoreError::from)?;
        Ok(ErasedRows {
            erased,
            conversations,
            counts,
        })
    }
}
