//! The waiting room: every entry a worker holds, and what it waits on.
//!
//! An entry is *waiting* (behind an earlier entry of its user, keeping only its id once the
//! first check said so), *ready* (its turn has come or it has no queue; it waits for a
//! processing slot) or *running*. Waiting entries hold no processing slot and no task, so one
//! user's backlog of thousands costs memory for ids only and delays nobody else: the queues
//! are checked by key, and only the first waiting entry of each queue is checked.
//!
//! Ready entries wait per business, and free slots go to the businesses in turn, each up to
//! its cap of running entries: a business flooding the stream takes no more than its share of
//! the slots, and its ready entries beyond the cap (*parked*) do not stop the reader, so the
//! other businesses' entries are still read and started at once.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::stream::StreamEntry;
use crate::stream::order::{Head, HeadCheck, QueueSlot, Wake};

/// Held entries keep their fields (saving a fetch when their turn comes) while all the kept
/// fields together stay under this many bytes; beyond it they keep their ids only.
const KEPT_FIELDS_BUDGET: usize = 32 << 20;

fn fields_size(entry: &StreamEntry) -> usize {
    entry
        .fields
        .iter()
        .map(|(k, v)| k.len() + v.len() + 48)
        .sum()
}

enum State {
    Waiting,
    Ready,
    Running(CancellationToken),
}

/// The business an entry is counted under (`None`: its business field is unreadable).
type BusinessKey = Option<Uuid>;

fn business_of(entry: &StreamEntry) -> BusinessKey {
    crate::protocol::raw_field(&entry.fields, "business_id")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(crate::protocol::inbound::canonical_business)
}

/// Takes one from a per-business count, forgetting counts that reach zero.
fn count_down(counts: &mut HashMap<BusinessKey, usize>, business: BusinessKey) {
    if let Some(n) = counts.get_mut(&business) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&business);
        }
    }
}

struct Held {
    entry: StreamEntry,
    business: BusinessKey,
    /// Whether `entry.fields` holds the fields (a waiting entry beyond the budget drops them).
    has_fields: bool,
    /// Bytes of its fields counted in the room's kept bytes.
    kept: usize,
    state: State,
    /// When it came here and when its turn came (for its trace).
    waits: super::Waits,
}

/// What a head check decided for one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Checked {
    Ready,
    Waiting,
    /// No longer pending: dropped from the room.
    Gone,
    /// Not held any more (finished or lost while the check ran).
    Stale,
}

/// The safety-net poll's interval for one queue doubles at most this many times.
const MAX_QUIET_DOUBLINGS: u32 = 3;

/// What the safety-net poll knows of one queue.
#[derive(Debug, Clone, Copy)]
struct PollState {
    at: Instant,
    /// Safety-net checks since the queue was last woken.
    polls: u32,
}

impl PollState {
    fn now() -> PollState {
        PollState {
            at: Instant::now(),
            polls: 0,
        }
    }
}

#[derive(Default)]
pub(super) struct Room {
    held: HashMap<String, Held>,
    /// Waiting entries per queue key: member → entry id, in stream order.
    queues: HashMap<Vec<u8>, BTreeMap<String, String>>,
    /// When each queue with waiting entries was last checked or woken, and how many
    /// safety-net checks in a row found it still waiting (the poll checks a queue only once it
    /// was quiet for a whole interval, doubled per such check).
    heard: HashMap<Vec<u8>, PollState>,
    /// Bytes of fields kept by waiting entries.
    kept_bytes: usize,
    /// Wake-ups for queues nothing waits on here yet, by key: the head they named and when
    /// (an entry whose claim raced its predecessor's finish is admitted after the wake-up).
    early_wakes: HashMap<Vec<u8>, (String, Instant)>,
    /// Queues whose first waiting entry must be checked.
    dirty: HashSet<Vec<u8>>,
    /// Ready entry ids per business (ids of entries no longer ready are skipped).
    ready: HashMap<BusinessKey, VecDeque<String>>,
    /// The businesses with ready entries, in the order they get the next free slot.
    turns: VecDeque<BusinessKey>,
    /// Ready entries per business.
    ready_by: HashMap<BusinessKey, usize>,
    /// Running entries per business.
    running: HashMap<BusinessKey, usize>,
    /// The held ids, shared with the heartbeat.
    ids: Arc<Mutex<HashSet<String>>>,
}

impl Room {
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    #[cfg(test)]
    pub(super) fn ready_len(&self) -> usize {
        self.ready_by.values().sum()
    }

    pub(super) fn holds(&self, id: &str) -> bool {
        self.held.contains_key(id)
    }

    /// The held ids, kept up to date, for the heartbeat.
    pub(super) fn shared_ids(&self) -> Arc<Mutex<HashSet<String>>> {
        self.ids.clone()
    }

    /// Takes an entry in; `false` when it is already held (a reclaim of an entry this worker
    /// still holds).
    pub(super) fn admit(&mut self, entry: StreamEntry) -> bool {
        if self.held.contains_key(&entry.id) {
            return false;
        }
        let id = entry.id.clone();
        let business = business_of(&entry);
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone());
        // It may wait long (behind its user's earlier entries, or parked while its business is
        // at its cap): it keeps its fields only within the budget (else they are fetched when
        // its turn comes).
        let size = fields_size(&entry);
        let has_fields = self.kept_bytes + size <= KEPT_FIELDS_BUDGET;
        if has_fields {
            self.kept_bytes += size;
        }
        let woken = entry.slot.as_ref().is_some_and(|slot| {
            self.early_wakes
                .remove(&slot.key)
                .is_some_and(|(head, _)| head == slot.member)
        });
        let state = match &entry.slot {
            // Its queue's head as delivered (or named by a wake-up already), and nothing of its
            // queue waits here: its turn.
            Some(slot)
                if (entry.at_head == Some(true) || woken)
                    && !self.queues.contains_key(&slot.key) =>
            {
                self.push_ready(business, id.clone());
                State::Ready
            }
            Some(slot) => {
                let queue = self.queues.entry(slot.key.clone()).or_default();
                queue.insert(slot.member.clone(), id.clone());
                self.heard
                    .entry(slot.key.clone())
                    .or_insert_with(PollState::now);
                // Behind an earlier entry as delivered: the wake-up naming it (or the
                // safety-net poll) brings its turn; else it is checked now.
                if entry.at_head != Some(false) {
                    self.dirty.insert(slot.key.clone());
                }
                State::Waiting
            }
            None => {
                self.push_ready(business, id.clone());
                State::Ready
            }
        };
        let now = std::time::SystemTime::now();
        let waits = super::Waits {
            received: Some(now),
            turn: matches!(state, State::Ready).then_some(now),
        };
        let mut entry = entry;
        let kept = if has_fields { size } else { 0 };
        if !has_fields {
            entry.fields = Vec::new();
        }
        self.held.insert(
            id,
            Held {
                entry,
                business,
                has_fields,
                kept,
                state,
                waits,
            },
        );
        true
    }

    /// A queue changed (a wake-up, a local finish): check its first waiting entry again.
    /// Returns whether this worker waits on it.
    pub(super) fn touch(&mut self, key: &[u8]) -> bool {
        if self.queues.contains_key(key) {
            self.dirty.insert(key.to_vec());
            true
        } else {
            false
        }
    }

    /// A wake-up from the wake channel. When it names the queue's new head and that is the
    /// first entry waiting here, the entry is ready at once (the finish that dequeued its
    /// predecessor saw it at the head); otherwise the queue is checked. Returns whether this
    /// worker waits on the queue.
    pub(super) fn wake(&mut self, wake: &Wake) -> bool {
        let Some(queue) = self.queues.get(&wake.key) else {
            if let Some(head) = &wake.head {
                self.early_wakes
                    .insert(wake.key.clone(), (head.clone(), Instant::now()));
            }
            return false;
        };
        let first = queue
            .first_key_value()
            .map(|(m, id)| (m.clone(), id.clone()));
        match (first, &wake.head) {
            (Some((member, id)), Some(head)) if &member == head => {
                let slot = QueueSlot {
                    key: wake.key.clone(),
                    member,
                };
                let go = HeadCheck {
                    head: Head::Go,
                    healed: 0,
                    trimmed: 0,
                };
                self.apply(&slot, &id, go);
                self.dirty.remove(&wake.key);
            }
            _ => {
                self.heard.insert(wake.key.clone(), PollState::now());
                self.dirty.insert(wake.key.clone());
            }
        }
        true
    }

    /// Marks for a check every queue with waiting entries that nothing was heard of for
    /// `quiet` (the safety net for lost wake-ups and for heads whose consumer was deleted);
    /// returns how many. A queue the net already checked without a wake-up since waits twice
    /// as long for the next check (up to 8 × `quiet`): under a backlog a head can be pending
    /// for seconds, and checking every waiting queue every interval would cost more Redis
    /// commands than the messages themselves. A stale head is still found at the first check.
    pub(super) fn touch_quiet(&mut self, quiet: Duration) -> usize {
        let now = Instant::now();
        self.early_wakes
            .retain(|_, (_, at)| now.duration_since(*at) < quiet);
        let mut n = 0;
        for key in self.queues.keys() {
            let heard = self.heard.entry(key.clone()).or_insert_with(PollState::now);
            let interval = quiet * (1 << heard.polls.min(MAX_QUIET_DOUBLINGS));
            if now.duration_since(heard.at) >= interval && self.dirty.insert(key.clone()) {
                heard.polls = heard.polls.saturating_add(1);
                n += 1;
            }
        }
        n
    }

    /// Marks every queue with waiting entries for a check, as if each was woken (the wake-up
    /// subscription was re-established: wake-ups may have been missed meanwhile).
    pub(super) fn touch_all(&mut self) -> usize {
        let keys: Vec<Vec<u8>> = self.queues.keys().cloned().collect();
        for key in &keys {
            self.heard.insert(key.clone(), PollState::now());
            self.dirty.insert(key.clone());
        }
        keys.len()
    }

    /// The first waiting entry of each queue marked for a check (up to `max`).
    pub(super) fn next_checks(&mut self, max: usize) -> Vec<(QueueSlot, String)> {
        let keys: Vec<Vec<u8>> = self.dirty.iter().take(max).cloned().collect();
        let mut out = Vec::with_capacity(keys.len());
        let now = Instant::now();
        for key in keys {
            self.dirty.remove(&key);
            if let Some(heard) = self.heard.get_mut(&key) {
                heard.at = now;
            }
            if let Some((member, id)) = self.queues.get(&key).and_then(|q| q.first_key_value()) {
                out.push((
                    QueueSlot {
                        key: key.clone(),
                        member: member.clone(),
                    },
                    id.clone(),
                ));
            }
        }
        out
    }

    pub(super) fn has_checks(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Applies a head check's verdict to the entry it was about.
    pub(super) fn apply(&mut self, slot: &QueueSlot, id: &str, check: HeadCheck) -> Checked {
        let Some(held) = self.held.get_mut(id) else {
            return Checked::Stale;
        };
        if !matches!(held.state, State::Waiting) {
            return Checked::Stale;
        }
        match check.head {
            Head::Go => {
                held.state = State::Ready;
                held.waits.turn = Some(std::time::SystemTime::now());
                let business = held.business;
                self.dequeue(slot);
                self.push_ready(business, id.to_owned());
                Checked::Ready
            }
            Head::Wait => Checked::Waiting,
            Head::Gone => {
                self.remove(id);
                // The next waiting entry of this queue may be the head now.
                self.touch(&slot.key);
                Checked::Gone
            }
        }
    }

    fn dequeue(&mut self, slot: &QueueSlot) {
        if let Some(q) = self.queues.get_mut(&slot.key) {
            q.remove(&slot.member);
            if q.is_empty() {
                self.queues.remove(&slot.key);
                self.heard.remove(&slot.key);
                self.dirty.remove(&slot.key);
            } else {
                // The queue moved on: its next entry's wait starts now.
                self.heard.insert(slot.key.clone(), PollState::now());
            }
        }
    }

    fn push_ready(&mut self, business: BusinessKey, id: String) {
        let queue = self.ready.entry(business).or_default();
        if queue.is_empty() {
            self.turns.push_back(business);
        }
        queue.push_back(id);
        *self.ready_by.entry(business).or_default() += 1;
    }

    fn ready_left(&mut self, business: BusinessKey) {
        count_down(&mut self.ready_by, business);
    }

    /// Ready entries that could start now: those of businesses below their cap, up to it (the
    /// rest are parked and do not count against the reader's limit).
    pub(super) fn startable_len(&self, cap: impl Fn(BusinessKey) -> usize) -> usize {
        self.ready_by
            .iter()
            .map(|(b, n)| {
                let running = self.running.get(b).copied().unwrap_or(0);
                (*n).min(cap(*b).saturating_sub(running))
            })
            .sum()
    }

    /// The next ready entry, marked running under `token`, with whether its fields must be
    /// fetched first: from the next business in turn that runs fewer than `cap(business)`.
    pub(super) fn start_next(
        &mut self,
        token: &CancellationToken,
        cap: impl Fn(BusinessKey) -> usize,
    ) -> Option<(StreamEntry, bool, super::Waits)> {
        for _ in 0..self.turns.len() {
            let business = self.turns.pop_front()?;
            let running = self.running.get(&business).copied().unwrap_or(0);
            if running >= cap(business) {
                self.turns.push_back(business);
                continue;
            }
            let Some(queue) = self.ready.get_mut(&business) else {
                continue;
            };
            let mut started = None;
            while let Some(id) = queue.pop_front() {
                if let Some(held) = self.held.get_mut(&id)
                    && matches!(held.state, State::Ready)
                {
                    held.state = State::Running(token.clone());
                    started = Some(id);
                    break;
                }
            }
            if queue.is_empty() {
                self.ready.remove(&business);
            } else {
                self.turns.push_back(business);
            }
            let Some(id) = started else {
                continue;
            };
            self.ready_left(business);
            *self.running.entry(business).or_default() += 1;
            let held = self.held.get_mut(&id)?;
            self.kept_bytes = self
                .kept_bytes
                .saturating_sub(std::mem::take(&mut held.kept));
            let needs_fields = !held.has_fields;
            // The task gets the fields; the room keeps what it needs of a running entry (its
            // id, queue slot and business).
            let fields = std::mem::take(&mut held.entry.fields);
            let entry = StreamEntry {
                fields,
                ..held.entry.clone()
            };
            return Some((entry, needs_fields, held.waits));
        }
        None
    }

    /// Forgets an entry (finished, given up, or lost); cancels its work if it runs. Returns
    /// its queue slot, if it had one.
    pub(super) fn remove(&mut self, id: &str) -> Option<QueueSlot> {
        let held = self.held.remove(id)?;
        self.kept_bytes = self.kept_bytes.saturating_sub(held.kept);
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        match &held.state {
            State::Running(token) => {
                token.cancel();
                count_down(&mut self.running, held.business);
            }
            State::Ready => self.ready_left(held.business),
            State::Waiting => {
                if let Some(slot) = &held.entry.slot {
                    self.dequeue(slot);
                }
            }
        }
        held.entry.slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, key: Option<&str>) -> StreamEntry {
        StreamEntry {
            id: id.into(),
            fields: vec![(b"content".to_vec(), b"x".to_vec())],
            deliveries: 1,
            slot: key.map(|k| QueueSlot {
                key: k.as_bytes().to_vec(),
                member: crate::stream::order::member(id),
            }),
            at_head: None,
            counted: false,
        }
    }

    #[test]
    fn an_entry_delivered_at_its_queues_head_is_ready_without_a_check() {
        let mut room = Room::default();
        let mut first = entry("1-0", Some("q"));
        first.at_head = Some(true);
        assert!(room.admit(first));
        assert_eq!(room.ready_len(), 1);
        assert!(!room.has_checks(), "no head check for it");
        // Behind an entry of the same queue that waits here, the flag is not trusted.
        let mut room = Room::default();
        assert!(room.admit(entry("1-0", Some("q"))));
        let mut later = entry("2-0", Some("q"));
        later.at_head = Some(true);
        assert!(room.admit(later));
        assert_eq!(room.ready_len(), 0);
        assert_eq!(room.next_checks(10).len(), 1, "only the first is checked");
    }

    fn verdict(head: Head) -> HeadCheck {
        HeadCheck {
            head,
            healed: 0,
            trimmed: 0,
        }
    }

    #[test]
    fn only_the_first_waiting_entry_of_a_queue_is_checked() {
        let mut room = Room::default();
        for i in 1..=1000 {
            assert!(room.admit(entry(&format!("{i}-0"), Some("busy"))));
        }
        assert!(room.admit(entry("5000-0", Some("quiet"))));
        assert!(!room.admit(entry("1-0", Some("busy"))), "held once");
        let mut checks = room.next_checks(10);
        checks.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(checks.len(), 2, "one check per queue, not per entry");
        assert_eq!(checks[0].1, "1-0");
        assert_eq!(checks[1].1, "5000-0");
        assert_eq!(
            room.apply(&checks[0].0, "1-0", verdict(Head::Wait)),
            Checked::Waiting
        );
        assert_eq!(
            room.apply(&checks[1].0, "5000-0", verdict(Head::Go)),
            Checked::Ready
        );
        let token = CancellationToken::new();
        let (started, fetch, _) = room
            .start_next(&token, |_| usize::MAX)
            .expect("the quiet user's entry");
        assert_eq!(started.id, "5000-0");
        assert!(!fetch);
        assert!(
            room.start_next(&token, |_| usize::MAX).is_none(),
            "the busy user's entries wait"
        );
        // Small entries keep their fields while they wait: no fetch when their turn comes.
        assert!(room.touch(b"busy"));
        let checks = room.next_checks(10);
        assert_eq!(
            room.apply(&checks[0].0, "1-0", verdict(Head::Go)),
            Checked::Ready
        );
        let (started, fetch, _) = room.start_next(&token, |_| usize::MAX).expect("head");
        assert_eq!(started.id, "1-0");
        assert!(!fetch);
    }

    #[test]
    fn waiting_entries_beyond_the_fields_budget_keep_their_ids_only() {
        let mut room = Room::default();
        let big = |id: &str| {
            let mut e = entry(id, Some("q"));
            e.fields = vec![(b"content".to_vec(), vec![b'x'; 1 << 20])];
            e
        };
        for i in 1..=40 {
            assert!(room.admit(big(&format!("{i}-0"))));
        }
        let kept = room.held.values().filter(|h| h.has_fields).count();
        assert_eq!(kept, 31, "32 MiB of 1 MiB entries (and their overhead)");
        assert!(room.kept_bytes <= KEPT_FIELDS_BUDGET);
        // Started or removed entries give their bytes back.
        for i in 1..=40 {
            room.remove(&format!("{i}-0"));
        }
        assert_eq!(room.kept_bytes, 0);
    }

    #[test]
    fn a_wake_naming_the_first_waiting_entry_makes_it_ready_without_a_check() {
        let mut room = Room::default();
        assert!(room.admit(entry("1-0", Some("q"))));
        assert!(room.admit(entry("2-0", Some("q"))));
        let _ = room.next_checks(10);
        // A wake naming another head (say, an entry another worker holds) means a check.
        let other = Wake {
            key: b"q".to_vec(),
            head: Some(crate::stream::order::member("0-5")),
        };
        assert!(room.wake(&other));
        assert_eq!(room.ready_len(), 0);
        assert!(room.has_checks());
        let _ = room.next_checks(10);
        let ours = Wake {
            key: b"q".to_vec(),
            head: Some(crate::stream::order::member("1-0")),
        };
        assert!(room.wake(&ours));
        assert_eq!(room.ready_len(), 1);
        assert!(!room.has_checks());
        assert!(!room.wake(&Wake {
            key: b"elsewhere".to_vec(),
            head: None
        }));
    }

    #[test]
    fn an_entry_behind_another_waits_for_its_wake_up_even_one_that_came_first() {
        let mut room = Room::default();
        let mut behind = entry("2-0", Some("q"));
        behind.at_head = Some(false);
        assert!(room.admit(behind));
        assert!(
            !room.has_checks(),
            "no check: the claim saw an earlier entry"
        );
        // The wake-up for an entry admitted later is remembered.
        let early = Wake {
            key: b"r".to_vec(),
            head: Some(crate::stream::order::member("3-0")),
        };
        assert!(!room.wake(&early));
        let mut late = entry("3-0", Some("r"));
        late.at_head = Some(false);
        assert!(room.admit(late));
        assert_eq!(room.ready_len(), 1, "its wake-up came before it");
    }

    #[test]
    fn free_slots_go_to_businesses_in_turn_each_up_to_its_cap() {
        let (a, b) = (Uuid::from_u128(0xA), Uuid::from_u128(0xB));
        let of = |id: &str, business: Uuid| {
            let mut e = entry(id, None);
            e.fields
                .push((b"business_id".to_vec(), business.to_string().into_bytes()));
            e
        };
        let mut room = Room::default();
        for i in 1..=10 {
            assert!(room.admit(of(&format!("{i}-0"), a)));
        }
        assert!(room.admit(of("11-0", b)));
        assert!(room.admit(of("12-0", b)));
        let cap = |business: BusinessKey| if business == Some(a) { 2 } else { usize::MAX };
        assert_eq!(room.startable_len(cap), 4, "two of A's ten, both of B's");
        let token = CancellationToken::new();
        let mut started = Vec::new();
        while let Some((e, _, _)) = room.start_next(&token, cap) {
            started.push(e.id);
        }
        assert_eq!(
            started,
            ["1-0", "11-0", "2-0", "12-0"],
            "in turn, A capped at two"
        );
        assert_eq!(room.startable_len(cap), 0, "A's other eight are parked");
        assert_eq!(room.ready_len(), 8);
        // A finished entry frees a slot of A's.
        room.remove("1-0");
        assert_eq!(room.startable_len(cap), 1);
        let (e, _, _) = room.start_next(&token, cap).expect("A's next");
        assert_eq!(e.id, "3-0");
    }

    #[test]
    fn the_safety_net_checks_only_queues_quiet_for_a_whole_interval() {
        let mut room = Room::default();
        assert!(room.admit(entry("1-0", Some("a"))));
        let _ = room.next_checks(10);
        assert_eq!(room.touch_quiet(Duration::from_secs(60)), 0, "just checked");
        assert_eq!(room.touch_quiet(Duration::ZERO), 1);
    }

    #[test]
    fn the_safety_net_waits_twice_as_long_after_each_check_that_found_the_queue_waiting() {
        let mut room = Room::default();
        assert!(room.admit(entry("1-0", Some("a"))));
        let _ = room.next_checks(10);
        // Short enough that moving instants into the past cannot underflow on a machine just
        // booted, long enough that the test's own run time does not count.
        let quiet = Duration::from_secs(1);
        // Moves the queue's last news `by` into the past.
        let age = |room: &mut Room, by: Duration| {
            room.heard.get_mut(b"a".as_slice()).expect("heard").at -= by;
        };
        age(&mut room, quiet);
        assert_eq!(room.touch_quiet(quiet), 1, "quiet for one interval");
        let checks = room.next_checks(10);
        assert_eq!(
            room.apply(&checks[0].0, "1-0", verdict(Head::Wait)),
            Checked::Waiting
        );
        age(&mut room, quiet);
        assert_eq!(
            room.touch_quiet(quiet),
            0,
            "the next check waits two intervals"
        );
        age(&mut room, quiet);
        assert_eq!(room.touch_quiet(quiet), 1);
        let _ = room.next_checks(10);
        age(&mut room, quiet * 3);
        assert_eq!(room.touch_quiet(quiet), 0, "then four");
        // A wake-up is news of the queue: the interval starts over.
        assert!(room.wake(&Wake {
            key: b"a".to_vec(),
            head: None,
        }));
        let _ = room.next_checks(10);
        age(&mut room, quiet);
        assert_eq!(room.touch_quiet(quiet), 1);
        // The interval stops doubling at 8 x.
        for _ in 0..10 {
            let _ = room.next_checks(10);
            age(&mut room, quiet * 8);
            assert_eq!(room.touch_quiet(quiet), 1);
        }
    }

    #[test]
    fn a_new_subscription_checks_every_waiting_queue() {
        let mut room = Room::default();
        assert!(room.admit(entry("1-0", Some("a"))));
        assert!(room.admit(entry("2-0", Some("b"))));
        let _ = room.next_checks(10);
        assert!(!room.has_checks());
        assert_eq!(room.touch_all(), 2);
        assert_eq!(room.next_checks(10).len(), 2);
    }

    #[test]
    fn a_lost_running_entry_is_cancelled_and_a_gone_head_lets_the_next_be_checked() {
        let mut room = Room::default();
        room.admit(entry("1-0", Some("q")));
        room.admit(entry("2-0", Some("q")));
        let checks = room.next_checks(10);
        assert_eq!(
            room.apply(&checks[0].0, "1-0", verdict(Head::Gone)),
            Checked::Gone
        );
        let checks = room.next_checks(10);
        assert_eq!(checks[0].1, "2-0");
        assert_eq!(
            room.apply(&checks[0].0, "2-0", verdict(Head::Go)),
            Checked::Ready
        );
        let token = CancellationToken::new();
        room.start_next(&token, |_| usize::MAX).expect("2-0");
        room.remove("2-0");
        assert!(token.is_cancelled());
        assert_eq!(room.len(), 0);
    }
}
