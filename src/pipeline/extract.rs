//! Step 8: data extraction by the LLM (optional), the DataExtractionService. The answer must be
//! a JSON object satisfying the template's output schema (and the size limits); otherwise one
//! repair prompt carries the problem back to the model, and if that answer fails too the step
//! is skipped (counted) and nothing is merged.

use serde_json::Value;

use super::llm_call::{LlmCaller, Purpose};
use crate::definitions::TemplateService;
use crate::error::{LlmError, PipelineError};
use crate::llm::{LlmService, OutputFormat};
use crate::model::Extracted;
use crate::store::write_set::LlmCallRecord;
use crate::telemetry::metrics;
use crate::template::Compiled;
use crate::template::Context;

/// How much one extraction answer may set (`limits.max_extracted_*`): a schema that allows
/// additional properties must not let a model write without bound into the conversation's data.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_fields: usize,
    pub max_value_bytes: usize,
}

impl Limits {
    pub fn from_config(c: &crate::config::LimitsConfig) -> Limits {
        Limits {
            max_fields: c.max_extracted_fields,
            max_value_bytes: c.max_extracted_value_bytes,
        }
    }

    fn check(&self, map: &Extracted) -> Result<(), LlmError> {
        if map.len() > self.max_fields {
            return Err(LlmError::OutputTooLarge(format!(
                "{} fields, at most {}",
                map.len(),
                self.max_fields
            )));
        }
        for (field, value) in map {
            let size = field.len() + value.to_string().len();
            if size > self.max_value_bytes {
                return Err(LlmError::OutputTooLarge(format!(
                    "field {field:?} takes {size} bytes, at most {}",
                    self.max_value_bytes
                )));
            }
        }
        Ok(())
    }
}

/// Parses and checks an extraction answer; `null` values are dropped (nothing learned).
///
/// # Errors
/// Not a JSON object, a schema violation, or more than `limits` allow.
pub fn parse_output(
    template: &Compiled,
    answer: &str,
    limits: &Limits,
) -> Result<Extracted, LlmError> {
    let value: Value = serde_json::from_str(answer.trim())
        .map_err(|e| LlmError::InvalidOutput(format!("extraction answer is not JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(LlmError::InvalidOutput(
            "extraction answer is not a JSON object".into(),
        ));
    };
    map.retain(|_, v| !v.is_null());
    limits.check(&map)?;
    template
        .validate_output(&Value::Object(map.clone()))
        .map_err(|e| {
            LlmError::InvalidOutput(format!("extraction answer violates the schema: {e}"))
        })?;
    Ok(map)
}

/// Runs extraction; returns the fields learned from this message and the calls' records. An
/// answer that does not parse or validate gets one repair prompt carrying the problem; if that
/// fails too, nothing is learned (the step degrades).
///
/// # Errors
/// Only when the template cannot be rendered (a definition problem).
pub async fn extract<L: LlmService>(
    caller: &LlmCaller<'_, L>,
    templates: &TemplateService,
    template: &Compiled,
    ctx: &Context,
    limits: &Limits,
) -> Result<(Extracted, Vec<LlmCallRecord>), PipelineError> {
    let rendered = templates.render(template, ctx)?;
    let format = OutputFormat::json(
        &template.record.name,
        template
            .record
            .output_schema
            .clone()
            .map(std::sync::Arc::new),
    );
    let (parsed, records) = caller
        .call_parsed(
            Purpose::Extraction,
            template,
            &rendered,
            &format,
            |answer| parse_output(template, answer, limits),
        )
        .await;
    let fields = match parsed {
        Ok(fields) => fields,
        Err(e) => {
            metrics::record_error(&e, "extraction");
            metrics::degraded("extraction");
            Extracted::new()
        }
    };
    Ok((fields, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Classify;

    fn map(pairs: &[(&str, Value)]) -> Extracted {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn an_answer_beyond_the_limits_is_refused_with_its_own_code() {
        let limits = Limits {
            max_fields: 2,
            max_value_bytes: 16,
        };
        let small = map(&[("name", "Ann".into()), ("day", "friday".into())]);
        assert!(limits.check(&small).is_ok());
        let many = map(&[("a", 1.into()), ("b", 2.into()), ("c", 3.into())]);
        let e = limits.check(&many).expect_err("three fields");
        assert_eq!(e.code(), "llm.output_too_large");
        assert!(!e.is_retryable());
        let long = map(&[("note", "x".repeat(100).into())]);
        let e = limits.check(&long).expect_err("a long value");
        assert!(e.to_string().contains("\"note\""), "{e}");
        // Nested values count with their JSON text.
        let nested = map(&[("n", serde_json::json!({"deep": ["x", "y", "z", "w"]}))]);
        assert!(limits.check(&nested).is_err());
    }
}
