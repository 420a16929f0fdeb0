//! Per-business budgets (`[business.budget]`): before the LLM phase, a message is counted
//! against its business's messages per minute and checked against its tokens per day (both in
//! Redis, over every worker). A message over budget is still stored, with a reply rendered
//! from the business's throttled template (else `worker.throttled_reply`) and the status
//! `throttled`, and no LLM call: nothing is lost, and the business's LLM spend stops.
//!
//! Redis failing fails open: the message is processed (the failure is counted); a budget is a
//! guard against floods, not a reason to refuse service while Redis restarts.

use chrono::Utc;
use uuid::Uuid;

use super::decide::Decisions;
use super::read::Snapshot;
use super::respond::Response;
use crate::cache::Cache;
use crate::definitions::TemplateService;
use crate::error::PipelineError;
use crate::model::{AnswerStatus, Business, Extracted};
use crate::store::write_set::LlmCallRecord;
use crate::telemetry::metrics;

/// Which budget a message exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    MessagesPerMinute,
    TokensPerDay,
}

impl Exceeded {
    /// The budget's key in `[business.budget]` (and the metric's label).
    pub fn as_str(self) -> &'static str {
        match self {
            Exceeded::MessagesPerMinute => "messages_per_minute",
            Exceeded::TokensPerDay => "tokens_per_day",
        }
    }
}

/// Counts `messages` (the messages of one turn; 0 for a redelivered message, counted when it
/// was first delivered) against the business's budget; returns the budget they exceed, if any.
/// No Redis call for a business without budgets.
pub async fn admit(cache: &Cache, business: &Business, messages: u64) -> Option<Exceeded> {
    let budget = &business.policy.budget;
    if budget.messages_per_minute.is_none() && budget.tokens_per_day.is_none() {
        return None;
    }
    let usage = match cache
        .count_messages(business.id, messages, Utc::now())
        .await
    {
        Ok(u) => u,
        Err(e) => {
            metrics::record_error(&e, "budget");
            return None;
        }
    };
    // A redelivery was judged against its minute when first delivered; only the day's
    // tokens may have run out since.
    let exceeded = if messages > 0
        && budget
            .messages_per_minute
            .is_some_and(|max| usage.messages_this_minute > u64::from(max))
    {
        Some(Exceeded::MessagesPerMinute)
    } else if budget
        .tokens_per_day
        .is_some_and(|max| usage.tokens_today >= max)
    {
        Some(Exceeded::TokensPerDay)
    } else {
        None
    };
    if let Some(e) = exceeded {
        metrics::throttled(e.as_str(), messages.max(1));
    }
    exceeded
}

/// Adds the tokens of the turn's LLM calls to the business's day, when it has a token budget.
pub async fn spend(cache: &Cache, business: &Business, calls: &[LlmCallRecord]) {
    if business.policy.budget.tokens_per_day.is_none() {
        return;
    }
    let tokens: u64 = calls
        .iter()
        .map(|c| {
            u64::from(c.prompt_tokens.unwrap_or(0)) + u64::from(c.completion_tokens.unwrap_or(0))
        })
        .sum();
    if tokens == 0 {
        return;
    }
    if let Err(e) = cache.add_tokens(business.id, tokens, Utc::now()).await {
        metrics::record_error(&e, "budget");
    }
}

/// The decisions for a message over budget: the stage stays, nothing is extracted, and the
/// reply comes from the throttled template (else `fallback_text`) without any LLM call.
///
/// # Errors
/// A throttled template that cannot be loaded.
pub async fn throttled<'b>(
    templates: &TemplateService,
    business: &Business,
    read: &Snapshot<'b>,
    fallback_text: &str,
) -> Result<Decisions<'b>, PipelineError> {
    let template = match business.throttled_template_id {
        Some(id) => Some(templates.get(business.id, id).await?),
        None => None,
    };
    let (content, template) = templates.reply_text(
        template.as_deref(),
        &read.context,
        fallback_text,
        "throttled template",
    );
    let response = Response {
        reply_id: Uuid::now_v7(),
        content,
        status: AnswerStatus::Throttled,
        fallback_template: None,
        template,
        by: None,
    };
    Ok(Decisions {
        stage: read.stage,
        transition: None,
        learned: Extracted::new(),
        response,
        calls: Vec::new(),
        timings: Vec::new(),
        actions: Vec::new(),
        handoff: None,
    })
}
