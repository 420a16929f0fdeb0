//! Step 8: data extraction by the LLM (optional), the DataExtractionService. The answer must be
//! a JSON object satisfying the template's output schema; otherwise the step is skipped
//! (counted) and nothing is merged.

use serde_json::Value;

use super::llm_call::{LlmCaller, Purpose};
use super::template::TemplateService;
use crate::error::{Classify, LlmError, PipelineError};
use crate::llm::LlmService;
use crate::model::Extracted;
use crate::store::write_set::LlmCallRecord;
use crate::telemetry::metrics;
use crate::template::Compiled;
use crate::template::Context;

/// Parses and checks an extraction answer; `null` values are dropped (nothing learned).
///
/// # Errors
/// Not a JSON object, or a schema violation.
pub fn parse_output(template: &Compiled, answer: &str) -> Result<Extracted, LlmError> {
    let value: Value = serde_json::from_str(answer.trim())
        .map_err(|e| LlmError::InvalidOutput(format!("extraction answer is not JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(LlmError::InvalidOutput(
            "extraction answer is not a JSON object".into(),
        ));
    };
    map.retain(|_, v| !v.is_null());
    template
        .validate_output(&Value::Object(map.clone()))
        .map_err(|e| {
            LlmError::InvalidOutput(format!("extraction answer violates the schema: {e}"))
        })?;
    Ok(map)
}

/// Runs extraction; returns the fields learned from this message and the call's record.
///
/// # Errors
/// Only when the template cannot be rendered (a definition problem).
pub async fn extract<L: LlmService>(
    caller: &LlmCaller<'_, L>,
    templates: &TemplateService,
    template: &Compiled,
    ctx: &Context,
) -> Result<(Extracted, LlmCallRecord), PipelineError> {
    let rendered = templates.render(template, ctx)?;
    let (result, mut record) = caller.call(Purpose::Extraction, template, &rendered).await;
    let fields = match result.and_then(|answer| parse_output(template, &answer.content)) {
        Ok(fields) => fields,
        Err(e) => {
            if record.outcome == "ok" {
                record.outcome = e.code();
            }
            metrics::record_error(&e, "extraction");
            metrics::degraded("extraction");
            Extracted::new()
        }
    };
    Ok((fields, record))
}
