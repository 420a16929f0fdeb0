//! Step 6: stage selection by the LLM (optional). The answer must name a stage of the business
//! that the current stage may move to (its `transitions`). An unreadable answer or an unknown
//! stage gets one repair prompt; what still fails, a disallowed stage or a failed call keeps the
//! current stage (counted). The transition rules
//! are also the containment of prompt injection: whatever a user writes, a conversation only
//! moves where its business allows.

use serde_json::Value;

use super::llm_call::{LlmCaller, Purpose};
use crate::definitions::TemplateService;
use crate::error::{Classify, LlmError, PipelineError};
use crate::llm::{LlmService, OutputFormat};
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

/// The schema of a selection answer from `current`: `{"stage": …}`, the stage one of those the
/// conversation may be in next (the current one and those it may move to), in business order.
pub fn answer_format(business: &Business, current: &StageInfo) -> OutputFormat {
    let allowed: Vec<&str> = business
        .stages
        .iter()
        .filter(|s| current.may_move_to(s.id))
        .map(|s| s.name.as_str())
        .collect();
    OutputFormat::json(
        "stage_selection",
        Some(std::sync::Arc::new(serde_json::json!({
            "type": "object",
            "properties": {"stage": {"type": "string", "enum": allowed}},
            "required": ["stage"],
            "additionalProperties": false
        }))),
    )
}

/// The stage a selection answer names, or what is wrong with it.
fn chosen_stage<'b>(business: &'b Business, answer: &str) -> Result<&'b StageInfo, LlmError> {
    let name = parse_stage(answer)
        .ok_or_else(|| LlmError::InvalidOutput("the answer names no stage".into()))?;
    business.stage_by_name(&name).ok_or_else(|| {
        metrics::unknown_stage();
        let known: Vec<&str> = business.stages.iter().map(|s| s.name.as_str()).collect();
        LlmError::InvalidOutput(format!(
            "`{name}` is not a stage; the stages are {}",
            known.join(", ")
        ))
    })
}

/// Runs selection; returns the chosen stage when it differs from the current one, and the
/// calls' records. An answer that names no stage, or an unknown one, gets one repair prompt
/// carrying the problem; a stage the current one may not move to is refused outright (no
/// repair: that is policy, not a malformed answer).
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
) -> Result<(Option<&'b StageInfo>, Vec<LlmCallRecord>), PipelineError> {
    let rendered = templates.render(template, ctx)?;
    let format = answer_format(business, current);
    let (chosen, mut records) = caller
        .call_parsed(Purpose::Selection, template, &rendered, &format, |answer| {
            chosen_stage(business, answer)
        })
        .await;
    let chosen = match chosen {
        Ok(stage) => Some(stage).filter(|s| s.id != current.id),
        Err(e) => {
            tracing::warn!(error = %e, "selection gave no usable stage; keeping the current one");
            metrics::record_error(&e, "selection");
            metrics::degraded("selection");
            None
        }
    };
    if let Some(next) = chosen
        && !current.may_move_to(next.id)
    {
        let e = LlmError::TransitionNotAllowed {
            from: current.name.clone(),
            to: next.name.clone(),
        };
        if let Some(last) = records.last_mut() {
            last.outcome = e.code();
        }
        metrics::record_error(&e, "selection");
        metrics::degraded("selection");
        return Ok((None, records));
    }
    Ok((chosen, records))
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
