//! Processing slots shared by the shard loops of one process (one loop per inbound shard it
//! reads): at most `worker.concurrency` messages run at once, and a hot shard does not starve
//! the others. Each shard has a fair share (`concurrency / shards`, rounded up); a shard at or
//! above its share takes a free slot only while no shard below its share waits for one. A
//! shard that waits is woken when a slot is freed. With one shard this is a plain counter.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// The processing slots of one process.
#[derive(Debug)]
pub struct Slots {
    total: usize,
    share: usize,
    state: Mutex<State>,
    /// One per shard: a slot was freed while it waited.
    freed: Vec<Notify>,
}

#[derive(Debug)]
struct State {
    running: Vec<usize>,
    /// Shards that have a message ready to start and found no slot for it.
    waiting: Vec<bool>,
}

/// A slot held by one running message of one shard; freed when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    shard: usize,
}

impl Slots {
    /// `total` slots (at least one) shared by `shards` loops (at least one).
    pub fn new(total: usize, shards: usize) -> Arc<Self> {
        let (total, shards) = (total.max(1), shards.max(1));
        Arc::new(Slots {
            total,
            share: total.div_ceil(shards),
            state: Mutex::new(State {
                running: vec![0; shards],
                waiting: vec![false; shards],
            }),
            freed: (0..shards).map(|_| Notify::new()).collect(),
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Messages running now, over every shard.
    pub fn running(&self) -> usize {
        self.lock().running.iter().sum()
    }

    /// A slot for a message of `shard`, if it may take one now; else `shard` is marked
    /// waiting when `has_ready` says it has a message to start (it is then woken by
    /// [`Slots::freed`] when a slot is freed).
    pub fn try_take(
        self: &Arc<Self>,
        shard: usize,
        has_ready: impl FnOnce() -> bool,
    ) -> Option<Slot> {
        let mut state = self.lock();
        let busy: usize = state.running.iter().sum();
        let mine = state.running[shard];
        let other_below_share_waits = state
            .waiting
            .iter()
            .zip(&state.running)
            .enumerate()
            .any(|(s, (w, r))| s != shard && *w && *r < self.share);
        if busy >= self.total || (mine >= self.share && other_below_share_waits) {
            state.waiting[shard] = has_ready();
            return None;
        }
        state.running[shard] += 1;
        state.waiting[shard] = false;
        Some(Slot {
            slots: self.clone(),
            shard,
        })
    }

    /// `shard` has nothing more to start (or stops): it no longer waits.
    pub fn idle(&self, shard: usize) {
        self.lock().waiting[shard] = false;
    }

    /// Resolves when a slot was freed while `shard` waited for one.
    pub async fn freed(&self, shard: usize) {
        self.freed[shard].notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding it (plain counters).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        state.running[self.shard] -= 1;
        for (s, waiting) in state.waiting.iter().enumerate() {
            if *waiting && s != self.shard {
                self.slots.freed[s].notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_takes_every_slot() {
        let slots = Slots::new(3, 1);
        let held: Vec<Slot> = (0..3).filter_map(|_| slots.try_take(0, || true)).collect();
        assert_eq!(held.len(), 3);
        assert!(slots.try_take(0, || true).is_none());
        drop(held);
        assert_eq!(slots.running(), 0);
    }

    #[test]
    fn a_hot_shard_uses_idle_slots_but_yields_them_to_a_waiting_shard() {
        let slots = Slots::new(4, 2);
        // Shard 1 is idle: shard 0 takes all four slots.
        let mut hot: Vec<Slot> = (0..4).filter_map(|_| slots.try_take(0, || true)).collect();
        assert_eq!(hot.len(), 4);
        // Shard 1 now has work: no slot, it waits.
        assert!(slots.try_take(1, || true).is_none());
        // Freed slots go to shard 1 until it has its share (2), however often shard 0 asks
        // (each loop asks again after it started something, and is refused while full).
        hot.pop();
        assert!(slots.try_take(0, || true).is_none());
        let a = slots.try_take(1, || true).expect("shard 1's first slot");
        assert!(slots.try_take(1, || true).is_none());
        hot.pop();
        assert!(slots.try_take(0, || true).is_none());
        let b = slots.try_take(1, || true).expect("shard 1's second slot");
        assert!(slots.try_take(1, || true).is_none());
        // At its share, shard 1 yields the next free slot to shard 0, now below its own.
        hot.pop();
        assert!(slots.try_take(1, || true).is_none());
        let c = slots.try_take(0, || true).expect("shard 0 again");
        assert_eq!(slots.running(), 4);
        drop((a, b, c, hot));
        assert_eq!(slots.running(), 0);
    }

    #[test]
    fn shards_above_their_share_never_block_each_other() {
        // 5 slots, 3 shards (share 2): shards 0 and 1 above or at their share, both waiting,
        // shard 2 idle. A freed slot must go to one of them.
        let slots = Slots::new(5, 3);
        let mut zero: Vec<Slot> = (0..3).filter_map(|_| slots.try_take(0, || true)).collect();
        let one: Vec<Slot> = (0..2).filter_map(|_| slots.try_take(1, || true)).collect();
        assert!(slots.try_take(0, || true).is_none());
        assert!(slots.try_take(1, || true).is_none());
        zero.pop();
        assert!(slots.try_take(0, || true).is_some() || slots.try_take(1, || true).is_some());
        drop(one);
    }

    #[tokio::test]
    async fn a_waiting_shard_is_woken_when_a_slot_is_freed() {
        let slots = Slots::new(1, 2);
        let held = slots.try_take(0, || true).expect("the one slot");
        assert!(slots.try_take(1, || true).is_none());
        drop(held);
        tokio::time::timeout(std::time::Duration::from_secs(1), slots.freed(1))
            .await
            .expect("woken");
        assert!(slots.try_take(1, || true).is_some());
    }
}
