//! The rolling summary (`[business.history]`): after a reply, a conversation whose history since
//! its summary takes more than `summarize_after_tokens` (or fills the history window, past which
//! older turns would be forgotten) has its older turns folded into its summary by the
//! business's `summary` template, outside the message's critical path: the worker starts it in
//! the background once the reply is published, and no message waits for it.
//!
//! The summariser reads the summary and every message after it, keeps the newest `keep_turns`
//! out, and asks the LLM (the template's model chain, retried as any call) for a summary of the
//! old one and the rest, which templates see as `summary`. It is saved only if the summary is
//! still the one it read (two workers may summarise at once; one wins), with the call's
//! `llm_calls` row (purpose `summary`, no message), and the user's cached state is dropped, so
//! that the next message reads the new summary and the history after it. A failed call
//! changes nothing: the next reply tries again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::Utc;
use uuid::Uuid;

use super::MessageHandler;
use super::context::{self, ContextInputs};
use super::llm_call::Purpose;
use crate::error::PipelineError;
use crate::llm::tokens::Counter;
use crate::llm::{LlmService, OutputFormat};
use crate::model::{Business, ConversationState, Extracted};
use crate::telemetry::metrics;

/// A conversation whose history is due for a summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryDue {
    pub business_id: Uuid,
    pub conversation_id: Uuid,
    pub user_external_id: String,
    pub stage_id: Uuid,
}

/// Whether the conversation `state` (as just committed) is due for a summary: the business
/// summarises, and the history since the last summary takes more than
/// `summarize_after_tokens` (counted for `model`) or fills the window of `window` turns.
pub fn due(business: &Business, state: &ConversationState, model: &str) -> Option<SummaryDue> {
    business.summary_template_id?;
    let policy = &business.policy.history;
    let counter = Counter::for_model(model);
    let tokens: usize = state.history.iter().map(|t| counter.turn(&t.content)).sum();
    let over = tokens > policy.summarize_after_tokens as usize;
    let full = state.window > 0 && state.history.len() >= state.window;
    let c = &state.conversation;
    (over || full).then(|| SummaryDue {
        business_id: c.business_id,
        conversation_id: c.id,
        user_external_id: c.user_external_id.clone(),
        stage_id: c.stage_id,
    })
}

/// Conversations being summarised by this process (one summary at a time for each).
#[derive(Debug, Default)]
pub struct InProgress(Mutex<HashSet<Uuid>>);

impl InProgress {
    fn start(&self, id: Uuid) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id)
    }
    fn end(&self, id: Uuid) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

impl<L: LlmService> MessageHandler<L> {
    /// Drops the user's cached state (the next message reads the new summary).
    async fn forget_state(&self, business_id: Uuid, user: &str) {
        if let Err(e) = self.cache.invalidate_conversation(business_id, user).await {
            metrics::record_error(&e, "cache invalidation");
        }
    }

    /// Summarises `due` in the background (no-op when this process is already at it).
    pub fn summarize_later(self: &Arc<Self>, due: SummaryDue) {
        if !self.summarizing.start(due.conversation_id) {
            return;
        }
        let handler = self.clone();
        tokio::spawn(async move {
            let id = due.conversation_id;
            match handler.summarize(&due).await {
                Ok(true) => metrics::summary("saved"),
                Ok(false) => metrics::summary("skipped"),
                Err(e) => {
                    metrics::summary("failed");
                    metrics::record_error(&e, "summary");
                }
            }
            handler.summarizing.end(id);
        });
    }

    /// Folds the older turns of `due` into its summary; returns whether a summary was saved.
    ///
    /// # Errors
    /// A failed LLM call (after its chain), a template that cannot be rendered, a database
    /// failure.
    pub async fn summarize(&self, due: &SummaryDue) -> Result<bool, PipelineError> {
        let business = self.stages.business(due.business_id).await?;
        let Some(template_id) = business.summary_template_id else {
            return Ok(false);
        };
        let Some(read) = self
            .store
            .unsummarized(business.id, due.conversation_id)
            .await?
        else {
            return Ok(false);
        };
        let keep = business.policy.history.keep_turns as usize;
        let fold = read.turns.len().saturating_sub(keep);
        if fold == 0 {
            return Ok(false);
        }
        let upto = read.turns[fold - 1].0;
        let template = self.templates.get(business.id, template_id).await?;
        let Some(stage) = business
            .stage(due.stage_id)
            .or_else(|| business.stages.first())
        else {
            return Ok(false);
        };
        let ctx = context::build(ContextInputs {
            business: &business,
            user_id: &due.user_external_id,
            conversation_id: due.conversation_id,
            is_new: false,
            stage,
            content: "",
            metadata: None,
            history: read.turns[..fold].iter().map(|(_, t)| t.clone()).collect(),
            summary: &read.summary,
            extracted: &Extracted::new(),
            now: Utc::now(),
            actions: &serde_json::Map::new(),
        });
        let rendered = self.templates.render(&template, &ctx)?;
        let (answer, calls) = self
            .caller()
            .call(Purpose::Summary, &template, &rendered, &OutputFormat::Text)
            .await;
        super::budget::spend(&self.cache, &business, &calls).await;
        let text = answer?.content.trim().to_owned();
        if text.is_empty() {
            return Ok(false);
        }
        let log_id = Uuid::now_v7();
        let saved = self
            .store
            .save_summary(
                business.id,
                due.conversation_id,
                (read.summarized_seq, upto),
                &text,
                &calls,
                log_id,
            )
            .await?;
        if saved {
            self.forget_state(business.id, &due.user_external_id).await;
        }
        tracing::info!(conversation.id = %due.conversation_id, folded = fold, upto, saved, "summary");
        Ok(saved)
    }
}
