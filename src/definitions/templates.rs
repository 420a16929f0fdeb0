//! The TemplateService: loads templates (in-process, Redis `tmpl:{id}`, else PostgreSQL),
//! compiles each record once and renders them against the message's context.

use std::sync::Arc;

use uuid::Uuid;

use crate::cache::{self, Cache};
use crate::error::{PipelineError, TemplateError};
use crate::store::Store;
use crate::telemetry::metrics;
use crate::template::{Compiled, Context, Rendered, compile, engine, render};

/// Loads, compiles and renders templates.
pub struct TemplateService {
    store: Store,
    cache: Cache,
    engine: upon::Engine<'static>,
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
        }
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
    pub fn render(&self, t: &Compiled, ctx: &Context) -> Result<Rendered, TemplateError> {
        render(&self.engine, t, ctx)
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
