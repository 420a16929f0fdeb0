//! The Redis cache (the seed's keys): `business:{id}`, `stage:{id}` (hash of template ids),
//! `tmpl:{id}` (template source), and `conv:{business}:{user}`, the user's current
//! conversation state (the conversation, its extracted data and history window in one value, so
//! reading it is one `GET` and writing it one `SET`). PostgreSQL is the source of truth; every
//! key has a TTL, conversation state is written only after COMMIT and deleted on rollback,
//! definition keys are deleted when definitions change.
//!
//! All keys carry `redis.key_prefix`, so several deployments or tests can share one server.

pub mod budget_counters;

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::config::{CacheConfig, RedisConfig};
use crate::definitions::local::{Generation, LocalDefinitions};
pub use crate::error::CacheError;
use crate::model::{Business, ConversationState, StageTemplates, TemplateRecord};
use crate::redis_connection::RedisConnection;
use crate::telemetry::metrics;

/// One prepared `SET key value EX ttl_secs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheWrite {
    pub key: String,
    pub value: Vec<u8>,
    pub ttl_secs: u64,
}

impl CacheWrite {
    /// Adds the write to a pipeline (its reply ignored).
    pub fn add_to(&self, pipe: &mut redis::Pipeline) {
        pipe.set_ex(&self.key, self.value.as_slice(), self.ttl_secs)
            .ignore();
    }
}

/// Counts a cache lookup (`hit`, `miss`, `error`) and turns an error into a miss: a failing
/// cache falls through to PostgreSQL.
pub fn observed<T>(cache: &'static str, lookup: Result<Option<T>, CacheError>) -> Option<T> {
    match lookup {
        Ok(Some(v)) => {
            metrics::cache(cache, "hit");
            Some(v)
        }
        Ok(None) => {
            metrics::cache(cache, "miss");
            None
        }
        Err(e) => {
            metrics::cache(cache, "error");
            metrics::record_error(&e, cache);
            None
        }
    }
}

/// The key of user `user`'s current conversation state in business `business_id`, under
/// `redis.key_prefix` `prefix`.
pub fn state_key(prefix: &str, business_id: Uuid, user: &str) -> String {
    format!("{prefix}conv:{business_id}:{user}")
}

/// A handle to the cache; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    conn: RedisConnection,
    prefix: String,
    definition_ttl: u64,
    conversation_ttl: u64,
    local: Arc<LocalDefinitions>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// `redis.key_prefix`, which every key of this deployment carries.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis connection (replies and partial replies go over it, in order).
    pub fn connection(&self) -> RedisConnection {
        self.conn.clone()
    }

    pub fn new(conn: RedisConnection, redis: &RedisConfig, config: &CacheConfig) -> Cache {
        Cache {
            conn,
            prefix: redis.key_prefix.clone(),
            definition_ttl: config.definition_ttl_secs.max(1),
            conversation_ttl: config.conversation_ttl_secs.max(1),
            local: Arc::new(LocalDefinitions::new(Duration::from_secs(
                config.definition_ttl_secs.max(1),
            ))),
        }
    }

    /// The in-process tier of the definitions (off until a definitions watch runs).
    pub fn local(&self) -> &LocalDefinitions {
        &self.local
    }

    /// After storing a definition loaded at `at` in Redis: if a change arrived meanwhile, the
    /// stored copy may predate it, so it is dropped again.
    async fn undo_if_overtaken(&self, at: Generation, key: String) -> Result<(), CacheError> {
        if self.local.generation() != at {
            let _: () = self.conn.clone().del(key).await?;
        }
        Ok(())
    }

    /// The full key for `kind:{id}`.
    pub fn key(&self, kind: &str, id: Uuid) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    async fn get_json<T: DeserializeOwned>(&self, key: String) -> Result<Option<T>, CacheError> {
        let raw: Option<Vec<u8>> = self.conn.clone().get(&key).await?;
        match raw {
            None => Ok(None),
            Some(bytes) => match serde_json::from_slice(&bytes) {
                Ok(v) => Ok(Some(v)),
                Err(e) => {
                    // A value we cannot read is dropped, not trusted.
                    let _: Result<(), _> = self.conn.clone().del(&key).await;
                    Err(CacheError::Decode(format!("{key}: {e}")))
                }
            },
        }
    }

    async fn set_json<T: Serialize>(
        &self,
        key: String,
        value: &T,
        ttl: u64,
    ) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec(value).map_err(|e| CacheError::Decode(e.to_string()))?;
        let _: () = self.conn.clone().set_ex(key, bytes, ttl).await?;
        Ok(())
    }

    pub async fn get_business(&self, id: Uuid) -> Result<Option<Business>, CacheError> {
        self.get_json(self.key("business", id)).await
    }

    /// Stores a business loaded from PostgreSQL at generation `at`.
    pub async fn set_business(&self, b: &Business, at: Generation) -> Result<(), CacheError> {
        let key = self.key("business", b.id);
        self.set_json(key.clone(), b, self.definition_ttl).await?;
        self.undo_if_overtaken(at, key).await
    }

    /// The seed's `stage:{id}` hash: `selection_template`, `extraction_template`,
    /// `response_template`, `fallback_template` (empty when the stage has none).
    pub async fn get_stage(&self, stage_id: Uuid) -> Result<Option<StageTemplates>, CacheError> {
        let key = self.key("stage", stage_id);
        let map: std::collections::HashMap<String, String> =
            self.conn.clone().hgetall(&key).await?;
        if map.is_empty() {
            return Ok(None);
        }
        let field = |name: &str| -> Result<Option<Uuid>, CacheError> {
            match map.get(name).map(String::as_str) {
                None | Some("") => Ok(None),
                Some(s) => Uuid::parse_str(s)
                    .map(Some)
                    .map_err(|e| CacheError::Decode(format!("{key}.{name}: {e}"))),
            }
        };
        let response = field("response_template")?
            .ok_or_else(|| CacheError::Decode(format!("{key}: no response_template")))?;
        Ok(Some(StageTemplates {
            selection: field("selection_template")?,
            extraction: field("extraction_template")?,
            response,
            fallback: field("fallback_template")?,
        }))
    }

    /// Stores a stage's template ids loaded from PostgreSQL at generation `at`.
    pub async fn set_stage(
        &self,
        stage_id: Uuid,
        t: &StageTemplates,
        at: Generation,
    ) -> Result<(), CacheError> {
        let key = self.key("stage", stage_id);
        let s = |id: Option<Uuid>| id.map(|i| i.to_string()).unwrap_or_default();
        let fields = [
            ("selection_template", s(t.selection)),
            ("extraction_template", s(t.extraction)),
            ("response_template", t.response.to_string()),
            ("fallback_template", s(t.fallback)),
        ];
        let _: () = redis::pipe()
            .atomic()
            .hset_multiple(&key, &fields)
            .ignore()
            .expire(&key, self.definition_ttl as i64)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        self.undo_if_overtaken(at, key).await
    }

    pub async fn get_template(&self, id: Uuid) -> Result<Option<TemplateRecord>, CacheError> {
        self.get_json(self.key("tmpl", id)).await
    }

    /// Stores a template loaded from PostgreSQL at generation `at`.
    pub async fn set_template(&self, t: &TemplateRecord, at: Generation) -> Result<(), CacheError> {
        let key = self.key("tmpl", t.id);
        self.set_json(key.clone(), t, self.definition_ttl).await?;
        self.undo_if_overtaken(at, key).await
    }

    /// The key of a user's current conversation state.
    pub fn state_key(&self, business_id: Uuid, user: &str) -> String {
        state_key(&self.prefix, business_id, user)
    }

    /// The user's current conversation state, as the last commit left it.
    pub async fn get_state(
        &self,
        business_id: Uuid,
        user: &str,
    ) -> Result<Option<ConversationState>, CacheError> {
        self.get_json(self.state_key(business_id, user)).await
    }

    /// Writes a conversation's committed state (after COMMIT only) as the user's current one:
    /// one `SET … EX`.
    pub async fn set_state(&self, state: &ConversationState) -> Result<(), CacheError> {
        self.apply(&self.state_write(state)?).await
    }

    /// The write of a committed conversation state as the user's current one, to send on its
    /// own ([`Cache::apply`]) or in the same round trip as other commands (the worker sends it
    /// with the message's finish).
    ///
    /// # Errors
    /// When the state cannot be encoded.
    pub fn state_write(&self, state: &ConversationState) -> Result<CacheWrite, CacheError> {
        let c = &state.conversation;
        Ok(CacheWrite {
            key: self.state_key(c.business_id, &c.user_external_id),
            value: serde_json::to_vec(state).map_err(|e| CacheError::Decode(e.to_string()))?,
            ttl_secs: self.conversation_ttl,
        })
    }

    /// Deletes the key of a prepared write.
    pub async fn forget(&self, write: &CacheWrite) -> Result<(), CacheError> {
        let _: () = self.conn.clone().del(&write.key).await?;
        Ok(())
    }

    /// Sends one prepared write.
    pub async fn apply(&self, write: &CacheWrite) -> Result<(), CacheError> {
        let _: () = self
            .conn
            .clone()
            .set_ex(&write.key, write.value.as_slice(), write.ttl_secs)
            .await?;
        Ok(())
    }

    /// Drops a user's conversation state (the seed's step 14, on rollback; also whenever a
    /// commit may have happened without its cache write).
    pub async fn invalidate_conversation(
        &self,
        business_id: Uuid,
        user: &str,
    ) -> Result<(), CacheError> {
        let _: () = self
            .conn
            .clone()
            .del(self.state_key(business_id, user))
            .await?;
        Ok(())
    }

    /// Drops a business's cached definitions, in this process and in Redis (after an import,
    /// or on a change notification).
    pub async fn invalidate_definitions(
        &self,
        business_id: Uuid,
        stage_ids: &[Uuid],
        template_ids: &[Uuid],
    ) -> Result<(), CacheError> {
        self.local.forget_business(business_id);
        let mut keys = vec![self.key("business", business_id)];
        keys.extend(stage_ids.iter().map(|id| self.key("stage", *id)));
        keys.extend(template_ids.iter().map(|id| self.key("tmpl", *id)));
        if !self.conn.is_cluster() {
            let _: () = self.conn.clone().del(keys).await?;
            return Ok(());
        }
        // On a cluster the keys are in different slots: one `DEL` each.
        let deletes = keys.into_iter().map(|key| async move {
            let _: () = self.conn.clone().del(key).await?;
            Ok::<_, CacheError>(())
        });
        futures::future::try_join_all(deletes).await?;
        Ok(())
    }

    /// `PING`, for readiness probes.
    pub async fn ping(&self) -> Result<(), CacheError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
