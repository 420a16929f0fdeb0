//! Step 6: stage selection by the LLM (optional). The answer must name a stage of the business
//! that the current stage may move to (its `transitions`); an unknown or disallowed stage, an
//! unreadable answer or a failed call keeps the current stage (counted). The transition rules
//! are also the containment of prompt injection: whatever a user writes, a conversation only
//! moves where its business allows.

use serde_json::Value;

use super::llm_call::{LlmCaller, Purpose};
use super::template::TemplateService;
use crate::error::{Classify, LlmError, PipelineError};
use crate::llm::LlmService;
use crate::model::{Business, StageInfo};
use crate::store::write_set::LlmCallRecord;
use crate::telemetry::metrics;
use crate::template::Compiled;
use crate::template::Context;

/// Reads the stage name out of a selection answer: `{"stage": "name"}` (a bare string or a
/// JSON string is accepted too).
pub fn parse_stage(answer: &str) -> Option<String> {
    let trimmed = answer.trim();
    match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::Object(o)) => o
            .get("stage")
            .and_then(Value::as_str)
            .map(|s| s.trim().to_owned()),
        Ok(Value::String(s)) => Some(s.trim().to_owned()),
        _ if !trimmed.is_empty() && !trimmed.contains(char::is_whitespace) => {
            Some(trimmed.to_owned())
        }
        _ => None,
    }
}

/// Runs selection; returns the chosen stage when it differs from the current one, and the
/// call's record.
///
/// # Errors
/// Only when the template cannot be rendered (a definition problem).
pub async fn select<'b, L: LlmService>(
    caller: &LlmCaller<'_, L>,
    templates: &TemplateService,
    template: &Compiled,
    ctx: &Context,
    business: &'b Business,
    current: &StageInfo,
) -> Result<(Option<&'b StageInfo>, LlmCallRecord), PipelineError> {
    let rendered = templates.render(template, ctx)?;
    let (result, mut record) = caller.call(Purpose::Selection, template, &rendered).await;
    let chosen = match result {
        Ok(answer) => match parse_stage(&answer.content) {
            Some(name) => match business.stage_by_name(&name) {
                Some(stage) => Some(stage),
                None => {
                    metrics::unknown_stage();
                    tracing::warn!(stage = %name, "selection named an unknown stage; keeping the current one");
                    None
                }
            },
            None => {
                let e = LlmError::InvalidOutput("selection answer names no stage".into());
                record.outcome = e.code();
                metrics::record_error(&e, "selection");
                metrics::degraded("selection");
                None
            }
        },
        Err(e) => {
            metrics::record_error(&e, "selection");
            metrics::degraded("selection");
            None
        }
    };
    let chosen = chosen.filter(|s| s.id != current.id);
    if let Some(next) = chosen
        && !current.may_move_to(next.id)
    {
        let e = LlmError::TransitionNotAllowed {
            from: current.name.clone(),
            to: next.name.clone(),
        };
        record.outcome = e.code();
        metrics::record_error(&e, "selection");
        metrics::degraded("selection");
        return Ok((None, record));
    }
    Ok((chosen, record))
}

#[cfg(test)]
mod tests {
    use super::parse_stage;

    #[test]
    fn stage_names_are_read_from_common_answer_shapes() {
        assert_eq!(
            parse_stage(r#"{"stage": "booking"}"#).as_deref(),
            Some("booking")
        );
        assert_eq!(parse_stage(r#""farewell""#).as_deref(), Some("farewell"));
        assert_eq!(parse_stage("welcome").as_deref(), Some("welcome"));
        assert_eq!(parse_stage(r#"{"stage": null}"#), None);
        assert_eq!(parse_stage("I think booking"), None);
    }
}
