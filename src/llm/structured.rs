//! Structured output: how a call that wants JSON asks an endpoint for it, and what an endpoint
//! and model turn out to accept.
//!
//! A call that wants JSON says so with an [`OutputFormat::Json`], optionally with a JSON Schema
//! (extraction: the template's `output_schema`; selection: a schema whose `stage` is an enum of
//! the stages the conversation may be in next). The client asks for it in the strongest form the
//! endpoint and model take, from a ladder of [`Level`]s:
//!
//! 1. `json_schema`: `response_format: {type: "json_schema", json_schema: {name, schema,
//!    strict: true}}` (OpenAI structured outputs, vLLM, Ollama, LiteLLM, llama.cpp's server).
//! 2. `json_object_schema`: `{type: "json_object", schema}` (llama-cpp-python, Together,
//!    Anyscale: decoding constrained by a grammar made from the schema).
//! 3. `json_object`: `{type: "json_object"}` (valid JSON, any shape).
//! 4. `prompt`: no `response_format`; the template's own words ask for the shape.
//!
//! With `structured_output = "auto"` (the default) an endpoint starts at the top, and an
//! answer that refuses the request's `response_format` (an HTTP error, whatever its status but
//! 429, whose body names `response_format`: OpenAI and vLLM answer 400, some servers 422, and
//! llama-cpp-python 500) moves that endpoint and model one step down, remembered for the life
//! of the process and counted (`icmp_llm_structured_output_downgrades_total`); the same call
//! is then sent again at once in the weaker form. A configured level is where an endpoint
//! starts; it still steps down from there when refused. Whatever the level, the answer is
//! checked as before, and the repair turn stays for what still comes back wrong.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;
use serde_json::Value;

/// What a call wants back.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum OutputFormat {
    /// Free text (the response step).
    #[default]
    Text,
    /// A JSON object, of `schema` when there is one. `name` names the schema for the endpoint
    /// (letters, digits, `_` and `-`, at most 64).
    Json {
        name: Arc<str>,
        schema: Option<Arc<Value>>,
    },
}

impl OutputFormat {
    /// JSON of the given schema.
    pub fn json(name: &str, schema: Option<Arc<Value>>) -> OutputFormat {
        OutputFormat::Json {
            name: schema_name(name).into(),
            schema,
        }
    }
}

/// A schema name as endpoints accept it: other characters become `_`, at most 64.
fn schema_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if cleaned.is_empty() {
        "output".to_owned()
    } else {
        cleaned
    }
}

/// How a JSON answer is asked for, strongest first (`llm.structured_output`, and what an
/// endpoint and model were found to accept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Start at the top and step down when refused (configuration only).
    #[default]
    Auto,
    JsonSchema,
    JsonObjectSchema,
    JsonObject,
    Prompt,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Auto => "auto",
            Level::JsonSchema => "json_schema",
            Level::JsonObjectSchema => "json_object_schema",
            Level::JsonObject => "json_object",
            Level::Prompt => "prompt",
        }
    }

    /// The next weaker level (`None` below `prompt`).
    fn weaker(self) -> Option<Level> {
        match self {
            Level::Auto | Level::JsonSchema => Some(Level::JsonObjectSchema),
            Level::JsonObjectSchema => Some(Level::JsonObject),
            Level::JsonObject => Some(Level::Prompt),
            Level::Prompt => None,
        }
    }

    /// The level actually used for `format`: a schema-less request skips the schema levels.
    fn for_format(self, format: &OutputFormat) -> Option<Level> {
        match format {
            OutputFormat::Text => None,
            OutputFormat::Json { schema: None, .. } => Some(match self {
                Level::Prompt => Level::Prompt,
                _ => Level::JsonObject,
            }),
            OutputFormat::Json {
                schema: Some(_), ..
            } => Some(match self {
                Level::Auto => Level::JsonSchema,
                other => other,
            }),
        }
    }
}

/// The `response_format` a request carries, borrowing the format's schema: it is serialized
/// into the request's body, never copied into a value of its own.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat<'a> {
    JsonSchema {
        json_schema: NamedSchema<'a>,
    },
    JsonObject {
        #[serde(skip_serializing_if = "Option::is_none")]
        schema: Option<&'a Value>,
    },
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct NamedSchema<'a> {
    pub name: &'a str,
    pub schema: &'a Value,
    pub strict: bool,
}

/// The `response_format` a request carries at `level` (`None`: none).
pub fn response_format(format: &OutputFormat, level: Option<Level>) -> Option<ResponseFormat<'_>> {
    let OutputFormat::Json { name, schema } = format else {
        return None;
    };
    match (level?, schema) {
        (Level::JsonSchema, Some(schema)) => Some(ResponseFormat::JsonSchema {
            json_schema: NamedSchema {
                name,
                schema,
                strict: true,
            },
        }),
        (Level::JsonObjectSchema, Some(schema)) => Some(ResponseFormat::JsonObject {
            schema: Some(schema),
        }),
        (Level::Prompt, _) => None,
        _ => Some(ResponseFormat::JsonObject { schema: None }),
    }
}

/// Whether an error answer refuses the request's `response_format` (see the module doc).
pub fn refuses_response_format(status: u16, body: &str) -> bool {
    status != 429 && status >= 400 && body.contains("response_format")
}

/// What one endpoint's models accept, learned from their answers.
#[derive(Debug)]
pub struct Learned {
    endpoint: Arc<str>,
    start: Level,
    by_model: Mutex<HashMap<String, Level>>,
}

impl Learned {
    pub fn new(endpoint: Arc<str>, start: Level) -> Learned {
        Learned {
            endpoint,
            start,
            by_model: Mutex::new(HashMap::new()),
        }
    }

    /// The level a call of `model` wanting `format` is sent at (`None`: text).
    pub fn level(&self, model: &str, format: &OutputFormat) -> Option<Level> {
        let known = self
            .by_model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
            .copied();
        known.unwrap_or(self.start).for_format(format)
    }

    /// `model` refused a request sent at `used`: remembers the next weaker level (unless a
    /// concurrent call already moved further) and returns it; `None` when nothing is weaker.
    pub fn refused(&self, model: &str, used: Level) -> Option<Level> {
        let next = used.weaker()?;
        let mut by_model = self.by_model.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = by_model.entry(model.to_owned()).or_insert(Level::Auto);
        if *entry < next {
            *entry = next;
            crate::telemetry::metrics::structured_output_downgrade(
                &self.endpoint,
                model,
                next.as_str(),
            );
            tracing::warn!(
                endpoint = %self.endpoint,
                model,
                refused = used.as_str(),
                now = next.as_str(),
                "the endpoint refused the structured output format; asking in a weaker form"
            );
        }
        Some(next.max(*entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The `response_format` as the request body carries it.
    fn wire(f: &OutputFormat, level: Option<Level>) -> Value {
        serde_json::to_value(response_format(f, level).expect("a format")).expect("serializes")
    }

    fn schema() -> OutputFormat {
        OutputFormat::json("pick stage!", Some(Arc::new(json!({"type": "object"}))))
    }

    #[test]
    fn the_ladder_goes_from_json_schema_to_the_prompt_and_is_remembered_per_model() {
        let learned = Learned::new("e".into(), Level::Auto);
        let f = schema();
        assert_eq!(learned.level("m", &f), Some(Level::JsonSchema));
        let first = wire(&f, learned.level("m", &f));
        assert_eq!(first["type"], "json_schema");
        assert_eq!(first["json_schema"]["name"], "pick_stage_");
        assert_eq!(first["json_schema"]["strict"], true);
        assert_eq!(first["json_schema"]["schema"], json!({"type": "object"}));
        assert_eq!(
            learned.refused("m", Level::JsonSchema),
            Some(Level::JsonObjectSchema)
        );
        assert_eq!(learned.level("m", &f), Some(Level::JsonObjectSchema));
        assert_eq!(
            wire(&f, learned.level("m", &f)),
            json!({"type": "json_object", "schema": {"type": "object"}})
        );
        // Another model of the endpoint is not affected.
        assert_eq!(learned.level("other", &f), Some(Level::JsonSchema));
        // A late refusal of a stronger level does not move the model back up.
        assert_eq!(
            learned.refused("m", Level::JsonObjectSchema),
            Some(Level::JsonObject)
        );
        assert_eq!(
            learned.refused("m", Level::JsonSchema),
            Some(Level::JsonObject)
        );
        assert_eq!(learned.refused("m", Level::JsonObject), Some(Level::Prompt));
        assert_eq!(response_format(&f, learned.level("m", &f)), None);
        assert_eq!(learned.refused("m", Level::Prompt), None);
    }

    #[test]
    fn schema_less_and_text_requests_and_configured_levels() {
        let learned = Learned::new("e".into(), Level::Auto);
        let plain = OutputFormat::json("x", None);
        assert_eq!(learned.level("m", &plain), Some(Level::JsonObject));
        assert_eq!(
            wire(&plain, Some(Level::JsonObject)),
            json!({"type": "json_object"})
        );
        assert_eq!(learned.level("m", &OutputFormat::Text), None);
        assert_eq!(response_format(&OutputFormat::Text, None), None);
        let configured = Learned::new("e".into(), Level::JsonObject);
        assert_eq!(configured.level("m", &schema()), Some(Level::JsonObject));
        let prompt_only = Learned::new("e".into(), Level::Prompt);
        assert_eq!(prompt_only.level("m", &plain), Some(Level::Prompt));
    }

    #[test]
    fn only_an_error_that_names_response_format_is_a_refusal() {
        assert!(refuses_response_format(
            400,
            r#"{"error": {"param": "response_format"}}"#
        ));
        assert!(refuses_response_format(
            500,
            "('body', 'response_format', 'type')"
        ));
        assert!(!refuses_response_format(429, "response_format"));
        assert!(!refuses_response_format(400, "max_tokens is too large"));
        assert!(!refuses_response_format(200, "response_format"));
    }
}
