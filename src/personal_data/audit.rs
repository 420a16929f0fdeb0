//! The audit trail of operators' actions on user data (docs/security.md, "Audit"): every
//! command and console action that reads or changes user data appends one record, with who,
//! when, what and how many, never the data. Workers neither write nor read it.

use std::collections::BTreeMap;

use uuid::Uuid;

pub use crate::store::audit::{AuditFilter, AuditRecord};

/// Who is acting: `ICMP_ACTOR`, else the operating-system user (`USER`), else `unknown`.
pub fn actor() -> String {
    std::env::var("ICMP_ACTOR")
        .ok()
        .or_else(|| std::env::var("USER").ok())
        .filter(|a| !a.trim().is_empty())
        .map_or_else(|| "unknown".to_owned(), |a| a.trim().to_owned())
}

/// A record of `action` by `actor`, done (`ok`), with no business, user, target or counts yet.
pub fn record(actor: &str, action: &str) -> AuditRecord {
    AuditRecord {
        id: 0,
        at: chrono::Utc::now(),
        actor: actor.to_owned(),
        action: action.to_owned(),
        business_id: None,
        user_key: None,
        target: None,
        counts: serde_json::Value::Object(serde_json::Map::new()),
        outcome: "ok".to_owned(),
    }
}

impl AuditRecord {
    /// Of business `business`.
    #[must_use]
    pub fn business(mut self, business: Uuid) -> Self {
        self.business_id = Some(business);
        self
    }

    /// Of the user whose key is `key`.
    #[must_use]
    pub fn user(mut self, key: String) -> Self {
        self.user_key = Some(key);
        self
    }

    /// Naming `target`.
    #[must_use]
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// With these counts.
    #[must_use]
    pub fn counts(mut self, counts: &BTreeMap<String, u64>) -> Self {
        self.counts = serde_json::json!(counts);
        self
    }

    /// Failed with error code `code`.
    #[must_use]
    pub fn failed(mut self, code: &str) -> Self {
        self.outcome = code.to_owned();
        self
    }
}

impl std::fmt::Display for AuditRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            self.actor,
            self.action,
            self.outcome
        )?;
        if let Some(b) = self.business_id {
            write!(f, " business={b}")?;
        }
        if let Some(u) = &self.user_key {
            write!(f, " user_key={}", &u[..u.len().min(16)])?;
        }
        if let Some(t) = &self.target {
            write!(f, " target={t}")?;
        }
        if self.counts.as_object().is_some_and(|m| !m.is_empty()) {
            write!(f, " counts={}", self.counts)?;
        }
        Ok(())
    }
}
