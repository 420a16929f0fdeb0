//! Templates and their context, shared by business definitions (checked at import) and the
//! pipeline (rendered per message): the `upon` engine, compiling a template record once, and
//! rendering it against a [`Context`]. User content only ever enters as context data, never as
//! template source. Knows no store, cache or pipeline step.

pub mod context;
pub mod variables;

use std::sync::Arc;

use crate::error::TemplateError;
use crate::model::TemplateRecord;
pub use context::Context;

/// A response template's record, version 1, for unit tests.
#[cfg(test)]
pub(crate) fn test_record(
    id: uuid::Uuid,
    business_id: uuid::Uuid,
    system: &str,
    body: &str,
) -> TemplateRecord {
    TemplateRecord {
        id,
        business_id,
        name: "reply".into(),
        kind: crate::model::TemplateKind::Response,
        system: system.into(),
        body: body.into(),
        model: None,
        models: Vec::new(),
        context_tokens: None,
        temperature: None,
        max_tokens: None,
        output_schema: None,
        version: 1,
    }
}

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

/// A rendered template: the system prompt and the body, shared with the LLM request that
/// carries them (a prompt is not copied per call).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub system: Arc<str>,
    pub body: Arc<str>,
}

impl Compiled {
    /// Checks `value` against the template's output schema (extraction templates).
    ///
    /// # Errors
    /// The schema violations, joined: the location in the value and the schema rule that
    /// failed, without the value itself.
    pub fn validate_output(&self, value: &serde_json::Value) -> Result<(), String> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        // Where and which rule failed, never the offending value: these texts reach the logs,
        // and the values are user data.
        let errors: Vec<String> = schema
            .iter_errors(value)
            .map(|e| {
                let at = e.instance_path().to_string();
                let at = if at.is_empty() { "/".to_owned() } else { at };
                format!("{at} fails {}", e.schema_path())
            })
            .collect();
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
    // `{{ extracted.name | json }}`: the value as JSON (a quoted, escaped string; `null`), for
    // templates that render JSON (an action's body).
    engine.add_formatter("json", |f, v| {
        let json = serde_json::to_string(v).map_err(|e| upon::fmt::Error::from(e.to_string()))?;
        std::fmt::Write::write_str(f, &json)?;
        Ok(())
    });
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
    render_keeping(engine, t, ctx, None)
}

/// Renders a compiled template with only the newest `keep` turns of the history (`None`: all).
///
/// # Errors
/// As [`render`].
pub fn render_keeping(
    engine: &upon::Engine<'static>,
    t: &Compiled,
    ctx: &Context,
    keep: Option<usize>,
) -> Result<Rendered, TemplateError> {
    let name = &t.record.name;
    // Each variable a template names is converted when it is looked up, from the context's own
    // fields: not the whole context (the history, the stages, the actions) once per render.
    let older = keep.map_or(0, |keep| ctx.history.len().saturating_sub(keep));
    let render = |part: &upon::Template<'static>, which: &str| {
        part.render_from_fn(engine, |path| context::lookup(ctx, path, older))
            .to_string()
            .map_err(|e| TemplateError::Render {
                name: name.clone(),
                detail: pretty(&e, name, which),
            })
    };
    let system = render(&t.system, "system")?;
    let body = render(&t.body, "body")?;
    Ok(Rendered {
        system: system.into(),
        body: body.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TemplateKind;

    #[test]
    fn looking_variables_up_renders_as_the_whole_converted_context_did() {
        let ctx = Context::sample(
            "Clinic",
            &[
                context::StageVars {
                    name: "welcome".into(),
                    description: "hello".into(),
                },
                context::StageVars {
                    name: "booking".into(),
                    description: "book".into(),
                },
            ],
            &["name".to_owned()],
        );
        let whole = upon::to_value(&ctx).expect("converts");
        let sources = [
            "{{ business.name }} {{ user.id }} {{ conversation.turns }} {{ stage.name }} {{ now }}",
            "{% for s in stages %}{{ loop.index }}:{{ s.name }} {% endfor %}{{ stages.1.name }}",
            "{% for turn in history %}[{{ turn.role }}: {{ turn.content }}]{% endfor %}",
            "{{ extracted.name }} {{ extracted }} {{ summary }} {{ message.content }}",
            "{% if extracted.name %}yes{% else %}no{% endif %} {{ actions }} {{ message.metadata }}",
            "{{ extracted?.missing?.deeper }}|{{ stages?.9 }}|{{ history.0.content | json }}",
            "{{ extracted.missing }}",
            "{{ stages.9.name }}",
            "{{ nothing }}",
            "{{ business.name.first }}",
            "{{ summary.0 }}",
        ];
        for source in sources {
            let mut e = engine();
            e.add_template("t", source).expect("compiles");
            let template = e.get_template("t").expect("template");
            let old = template.render_from(&whole).to_string();
            let new = template
                .render_from_fn(|path| context::lookup(&ctx, path, 0))
                .to_string();
            match (old, new) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{source}"),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("{source}: {a:?} against {b:?}"),
            }
        }
        // The oldest turns left out.
        let mut e = engine();
        e.add_template(
            "h",
            "{% for turn in history %}[{{ turn.content }}]{% endfor %}",
        )
        .expect("compiles");
        let last = &ctx.history[ctx.history.len() - 1].content;
        let out = e
            .get_template("h")
            .expect("template")
            .render_from_fn(|path| context::lookup(&ctx, path, ctx.history.len() - 1))
            .to_string()
            .expect("renders");
        assert_eq!(out, format!("[{last}]"));
    }

    #[test]
    fn schema_violations_name_the_place_and_rule_but_not_the_value() {
        let record = TemplateRecord {
            id: uuid::Uuid::nil(),
            business_id: uuid::Uuid::nil(),
            name: "extract".into(),
            kind: TemplateKind::Extraction,
            system: String::new(),
            body: "x".into(),
            model: None,
            models: Vec::new(),
            context_tokens: None,
            temperature: None,
            max_tokens: None,
            output_schema: Some(serde_json::json!({
                "type": "object",
                "properties": {"age": {"type": "integer"}}
            })),
            version: 1,
        };
        let compiled = compile(&engine(), record).expect("compile");
        let err = compiled
            .validate_output(&serde_json::json!({"age": "Walter White, 555-0100"}))
            .expect_err("invalid");
        assert!(err.contains("/age"), "{err}");
        assert!(!err.contains("Walter"), "the value leaked: {err}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn template(body: &str) -> Compiled {
            let nil = uuid::Uuid::nil();
            let record = test_record(nil, nil, "System for {{ business.name }}", body);
            compile(&engine(), record).expect("compile")
        }

        proptest! {
            /// Whatever a user writes (template syntax included) is data: it is rendered
            /// verbatim where the template puts it, and never changes the rest.
            #[test]
            fn user_content_is_rendered_verbatim_and_never_run(
                content in any::<String>(),
                history in proptest::collection::vec(any::<String>(), 0..4),
                field in any::<String>(),
            ) {
                let t = template(
                    "<{{ message.content }}>{% for turn in history %}[{{ turn.content }}]{% endfor %}({{ extracted.note }})",
                );
                let mut ctx = Context::sample("Clinic", &[], &[]);
                ctx.message.content = content.clone();
                ctx.history = history
                    .iter()
                    .map(|c| crate::model::Turn {
                        role: crate::model::Role::User,
                        content: c.clone(),
                    })
                    .collect();
                ctx.extracted.insert("note".into(), serde_json::Value::String(field.clone()));
                let r = render(&engine(), &t, &ctx).expect("renders");
                let turns: String = history.iter().map(|h| format!("[{h}]")).collect();
                prop_assert_eq!(r.body.to_string(), format!("<{content}>{turns}({field})"));
                prop_assert_eq!(&*r.system, "System for Clinic");
            }

            /// Any template source compiles or fails with a named error; never a panic.
            #[test]
            fn any_template_source_compiles_or_is_refused_by_name(body in any::<String>()) {
                let record = TemplateRecord {
                    name: "fuzz".into(),
                    ..test_record(uuid::Uuid::nil(), uuid::Uuid::nil(), "", &body)
                };
                if let Err(e) = compile(&engine(), record) {
                    prop_assert!(e.to_string().contains("fuzz"), "{}", e);
                }
            }
        }
    }
}
