//! The message pipeline: `MessageHandler::process_turn` runs the seed's steps for one decoded
//! inbound message (with the later messages of a coalesced burst). Three phases, each a type
//! and a module, and this file orders them (read → decide → persist → answer):
//!
//! - step 1, validation: the worker decodes the entry with [`crate::protocol::inbound`] (fields,
//!   limits, canonical ids) and hands over an [`InboundMessage`]; the pipeline never sees a
//!   stream;
//! - step 2, [`idempotency`]: a message whose (business, user, key) is already committed
//!   returns its stored answer. The user's cached state names the keys of their latest
//!   messages, so a continuing user's new message needs no query for it; a repeat the state
//!   does not name is caught by the unique key when its write set commits;
//! - [`coalesce`]: a message and the later messages waiting behind it are one turn;
//! - steps 3–5, the **read phase** ([`read`]): the [`conversation`] (given, the user's latest,
//!   or a new one), its stage and that stage's templates (from [`crate::definitions`]), and the template variables
//!   ([`context`], the TemplateVariableProvider): short autocommit reads, most from Redis;
//! - steps 6–9, the **LLM phase** ([`decide`]): optional stage selection ([`select`]) and the
//!   new stage's templates (step 7), optional data extraction ([`extract`]), the response
//!   ([`respond`]) or the fallback template; no database connection is held;
//! - steps 10–12, the **write phase** ([`persist`]): both messages, the conversation's stage and
//!   version, the transition, extracted data and the LLM call log in one transaction;
//! - step 13, the committed state's cache write is prepared (after COMMIT) and returned with
//!   the answer; step 14, on failure the conversation's cache keys are dropped.
//!
//! The worker then sends the state write, publishes the answer and acknowledges the entry (15)
//! in one round trip (the write pipelined before the fenced finish script). A version
//! conflict (another message of the conversation committed meanwhile) re-runs the message from
//! the read phase.

pub mod budget;
pub mod coalesce;
pub mod context;
pub mod conversation;
pub mod decide;
pub mod extract;
pub mod failpoint;
pub mod handoff;
pub mod idempotency;
pub mod llm_call;
pub mod partials;
pub mod persist;
pub mod read;
pub mod respond;
pub mod select;
pub mod summary;

use std::time::Instant;

use tracing::Instrument;
use uuid::Uuid;

use crate::cache::Cache;
use crate::config::Config;
use crate::definitions::{StageService, TemplateService};
use crate::error::{Classify, PipelineError, StoreError};
use crate::llm::LlmService;
use crate::model::{Answer, Business};
use crate::protocol::InboundMessage;
use crate::retry::RetryPolicy;
use crate::store::Store;
use crate::telemetry::metrics;
use crate::telemetry::traces::phase_span;

use coalesce::Turn;
use conversation::Known;
pub use failpoint::Failpoints;
use llm_call::LlmCaller;

/// What processing produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Processed {
    /// A new answer, committed with the message; with the later messages of its coalesced
    /// turn and their answers (each `coalesced`, referring to it), in order, and the write of
    /// the committed conversation state to the cache (step 13), for the caller to send with
    /// what it publishes (`None`: the state could not be encoded and was dropped from the
    /// cache).
    Answered {
        answer: Answer,
        followers: Vec<(InboundMessage, Answer)>,
        state: Option<crate::cache::CacheWrite>,
        /// The conversation is due for a summary, to be made once the answer is published.
        summary: Option<summary::SummaryDue>,
        /// The turn fired stage actions: the dispatcher is woken once the answer is
        /// published, so that a follow-up comes after it.
        fired_actions: bool,
        /// What the agents get of the turn (a person has the conversation, or it was just
        /// handed over): the worker passes it on before it publishes the answer.
        to_agents: Option<Box<handoff::ToAgents>>,
    },
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
    summarizing: summary::InProgress,
    /// Notified when a message that fired actions is answered (the dispatcher waits on it).
    actions_due: std::sync::Arc<tokio::sync::Notify>,
    /// Group commit of the write sets (`None`: each message commits alone).
    committer: Option<crate::store::group_commit::GroupCommit>,
}

impl<L> std::fmt::Debug for MessageHandler<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageHandler").finish_non_exhaustive()
    }
}

impl<L: LlmService> MessageHandler<L> {
    pub fn new(config: Config, store: Store, cache: Cache, llm: L, failpoints: Failpoints) -> Self {
        let w = &config.worker;
        // A committer task needs a runtime: without one (a handler built outside it), messages
        // commit alone.
        let committer = (w.commit_batch_max > 1 && tokio::runtime::Handle::try_current().is_ok())
            .then(|| {
                crate::store::group_commit::GroupCommit::start(
                    store.clone(),
                    crate::store::group_commit::Settings {
                        max: w.commit_batch_max,
                        wait: std::time::Duration::from_micros(w.commit_batch_wait_us),
                        in_flight: w.commit_batches_in_flight,
                    },
                )
            });
        MessageHandler {
            stages: StageService::new(store.clone(), cache.clone()),
            templates: TemplateService::new(store.clone(), cache.clone())
                .with_history_bound(config.llm.context_tokens, &config.llm.default_model),
            retry: RetryPolicy::new(config.retry.clone()),
            store,
            cache,
            llm,
            config,
            failpoints,
            summarizing: summary::InProgress::default(),
            actions_due: std::sync::Arc::default(),
            committer,
        }
    }

    /// What the actions' dispatcher waits on.
    pub fn actions_wake(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.actions_due.clone()
    }

    pub fn failpoints(&self) -> &Failpoints {
        &self.failpoints
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Processes a message together with the later messages of its user that `gather` finds
    /// for its business (same business, user and conversation, in stream order; asked only
    /// when the message is not answered yet): one turn, every message stored, one reply. When
    /// one of them turns out to be stored already (a repeated `message_id`), or the turn fails,
    /// the message is processed alone and the others get their own turns ([`coalesce`]).
    /// `gather` returns the followers and how many of them start the pipeline for the first
    /// time; with `attempt`, they decide what is counted against the business's budget: every
    /// message exactly once, when it first starts. The caller sends the returned state write
    /// (the worker does so in its finish's round trip).
    ///
    /// # Errors
    /// Validation errors (answer with an error reply), and processing errors that survived
    /// their retries (the caller decides between redelivery and the dead-letter stream).
    pub async fn process_turn(
        &self,
        msg: &InboundMessage,
        outbound: &str,
        log_id: Uuid,
        attempt: Attempt,
        gather: impl AsyncFnOnce(&Business) -> (Vec<InboundMessage>, u64),
    ) -> Result<Processed, PipelineError> {
        if self.failpoints.is_on(failpoint::PANIC) {
            panic!("failpoint {}", failpoint::PANIC);
        }

        // Step 2, idempotency.
        let state = conversation::cached_state(&self.cache, msg.business_id, &msg.user_id).await;
        let looked_up = idempotency::must_look_up(msg, attempt, state.as_deref());
        let mut known = state.map_or(Known::Unknown, Known::Cached);
        if looked_up {
            if idempotency::latest_first(msg, attempt, &known) {
                // A user without a conversation has no message stored: for a new user the
                // conversation's query answers the idempotency question too.
                let latest = self
                    .retry
                    .run("db.latest_conversation", || {
                        self.store
                            .latest_conversation(msg.business_id, &msg.user_id)
                    })
                    .await?;
                if latest.is_some()
                    && let Some(done) = self.ledger().answered(msg, true).await?
                {
                    return Ok(done);
                }
                known = Known::Stored(latest.map(Box::new));
            } else if let Some(done) = self
                .ledger()
                .answered(msg, known.cached().is_none())
                .await?
            {
                return Ok(done);
            }
        }
        let business = self.stages.business(msg.business_id).await?;
        let (followers, new_followers) = gather(&business).await;
        let counted = u64::from(attempt.number == 1) + new_followers;
        let throttled = budget::admit(&self.cache, &business, counted).await;
        let turn = Turn {
            msg,
            followers: &followers,
            throttled: throttled.is_some(),
            outbound,
        };
        self.run_until_settled(turn, &business, log_id, known, looked_up)
            .await
    }

    /// Runs the turn ([`MessageHandler::run`]) until it is answered or fails for good: a
    /// version conflict (another message of the conversation committed meanwhile) re-runs it
    /// from the read phase, a coalesced turn that cannot be taken together is answered alone,
    /// and a message not looked up before (`looked_up` false) that fails gets its stored
    /// answer if it has one.
    async fn run_until_settled(
        &self,
        mut turn: Turn<'_>,
        business: &Business,
        log_id: Uuid,
        mut known: Known,
        looked_up: bool,
    ) -> Result<Processed, PipelineError> {
        let msg = turn.msg;
        let max = self.config.worker.max_conflict_retries;
        let mut conflicts = 0;
        loop {
            // A re-run reads the conversation from PostgreSQL, not the cache.
            match self
                .run(&turn, business, log_id, std::mem::take(&mut known))
                .await
            {
                Err(PipelineError::Store(StoreError::VersionConflict)) if conflicts < max => {
                    conflicts += 1;
                    metrics::retry("pipeline.version_conflict");
                    tracing::debug!(conflicts, "conversation changed meanwhile; re-running");
                    // The state that was read may predate this very message's commit.
                    if !looked_up
                        && conflicts == 1
                        && let Some(done) = self.ledger().answered(msg, true).await?
                    {
                        return Ok(done);
                    }
                }
                Err(PipelineError::Store(StoreError::Duplicate)) => {
                    // A concurrent delivery of the same message committed first.
                    if let Some(done) = self.ledger().answered(msg, true).await? {
                        return Ok(done);
                    }
                    if turn.followers.is_empty() {
                        return Err(StoreError::Duplicate.into());
                    }
                    // A follower's key is taken: each of them gets its own turn.
                    tracing::info!("a coalesced message was stored before; answering alone");
                    turn = turn.alone();
                }
                // One follower must not take its turn down (a write PostgreSQL refuses, a
                // template that fails on its text): the message is answered alone, and the
                // others get turns of their own.
                Err(e) if !turn.followers.is_empty() => {
                    metrics::record_error(&e, "coalesced turn");
                    tracing::warn!(
                        error.code = e.code(),
                        "a coalesced turn failed; answering its first message alone"
                    );
                    turn = turn.alone();
                }
                // A message not looked up first may be answered already: its stored answer,
                // not an error, is what it gets.
                Err(e) if !looked_up => {
                    return match self.ledger().stored_answer(msg).await {
                        Ok(Some(answer)) => Ok(Processed::Duplicate(answer)),
                        _ => Err(e),
                    };
                }
                other => return other,
            }
        }
    }

    /// Steps 3–14 once, from the user's cached state (`None`: from PostgreSQL): read, decide,
    /// persist, answer.
    async fn run(
        &self,
        turn: &Turn<'_>,
        business: &Business,
        log_id: Uuid,
        known: Known,
    ) -> Result<Processed, PipelineError> {
        // Steps 3–5: the read phase.
        let t = Instant::now();
        // Boxed: the snapshot lives through the LLM phase, the largest state of a message's
        // task, which would otherwise hold it inline.
        let mut read = Box::new(
            read::read_from(self.read_sources(), &turn.as_one_message(), business, known)
                .instrument(phase_span!("read"))
                .await?,
        );
        tracing::Span::current().record(
            "conversation.id",
            tracing::field::display(read.conversation.id),
        );
        metrics::step("read", t.elapsed());
        let read_ms = t.elapsed().as_millis() as u64;

        // Steps 6–9: the LLM phase (no database connection is held), the throttled reply, or
        // the handoff reply.
        let mut decisions = self.decide(turn, business, &mut read).await?;
        tracing::Span::current().record("stage", decisions.stage.name.as_str());
        let to_agents =
            handoff::to_agents(read.conversation.handoff.as_ref(), &decisions).map(Box::new);

        // Steps 10–12: the write phase, one transaction (14: cache keys dropped on failure).
        let t = Instant::now();
        let committed = persist::write(
            self.sinks(),
            turn.msg,
            turn.followers,
            &read,
            &mut decisions,
            log_id,
            read_ms,
        )
        .instrument(phase_span!("persist"))
        .await?;
        metrics::step("persist", t.elapsed());

        // Step 13: the committed state, cached for the next message (by the caller, in the
        // round trip that publishes the answer).
        let state = persist::state_write(&self.cache, &committed).await;

        let answer = Answer {
            reply_id: committed.reply_id,
            conversation_id: committed.state.conversation.id,
            status: decisions.response.status,
            content: decisions.response.content,
            stage: decisions.stage.name.clone(),
            log_id,
            answered_by: None,
            model: decisions
                .response
                .by
                .as_ref()
                .map(|(m, _)| m.clone())
                .unwrap_or_default(),
            endpoint: decisions.response.by.map(|(_, e)| e).unwrap_or_default(),
        };
        let followers = turn.follower_answers(&answer, &committed.follower_ids);
        Ok(Processed::Answered {
            answer,
            followers,
            state,
            // While a person has the conversation no LLM is called, a summary's included.
            summary: committed
                .state
                .conversation
                .handoff
                .is_none()
                .then(|| summary::due(business, &committed.state, &self.config.llm.default_model))
                .flatten(),
            fired_actions: !decisions.actions.is_empty(),
            to_agents,
        })
    }

    /// Steps 6–9: the LLM phase, or the throttled reply of a turn over budget.
    async fn decide<'b>(
        &self,
        turn: &Turn<'_>,
        business: &'b Business,
        read: &mut read::Snapshot<'b>,
    ) -> Result<decide::Decisions<'b>, PipelineError> {
        if let Some(state) = &read.conversation.handoff {
            return Ok(handoff::waiting(
                self.templates.engine(),
                business,
                read,
                state,
                turn.msg.reply_to.as_deref(),
            ));
        }
        if turn.throttled {
            return budget::throttled(
                &self.templates,
                business,
                read,
                &self.config.worker.throttled_reply,
            )
            .await;
        }
        let reply_id = Uuid::now_v7();
        let phase = decide::LlmPhase {
            caller: self.caller(),
            templates: &self.templates,
            stages: &self.stages,
            last_resort: &self.config.worker.last_resort_reply,
            reply_id,
            partials: business.policy.replies.stream.then(|| {
                partials::Partials::of(
                    self.cache.connection(),
                    turn.msg,
                    turn.outbound,
                    &self.config.streams,
                    read.conversation.id,
                    reply_id,
                    std::time::Duration::from_millis(self.config.llm.partial_interval_ms),
                )
            }),
            extraction_limits: extract::Limits::from_config(&self.config.limits),
        };
        let mut decisions = decide::decide(&phase, business, read).await?;
        budget::spend(&self.cache, business, &decisions.calls).await;
        decisions.actions = crate::actions::fired(
            self.templates.engine(),
            &crate::actions::Fired {
                business: business.id,
                conversation: read.conversation.id,
                message_key: turn.msg.idempotency_key(),
                reply_to: turn.msg.reply_to.as_deref(),
                stage: decisions.stage,
                entered: read.is_new || decisions.transition.is_some(),
                before: &read.extracted,
                after: &read.context.extracted,
            },
            &read.context,
        );
        // Entering a handoff stage hands the conversation to a person.
        if decisions.stage.handoff && (read.is_new || decisions.transition.is_some()) {
            decisions.handoff = Some(crate::model::HandoffState::starting(
                format!("stage:{}", decisions.stage.name),
                turn.msg.reply_to.clone(),
                business.policy.handoff.timeout_ms,
            ));
        }
        Ok(decisions)
    }

    /// How this process calls the LLM (every step and the summary).
    fn caller(&self) -> LlmCaller<'_, L> {
        LlmCaller {
            llm: &self.llm,
            retry: &self.retry,
            default_model: &self.config.llm.default_model,
            fallback_after: (self.config.llm.fallback_after_ms > 0)
                .then(|| std::time::Duration::from_millis(self.config.llm.fallback_after_ms)),
            capture_content: self.config.telemetry.capture_content,
        }
    }

    fn ledger(&self) -> idempotency::Ledger<'_> {
        idempotency::Ledger {
            store: &self.store,
            cache: &self.cache,
            retry: &self.retry,
        }
    }

    fn read_sources(&self) -> read::Sources<'_> {
        read::Sources {
            store: &self.store,
            cache: &self.cache,
            stages: &self.stages,
            history_turns: self.config.worker.history_turns,
        }
    }

    fn sinks(&self) -> persist::Sinks<'_> {
        persist::Sinks {
            store: &self.store,
            cache: &self.cache,
            retry: &self.retry,
            failpoints: &self.failpoints,
            history_turns: self.config.worker.history_turns,
            committer: self.committer.as_ref(),
        }
    }
}

/// Which processing attempt of its entry a message is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// How many times the entry started the pipeline, this time included (1: the first).
    pub number: u64,
    /// How many times the group delivered it (a takeover of a waiting entry adds a delivery,
    /// not an attempt).
    pub deliveries: u64,
}

impl Attempt {
    /// The first attempt of a first delivery: nobody can have stored this message before
    /// (unless its key repeats an earlier message's).
    pub fn is_first(self) -> bool {
        self.number <= 1 && self.deliveries <= 1
    }
}
