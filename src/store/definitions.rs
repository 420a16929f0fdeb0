//! Reads of business definitions: businesses, stages, templates.

use crate::store::Prepared;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::model::{Business, Policy, StageInfo, StageTemplates, TemplateKind, TemplateRecord};

impl Store {
    /// The business with its stages in order, or `None` when it does not exist.
    pub async fn load_business(&self, business_id: Uuid) -> Result<Option<Business>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(
                "SELECT b.name, b.policy, t.id, s.id FROM businesses b \
                 LEFT JOIN templates t ON t.business_id = b.id AND t.kind = 'fallback' \
                 AND t.name = b.policy -> 'budget' ->> 'throttled_template' \
                 LEFT JOIN templates s ON s.business_id = b.id AND s.kind = 'summary' \
                 AND s.name = b.policy -> 'history' ->> 'summary_template' \
                 WHERE b.id = $1",
            )
            .await?;
        let Some(row) = self
            .scoped(&client, business_id, &stmt, &[&business_id])
            .await?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let name: String = row.get(0);
        // A policy this version cannot read (written by a newer one) is no policy at all.
        let policy = row
            .get::<_, tokio_postgres::types::Json<serde_json::Value>>(1)
            .0;
        let policy: Policy = serde_json::from_value(policy).unwrap_or_else(|e| {
            tracing::warn!(business.id = %business_id, error = %e, "unreadable business policy ignored");
            Policy::default()
        });
        let throttled_template_id: Option<Uuid> = row.get(2);
        let summary_template_id: Option<Uuid> = row.get(3);
        let stmt = client
            .prepared(
                "SELECT id, name, description, is_initial, next_stages, actions, handoff \
                 FROM stages \
                 WHERE business_id = $1 ORDER BY position, name",
            )
            .await?;
        let rows = self
            .scoped(&client, business_id, &stmt, &[&business_id])
            .await?;
        let (stages, initial_stage_id) = stages_from_rows(business_id, rows)?;
        let stmt = client
            .prepared(
                "SELECT DISTINCT jsonb_object_keys(output_schema -> 'properties') FROM templates \
                 WHERE business_id = $1 AND kind = 'extraction' \
                 AND jsonb_typeof(output_schema -> 'properties') = 'object' ORDER BY 1",
            )
            .await?;
        let extraction_fields = self
            .scoped(&client, business_id, &stmt, &[&business_id])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(Some(Business {
            id: business_id,
            name,
            initial_stage_id,
            stages,
            extraction_fields,
            policy,
            throttled_template_id,
            summary_template_id,
        }))
    }

    /// The template ids of a stage of this business.
    pub async fn load_stage_templates(
        &self,
        business_id: Uuid,
        stage_id: Uuid,
    ) -> Result<Option<StageTemplates>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(
                "SELECT selection_template_id, extraction_template_id, response_template_id, \
                 fallback_template_id FROM stages WHERE business_id = $1 AND id = $2",
            )
            .await?;
        Ok(self
            .scoped(&client, business_id, &stmt, &[&business_id, &stage_id])
            .await?
            .into_iter()
            .next()
            .map(|r| StageTemplates {
                selection: r.get(0),
                extraction: r.get(1),
                response: r.get(2),
                fallback: r.get(3),
            }))
    }

    /// A template of this business.
    pub async fn load_template(
        &self,
        business_id: Uuid,
        template_id: Uuid,
    ) -> Result<Option<TemplateRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(
                "SELECT id, business_id, name, kind, system, body, model, temperature, max_tokens, \
                 output_schema, version, models, context_tokens FROM templates WHERE business_id = $1 AND id = $2",
            )
            .await?;
        self.scoped(&client, business_id, &stmt, &[&business_id, &template_id])
            .await?
            .into_iter()
            .next()
            .map(template_from_row)
            .transpose()
    }
}

fn template_from_row(r: Row) -> Result<TemplateRecord, StoreError> {
    let kind: String = r.get(3);
    Ok(TemplateRecord {
        id: r.get(0),
        business_id: r.get(1),
        name: r.get(2),
        kind: TemplateKind::parse(&kind)
            .ok_or_else(|| StoreError::Inconsistent(format!("unknown template kind {kind}")))?,
        system: r.get(4),
        body: r.get(5),
        model: r.get(6),
        temperature: r.get(7),
        max_tokens: r.get(8),
        output_schema: r.get(9),
        version: r.get(10),
        models: r.get(11),
        context_tokens: r.get(12),
    })
}

impl Store {
    /// The ids of a business's stages and templates (to drop their cached copies).
    pub async fn definition_ids(
        &self,
        business_id: Uuid,
    ) -> Result<(Vec<Uuid>, Vec<Uuid>), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(
                "SELECT 's', id FROM stages WHERE business_id = $1 \
                 UNION ALL SELECT 't', id FROM templates WHERE business_id = $1",
            )
            .await?;
        let rows = self
            .scoped(&client, business_id, &stmt, &[&business_id])
            .await?;
        let (mut stages, mut templates) = (Vec::new(), Vec::new());
        for r in rows {
            if r.get::<_, &str>(0) == "s" {
                stages.push(r.get(1));
            } else {
                templates.push(r.get(1));
            }
        }
        Ok((stages, templates))
    }
}

impl Store {
    /// Every business as (id, name), by name. Operators run as the owner, whom row-level
    /// security does not restrict.
    pub async fn businesses(&self) -> Result<Vec<(Uuid, String)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared("SELECT id, name FROM businesses ORDER BY name, id")
            .await?;
        self.count_round_trip();
        Ok(client
            .query(&stmt, &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// Per business over the last `minutes`: (id, name, replies stored, fallback replies).
    /// Operators run as the owner, whom row-level security does not restrict.
    pub async fn recent_activity(
        &self,
        minutes: u64,
    ) -> Result<Vec<(String, String, i64, i64)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(
                "SELECT b.id::text, b.name, count(*), count(*) FILTER (WHERE m.status = 'fallback') \
                 FROM messages m JOIN businesses b ON b.id = m.business_id \
                 WHERE m.role = 'assistant' AND m.created_at > now() - make_interval(mins => $1) \
                 GROUP BY b.id, b.name ORDER BY b.name",
            )
            .await?;
        self.count_round_trip();
        let minutes = i32::try_from(minutes).unwrap_or(i32::MAX);
        Ok(client
            .query(&stmt, &[&minutes])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }
}

/// The stages of a business from their rows (id, name, description, is_initial,
/// next_stages), with transitions resolved from stage names to ids (a name no longer among
/// the stages allows nothing), and the initial stage (the marked one, else the first).
fn stages_from_rows(
    business_id: Uuid,
    rows: Vec<tokio_postgres::Row>,
) -> Result<(Vec<StageInfo>, Uuid), StoreError> {
    let mut initial = None;
    let mut stages = Vec::with_capacity(rows.len());
    let mut next_names = Vec::with_capacity(rows.len());
    for r in rows {
        let info = StageInfo {
            id: r.get(0),
            name: r.get(1),
            description: r.get(2),
            next: None,
            actions: serde_json::from_value(
                r.get::<_, tokio_postgres::types::Json<serde_json::Value>>(5)
                    .0,
            )
            .map_err(|e| StoreError::Inconsistent(format!("stage actions: {e}")))?,
            handoff: r.get(6),
        };
        if r.get::<_, bool>(3) {
            initial = Some(info.id);
        }
        next_names.push(r.get::<_, Option<Vec<String>>>(4));
        stages.push(info);
    }
    let by_name: std::collections::HashMap<String, Uuid> =
        stages.iter().map(|s| (s.name.clone(), s.id)).collect();
    for (stage, names) in stages.iter_mut().zip(next_names) {
        stage.next = names.map(|names| {
            names
                .iter()
                .filter_map(|n| by_name.get(n).copied())
                .collect()
        });
    }
    let initial_stage_id = initial
        .or_else(|| stages.first().map(|s| s.id))
        .ok_or_else(|| StoreError::Inconsistent(format!("business {business_id} has no stages")))?;
    Ok((stages, initial_stage_id))
}
