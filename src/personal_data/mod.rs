//! Personal data (docs/operations.md, "Personal data"): what icmp stores of one user, and the
//! operators' commands on it.
//!
//! - [`places`]: where a user's entries are in Redis (inbound, reply, dead-letter and agents'
//!   streams) and their cached state;
//! - [`export`]: everything stored of one user, as one JSON document (`icmp user export`);
//! - [`erase`]: removing it all, safely with workers running (`icmp user erase`);
//! - [`retention`]: each business's retention periods, applied by a sweep in every worker;
//! - [`audit`]: the operators' audit trail (`audit_log`, `icmp audit`).

pub mod audit;
pub mod erase;
pub mod export;
pub mod places;
pub mod retention;

use uuid::Uuid;

use crate::protocol::inbound::{canonical_business, canonical_user};

/// One user of one business, as the pipeline names them (canonical ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The business's id.
    pub business: Uuid,
    /// The user's id as producers send it, trimmed (`user_id`).
    pub user: String,
}

impl Subject {
    /// The user `user` of business `business`, in the canonical forms the inbound decoding
    /// gives them; `None` when `business` is not a UUID or `user` is blank.
    pub fn new(business: &str, user: &str) -> Option<Subject> {
        let user = canonical_user(user);
        if user.is_empty() {
            return None;
        }
        Some(Subject {
            business: canonical_business(business)?,
            user: user.to_owned(),
        })
    }

    /// The user's key: how the audit trail and the erasures name them
    /// ([`crate::store::write_set::user_key`]).
    pub fn key(&self) -> String {
        crate::store::write_set::user_key(&self.user)
    }

    /// Whether a stream entry's `business_id` and `user_id` name this user.
    pub fn named_by(&self, fields: &std::collections::BTreeMap<String, String>) -> bool {
        fields
            .get("business_id")
            .and_then(|b| canonical_business(b))
            .is_some_and(|b| b == self.business)
            && fields
                .get("user_id")
                .is_some_and(|u| canonical_user(u) == self.user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_is_named_in_canonical_forms_only() {
        let b = "2f0c3d5e-8a41-4b1e-9f00-0a1b2c3d4e5f";
        let s = Subject::new(&format!(" {} ", b.to_uppercase()), " ada ").expect("valid");
        assert_eq!(s.user, "ada");
        let fields = |b: &str, u: &str| {
            [("business_id", b), ("user_id", u)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        assert!(s.named_by(&fields(b, "ada")));
        assert!(s.named_by(&fields(&b.to_uppercase(), " ada")));
        assert!(!s.named_by(&fields(b, "adam")));
        assert!(!s.named_by(&fields("2f0c3d5e-8a41-4b1e-9f00-0a1b2c3d4e50", "ada")));
        assert!(Subject::new("nope", "ada").is_none());
        assert!(Subject::new(b, "  ").is_none());
        assert_eq!(s.key().len(), 64);
        assert_ne!(s.key(), Subject::new(b, "adam").expect("valid").key());
    }
}
