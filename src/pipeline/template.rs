//! The TemplateService: loads templates (Redis `tmpl:{id}`, else PostgreSQL), compiles them
//! with `upon` once per (id, version) and renders them against a [`Context`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::context::Context;
use crate::cache::{self, Cache};
use crate::error::{PipelineError, TemplateError};
use crate::model::TemplateRecord;
use crate::store::Store;
use crate::telemetry::metrics;

/// A compiled template with its record.
pub struct Compiled {
    pub record: TemplateRecord,
    system: upon::Template<'static>,
    body: upon::Template<'static>,
    schema: Option<jsonschema::Validator>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// A rendered template: the system prompt and the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub system: String,
    pub body: String,
}

impl Compiled {
    /// Checks `value` against the template's output schema (extraction templates).
    ///
    /// # Errors
    /// The schema violations, joined.
    pub fn validate_output(&self, value: &serde_json::Value) -> Result<(), String> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        let errors: Vec<String> = schema.iter_errors(value).map(|e| e.to_string()).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

fn pretty(e: &upon::Error, name: &str, part: &str) -> String {
    format!("{e:#}").replace("<anonymous>", &format!("{name}.{part}"))
}

/// The engine every template is compiled and rendered with.
pub fn engine() -> upon::Engine<'static> {
    let mut engine = upon::Engine::new();
    // Objects and lists render as JSON instead of failing, so `{{ extracted }}` works.
    engine.set_default_formatter(&format_value);
    engine
}

fn format_value(f: &mut upon::fmt::Formatter<'_>, v: &upon::Value) -> upon::fmt::Result {
    match v {
        upon::Value::Map(_) | upon::Value::List(_) => {
            let json =
                serde_json::to_string(v).map_err(|e| upon::fmt::Error::from(e.to_string()))?;
            std::fmt::Write::write_str(f, &json)?;
            Ok(())
        }
        other => upon::fmt::default(f, other),
    }
}

/// Compiles a template record.
///
/// # Errors
/// A syntax error (naming the template, part and line) or an invalid output schema.
pub fn compile(
    engine: &upon::Engine<'static>,
    record: TemplateRecord,
) -> Result<Compiled, TemplateError> {
    let system = engine
        .compile(record.system.clone())
        .map_err(|e| TemplateError::Compile {
            name: record.name.clone(),
            detail: pretty(&e, &record.name, "system"),
        })?;
    let body = engine
        .compile(record.body.clone())
        .map_err(|e| TemplateError::Compile {
            name: record.name.clone(),
            detail: pretty(&e, &record.name, "body"),
        })?;
    let schema = match &record.output_schema {
        Some(s) => Some(
            jsonschema::validator_for(s).map_err(|e| TemplateError::Invalid {
                name: record.name.clone(),
                detail: format!("output_schema: {e}"),
            })?,
        ),
        None => None,
    };
    Ok(Compiled {
        record,
        system,
        body,
        schema,
    })
}

/// Renders a compiled template.
///
/// # Errors
/// An unknown variable or a value that cannot be formatted, naming the template and line.
pub fn render(
    engine: &upon::Engine<'static>,
    t: &Compiled,
    ctx: &Context,
) -> Result<Rendered, TemplateError> {
    let name = &t.record.name;
    let system = t
        .system
        .render(engine, ctx)
        .to_string()
        .map_err(|e| TemplateError::Render {
            name: name.clone(),
            detail: pretty(&e, name, "system"),
        })?;
    let body = t
        .body
        .render(engine, ctx)
        .to_string()
        .map_err(|e| TemplateError::Render {
            name: name.clone(),
            detail: pretty(&e, name, "body"),
        })?;
    Ok(Rendered { system, body })
}

/// Loads, compiles and renders templates; keeps compiled templates in-process per version.
pub struct TemplateService {
    store: Store,
    cache: Cache,
    engine: upon::Engine<'static>,
    compiled: Mutex<HashMap<Uuid, Arc<Compiled>>>,
}

impl std::fmt::Debug for TemplateService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateService").finish_non_exhaustive()
    }
}

impl TemplateService {
    pub fn new(store: Store, cache: Cache) -> Self {
        TemplateService {
            store,
            cache,
            engine: engine(),
            compiled: Mutex::new(HashMap::new()),
        }
    }

    /// The current version of a template of this business, compiled.
    ///
    /// The record comes from Redis (`tmpl:{id}`, TTL `cache.definition_ttl_secs`, cleared by
    /// `icmp import`) or PostgreSQL; the compiled form is reused while the version matches.
    pub async fn get(&self, business_id: Uuid, id: Uuid) -> Result<Arc<Compiled>, PipelineError> {
        let record = cache::observed("template", self.cache.get_template(id).await)
            .filter(|r| r.business_id == business_id);
        let record = match record {
            Some(r) => r,
            None => {
                let r = self
                    .store
                    .load_template(business_id, id)
                    .await?
                    .ok_or_else(|| PipelineError::Definition(format!("template {id} not found")))?;
                if let Err(e) = self.cache.set_template(&r).await {
                    metrics::record_error(&e, "template cache");
                }
                r
            }
        };
        if let Some(c) = self.lookup(id).filter(|c| c.record == record) {
            return Ok(c);
        }
        let compiled = Arc::new(compile(&self.engine, record)?);
        if let Ok(mut map) = self.compiled.lock() {
            map.insert(id, compiled.clone());
        }
        Ok(compiled)
    }

    fn lookup(&self, id: Uuid) -> Option<Arc<Compiled>> {
        self.compiled.lock().ok().and_then(|m| m.get(&id).cloned())
    }

    /// Renders `t` against `ctx`.
    pub fn render(&self, t: &Compiled, ctx: &Context) -> Result<Rendered, TemplateError> {
        render(&self.engine, t, ctx)
    }
}
