//! Fault-injection points for tests. Compiled to no-ops in release builds unless the
//! `failpoints` feature is on. Set per handler, or for a process with
//! `ICMP_FAILPOINTS=name1,name2`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Inside the write transaction, after every write, before COMMIT: fails the transaction.
pub const BEFORE_COMMIT: &str = "write.before_commit";
/// After COMMIT, before the reply is published: the process exits (a crash).
pub const AFTER_COMMIT_CRASH: &str = "worker.after_commit_crash";

/// Inside the write transaction of a coalesced turn (one with later messages), before COMMIT:
/// fails it for good, as a follower's row that PostgreSQL refused would.
pub const COALESCED_WRITE: &str = "write.coalesced";
/// After an action's result and follow-up are stored, before the follow-up is published: no
/// dispatcher publishes it (as if the process that stored it died then) until it is off.
pub const ACTION_SETTLED_STOP: &str = "actions.settled_stop";
/// Inside a group-commit batch, the write set of a message whose text contains `poison` fails
/// (a serialization failure); alone, it commits.
pub const POISON_BATCHED: &str = "write.poison_batched";
/// At the start of processing: panics (a poison message).
pub const PANIC: &str = "pipeline.panic";

const ENABLED: bool = cfg!(any(debug_assertions, feature = "failpoints"));

/// The set of active failpoints.
#[derive(Debug, Clone, Default)]
pub struct Failpoints(Arc<Mutex<HashSet<String>>>);

impl Failpoints {
    /// Reads `ICMP_FAILPOINTS`.
    pub fn from_env() -> Failpoints {
        let f = Failpoints::default();
        if let Ok(list) = std::env::var("ICMP_FAILPOINTS") {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                f.enable(name);
            }
        }
        f
    }

    pub fn enable(&self, name: &str) {
        if let Ok(mut set) = self.0.lock() {
            set.insert(name.to_owned());
        }
    }

    pub fn disable(&self, name: &str) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(name);
        }
    }

    /// Whether `name` is active (always false in release builds).
    pub fn is_on(&self, name: &str) -> bool {
        ENABLED && self.0.lock().map(|s| s.contains(name)).unwrap_or(false)
    }
}
