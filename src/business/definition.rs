//! The business definition file (TOML): a business, its stages and templates.
//!
//! ```toml
//! [business]
//! id = "…uuid…"
//! name = "Sunny Dental"
//! initial_stage = "welcome"
//!
//! [business.burst]                       # optional
//! policy = "coalesce"                    # queue (default) | coalesce
//! window_ms = 1500
//!
//! [business.budget]                      # optional; every key optional
//! messages_per_minute = 600
//! tokens_per_day = 2000000
//! max_in_flight = 64
//! throttled_template = "throttled"       # a fallback template
//!
//! [business.retention]                   # optional; absent: kept for ever
//! messages_days = 365                    # messages, their LLM calls and transitions
//! llm_prompts_days = 30                  # prompts and outputs blanked earlier
//! dead_letters_days = 14
//!
//! [[stages]]
//! name = "welcome"
//! description = "…"
//! selection_template = "select_stage"   # optional
//! extraction_template = "extract_booking" # optional
//! response_template = "welcome_reply"
//! fallback_template = "fallback"         # optional
//!
//! [[templates]]
//! name = "welcome_reply"
//! kind = "response"        # selection | extraction | response | fallback
//! system = "…"             # optional, a template too
//! body = "…"
//! model = "gpt-4o-mini"    # optional; temperature, max_tokens too
//! output_schema = { … }    # extraction templates: JSON Schema of the output
//! ```
//!
//! [`Definition::load`] rejects a file unless every reference resolves, every variable of every
//! template (in every branch) exists in the context, every template compiles with `upon` and
//! renders against a sample context, and every output schema is a valid JSON Schema.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;
use uuid::Uuid;

use crate::model::{
    Budget, Burst, DefinitionRecord, Policy, StageDefinition, TemplateKind, TemplateRecord,
};
use crate::template::{self, Context, context::StageVars};

/// The longest a coalescing head may wait for more messages of its user.
pub const MAX_BURST_WINDOW_MS: u32 = 10_000;

/// Why a definition file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid TOML: {0}")]
    Toml(String),
    #[error("{} problem(s):\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl crate::error::Classify for DefinitionError {
    fn code(&self) -> &'static str {
        match self {
            DefinitionError::Io(_) => "definition.unreadable",
            DefinitionError::Toml(_) => "definition.toml",
            DefinitionError::Invalid(_) => "definition.invalid",
        }
    }
    fn category(&self) -> crate::error::Category {
        crate::error::Category::Validation
    }
    fn status_code(&self) -> u16 {
        match self {
            DefinitionError::Io(_) => 500,
            DefinitionError::Toml(_) | DefinitionError::Invalid(_) => 422,
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            DefinitionError::Io(_) | DefinitionError::Toml(_) | DefinitionError::Invalid(_) => {
                false
            }
        }
    }
}

/// A whole definition file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub business: BusinessDef,
    pub stages: Vec<StageDef>,
    pub templates: Vec<TemplateDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusinessDef {
    pub id: Uuid,
    pub name: String,
    pub initial_stage: String,
    /// `[business.burst]`: `policy = "queue" | "coalesce"`, `window_ms`.
    #[serde(default)]
    pub burst: Burst,
    /// `[business.budget]`: `messages_per_minute`, `tokens_per_day`, `max_in_flight`,
    /// `throttled_template`.
    #[serde(default)]
    pub budget: Budget,
    /// `[business.replies]`: `stream`.
    #[serde(default)]
    pub replies: crate::model::Replies,
    /// `[business.history]`: `summary_template`, `summarize_after_tokens`, `keep_turns`.
    #[serde(default)]
    pub history: crate::model::History,
    /// `[business.handoff]`: what users are told while a person has their conversation.
    #[serde(default)]
    pub handoff: crate::model::HandoffPolicy,
    /// `[business.actions]`: `secret_env`.
    #[serde(default)]
    pub actions: crate::model::Actions,
    /// `[business.retention]`: `messages_days`, `llm_prompts_days`, `dead_letters_days`.
    #[serde(default)]
    pub retention: crate::model::Retention,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageDef {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub selection_template: Option<String>,
    pub extraction_template: Option<String>,
    pub response_template: String,
    pub fallback_template: Option<String>,
    /// The stages selection may move a conversation to from this one (absent: any stage).
    /// A selection naming another stage keeps the current one
    /// (`validation.stage_transition`), whatever the user wrote.
    #[serde(default)]
    pub transitions: Option<Vec<String>>,
    /// `[[stages.actions]]`: webhooks the stage fires.
    #[serde(default)]
    pub actions: Vec<crate::model::ActionDef>,
    /// A conversation entering this stage is handed to a person.
    #[serde(default)]
    pub handoff: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateDef {
    pub name: String,
    pub kind: TemplateKind,
    #[serde(default)]
    pub system: String,
    pub body: String,
    pub model: Option<String>,
    /// The models a call tries in order (instead of `model`).
    #[serde(default)]
    pub models: Vec<String>,
    /// The most tokens the history may take in the prompt.
    pub context_tokens: Option<i32>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<i32>,
    pub output_schema: Option<serde_json::Value>,
}

impl TemplateDef {
    /// The record this definition stores, as version 1 under `id`.
    pub fn to_record(&self, id: Uuid, business_id: Uuid) -> TemplateRecord {
        TemplateRecord {
            id,
            business_id,
            name: self.name.clone(),
            kind: self.kind,
            system: self.system.clone(),
            body: self.body.clone(),
            model: self.model.clone().or_else(|| self.models.first().cloned()),
            models: self.models.clone(),
            context_tokens: self.context_tokens,
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            output_schema: self.output_schema.clone(),
            version: 1,
        }
    }
}

impl Definition {
    /// The records the store writes.
    pub fn to_records(&self) -> DefinitionRecord {
        DefinitionRecord {
            business_id: self.business.id,
            name: self.business.name.clone(),
            initial_stage: self.business.initial_stage.clone(),
            policy: Policy {
                burst: self.business.burst,
                budget: self.business.budget.clone(),
                replies: self.business.replies,
                history: self.business.history.clone(),
                actions: self.business.actions.clone(),
                handoff: self.business.handoff.clone(),
                retention: self.business.retention,
            },
            stages: self
                .stages
                .iter()
                .map(|s| StageDefinition {
                    name: s.name.clone(),
                    description: s.description.clone(),
                    selection_template: s.selection_template.clone(),
                    extraction_template: s.extraction_template.clone(),
                    response_template: s.response_template.clone(),
                    fallback_template: s.fallback_template.clone(),
                    transitions: s.transitions.clone(),
                    actions: s.actions.clone(),
                    handoff: s.handoff,
                })
                .collect(),
            templates: self
                .templates
                .iter()
                .map(|t| t.to_record(Uuid::nil(), self.business.id))
                .collect(),
        }
    }

    /// Reads and validates a file.
    ///
    /// # Errors
    /// Unreadable file, invalid TOML, or every problem found by [`Definition::validate`].
    pub fn load(path: &Path) -> Result<Definition, DefinitionError> {
        let text = std::fs::read_to_string(path)?;
        Definition::parse(&text)
    }

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// As [`Definition::load`].
    pub fn parse(text: &str) -> Result<Definition, DefinitionError> {
        let def: Definition =
            toml::from_str(text).map_err(|e| DefinitionError::Toml(e.to_string()))?;
        def.validate()?;
        Ok(def)
    }

    /// Field names declared by the extraction templates' schemas.
    pub fn extraction_fields(&self) -> Vec<String> {
        let mut fields: Vec<String> = self
            .templates
            .iter()
            .filter(|t| t.kind == TemplateKind::Extraction)
            .filter_map(|t| t.output_schema.as_ref()?.get("properties")?.as_object())
            .flat_map(|p| p.keys().cloned())
            .collect();
        fields.sort();
        fields.dedup();
        fields
    }

    /// The burst window and the budgets: within bounds, the throttled template a fallback one.
    fn policy_problems(&self, templates: &HashMap<&str, &TemplateDef>) -> Vec<String> {
        let mut problems = Vec::new();
        let (burst, budget) = (&self.business.burst, &self.business.budget);
        if burst.window_ms > MAX_BURST_WINDOW_MS {
            problems.push(format!(
                "burst.window_ms {} is above the maximum of {MAX_BURST_WINDOW_MS}",
                burst.window_ms
            ));
        }
        if budget.messages_per_minute == Some(0) {
            problems.push("budget.messages_per_minute must be at least 1".into());
        }
        if budget.tokens_per_day == Some(0) {
            problems.push("budget.tokens_per_day must be at least 1".into());
        }
        if budget.max_in_flight == Some(0) {
            problems.push("budget.max_in_flight must be at least 1".into());
        }
        problems.extend(self.business.retention.problems());
        let history = &self.business.history;
        if let Some(name) = &history.summary_template {
            match templates.get(name.as_str()) {
                None => problems.push(format!("history.summary_template: unknown template `{name}`")),
                Some(t) if t.kind != TemplateKind::Summary => problems.push(format!(
                    "history.summary_template: template `{name}` is a {} template, expected summary",
                    t.kind.as_str()
                )),
                Some(_) => {}
            }
            if history.summarize_after_tokens == 0 {
                problems.push("history.summarize_after_tokens must be at least 1".into());
            }
        }
        if let Some(name) = &budget.throttled_template {
            match templates.get(name.as_str()) {
                None => problems.push(format!("budget.throttled_template: unknown template `{name}`")),
                Some(t) if t.kind != TemplateKind::Fallback => problems.push(format!(
                    "budget.throttled_template: template `{name}` is a {} template, expected fallback",
                    t.kind.as_str()
                )),
                Some(_) => {}
            }
        }
        problems
    }

    /// Checks references, kinds, schemas and every template against a sample context.
    ///
    /// # Errors
    /// All problems found, each naming the stage or template concerned.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        let mut problems = Vec::new();
        let templates = self.template_problems(&mut problems);
        let stage_names = self.stage_problems(&templates, &mut problems);
        problems.extend(self.policy_problems(&templates));
        if !stage_names.contains(self.business.initial_stage.as_str()) {
            problems.push(format!(
                "initial_stage `{}` is not a stage",
                self.business.initial_stage
            ));
        }
        self.render_problems(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DefinitionError::Invalid(problems))
        }
    }

    /// The templates by name; names defined twice, empty names and misplaced or missing
    /// output schemas go to `problems`.
    fn template_problems(&self, problems: &mut Vec<String>) -> HashMap<&str, &TemplateDef> {
        let mut templates: HashMap<&str, &TemplateDef> = HashMap::new();
        for t in &self.templates {
            if templates.insert(t.name.as_str(), t).is_some() {
                problems.push(format!("template `{}` is defined twice", t.name));
            }
            if t.name.trim().is_empty() {
                problems.push("a template has an empty name".into());
            }
            if t.model.is_some() && !t.models.is_empty() {
                problems.push(format!(
                    "template `{}`: give model or models, not both",
                    t.name
                ));
            }
            if t.context_tokens.is_some_and(|n| n < 0) {
                problems.push(format!(
                    "template `{}`: context_tokens cannot be negative",
                    t.name
                ));
            }
            if t.models.iter().any(|m| m.trim().is_empty()) {
                problems.push(format!("template `{}`: models has an empty name", t.name));
            }
            match (t.kind, &t.output_schema) {
                (TemplateKind::Extraction, None) => {
                    problems.push(format!(
                        "extraction template `{}` needs an output_schema",
                        t.name
                    ));
                }
                (TemplateKind::Extraction, Some(_)) | (_, None) => {}
                (_, Some(_)) => problems.push(format!(
                    "template `{}`: output_schema is only for extraction templates",
                    t.name
                )),
            }
        }
        templates
    }

    /// The stage names; stages defined twice, template references of the wrong kind or to
    /// nothing, transitions to unknown stages and a business without stages go to `problems`.
    fn stage_problems(
        &self,
        templates: &HashMap<&str, &TemplateDef>,
        problems: &mut Vec<String>,
    ) -> HashSet<&str> {
        let mut stage_names = HashSet::new();
        for s in &self.stages {
            if !stage_names.insert(s.name.as_str()) {
                problems.push(format!("stage `{}` is defined twice", s.name));
            }
            let refs = [
                (&s.selection_template, TemplateKind::Selection),
                (&s.extraction_template, TemplateKind::Extraction),
                (&Some(s.response_template.clone()), TemplateKind::Response),
                (&s.fallback_template, TemplateKind::Fallback),
            ];
            for (name, kind) in refs {
                let Some(name) = name else { continue };
                match templates.get(name.as_str()) {
                    None => problems.push(format!("stage `{}`: unknown template `{name}`", s.name)),
                    Some(t) if t.kind != kind => problems.push(format!(
                        "stage `{}`: template `{name}` is a {} template, expected {}",
                        s.name,
                        t.kind.as_str(),
                        kind.as_str()
                    )),
                    Some(_) => {}
                }
            }
        }
        for s in &self.stages {
            for to in s.transitions.iter().flatten() {
                if !stage_names.contains(to.as_str()) {
                    problems.push(format!(
                        "stage `{}`: transitions names an unknown stage `{to}`",
                        s.name
                    ));
                }
            }
        }
        if self.stages.is_empty() {
            problems.push("a business needs at least one stage".into());
        }
        stage_names
    }

    /// Every variable of every template branch checked against the context's shape, and
    /// every template compiled and rendered against a sample context; what fails goes to
    /// `problems`.
    /// Actions: unique names, one URL (`url` or `url_env`, http or https, no credentials in it),
    /// the fields `fields_complete` waits for declared by an extraction schema, sane limits, a
    /// signing secret, and a body whose every variable exists and that renders to JSON.
    fn action_problems(
        &self,
        engine: &upon::Engine<'static>,
        sample: &Context,
        problems: &mut Vec<String>,
    ) {
        let declared = self.extraction_fields();
        let shape = serde_json::to_value(sample).unwrap_or_default();
        let mut names = HashSet::new();
        for stage in &self.stages {
            for a in &stage.actions {
                let at = format!("stage `{}` action `{}`", stage.name, a.name);
                if a.name.trim().is_empty() {
                    problems.push(format!(
                        "stage `{}`: an action has an empty name",
                        stage.name
                    ));
                }
                if !names.insert(a.name.as_str()) {
                    problems.push(format!("{at}: action names must be unique in the business"));
                }
                match (&a.url, &a.url_env) {
                    (Some(url), None) => {
                        if !(url.starts_with("http://") || url.starts_with("https://"))
                            || reqwest::Url::parse(url).is_err()
                        {
                            problems.push(format!("{at}: url is not an http(s) URL"));
                        } else if crate::config::RedactedUrl::new(url.clone()).has_secret() {
                            problems.push(format!(
                                "{at}: url carries a secret; name its variable in url_env"
                            ));
                        }
                    }
                    (None, Some(var)) if !var.trim().is_empty() => {}
                    _ => problems.push(format!("{at}: give url or url_env, one of them")),
                }
                if a.on == crate::model::ActionTrigger::FieldsComplete && a.fields.is_empty() {
                    problems.push(format!("{at}: on = \"fields_complete\" needs fields"));
                }
                for f in &a.fields {
                    if !declared.contains(f) {
                        problems.push(format!(
                            "{at}: field `{f}` is not declared by any extraction schema"
                        ));
                    }
                }
                if a.timeout_ms == 0 || a.timeout_ms > 60_000 {
                    problems.push(format!("{at}: timeout_ms must be 1 to 60000"));
                }
                if a.max_attempts == 0 || a.max_attempts > 100 {
                    problems.push(format!("{at}: max_attempts must be 1 to 100"));
                }
                for h in &a.handoff_on {
                    if !["delivered", "rejected", "dead"].contains(&h.as_str()) {
                        problems.push(format!(
                            "{at}: handoff_on takes delivered, rejected and dead, not `{h}`"
                        ));
                    }
                }
                for u in template::variables::unknown_variables(&a.body, &shape) {
                    problems.push(format!(
                        "{at} body line {}: unknown variable `{}`",
                        u.line, u.path
                    ));
                }
                let request = match crate::actions::render_body(engine, &a.body, sample) {
                    Ok(body) => body,
                    Err(e) => {
                        problems.push(format!("{at}: {e}"));
                        serde_json::Value::Null
                    }
                };
                if let Some(source) = &a.follow_up {
                    follow_up_problems(engine, &at, a, source, &request, problems);
                }
            }
        }
        if !names.is_empty() && self.business.actions.secret_env.is_none() {
            problems.push(
                "stages have actions: [business.actions] secret_env must name the variable \
                 holding their signing key"
                    .into(),
            );
        }
    }

    /// `[business.handoff]`: `reply` checked against the message context (every variable, in
    /// every branch, and a render), `timeout_reply` against the timeout's; a timeout needs a
    /// reply, and a handoff stage needs none of this (an empty reply is a choice).
    fn handoff_problems(
        &self,
        engine: &upon::Engine<'static>,
        sample: &Context,
        problems: &mut Vec<String>,
    ) {
        let h = &self.business.handoff;
        let business = crate::model::Business {
            id: self.business.id,
            name: self.business.name.clone(),
            ..Default::default()
        };
        let state = crate::model::HandoffState::starting("sample".into(), None, h.timeout_ms);
        let timeout =
            crate::handoff::TimeoutContext::new(&business, "sample-user", Uuid::nil(), &state);
        let checks: [(&str, &str, serde_json::Value); 2] = [
            (
                "reply",
                &h.reply,
                serde_json::to_value(sample).unwrap_or_default(),
            ),
            (
                "timeout_reply",
                &h.timeout_reply,
                serde_json::to_value(&timeout).unwrap_or_default(),
            ),
        ];
        for (key, source, shape) in checks {
            for u in template::variables::unknown_variables(source, &shape) {
                problems.push(format!(
                    "[business.handoff] {key} line {}: unknown variable `{}`",
                    u.line, u.path
                ));
            }
            if let Err(e) = crate::handoff::render(engine, source, &shape) {
                problems.push(format!("[business.handoff] {key}: {e}"));
            }
        }
        if h.timeout_ms > 0 && h.timeout_reply.trim().is_empty() {
            problems.push("[business.handoff] timeout_ms needs a timeout_reply".into());
        }
    }

    fn render_problems(&self, problems: &mut Vec<String>) {
        let stages: Vec<StageVars> = self
            .stages
            .iter()
            .map(|s| StageVars {
                name: s.name.clone(),
                description: s.description.clone(),
            })
            .collect();
        let mut sample = Context::sample(&self.business.name, &stages, &self.extraction_fields());
        sample.actions = crate::actions::sample_results(
            self.stages
                .iter()
                .flat_map(|s| &s.actions)
                .map(|a| a.name.as_str()),
        );
        match serde_json::to_value(&sample) {
            Ok(shape) => {
                for t in &self.templates {
                    for (part, source) in [("system", &t.system), ("body", &t.body)] {
                        for u in template::variables::unknown_variables(source, &shape) {
                            problems.push(format!(
                                "template `{}` {part} line {}: unknown variable `{}`",
                                t.name, u.line, u.path
                            ));
                        }
                    }
                }
            }
            Err(e) => problems.push(format!("the sample context does not serialise: {e}")),
        }
        let engine = template::engine();
        self.action_problems(&engine, &sample, problems);
        self.handoff_problems(&engine, &sample, problems);
        for t in &self.templates {
            let record = t.to_record(Uuid::nil(), self.business.id);
            match template::compile(&engine, record) {
                Ok(compiled) => {
                    if let Err(e) = template::render(&engine, &compiled, &sample) {
                        problems.push(e.to_string());
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
}

/// A follow-up's variables checked in every branch, and the template rendered against the
/// action's sample result.
fn follow_up_problems(
    engine: &upon::Engine<'static>,
    at: &str,
    a: &crate::model::ActionDef,
    source: &str,
    request: &serde_json::Value,
    problems: &mut Vec<String>,
) {
    let result = crate::actions::sample_results([a.name.as_str()])
        .remove(&a.name)
        .unwrap_or_default();
    let ctx = crate::actions::FollowUpContext {
        action: &a.name,
        request,
        result: &result,
    };
    let shape = serde_json::to_value(&ctx).unwrap_or_default();
    for u in template::variables::unknown_variables(source, &shape) {
        problems.push(format!(
            "{at} follow_up line {}: unknown variable `{}`",
            u.line, u.path
        ));
    }
    if let Err(e) = crate::actions::render_follow_up(engine, source, &ctx) {
        problems.push(format!("{at} follow_up: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Classify;
    use proptest::prelude::*;

    const DEMO: &str = include_str!("../../config/businesses/demo.toml");

    /// The demo definition with one edit: a stretch replaced by arbitrary text (template
    /// syntax, TOML punctuation, unicode), as a careless editor would leave it.
    fn edited_demo() -> impl Strategy<Value = String> {
        let len = DEMO.len();
        (0..len, 0..64usize, any::<String>()).prop_map(move |(at, cut, insert)| {
            let mut at = at;
            while !DEMO.is_char_boundary(at) {
                at -= 1;
            }
            let mut end = (at + cut).min(len);
            while !DEMO.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}{}{}", &DEMO[..at], insert, &DEMO[end..])
        })
    }

    #[test]
    fn the_demo_definition_is_valid() {
        assert!(Definition::parse(DEMO).is_ok());
    }

    /// The demo with an action on its booking stage (`action`: its keys) and `[business.actions]`
    /// when `secret` is given.
    fn with_action(action: &str, secret: bool) -> String {
        let mut text = DEMO.replacen(
            "transitions = [\"farewell\", \"welcome\"]\n",
            &format!(
                "transitions = [\"farewell\", \"welcome\"]\n\n[[stages.actions]]\nname = \"book\"\n{action}"
            ),
            1,
        );
        if secret {
            text = text.replacen(
                "initial_stage = \"welcome\"\n",
                "initial_stage = \"welcome\"\n\n[business.actions]\nsecret_env = \"S\"\n",
                1,
            );
        }
        text
    }

    fn problems(text: &str) -> String {
        match Definition::parse(text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_handoff_text_is_checked_at_import_against_what_it_sees() {
        let with = |keys: &str| {
            DEMO.replacen(
                "initial_stage = \"welcome\"\n",
                &format!("initial_stage = \"welcome\"\n\n[business.handoff]\n{keys}"),
                1,
            )
        };
        let good = "reply = \"{{ business.name }} has your message, {{ user.id }}.\"\n\
                    timeout_ms = 60000\n\
                    timeout_reply = \"Nobody at {{ business.name }} is free since {{ handoff.since }}.\"\n";
        assert_eq!(problems(&with(good)), "");
        for (keys, expected) in [
            (
                "reply = \"Hi {{ user.nmae }}\"\n",
                "[business.handoff] reply line 1: unknown variable `user.nmae`",
            ),
            (
                "timeout_ms = 1000\n",
                "[business.handoff] timeout_ms needs a timeout_reply",
            ),
            (
                "timeout_ms = 1000\ntimeout_reply = \"You said {{ message.content }}\"\n",
                "[business.handoff] timeout_reply line 1: unknown variable `message.content`",
            ),
        ] {
            let found = problems(&with(keys));
            assert!(found.contains(expected), "{expected}: {found}");
        }
    }

    #[test]
    fn an_action_is_checked_at_import_in_every_part() {
        let good = "on = \"fields_complete\"\nfields = [\"name\", \"date\"]\nurl = \"https://example.com/book\"\n\
                    body = \"\"\"{\"name\": {{ extracted.name | json }} }\"\"\"\n";
        assert_eq!(problems(&with_action(good, true)), "");
        assert!(problems(&with_action(good, false)).contains("secret_env must name"));
        let cases = [
            (
                good.replace("url = \"https://example.com/book\"\n", ""),
                "give url or url_env",
            ),
            (
                good.replace(
                    "https://example.com/book",
                    "https://user:pw@example.com/book",
                ),
                "url carries a secret",
            ),
            (
                good.replace("ftp://", "").replace("https://", "ftp://"),
                "not an http(s) URL",
            ),
            (
                good.replace("\"date\"]", "\"phone\"]"),
                "field `phone` is not declared",
            ),
            (
                good.replace("fields = [\"name\", \"date\"]\n", ""),
                "needs fields",
            ),
            (
                good.replace("{{ extracted.name | json }}", "{{ extracted.name }}"),
                "does not render to JSON",
            ),
            (
                good.replace("extracted.name", "extracted.nmae"),
                "unknown variable `extracted.nmae`",
            ),
            (
                format!("{good}timeout_ms = 0\n"),
                "timeout_ms must be 1 to 60000",
            ),
            (
                format!("{good}max_attempts = 0\n"),
                "max_attempts must be 1 to 100",
            ),
            // A follow-up sees `action`, `request` (the body) and `result`; the answer's
            // members are unknown until it comes (`?.`).
            (
                format!("{good}follow_up = \"Booked for {{{{ request.nmae }}}}\"\n"),
                "follow_up line 1: unknown variable `request.nmae`",
            ),
            (
                format!("{good}follow_up = \"Ref {{{{ result.response.id }}}}\"\n"),
                "follow_up line 1: unknown variable `result.response.id`",
            ),
            (
                format!("{good}follow_up = \"{{% if result.ok %}}x\"\n"),
                "follow_up: it does not compile",
            ),
            (
                format!("{good}handoff_on = [\"failed\"]\n"),
                "handoff_on takes delivered, rejected and dead, not `failed`",
            ),
        ];
        let follow_up = "follow_up = \"\"\"{% if result.ok %}Booked for {{ request.name }} \
                         (ref {{ result.response?.id }}, {{ action }}).{% else %}Sorry: \
                         {{ result.status }} {{ result.http_status }}{% endif %}\"\"\"\n";
        assert_eq!(
            problems(&with_action(&format!("{good}{follow_up}"), true)),
            ""
        );
        for (action, expected) in cases {
            let found = problems(&with_action(&action, true));
            assert!(found.contains(expected), "{expected}: {found}");
        }
    }

    #[test]
    fn a_transition_to_an_unknown_stage_is_refused_by_name() {
        let text = DEMO.replacen(
            "transitions = [\"booking\", \"farewell\"]",
            "transitions = [\"booking\", \"admin\"]",
            1,
        );
        let err = Definition::parse(&text).expect_err("unknown stage");
        assert!(
            err.to_string()
                .contains("stage `welcome`: transitions names an unknown stage `admin`"),
            "{err}"
        );
    }

    proptest! {
        /// Any text imports as a valid definition or fails with a named error; never a panic.
        #[test]
        fn any_definition_text_is_valid_or_a_named_error(text in prop_oneof![
            edited_demo(),
            any::<String>(),
        ]) {
            match Definition::parse(&text) {
                Ok(def) => prop_assert!(def.validate().is_ok()),
                Err(e) => {
                    prop_assert!(e.code().starts_with("definition."), "{}", e.code());
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}
