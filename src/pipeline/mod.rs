//! The message pipeline: `MessageHandler::process` runs the seed's steps for one decoded inbound
//! message, in this order (each step is its own module):
//!
//! 1. validation: the worker decodes the entry with [`crate::protocol::inbound`] (protocol fields
//!    and limits) and hands over an [`InboundMessage`]; the pipeline never sees a stream;
//! 2. idempotency: a message whose key is already committed returns its stored reply;
//! 3. [`conversation`]: verify the given conversation or continue/start the user's;
//! 4. [`stage`]: the current stage and its template ids (StageService);
//! 5. [`context`]: the template variables (TemplateVariableProvider);
//! 6. [`select`]: optional stage selection by the LLM;
//! 7. template refresh after a stage change;
//! 8. [`extract`]: optional data extraction by the LLM, checked against its JSON Schema;
//! 9. [`respond`]: the response by the LLM, or the fallback template;
//! 10. [`persist`]: one transaction for every write (steps 10–12), then the cache; on failure
//!     the conversation's cache keys are dropped (step 14).
//!
//! No database connection is held while the LLM runs: the read phase uses short autocommit
//! queries and the write phase opens its transaction after the last LLM call. A version conflict
//! (another message of the conversation committed meanwhile) re-runs the message from step 3.

pub mod context;
pub mod conversation;
pub mod extract;
pub mod failpoint;
pub mod llm_call;
pub mod persist;
pub mod respond;
pub mod select;
pub mod stage;
pub mod template;

use std::time::Instant;

use chrono::Utc;
use uuid::Uuid;

use crate::cache::Cache;
use crate::config::Config;
use crate::error::{PipelineError, StoreError};
use crate::llm::LlmService;
use crate::model::{Answer, Business, Extracted};
use crate::protocol::InboundMessage;
use crate::retry::RetryPolicy;
use crate::store::Store;
use crate::store::write_set::WriteSet;
use crate::telemetry::metrics;

pub use failpoint::Failpoints;
use llm_call::LlmCaller;
use stage::StageService;
use template::TemplateService;

/// What processing produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Processed {
    /// A new answer, committed with the message.
    Answered(Answer),
    /// The message was committed earlier (a redelivery or a repeated `message_id` of the same
    /// user): its stored answer, to publish again.
    Duplicate(Answer),
}

/// Runs the pipeline for one message at a time (share it between tasks with `Arc`).
pub struct MessageHandler<L> {
    store: Store,
    cache: Cache,
    llm: L,
    stages: StageService,
    templates: TemplateService,
    retry: RetryPolicy,
    config: Config,
    failpoints: Failpoints,
}

impl<L> std::fmt::Debug for MessageHandler<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageHandler").finish_non_exhaustive()
    }
}

impl<L: LlmService> MessageHandler<L> {
    pub fn new(config: Config, store: Store, cache: Cache, llm: L, failpoints: Failpoints) -> Self {
        MessageHandler {
            stages: StageService::new(store.clone(), cache.clone()),
            templates: TemplateService::new(store.clone(), cache.clone()),
            retry: RetryPolicy::new(config.retry.clone()),
            store,
            cache,
            llm,
            config,
            failpoints,
        }
    }

    pub fn failpoints(&self) -> &Failpoints {
        &self.failpoints
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Processes one decoded inbound message.
    ///
    /// # Errors
    /// Validation errors (answer with an error reply), and processing errors that survived
    /// their retries (the caller decides between redelivery and the dead-letter stream).
    pub async fn process(
        &self,
        msg: &InboundMessage,
        log_id: Uuid,
    ) -> Result<Processed, PipelineError> {
        if self.failpoints.is_on(failpoint::PANIC) {
            panic!("failpoint {}", failpoint::PANIC);
        }
        let span = tracing::Span::current();
        span.record("business.id", tracing::field::display(msg.business_id));
        span.record("message.id", msg.idempotency_key());

        if let Some(answer) = self.stored_answer(msg).await? {
            return Ok(Processed::Duplicate(answer));
        }
        let business = self.stages.business(msg.business_id).await?;

        let max = self.config.worker.max_conflict_retries;
        let mut attempt = 0;
        loop {
            match self.run(msg, &business, log_id, attempt > 0).await {
                Err(PipelineError::Store(StoreError::VersionConflict)) if attempt < max => {
                    attempt += 1;
                    metrics::retry("pipeline.version_conflict");
                    tracing::debug!(attempt, "conversation changed meanwhile; re-running");
                }
                Err(PipelineError::Store(StoreError::Duplicate)) => {
                    // A concurrent delivery of the same message committed first.
                    return match self.stored_answer(msg).await? {
                        Some(answer) => Ok(Processed::Duplicate(answer)),
                        None => Err(StoreError::Duplicate.into()),
                    };
                }
                other => return other.map(Processed::Answered),
            }
        }
    }

    async fn stored_answer(&self, msg: &InboundMessage) -> Result<Option<Answer>, PipelineError> {
        let key = msg.idempotency_key();
        Ok(self
            .retry
            .run("db.find_reply", || {
                self.store.find_reply(msg.business_id, &msg.user_id, key)
            })
            .await?)
    }

    /// Steps 3–12 once. `fresh` reads conversation state from PostgreSQL, not the cache.
    async fn run(
        &self,
        msg: &InboundMessage,
        business: &Business,
        log_id: Uuid,
        fresh: bool,
    ) -> Result<Answer, PipelineError> {
        // Read phase.
        let t = Instant::now();
        let resolved = conversation::resolve(
            &self.store,
            &self.cache,
            business.id,
            business.initial_stage_id,
            &msg.user_id,
            msg.conversation_id,
            fresh,
        )
        .await?;
        let conv = &resolved.conversation;
        tracing::Span::current().record("conversation.id", tracing::field::display(conv.id));
        let stage = self.stages.current(business, Some(conv.stage_id))?;
        let stage_templates = self.stages.templates(business.id, stage.id).await?;
        let history = if resolved.is_new {
            Vec::new()
        } else {
            self.store
                .history(business.id, conv.id, self.config.worker.history_turns)
                .await?
        };
        let extracted = conversation::extracted(&self.store, &self.cache, &resolved, fresh).await?;
        let mut ctx = context::build(context::ContextInputs {
            business,
            user_id: &msg.user_id,
            conversation_id: conv.id,
            is_new: resolved.is_new,
            stage,
            content: &msg.content,
            metadata: msg.metadata.as_ref(),
            history,
            extracted: &extracted,
            now: Utc::now(),
        });
        metrics::step("read", t.elapsed());

        // LLM phase: no database connection is held from here to the write phase.
        let caller = LlmCaller {
            llm: &self.llm,
            retry: &self.retry,
            default_model: &self.config.llm.default_model,
        };
        let mut calls = Vec::new();
        let mut current = stage;
        let mut templates = stage_templates;
        let mut transition = None;
        if let Some(id) = stage_templates.selection {
            let t = Instant::now();
            let selection = self.templates.get(business.id, id).await?;
            let chosen = select::select(
                &caller,
                &self.templates,
                &selection,
                &ctx,
                business,
                stage,
                &mut calls,
            )
            .await?;
            if let Some(next) = chosen {
                transition = Some((stage.id, next.id));
                current = next;
                // Step 7: the new stage's templates.
                templates = self.stages.templates(business.id, next.id).await?;
                ctx.set_stage(next);
            }
            metrics::step("select", t.elapsed());
        }
        let mut learned = Extracted::new();
        if let Some(id) = templates.extraction {
            let t = Instant::now();
            let extraction = self.templates.get(business.id, id).await?;
            learned =
                extract::extract(&caller, &self.templates, &extraction, &ctx, &mut calls).await?;
            ctx.merge_extracted(&learned);
            metrics::step("extract", t.elapsed());
        }
        let t = Instant::now();
        let response_template = self.templates.get(business.id, templates.response).await?;
        let fallback_template = match templates.fallback {
            Some(id) => Some(self.templates.get(business.id, id).await?),
            None => None,
        };
        let response = respond::respond(
            &caller,
            &self.templates,
            &response_template,
            fallback_template.as_deref(),
            &self.config.worker.last_resort_reply,
            &ctx,
            &mut calls,
        )
        .await?;
        metrics::step("respond", t.elapsed());

        // Write phase.
        let t = Instant::now();
        let ws = WriteSet {
            business_id: business.id,
            log_id,
            user_external_id: msg.user_id.clone(),
            conversation_id: conv.id,
            expected_version: (!resolved.is_new).then_some(conv.version),
            stage_id: current.id,
            transition,
            extracted: learned.clone(),
            idempotency_key: msg.idempotency_key().to_owned(),
            inbound_id: msg.inbound_id.clone(),
            user_message_id: Uuid::now_v7(),
            user_content: msg.content.clone(),
            metadata: msg.metadata.clone().map(serde_json::Value::Object),
            user_stage_id: stage.id,
            assistant_message_id: Uuid::now_v7(),
            assistant_content: response.content.clone(),
            assistant_status: if response.fallback { "fallback" } else { "ok" },
            llm_calls: calls,
        };
        let version = self
            .retry
            .run("db.write_set", || {
                persist::commit(&self.store, &self.cache, &ws, &self.failpoints)
            })
            .await?;
        metrics::step("persist", t.elapsed());
        if transition.is_some() {
            metrics::stage_transition();
        }

        let mut committed = conv.clone();
        committed.version = version;
        committed.stage_id = current.id;
        committed.updated_at = Utc::now();
        let mut all = extracted;
        all.extend(learned);
        persist::cache_committed(&self.cache, &committed, &all).await;

        Ok(Answer {
            reply_id: ws.assistant_message_id,
            conversation_id: conv.id,
            fallback: response.fallback,
            content: response.content,
            stage: current.name.clone(),
            log_id,
        })
    }
}
