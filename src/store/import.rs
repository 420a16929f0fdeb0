//! Writes a validated business definition in one transaction.

use std::collections::HashMap;

use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::model::DefinitionRecord;

/// What an import changed in one template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateChange {
    Created,
    Updated,
    Unchanged,
}

/// The result of importing one business.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub business_id: Uuid,
    /// (name, change, version after the import)
    pub templates: Vec<(String, TemplateChange, i32)>,
    pub template_ids: Vec<Uuid>,
    pub stage_ids: Vec<Uuid>,
}

impl Store {
    /// Creates or updates the business, its templates and stages. A template whose content
    /// changed gets `version + 1`; an unchanged one keeps its version. Stages and templates that
    /// are no longer in the file are kept (conversations may still point at them).
    pub async fn save_definition(
        &self,
        def: &DefinitionRecord,
    ) -> Result<ImportReport, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let business_id = def.business_id;
        let policy = tokio_postgres::types::Json(&def.policy);
        tx.execute(
            "INSERT INTO businesses (id, name, policy) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, policy = EXCLUDED.policy, \
             updated_at = EXCLUDED.updated_at \
             WHERE (businesses.name, businesses.policy) \
             IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.policy)",
            &[&business_id, &def.name, &policy],
        )
        .await?;

        let mut report = ImportReport {
            business_id,
            templates: Vec::new(),
            template_ids: Vec::new(),
            stage_ids: Vec::new(),
        };
        let ids = upsert_templates(&tx, def, &mut report).await?;
        upsert_stages(&tx, def, &ids, &mut report).await?;
        // Running workers drop their copies of this business's definitions. On plain
        // PostgreSQL the change triggers send the same notification (one is delivered); on
        // Citus, which has no such triggers, this is the only one.
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[
                &super::listen::DEFINITIONS_CHANNEL,
                &business_id.to_string(),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(report)
    }
}

/// Upserts every template (a changed one gets `version + 1`); returns their ids by name.
async fn upsert_templates(
    tx: &Transaction<'_>,
    def: &DefinitionRecord,
    report: &mut ImportReport,
) -> Result<HashMap<String, Uuid>, StoreError> {
    let business_id = def.business_id;
    let upsert = tx
        .prepare(
            "INSERT INTO templates (business_id, name, kind, system, body, model, temperature, \
             max_tokens, output_schema, models, context_tokens) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (business_id, name) DO UPDATE SET kind = EXCLUDED.kind, \
             system = EXCLUDED.system, body = EXCLUDED.body, model = EXCLUDED.model, \
             temperature = EXCLUDED.temperature, max_tokens = EXCLUDED.max_tokens, \
             output_schema = EXCLUDED.output_schema, models = EXCLUDED.models, \
             context_tokens = EXCLUDED.context_tokens, \
             version = templates.version + 1, \
             updated_at = EXCLUDED.updated_at \
             WHERE (templates.kind, templates.system, templates.body, templates.model, \
             templates.temperature, templates.max_tokens, templates.output_schema, \
             templates.models, templates.context_tokens) \
             IS DISTINCT FROM (EXCLUDED.kind, EXCLUDED.system, EXCLUDED.body, EXCLUDED.model, \
             EXCLUDED.temperature, EXCLUDED.max_tokens, EXCLUDED.output_schema, \
             EXCLUDED.models, EXCLUDED.context_tokens) \
             RETURNING id, version, (xmax = 0) AS inserted",
        )
        .await?;
    let existing = tx
        .prepare("SELECT id, version FROM templates WHERE business_id = $1 AND name = $2")
        .await?;
    let mut ids = HashMap::new();
    for t in &def.templates {
        let row = tx
            .query_opt(
                &upsert,
                &[
                    &business_id,
                    &t.name,
                    &t.kind.as_str(),
                    &t.system,
                    &t.body,
                    &t.model,
                    &t.temperature,
                    &t.max_tokens,
                    &t.output_schema,
                    &t.models,
                    &t.context_tokens,
                ],
            )
            .await?;
        let (id, version, change): (Uuid, i32, TemplateChange) = match row {
            Some(r) => {
                let change = if r.get::<_, bool>(2) {
                    TemplateChange::Created
                } else {
                    TemplateChange::Updated
                };
                (r.get(0), r.get(1), change)
            }
            None => {
                let r = tx.query_one(&existing, &[&business_id, &t.name]).await?;
                (r.get(0), r.get(1), TemplateChange::Unchanged)
            }
        };
        ids.insert(t.name.clone(), id);
        report.template_ids.push(id);
        report.templates.push((t.name.clone(), change, version));
    }
    Ok(ids)
}

/// Upserts every stage with its templates' ids and marks the initial one.
async fn upsert_stages(
    tx: &Transaction<'_>,
    def: &DefinitionRecord,
    ids: &HashMap<String, Uuid>,
    report: &mut ImportReport,
) -> Result<(), StoreError> {
    let business_id = def.business_id;
    tx.execute(
        "UPDATE stages SET is_initial = false WHERE business_id = $1 AND name <> $2 AND is_initial",
        &[&business_id, &def.initial_stage],
    )
    .await?;
    let stage_upsert = tx
        .prepare(
            "INSERT INTO stages (business_id, name, description, position, is_initial, \
             selection_template_id, extraction_template_id, response_template_id, \
             fallback_template_id, next_stages, actions, handoff) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (business_id, name) DO UPDATE SET description = EXCLUDED.description, \
             position = EXCLUDED.position, is_initial = EXCLUDED.is_initial, \
             selection_template_id = EXCLUDED.selection_template_id, \
             extraction_template_id = EXCLUDED.extraction_template_id, \
             response_template_id = EXCLUDED.response_template_id, \
             fallback_template_id = EXCLUDED.fallback_template_id, \
             next_stages = EXCLUDED.next_stages, actions = EXCLUDED.actions, \
             handoff = EXCLUDED.handoff, \
             updated_at = EXCLUDED.updated_at \
             RETURNING id",
        )
        .await?;
    let lookup = |name: &Option<String>| name.as_deref().and_then(|n| ids.get(n).copied());
    for (position, s) in def.stages.iter().enumerate() {
        let response = ids
            .get(s.response_template.as_str())
            .copied()
            .ok_or_else(|| {
                StoreError::Inconsistent(format!("unknown template {}", s.response_template))
            })?;
        let row = tx
            .query_one(
                &stage_upsert,
                &[
                    &business_id,
                    &s.name,
                    &s.description,
                    &(position as i32),
                    &(s.name == def.initial_stage),
                    &lookup(&s.selection_template),
                    &lookup(&s.extraction_template),
                    &response,
                    &lookup(&s.fallback_template),
                    &s.transitions,
                    &tokio_postgres::types::Json(&s.actions),
                    &s.handoff,
                ],
            )
            .await?;
        report.stage_ids.push(row.get(0));
    }
    Ok(())
}
