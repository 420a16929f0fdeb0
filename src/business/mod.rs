//! Business definitions: the TOML format (`definition`) and `icmp import`.

pub mod definition;

use std::path::Path;

use crate::cache::Cache;
use crate::store::Store;
use crate::store::import::ImportReport;
pub use definition::{Definition, DefinitionError};

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Definition {
        path: String,
        source: DefinitionError,
    },
    #[error("{path}: could not be written: {source}")]
    Store {
        path: String,
        source: crate::error::StoreError,
    },
}

impl crate::error::Classify for ImportError {
    fn code(&self) -> &'static str {
        match self {
            ImportError::Definition { source, .. } => source.code(),
            ImportError::Store { source, .. } => source.code(),
        }
    }
    fn category(&self) -> crate::error::Category {
        match self {
            ImportError::Definition { source, .. } => source.category(),
            ImportError::Store { source, .. } => source.category(),
        }
    }
    fn status_code(&self) -> u16 {
        match self {
            ImportError::Definition { source, .. } => source.status_code(),
            ImportError::Store { source, .. } => source.status_code(),
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            ImportError::Definition { source, .. } => source.is_retryable(),
            ImportError::Store { source, .. } => source.is_retryable(),
        }
    }
}

/// Validates every file first, then writes each business in its own transaction. A file with
/// any problem writes nothing. Cached definitions of the imported businesses are dropped.
///
/// # Errors
/// The first file that is invalid (with all its problems) or cannot be written.
pub async fn import_files(
    store: &Store,
    cache: Option<&Cache>,
    paths: &[impl AsRef<Path>],
) -> Result<Vec<ImportReport>, ImportError> {
    let mut defs = Vec::with_capacity(paths.len());
    for p in paths {
        let path = p.as_ref().display().to_string();
        let def = Definition::load(p.as_ref()).map_err(|source| ImportError::Definition {
            path: path.clone(),
            source,
        })?;
        defs.push((path, def));
    }
    let mut reports = Vec::with_capacity(defs.len());
    for (path, def) in defs {
        let report = store
            .save_definition(&def.to_records())
            .await
            .map_err(|source| ImportError::Store {
                path: path.clone(),
                source,
            })?;
        if let Some(cache) = cache
            && let Err(e) = cache
                .invalidate_definitions(report.business_id, &report.stage_ids, &report.template_ids)
                .await
        {
            // Entries expire after cache.definition_ttl_secs anyway.
            tracing::warn!(error = %e, "could not drop cached definitions");
        }
        reports.push(report);
    }
    Ok(reports)
}
