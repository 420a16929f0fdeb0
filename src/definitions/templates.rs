//! The TemplateService: loads templates (in-process, Redis `tmpl:{id}`, else PostgreSQL),
//! compiles each record once and renders them against the message's context.

use std::sync::Arc;

use uuid::Uuid;

use crate::cache::{self, Cache};
use crate::error::{PipelineError, TemplateError};
use crate::llm::tokens;
use crate::store::Store;
use crate::telemetry::metrics;
use crate::template::{Compiled, Context, Rendered, compile, engine, render_keeping};

/// Loads, compiles and renders templates.
pub struct TemplateService {
    store: Store,
    cache: Cache,
    engine: upon::Engine<'static>,
    /// The history bound of a template that sets no `context_tokens` (`None`: no bound).
    context_tokens: Option<usize>,
    /// The model a template that names none is counted for.
    default_model: String,
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
            context_tokens: None,
            default_model: String::new(),
        }
    }

    /// The engine templates are compiled with (its formatters: `json`).
    pub fn engine(&self) -> &upon::Engine<'static> {
        &self.engine
    }

    /// Bounds the history of templates that set no `context_tokens` to `tokens` (0: no bound),
    /// counted for `default_model` when a template names no model.
    #[must_use]
    pub fn with_history_bound(mut self, tokens: usize, default_model: &str) -> Self {
        self.context_tokens = (tokens > 0).then_some(tokens);
        default_model.clone_into(&mut self.default_model);
        self
    }

    /// The current version of a template of this business, compiled.
    ///
    /// The compiled template comes from the in-process tier, else its record from Redis
    /// (`tmpl:{id}`, TTL `cache.definition_ttl_secs`, dropped on every change) or PostgreSQL;
    /// the compiled form is reused while the record matches
    /// ([`LocalDefinitions::compiled`](super::local::LocalDefinitions::compiled)).
    pub async fn get(&self, business_id: Uuid, id: Uuid) -> Result<Arc<Compiled>, PipelineError> {
        let local = self.cache.local();
        let _loading = match local
            .get_or_lock(business_id, "template", |l| l.template(business_id, id))
            .await
        {
            Ok(c) => return Ok(c),
            Err(lock) => lock,
        };
        let at = local.generation();
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
                if let Err(e) = self.cache.set_template(&r, at).await {
                    metrics::record_error(&e, "template cache");
                }
                r
            }
        };
        if let Some(c) = local.compiled(&record) {
            local.put_template(at, &c);
            return Ok(c);
        }
        let compiled = Arc::new(compile(&self.engine, record)?);
        local.remember_compiled(&compiled);
        local.put_template(at, &compiled);
        Ok(compiled)
    }

    /// Renders `t` against `ctx`.
    /// The history is bounded by the template's `context_tokens` (else the default): the newest
    /// turns that fit, counted with the tokenizer of its first model where known
    /// ([`crate::llm::tokens`]).
    pub fn render(&self, t: &Compiled, ctx: &Context) -> Result<Rendered, TemplateError> {
        let r = &t.record;
        let budget = r
            .context_tokens
            .map(|n| usize::try_from(n).unwrap_or(0))
            .or(self.context_tokens);
        let keep = budget.map(|budget| {
            let model = r
                .models
                .first()
                .or(r.model.as_ref())
                .map_or(self.default_model.as_str(), String::as_str);
            tokens::newest_fitting(
                &tokens::Counter::for_model(model),
                ctx.history.iter().map(|turn| turn.content.as_str()),
                budget,
            )
        });
        render_keeping(&self.engine, t, ctx, keep)
    }

    /// A reply made without the LLM (a fallback or throttled reply): the body of `t`
    /// rendered against `ctx`, with the template's (id, version); `default` and `None` when
    /// there is no template, its body renders empty, or it fails to render (an error counted
    /// under `what`).
    pub fn reply_text(
        &self,
        t: Option<&Compiled>,
        ctx: &Context,
        default: &str,
        what: &'static str,
    ) -> (String, Option<(Uuid, i32)>) {
        match t.map(|t| (t, self.render(t, ctx))) {
            Some((t, Ok(r))) if !r.body.trim().is_empty() => {
                (r.body.to_string(), Some((t.record.id, t.record.version)))
            }
            Some((_, Err(e))) => {
                metrics::record_error(&e, what);
                (default.to_owned(), None)
            }
            _ => (default.to_owned(), None),
        }
    }
}
