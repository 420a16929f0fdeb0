//! The StageService: the business with its stages (`business:{id}`) and a stage's template ids
//! (`stage:{id}`), read through the cache (in-process, then Redis) from PostgreSQL.

use std::sync::Arc;

use uuid::Uuid;

use crate::cache::{self, Cache};
use crate::error::{PipelineError, ValidationError};
use crate::model::{Business, StageInfo, StageTemplates};
use crate::store::Store;
use crate::telemetry::metrics;

/// Reads stages and their templates.
#[derive(Debug, Clone)]
pub struct StageService {
    store: Store,
    cache: Cache,
}

impl StageService {
    pub fn new(store: Store, cache: Cache) -> Self {
        StageService { store, cache }
    }

    /// The business, or [`ValidationError::UnknownBusiness`].
    pub async fn business(&self, business_id: Uuid) -> Result<Arc<Business>, PipelineError> {
        let local = self.cache.local();
        let _loading = match local
            .get_or_lock(business_id, "business", |l| l.business(business_id))
            .await
        {
            Ok(b) => return Ok(b),
            Err(lock) => lock,
        };
        let at = local.generation();
        if let Some(b) = cache::observed("business", self.cache.get_business(business_id).await) {
            let b = Arc::new(b);
            local.put_business(at, &b);
            return Ok(b);
        }
        let business = self
            .store
            .load_business(business_id)
            .await?
            .ok_or(ValidationError::UnknownBusiness)?;
        if let Err(e) = self.cache.set_business(&business, at).await {
            metrics::record_error(&e, "business cache");
        }
        let business = Arc::new(business);
        local.put_business(at, &business);
        Ok(business)
    }

    /// The current stage of a conversation: its stored stage, else the business's initial one.
    pub fn current<'b>(
        &self,
        business: &'b Business,
        stage_id: Option<Uuid>,
    ) -> Result<&'b StageInfo, PipelineError> {
        let id = stage_id.unwrap_or(business.initial_stage_id);
        business.stage(id).ok_or_else(|| {
            PipelineError::Definition(format!("stage {id} is not in business {}", business.id))
        })
    }

    /// The template ids of a stage.
    pub async fn templates(
        &self,
        business_id: Uuid,
        stage_id: Uuid,
    ) -> Result<StageTemplates, PipelineError> {
        let local = self.cache.local();
        let _loading = match local
            .get_or_lock(business_id, "stage", |l| l.stage(business_id, stage_id))
            .await
        {
            Ok(t) => return Ok(t),
            Err(lock) => lock,
        };
        let at = local.generation();
        if let Some(t) = cache::observed("stage", self.cache.get_stage(stage_id).await) {
            local.put_stage(at, business_id, stage_id, &t);
            return Ok(t);
        }
        let t = self
            .store
            .load_stage_templates(business_id, stage_id)
            .await?
            .ok_or_else(|| PipelineError::Definition(format!("stage {stage_id} not found")))?;
        if let Err(e) = self.cache.set_stage(stage_id, &t, at).await {
            metrics::record_error(&e, "stage cache");
        }
        local.put_stage(at, business_id, stage_id, &t);
        Ok(t)
    }
}
