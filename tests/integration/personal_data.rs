//! Personal data: `icmp user export` and `icmp user erase` count exactly what they find and
//! remove in every store (PostgreSQL tables, the cached state, the inbound, outbound,
//! `reply_to`, dead-letter and agents' streams); an erase with the user's messages in flight
//! drops those that arrived before it (acknowledged, no reply, nothing stored) and treats
//! later ones as a new user; erases under load with a flaky LLM and a worker replaced mid-run
//! leave every other user's account exact; and the audit trail records each command without
//! the data.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use icmp::llm::mock::MockOptions;
use icmp::personal_data::places::Streams;
use icmp::personal_data::{Subject, erase, export};
use icmp::store::audit::AuditFilter;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::helpers::{self, DEMO_BUSINESS, TestApp};

fn at(app: &TestApp) -> Streams<'_> {
    Streams {
        streams: &app.config.streams,
        handoff: &app.config.handoff,
    }
}

fn subject(user: &str) -> Subject {
    Subject::new(DEMO_BUSINESS, user).expect("subject")
}

async fn export_of(app: &TestApp, user: &str) -> export::Export {
    export::export(
        &app.store,
        &app.redis,
        &app.config.redis.key_prefix,
        at(app),
        &subject(user),
    )
    .await
    .expect("export")
}

async fn erase_of(app: &TestApp, user: &str) -> erase::Erasure {
    erase::erase(
        &app.store,
        &app.redis,
        &app.config.redis.key_prefix,
        at(app),
        &subject(user),
        Duration::from_secs(30),
    )
    .await
    .expect("erase")
}

/// The id of `user`'s one conversation.
async fn conversation_of(app: &TestApp, user: &str) -> String {
    app.db()
        .await
        .query_one(
            "SELECT c.id::text FROM conversations c JOIN users u \
               ON u.business_id = c.business_id AND u.id = c.user_id WHERE u.external_id = $1",
            &[&user],
        )
        .await
        .expect("conversation")
        .get(0)
}

/// Rows per table of `user`'s data, counted straight from the tables.
async fn rows_of(app: &TestApp, user: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let users = app
        .count(
            "SELECT count(*) FROM users WHERE business_id = $1::text::uuid AND external_id = $2",
            &[&DEMO_BUSINESS, &user],
        )
        .await;
    out.insert("users".to_owned(), users as u64);
    let of_user = "conversation_id IN (SELECT c.id FROM conversations c JOIN users u \
                   ON u.business_id = c.business_id AND u.id = c.user_id \
                   WHERE u.business_id = $1::text::uuid AND u.external_id = $2)";
    for table in [
        "messages",
        "extracted_data",
        "stage_transitions",
        "llm_calls",
        "action_outbox",
    ] {
        let n = app
            .count(
                &format!("SELECT count(*) FROM {table} WHERE {of_user}"),
                &[&DEMO_BUSINESS, &user],
            )
            .await;
        out.insert(table.to_owned(), n as u64);
    }
    let n = app
        .count(
            "SELECT count(*) FROM conversations c JOIN users u \
             ON u.business_id = c.business_id AND u.id = c.user_id \
             WHERE u.business_id = $1::text::uuid AND u.external_id = $2",
            &[&DEMO_BUSINESS, &user],
        )
        .await;
    out.insert("conversations".to_owned(), n as u64);
    out
}

#[tokio::test]
async fn export_finds_every_place_and_erase_removes_exactly_that() {
    let app = helpers::spawn_app(MockOptions::default()).await;
    let reply_to = format!("{}ada-phone", app.config.streams.reply_prefix);
    let inbound = app.config.streams.for_fields(DEMO_BUSINESS, "ada").inbound;
    let mut ids = Vec::new();
    for (i, text) in ["Hello, my name is Ada Lovelace", "I need a visit on Friday"]
        .into_iter()
        .enumerate()
    {
        let id = format!("ada-{i}");
        app.send("ada", &id, text).await;
        app.reply(&id).await;
        ids.push(id);
    }
    app.xadd_on(
        &inbound,
        &[
            ("business_id", DEMO_BUSINESS.as_bytes()),
            ("user_id", b"ada"),
            ("message_id", b"ada-2"),
            ("content", b"Please answer on my phone, Ada here"),
            ("reply_to", reply_to.as_bytes()),
        ],
    )
    .await;
    app.reply_on(&reply_to, "ada-2").await;
    for i in 0..2 {
        let id = format!("bob-{i}");
        app.send("bob", &id, "Bob Marley wants a visit").await;
        app.reply(&id).await;
    }
    // A dead letter of each, as the worker writes one (the original fields, then its own).
    let dead = app
        .config
        .streams
        .for_fields(DEMO_BUSINESS, "ada")
        .dead_letter;
    for user in ["ada", "bob"] {
        app.xadd_on(
            &dead,
            &[
                ("business_id", DEMO_BUSINESS.as_bytes()),
                ("user_id", user.as_bytes()),
                ("content", b"something that failed"),
                ("inbound_id", b"1700000000000-0"),
                ("error_code", b"llm.unavailable"),
            ],
        )
        .await;
    }
    app.settle(Duration::from_secs(10)).await;
    let bob_before = rows_of(&app, "bob").await;
    let ada_rows = rows_of(&app, "ada").await;
    assert_eq!(ada_rows["messages"], 6, "{ada_rows:?}");
    assert!(ada_rows["llm_calls"] >= 3, "{ada_rows:?}");

    // The export finds every row, the cached state and every entry naming the user.
    let found = export_of(&app, "ada").await;
    let counts = found.counts();
    for (table, n) in &ada_rows {
        assert_eq!(counts[table], *n, "{table}: {counts:?}");
    }
    assert_eq!(counts["inbound"], 3, "{counts:?}");
    assert_eq!(counts["replies"], 3, "{counts:?}");
    assert_eq!(counts["dead_letters"], 1, "{counts:?}");
    assert_eq!(counts["cached_state"], 1, "{counts:?}");
    assert_eq!(counts["agents"], 0, "{counts:?}");
    let prompts = &found.database["llm_calls"];
    assert!(
        prompts
            .iter()
            .any(|c| c["prompt"].as_str().is_some_and(|p| p.contains("Lovelace"))),
        "the export holds the LLM calls' prompts"
    );
    let text = serde_json::to_string(&found).expect("json");
    assert!(!text.contains("Bob Marley"), "another user's data leaked");

    // The erase removes exactly what the export found, and nothing of anyone else.
    let erased = erase_of(&app, "ada").await;
    assert!(erased.in_flight.is_empty());
    for (place, n) in &counts {
        let removed = match place.as_str() {
            "inbound" => erased.counts["inbound"] + erased.counts["inbound_undelivered"],
            other => erased.counts[other],
        };
        assert_eq!(
            removed, *n,
            "{place}: found {counts:?}, erased {:?}",
            erased.counts
        );
    }
    assert!(export_of(&app, "ada").await.is_empty());
    assert_eq!(rows_of(&app, "bob").await, bob_before);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM llm_calls WHERE prompt LIKE '%Lovelace%' OR output LIKE '%Lovelace%'",
            &[]
        )
        .await,
        0
    );
    let bob = export_of(&app, "bob").await.counts();
    assert_eq!(
        (bob["replies"], bob["dead_letters"], bob["inbound"]),
        (2, 1, 2)
    );
    assert!(
        !app.key_exists(&format!(
            "{}conv:{DEMO_BUSINESS}:ada",
            app.config.redis.key_prefix
        ))
        .await
    );

    // Idempotent: a second erase finds nothing.
    let again = erase_of(&app, "ada").await;
    assert!(again.counts.values().all(|&n| n == 0), "{:?}", again.counts);
    assert!(
        icmp::stream::entry_id_parts(&again.erased_at)
            >= icmp::stream::entry_id_parts(&erased.erased_at)
    );
    app.stop().await;
}

#[tokio::test]
async fn an_erase_drops_messages_in_flight_and_a_later_message_is_a_new_user() {
    let mut app = helpers::spawn_env(
        MockOptions {
            latency_ms: 600,
            ..MockOptions::default()
        },
        |_| {},
    )
    .await;
    let worker = app.start_worker("w0").await;
    app.send("ada", "m0", "Hello, I am Ada Lovelace").await;
    app.reply("m0").await;
    let first = conversation_of(&app, "ada").await;
    // m1 continues the conversation, m2 waits behind it in the user's order queue: both are
    // in flight (the LLM takes 600 ms a call) when the erase runs.
    // m1 moves the stage (welcome → booking): its write set has a stage transition.
    app.send(
        "ada",
        "m1",
        "Lovelace again, I'd like to book an appointment",
    )
    .await;
    app.send("ada", "m2", "And a third line from Ada").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.pending().await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "m1 was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The export shows what a worker holds.
    let held = export_of(&app, "ada").await;
    assert!(!held.pending.is_empty(), "{:?}", held.pending);
    assert!(
        held.pending
            .iter()
            .all(|p| p.deliveries >= 1 && p.consumer.ends_with("w0")),
        "{:?}",
        held.pending
    );
    let erased = erase_of(&app, "ada").await;
    assert!(erased.in_flight.is_empty(), "{erased:?}");
    assert_eq!(erased.counts["conversations"], 1, "{:?}", erased.counts);
    assert_eq!(erased.counts["messages"], 2, "m0 and its reply");
    // m0 finished before; m1 and m2 were dropped by the worker (or, not yet delivered,
    // removed by the erase): nothing of either is left.
    assert_eq!(
        erased.counts["inbound"] + erased.counts["inbound_undelivered"],
        3,
        "{:?}",
        erased.counts
    );
    assert!(export_of(&app, "ada").await.is_empty());
    for id in ["m0", "m1", "m2"] {
        assert!(
            app.replies_of(id).await.is_empty(),
            "a reply of {id} is left"
        );
    }
    let dropped = worker
        .stats()
        .erased
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped >= 1, "the worker dropped the message it held");
    // Dropped, not failed: no dead letter, no error reply (the erase would have removed both).
    let stats = worker.stats();
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(stats.rejected.load(std::sync::atomic::Ordering::Relaxed), 0);

    // A message after the erase is a new user's: answered, stored in a new conversation.
    app.send("ada", "m3", "Hi, new here").await;
    assert_eq!(app.reply("m3").await["status"], "ok");
    let after = rows_of(&app, "ada").await;
    assert_eq!(
        (after["users"], after["conversations"], after["messages"]),
        (1, 1, 2)
    );
    let second = conversation_of(&app, "ada").await;
    assert_ne!(first, second);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE content LIKE '%Lovelace%'",
            &[]
        )
        .await,
        0
    );
    app.stop().await;
}

/// Erases under load: 24 users write while the LLM is slow and fails now and then, one worker
/// is replaced mid-run, and four users are erased while their messages are in flight (and
/// again, with their later messages, at the end of the run). Every message is classified by its
/// entry id against the erase's instant, and counted: a message of an erased user that arrived
/// before the erase has no rows and no reply left; one that arrived later, and every message of
/// the others, has exactly one reply and exactly its two rows.
#[tokio::test]
async fn erases_under_load_leave_an_exact_account() {
    let seed = std::env::var("ICMP_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut app = helpers::spawn_env(
        MockOptions {
            latency_ms: 20,
            jitter_ms: 60,
            error_rate: 0.05,
            seed,
            ..MockOptions::default()
        },
        |_| {},
    )
    .await;
    app.start_worker("w0").await;
    app.start_worker("w1").await;
    let users: Vec<String> = (0..24).map(|u| format!("u{u}")).collect();
    let erased_users: Vec<&String> = users.iter().take(4).collect();
    // (user, message_id) per inbound entry id.
    let mut sent: HashMap<String, (String, String)> = HashMap::new();
    let mut instants: HashMap<String, (u64, u64)> = HashMap::new();
    for round in 0..10 {
        for _ in 0..12 {
            let user = &users[rng.random_range(0..users.len())];
            let message_id = format!("{user}-{round}-{}", rng.random::<u32>());
            let id = app
                .send(user, &message_id, &format!("round {round} from {user}"))
                .await;
            sent.insert(id, (user.clone(), message_id));
        }
        if round == 4 {
            // An operator replaces a worker while messages are in flight.
            app.stop_workers().await;
            app.start_worker("w2").await;
            app.start_worker("w3").await;
        }
        if round == 5 {
            // The erases run while the erased users keep writing: each message falls on one
            // side of its user's erase, by its entry id.
            let erase_all = async {
                let mut done = Vec::new();
                for user in &erased_users {
                    done.push(((*user).clone(), erase_of(&app, user).await));
                }
                done
            };
            let write_meanwhile = async {
                let mut more = Vec::new();
                for k in 0..24 {
                    let user = erased_users[k % erased_users.len()];
                    let message_id = format!("{user}-during-{k}");
                    let id = app
                        .send(user, &message_id, "written during the erase")
                        .await;
                    more.push((id, (user.clone(), message_id)));
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
                more
            };
            let (done, more) = tokio::join!(erase_all, write_meanwhile);
            for (user, e) in done {
                assert!(e.in_flight.is_empty(), "{e:?}");
                let instant = icmp::stream::entry_id_parts(&e.erased_at).expect("an entry id");
                instants.insert(user, instant);
            }
            sent.extend(more);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.settle(Duration::from_secs(60)).await;
    let replies = app.outbound_entries().await;
    let mut replies_per_message: HashMap<&str, usize> = HashMap::new();
    for r in &replies {
        *replies_per_message
            .entry(r["message_id"].as_str())
            .or_default() += 1;
    }
    let client = app.db().await;
    let rows: HashMap<String, i64> = client
        .query(
            "SELECT idempotency_key, count(*) FROM messages WHERE role IN ('user', 'assistant') \
             GROUP BY idempotency_key",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let (mut dropped, mut answered) = (0, 0);
    for (id, (user, message_id)) in &sent {
        let entry = icmp::stream::entry_id_parts(id).expect("an entry id");
        let before_erase = instants.get(user).is_some_and(|&at| entry <= at);
        let n_replies = replies_per_message
            .get(message_id.as_str())
            .copied()
            .unwrap_or(0);
        let n_rows = rows.get(message_id).copied().unwrap_or(0);
        if before_erase {
            assert_eq!((n_replies, n_rows), (0, 0), "{message_id} of erased {user}");
            dropped += 1;
        } else {
            assert_eq!((n_replies, n_rows), (1, 2), "{message_id} of {user}");
            answered += 1;
        }
    }
    assert!(
        dropped > 0 && answered > 0,
        "{dropped} dropped, {answered} answered"
    );
    // At the end, each erased user is erased again: nothing of them is left anywhere.
    let others_before: HashSet<String> = rows.keys().cloned().collect();
    for user in &erased_users {
        erase_of(&app, user).await;
        assert!(export_of(&app, user).await.is_empty(), "{user}");
    }
    let left: HashSet<String> = client
        .query("SELECT DISTINCT idempotency_key FROM messages", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for key in others_before.difference(&left) {
        let owner = sent
            .values()
            .find(|(_, m)| m == key)
            .map(|(u, _)| u.as_str());
        assert!(
            owner.is_some_and(|u| erased_users.iter().any(|e| e.as_str() == u)),
            "{key} of {owner:?} was removed"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn the_audit_trail_records_each_command_without_the_data_and_cannot_be_changed() {
    let app = helpers::spawn_app(MockOptions::default()).await;
    app.send("grace", "g0", "Grace Hopper would like an appointment")
        .await;
    app.reply("g0").await;
    let record = |action: &str| {
        icmp::personal_data::audit::record("tester", action)
            .business(subject("grace").business)
            .user(subject("grace").key())
    };
    let found = export_of(&app, "grace").await;
    app.store
        .audit(&record("user.export").counts(&found.counts()))
        .await
        .expect("audit");
    let erased = erase_of(&app, "grace").await;
    app.store
        .audit(&record("user.erase").counts(&erased.counts))
        .await
        .expect("audit");
    let log = app
        .store
        .audit_log(&AuditFilter {
            business_id: Some(subject("grace").business),
            user_key: Some(subject("grace").key()),
            action: None,
            limit: 10,
        })
        .await
        .expect("audit log");
    let actions: Vec<&str> = log.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["user.erase", "user.export"]);
    assert_eq!(log[0].counts["messages"], 2);
    let text = serde_json::to_string(&log).expect("json");
    assert!(
        !text.contains("grace") && !text.contains("Hopper"),
        "{text}"
    );
    let client = app.db().await;
    for sql in [
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let e = client.batch_execute(sql).await.expect_err(sql);
        assert!(
            e.to_string().contains("append-only") || format!("{e:?}").contains("append-only"),
            "{sql}: {e:?}"
        );
    }
    app.stop().await;
}

/// A business whose definition keeps messages 30 days, LLM prompts 10 and dead letters 7.
const RETAINING: &str = "5b0e8a7c-cccc-4c1d-8e2f-000000000016";

/// Dates `table`'s rows of the messages stored under `keys` `days` ago.
async fn backdate(app: &TestApp, table: &str, keys: &[&str], days: i32) {
    let (column, of) = match table {
        "messages" => ("created_at", "idempotency_key = ANY($1)"),
        _ => (
            "created_at",
            "message_id IN (SELECT id FROM messages WHERE idempotency_key = ANY($1))",
        ),
    };
    let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    app.db()
        .await
        .execute(
            &format!("UPDATE {table} SET {column} = now() - make_interval(days => $2) WHERE {of}"),
            &[&keys, &days],
        )
        .await
        .expect("backdate");
}

#[tokio::test]
async fn the_retention_sweep_removes_exactly_what_a_business_keeps_no_longer() {
    let mut app = helpers::spawn_env(MockOptions::default(), |_| {}).await;
    helpers::import_demo_copy(
        &app.config,
        RETAINING,
        &[(
            "initial_stage = \"welcome\"\n",
            "initial_stage = \"welcome\"\n[business.retention]\nmessages_days = 30\n\
             llm_prompts_days = 10\ndead_letters_days = 7\n",
        )],
    )
    .await;
    app.start_worker("w0").await;
    for (user, id, text) in [
        ("old", "o0", "Ada Lovelace, long ago"),
        ("old", "o1", "Still Ada, long ago"),
        ("mixed", "x0", "Grace Hopper, long ago"),
        ("mixed", "x1", "Grace Hopper, last week"),
        ("mixed", "x2", "Grace Hopper, today"),
    ] {
        app.send_to(RETAINING, user, id, text).await;
        app.reply(id).await;
    }
    // The same, of the demo business, which keeps everything.
    app.send("keeper", "k0", "Alan Turing, long ago").await;
    app.reply("k0").await;
    app.settle(Duration::from_secs(10)).await;
    // 40 days ago: all of "old", the first of "mixed" (whose conversation goes on), and the
    // demo's; 15 days ago: mixed's second, whose prompts are past 10 days but its rows not
    // past 30.
    for table in ["messages", "llm_calls", "stage_transitions"] {
        backdate(&app, table, &["o0", "o1", "x0", "k0"], 40).await;
        backdate(&app, table, &["x1"], 15).await;
    }
    let db = app.db().await;
    // Every conversation began before its oldest message.
    db.execute(
        "UPDATE conversations SET created_at = now() - interval '50 days'",
        &[],
    )
    .await
    .expect("backdate");
    db.execute(
        "UPDATE conversations c SET updated_at = now() - interval '40 days', summary = 'Ada…' \
           FROM users u WHERE u.business_id = c.business_id AND u.id = c.user_id \
            AND u.external_id IN ('old', 'keeper')",
        &[],
    )
    .await
    .expect("backdate");
    db.execute(
        "UPDATE users SET last_seen_at = now() - interval '40 days' \
          WHERE external_id IN ('old', 'keeper')",
        &[],
    )
    .await
    .expect("backdate");
    db.execute(
        "UPDATE conversations c SET summary = 'Grace…' FROM users u \
          WHERE u.business_id = c.business_id AND u.id = c.user_id AND u.external_id = 'mixed'",
        &[],
    )
    .await
    .expect("summary");
    let count = async |sql: &str| app.count(sql, &[]).await;
    let calls_of = |keys: &str| {
        format!(
            "SELECT count(*) FROM llm_calls WHERE message_id IN \
             (SELECT id FROM messages WHERE idempotency_key IN ({keys}))"
        )
    };
    let old_calls = count(&calls_of("'o0', 'o1', 'x0'")).await;
    let x1_calls = count(&calls_of("'x1'")).await;
    assert!(old_calls >= 3 && x1_calls >= 1);
    // Dead letters: one of each business 20 days old, one of the retaining business today.
    let dead = app.config.streams.dead_letter.clone();
    let day_ms = 86_400_000i64;
    let now_ms = chrono::Utc::now().timestamp_millis();
    for (ms, business) in [
        (now_ms - 20 * day_ms, RETAINING),
        (now_ms - 20 * day_ms + 1, DEMO_BUSINESS),
        (now_ms - 1000, RETAINING),
    ] {
        let _: String = redis::cmd("XADD")
            .arg(&dead)
            .arg(format!("{ms}-0"))
            .arg("business_id")
            .arg(business)
            .arg("user_id")
            .arg("old")
            .query_async(&mut app.redis.clone())
            .await
            .expect("xadd");
    }

    // The sweep runs as a worker's does: under the worker role, row-level security on.
    let sweeper = icmp::personal_data::retention::Sweeper::new(
        icmp::store::Store::connect_worker(&app.config.database).expect("store"),
        app.redis.clone(),
        app.config.streams.clone(),
        app.config.redis.key_prefix.clone(),
        icmp::config::RetentionConfig {
            sweep_interval_ms: 0,
            batch_rows: 2,
            pause_ms: 0,
        },
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let swept = sweeper
        .sweep(chrono::Utc::now(), &stop)
        .await
        .expect("sweep");
    assert_eq!(swept.messages, 6, "o0, o1, x0 and their replies: {swept:?}");
    assert_eq!(swept.conversations, 1, "old's: {swept:?}");
    assert_eq!(swept.users, 1, "old: {swept:?}");
    // The old messages' calls went with them; x1's are blanked.
    assert_eq!(swept.llm_prompts, x1_calls as u64, "{swept:?}");
    assert_eq!(swept.dead_letters, 1, "{swept:?}");
    assert_eq!(swept.cached_states, 2, "old's and mixed's: {swept:?}");
    assert_eq!(count(&calls_of("'o0', 'o1', 'x0'")).await, 0);
    assert_eq!(
        count(
            "SELECT count(*) FROM llm_calls WHERE message_id IN (SELECT id FROM messages \
             WHERE idempotency_key = 'x1') AND prompt = '' AND output IS NULL"
        )
        .await,
        x1_calls,
        "x1's calls are kept, blanked"
    );
    assert_eq!(
        count("SELECT count(*) FROM messages WHERE idempotency_key IN ('x1', 'x2', 'k0')").await,
        6
    );
    assert_eq!(
        count("SELECT count(*) FROM conversations WHERE summary = 'Grace…' OR summary = 'Ada…'")
            .await,
        1,
        "mixed's summary is blanked with its first messages; the keeper's stays"
    );
    assert_eq!(
        count("SELECT count(*) FROM users WHERE external_id = 'old'").await,
        0
    );
    let left: Vec<String> = app
        .entries(&dead)
        .await
        .into_iter()
        .map(|e| e["business_id"].clone())
        .collect();
    assert_eq!(left, [DEMO_BUSINESS, RETAINING]);
    // A second sweep finds nothing.
    assert_eq!(
        sweeper
            .sweep(chrono::Utc::now(), &stop)
            .await
            .expect("sweep"),
        icmp::personal_data::retention::Swept::default()
    );
    // The mixed conversation goes on, from what is left.
    app.send_to(RETAINING, "mixed", "x3", "Grace again").await;
    assert_eq!(app.reply("x3").await["status"], "ok");
    // A worker process sweeps by itself.
    backdate(&app, "messages", &["x3"], 40).await;
    backdate(&app, "llm_calls", &["x3"], 40).await;
    let mut config = app.consumer_config("sweeper");
    config.retention.sweep_interval_ms = 200;
    let worker = icmp::startup::Application::build(&config, Default::default())
        .await
        .expect("worker");
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(worker.run_until_stopped(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count("SELECT count(*) FROM messages WHERE idempotency_key = 'x3'").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not sweep"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let _ = run.await;
    app.stop().await;
}

/// A worker at `info`, then one at `debug`, answer messages full of personal data (names,
/// dates, reasons for a visit, a phone number) through a flaky LLM, with bad input and a
/// business whose replies fail; neither log carries any of it, nor the values the extraction
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_logs_carry_no_personal_data_at_info_or_debug() {
    let app = helpers::spawn_env(
        MockOptions {
            latency_ms: 5,
            error_rate: 0.2,
            malformed_rate: 0.1,
            ..Default::default()
        },
        |c| {
            c.streams.claim_idle_ms = 1_000;
            c.streams.max_deliveries = 2;
            c.retry.max_elapsed_ms = 300;
        },
    )
    .await;
    let poison_business = "5b0e8a7c-2222-4c1d-8e2f-00000000001b";
    helpers::import_poisoned_demo(&app, poison_business).await;
    let texts = [
        "I'd like to book an appointment, my name is Zephyrine Quillfeather",
        "I would like a visit on 2031-02-17 for a cracked molar",
        "Zephyrine Quillfeather again: my phone is 0612-998877",
    ];
    let mut logs = Vec::new();
    for level in ["info", "debug"] {
        let mut worker = crate::processes::WorkerProcess::spawn(
            &app.config,
            level,
            &[("ICMP__TELEMETRY__LOG_FILTER", level)],
        );
        let mut ids = HashSet::new();
        for u in 0..4 {
            for (i, text) in texts.iter().enumerate() {
                let id = format!("pii-{level}-{u}-{i}");
                app.send(&format!("patient-{level}-{u}"), &id, text).await;
                ids.insert(id);
            }
        }
        let poison = format!("pii-{level}-poison");
        app.send_to(poison_business, "patient-x", &poison, texts[0])
            .await;
        ids.insert(poison);
        let bad = format!("pii-{level}-bad");
        app.xadd(&[
            ("business_id", b"not-a-uuid"),
            ("user_id", b"patient-y"),
            ("message_id", bad.as_bytes()),
            ("content", texts[1].as_bytes()),
        ])
        .await;
        ids.insert(bad);
        let replies = app.wait_all(&ids, Duration::from_secs(90)).await;
        for id in &ids {
            assert_eq!(replies[id].len(), 1, "{id}");
        }
        worker.terminate().await;
        logs.push(std::fs::read_to_string(&worker.log).expect("log"));
    }
    let extracted: Vec<String> = app
        .db()
        .await
        .query("SELECT DISTINCT value #>> '{}' FROM extracted_data", &[])
        .await
        .expect("extracted")
        .iter()
        .filter_map(|r| r.get::<_, Option<String>>(0))
        .filter(|v| v.len() >= 4)
        .collect();
    assert!(!extracted.is_empty(), "the extraction stored values");
    assert!(logs[1].contains("DEBUG"), "the debug log has debug lines");
    assert!(!logs[0].contains("DEBUG"), "the info log has none");
    let needles = [
        "Zephyrine",
        "Quillfeather",
        "2031-02-17",
        "cracked molar",
        "0612-998877",
        // The users' ids.
        "patient-info-",
        "patient-debug-",
        "patient-x",
        "patient-y",
    ];
    for (level, log) in ["info", "debug"].iter().zip(&logs) {
        assert!(log.lines().count() > 1, "{level}: a log was written");
        for needle in needles
            .iter()
            .copied()
            .chain(extracted.iter().map(String::as_str))
        {
            assert!(
                !log.contains(needle),
                "the {level} log carries {needle:?}: {}",
                log.lines().find(|l| l.contains(needle)).unwrap_or_default()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_commands_print_what_they_find_and_remove_and_are_audited() {
    let app = helpers::spawn_app(MockOptions::default()).await;
    app.send("lin", "l0", "Lin Wu would like a cleaning").await;
    app.reply("l0").await;
    app.settle(Duration::from_secs(10)).await;
    let c = &app.config;
    let who = ["--business", DEMO_BUSINESS, "--user", "lin"];
    let args = |cmd: &[&'static str]| {
        let mut a: Vec<&str> = cmd.to_vec();
        a.extend(who);
        a
    };
    // An operator reads the conversation first: audited too.
    let shown = crate::operator::run_icmp(c, &args(&["conversation", "show", "--json"]), b"").await;
    assert!(shown.contains("Lin Wu"), "{shown}");
    let out = crate::operator::run_icmp(c, &args(&["user", "export", "--json"]), b"").await;
    let doc: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON document");
    assert_eq!(doc["user_id"], "lin");
    assert_eq!(
        doc["database"]["messages"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(doc["streams"]["replies"].as_array().map(Vec::len), Some(1));
    let out = crate::operator::run_icmp(c, &args(&["user", "erase", "--json"]), b"").await;
    let erased: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(erased["counts"]["messages"], 2);
    assert_eq!(erased["counts"]["replies"], 1);
    assert_eq!(erased["counts"]["users"], 1);
    let (ok, _, stderr) =
        crate::operator::run_icmp_status(c, &args(&["user", "export"]), b"").await;
    assert!(!ok, "nothing left: exit 1");
    assert!(stderr.contains("nothing stored"), "{stderr}");
    let (ok, _, stderr) = crate::operator::run_icmp_status(
        c,
        &["user", "erase", "--business", "nope", "--user", "lin"],
        b"",
    )
    .await;
    assert!(
        !ok && stderr.contains("--business must be a UUID"),
        "{stderr}"
    );
    let out = crate::operator::run_icmp(c, &args(&["audit", "--json"]), b"").await;
    let records: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let actions: Vec<&str> = records
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    // Newest first.
    assert_eq!(
        actions,
        [
            "user.export",
            "user.erase",
            "user.export",
            "conversation.read"
        ]
    );
    assert_eq!(records[1]["counts"]["messages"], 2);
    assert_eq!(records[0]["counts"]["messages"], 0);
    assert!(!out.contains("Lin Wu") && !out.contains("\"lin\""), "{out}");
    app.stop().await;
}
