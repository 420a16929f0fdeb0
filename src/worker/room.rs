//! The waiting room: every entry a worker holds, and what it waits on.
//!
//! An entry is *waiting* (behind an earlier entry of its user, keeping only its id once the
//! first check said so), *ready* (its turn has come or it has no queue; it waits for a
//! processing slot) or *running*. Waiting entries hold no processing slot and no task, so one
//! user's backlog of thousands costs memory for ids only and delays nobody else: the queues
//! are checked by key, and only the first waiting entry of each queue is checked.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

use crate::stream::StreamEntry;
use crate::stream::order::{Head, HeadCheck, QueueSlot};

enum State {
    Waiting,
    Ready,
    Running(CancellationToken),
}

struct Held {
    entry: StreamEntry,
    /// Whether `entry.fields` holds the fields (a waiting entry drops them).
    has_fields: bool,
    state: State,
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

#[derive(Default)]
pub(super) struct Room {
    held: HashMap<String, Held>,
    /// Waiting entries per queue key: member → entry id, in stream order.
    queues: HashMap<Vec<u8>, BTreeMap<String, String>>,
    /// Queues whose first waiting entry must be checked.
    dirty: HashSet<Vec<u8>>,
    ready: VecDeque<String>,
    ready_count: usize,
    /// The held ids, shared with the heartbeat.
    ids: Arc<Mutex<HashSet<String>>>,
}

impl Room {
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    pub(super) fn ready_len(&self) -> usize {
        self.ready_count
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
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone());
        let mut has_fields = true;
        let state = match &entry.slot {
            Some(slot) => {
                let queue = self.queues.entry(slot.key.clone()).or_default();
                queue.insert(slot.member.clone(), id.clone());
                // Behind another waiting entry of the same user: it will wait, so it keeps its
                // id only (the fields are fetched when its turn comes).
                has_fields = queue.len() == 1;
                self.dirty.insert(slot.key.clone());
                State::Waiting
            }
            None => {
                self.ready.push_back(id.clone());
                self.ready_count += 1;
                State::Ready
            }
        };
        let mut entry = entry;
        if !has_fields {
            entry.fields = Vec::new();
        }
        self.held.insert(
            id,
            Held {
                entry,
                has_fields,
                state,
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

    /// Marks every queue with waiting entries for a check (the safety-net poll).
    pub(super) fn touch_all(&mut self) -> usize {
        self.dirty.extend(self.queues.keys().cloned());
        self.dirty.len()
    }

    /// The first waiting entry of each queue marked for a check (up to `max`).
    pub(super) fn next_checks(&mut self, max: usize) -> Vec<(QueueSlot, String)> {
        let keys: Vec<Vec<u8>> = self.dirty.iter().take(max).cloned().collect();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            self.dirty.remove(&key);
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
                self.dequeue(slot);
                if let Some(held) = self.held.get_mut(id) {
                    held.state = State::Ready;
                }
                self.ready.push_back(id.to_owned());
                self.ready_count += 1;
                Checked::Ready
            }
            Head::Wait => {
                if held.has_fields {
                    held.entry.fields = Vec::new();
                    held.has_fields = false;
                }
                Checked::Waiting
            }
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
                self.dirty.remove(&slot.key);
            }
        }
    }

    /// The next ready entry, marked running under `token`; with whether its fields must be
    /// fetched first.
    pub(super) fn start_next(&mut self, token: &CancellationToken) -> Option<(StreamEntry, bool)> {
        while let Some(id) = self.ready.pop_front() {
            let Some(held) = self.held.get_mut(&id) else {
                continue;
            };
            if !matches!(held.state, State::Ready) {
                continue;
            }
            self.ready_count = self.ready_count.saturating_sub(1);
            held.state = State::Running(token.clone());
            let needs_fields = !held.has_fields;
            return Some((held.entry.clone(), needs_fields));
        }
        None
    }

    /// Forgets an entry (finished, given up, or lost); cancels its work if it runs. Returns
    /// its queue slot, if it had one.
    pub(super) fn remove(&mut self, id: &str) -> Option<QueueSlot> {
        let held = self.held.remove(id)?;
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        match &held.state {
            State::Running(token) => token.cancel(),
            State::Ready => self.ready_count = self.ready_count.saturating_sub(1),
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
        }
    }

    fn verdict(head: Head) -> HeadCheck {
        HeadCheck { head, healed: 0 }
    }

    #[test]
    fn only_the_first_waiting_entry_of_a_queue_is_checked_and_waiters_keep_ids_only() {
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
        let (started, fetch) = room.start_next(&token).expect("the quiet user's entry");
        assert_eq!(started.id, "5000-0");
        assert!(!fetch);
        assert!(
            room.start_next(&token).is_none(),
            "the busy user's entries wait"
        );
        // The waiting head dropped its fields; it fetches them when its turn comes.
        assert!(room.touch(b"busy"));
        let checks = room.next_checks(10);
        assert_eq!(
            room.apply(&checks[0].0, "1-0", verdict(Head::Go)),
            Checked::Ready
        );
        let (started, fetch) = room.start_next(&token).expect("head");
        assert_eq!(started.id, "1-0");
        assert!(fetch);
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
        room.start_next(&token).expect("2-0");
        room.remove("2-0");
        assert!(token.is_cancelled());
        assert_eq!(room.len(), 0);
    }
}
