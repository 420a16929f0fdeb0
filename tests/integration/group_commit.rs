//! Group commit (`store::group_commit`): write sets of different users committed in one
//! transaction keep every message's guarantees. Rows committed by one transaction share its
//! `xmin`, so the database itself shows which messages went together: each message's rows in
//! exactly one transaction, a failing member in a transaction of its own, batch-mates together.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use icmp::config::Config;
use icmp::llm::mock::MockOptions;
use icmp::pipeline::failpoint;

use crate::helpers::{self, DEMO_BUSINESS, TestApp, spawn_env};
use crate::reliability::{assert_exactly_once, assert_stored_in_order, ids, workload};

/// Batches that form readily: two at a time, one waiting a little for more while the other
/// commits.
fn batching(c: &mut Config) {
    c.worker.commit_batch_max = 16;
    c.worker.commit_batches_in_flight = 2;
    c.worker.commit_batch_wait_us = 5_000;
    c.worker.concurrency = 256;
    c.database.pool_size = 8;
}

/// The transaction (`xmin`) of each idempotency key's rows, checking that every key's rows
/// (both messages and its LLM calls) are in one transaction.
async fn transaction_of_each_key(app: &TestApp) -> HashMap<String, String> {
    let split = app
        .count(
            "SELECT count(*) FROM (SELECT idempotency_key FROM messages GROUP BY 1 \
             HAVING count(DISTINCT xmin::text) <> 1) k",
            &[],
        )
        .await;
    assert_eq!(split, 0, "a message's rows committed in two transactions");
    let calls_apart = app
        .count(
            "SELECT count(*) FROM llm_calls l JOIN messages m ON m.id = l.message_id \
             WHERE l.xmin::text <> m.xmin::text",
            &[],
        )
        .await;
    assert_eq!(
        calls_apart, 0,
        "LLM call rows committed apart from their message"
    );
    app.db()
        .await
        .query(
            "SELECT DISTINCT idempotency_key, xmin::text FROM messages",
            &[],
        )
        .await
        .expect("xmin")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Keys per transaction.
fn batches(tx_of: &HashMap<String, String>) -> HashMap<&str, Vec<&str>> {
    let mut out: HashMap<&str, Vec<&str>> = HashMap::new();
    for (key, tx) in tx_of {
        out.entry(tx.as_str()).or_default().push(key.as_str());
    }
    out
}

/// Every message's rows in one transaction, and some transactions holding several messages
/// (batches formed).
pub(crate) async fn assert_batched(app: &TestApp) {
    let tx_of = transaction_of_each_key(app).await;
    let together = batches(&tx_of).values().filter(|k| k.len() > 1).count();
    assert!(together > 0, "no two messages committed together");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_member_is_retried_alone_and_never_takes_its_batch_mates_down() {
    let mut app = spawn_env(MockOptions::default(), batching).await;
    app.failpoints.enable(failpoint::POISON_BATCHED);
    // 120 users, 3 messages each; every eighth user's messages are refused inside a batch.
    let mut messages = workload("gp", 120, 3);
    for (user, _, content) in &mut messages {
        let u: usize = user
            .rsplit_once('u')
            .and_then(|(_, n)| n.parse().ok())
            .expect("user");
        if u.is_multiple_of(8) {
            content.push_str(" poison");
        }
    }
    let poisoned: HashSet<String> = messages
        .iter()
        .filter(|(_, _, c)| c.contains("poison"))
        .map(|(_, id, _)| id.clone())
        .collect();
    app.send_many(&messages).await;
    app.start_worker("w0").await;
    let replies = app
        .wait_all(&ids(&messages), Duration::from_secs(120))
        .await;
    app.settle(Duration::from_secs(30)).await;
    assert_eq!(replies.len(), messages.len());
    for (id, r) in &replies {
        assert_eq!(r.len(), 1, "{id}: one reply");
        assert_eq!(r[0]["status"], "ok", "{id}: answered, not an error");
    }
    assert_exactly_once(&app, messages.len()).await;
    assert_stored_in_order(&app).await;

    let tx_of = transaction_of_each_key(&app).await;
    let by_tx = batches(&tx_of);
    for key in &poisoned {
        let tx = &tx_of[key];
        assert_eq!(
            by_tx[tx.as_str()],
            vec![key.as_str()],
            "{key} was refused in every batch: it committed alone"
        );
    }
    let together = by_tx.values().filter(|keys| keys.len() > 1).count();
    let in_batches: usize = by_tx.values().filter(|k| k.len() > 1).map(Vec::len).sum();
    assert!(
        together > 0 && in_batches >= messages.len() / 4,
        "batch-mates committed together ({together} batches of {in_batches} messages)"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_member_of_a_batch_writes_under_its_own_business() {
    const OTHER: &str = "7d1f4c9e-2b1a-4e55-9a7c-0c0ffee0b0b0";
    let mut app = spawn_env(MockOptions::default(), batching).await;
    helpers::import_demo_copy(&app.config, OTHER, &[]).await;
    let ours = workload("ga", 60, 2);
    let theirs = workload("gb", 60, 2);
    app.send_many(&ours).await;
    app.send_many_to(OTHER, &theirs).await;
    app.start_worker("w0").await;
    let all: HashSet<String> = ids(&ours).union(&ids(&theirs)).cloned().collect();
    let replies = app.wait_all(&all, Duration::from_secs(120)).await;
    app.settle(Duration::from_secs(30)).await;
    assert!(
        replies
            .values()
            .all(|r| r.len() == 1 && r[0]["status"] == "ok"),
        "one ok reply per message"
    );
    assert_exactly_once(&app, all.len()).await;
    // Every row is its business's: the worker's role writes under row-level security, so a
    // statement scoped to another business would have been refused.
    for (business, keys) in [(DEMO_BUSINESS, ids(&ours)), (OTHER, ids(&theirs))] {
        let id: uuid::Uuid = business.parse().expect("uuid");
        let stored = app
            .count(
                "SELECT count(DISTINCT m.idempotency_key) FROM messages m \
                 JOIN conversations c ON c.business_id = m.business_id \
                 AND c.id = m.conversation_id WHERE m.business_id = $1",
                &[&id],
            )
            .await;
        assert_eq!(stored as usize, keys.len(), "{business}");
    }
    let mixed = app
        .count(
            "SELECT count(*) FROM (SELECT xmin::text FROM messages GROUP BY 1 \
             HAVING count(DISTINCT business_id) > 1) t",
            &[],
        )
        .await;
    if helpers::on_test_citus() {
        // A batch holds one business there (a business's rows are on one node); transaction
        // ids are each node's own, so they say nothing across businesses.
    } else {
        assert!(mixed > 0, "batches held messages of both businesses");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_batch_of_one_every_message_commits_alone() {
    let mut app = spawn_env(MockOptions::default(), |c| {
        batching(c);
        c.worker.commit_batch_max = 1;
    })
    .await;
    let messages = workload("g1", 40, 2);
    app.send_many(&messages).await;
    app.start_worker("w0").await;
    let replies = app
        .wait_all(&ids(&messages), Duration::from_secs(120))
        .await;
    assert!(replies.values().all(|r| r.len() == 1));
    assert_exactly_once(&app, messages.len()).await;
    let tx_of = transaction_of_each_key(&app).await;
    assert!(
        batches(&tx_of).values().all(|keys| keys.len() == 1),
        "no two messages in one transaction"
    );
    app.stop().await;
}

/// The statement a batch sends before `COMMIT` refuses to commit once its earliest member's
/// deadline is past (its statements may have waited behind their batch-mates'), and lets a
/// batch within it commit.
#[tokio::test]
async fn the_deadline_guard_fails_a_batch_past_its_earliest_deadline_only() {
    use icmp::store::group_commit::deadline_guard;
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    let db = app.db().await;
    let late = db
        .batch_execute(&format!(
            "BEGIN; SELECT pg_sleep(0.2); {}; COMMIT",
            deadline_guard(50)
        ))
        .await
        .expect_err("past the deadline");
    assert_eq!(
        late.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{late}"
    );
    db.batch_execute("ROLLBACK").await.expect("rollback");
    db.batch_execute(&format!(
        "BEGIN; SELECT pg_sleep(0.05); {}; COMMIT",
        deadline_guard(60_000)
    ))
    .await
    .expect("within the deadline");
}
