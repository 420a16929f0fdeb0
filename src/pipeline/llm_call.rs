//! One LLM call of the pipeline: the rendered template becomes a chat request, transient
//! failures are retried (see `retry`), and the call is recorded for `llm_calls` and metrics.

use std::time::Instant;

use tracing::Instrument;
use uuid::Uuid;

use crate::error::{Classify, LlmError};
use crate::llm::{ChatMessage, ChatRequest, ChatResponse, LlmService};
use crate::retry::RetryPolicy;
use crate::store::write_set::LlmCallRecord;
use crate::telemetry::metrics;
use crate::template::{Compiled, Rendered};

/// Why the pipeline calls the LLM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Selection,
    Extraction,
    Response,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Selection => "selection",
            Purpose::Extraction => "extraction",
            Purpose::Response => "response",
        }
    }
}

/// What the LLM steps share.
#[derive(Debug)]
pub struct LlmCaller<'a, L> {
    pub llm: &'a L,
    pub retry: &'a RetryPolicy,
    pub default_model: &'a str,
}

/// The start of the repair prompt (the mock LLM recognises it).
pub const REPAIR_PREFIX: &str = "Your previous answer was not valid";

/// A second chance for structured output: the answer that failed and why.
#[derive(Debug, Clone, Copy)]
pub struct Repair<'a> {
    pub answer: &'a str,
    pub problem: &'a str,
}

impl Repair<'_> {
    fn instruction(&self) -> String {
        format!(
            "{REPAIR_PREFIX}: {}. Answer again with only the corrected JSON.",
            self.problem
        )
    }
}

impl<L: LlmService> LlmCaller<'_, L> {
    /// Calls the LLM with a rendered template; returns the outcome and its log record.
    pub async fn call(
        &self,
        purpose: Purpose,
        template: &Compiled,
        rendered: &Rendered,
    ) -> (Result<ChatResponse, LlmError>, LlmCallRecord) {
        self.call_with(purpose, template, rendered, None).await
    }

    /// Calls the LLM again with the failed answer and the problem found in it (one repair
    /// turn); recorded like any call, its prompt ending with the repair turn.
    pub async fn repair(
        &self,
        purpose: Purpose,
        template: &Compiled,
        rendered: &Rendered,
        repair: Repair<'_>,
    ) -> (Result<ChatResponse, LlmError>, LlmCallRecord) {
        self.call_with(purpose, template, rendered, Some(repair))
            .await
    }

    /// Calls the LLM and parses the answer with `parse`. An answer that does not parse (or
    /// validate) gets one repair turn carrying the problem. Returns the parsed value or the last
    /// error, with every call's record (its outcome the parse error when the call itself went
    /// well); repairs are counted per `step` and outcome.
    pub async fn call_parsed<T>(
        &self,
        purpose: Purpose,
        template: &Compiled,
        rendered: &Rendered,
        parse: impl Fn(&str) -> Result<T, LlmError>,
    ) -> (Result<T, LlmError>, Vec<LlmCallRecord>) {
        let (result, mut record) = self.call(purpose, template, rendered).await;
        let mut records = Vec::with_capacity(2);
        let parsed = match result {
            Ok(answer) => match parse(&answer.content) {
                Ok(value) => Ok(value),
                Err(problem) => {
                    record.outcome = problem.code();
                    records.push(record);
                    let repair = Repair {
                        answer: &answer.content,
                        problem: &problem.to_string(),
                    };
                    let (again, mut second) =
                        self.repair(purpose, template, rendered, repair).await;
                    let fixed = again.and_then(|a| parse(&a.content));
                    metrics::output_repair(
                        purpose.as_str(),
                        if fixed.is_ok() { "repaired" } else { "failed" },
                    );
                    if let Err(e) = &fixed
                        && second.outcome == "ok"
                    {
                        second.outcome = e.code();
                    }
                    record = second;
                    fixed
                }
            },
            Err(e) => Err(e),
        };
        records.push(record);
        (parsed, records)
    }

    async fn call_with(
        &self,
        purpose: Purpose,
        template: &Compiled,
        rendered: &Rendered,
        repair: Option<Repair<'_>>,
    ) -> (Result<ChatResponse, LlmError>, LlmCallRecord) {
        let t = &template.record;
        let mut messages = Vec::with_capacity(4);
        if !rendered.system.trim().is_empty() {
            messages.push(ChatMessage::system(rendered.system.clone()));
        }
        messages.push(ChatMessage::user(rendered.body.clone()));
        if let Some(r) = &repair {
            messages.push(ChatMessage::assistant(r.answer));
            messages.push(ChatMessage::user(r.instruction()));
        }
        let request = ChatRequest {
            model: t
                .model
                .clone()
                .unwrap_or_else(|| self.default_model.to_owned()),
            messages,
            temperature: t.temperature,
            max_tokens: t.max_tokens.and_then(|m| u32::try_from(m).ok()),
            json_mode: purpose != Purpose::Response,
        };
        let started = Instant::now();
        let operation = match purpose {
            Purpose::Selection => "llm.selection",
            Purpose::Extraction => "llm.extraction",
            Purpose::Response => "llm.response",
        };
        let result = self
            .retry
            .run(operation, || self.llm.chat(&request))
            .instrument(tracing::info_span!("llm", purpose = purpose.as_str(), template = %t.name))
            .await;
        let took = started.elapsed();
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        metrics::llm_request(purpose.as_str(), outcome, took);
        if let Ok(r) = &result {
            metrics::llm_tokens(
                purpose.as_str(),
                r.prompt_tokens.unwrap_or(0),
                r.completion_tokens.unwrap_or(0),
            );
        }
        let mut prompt = if rendered.system.trim().is_empty() {
            rendered.body.to_string()
        } else {
            format!("{}\n\n{}", rendered.system, rendered.body)
        };
        if let Some(r) = &repair {
            prompt.push_str(&format!(
                "\n\n[assistant]\n{}\n\n[user]\n{}",
                r.answer,
                r.instruction()
            ));
        }
        let record = LlmCallRecord {
            id: Uuid::now_v7(),
            purpose: purpose.as_str(),
            template_id: t.id,
            template_version: t.version,
            model: result
                .as_ref()
                .map(|r| r.model.clone())
                .unwrap_or_else(|_| request.model.clone()),
            prompt,
            output: result.as_ref().ok().map(|r| r.content.clone()),
            prompt_tokens: result.as_ref().ok().and_then(|r| r.prompt_tokens),
            completion_tokens: result.as_ref().ok().and_then(|r| r.completion_tokens),
            latency_ms: u32::try_from(took.as_millis()).unwrap_or(u32::MAX),
            outcome,
        };
        (result, record)
    }
}
