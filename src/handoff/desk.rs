//! The desk: agents' answers and handoff timeouts, handled by one process of the fleet at a
//! time.
//!
//! Every worker process runs a desk; the one holding the lease (`<prefix>handoff:desk`, a key
//! set with `NX PX handoff.lease_ms` and renewed every `handoff.poll_ms`) reads the
//! agent-replies stream in its consumer group and handles its entries one at a time, in stream
//! order, so that a conversation's answers reach the user in the order the agents sent them.
//! A desk that takes the lease over first takes the previous holder's unacknowledged entries
//! (`XAUTOCLAIM`) and handles them before new ones. An entry is acknowledged once its answer
//! is stored and published; one handled twice (a desk that lost its lease mid-entry) is found
//! stored by its key and published again under the same `reply_id`, which adds nothing.

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::{AgentEntryError, ToUser, agent_error, decode, to_user};
use crate::cache::Cache;
use crate::config::{HandoffConfig, StreamsConfig};
use crate::error::PipelineError;
use crate::protocol::reply::ReplyStatus;
use crate::store::Store;
use crate::store::handoffs::{AgentAnswer, AgentStored, BackTo};
use crate::telemetry::metrics;

/// Renews the lease when it is this desk's; takes it when free. `KEYS[1]` the lease, `ARGV` =
/// this desk's name, the lease in ms. Returns 1 when this desk holds it.
const HOLD: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Releases the lease when it is this desk's.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// The most entries handled per read.
const BATCH: usize = 64;

/// Handles agents' answers and handoff timeouts.
#[derive(Clone)]
pub struct Desk {
    store: Store,
    cache: Cache,
    streams: StreamsConfig,
    config: HandoffConfig,
    /// This desk's name in the lease and the consumer group.
    name: String,
    lease: String,
    /// The longest agent text (characters; `limits.max_content_bytes`).
    max_text: usize,
    /// Renders the timeout replies.
    engine: std::sync::Arc<upon::Engine<'static>>,
}

impl std::fmt::Debug for Desk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desk")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Desk {
    /// A desk named `name` (the process's consumer name).
    pub fn new(store: Store, cache: Cache, config: &crate::config::Config, name: String) -> Desk {
        Desk {
            store,
            cache,
            streams: config.streams.clone(),
            lease: format!("{}handoff:desk", config.redis.key_prefix),
            config: config.handoff.clone(),
            name,
            max_text: config.limits.max_content_bytes,
            engine: std::sync::Arc::new(crate::template::engine()),
        }
    }

    /// Runs until `stop`: every `poll_ms`, when it holds the lease, handles the agents'
    /// entries and the handoffs that timed out. Releases the lease when it stops.
    pub async fn run(self, stop: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_ms.max(10));
        let mut group_ready = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(poll) => {}
            }
            match self.hold().await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    metrics::record_error(&e, "handoff");
                    continue;
                }
            }
            if !group_ready {
                match self.ensure_group().await {
                    Ok(()) => group_ready = true,
                    Err(e) => {
                        metrics::record_error(&e, "handoff");
                        continue;
                    }
                }
            }
            if let Err(e) = self.answers().await {
                metrics::record_error(&e, "handoff");
            }
            if let Err(e) = self.timeouts().await {
                metrics::record_error(&e, "handoff");
            }
        }
        let released: Result<Value, _> = redis::Script::new(RELEASE)
            .key(&self.lease)
            .arg(&self.name)
            .invoke_async(&mut self.cache.connection())
            .await;
        if let Err(e) = released {
            tracing::debug!(error = %e, "the desk's lease was not released; it expires");
        }
    }

    async fn hold(&self) -> Result<bool, crate::error::CacheError> {
        let held: i64 = redis::Script::new(HOLD)
            .key(&self.lease)
            .arg(&self.name)
            .arg(self.config.lease_ms)
            .invoke_async(&mut self.cache.connection())
            .await?;
        Ok(held == 1)
    }

    async fn ensure_group(&self) -> Result<(), crate::error::CacheError> {
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.config.agent_replies)
            .arg(&self.config.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.cache.connection())
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The entries left by earlier holders (taken over), then this desk's own unacknowledged
    /// ones, then new ones; each in stream order, stopping at the first that cannot be handled
    /// now (it is handled first next time).
    async fn answers(&self) -> Result<(), PipelineError> {
        let mut conn = self.cache.connection();
        let mut cursor = "0-0".to_owned();
        loop {
            let taken: Value = redis::cmd("XAUTOCLAIM")
                .arg(&self.config.agent_replies)
                .arg(&self.config.group)
                .arg(&self.name)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(BATCH)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await
                .map_err(crate::error::CacheError::from)?;
            cursor = match &taken {
                Value::Array(parts) => match parts.first() {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    Some(Value::SimpleString(s)) => s.clone(),
                    _ => "0-0".to_owned(),
                },
                _ => "0-0".to_owned(),
            };
            if cursor == "0-0" {
                break;
            }
        }
        // Every pending entry (this desk's now) before any new one.
        for from in ["0", ">"] {
            loop {
                let read: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&self.config.group)
                    .arg(&self.name)
                    .arg("COUNT")
                    .arg(BATCH)
                    .arg("STREAMS")
                    .arg(&self.config.agent_replies)
                    .arg(from)
                    .query_async(&mut conn)
                    .await
                    .map_err(crate::error::CacheError::from)?;
                let entries: Vec<_> = read
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .collect();
                if entries.is_empty() {
                    break;
                }
                for entry in entries {
                    // Still this desk's: another takes over only once the lease is lost.
                    if !self.hold().await? {
                        return Ok(());
                    }
                    let fields = crate::producer::fields_to_strings(entry.map);
                    match self.answer(&entry.id, &fields).await {
                        Ok(()) => {}
                        // An answer that can never be stored or delivered is refused, so that
                        // it does not hold up every answer behind it.
                        Err(e) if permanent(&e) => {
                            let refused = AgentEntryError::Refused(e.to_string());
                            metrics::handoff(refused.code());
                            tracing::warn!(entry.id = %entry.id, error = %e, "an agent's entry was refused");
                            agent_error(&conn, &self.config, &entry.id, &fields, &refused).await?;
                        }
                        Err(e) => return Err(e),
                    }
                    let _: i64 = redis::cmd("XACK")
                        .arg(&self.config.agent_replies)
                        .arg(&self.config.group)
                        .arg(&entry.id)
                        .query_async(&mut conn)
                        .await
                        .map_err(crate::error::CacheError::from)?;
                }
                if from == ">" {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One agent's entry: stored and published, or an error entry on the agents' stream.
    async fn answer(
        &self,
        entry_id: &str,
        fields: &HashMap<String, String>,
    ) -> Result<(), PipelineError> {
        let conn = self.cache.connection();
        let refused = |e: AgentEntryError| async move {
            metrics::handoff(e.code());
            tracing::info!(entry.id = %entry_id, error.code = e.code(), "an agent's entry was refused");
            agent_error(&conn, &self.config, entry_id, fields, &e).await
        };
        let e = match decode(fields, self.max_text) {
            Ok(e) => e,
            Err(err) => {
                refused(err).await?;
                return Ok(());
            }
        };
        let Some(business) = self.store.load_business(e.business_id).await? else {
            refused(AgentEntryError::UnknownConversation).await?;
            return Ok(());
        };
        let back_to = BackTo::of(&business);
        let stored = self
            .store
            .agent_answer(&AgentAnswer {
                business_id: e.business_id,
                conversation_id: e.conversation_id,
                agent_id: &e.agent_id,
                key: &e.message_id,
                text: &e.text,
                end: e.end,
                back_to: &back_to,
            })
            .await?;
        let (row, to, duplicate) = match stored {
            AgentStored::UnknownConversation => {
                refused(AgentEntryError::UnknownConversation).await?;
                return Ok(());
            }
            AgentStored::NotActive => {
                refused(AgentEntryError::NotActive).await?;
                return Ok(());
            }
            AgentStored::KeyReused => {
                refused(AgentEntryError::KeyReused).await?;
                return Ok(());
            }
            AgentStored::Stored { row, to, duplicate } => (row, to, duplicate),
        };
        if let Err(c) = self
            .cache
            .invalidate_conversation(e.business_id, &to.user_id)
            .await
        {
            metrics::record_error(&c, "cache invalidation");
        }
        if !duplicate {
            metrics::handoff(if e.end {
                "ended_by_agent"
            } else {
                "agent_answer"
            });
        }
        if let Some(row) = row {
            to_user(
                &self.cache.connection(),
                &self.streams,
                &ToUser {
                    business_id: e.business_id,
                    conversation_id: e.conversation_id,
                    to: &to,
                    reply_id: row,
                    message_id: &e.message_id,
                    status: ReplyStatus::Agent,
                    content: &e.text,
                    agent_id: &e.agent_id,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// The handoffs past their business's `timeout_ms` that no agent answered get the
    /// timeout reply, once; a stored one not published yet (its desk stopped first) is
    /// published. One that fails is left for the next sweep, after the others.
    async fn timeouts(&self) -> Result<(), PipelineError> {
        let now = chrono::Utc::now().timestamp_millis();
        let due = self.store.unanswered_handoffs(BATCH as i32, now).await?;
        for (business_id, conversation) in due {
            if let Err(e) = self.time_out(business_id, conversation, now).await {
                metrics::record_error(&e, "handoff");
            }
        }
        Ok(())
    }

    /// One handoff's timeout reply, stored (unless it is) and published.
    async fn time_out(
        &self,
        business_id: uuid::Uuid,
        conversation: uuid::Uuid,
        now: i64,
    ) -> Result<(), PipelineError> {
        let Some(business) = self.store.load_business(business_id).await? else {
            return Ok(());
        };
        let policy = &business.policy.handoff;
        let Some((state, to, stored)) = self.store.handoff_of(business_id, conversation).await?
        else {
            return Ok(());
        };
        // The agents were not told it started (the process that started it could not).
        if state.told.is_none() && state.since_ms < now - 2_000 {
            let sent = super::tell_started(
                &self.store,
                &self.cache.connection(),
                &self.config,
                &super::ToAgents {
                    kind: "started",
                    business_id,
                    conversation_id: conversation,
                    user_id: &to.user_id,
                    message_id: "",
                    content: "",
                    reply_id: uuid::Uuid::now_v7(),
                    by: &state.by,
                    since_ms: state.since_ms,
                },
            )
            .await?;
            if sent == crate::stream::once::Published::Now {
                metrics::handoff("started_swept");
            }
        }
        let (reply_id, text) = match (state.timeout_reply_id, stored) {
            (Some(id), Some(text)) => (id, text),
            _ => {
                let ctx = super::TimeoutContext::new(&business, &to.user_id, conversation, &state);
                let text = super::render(&self.engine, &policy.timeout_reply, &ctx)
                    .unwrap_or_else(|e| {
                        metrics::handoff("reply_failed");
                        tracing::error!(error = %e, "a timeout reply did not render; it is sent as written");
                        policy.timeout_reply.clone()
                    });
                let Some((id, _)) = self
                    .store
                    .time_out_handoff(business_id, conversation, now, &text)
                    .await?
                else {
                    return Ok(());
                };
                metrics::handoff("timeout");
                tracing::warn!(business.id = %business_id, conversation.id = %conversation, "a handoff nobody answered timed out");
                if let Err(c) = self
                    .cache
                    .invalidate_conversation(business_id, &to.user_id)
                    .await
                {
                    metrics::record_error(&c, "cache invalidation");
                }
                (id, text)
            }
        };
        to_user(
            &self.cache.connection(),
            &self.streams,
            &ToUser {
                business_id,
                conversation_id: conversation,
                to: &to,
                reply_id,
                message_id: "",
                status: ReplyStatus::Handoff,
                content: &text,
                agent_id: "",
            },
        )
        .await?;
        self.store
            .timeout_published(business_id, conversation)
            .await?;
        Ok(())
    }
}

/// An error no retry can mend: data PostgreSQL refuses (SQLSTATE classes 22 and 23), a reply
/// stream's key of another type.
fn permanent(e: &PipelineError) -> bool {
    match e {
        PipelineError::Store(crate::error::StoreError::Db(db)) => db
            .code()
            .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
        PipelineError::Cache(crate::error::CacheError::Decode(_)) => true,
        _ => false,
    }
}
