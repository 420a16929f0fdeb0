//! Step 9: the response. The stage's response template is rendered and sent to the LLM; when the
//! call fails (after retries) the reply is rendered from the stage's fallback template, else
//! the configured last-resort text, and marked `fallback`.

use super::llm_call::{LlmCaller, Purpose};
use super::template::TemplateService;
use crate::error::PipelineError;
use crate::llm::LlmService;
use crate::store::write_set::LlmCallRecord;
use crate::telemetry::metrics;
use crate::template::Compiled;
use crate::template::Context;

/// The reply text and whether it came from the LLM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub content: String,
    pub fallback: bool,
}

/// Generates the reply.
///
/// # Errors
/// Only when the response template itself cannot be rendered (a definition problem).
pub async fn respond<L: LlmService>(
    caller: &LlmCaller<'_, L>,
    templates: &TemplateService,
    template: &Compiled,
    fallback: Option<&Compiled>,
    last_resort: &str,
    ctx: &Context,
    calls: &mut Vec<LlmCallRecord>,
) -> Result<Response, PipelineError> {
    let rendered = templates.render(template, ctx)?;
    let (result, record) = caller.call(Purpose::Response, template, &rendered).await;
    calls.push(record);
    match result {
        Ok(answer) if !answer.content.trim().is_empty() => Ok(Response {
            content: answer.content,
            fallback: false,
        }),
        outcome => {
            if let Err(e) = &outcome {
                metrics::record_error(e, "response");
            }
            metrics::degraded("response");
            let content = match fallback.map(|f| templates.render(f, ctx)) {
                Some(Ok(r)) if !r.body.trim().is_empty() => r.body,
                Some(Err(e)) => {
                    metrics::record_error(&e, "fallback");
                    last_resort.to_owned()
                }
                _ => last_resort.to_owned(),
            };
            Ok(Response {
                content,
                fallback: true,
            })
        }
    }
}
