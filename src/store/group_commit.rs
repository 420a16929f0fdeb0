//! Group commit: the write sets of messages that are ready at the same moment go to PostgreSQL
//! together, in one transaction and one round trip, instead of one transaction (and one WAL
//! flush) each.
//!
//! What holds for every message of a batch, as for a message committed alone:
//! - **Atomic**: its rows are all in the batch's transaction, so none is visible without the
//!   others; the batch commits whole or not at all.
//! - **Scoped**: each message's statements run after a `SET LOCAL` of its own business (and of
//!   its own deadline's `statement_timeout`), so row-level security checks every statement
//!   against the business it writes.
//! - **Alone when it fails**: a statement that PostgreSQL refuses names its message; that
//!   message gets its own error (and is retried alone by its caller), and the rest of the batch
//!   runs again without it. A failure no message can be blamed for (the connection lost, the
//!   `COMMIT` refused) sends every member back to commit alone; one whose batch did commit is
//!   then found committed (its idempotency key, its conversation's version), as after any
//!   commit whose answer was lost.
//! - **Finished after its commit**: a caller's future resolves when its batch's `COMMIT`
//!   answered, so its reply and acknowledgement come after its rows are durable.
//! - A user's messages are never in one batch or in two batches at once: the worker processes a
//!   user's messages one after the other, and a message's write is its last step before the
//!   finish.
//!
//! Batches adapt to the load: one committer task takes what is waiting when a batch may start
//! (at most `worker.commit_batches_in_flight` run at once); an idle worker's message starts a
//! batch of one at once (no added latency), and under load the messages that arrive while
//! batches run are the next batch, up to `worker.commit_batch_max`. With other batches running,
//! a batch may also wait up to `worker.commit_batch_wait_us` for more.
//!
//! On Citus a batch holds messages of one business only: a business's rows are on one node, so
//! the batch stays a single-node transaction (several businesses could be on several nodes,
//! which would make it a distributed one with a two-phase commit).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_postgres::Statement;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::write_set::{Bound, CommittedConversation, WriteSet, classify, committed};
use super::{Store, StoreError, scope_sql};
use crate::telemetry::metrics;

/// How batches are formed (`worker.commit_batch_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Messages in one batch at most.
    pub max: usize,
    /// With other batches running, how long a batch that is not full waits for more.
    pub wait: Duration,
    /// Batches committing at once.
    pub in_flight: usize,
}

/// One message's write, waiting for its batch.
struct Member {
    ws: Arc<WriteSet>,
    /// The message's deadline: its statements' `statement_timeout` ends them before it.
    deadline: Option<Instant>,
    /// Test fault: the member's statements fail inside a batch (never alone).
    poisoned: bool,
    done: oneshot::Sender<Outcome>,
}

/// What became of a member's write in a batch.
#[derive(Debug)]
enum Outcome {
    Committed(CommittedConversation),
    /// PostgreSQL refused one of its own statements.
    Failed(StoreError),
    /// The batch failed for a reason that is not this member's: commit it alone.
    Alone,
}

/// The committer of one process: hand it write sets with [`GroupCommit::commit`].
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Member>,
    store: Store,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

/// Rounds in which a batch runs again without the members that failed in it, before the rest
/// commit alone.
const RERUNS: usize = 8;

/// A member with less time than this before its deadline is not batched.
const LATE: Duration = Duration::from_millis(100);

/// The statement a poisoned member adds to its batch (a serialization failure: retryable).
const POISON: &str =
    "DO $$BEGIN RAISE EXCEPTION 'poisoned batch member' USING ERRCODE = '40001'; END$$";

impl GroupCommit {
    /// Starts the committer task on the current runtime.
    pub fn start(store: Store, settings: Settings) -> GroupCommit {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store.clone(), settings, rx));
        GroupCommit { tx, store }
    }

    /// Commits `ws` in the next batch. `poisoned` (a test fault) makes its statements fail
    /// inside a batch, so that it is retried alone.
    ///
    /// # Errors
    /// As [`Store::commit_write_set`]; the error of this write set's own statements only.
    pub async fn commit(
        &self,
        ws: Arc<WriteSet>,
        poisoned: bool,
    ) -> Result<CommittedConversation, StoreError> {
        let (done, outcome) = oneshot::channel();
        let member = Member {
            ws: ws.clone(),
            deadline: super::DEADLINE.try_with(|d| *d).ok(),
            poisoned,
            done,
        };
        let outcome = if self.tx.send(member).is_ok() {
            outcome.await.unwrap_or(Outcome::Alone)
        } else {
            Outcome::Alone
        };
        match outcome {
            Outcome::Committed(c) => Ok(c),
            Outcome::Failed(e) => Err(e),
            Outcome::Alone => self.store.commit_write_set(&ws, || Ok(())).await,
        }
    }
}

/// The committer: takes what is waiting whenever a batch may start.
async fn run(store: Store, settings: Settings, mut rx: mpsc::UnboundedReceiver<Member>) {
    let permits = Arc::new(Semaphore::new(settings.in_flight.max(1)));
    let max = settings.max.max(1);
    // Members passed over for a batch of another business (Citus), first in line next time.
    let mut deferred: VecDeque<Member> = VecDeque::new();
    // Whether batches hold one business only: unknown until the database was asked.
    let mut one_business: Option<bool> = None;
    loop {
        let first = match deferred.pop_front() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => return,
            },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        if one_business.is_none() {
            one_business = on_citus(&store).await;
        }
        let mut forming = Forming::new(first, max, one_business.unwrap_or(true));
        let mut passed = VecDeque::new();
        while !forming.is_full() {
            let Some(m) = deferred.pop_front() else { break };
            if let Some(refused) = forming.offer(m) {
                passed.push_back(refused);
            }
        }
        passed.append(&mut deferred);
        deferred = passed;
        let busy = permits.available_permits() + 1 < settings.in_flight.max(1);
        let until =
            (busy && !settings.wait.is_zero()).then(|| tokio::time::Instant::now() + settings.wait);
        while !forming.is_full() {
            let next = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => match until {
                    Some(until) => tokio::time::timeout_at(until, rx.recv())
                        .await
                        .ok()
                        .flatten(),
                    None => None,
                },
            };
            let Some(m) = next else { break };
            if let Some(refused) = forming.offer(m) {
                deferred.push_back(refused);
            }
        }
        let mut batch = forming.batch;
        batch.retain(|m| !m.done.is_closed());
        if batch.is_empty() {
            continue;
        }
        let store = store.clone();
        tokio::spawn(async move {
            commit_batch(&store, batch).await;
            drop(permit);
        });
    }
}

/// A batch being formed: at most `max` members, of the first one's business only when
/// `one_business` (Citus).
struct Forming {
    batch: Vec<Member>,
    max: usize,
    one_business: bool,
}

impl Forming {
    fn new(first: Member, max: usize, one_business: bool) -> Forming {
        Forming {
            batch: vec![first],
            max: max.max(1),
            one_business,
        }
    }

    fn is_full(&self) -> bool {
        self.batch.len() >= self.max
    }

    /// Takes `m` into the batch, or gives it back (the batch is full, or `m` is of another
    /// business where a batch holds one).
    fn offer(&mut self, m: Member) -> Option<Member> {
        let business = self.batch[0].ws.business_id;
        if self.is_full() || (self.one_business && m.ws.business_id != business) {
            return Some(m);
        }
        self.batch.push(m);
        None
    }
}

/// Whether the database is Citus (batches of one business), `None` when it cannot be asked now.
async fn on_citus(store: &Store) -> Option<bool> {
    let client = store.client().await.ok()?;
    super::distribution::is_citus(&client).await.ok()
}

/// Commits a batch: again without the members whose statements failed, up to [`RERUNS`]
/// times; every member is told its outcome.
async fn commit_batch(store: &Store, mut batch: Vec<Member>) {
    metrics::commit_batch(batch.len());
    for round in 0..=RERUNS {
        if batch.is_empty() {
            return;
        }
        if round == RERUNS {
            metrics::commit_batch_rerun("gave_up");
            for m in batch {
                let _ = m.done.send(Outcome::Alone);
            }
            return;
        }
        // A member with less than the margin left would only fail its batch: it commits
        // alone (and meets its own deadline there).
        let now = Instant::now();
        let (late, on_time): (Vec<Member>, Vec<Member>) = batch.into_iter().partition(|m| {
            m.deadline
                .is_some_and(|d| d.saturating_duration_since(now) < LATE)
        });
        batch = on_time;
        for m in late {
            let _ = m.done.send(Outcome::Alone);
        }
        if batch.is_empty() {
            return;
        }
        if batch.len() == 1 && !batch[0].poisoned {
            // Alone anyway: the single-message path (its own statements' errors classified).
            let m = batch.remove(0);
            let write = store.commit_write_set(&m.ws, || Ok(()));
            // Under the message's deadline, as in its own task.
            let result = match m.deadline {
                Some(d) => super::DEADLINE.scope(d, write).await,
                None => write.await,
            };
            let outcome = match result {
                Ok(c) => Outcome::Committed(c),
                Err(e) => Outcome::Failed(e),
            };
            let _ = m.done.send(outcome);
            return;
        }
        match attempt(store, &batch).await {
            Attempt::Committed(rows) => {
                for (m, c) in batch.into_iter().zip(rows) {
                    let outcome = match c {
                        Ok(c) => Outcome::Committed(c),
                        Err(e) => Outcome::Failed(e),
                    };
                    let _ = m.done.send(outcome);
                }
                return;
            }
            Attempt::MemberFailed(i, e) => {
                metrics::commit_batch_rerun("member_failed");
                let m = batch.remove(i);
                let _ = m.done.send(Outcome::Failed(e));
                batch.retain(|m| !m.done.is_closed());
            }
            Attempt::Failed => {
                metrics::commit_batch_rerun("batch_failed");
                for m in batch {
                    let _ = m.done.send(Outcome::Alone);
                }
                return;
            }
        }
    }
}

/// One try of a batch.
enum Attempt {
    /// Committed; per member, its committed conversation (or a version conflict: its
    /// conversation was not the one it read, so its statements wrote nothing).
    Committed(Vec<Result<CommittedConversation, StoreError>>),
    /// Member `i`'s statement was refused (nothing committed).
    MemberFailed(usize, StoreError),
    /// Not committed, for no member's fault (or not known to be).
    Failed,
}

type Request<'a> = std::pin::Pin<
    Box<dyn Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + Send + 'a>,
>;

/// Sends `BEGIN`, each member's scope and statements, and `COMMIT`, pipelined: one round trip.
async fn attempt(store: &Store, batch: &[Member]) -> Attempt {
    let Ok(client) = store.client().await else {
        return Attempt::Failed;
    };
    // A connection that stops answering must not hold a batch slot for ever: past the
    // latest member's deadline (or the sessions' statement timeout) the batch is given up, its
    // members commit alone, and the connection is dropped rather than pooled again.
    match tokio::time::timeout(time_limit(store, batch), attempt_on(&client, store, batch)).await {
        Ok(attempt) => attempt,
        Err(_) => {
            drop(deadpool_postgres::Object::take(client));
            Attempt::Failed
        }
    }
}

/// How long a batch may take at most.
fn time_limit(store: &Store, batch: &[Member]) -> Duration {
    let now = Instant::now();
    let latest = batch
        .iter()
        .map(|m| m.deadline.map(|d| d.saturating_duration_since(now)))
        .collect::<Option<Vec<_>>>()
        .and_then(|left| left.into_iter().max());
    match latest {
        Some(left) => left + Duration::from_secs(1),
        None if store.statement_timeout_ms() > 0 => {
            Duration::from_millis(store.statement_timeout_ms()) + Duration::from_secs(5)
        }
        None => Duration::from_secs(120),
    }
}

/// The statement sent before `COMMIT` when members have deadlines: it fails the batch when the
/// earliest of them is past (`ms` after the transaction's start, which is after the time left
/// was measured), so that no member commits after its worker gave it up. A statement's
/// `statement_timeout` bounds that statement only, and a member's statements may wait behind
/// its batch-mates'.
pub fn deadline_guard(ms: u64) -> String {
    format!(
        "DO $$BEGIN IF clock_timestamp() > now() + interval '{ms} milliseconds' THEN \
         RAISE EXCEPTION 'a batch member''s deadline passed' USING ERRCODE = '57014'; \
         END IF; END$$"
    )
}

async fn attempt_on(
    client: &deadpool_postgres::Client,
    store: &Store,
    batch: &[Member],
) -> Attempt {
    let mut bound = Vec::with_capacity(batch.len());
    for m in batch {
        match Bound::prepare(client, &m.ws).await {
            Ok(b) => bound.push(b),
            Err(_) => return Attempt::Failed,
        }
    }
    let scopes: Vec<String> = batch
        .iter()
        .map(|m| {
            let timeout = store
                .timeout_until(m.deadline)
                .unwrap_or(store.statement_timeout_ms());
            scope_sql(m.ws.business_id, Some(timeout))
        })
        .collect();
    let steps: Vec<Vec<(&Statement, Vec<&(dyn ToSql + Sync)>)>> =
        bound.iter().map(Bound::steps).collect();
    let guard = batch
        .iter()
        .filter_map(|m| store.timeout_until(m.deadline))
        .min()
        .map(deadline_guard);
    // Per member: the index of its first request and how many it sent.
    let mut spans = Vec::with_capacity(batch.len());
    let mut requests: Vec<Request<'_>> = Vec::new();
    requests.push(Box::pin(async {
        client.batch_execute("BEGIN").await.map(|()| Vec::new())
    }));
    for ((m, scope), steps) in batch.iter().zip(&scopes).zip(&steps) {
        let start = requests.len();
        requests.push(Box::pin(async {
            client.batch_execute(scope).await.map(|()| Vec::new())
        }));
        for (stmt, params) in steps {
            requests.push(Box::pin(client.query(*stmt, params)));
        }
        if m.poisoned {
            requests.push(Box::pin(async {
                client.batch_execute(POISON).await.map(|()| Vec::new())
            }));
        }
        spans.push((start, requests.len() - start));
    }
    let guard_at = requests.len();
    if let Some(guard) = &guard {
        requests.push(Box::pin(async {
            client.batch_execute(guard).await.map(|()| Vec::new())
        }));
    }
    requests.push(Box::pin(async {
        client.batch_execute("COMMIT").await.map(|()| Vec::new())
    }));
    store.count_round_trip();
    // Each request is sent when it is first polled, and `join_all` polls them in order.
    let results = futures::future::join_all(requests).await;
    outcome_of(results, &spans, guard.is_some().then_some(guard_at))
}

/// What a batch's results say: the first refused statement names its member (the ones after
/// it fail as "in a failed transaction"); else whether the guard and `COMMIT` let it commit.
/// `spans` holds each member's first request and how many it sent; `guard_at` the guard's.
fn outcome_of(
    mut results: Vec<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>,
    spans: &[(usize, usize)],
    guard_at: Option<usize>,
) -> Attempt {
    let commit = results.pop();
    let begin = results.first().map(Result::is_ok).unwrap_or(false);
    if !begin {
        return Attempt::Failed;
    }
    for (i, &(start, len)) in spans.iter().enumerate() {
        for r in &mut results[start..start + len] {
            let Err(e) = r else { continue };
            if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) {
                continue;
            }
            if e.as_db_error().is_none() {
                // The connection, not a statement: nobody's fault.
                return Attempt::Failed;
            }
            let e = std::mem::replace(r, Ok(Vec::new()));
            let Err(e) = e else { continue };
            return Attempt::MemberFailed(i, classify(StoreError::Db(e)));
        }
    }
    // A passed deadline (the guard refused to commit), or a `COMMIT` that failed: nothing
    // committed, for no one member's statement.
    let guard_failed = guard_at.is_some_and(|at| results.get(at).is_some_and(Result::is_err));
    if guard_failed || !matches!(commit, Some(Ok(_))) {
        return Attempt::Failed;
    }
    let mut rows = Vec::with_capacity(spans.len());
    for &(start, len) in spans {
        // The scope's result first, then the statements'.
        let own: Vec<Vec<tokio_postgres::Row>> = results[start + 1..start + len]
            .iter_mut()
            .map(|r| std::mem::replace(r, Ok(Vec::new())).unwrap_or_default())
            .collect();
        rows.push(committed(own));
    }
    Attempt::Committed(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn member(business: u128) -> Member {
        let ws = WriteSet {
            business_id: Uuid::from_u128(business),
            log_id: Uuid::nil(),
            user_external_id: String::new(),
            conversation_id: Uuid::nil(),
            expected_version: None,
            stage_id: Uuid::nil(),
            transition: None,
            extracted: Default::default(),
            idempotency_key: String::new(),
            inbound_id: String::new(),
            user_message_id: Uuid::nil(),
            user_content: String::new(),
            metadata: None,
            user_stage_id: Uuid::nil(),
            assistant_message_id: Uuid::nil(),
            assistant_content: String::new(),
            assistant_status: "ok",
            fallback_template: None,
            reply_template: None,
            reply_model: None,
            timings: serde_json::Value::Null,
            llm_calls: Vec::new(),
            actions: Vec::new(),
            handoff: None,
            followers: Vec::new(),
        };
        Member {
            ws: Arc::new(ws),
            deadline: None,
            poisoned: false,
            done: oneshot::channel().0,
        }
    }

    fn businesses(f: &Forming) -> Vec<u128> {
        f.batch.iter().map(|m| m.ws.business_id.as_u128()).collect()
    }

    #[test]
    fn on_citus_a_batch_holds_its_first_members_business_only() {
        let mut f = Forming::new(member(1), 3, true);
        assert!(
            f.offer(member(2)).is_some(),
            "another business is given back"
        );
        assert!(f.offer(member(1)).is_none());
        assert!(f.offer(member(3)).is_some());
        assert!(f.offer(member(1)).is_none());
        assert!(f.is_full());
        assert!(f.offer(member(1)).is_some(), "a full batch takes no more");
        assert_eq!(businesses(&f), vec![1, 1, 1]);
    }

    #[test]
    fn on_postgresql_a_batch_mixes_businesses_up_to_its_size() {
        let mut f = Forming::new(member(1), 3, false);
        assert!(f.offer(member(2)).is_none());
        assert!(f.offer(member(3)).is_none());
        assert!(f.offer(member(4)).is_some());
        assert_eq!(businesses(&f), vec![1, 2, 3]);
    }
}
