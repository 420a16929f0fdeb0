//! The in-process tier of the definitions cache: businesses, stages' template ids and compiled
//! templates, in front of Redis. It serves only while the definitions watch is connected
//! (see [`super::live`]): every change notification drops the business's entries, and a lost
//! watch connection switches the tier off and clears it until the watch is back, so it never
//! serves what a notification it missed would have dropped. Entries also expire after
//! `cache.definition_ttl_secs`.
//!
//! A generation counter closes the read-then-store race: a value loaded before a change is
//! stored only if no change arrived meanwhile.
//!
//! Compiled templates are also remembered apart from the tier, even while it is off: compiling
//! is the costly part of a template load, and a compiled form is reused only for the very
//! record it was compiled from (so it never serves a version the load did not find). A change
//! of the business drops them too.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::model::{Business, StageTemplates, TemplateRecord};
use crate::template::Compiled;

/// Which generation of the definitions a value was loaded at (read it before loading).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

#[derive(Debug)]
struct Entry<T> {
    business_id: Uuid,
    loaded: Instant,
    value: T,
}

#[derive(Debug, Default)]
struct Tiers {
    generation: u64,
    enabled: bool,
    businesses: HashMap<Uuid, Entry<Arc<Business>>>,
    stages: HashMap<Uuid, Entry<StageTemplates>>,
    templates: HashMap<Uuid, Entry<Arc<Compiled>>>,
    /// Compiled templates by id, kept while the tier is off (see the module docs).
    compiled: HashMap<Uuid, Arc<Compiled>>,
}

/// The in-process definitions; share it with `Arc`.
#[derive(Debug)]
pub struct LocalDefinitions {
    ttl: Duration,
    inner: RwLock<Tiers>,
    /// One load at a time per business, so that a cold start (or a change) under load costs
    /// one read of each definition, not one per message in flight.
    loading: std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

impl LocalDefinitions {
    /// A tier that is off until [`LocalDefinitions::enable`].
    pub fn new(ttl: Duration) -> Self {
        LocalDefinitions {
            ttl,
            inner: RwLock::new(Tiers::default()),
            loading: std::sync::Mutex::default(),
        }
    }

    /// Waits for the business's load lock while the tier serves (`None` when it is off: then
    /// nothing would be kept, so loads need not wait for each other).
    async fn load_lock(&self, business_id: Uuid) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if !self.is_enabled() {
            return None;
        }
        let lock = self
            .loading
            .lock()
            .ok()?
            .entry(business_id)
            .or_default()
            .clone();
        Some(lock.lock_owned().await)
    }

    /// `lookup` in this tier (counted as a `local` hit of cache `what`). On a miss, waits for
    /// the business's load lock and looks again, since the previous holder may have loaded it;
    /// still missing, returns the lock to load under.
    pub async fn get_or_lock<T>(
        &self,
        business_id: Uuid,
        what: &'static str,
        lookup: impl Fn(&Self) -> Option<T>,
    ) -> Result<T, Option<tokio::sync::OwnedMutexGuard<()>>> {
        if let Some(v) = lookup(self) {
            crate::telemetry::metrics::cache(what, "local");
            return Ok(v);
        }
        let lock = self.load_lock(business_id).await;
        match lookup(self) {
            Some(v) => {
                crate::telemetry::metrics::cache(what, "local");
                Ok(v)
            }
            None => Err(lock),
        }
    }

    /// The current generation.
    pub fn generation(&self) -> Generation {
        Generation(self.read(|t| t.generation).unwrap_or(u64::MAX))
    }

    /// Whether the tier serves (its watch is connected).
    pub fn is_enabled(&self) -> bool {
        self.read(|t| t.enabled).unwrap_or(false)
    }

    /// Starts serving, empty (the watch just connected: anything may have changed before).
    pub fn enable(&self) {
        self.write(|t| {
            t.clear();
            t.enabled = true;
        });
    }

    /// Stops serving and drops everything (the watch lost its connection).
    pub fn disable(&self) {
        self.write(|t| {
            t.clear();
            t.enabled = false;
        });
    }

    /// Drops everything of one business.
    pub fn forget_business(&self, business_id: Uuid) {
        self.write(|t| {
            t.generation += 1;
            t.businesses.retain(|_, e| e.business_id != business_id);
            t.stages.retain(|_, e| e.business_id != business_id);
            t.templates.retain(|_, e| e.business_id != business_id);
            t.compiled
                .retain(|_, c| c.record.business_id != business_id);
        });
    }

    /// The compiled form of exactly `record`, if it was compiled before and no change of its
    /// business came since.
    pub fn compiled(&self, record: &TemplateRecord) -> Option<Arc<Compiled>> {
        self.read(|t| {
            t.compiled
                .get(&record.id)
                .filter(|c| c.record == *record)
                .cloned()
        })
        .flatten()
    }

    /// Remembers a compiled template for [`LocalDefinitions::compiled`]. One loaded before a
    /// change may be remembered after it: it is only ever reused for its own record.
    pub fn remember_compiled(&self, value: &Arc<Compiled>) {
        self.write(|t| {
            t.compiled.insert(value.record.id, value.clone());
        });
    }

    /// How many compiled templates are remembered.
    pub fn compiled_len(&self) -> usize {
        self.read(|t| t.compiled.len()).unwrap_or(0)
    }

    /// A business's definition, shared (not copied) with every message that needs it.
    pub fn business(&self, id: Uuid) -> Option<Arc<Business>> {
        self.read(|t| fresh(t, &t.businesses, id, self.ttl).cloned())
            .flatten()
    }

    pub fn stage(&self, business_id: Uuid, id: Uuid) -> Option<StageTemplates> {
        self.read(|t| {
            fresh(t, &t.stages, id, self.ttl)
                .filter(|_| {
                    t.stages
                        .get(&id)
                        .is_some_and(|e| e.business_id == business_id)
                })
                .cloned()
        })
        .flatten()
    }

    pub fn template(&self, business_id: Uuid, id: Uuid) -> Option<Arc<Compiled>> {
        self.read(|t| {
            fresh(t, &t.templates, id, self.ttl)
                .filter(|c| c.record.business_id == business_id)
                .cloned()
        })
        .flatten()
    }

    pub fn put_business(&self, at: Generation, value: &Arc<Business>) {
        self.put(at, |t| {
            t.businesses
                .insert(value.id, entry(value.id, value.clone()));
        });
    }

    pub fn put_stage(&self, at: Generation, business_id: Uuid, id: Uuid, value: &StageTemplates) {
        self.put(at, |t| {
            t.stages.insert(id, entry(business_id, *value));
        });
    }

    pub fn put_template(&self, at: Generation, value: &Arc<Compiled>) {
        self.put(at, |t| {
            t.templates.insert(
                value.record.id,
                entry(value.record.business_id, value.clone()),
            );
        });
    }

    fn put(&self, at: Generation, f: impl FnOnce(&mut Tiers)) {
        self.write(|t| {
            if t.enabled && t.generation == at.0 {
                f(t);
            }
        });
    }

    fn read<R>(&self, f: impl FnOnce(&Tiers) -> R) -> Option<R> {
        self.inner.read().ok().map(|t| f(&t))
    }

    fn write(&self, f: impl FnOnce(&mut Tiers)) {
        // A poisoned lock (a panic while writing) is recovered by clearing: nothing stale serves.
        let mut guard = match self.inner.write() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                g.clear();
                g.compiled.clear();
                g
            }
        };
        f(&mut guard);
    }
}

impl Tiers {
    fn clear(&mut self) {
        self.generation += 1;
        self.businesses.clear();
        self.stages.clear();
        self.templates.clear();
    }
}

fn entry<T>(business_id: Uuid, value: T) -> Entry<T> {
    Entry {
        business_id,
        loaded: Instant::now(),
        value,
    }
}

fn fresh<'t, T>(
    tiers: &Tiers,
    map: &'t HashMap<Uuid, Entry<T>>,
    id: Uuid,
    ttl: Duration,
) -> Option<&'t T> {
    if !tiers.enabled {
        return None;
    }
    map.get(&id)
        .filter(|e| e.loaded.elapsed() < ttl)
        .map(|e| &e.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StageInfo;

    fn business(n: u128) -> Business {
        Business {
            id: Uuid::from_u128(n),
            name: format!("b{n}"),
            initial_stage_id: Uuid::from_u128(100 + n),
            stages: vec![StageInfo {
                id: Uuid::from_u128(100 + n),
                name: "welcome".into(),
                description: String::new(),
                next: None,
                actions: Vec::new(),
                handoff: false,
            }],
            extraction_fields: Vec::new(),
            ..Default::default()
        }
    }

    #[test]
    fn serves_only_while_enabled_and_only_what_no_change_overtook() {
        let local = LocalDefinitions::new(Duration::from_secs(60));
        let (a, b) = (Arc::new(business(1)), Arc::new(business(2)));
        local.put_business(local.generation(), &a);
        assert_eq!(local.business(a.id), None, "off until enabled");

        local.enable();
        let before = local.generation();
        local.put_business(before, &a);
        local.put_business(before, &b);
        assert_eq!(local.business(a.id), Some(a.clone()));

        // A change of b drops b only, and a value loaded before it is not stored.
        local.forget_business(b.id);
        assert_eq!(local.business(a.id), Some(a.clone()));
        assert_eq!(local.business(b.id), None);
        local.put_business(before, &b);
        assert_eq!(local.business(b.id), None, "loaded before the change");
        local.put_business(local.generation(), &b);
        assert_eq!(local.business(b.id), Some(b));

        // A lost watch: nothing serves, and nothing is kept for later.
        local.disable();
        assert_eq!(local.business(a.id), None);
        local.enable();
        assert_eq!(local.business(a.id), None);
    }

    fn template(business: u128, id: u128, body: &str) -> Arc<Compiled> {
        let record =
            crate::template::test_record(Uuid::from_u128(id), Uuid::from_u128(business), "", body);
        Arc::new(crate::template::compile(&crate::template::engine(), record).expect("compiles"))
    }

    #[test]
    fn compiled_templates_serve_their_own_record_only_and_go_with_a_change_of_their_business() {
        let local = LocalDefinitions::new(Duration::from_secs(60));
        let (a, b) = (template(1, 10, "hello"), template(2, 20, "bye"));
        // Kept while the tier is off: they are checked against the record loaded.
        local.remember_compiled(&a);
        local.remember_compiled(&b);
        assert!(Arc::ptr_eq(&local.compiled(&a.record).expect("kept"), &a));
        // An edited record (same id, new body or version) misses.
        let mut edited = a.record.clone();
        edited.body = "hello again".into();
        assert!(local.compiled(&edited).is_none());
        edited.body = a.record.body.clone();
        edited.version = 2;
        assert!(local.compiled(&edited).is_none());
        // Enabling or losing the watch keeps them; a change of the business drops its own.
        local.enable();
        local.disable();
        assert_eq!(local.compiled_len(), 2);
        local.forget_business(a.record.business_id);
        assert!(local.compiled(&a.record).is_none());
        assert!(local.compiled(&b.record).is_some());
        assert_eq!(local.compiled_len(), 1);
    }

    #[test]
    fn entries_expire() {
        let local = LocalDefinitions::new(Duration::from_millis(1));
        local.enable();
        let a = Arc::new(business(1));
        local.put_business(local.generation(), &a);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(local.business(a.id), None);
    }
}
