//! Step 9: the response. The stage's response template is rendered and sent to the LLM; when the
//! call fails (after retries) the reply is rendered from the stage's fallback template, else
//! the configured last-resort text, and marked `fallback`.

use super::llm_call::{LlmCaller, Purpose};
use super::partials::Partials;
use crate::definitions::TemplateService;
use crate::error::PipelineError;
use crate::llm::{LlmService, OutputFormat};
use crate::model::AnswerStatus;
use crate::store::write_set::LlmCallRecord;
use crate::telemetry::metrics;
use crate::template::Compiled;
use crate::template::Context;

/// The reply text and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The id the reply is stored under (its `reply_id`; partials carry it before it commits).
    pub reply_id: uuid::Uuid,
    pub content: String,
    /// `Fallback`: not from the LLM but from the fallback template, or the last-resort text;
    /// `Throttled`: from the throttled template (no LLM call).
    pub status: AnswerStatus,
    /// The fallback template (id, version) the content was rendered from, if any; stored with
    /// the reply so that a fallback reply can be explained from the database alone.
    pub fallback_template: Option<(uuid::Uuid, i32)>,
    /// The template (id, version) the content came from: the response template, or the
    /// fallback template; `None` for the last-resort text.
    pub template: Option<(uuid::Uuid, i32)>,
    /// The model and endpoint that answered (`None`: no LLM did).
    pub by: Option<(String, String)>,
}

/// What the response step needs besides the templates.
#[derive(Debug)]
pub struct Reply<'a> {
    /// The id the reply will be stored under.
    pub reply_id: uuid::Uuid,
    /// Sent when the call failed and there is no fallback template.
    pub last_resort: &'a str,
    /// Where partial replies go, when the business streams replies.
    pub partials: Option<Partials>,
}

/// Generates the reply; returns it with the records of the calls made (one per entry of the
/// template's model chain tried). With `partials`, the answer is streamed and the text so far
/// published while it is written (see [`super::partials`]).
///
/// # Errors
/// Only when the response template itself cannot be rendered (a definition problem).
pub async fn respond<L: LlmService>(
    caller: &LlmCaller<'_, L>,
    templates: &TemplateService,
    template: &Compiled,
    fallback: Option<&Compiled>,
    reply: Reply<'_>,
    ctx: &Context,
) -> Result<(Response, Vec<LlmCallRecord>), PipelineError> {
    let rendered = templates.render(template, ctx)?;
    let (result, records) = match reply.partials {
        None => {
            caller
                .call(Purpose::Response, template, &rendered, &OutputFormat::Text)
                .await
        }
        Some(partials) => {
            let (text, watched) = tokio::sync::watch::channel(String::new());
            let done = tokio_util::sync::CancellationToken::new();
            let publisher = partials.publish_until(watched, done.clone());
            let call = async {
                let outcome = caller
                    .call_streamed(Purpose::Response, template, &rendered, &text)
                    .await;
                done.cancel();
                outcome
            };
            tokio::join!(call, publisher).0
        }
    };
    let last_resort = reply.last_resort;
    let reply_id = reply.reply_id;
    let response = match result {
        Ok(answer) if !answer.content.trim().is_empty() => Response {
            reply_id,
            by: records
                .last()
                .map(|r| (answer.model.clone(), r.endpoint.clone())),
            content: answer.content,
            status: AnswerStatus::Ok,
            fallback_template: None,
            template: Some((template.record.id, template.record.version)),
        },
        outcome => {
            if let Err(e) = &outcome {
                metrics::record_error(e, "response");
            }
            metrics::degraded("response");
            let (content, fallback_template) =
                templates.reply_text(fallback, ctx, last_resort, "fallback");
            Response {
                reply_id,
                content,
                status: AnswerStatus::Fallback,
                fallback_template,
                template: fallback_template,
                by: None,
            }
        }
    };
    Ok((response, records))
}
