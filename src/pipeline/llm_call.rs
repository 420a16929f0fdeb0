//! One LLM call of the pipeline: the rendered template becomes a chat request, transient
//! failures are retried (see `retry`), and the call is recorded for `llm_calls` and metrics.

use std::time::Instant;

use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::error::{Classify, LlmError};
use crate::llm::structured::Level;
use crate::llm::{ChatMessage, ChatRequest, ChatResponse, LlmService, OutputFormat, Target};
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
    /// A conversation's rolling summary (after the reply, in the background).
    Summary,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Selection => "selection",
            Purpose::Extraction => "extraction",
            Purpose::Response => "response",
            Purpose::Summary => "summary",
        }
    }
}

/// What the LLM steps share.
#[derive(Debug)]
pub struct LlmCaller<'a, L> {
    pub llm: &'a L,
    pub retry: &'a RetryPolicy,
    pub default_model: &'a str,
    /// The most one entry of a model chain may take, retries included (`None`: the retry
    /// policy's budget).
    pub fallback_after: Option<std::time::Duration>,
    /// Whether the LLM spans carry the prompts and outputs (`telemetry.capture_content`).
    pub capture_content: bool,
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
    /// Calls the LLM with a rendered template; returns the outcome and the records of every
    /// entry of the model chain it tried.
    pub async fn call(
        &self,
        purpose: Purpose,
        template: &Compiled,
        rendered: &Rendered,
        format: &OutputFormat,
    ) -> (Result<ChatResponse, LlmError>, Vec<LlmCallRecord>) {
        self.call_with(purpose, template, rendered, format, None, None)
            .await
    }

    /// [`call`](Self::call), the answer streamed into `partial` (text only).
    pub async fn call_streamed(
        &self,
        purpose: Purpose,
        template: &Compiled,
        rendered: &Rendered,
        partial: &tokio::sync::watch::Sender<String>,
    ) -> (Result<ChatResponse, LlmError>, Vec<LlmCallRecord>) {
        self.call_with(
            purpose,
            template,
            rendered,
            &OutputFormat::Text,
            None,
            Some(partial),
        )
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
        format: &OutputFormat,
        parse: impl Fn(&str) -> Result<T, LlmError>,
    ) -> (Result<T, LlmError>, Vec<LlmCallRecord>) {
        let (result, mut records) = self.call(purpose, template, rendered, format).await;
        let parsed = match result {
            Ok(answer) => match parse(&answer.content) {
                Ok(value) => Ok(value),
                Err(problem) => {
                    if let Some(last) = records.last_mut() {
                        last.outcome = problem.code();
                    }
                    let repair = Repair {
                        answer: &answer.content,
                        problem: &problem.to_string(),
                    };
                    let (again, mut more) = self
                        .call_with(purpose, template, rendered, format, Some(repair), None)
                        .await;
                    let fixed = again.and_then(|a| parse(&a.content));
                    metrics::output_repair(
                        purpose.as_str(),
                        if fixed.is_ok() { "repaired" } else { "failed" },
                    );
                    if let Err(e) = &fixed
                        && let Some(last) = more.last_mut()
                        && last.outcome == "ok"
                    {
                        last.outcome = e.code();
                    }
                    records.append(&mut more);
                    fixed
                }
            },
            Err(e) => Err(e),
        };
        (parsed, records)
    }

    /// The model chain of `template`: its `models`, else its `model`, else the default.
    fn chain(&self, template: &Compiled) -> Vec<Target> {
        let t = &template.record;
        let models: Vec<&str> = if t.models.is_empty() {
            vec![t.model.as_deref().unwrap_or(self.default_model)]
        } else {
            t.models.iter().map(String::as_str).collect()
        };
        self.llm.chain(&models)
    }

    /// One entry of a chain: the call with its retries, within `fallback_after`.
    async fn attempt(
        &self,
        purpose: Purpose,
        template: &str,
        target: &Target,
        request: &ChatRequest,
        partial: Option<&tokio::sync::watch::Sender<String>>,
    ) -> Result<ChatResponse, LlmError> {
        let operation = match purpose {
            Purpose::Selection => "llm.selection",
            Purpose::Extraction => "llm.extraction",
            Purpose::Response => "llm.response",
            Purpose::Summary => "llm.summary",
        };
        let span = llm_span(purpose, template, target, request);
        // Content goes on the OpenTelemetry span only, never into the span's log fields.
        let capture = self.capture_content && crate::telemetry::traces::exporting();
        if capture {
            span.set_attribute(
                "gen_ai.input.messages",
                serde_json::to_string(&request.messages).unwrap_or_default(),
            );
        }
        let attempts = self
            .retry
            .run(operation, || async {
                match partial {
                    Some(p) => self.llm.chat_streamed(request, p).await,
                    None => self.llm.chat(request).await,
                }
            })
            .instrument(span.clone());
        let result = within_budget(self.fallback_after, attempts).await;
        match &result {
            Ok(r) => {
                span.record("gen_ai.response.model", r.model.as_str());
                if let Some(reason) = &r.finish_reason {
                    span.record("gen_ai.response.finish_reasons", reason.as_str());
                }
                if let Some(n) = r.prompt_tokens {
                    span.record("gen_ai.usage.input_tokens", n);
                }
                if let Some(n) = r.completion_tokens {
                    span.record("gen_ai.usage.output_tokens", n);
                }
                if capture {
                    span.set_attribute("gen_ai.output.messages", r.content.clone());
                }
            }
            Err(e) => {
                span.record("error.type", e.code());
                span.record("otel.status_code", "ERROR");
            }
        }
        result
    }

    /// Tries the chain's entries in order until one answers; a failure moves on when it is
    /// retryable (once the entry's retries are spent), an open circuit, or the entry's time
    /// budget spent. One record per entry tried.
    async fn call_with(
        &self,
        purpose: Purpose,
        template: &Compiled,
        rendered: &Rendered,
        format: &OutputFormat,
        repair: Option<Repair<'_>>,
        partial: Option<&tokio::sync::watch::Sender<String>>,
    ) -> (Result<ChatResponse, LlmError>, Vec<LlmCallRecord>) {
        let t = &template.record;
        let (messages, prompt) = conversation(rendered, repair.as_ref());
        let chain = self.chain(template);
        let mut records = Vec::with_capacity(1);
        let mut request = ChatRequest {
            model: String::new(),
            messages,
            temperature: t.temperature,
            max_tokens: t.max_tokens.and_then(|m| u32::try_from(m).ok()),
            format: format.clone(),
            endpoint: 0,
        };
        let mut last = Err(LlmError::Connect(
            "no endpoint serves the template's models".into(),
        ));
        for (i, target) in chain.iter().enumerate() {
            request.model.clone_from(&target.model);
            request.endpoint = target.endpoint;
            let started = Instant::now();
            let result = self
                .attempt(purpose, &t.name, target, &request, partial)
                .await;
            let took = started.elapsed();
            let outcome = counted(purpose, &result, took);
            records.push(LlmCallRecord {
                id: Uuid::now_v7(),
                purpose: purpose.as_str(),
                template_id: t.id,
                template_version: t.version,
                model: target.model.clone(),
                endpoint: target.endpoint_name.to_string(),
                response_format: None,
                // The prompt itself goes to the record the call ends with (below); a record
                // the chain moves on from gets a copy.
                prompt: String::new(),
                output: None,
                prompt_tokens: None,
                completion_tokens: None,
                latency_ms: u32::try_from(took.as_millis()).unwrap_or(u32::MAX),
                outcome,
            });
            if let (Ok(r), Some(record)) = (&result, records.last_mut()) {
                record.model.clone_from(&r.model);
                record.response_format = r.format.map(Level::as_str);
                record.output = Some(r.content.clone());
                record.prompt_tokens = r.prompt_tokens;
                record.completion_tokens = r.completion_tokens;
            }
            if let Err(e) = &result
                && let Some(next) = chain.get(i + 1)
                && (e.is_retryable() || matches!(e, LlmError::CircuitOpen))
            {
                moved_on(purpose, target, next, e);
                if let Some(record) = records.last_mut() {
                    record.prompt.clone_from(&prompt);
                }
                last = result;
                continue;
            }
            if let Some(record) = records.last_mut() {
                record.prompt = prompt;
            }
            return (result, records);
        }
        (last, records)
    }
}

/// The chat messages of a call and the prompt recorded for it: the rendered system and body,
/// then the repair turn if there is one.
fn conversation(rendered: &Rendered, repair: Option<&Repair<'_>>) -> (Vec<ChatMessage>, String) {
    let mut messages = Vec::with_capacity(4);
    if !rendered.system.trim().is_empty() {
        messages.push(ChatMessage::system(rendered.system.clone()));
    }
    messages.push(ChatMessage::user(rendered.body.clone()));
    let mut prompt = if rendered.system.trim().is_empty() {
        rendered.body.to_string()
    } else {
        format!("{}\n\n{}", rendered.system, rendered.body)
    };
    if let Some(r) = repair {
        messages.push(ChatMessage::assistant(r.answer));
        messages.push(ChatMessage::user(r.instruction()));
        prompt.push_str(&format!(
            "\n\n[assistant]\n{}\n\n[user]\n{}",
            r.answer,
            r.instruction()
        ));
    }
    (messages, prompt)
}

/// The attempts of one chain entry, within `budget` (its `fallback_after`). (A combinator,
/// not an `async fn`: an `async fn` would keep the moved-in `attempts` beside the timeout that
/// holds it, a second copy of the largest future of every message's task.)
fn within_budget<F>(
    budget: Option<std::time::Duration>,
    attempts: F,
) -> futures::future::Either<impl std::future::Future<Output = Result<ChatResponse, LlmError>>, F>
where
    F: std::future::Future<Output = Result<ChatResponse, LlmError>>,
{
    use futures::FutureExt;
    match budget {
        // The entry's budget spent: its retries (or a hung call) end here.
        Some(budget) => {
            futures::future::Either::Left(tokio::time::timeout(budget, attempts).map(move |r| {
                r.unwrap_or_else(|_| {
                    Err(LlmError::Timeout(
                        u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
                    ))
                })
            }))
        }
        None => futures::future::Either::Right(attempts),
    }
}

/// Counts a call's outcome, latency and tokens; returns the outcome.
fn counted(
    purpose: Purpose,
    result: &Result<ChatResponse, LlmError>,
    took: std::time::Duration,
) -> &'static str {
    let outcome = match result {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    metrics::llm_request(purpose.as_str(), outcome, took);
    if let Ok(r) = result {
        metrics::llm_tokens(
            purpose.as_str(),
            r.prompt_tokens.unwrap_or(0),
            r.completion_tokens.unwrap_or(0),
        );
    }
    outcome
}

/// Counts and logs a call leaving `from` for `to` after `error`.
fn moved_on(purpose: Purpose, from: &Target, to: &Target, error: &LlmError) {
    let reason = if matches!(error, LlmError::CircuitOpen) {
        "circuit_open"
    } else {
        "failure"
    };
    metrics::llm_fallback(purpose.as_str(), &from.endpoint_name, reason);
    tracing::warn!(
        error = %error,
        from.endpoint = %from.endpoint_name,
        from.model = %from.model,
        to.endpoint = %to.endpoint_name,
        to.model = %to.model,
        "the LLM call moves to the next model of its chain"
    );
}

/// The span of one LLM call. When spans are exported it carries the OpenTelemetry semantic
/// conventions for generative AI client spans (recorded further as the call returns); without
/// export, only what the log lines show, so that the logs do not format fields nobody reads.
fn llm_span(purpose: Purpose, template: &str, target: &Target, request: &ChatRequest) -> Span {
    if !crate::telemetry::traces::exporting() {
        return tracing::info_span!(
            "llm",
            purpose = purpose.as_str(),
            template,
            endpoint = %target.endpoint_name,
            model = %target.model,
        );
    }
    tracing::info_span!(
        "llm",
        otel.name = %format_args!("chat {}", target.model),
        otel.kind = "client",
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = "openai",
        gen_ai.request.model = %target.model,
        gen_ai.request.temperature = request.temperature.map(f64::from),
        gen_ai.request.max_tokens = request.max_tokens,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.response.finish_reasons = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        purpose = purpose.as_str(),
        template,
        endpoint = %target.endpoint_name,
    )
}
