//! Fault injection: crashes, outages, floods. Each test counts exactly what it promises.

use std::collections::HashSet;
use std::time::Duration;

use icmp::config::{Config, RedactedUrl};
use icmp::llm::mock::MockOptions;
use icmp::pipeline::failpoint;

use crate::helpers::{self, TestApp, spawn_env};
use crate::processes::{PrivatePg, PrivateRedis, WorkerProcess};

/// `users` users with `per_user` messages each, interleaved (round-robin) as a producer would.
pub(crate) fn workload(
    prefix: &str,
    users: usize,
    per_user: usize,
) -> Vec<(String, String, String)> {
    let mut out = Vec::with_capacity(users * per_user);
    for turn in 0..per_user {
        for u in 0..users {
            let content = match turn % 4 {
                0 => format!("Hello, this is turn {turn}"),
                1 => {
                    format!("I want to book an appointment, my name is User{u} Test (turn {turn})")
                }
                2 => format!(
                    "On 2026-12-0{} for a cleaning please (turn {turn})",
                    1 + u % 9
                ),
                _ => format!("Thanks, bye (turn {turn})"),
            };
            out.push((
                format!("{prefix}-u{u}"),
                format!("{prefix}-u{u}-m{turn:03}"),
                content,
            ));
        }
    }
    out
}

pub(crate) fn ids(messages: &[(String, String, String)]) -> HashSet<String> {
    messages.iter().map(|(_, id, _)| id.clone()).collect()
}

/// Exactly one user row and one assistant row per idempotency key, and nothing else.
pub(crate) async fn assert_exactly_once(app: &TestApp, expected: usize) {
    let keys = app
        .count("SELECT count(DISTINCT idempotency_key) FROM messages", &[])
        .await;
    assert_eq!(keys as usize, expected, "stored messages");
    let bad = app
        .count(
            "SELECT count(*) FROM (SELECT idempotency_key FROM messages GROUP BY idempotency_key \
             HAVING count(*) FILTER (WHERE role = 'user') <> 1 \
             OR count(*) FILTER (WHERE role = 'assistant') <> 1) k",
            &[],
        )
        .await;
    assert_eq!(
        bad, 0,
        "keys without exactly one user and one assistant row"
    );
}

/// Each user's messages are stored in stream order.
pub(crate) async fn assert_stored_in_order(app: &TestApp) {
    let rows = app
        .db()
        .await
        .query(
            "SELECT idempotency_key FROM messages WHERE role = 'user' ORDER BY seq",
            &[],
        )
        .await
        .expect("messages");
    let mut last: std::collections::HashMap<String, String> = Default::default();
    for r in rows {
        let key: String = r.get(0);
        let (user, _) = key.rsplit_once("-m").expect("key shape");
        if let Some(prev) = last.get(user) {
            assert!(prev < &key, "{key} stored after {prev}");
        }
        last.insert(user.to_owned(), key);
    }
}

/// Waits until `n` message rows are stored (the workers are making progress).
async fn wait_for_rows(app: &TestApp, n: i64, log: &std::path::Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while app.count("SELECT count(*) FROM messages", &[]).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress; see {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn quick_recovery(c: &mut Config) {
    c.streams.claim_idle_ms = 1_000;
    c.streams.max_deliveries = 20;
    c.retry.max_elapsed_ms = 2_000;
    c.database.pool_size = 16;
    c.worker.concurrency = 64;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_two_workers_loses_and_duplicates_nothing() {
    let app = spawn_env(
        MockOptions {
            latency_ms: 5,
            jitter_ms: 10,
            ..Default::default()
        },
        quick_recovery,
    )
    .await;
    let messages = workload("k", 200, 10);
    app.send_many(&messages).await;
    // Batches that form readily: the kill lands in the middle of one.
    let env = [("ICMP__WORKER__COMMIT_BATCH_WAIT_US", "2000")];
    let mut victim = WorkerProcess::spawn(&app.config, "victim", &env);
    let mut survivor = WorkerProcess::spawn(&app.config, "survivor", &env);
    // Let both take a share, then kill one mid-flight.
    wait_for_rows(&app, 400, &victim.log).await;
    victim.kill9();
    let replies = app
        .wait_all(&ids(&messages), Duration::from_secs(180))
        .await;
    assert!(survivor.is_running(), "the survivor must not exit");
    assert_eq!(replies.len(), 2000);
    assert!(
        replies
            .values()
            .all(|r| r.len() == 1 && r[0]["status"] == "ok"),
        "one ok reply per message"
    );
    assert_exactly_once(&app, 2000).await;
    assert_stored_in_order(&app).await;
    crate::group_commit::assert_batched(&app).await;
    survivor.terminate().await;
}

#[tokio::test]
async fn a_crash_after_commit_republishes_once_without_a_second_write() {
    let app = spawn_env(MockOptions::default(), quick_recovery).await;
    app.send("zed", "z1", "Hello").await;
    let mut crasher = WorkerProcess::spawn(
        &app.config,
        "crasher",
        &[("ICMP_FAILPOINTS", failpoint::AFTER_COMMIT_CRASH)],
    );
    let status = crasher
        .wait(Duration::from_secs(60))
        .await
        .expect("the crasher exits");
    assert_eq!(status.code(), Some(86), "crashed at the failpoint");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE idempotency_key = 'z1'",
            &[]
        )
        .await,
        2
    );
    assert!(
        app.entries(&app.config.streams.outbound).await.is_empty(),
        "nothing published yet"
    );
    let calls = app.count("SELECT count(*) FROM llm_calls", &[]).await;

    let mut rescuer = WorkerProcess::spawn(&app.config, "rescuer", &[]);
    let reply = app.reply("z1").await;
    assert_eq!(reply["status"], "ok");
    app.settle(Duration::from_secs(30)).await;
    let published: Vec<_> = app
        .entries(&app.config.streams.outbound)
        .await
        .into_iter()
        .filter(|e| e["message_id"] == "z1")
        .collect();
    assert_eq!(published.len(), 1, "published exactly once");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE idempotency_key = 'z1'",
            &[]
        )
        .await,
        2
    );
    assert_eq!(
        app.count("SELECT count(*) FROM llm_calls", &[]).await,
        calls,
        "not processed again"
    );
    rescuer.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_quick_messages_of_one_conversation_keep_their_order_across_four_workers() {
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 2,
            jitter_ms: 20,
            ..Default::default()
        },
        |c| {
            c.worker.history_turns = 100;
        },
    )
    .await;
    for w in 0..4 {
        app.start_worker(&format!("w{w}")).await;
    }
    let messages: Vec<(String, String, String)> = (0..20)
        .map(|i| {
            (
                "olga".to_owned(),
                format!("o-m{i:03}"),
                format!("message number {i}"),
            )
        })
        .collect();
    app.send_many(&messages).await;
    app.wait_all(&ids(&messages), Duration::from_secs(60)).await;
    assert_stored_in_order(&app).await;
    assert_eq!(
        app.count("SELECT count(*) FROM conversations", &[]).await,
        1
    );
    let rows = app
        .db()
        .await
        .query(
            "SELECT m.content, c.prompt FROM llm_calls c JOIN messages m ON m.id = c.message_id \
             WHERE c.purpose = 'response' ORDER BY m.seq",
            &[],
        )
        .await
        .expect("calls");
    assert_eq!(rows.len(), 20);
    for (i, row) in rows.iter().enumerate() {
        let content: String = row.get(0);
        assert_eq!(content, format!("message number {i}"));
        let prompt: String = row.get(1);
        for earlier in 0..i {
            assert!(
                prompt.contains(&format!("user: message number {earlier}\n")),
                "reply {i} was generated without message {earlier}"
            );
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_llm_still_answers_every_message() {
    let options = MockOptions {
        error_rate: 0.30,
        timeout_rate: 0.10,
        rate_limit_rate: 0.05,
        retry_after_secs: 1,
        hang_ms: 2_000,
        seed: 11,
        ..Default::default()
    };
    let app = spawn_env(options, |c| {
        c.llm.request_timeout_ms = 300;
        c.retry.max_elapsed_ms = 1_500;
        c.worker.concurrency = 64;
    })
    .await;
    // A process of its own, so that its /metrics counts its retries and nobody else's.
    // Without the circuit breaker: this test is about retries, and on a machine busy with the
    // other tests the first calls' 300 ms timeouts can reach the breaker's 90 % (it then fails
    // every call at once for five seconds: fallbacks, and no retries to count). The breaker
    // has tests of its own.
    let port = crate::processes::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut worker = WorkerProcess::spawn(
        &app.config,
        "flaky",
        &[
            ("ICMP__TELEMETRY__LISTEN", &listen),
            ("ICMP__LLM__REQUEST_TIMEOUT_MS", "300"),
            ("ICMP__RETRY__MAX_ELAPSED_MS", "1500"),
            ("ICMP__LLM__CIRCUIT_WINDOW", "0"),
        ],
    );
    let messages = workload("f", 50, 2);
    app.send_many(&messages).await;
    let replies = app
        .wait_all(&ids(&messages), Duration::from_secs(120))
        .await;
    let fallback = replies
        .values()
        .filter(|r| r.len() == 1 && r[0]["status"] == "fallback")
        .count();
    let ok = replies
        .values()
        .filter(|r| r.len() == 1 && r[0]["status"] == "ok")
        .count();
    println!("flaky LLM: {ok} answered by the LLM, {fallback} by the fallback template");
    assert_eq!(
        ok + fallback,
        100,
        "every message answered, none with an error"
    );
    assert!(replies.values().all(|r| r.len() == 1), "one reply each");
    assert_exactly_once(&app, 100).await;
    let requests = app
        .mock
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed) as i64;
    let calls = app.count("SELECT count(*) FROM llm_calls", &[]).await;
    assert!(
        requests > calls + 30,
        "faults were retried: {requests} HTTP requests for {calls} logical calls"
    );
    // Every retry is counted by this worker: each HTTP request beyond the logical calls was a
    // retry (a retry whose request timed out before the mock read it is counted too).
    let metrics = reqwest::get(format!("http://{listen}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("icmp_retries_total{operation=\"llm."))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        counted as i64 >= requests - calls,
        "{counted} retries counted for {} extra requests: {metrics}",
        requests - calls
    );
    worker.terminate().await;
}

#[tokio::test]
async fn a_dead_llm_gives_every_message_a_fallback_reply() {
    let mut app = spawn_env(
        MockOptions {
            error_rate: 1.0,
            ..Default::default()
        },
        |c| {
            c.retry.max_elapsed_ms = 200;
        },
    )
    .await;
    app.start_worker("w0").await;
    let messages = workload("d", 20, 2);
    app.send_many(&messages).await;
    let replies = app.wait_all(&ids(&messages), Duration::from_secs(60)).await;
    assert!(
        replies
            .values()
            .all(|r| r.len() == 1 && r[0]["status"] == "fallback")
    );
    assert_exactly_once(&app, 40).await;
    // The circuit breaker stopped calling the dead endpoint after its threshold: without it,
    // every message would spend two calls' retry budgets (dozens of requests).
    let requests = app
        .mock
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(requests < 40, "{requests} requests reached the dead LLM");
    app.stop().await;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_the_others_flow() {
    let mut app = spawn_env(MockOptions::default(), |c| {
        c.streams.claim_idle_ms = 1_000;
        c.streams.max_deliveries = 3;
    })
    .await;
    // A runtime render failure in one stage of a second business.
    let other = "5b0e8a7c-1111-4c1d-8e2f-000000000009";
    let path = helpers::import_poisoned_demo(&app, other).await;
    app.start_worker("w0").await;
    app.xadd(&[
        ("business_id", other.as_bytes()),
        ("user_id", b"p"),
        ("message_id", b"poison"),
        ("content", b"hello"),
    ])
    .await;
    let messages = workload("n", 5, 2);
    app.send_many(&messages).await;
    let replies = app.wait_all(&ids(&messages), Duration::from_secs(60)).await;
    for id in ids(&messages) {
        assert_eq!(
            (replies[&id].len(), replies[&id][0]["status"].as_str()),
            (1, "ok"),
            "{id}: {:?}",
            replies[&id][0]
        );
    }
    let poison = app.reply("poison").await;
    assert_eq!(poison["status"], "error");
    assert_eq!(poison["error_code"], "template.render");
    let dead = app.entries(&app.config.streams.dead_letter).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["message_id"], "poison");
    assert_eq!(dead[0]["error_code"], "template.render");
    assert_eq!(
        dead[0]["error_reply_id"], poison["reply_id"],
        "the dead letter names the error reply the user got"
    );

    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE idempotency_key = 'poison'",
            &[]
        )
        .await,
        0
    );

    // Once the template is fixed (re-import drops the cached copy), the operator replays it.
    icmp::business::import_files(&app.store, Some(&app.cache), &[&path])
        .await
        .expect("fix");
    let poison_id = dead[0]["__id"].clone();
    let conn = app.redis.clone();
    let replayed =
        icmp::stream::dlq::replay(&conn, &app.config.streams, std::slice::from_ref(&poison_id))
            .await
            .expect("replay");
    assert_eq!(replayed, vec![poison_id]);
    let outbound = app.config.streams.outbound.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let replies: Vec<_> = app
            .entries(&outbound)
            .await
            .into_iter()
            .filter(|e| e["message_id"] == "poison" && e["status"] == "ok")
            .collect();
        if !replies.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replayed message not answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        app.entries(&app.config.streams.dead_letter)
            .await
            .is_empty(),
        "the replayed entry left the dead-letter stream"
    );
    // Exactly two replies for the message: the error, then the answer that says it replaces it.
    let all: Vec<_> = app
        .entries(&outbound)
        .await
        .into_iter()
        .filter(|e| e["message_id"] == "poison")
        .collect();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0]["status"], "error");
    assert_eq!(all[0]["supersedes"], "");
    assert_eq!(all[1]["status"], "ok");
    assert_eq!(all[1]["supersedes"], all[0]["reply_id"]);
    assert_ne!(all[1]["reply_id"], all[0]["reply_id"]);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE idempotency_key = 'poison'",
            &[]
        )
        .await,
        2
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_five_seconds_loses_nothing_and_needs_no_restart() {
    let pg = PrivatePg::start();
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 5,
            ..Default::default()
        },
        quick_recovery,
    )
    .await;
    // Move this app onto the private server.
    let mut config = app.config.clone();
    pg.migrated(&mut config).await;
    helpers::import(&config, &[&helpers::demo_file()]).await;
    app.store = icmp::store::Store::connect(&config.database).expect("store");
    app.config = config;
    let messages = workload("pg", 40, 8);
    app.send_many(&messages).await;
    // Batches that form readily: the outage lands in the middle of one.
    let env = [("ICMP__WORKER__COMMIT_BATCH_WAIT_US", "2000")];
    let mut worker = WorkerProcess::spawn(&app.config, "pg", &env);
    wait_for_rows(&app, 100, &worker.log).await;
    pg.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(worker.is_running(), "the worker must survive the outage");
    pg.start_again();
    let replies = app
        .wait_all(&ids(&messages), Duration::from_secs(120))
        .await;
    assert!(
        replies
            .values()
            .all(|r| r.len() == 1 && r[0]["status"] == "ok"),
        "no error replies"
    );
    assert!(
        app.entries(&app.config.streams.dead_letter)
            .await
            .is_empty()
    );
    assert_exactly_once(&app, 320).await;
    assert_stored_in_order(&app).await;
    crate::group_commit::assert_batched(&app).await;
    assert!(worker.is_running());
    assert_eq!(worker.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_nothing_and_needs_no_restart() {
    let mut redis = PrivateRedis::start().await;
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 5,
            ..Default::default()
        },
        |c| {
            quick_recovery(c);
        },
    )
    .await;
    app.config.redis.url = RedactedUrl::new(redis.url());
    app.redis = icmp::redis_connection::connect(&app.config.redis)
        .await
        .expect("redis");
    let messages = workload("rr", 40, 8);
    app.send_many(&messages).await;
    let mut worker = WorkerProcess::spawn(&app.config, "rr", &[]);
    wait_for_rows(&app, 100, &worker.log).await;
    redis.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.start_again().await;
    let replies = app
        .wait_all(&ids(&messages), Duration::from_secs(120))
        .await;
    assert!(
        replies
            .values()
            .all(|r| r.len() == 1 && r[0]["status"] == "ok"),
        "one ok reply per message"
    );
    assert_exactly_once(&app, 320).await;
    assert_stored_in_order(&app).await;
    assert!(worker.is_running(), "the worker reconnected by itself");
    assert_eq!(worker.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_and_duplicates_nothing() {
    let app = spawn_env(
        MockOptions {
            latency_ms: 10,
            jitter_ms: 10,
            ..Default::default()
        },
        quick_recovery,
    )
    .await;
    let messages = workload("rs", 100, 6);
    app.send_many(&messages).await;
    let mut a = WorkerProcess::spawn(&app.config, "a", &[]);
    let mut b = WorkerProcess::spawn(&app.config, "b", &[]);
    wait_for_rows(&app, 200, &a.log).await;
    assert_eq!(a.terminate().await.code(), Some(0), "graceful exit");
    let mut a2 = WorkerProcess::spawn(&app.config, "a2", &[]);
    wait_for_rows(&app, 500, &b.log).await;
    assert_eq!(b.terminate().await.code(), Some(0), "graceful exit");
    let mut b2 = WorkerProcess::spawn(&app.config, "b2", &[]);
    let replies = app
        .wait_all(&ids(&messages), Duration::from_secs(120))
        .await;
    assert!(
        replies
            .values()
            .all(|r| r.len() == 1 && r[0]["status"] == "ok"),
        "one ok reply per message"
    );
    assert_exactly_once(&app, 600).await;
    assert_stored_in_order(&app).await;
    a2.terminate().await;
    b2.terminate().await;
}
