//! Per-business burst policy and budgets, end to end through a worker: a burst of one user's
//! messages answered as one turn (`coalesce`) or one turn each (`queue`), messages over a
//! business's budget answered from its throttled template with nothing lost, and a business
//! flooding the stream held to its share of the processing slots.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use icmp::llm::mock::MockOptions;
use icmp::model::AnswerStatus;
use uuid::Uuid;

use crate::helpers::{self, DEMO_BUSINESS, TestApp, spawn_env};

const BURSTY: &str = "5b0e8a7c-6666-4c1d-8e2f-00000000000e";
const METERED: &str = "5b0e8a7c-7777-4c1d-8e2f-00000000000f";
const THRIFTY: &str = "5b0e8a7c-8888-4c1d-8e2f-000000000010";
const FLOOD: &str = "5b0e8a7c-9999-4c1d-8e2f-000000000011";
const QUIET: &str = "5b0e8a7c-aaaa-4c1d-8e2f-000000000012";

/// The end of the demo's `[business]` table, where tables of its own go.
const BUSINESS_END: &str = "initial_stage = \"welcome\"\n";

/// The demo's `[business]` table with `extra` tables after it.
fn business_tables(extra: &str) -> String {
    format!("{BUSINESS_END}\n{extra}\n")
}

/// Imports a copy of the demo business as `id`, with `extra` tables after its `[business]`
/// table.
async fn import_with(app: &TestApp, id: &str, extra: &str) {
    helpers::import_demo_copy(&app.config, id, &[(BUSINESS_END, &business_tables(extra))]).await;
}

/// (user rows, assistant rows, response calls) of a business.
async fn rows(app: &TestApp, business: &str) -> (i64, i64, i64) {
    let id: Uuid = business.parse().expect("uuid");
    let db = app.db().await;
    let count = |sql: &'static str| {
        let db = &db;
        async move {
            db.query_one(sql, &[&id])
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
    };
    (
        count("SELECT count(*) FROM messages WHERE business_id = $1 AND role = 'user'").await,
        count("SELECT count(*) FROM messages WHERE business_id = $1 AND role = 'assistant'").await,
        count("SELECT count(*) FROM llm_calls WHERE business_id = $1 AND purpose = 'response'")
            .await,
    )
}

/// Sends three messages of one user at once, all in one round trip.
async fn burst(app: &TestApp, business: &str, user: &str, ids: [&str; 3]) {
    let texts = [
        "Hi there",
        "I would like to book",
        "tomorrow at 10 if you can",
    ];
    let mut pipe = redis::pipe();
    for (id, text) in ids.iter().zip(texts) {
        pipe.xadd(
            &app.config.streams.inbound,
            "*",
            &[
                ("business_id", business),
                ("user_id", user),
                ("message_id", id),
                ("content", text),
            ],
        )
        .ignore();
    }
    let _: () = pipe
        .query_async(&mut app.redis.clone())
        .await
        .expect("xadd");
}

#[tokio::test]
async fn a_coalescing_business_answers_a_burst_as_one_turn_and_a_queueing_one_turn_by_turn() {
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    import_with(
        &app,
        BURSTY,
        "[business.burst]\npolicy = \"coalesce\"\nwindow_ms = 400",
    )
    .await;
    app.start_worker("w0").await;

    burst(&app, BURSTY, "ann", ["a1", "a2", "a3"]).await;
    burst(&app, DEMO_BUSINESS, "bob", ["b1", "b2", "b3"]).await;
    let ids: HashSet<String> = ["a1", "a2", "a3", "b1", "b2", "b3"]
        .map(String::from)
        .into();
    let replies = app.wait_all(&ids, Duration::from_secs(30)).await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "exactly one reply for {id}");
    }

    // Coalesced: one response call, three user rows, one assistant row, three answered entries.
    let first = &replies["a1"][0];
    assert_eq!(first["status"], "ok");
    assert!(!first["content"].is_empty());
    for later in ["a2", "a3"] {
        let r = &replies[later][0];
        assert_eq!(r["status"], "coalesced", "{later}: {r:?}");
        assert_eq!(
            r["answered_by"], first["reply_id"],
            "{later} refers to a1's reply"
        );
        assert_eq!(r["content"], "");
        assert_eq!(r["conversation_id"], first["conversation_id"]);
        assert_ne!(r["reply_id"], first["reply_id"]);
    }
    assert_eq!(rows(&app, BURSTY).await, (3, 1, 1));
    // The one response saw every message of the burst, in order.
    let bursty: Uuid = BURSTY.parse().expect("uuid");
    let prompt: String = app
        .db()
        .await
        .query_one(
            "SELECT prompt FROM llm_calls WHERE business_id = $1 AND purpose = 'response'",
            &[&bursty],
        )
        .await
        .expect("prompt")
        .get(0);
    let at = |s: &str| {
        prompt
            .find(s)
            .unwrap_or_else(|| panic!("{s:?} in {prompt}"))
    };
    assert!(at("Hi there") < at("I would like to book"));
    assert!(at("I would like to book") < at("tomorrow at 10"));
    // Stored in conversation order, the later two answered by the reply.
    let stored: Vec<(String, Option<Uuid>)> = app
        .db()
        .await
        .query(
            "SELECT idempotency_key || ':' || role, answered_by FROM messages \
             WHERE business_id = $1 ORDER BY seq",
            &[&bursty],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let reply_id: Uuid = first["reply_id"].parse().expect("uuid");
    assert_eq!(
        stored,
        vec![
            ("a1:user".to_owned(), None),
            ("a2:user".to_owned(), Some(reply_id)),
            ("a3:user".to_owned(), Some(reply_id)),
            ("a1:assistant".to_owned(), None),
        ]
    );

    // The committed state went out in the turn's finish transaction: the cache holds the
    // whole turn.
    let state = app
        .cache
        .get_state(bursty, "ann")
        .await
        .expect("redis")
        .expect("cached");
    assert_eq!(state.recent_keys, ["a1", "a2", "a3"]);
    assert_eq!(
        state.history.last().map(|t| t.content.as_str()),
        Some(first["content"].as_str())
    );

    // Queued (the demo's default): one turn per message.
    for id in ["b1", "b2", "b3"] {
        assert_eq!(replies[id][0]["status"], "ok");
    }
    assert_eq!(rows(&app, DEMO_BUSINESS).await, (3, 3, 3));

    // A producer retrying a coalesced message gets the same reference again; the store says
    // the same.
    app.send_to(BURSTY, "ann", "a2", "I would like to book")
        .await;
    let again = app
        .wait_all(&["a2".to_owned()].into(), Duration::from_secs(30))
        .await;
    assert_eq!(again["a2"].len(), 2, "one reply per inbound entry");
    assert_eq!(again["a2"][1]["status"], "coalesced");
    assert_eq!(again["a2"][1]["answered_by"], first["reply_id"]);
    assert_eq!(again["a2"][1]["reply_id"], again["a2"][0]["reply_id"]);
    // Republished from the store, the reference carries the answer's text: the reply it
    // refers to may not have been published where this one goes.
    assert_eq!(again["a2"][1]["content"], first["content"]);
    let stored = app
        .store
        .find_reply(bursty, "ann", "a3")
        .await
        .expect("find")
        .expect("stored");
    assert_eq!(stored.status, AnswerStatus::Coalesced);
    assert_eq!(stored.answered_by, Some(reply_id));

    // The next message, after the window, is a turn of its own that remembers the burst.
    app.send_to(BURSTY, "ann", "a4", "thanks").await;
    let r = app.reply("a4").await;
    assert_eq!(r["status"], "ok");
    assert_eq!(r["answered_by"], "");
    assert_eq!(rows(&app, BURSTY).await, (4, 2, 2));
    let prompt = app.prompt_of("a4", "selection").await;
    assert!(
        prompt.contains("tomorrow at 10"),
        "the history has the burst: {prompt}"
    );
    assert_eq!(app.pending().await, 0);
}

/// Waits, if needed, so that the next few seconds fall within one calendar minute.
async fn away_from_a_minute_boundary() {
    let second = chrono::Utc::now().timestamp() % 60;
    if second >= 50 {
        tokio::time::sleep(Duration::from_secs((61 - second) as u64)).await;
    }
}

#[tokio::test]
async fn messages_over_budget_get_the_throttled_reply_and_nothing_is_lost() {
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    let throttled_template = "[[templates]]\nname = \"throttled\"\nkind = \"fallback\"\n\
        body = \"{{ business.name }} is busy: please write again in a minute.\"\n\n\
        [[templates]]\nname = \"fallback_general\"";
    helpers::import_demo_copy(
        &app.config,
        METERED,
        &[
            (
                BUSINESS_END,
                &business_tables(
                    "[business.budget]\nmessages_per_minute = 3\nthrottled_template = \"throttled\"",
                ),
            ),
            (
                "[[templates]]\nname = \"fallback_general\"",
                throttled_template,
            ),
        ],
    )
    .await;
    import_with(&app, THRIFTY, "[business.budget]\ntokens_per_day = 1").await;
    app.start_worker("w0").await;

    // Messages per minute: the first three answered, the next two throttled.
    away_from_a_minute_boundary().await;
    let ids: Vec<String> = (1..=5).map(|i| format!("m{i}")).collect();
    for id in &ids {
        app.send_to(METERED, &format!("user-{id}"), id, "hello")
            .await;
    }
    let replies = app
        .wait_all(&ids.iter().cloned().collect(), Duration::from_secs(30))
        .await;
    let mut by_status: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "exactly one reply for {id}");
        let r = &replies[id][0];
        *by_status.entry(r["status"].clone()).or_default() += 1;
        if r["status"] == "throttled" {
            assert_eq!(
                r["content"],
                "Sunny Smile Dental is busy: please write again in a minute."
            );
        }
    }
    assert_eq!(by_status.get("ok"), Some(&3), "{by_status:?}");
    assert_eq!(by_status.get("throttled"), Some(&2), "{by_status:?}");
    // Every message stored with its reply; only the three admitted reached the LLM.
    assert_eq!(rows(&app, METERED).await, (5, 5, 3));
    let metered: Uuid = METERED.parse().expect("uuid");
    let throttled_rows: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM messages WHERE business_id = $1 AND status = 'throttled' \
             AND template_id IS NOT NULL",
            &[&metered],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(throttled_rows, 2, "stored with the template they came from");

    // Tokens per day: the first message spends the day's budget, the next is throttled with
    // the configured text (this business has no throttled template).
    app.send_to(THRIFTY, "tess", "t1", "hello").await;
    assert_eq!(app.reply("t1").await["status"], "ok");
    app.send_to(THRIFTY, "tess", "t2", "hello again").await;
    let r = app.reply("t2").await;
    assert_eq!(r["status"], "throttled");
    assert_eq!(r["content"], app.config.worker.throttled_reply);
    assert_eq!(rows(&app, THRIFTY).await, (2, 2, 1));
    let day = chrono::Utc::now().format("%Y%m%d");
    let key = format!("{}budget:{THRIFTY}:t:{day}", app.config.redis.key_prefix);
    let spent: u64 = redis::AsyncCommands::get(&mut app.redis.clone(), &key)
        .await
        .expect("tokens");
    assert!(spent > 0, "t1's tokens were counted");
    assert_eq!(app.pending().await, 0);
}

#[tokio::test]
async fn a_budget_that_cannot_be_counted_throttles_nothing() {
    // An operator's stray write left the minute's counter unreadable as a number: counting
    // fails, and the business is served (fail open) rather than refused.
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    const OPEN: &str = "5b0e8a7c-cccc-4c1d-8e2f-000000000014";
    import_with(&app, OPEN, "[business.budget]\nmessages_per_minute = 1").await;
    app.start_worker("w0").await;
    away_from_a_minute_boundary().await;
    let minute = chrono::Utc::now().format("%Y%m%d%H%M");
    let key = format!("{}budget:{OPEN}:m:{minute}", app.config.redis.key_prefix);
    let _: () = redis::AsyncCommands::set(&mut app.redis.clone(), &key, "not a number")
        .await
        .expect("set");
    let ids: Vec<String> = (1..=3).map(|i| format!("open-{i}")).collect();
    for id in &ids {
        app.send_to(OPEN, &format!("user-{id}"), id, "hello").await;
    }
    let replies = app
        .wait_all(&ids.iter().cloned().collect(), Duration::from_secs(30))
        .await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "{id}");
        assert_eq!(
            replies[id][0]["status"], "ok",
            "{id}: served, not throttled"
        );
    }
    assert_eq!(rows(&app, OPEN).await, (3, 3, 3));
}

/// Milliseconds from each message's arrival (its entry id) to its reply's `processed_at`.
fn latencies(replies: &HashMap<String, Vec<HashMap<String, String>>>, ids: &[String]) -> Vec<i64> {
    let mut out: Vec<i64> = ids
        .iter()
        .map(|id| {
            let r = &replies[id][0];
            let arrived: i64 = r["inbound_id"]
                .split('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .expect("entry id");
            let done = chrono::DateTime::parse_from_rfc3339(&r["processed_at"])
                .expect("processed_at")
                .timestamp_millis();
            done - arrived
        })
        .collect();
    out.sort_unstable();
    out
}

fn p95(sorted: &[i64]) -> i64 {
    sorted[(sorted.len() * 95).div_ceil(100).saturating_sub(1)]
}

/// Sends `n` messages of `business`, one per user, `every` apart; returns their ids.
async fn paced(app: &TestApp, business: &str, tag: &str, n: usize, every: Duration) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{tag}-{i}");
        app.send_to(business, &format!("{tag}-user-{i}"), &id, "hello")
            .await;
        ids.push(id);
        tokio::time::sleep(every).await;
    }
    ids
}

/// A worker with eight slots and a mock LLM taking 150 ms per call, serving the quiet business
/// and the flooding one (which may hold four slots).
async fn fairness_env() -> TestApp {
    let options = MockOptions {
        latency_ms: 150,
        ..MockOptions::default()
    };
    let mut app = spawn_env(options, |c| c.worker.concurrency = 8).await;
    import_with(&app, FLOOD, "[business.budget]\nmax_in_flight = 4").await;
    helpers::import_demo_copy(&app.config, QUIET, &[]).await;
    app.start_worker("w0").await;
    // Both definitions loaded once (the cap is known from the first message on).
    for (business, id) in [(FLOOD, "warm-f"), (QUIET, "warm-q")] {
        app.send_to(business, "warm", id, "hello").await;
        assert_eq!(app.reply(id).await["status"], "ok");
    }
    app
}

/// The quiet business's latencies (sorted) for `n` paced messages.
async fn quiet_latencies(app: &TestApp, n: usize) -> Vec<i64> {
    let ids = paced(app, QUIET, "quiet", n, Duration::from_millis(100)).await;
    let mut replies = HashMap::new();
    for id in &ids {
        replies.insert(id.clone(), vec![app.reply(id).await]);
    }
    latencies(&replies, &ids)
}

// The workers, the mock LLMs and the test share the runtime: two threads, as on this machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_business_does_not_slow_the_others_beyond_a_fifth() {
    // Two identical environments measured at the same time (so both see the same load from
    // whatever else runs on the machine): in one, the quiet business is alone; in the other,
    // the flooding business sends ten times as much at once, which alone would keep all eight
    // slots busy for many seconds. Without the cap the quiet business's p95 goes from 0.3 s
    // to 9 s. A machine this small can still be busy enough with other work to blur one
    // measurement, so up to three are taken; the cap must hold in one of them.
    let _machine = helpers::MACHINE.lock().await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (before, after, alone, during) = fairness_measurement().await;
        eprintln!(
            "quiet business p95: {before} ms alone {alone:?}, {after} ms during the flood {during:?}"
        );
        if after as f64 <= before as f64 * 1.2 {
            return;
        }
        seen.push((before, after));
    }
    panic!("the quiet business's p95 (alone, during the flood) in ms, each try: {seen:?}");
}

/// One measurement: (p95 alone, p95 during the flood, the latencies alone, during).
async fn fairness_measurement() -> (i64, i64, Vec<i64>, Vec<i64>) {
    let (alone_app, flood_app) = tokio::join!(fairness_env(), fairness_env());
    let flood: Vec<(String, String, String)> = (0..300)
        .map(|i| {
            (
                format!("flood-user-{i}"),
                format!("flood-{i}"),
                "hello".to_owned(),
            )
        })
        .collect();
    flood_app.send_many_to(FLOOD, &flood).await;
    // Measured once the flood is in the worker (its first second is spent reading it).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (alone, during) = tokio::join!(
        quiet_latencies(&alone_app, 40),
        quiet_latencies(&flood_app, 40)
    );
    // The flood was still being worked through: it really competed for the slots.
    let (flood_answered, _, _) = rows(&flood_app, FLOOD).await;
    assert!(
        flood_answered < 300,
        "the flood was not finished ({flood_answered} of 300 answered)"
    );
    (p95(&alone), p95(&during), alone, during)
}
