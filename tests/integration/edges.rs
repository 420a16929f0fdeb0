//! One reply per message at the edges (docs/reliability.md, "Edges"): a burst whose messages
//! want their replies in different places, bytes PostgreSQL refuses, a coalesced turn that
//! fails, a destroyed consumer group, takeovers of messages that only waited, entries a
//! producer trimmed, a row lock held by another session, and a dead-letter stream near its
//! bound. Each test counts exactly: replies per inbound entry, rows per message, dead letters
//! per entry.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use icmp::llm::mock::MockOptions;
use redis::AsyncCommands;
use uuid::Uuid;

use crate::helpers::{self, DEMO_BUSINESS, TestApp, spawn_env};
use crate::processes::{PrivateRedis, WorkerProcess, free_port};

/// The end of the demo's `[business]` table, where tables of its own go.
const BUSINESS_END: &str = "initial_stage = \"welcome\"\n";

/// Imports a copy of the demo as `id` with `extra` tables after its `[business]` table.
async fn import_with(app: &TestApp, id: &str, extra: &str) {
    helpers::import_demo_copy(
        &app.config,
        id,
        &[(BUSINESS_END, &format!("{BUSINESS_END}\n{extra}\n"))],
    )
    .await;
}

const COALESCE: &str = "[business.burst]\npolicy = \"coalesce\"\nwindow_ms = 400";

/// XADDs every entry in one round trip (a burst); returns their ids.
async fn burst(app: &TestApp, entries: &[Vec<(&str, Vec<u8>)>]) -> Vec<String> {
    let mut pipe = redis::pipe();
    for fields in entries {
        pipe.xadd(&app.config.streams.inbound, "*", fields);
    }
    pipe.query_async(&mut app.redis.clone())
        .await
        .expect("xadd")
}

fn message(business: &str, user: &str, id: &str, content: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("business_id", business.as_bytes().to_vec()),
        ("user_id", user.as_bytes().to_vec()),
        ("message_id", id.as_bytes().to_vec()),
        ("content", content.as_bytes().to_vec()),
    ]
}

/// A reply and the stream it is on.
type Placed = (String, HashMap<String, String>);

/// Every reply on `streams`, by `message_id`, with the stream it is on.
async fn replies_on(app: &TestApp, streams: &[&str]) -> HashMap<String, Vec<Placed>> {
    let mut out: HashMap<String, Vec<Placed>> = HashMap::new();
    for stream in streams {
        for e in app.entries(stream).await {
            out.entry(e["message_id"].clone())
                .or_default()
                .push(((*stream).to_owned(), e));
        }
    }
    out
}

/// Waits until `n` replies are on `streams` together and nothing is pending (a reply is
/// published only by the script that acknowledges its entry: counts taken then are final).
async fn wait_replies_on(app: &TestApp, streams: &[&str], n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got: usize = replies_on(app, streams).await.values().map(Vec::len).sum();
        if got >= n && app.pending().await == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{got} of {n} replies"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn dead_letters(app: &TestApp) -> Vec<HashMap<String, String>> {
    app.entries(&app.config.streams.dead_letter).await
}

/// (user rows, assistant rows) of a business.
async fn rows(app: &TestApp, business: &str) -> (i64, i64) {
    let id: Uuid = business.parse().expect("uuid");
    (
        app.count(
            "SELECT count(*) FROM messages WHERE business_id = $1 AND role = 'user'",
            &[&id],
        )
        .await,
        app.count(
            "SELECT count(*) FROM messages WHERE business_id = $1 AND role = 'assistant'",
            &[&id],
        )
        .await,
    )
}

/// Messages counted against a business's per-minute budget, over every minute.
async fn budget_count(app: &TestApp, business: &str) -> u64 {
    let pattern = format!("{}budget:{business}:m:*", app.config.redis.key_prefix);
    let mut conn = app.redis.clone();
    let keys: Vec<String> = conn.keys(&pattern).await.expect("keys");
    let mut total = 0;
    for k in keys {
        let n: u64 = conn.get(&k).await.expect("get");
        total += n;
    }
    total
}

/// The processing attempts counted for an entry so far.
async fn attempts(app: &TestApp, id: &str) -> u64 {
    let keys = icmp::stream::Keys::new(&app.config.streams, &app.config.redis.key_prefix);
    let n: Option<u64> = app
        .redis
        .clone()
        .hget(&keys.attempts, id)
        .await
        .expect("hget");
    n.unwrap_or(0)
}

/// What `icmp status` reads now.
async fn status(app: &TestApp) -> icmp::status::Status {
    icmp::status::read(
        &app.redis,
        &app.config.redis,
        &app.config.streams,
        &app.store,
        5,
    )
    .await
    .expect("status")
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "waited for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_burst_whose_messages_want_replies_in_different_places_is_answered_where_each_waits() {
    const BUSINESS: &str = "5b0e8a7c-e001-4c1d-8e2f-000000000101";
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    import_with(&app, BUSINESS, COALESCE).await;
    app.start_worker("w0").await;
    let prefix = app.config.streams.reply_prefix.clone();
    let (r1, r2) = (format!("{prefix}one"), format!("{prefix}two"));
    let outbound = app.config.streams.outbound.clone();
    let with_reply_to = |id: &str, text: &str, to: &str| {
        let mut m = message(BUSINESS, "ann", id, text);
        m.push(("reply_to", to.as_bytes().to_vec()));
        m
    };
    // As `icmp send` does: every message names its own reply stream; the third shares the
    // second's, the fourth names none.
    burst(
        &app,
        &[
            with_reply_to("m1", "Hi there", &r1),
            with_reply_to("m2", "I would like to book", &r2),
            with_reply_to("m3", "tomorrow at 10", &r2),
            message(BUSINESS, "ann", "m4", "thanks"),
        ],
    )
    .await;
    let streams = [r1.as_str(), r2.as_str(), outbound.as_str()];
    wait_replies_on(&app, &streams, 4).await;
    let replies = replies_on(&app, &streams).await;
    let expected = [("m1", &r1), ("m2", &r2), ("m3", &r2), ("m4", &outbound)];
    for (id, stream) in expected {
        let got = &replies[id];
        assert_eq!(got.len(), 1, "{id}: exactly one reply: {got:?}");
        assert_eq!(&got[0].0, stream, "{id} is answered where its sender waits");
    }
    // A reply that refers to another one refers to a reply on its own stream.
    let mut coalesced = 0;
    for (stream, r) in replies.values().flatten() {
        if r["status"] == "coalesced" {
            coalesced += 1;
            let answer = replies
                .values()
                .flatten()
                .find(|(_, a)| a["reply_id"] == r["answered_by"])
                .unwrap_or_else(|| panic!("the answer {r:?} refers to"));
            assert_eq!(&answer.0, stream, "{r:?} refers to a reply it can see");
            assert_eq!(answer.1["status"], "ok");
        } else {
            assert_eq!(r["status"], "ok", "{r:?}");
        }
    }
    // m3 joined m2's turn (same destination); m1 and m4 were turns of their own.
    assert_eq!(coalesced, 1, "{replies:?}");
    assert_eq!(
        replies["m3"][0].1["answered_by"],
        replies["m2"][0].1["reply_id"]
    );
    assert_eq!(rows(&app, BUSINESS).await, (4, 3));
    assert!(dead_letters(&app).await.is_empty());
}

#[tokio::test]
async fn bytes_postgresql_refuses_are_validation_errors_and_take_no_turn_down() {
    const BUSINESS: &str = "5b0e8a7c-e002-4c1d-8e2f-000000000102";
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    import_with(&app, BUSINESS, COALESCE).await;
    app.start_worker("w0").await;
    let mut nul_meta = message(BUSINESS, "bea", "n3", "my name is Bea");
    nul_meta.push(("metadata", br#"{"note":"a\u0000b"}"#.to_vec()));
    let mut nul_key_meta = message(DEMO_BUSINESS, "dan", "d1", "hello");
    nul_key_meta.push(("metadata", br#"{"x":[{"\u0000":1}]}"#.to_vec()));
    // A burst of one user on a coalescing business with a NUL in a follower's message_id and
    // `\u0000` in another's metadata; and the same on a business that queues.
    burst(
        &app,
        &[
            message(BUSINESS, "bea", "n1", "Hi there"),
            message(BUSINESS, "bea", "n2\0x", "I would like to book"),
            nul_meta,
            message(BUSINESS, "bea", "n4", "tomorrow at 10"),
            nul_key_meta,
            message(DEMO_BUSINESS, "dan", "d2", "are you open?"),
        ],
    )
    .await;
    let ids: HashSet<String> = ["n1", "n2\0x", "n3", "n4", "d1", "d2"]
        .map(String::from)
        .into();
    let replies = app.wait_all(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "exactly one reply for {id:?}");
    }
    let code = |id: &str| {
        let r = &replies[id][0];
        (r["error_code"].clone(), r["status_code"].clone())
    };
    assert_eq!(
        code("n2\0x"),
        ("validation.invalid_field".into(), "400".into())
    );
    assert_eq!(
        code("n3"),
        ("validation.invalid_metadata".into(), "400".into())
    );
    assert_eq!(
        code("d1"),
        ("validation.invalid_metadata".into(), "400".into())
    );
    for id in ["n1", "n4", "d2"] {
        assert_eq!(replies[id][0]["status"], "ok", "{id}: {:?}", replies[id]);
    }
    // Nothing of the refused messages is stored, nothing is dead-lettered.
    assert_eq!(rows(&app, BUSINESS).await, (2, 2));
    assert_eq!(rows(&app, DEMO_BUSINESS).await, (1, 1));
    assert!(dead_letters(&app).await.is_empty());
}

#[tokio::test]
async fn a_coalesced_turn_that_fails_answers_each_message_once_and_counts_each_once() {
    const BUSINESS: &str = "5b0e8a7c-e003-4c1d-8e2f-000000000103";
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    import_with(
        &app,
        BUSINESS,
        &format!("{COALESCE}\n\n[business.budget]\nmessages_per_minute = 1000"),
    )
    .await;
    // Every turn with later messages fails for good at its write, as a follower's row that
    // PostgreSQL refused would.
    app.failpoints
        .enable(icmp::pipeline::failpoint::COALESCED_WRITE);
    app.start_worker("w0").await;
    burst(
        &app,
        &[
            message(BUSINESS, "cai", "c1", "Hi there"),
            message(BUSINESS, "cai", "c2", "I would like to book"),
            message(BUSINESS, "cai", "c3", "tomorrow at 10"),
        ],
    )
    .await;
    let ids: HashSet<String> = ["c1", "c2", "c3"].map(String::from).into();
    let replies = app.wait_all(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "exactly one reply for {id}");
        assert_eq!(replies[id][0]["status"], "ok", "{id}: {:?}", replies[id]);
    }
    assert_eq!(rows(&app, BUSINESS).await, (3, 3));
    assert!(dead_letters(&app).await.is_empty());
    // Each message counted once against the budget, though the followers started twice.
    assert_eq!(budget_count(&app, BUSINESS).await, 3);
}

#[tokio::test]
async fn a_destroyed_group_is_recreated_at_its_mark_and_answers_nothing_twice() {
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    app.start_worker("w0").await;
    let first: Vec<(String, String, String)> = (0..12)
        .map(|i| (format!("u{}", i % 4), format!("a{i}"), "hello".to_owned()))
        .collect();
    app.send_many(&first).await;
    let ids: HashSet<String> = first.iter().map(|(_, id, _)| id.clone()).collect();
    app.wait_all(&ids, Duration::from_secs(60)).await;
    // An entry held unanswered by a consumer when the group goes (a worker of its own, by
    // hand), then the operator's destroy (or a restore without the group).
    app.stop_workers().await;
    let held = app.send("held", "h1", "hello").await;
    let (_, got) = app
        .streams("by-hand")
        .await
        .claim_new(10)
        .await
        .expect("claim");
    assert_eq!(
        got.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        [held.as_str()]
    );
    let s = &app.config.streams;
    let destroyed: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&s.inbound)
        .arg(&s.group)
        .query_async(&mut app.redis.clone())
        .await
        .expect("destroy");
    assert_eq!(destroyed, 1);
    let second: Vec<(String, String, String)> = (0..8)
        .map(|i| (format!("u{}", i % 4), format!("b{i}"), "more".to_owned()))
        .collect();
    app.send_many(&second).await;
    app.send("held", "h2", "anyone there?").await;
    app.start_worker("w1").await;
    let mut all = ids.clone();
    all.extend(second.iter().map(|(_, id, _)| id.clone()));
    all.insert("h2".into());
    let replies = app.wait_all(&all, Duration::from_secs(60)).await;
    for id in &all {
        assert_eq!(replies[id].len(), 1, "exactly one reply for {id}");
        assert_eq!(replies[id][0]["status"], "ok");
    }
    // The held entry: no reply (nobody answered it), one dead letter for the operator.
    assert!(!replies.contains_key("h1"));
    let dead = dead_letters(&app).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["inbound_id"], held);
    assert_eq!(dead[0]["error_code"], "stream.orphaned");
    assert_eq!(
        app.count("SELECT count(*) FROM messages WHERE role = 'user'", &[])
            .await,
        21
    );
    // Said loudly: counted where `icmp status` reads it.
    let status = status(&app).await;
    assert_eq!(
        status
            .totals
            .events
            .get("group_recreated")
            .map(String::as_str),
        Some("1")
    );
    assert!(status.to_string().contains("recreated 1 time"), "{status}");
}

#[tokio::test]
async fn takeovers_of_messages_that_only_waited_use_no_attempts_and_budgets_count_each_once() {
    const BUSINESS: &str = "5b0e8a7c-e005-4c1d-8e2f-000000000105";
    let app = spawn_env(
        MockOptions {
            latency_ms: 4_000,
            ..MockOptions::default()
        },
        |c| {
            c.streams.max_deliveries = 2;
            c.streams.claim_idle_ms = 1_000;
            c.llm.request_timeout_ms = 10_000;
        },
    )
    .await;
    import_with(
        &app,
        BUSINESS,
        "[business.budget]\nmessages_per_minute = 1000",
    )
    .await;
    let w1 = app.send_to(BUSINESS, "eve", "w1", "Hi there").await;
    app.send_to(BUSINESS, "eve", "w2", "I would like to book")
        .await;
    app.send_to(BUSINESS, "eve", "w3", "tomorrow at 10").await;
    // The holder dies in w1's LLM call, twice: w2 and w3 only waited behind it.
    for (round, name) in [(1, "a"), (2, "b")] {
        let mut worker = WorkerProcess::spawn(&app.config, name, &[]);
        // Its selection call reached the LLM (a first delivery's start is not counted in the
        // attempts hash; a takeover's is).
        wait_for("w1 to start", async || {
            app.mock.stats.requests.load(Ordering::SeqCst) >= round
        })
        .await;
        if round == 2 {
            assert_eq!(
                attempts(&app, &w1).await,
                2,
                "the takeover counted both starts"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        worker.kill9();
    }
    let _last = WorkerProcess::spawn(&app.config, "c", &[]);
    let ids: HashSet<String> = ["w1", "w2", "w3"].map(String::from).into();
    let replies = app.wait_all(&ids, Duration::from_secs(90)).await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "exactly one reply for {id}");
    }
    // w1 started twice and was killed twice: poison protection ends it at once.
    assert_eq!(replies["w1"][0]["error_code"], "stream.max_deliveries");
    let dead = dead_letters(&app).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["inbound_id"], w1);
    // w2 and w3 were delivered three times but never started before: answered.
    for id in ["w2", "w3"] {
        assert_eq!(replies[id][0]["status"], "ok", "{id}: {:?}", replies[id]);
    }
    assert_eq!(rows(&app, BUSINESS).await, (2, 2));
    // Each message counted once against the budget, when it first started.
    assert_eq!(budget_count(&app, BUSINESS).await, 3);
    // Every count was deleted by its entry's finish.
    let keys = icmp::stream::Keys::new(&app.config.streams, &app.config.redis.key_prefix);
    let left: u64 = app.redis.clone().hlen(&keys.attempts).await.expect("hlen");
    assert_eq!(left, 0, "attempt counts left behind");
}

#[tokio::test]
async fn entries_a_producer_trimmed_end_in_a_dead_letter_not_in_silence() {
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 1_500,
            ..MockOptions::default()
        },
        |_| {},
    )
    .await;
    app.start_worker("w0").await;
    let t1 = app.send("fay", "t1", "Hi there").await;
    let t2 = app.send("fay", "t2", "I would like to book").await;
    let t3 = app.send("fay", "t3", "tomorrow at 10").await;
    wait_for("t1 to start", async || {
        app.mock.stats.requests.load(Ordering::SeqCst) >= 1
    })
    .await;
    // A producer's habit: XADD … MAXLEN 1 trims everything before its own entry.
    let _: String = redis::cmd("XADD")
        .arg(&app.config.streams.inbound)
        .arg("MAXLEN")
        .arg(1)
        .arg("*")
        .arg("business_id")
        .arg(DEMO_BUSINESS)
        .arg("user_id")
        .arg("gus")
        .arg("message_id")
        .arg("v1")
        .arg("content")
        .arg("hello")
        .query_async(&mut app.redis.clone())
        .await
        .expect("xadd maxlen");
    assert_eq!(app.reply("v1").await["status"], "ok");
    app.settle(Duration::from_secs(60)).await;
    // Every entry of fay's accounted for: t2 and t3 dead-lettered, t1 answered or
    // dead-lettered (t1's heal may come after t2's and t3's, or before).
    let accounted = async || {
        let dead = dead_letters(&app).await;
        let has = |id: &str| dead.iter().any(|d| d["inbound_id"] == id);
        has(&t2) && has(&t3) && (has(&t1) || !app.replies_of("t1").await.is_empty())
    };
    wait_for("every trimmed entry's dead letter", accounted).await;
    // Give a second answer or dead letter of anything the time to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // t2 and t3 waited without their fields: no reply can reach their sender, each is one
    // dead letter with what is known of it. t1 was in flight: answered if it finished before
    // the heartbeat found it gone, else dead-lettered too; never both, never twice.
    let dead = dead_letters(&app).await;
    let trimmed = |id: &str| {
        dead.iter()
            .filter(|d| d["inbound_id"] == id && d["error_code"] == "stream.trimmed")
            .count()
    };
    assert_eq!(
        dead.len(),
        dead.iter()
            .filter(|d| d["error_code"] == "stream.trimmed")
            .count()
    );
    for (id, key) in [(&t2, "t2"), (&t3, "t3")] {
        assert_eq!(trimmed(id), 1, "{key}: {dead:?}");
        assert!(app.replies_of(key).await.is_empty());
    }
    let t1_replies = app.replies_of("t1").await.len();
    assert_eq!(t1_replies + trimmed(&t1), 1, "t1: {dead:?}");
    for d in &dead {
        assert_eq!(d["business_id"], DEMO_BUSINESS);
        assert_eq!(d["user_id"], "fay");
    }
    assert_eq!(app.replies_of("v1").await.len(), 1);
    let status = status(&app).await;
    let n = dead.len().to_string();
    assert_eq!(status.totals.events.get("trimmed"), Some(&n));
    assert!(
        status
            .to_string()
            .contains(&format!("{n} entries were removed")),
        "{status}"
    );
    // There is nothing to replay: the operator's replay leaves them for a purge.
    let ids: Vec<String> = dead.iter().map(|d| d["__id"].clone()).collect();
    let replayed = icmp::stream::dlq::replay(&app.redis, &app.config.streams, &ids)
        .await
        .expect("replay");
    assert!(replayed.is_empty(), "{replayed:?}");
    assert_eq!(dead_letters(&app).await.len(), dead.len());
    // Nothing left behind for the user: the next message is answered.
    app.send("fay", "t4", "still there?").await;
    assert_eq!(app.reply("t4").await["status"], "ok");
    assert_eq!(app.pending().await, 0);
}

#[tokio::test]
async fn a_row_lock_held_by_another_session_stalls_a_user_no_longer_than_the_deadline() {
    let app = spawn_env(MockOptions::default(), |c| {
        c.streams.max_deliveries = 2;
        c.streams.claim_idle_ms = 1_000;
        c.retry.max_elapsed_ms = 500;
    })
    .await;
    // Worker sessions carry the timeouts (the production start-up path).
    let worker_store = icmp::store::Store::connect_worker(&icmp::config::DatabaseConfig {
        lock_timeout_ms: 300,
        statement_timeout_ms: 2_000,
        ..app.config.database.clone()
    })
    .expect("store");
    let session = worker_store.client().await.expect("db");
    let shown: String = session
        .query_one("SHOW lock_timeout", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(shown, "300ms");
    drop(session);

    // No lock_timeout at all: the message deadline alone ends the wait.
    let env = [
        ("ICMP__DATABASE__LOCK_TIMEOUT_MS", "0"),
        ("ICMP__DATABASE__STATEMENT_TIMEOUT_MS", "0"),
        ("ICMP__WORKER__MESSAGE_DEADLINE_MS", "2000"),
    ];
    let _worker = WorkerProcess::spawn(&app.config, "w", &env);
    app.send("hal", "l1", "Hi there").await;
    assert_eq!(app.reply("l1").await["status"], "ok");
    // An operator's psql: BEGIN; SELECT … FOR UPDATE; and then lunch.
    let mut operator = app.db().await;
    let tx = operator.transaction().await.expect("begin");
    let demo: Uuid = DEMO_BUSINESS.parse().expect("uuid");
    tx.execute(
        "SELECT 1 FROM conversations WHERE business_id = $1 FOR UPDATE",
        &[&demo],
    )
    .await
    .expect("lock");
    app.send("hal", "l2", "I would like to book").await;
    let r = app.reply("l2").await;
    assert_eq!(r["error_code"], "worker.deadline_exceeded", "{r:?}");
    assert_eq!(r["status_code"], "504");
    app.settle(Duration::from_secs(30)).await;
    let dead = dead_letters(&app).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["message_id"], "l2");
    assert_eq!(dead[0]["error_code"], "worker.deadline_exceeded");
    tx.rollback().await.expect("rollback");
    // The user moves on; nothing of l2 was stored.
    app.send("hal", "l3", "hello again").await;
    assert_eq!(app.reply("l3").await["status"], "ok");
    assert_eq!(app.replies_of("l2").await.len(), 1);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE idempotency_key = 'l2'",
            &[]
        )
        .await,
        0
    );
    assert_eq!(rows(&app, DEMO_BUSINESS).await, (2, 2));
}

#[tokio::test]
async fn a_dead_letter_stream_near_its_bound_is_reported_before_anything_is_evicted() {
    const BUSINESS: &str = "5b0e8a7c-e008-4c1d-8e2f-000000000108";
    let app = spawn_env(MockOptions::default(), |c| {
        c.streams.dead_letter_maxlen = 10;
    })
    .await;
    helpers::import_poisoned_demo(&app, BUSINESS).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _worker = WorkerProcess::spawn(
        &app.config,
        "w",
        &[
            ("ICMP__TELEMETRY__LISTEN", listen.as_str()),
            ("ICMP__STREAMS__DEAD_LETTER_MAXLEN", "10"),
        ],
    );
    for i in 0..9 {
        app.send_to(BUSINESS, &format!("p{i}"), &format!("p{i}"), "hello")
            .await;
    }
    wait_for("nine dead letters", async || {
        dead_letters(&app).await.len() == 9
    })
    .await;
    let status = status(&app).await;
    assert_eq!(
        (status.totals.dead_letters, status.dead_letter_limit),
        (9, 10)
    );
    assert!(status.dead_letters_nearly_full());
    assert!(
        status.to_string().contains("WARNING: nearly full"),
        "{status}"
    );
    // The worker's own gauge, for the alert.
    let url = format!("http://{listen}/metrics");
    wait_for("the fill ratio gauge", async || {
        let Ok(r) = reqwest::get(&url).await else {
            return false;
        };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .any(|l| l.starts_with("icmp_dead_letter_fill_ratio") && l.ends_with(" 0.9"))
    })
    .await;
}

/// The environment on a private Redis of its own (so that it can have a replica).
async fn on_redis(mut app: TestApp, redis: &PrivateRedis) -> TestApp {
    app.config.redis.url = icmp::config::RedactedUrl::new(redis.url());
    app.redis = icmp::redis_connection::connect(&app.config.redis)
        .await
        .expect("redis");
    app.cache = icmp::cache::Cache::new(app.redis.clone(), &app.config.redis, &app.config.cache);
    app
}

/// Calls of `command` the server has run so far (`INFO commandstats`).
async fn calls(app: &TestApp, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut app.redis.clone())
        .await
        .expect("info");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A counter of the worker's own `/metrics` (0 while absent).
async fn scraped(url: &str, series: &str) -> f64 {
    let Ok(r) = reqwest::get(url).await else {
        return 0.0;
    };
    r.text()
        .await
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn finishes_wait_for_a_replica_before_the_next_message_is_woken() {
    let master = PrivateRedis::start().await;
    let mut replica = PrivateRedis::start_replica_of(&master).await;
    let app = on_redis(spawn_env(MockOptions::default(), |_| {}).await, &master).await;
    wait_for("the replica to attach", async || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut app.redis.clone())
            .await
            .unwrap_or_default();
        info.contains("connected_slaves:1") && info.contains("state=online")
    })
    .await;
    let listen = format!("127.0.0.1:{}", free_port());
    let _worker = WorkerProcess::spawn(
        &app.config,
        "w",
        &[
            ("ICMP__STREAMS__WAIT_REPLICAS", "1"),
            ("ICMP__STREAMS__WAIT_TIMEOUT_MS", "500"),
            ("ICMP__TELEMETRY__LISTEN", listen.as_str()),
        ],
    );
    let metrics = format!("http://{listen}/metrics");
    let shortfalls = "icmp_stream_events_total{event=\"durability_shortfall\"}";
    // A burst of one user (each next message woken after the replica has its predecessor's
    // finish) and single messages of others.
    let mut messages: Vec<(String, String, String)> = (0..10)
        .map(|i| ("ida".to_owned(), format!("i{i}"), format!("message {i}")))
        .collect();
    messages.extend((0..10).map(|i| (format!("jo{i}"), format!("j{i}"), "hello".to_owned())));
    app.send_many(&messages).await;
    let ids: HashSet<String> = messages.iter().map(|(_, id, _)| id.clone()).collect();
    let replies = app.wait_all(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "exactly one reply for {id}");
        assert_eq!(replies[id][0]["status"], "ok");
    }
    let stored: Vec<String> = app
        .db()
        .await
        .query(
            "SELECT m.idempotency_key FROM messages m JOIN users u ON u.id = m.user_id \
             WHERE u.external_id = 'ida' AND m.role = 'user' ORDER BY m.seq",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, (0..10).map(|i| format!("i{i}")).collect::<Vec<_>>());
    // Each of ida's finishes was waited for before her next message started (one WAIT can
    // serve several finishes at once), and every wait was satisfied.
    let waits = calls(&app, "wait").await;
    assert!((9..=20).contains(&waits), "{waits} WAITs");
    assert_eq!(scraped(&metrics, shortfalls).await, 0.0);

    // The replica is gone: every finish waits its timeout, counts the shortfall, and the user's
    // next message is still woken and answered, once.
    replica.stop().await;
    let later: Vec<(String, String, String)> = (10..13)
        .map(|i| ("ida".to_owned(), format!("i{i}"), format!("message {i}")))
        .collect();
    app.send_many(&later).await;
    let ids: HashSet<String> = later.iter().map(|(_, id, _)| id.clone()).collect();
    let replies = app.wait_all(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "exactly one reply for {id}");
    }
    wait_for("the shortfalls to be counted", async || {
        scraped(&metrics, shortfalls).await >= 3.0
    })
    .await;
}

#[tokio::test]
async fn waiting_for_the_aof_is_refused_where_redis_lacks_waitaof() {
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    let mut worker = WorkerProcess::spawn(&app.config, "w", &[("ICMP__STREAMS__WAIT_AOF", "true")]);
    let info: Vec<redis::Value> = redis::cmd("COMMAND")
        .arg("INFO")
        .arg("WAITAOF")
        .query_async(&mut app.redis.clone())
        .await
        .expect("command info");
    if info.iter().all(|v| matches!(v, redis::Value::Nil)) {
        // Redis before 7.2: the worker says why and does not start.
        let status = worker.wait(Duration::from_secs(30)).await.expect("exits");
        assert!(!status.success());
        let log = std::fs::read_to_string(&worker.log).expect("log");
        assert!(log.contains("WAITAOF"), "{log}");
    } else {
        app.send("kim", "k1", "hello").await;
        assert_eq!(app.reply("k1").await["status"], "ok");
        assert!(calls(&app, "waitaof").await >= 1);
    }
}

/// A burst's first message trimmed by the producer before the turn's finish took effect (here:
/// the group is destroyed while the turn is in flight, so the finish publishes nothing, and the
/// first entry is gone when the heal comes). Its sender gets nothing and its entry ends in one
/// `stream.trimmed` dead letter; the second sender, whose orphaned entry the operator replays,
/// gets the `coalesced` reference, and it carries the answer it refers to, which was never
/// published.
#[tokio::test]
async fn a_bursts_second_sender_sees_the_answer_when_the_first_message_was_trimmed() {
    const BUSINESS: &str = "5b0e8a7c-e013-4c1d-8e2f-000000000113";
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 1_500,
            ..MockOptions::default()
        },
        |c| {
            c.streams.retention_interval_ms = 300;
            // The heartbeat (every third of this) must not find the turn's entries gone and
            // cancel it before it commits and finishes.
            c.streams.claim_idle_ms = 30_000;
        },
    )
    .await;
    import_with(&app, BUSINESS, COALESCE).await;
    app.start_worker("w0").await;
    let ids = burst(
        &app,
        &[
            message(BUSINESS, "hal", "h1", "Hello there"),
            message(BUSINESS, "hal", "h2", "I would like to book"),
        ],
    )
    .await;
    // h2 is taken into h1's turn (its attempt counted) before the LLM call starts.
    wait_for("h2 to join h1's turn", async || {
        attempts(&app, &ids[1]).await == 1
    })
    .await;
    let s = app.config.streams.clone();
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&s.inbound)
        .arg(&s.group)
        .query_async(&mut app.redis.clone())
        .await
        .expect("destroy");
    let trimmed: i64 = redis::cmd("XTRIM")
        .arg(&s.inbound)
        .arg("MINID")
        .arg(&ids[1])
        .query_async(&mut app.redis.clone())
        .await
        .expect("xtrim");
    assert_eq!(trimmed, 1, "h1 trimmed");
    wait_for("both entries healed", async || {
        dead_letters(&app).await.len() == 2
    })
    .await;
    let dead = dead_letters(&app).await;
    let code_of = |id: &str| {
        dead.iter()
            .find(|d| d["inbound_id"] == id)
            .map(|d| d["error_code"].clone())
    };
    assert_eq!(
        code_of(&ids[0]).as_deref(),
        Some("stream.trimmed"),
        "{dead:?}"
    );
    assert_eq!(
        code_of(&ids[1]).as_deref(),
        Some("stream.orphaned"),
        "{dead:?}"
    );
    // The turn commits (both messages stored, one answer) and its finish publishes nothing.
    wait_for("the turn to commit", async || {
        rows(&app, BUSINESS).await == (2, 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(app.replies_of("h1").await.is_empty(), "nothing published");
    assert!(app.replies_of("h2").await.is_empty(), "nothing published");

    let orphan: Vec<String> = dead
        .iter()
        .filter(|d| d["error_code"] == "stream.orphaned")
        .map(|d| d["__id"].clone())
        .collect();
    icmp::stream::dlq::replay(&app.redis, &s, &orphan)
        .await
        .expect("replay");
    let replies = app.wait_replies("h2", 1).await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    let r = &replies[0];
    assert_eq!(r["status"], "coalesced", "{r:?}");
    let answer: String = app
        .db()
        .await
        .query_one(
            "SELECT content FROM messages WHERE id = $1::text::uuid AND role = 'assistant'",
            &[&r["answered_by"]],
        )
        .await
        .expect("the answer it refers to")
        .get(0);
    assert!(!answer.is_empty());
    assert_eq!(r["content"], answer, "the reference carries the answer");
    assert!(
        app.replies_of("h1").await.is_empty(),
        "h1's sender got nothing"
    );
    app.settle(Duration::from_secs(30)).await;
    assert_eq!(app.replies_of("h2").await.len(), 1);
    assert_eq!(rows(&app, BUSINESS).await, (2, 1));
}

/// The first message of a coalesced burst leaves the pending list while its turn runs (here an
/// operator's `XACK` of it alone; in production a consumer deleted or a group recreated around
/// it): its finish takes no effect and publishes nothing, so the later message's `coalesced`
/// reference, published live, carries the answer's text: its sender sees the answer.
#[tokio::test]
async fn a_bursts_second_sender_sees_the_answer_when_the_first_message_could_not_be_finished() {
    const BUSINESS: &str = "5b0e8a7c-e013-4c1d-8e2f-000000000114";
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 1_500,
            ..MockOptions::default()
        },
        |c| c.streams.claim_idle_ms = 30_000,
    )
    .await;
    import_with(&app, BUSINESS, COALESCE).await;
    app.start_worker("w0").await;
    let ids = burst(
        &app,
        &[
            message(BUSINESS, "ida", "i1", "Hello there"),
            message(BUSINESS, "ida", "i2", "I would like to book"),
        ],
    )
    .await;
    wait_for("i2 to join i1's turn", async || {
        attempts(&app, &ids[1]).await == 1
    })
    .await;
    let s = app.config.streams.clone();
    let acked: i64 = redis::cmd("XACK")
        .arg(&s.inbound)
        .arg(&s.group)
        .arg(&ids[0])
        .query_async(&mut app.redis.clone())
        .await
        .expect("xack");
    assert_eq!(acked, 1);
    let replies = app.wait_replies("i2", 1).await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    let r = &replies[0];
    assert_eq!(r["status"], "coalesced", "{r:?}");
    let answer: String = app
        .db()
        .await
        .query_one(
            "SELECT content FROM messages WHERE id = $1::text::uuid AND role = 'assistant'",
            &[&r["answered_by"]],
        )
        .await
        .expect("the answer it refers to")
        .get(0);
    assert!(!answer.is_empty());
    assert_eq!(r["content"], answer, "the reference carries the answer");
    app.settle(Duration::from_secs(30)).await;
    assert!(
        app.replies_of("i1").await.is_empty(),
        "i1's finish took no effect"
    );
    assert_eq!(rows(&app, BUSINESS).await, (2, 1));
}
