//! The stream guarantees, one focused test each (docs/reliability.md): ownership, the fenced
//! finish, queues that cannot stick, isolated bad entries, fairness, idempotency per user,
//! delivery counts, canonical ids and retention. Every test counts outcomes exactly.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use icmp::llm::mock::MockOptions;
use icmp::pipeline::failpoint;
use icmp::stream::{Finish, Refresh};
use icmp::worker::WorkerStats;
use redis::AsyncCommands;

use crate::helpers::{DEMO_BUSINESS, TestApp, spawn_env};

/// Waits until the group has nothing pending and every id in `expected` has a reply; returns
/// every reply on the outbound stream grouped by `inbound_id`. Publishing needs a pending
/// entry (the finish acks it first), so once nothing is pending the count is final.
async fn settled(app: &TestApp, expected: usize) -> HashMap<String, Vec<HashMap<String, String>>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let replies = app.entries(&app.config.streams.outbound).await;
        let pending = app.pending().await;
        let by_entry = group_by(&replies, "inbound_id");
        if pending == 0 && by_entry.len() >= expected {
            return by_entry;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled: {} of {expected} answered, {pending} pending",
            by_entry.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn group_by(
    entries: &[HashMap<String, String>],
    field: &str,
) -> HashMap<String, Vec<HashMap<String, String>>> {
    let mut out: HashMap<String, Vec<HashMap<String, String>>> = HashMap::new();
    for e in entries {
        out.entry(e[field].clone()).or_default().push(e.clone());
    }
    out
}

/// Waits (briefly) until `read` gives `expected`, then checks it: a worker counts an outcome
/// when the script's answer reaches it, just after Redis shows the effect.
async fn counted(expected: u64, read: impl Fn() -> u64, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while read() != expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(read(), expected, "{what}");
}

/// Every order queue (and queue index) of this app's key prefix.
async fn order_keys(app: &TestApp) -> Vec<String> {
    let pattern = format!("{}order*", app.config.redis.key_prefix);
    app.redis.clone().keys(pattern).await.expect("keys")
}

fn message(user: &str, id: &str, content: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (b"business_id".to_vec(), DEMO_BUSINESS.as_bytes().to_vec()),
        (b"user_id".to_vec(), user.as_bytes().to_vec()),
        (b"message_id".to_vec(), id.as_bytes().to_vec()),
        (b"content".to_vec(), content.as_bytes().to_vec()),
    ]
}

async fn xadd_raw(app: &TestApp, fields: &[(Vec<u8>, Vec<u8>)]) -> String {
    app.redis
        .clone()
        .xadd(&app.config.streams.inbound, "*", fields)
        .await
        .expect("xadd")
}

async fn ensure_group(app: &TestApp) {
    app.streams("setup")
        .await
        .ensure_group()
        .await
        .expect("group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entries_are_answered_alone_and_the_group_keeps_flowing() {
    let mut app = spawn_env(MockOptions::default(), |c| c.worker.concurrency = 8).await;
    let mut bad = Vec::new();
    let mut good = Vec::new();
    // A field name that is not UTF-8 (a producer sending bytes keys).
    let mut fields = message("h1", "bad-name", "hello");
    fields.push((vec![0xff, 0xfe, b'x'], b"v".to_vec()));
    bad.push((
        xadd_raw(&app, &fields).await,
        "validation.unreadable_field_name",
    ));
    good.push(xadd_raw(&app, &message("h2", "good-1", "hello")).await);
    // Values that are not UTF-8, in the queue-keying fields too.
    let fields = vec![
        (b"business_id".to_vec(), DEMO_BUSINESS.as_bytes().to_vec()),
        (b"user_id".to_vec(), vec![0xc3, 0x28]),
        (b"content".to_vec(), b"hi".to_vec()),
    ];
    bad.push((xadd_raw(&app, &fields).await, "validation.invalid_utf8"));
    let mut fields = message("h3", "bad-content", "x");
    fields[3].1 = vec![0xff; 10];
    bad.push((xadd_raw(&app, &fields).await, "validation.invalid_utf8"));
    // Missing fields, a field given twice, too many fields, a huge entry.
    bad.push((
        xadd_raw(&app, &[(b"content".to_vec(), b"orphan".to_vec())]).await,
        "validation.missing_field",
    ));
    let mut fields = message("h4", "dup", "x");
    fields.push((b"user_id".to_vec(), b"someone-else".to_vec()));
    bad.push((xadd_raw(&app, &fields).await, "validation.duplicate_field"));
    let mut fields = message("h5", "wide", "x");
    for i in 0..100 {
        fields.push((format!("f{i}").into_bytes(), b"1".to_vec()));
    }
    bad.push((xadd_raw(&app, &fields).await, "validation.too_many_fields"));
    let mut fields = message("h6", "huge", "x");
    fields.push((b"padding".to_vec(), vec![b'p'; 200_000]));
    bad.push((xadd_raw(&app, &fields).await, "validation.entry_too_large"));
    good.push(xadd_raw(&app, &message("h7", "good-2", "hello again")).await);

    let worker = app.start_worker("w0").await;
    let replies = settled(&app, bad.len() + good.len()).await;
    for (id, code) in &bad {
        let r = &replies[id];
        assert_eq!(r.len(), 1, "{id}: one reply");
        assert_eq!(r[0]["status"], "error", "{id}");
        assert_eq!(r[0]["error_code"], *code, "{id}");
    }
    for id in &good {
        assert_eq!(replies[id].len(), 1);
        assert_eq!(replies[id][0]["status"], "ok");
    }
    assert_eq!(
        replies.len(),
        bad.len() + good.len(),
        "nothing else published"
    );
    counted(
        bad.len() as u64,
        || WorkerStats::get(&worker.stats().rejected),
        "rejected",
    )
    .await;
    assert_eq!(app.count("SELECT count(*) FROM messages", &[]).await, 4);
    assert!(order_keys(&app).await.is_empty(), "no queue left behind");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_slots_with_a_slow_llm_answer_every_message_exactly_once() {
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 700,
            ..Default::default()
        },
        |c| {
            c.worker.concurrency = 2;
            c.streams.claim_idle_ms = 2_000;
            c.llm.request_timeout_ms = 5_000;
        },
    )
    .await;
    let a = app.start_worker("a").await;
    let b = app.start_worker("b").await;
    let mut ids = Vec::new();
    for u in 0..24 {
        ids.push(
            app.send(&format!("o{u}"), &format!("o{u}-m"), "Hello there")
                .await,
        );
    }
    let replies = settled(&app, 24).await;
    for id in &ids {
        assert_eq!(
            replies[id].len(),
            1,
            "{id} published {} times",
            replies[id].len()
        );
    }
    assert_eq!(
        app.count("SELECT count(*) FROM messages", &[]).await,
        48,
        "one user and one assistant row each"
    );
    let lost = WorkerStats::get(&a.stats().lost_taken) + WorkerStats::get(&b.stats().lost_taken);
    assert_eq!(
        lost, 0,
        "waiting entries were kept alive: nobody took them over"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_deleted_consumers_head_is_healed_dead_lettered_and_the_user_answered() {
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    ensure_group(&app).await;
    // A consumer takes the user's first message and is deleted by an operator.
    let first = app.send("dora", "d1", "first").await;
    let dead = app.streams("dead").await;
    let (_, taken) = dead.claim_new(10).await.expect("claim");
    assert_eq!(taken.len(), 1);
    let s = app.config.streams.clone();
    let _: i64 = redis::cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(&s.inbound)
        .arg(&s.group)
        .arg(dead.consumer())
        .query_async(&mut app.redis.clone())
        .await
        .expect("delconsumer");
    // The head of another user's queue is deleted from the stream outright.
    let gone = app.send("xena", "x1", "first").await;
    let (_, taken) = dead.claim_new(10).await.expect("claim");
    assert_eq!(taken[0].id, gone);
    let _: i64 = app
        .redis
        .clone()
        .xdel(&s.inbound, &[&gone])
        .await
        .expect("xdel");

    let second = app.send("dora", "d2", "second").await;
    let xena = app.send("xena", "x2", "second").await;
    let worker = app.start_worker("w0").await;
    let replies = settled(&app, 2).await;
    assert_eq!(replies[&second].len(), 1);
    assert_eq!(replies[&xena].len(), 1);
    assert!(
        !replies.contains_key(&first),
        "the orphan is not answered behind the user's back"
    );
    let dead_letters = app.entries(&s.dead_letter).await;
    assert_eq!(
        dead_letters.len(),
        2,
        "the orphan is kept for a replay, the deleted head is accounted for: {dead_letters:?}"
    );
    let of = |code: &str| {
        dead_letters
            .iter()
            .find(|d| d["error_code"] == code)
            .unwrap_or_else(|| panic!("a {code} dead letter: {dead_letters:?}"))
    };
    let orphan = of("stream.orphaned");
    assert_eq!(orphan["inbound_id"], first);
    assert_eq!(orphan["content"], "first");
    // The XDEL'd head: what its queue knows of it, no content to replay.
    let trimmed = of("stream.trimmed");
    assert_eq!(trimmed["inbound_id"], gone);
    assert_eq!(trimmed["user_id"], "xena");
    assert!(!trimmed.contains_key("content"));
    assert!(WorkerStats::get(&worker.stats().heads_healed) >= 2);
    assert!(order_keys(&app).await.is_empty(), "no queue left behind");
    app.stop().await;
}

#[tokio::test]
async fn order_keys_are_scoped_by_stream_and_group() {
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    ensure_group(&app).await;
    app.send("sam", "s1", "hi").await;
    let mine = app.streams("mine").await;
    let (_, entries) = mine.claim_new(1).await.expect("claim");
    let key = String::from_utf8(entries[0].slot.clone().expect("slot").key).expect("key");
    let s = &app.config.streams;
    // In the stream's slot: the stream's hash tag, or its whole name when it has none.
    let tag = icmp::stream::hash_tag(&s.inbound);
    assert!(key.contains(&format!("{{{tag}}}")), "{key}");
    assert!(key.contains(&s.group), "{key}");
    // Another group on the same stream (and prefix) has queues of its own.
    let mut other = app.config.clone();
    other.streams.group = format!("{}-other", s.group);
    let keys = icmp::stream::Keys::new(&other.streams, &other.redis.key_prefix);
    assert!(!key.starts_with(&keys.queue_prefix));
    assert_ne!(keys.wake_channel, mine.keys().wake_channel);
}

#[tokio::test]
async fn the_finish_publishes_once_whoever_finishes_and_however_often() {
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    ensure_group(&app).await;
    let id = app.send("fin", "f1", "hello").await;
    let first = app.streams("first").await;
    let second = app.streams("second").await;
    let (_, entries) = first.claim_new(1).await.expect("claim");
    let entry = entries[0].clone();
    // A second holder reclaims it (the first looked dead) and finishes first.
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&app.config.streams.inbound)
        .arg(&app.config.streams.group)
        .arg(second.consumer())
        .arg(0)
        .arg(&id)
        .query_async(&mut app.redis.clone())
        .await
        .expect("xclaim");
    let out = app.config.streams.outbound.clone();
    let reply = |who: &str| Finish {
        reply: Some((
            out.as_str(),
            vec![("message_id", "f1".into()), ("who", who.into())],
        )),
        dead_letter: None,
        counted: true,
    };
    assert!(
        second
            .finish(&id, entry.slot.as_ref(), &reply("second"), None)
            .await
            .expect("finish")
    );
    // The first holder's finish, and a retry of the second's, publish nothing.
    assert!(
        !first
            .finish(&id, entry.slot.as_ref(), &reply("first"), None)
            .await
            .expect("finish")
    );
    assert!(
        !second
            .finish(&id, entry.slot.as_ref(), &reply("second"), None)
            .await
            .expect("finish")
    );
    let published = app.entries(&out).await;
    assert_eq!(published.len(), 1);
    assert_eq!(published[0]["who"], "second");
    assert!(order_keys(&app).await.is_empty());
}

#[tokio::test]
async fn a_refresh_never_takes_an_entry_back_and_reports_what_is_lost() {
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    ensure_group(&app).await;
    let taken = app.send("kim", "k1", "a").await;
    let acked = app.send("lee", "l1", "b").await;
    let kept = app.send("max", "m1", "c").await;
    let me = app.streams("me").await;
    let other = app.streams("other").await;
    let (_, entries) = me.claim_new(10).await.expect("claim");
    assert_eq!(entries.len(), 3);
    let s = &app.config.streams;
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&s.inbound)
        .arg(&s.group)
        .arg(other.consumer())
        .arg(0)
        .arg(&taken)
        .query_async(&mut app.redis.clone())
        .await
        .expect("xclaim");
    let _: i64 = app
        .redis
        .clone()
        .xack(&s.inbound, &s.group, &[&acked])
        .await
        .expect("xack");
    let lost = me
        .keep_alive(&[taken.clone(), acked.clone(), kept.clone()])
        .await
        .expect("refresh");
    let lost: HashMap<String, Refresh> = lost.into_iter().collect();
    assert_eq!(lost.len(), 2);
    assert_eq!(lost[&taken], Refresh::Taken);
    assert_eq!(lost[&acked], Refresh::Gone);
    let owner: redis::Value = redis::cmd("XPENDING")
        .arg(&s.inbound)
        .arg(&s.group)
        .arg(&taken)
        .arg(&taken)
        .arg(1)
        .query_async(&mut app.redis.clone())
        .await
        .expect("xpending");
    assert!(
        format!("{owner:?}").contains(other.consumer()),
        "still the other consumer's: {owner:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_backlog_does_not_delay_another_user() {
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 20,
            ..Default::default()
        },
        |c| {
            c.worker.concurrency = 8;
            c.worker.max_held = 5_000;
        },
    )
    .await;
    let backlog: Vec<(String, String, String)> = (0..3_000)
        .map(|i| {
            (
                "flood".to_owned(),
                format!("flood-{i:05}"),
                "Hello".to_owned(),
            )
        })
        .collect();
    app.send_many(&backlog).await;
    app.start_worker("w0").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = tokio::time::Instant::now();
    app.send("quiet", "quiet-1", "Hello").await;
    let reply = app.reply("quiet-1").await;
    let waited = sent.elapsed();
    assert_eq!(reply["status"], "ok");
    let flood_done = app
        .count(
            "SELECT count(*) FROM messages WHERE role = 'user' AND idempotency_key LIKE 'flood-%'",
            &[],
        )
        .await;
    // The backlog alone takes minutes (one at a time, three LLM calls each).
    assert!(
        flood_done < 1_000,
        "the backlog was not drained first ({flood_done} done)"
    );
    assert!(
        waited < Duration::from_secs(5),
        "the quiet user waited {waited:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_message_id_reused_by_another_user_is_that_users_own_message() {
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    let mut app = app;
    app.start_worker("w0").await;
    let first = app
        .send("ann", "same-id", "I'd like to book, my name is Ann Lee")
        .await;
    let reply_a = app.reply("same-id").await;
    let second = app.send("bob", "same-id", "Hello, are you open?").await;
    let replies = settled(&app, 2).await;
    let reply_b = &replies[&second][0];
    assert_eq!(replies[&first].len(), 1);
    assert_eq!(replies[&second].len(), 1);
    assert_eq!(reply_b["user_id"], "bob");
    assert_ne!(reply_b["conversation_id"], reply_a["conversation_id"]);
    assert_ne!(reply_b["reply_id"], reply_a["reply_id"]);
    assert_ne!(reply_b["content"], reply_a["content"]);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE idempotency_key = 'same-id' AND role = 'user'",
            &[]
        )
        .await,
        2,
        "both users' messages are stored"
    );
    // The same user repeating the id gets the stored answer again, under the same reply_id.
    let third = app.send("bob", "same-id", "Hello, are you open?").await;
    let replies = settled(&app, 3).await;
    assert_eq!(replies[&third][0]["reply_id"], reply_b["reply_id"]);
    assert_eq!(replies[&third][0]["content"], reply_b["content"]);
    app.stop().await;
}

#[tokio::test]
async fn a_message_that_always_panics_is_dead_lettered_after_exactly_max_deliveries() {
    let mut app = spawn_env(MockOptions::default(), |c| {
        c.streams.max_deliveries = 3;
        c.streams.claim_idle_ms = 300;
    })
    .await;
    app.failpoints.enable(failpoint::PANIC);
    let worker = app.start_worker("w0").await;
    let id = app.send("pat", "panics", "hello").await;
    let replies = settled(&app, 1).await;
    app.failpoints.disable(failpoint::PANIC);
    assert_eq!(replies[&id].len(), 1);
    assert_eq!(replies[&id][0]["error_code"], "internal.panic");
    let dead = app.entries(&app.config.streams.dead_letter).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["deliveries"], "3");
    assert_eq!(dead[0]["error_code"], "internal.panic");
    // Deliveries 1 and 2 were left for redelivery; the third was dead-lettered.
    counted(
        1,
        || WorkerStats::get(&worker.stats().dead_lettered),
        "dead-lettered",
    )
    .await;
    assert_eq!(WorkerStats::get(&worker.stats().retries_later), 2);
    app.stop().await;
}

#[tokio::test]
async fn delivery_counts_are_exact_and_reclaim_follows_its_cursor() {
    let app = spawn_env(MockOptions::default(), |c| {
        c.streams.claim_idle_ms = 0;
    })
    .await;
    ensure_group(&app).await;
    let s = &app.config.streams;
    // Ids whose sequence numbers compare differently as strings and as numbers.
    for seq in [9, 10, 11] {
        let _: String = app
            .redis
            .clone()
            .xadd(
                &s.inbound,
                format!("5-{seq}"),
                &message("cy", &format!("c{seq}"), "x"),
            )
            .await
            .expect("xadd");
    }
    let first = app.streams("first").await;
    let (_, got) = first.claim_new(10).await.expect("claim");
    assert!(got.iter().all(|e| e.deliveries == 1));
    let other = app.streams("other").await;
    let mut cursor = "0-0".to_owned();
    let mut seen = Vec::new();
    loop {
        let found = other.reclaim(&cursor, 1).await.expect("reclaim");
        seen.extend(found.entries.iter().map(|e| (e.id.clone(), e.deliveries)));
        cursor = found.cursor;
        if cursor == "0-0" {
            break;
        }
    }
    assert_eq!(
        seen,
        vec![("5-9".into(), 2), ("5-10".into(), 2), ("5-11".into(), 2)],
        "each once, in order, counted"
    );
    // A deleted pending entry is reported (and dropped from the pending list).
    let _: i64 = app
        .redis
        .clone()
        .xdel(&s.inbound, &["5-10"])
        .await
        .expect("xdel");
    let found = other.reclaim("0-0", 10).await.expect("reclaim");
    assert_eq!(found.deleted, vec!["5-10".to_owned()]);
    let ids: Vec<_> = found
        .entries
        .iter()
        .map(|e| (e.id.as_str(), e.deliveries))
        .collect();
    assert_eq!(ids, vec![("5-9", 3), ("5-11", 3)]);
}

#[tokio::test]
async fn every_spelling_of_a_business_reaches_one_queue_and_one_user() {
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    ensure_group(&app).await;
    let spellings = [
        DEMO_BUSINESS.to_owned(),
        DEMO_BUSINESS.to_uppercase(),
        format!("{{{DEMO_BUSINESS}}}"),
        format!("urn:uuid:{DEMO_BUSINESS}"),
        DEMO_BUSINESS.replace('-', ""),
        format!("  {DEMO_BUSINESS}\t"),
        format!("{DEMO_BUSINESS}{}", " ".repeat(100)),
    ];
    let probe = app.streams("probe").await;
    let mut keys = HashSet::new();
    for (i, b) in spellings.iter().enumerate() {
        let fields = vec![
            (b"business_id".to_vec(), b.as_bytes().to_vec()),
            (
                b"user_id".to_vec(),
                format!(" ivy{}", " ".repeat(i)).into_bytes(),
            ),
            (b"message_id".to_vec(), format!("ivy-{i}").into_bytes()),
            (b"content".to_vec(), format!("turn {i}").into_bytes()),
        ];
        xadd_raw(&app, &fields).await;
        let (_, got) = probe.claim_new(1).await.expect("claim");
        let slot = got[0].slot.clone().expect("queued");
        keys.insert(slot.key.clone());
        // Hand it back: only its queue key was wanted here.
        let _: i64 = app
            .redis
            .clone()
            .xack(
                &app.config.streams.inbound,
                &app.config.streams.group,
                &[&got[0].id],
            )
            .await
            .expect("xack");
        let _: i64 = app
            .redis
            .clone()
            .zrem(&slot.key, &slot.member)
            .await
            .expect("zrem");
        let canonical = format!("{}{DEMO_BUSINESS}:ivy", probe.keys().queue_prefix);
        assert_eq!(slot.key, canonical.as_bytes(), "{b:?}");
    }
    assert_eq!(keys.len(), 1);
    // Processed, they are one user's conversation, in order.
    for (i, b) in spellings.iter().enumerate() {
        let fields = vec![
            (b"business_id".to_vec(), b.as_bytes().to_vec()),
            (
                b"user_id".to_vec(),
                format!("ivy{}", " ".repeat(i)).into_bytes(),
            ),
            (b"message_id".to_vec(), format!("ivy2-{i}").into_bytes()),
            (b"content".to_vec(), format!("again {i}").into_bytes()),
        ];
        xadd_raw(&app, &fields).await;
    }
    app.start_worker("w0").await;
    let replies = settled(&app, spellings.len()).await;
    assert_eq!(replies.len(), spellings.len());
    assert_eq!(app.count("SELECT count(*) FROM users", &[]).await, 1);
    assert_eq!(
        app.count("SELECT count(DISTINCT conversation_id) FROM messages", &[])
            .await,
        1
    );
    let rows = app
        .db()
        .await
        .query(
            "SELECT idempotency_key FROM messages WHERE role = 'user' ORDER BY seq",
            &[],
        )
        .await
        .expect("rows");
    let order: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let expected: Vec<String> = (0..spellings.len()).map(|i| format!("ivy2-{i}")).collect();
    assert_eq!(order, expected);
    app.stop().await;
}

#[tokio::test]
async fn retention_trims_behind_every_group_and_prunes_idle_consumers_only() {
    let mut app = spawn_env(MockOptions::default(), |c| {
        c.streams.inbound_retain_ms = 0;
        c.streams.retention_interval_ms = 200;
        c.streams.consumer_idle_ms = 300;
        // The holder below must keep its entry for the whole test.
        c.streams.claim_idle_ms = 600_000;
    })
    .await;
    ensure_group(&app).await;
    let s = app.config.streams.clone();
    for i in 0..20 {
        app.send(&format!("r{i}"), &format!("r{i}"), "hello").await;
    }
    let first = app.start_worker("w0").await;
    settled(&app, 20).await;
    app.stop_workers().await;
    // Then a consumer holds a newer entry (never pruned; its entry never trimmed), and another
    // consumer sits idle with nothing pending.
    let held = app.send("hal", "h0", "held").await;
    let holder = app.streams("holder").await;
    holder.claim_new(1).await.expect("claim");
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&s.inbound)
        .arg(&s.group)
        .arg("idle-one")
        .query_async(&mut app.redis.clone())
        .await
        .expect("createconsumer");
    let worker = app.start_worker("w1").await;
    let consumers = || async {
        let v: redis::Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&s.inbound)
            .arg(&s.group)
            .query_async(&mut app.redis.clone())
            .await
            .expect("xinfo");
        format!("{v:?}")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let len: i64 = app.redis.clone().xlen(&s.inbound).await.expect("xlen");
        let listed = consumers().await;
        if len == 1 && !listed.contains("idle-one") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "len {len}, consumers {listed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = app.entries(&s.inbound).await;
    assert_eq!(left[0]["__id"], held, "the pending entry is kept");
    counted(
        20,
        || WorkerStats::get(&first.stats().trimmed) + WorkerStats::get(&worker.stats().trimmed),
        "every answered entry trimmed, nothing else",
    )
    .await;
    counted(
        1,
        || {
            (WorkerStats::get(&first.stats().consumers_pruned)
                + WorkerStats::get(&worker.stats().consumers_pruned))
            .min(1)
        },
        "idle consumers pruned",
    )
    .await;
    let listed = consumers().await;
    assert!(
        listed.contains(holder.consumer()),
        "a consumer with pending entries stays"
    );
    // Another group that has not read yet keeps everything after its position.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&s.inbound)
        .arg("late-readers")
        .arg("$")
        .query_async(&mut app.redis.clone())
        .await
        .expect("group");
    let later = app.send("r-late", "late", "hello").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let left: Vec<String> = app
        .entries(&s.inbound)
        .await
        .into_iter()
        .map(|e| e["__id"].clone())
        .collect();
    assert!(left.contains(&later), "undelivered to `late-readers`: kept");
    app.stop().await;
}

#[tokio::test]
async fn a_waiter_starts_on_another_workers_wake_up_not_on_a_poll() {
    // The safety-net poll is ten minutes: only the pub/sub announcement can start the waiter
    // within this test's time.
    let mut app = spawn_env(MockOptions::default(), |c| c.worker.queue_poll_ms = 600_000).await;
    ensure_group(&app).await;
    let first = app.send("wendy", "w1", "first").await;
    let other = app.streams("other").await;
    let (_, held) = other.claim_new(1).await.expect("claim");
    assert_eq!(held[0].id, first);
    let second = app.send("wendy", "w2", "second").await;
    let worker = app.start_worker("w0").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !app.entries(&app.config.streams.outbound)
            .await
            .iter()
            .any(|r| r["inbound_id"] == second),
        "the second message waits behind the first"
    );
    // The other consumer (a process of its own, as far as the worker knows) finishes the head.
    let out = app.config.streams.outbound.clone();
    let finish = Finish {
        reply: Some((out.as_str(), vec![("message_id", "w1".into())])),
        dead_letter: None,
        counted: true,
    };
    assert!(
        other
            .finish(&first, held[0].slot.as_ref(), &finish, None)
            .await
            .expect("finish")
    );
    let reply = tokio::time::timeout(Duration::from_secs(20), app.reply("w2"))
        .await
        .expect("woken by the announcement");
    assert_eq!(reply["inbound_id"], second);
    assert!(
        WorkerStats::get(&worker.stats().wakes) >= 1,
        "counted as a wake-up"
    );
    assert_eq!(
        WorkerStats::get(&worker.stats().polled_checks),
        0,
        "no poll ran"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_sweep_finds_an_orphan_nobody_waits_behind() {
    let mut app = spawn_env(MockOptions::default(), |c| {
        c.streams.retention_interval_ms = 200;
    })
    .await;
    ensure_group(&app).await;
    // A user writes once; the consumer holding it is deleted; the user never writes again.
    let lone = app.send("lone", "l1", "anyone?").await;
    let bad = xadd_raw(&app, &[(b"content".to_vec(), b"no business".to_vec())]).await;
    let dead = app.streams("dead").await;
    let (_, taken) = dead.claim_new(10).await.expect("claim");
    assert_eq!(taken.len(), 2);
    let s = app.config.streams.clone();
    let _: i64 = redis::cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(&s.inbound)
        .arg(&s.group)
        .arg(dead.consumer())
        .query_async(&mut app.redis.clone())
        .await
        .expect("delconsumer");
    // Trimming right now must keep them: they are queued, hence not answered yet.
    assert_eq!(dead.trim_inbound(0).await.expect("trim"), 0);
    let worker = app.start_worker("w0").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let letters = loop {
        let letters = app.entries(&s.dead_letter).await;
        // The worker counts a heal when the script's answer reaches it, just after.
        if letters.len() == 2 && WorkerStats::get(&worker.stats().heads_healed) == 2 {
            break letters;
        }
        assert!(tokio::time::Instant::now() < deadline, "{letters:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let orphans: HashSet<String> = letters.iter().map(|l| l["inbound_id"].clone()).collect();
    assert_eq!(orphans, HashSet::from([lone, bad]));
    assert!(letters.iter().all(|l| l["error_code"] == "stream.orphaned"));
    assert!(
        app.entries(&s.outbound).await.is_empty(),
        "orphans are not answered"
    );
    assert!(order_keys(&app).await.is_empty(), "queues and index gone");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_orphaned_while_its_worker_processes_it_is_dead_lettered_not_lost() {
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 1_500,
            ..Default::default()
        },
        |c| {
            c.streams.retention_interval_ms = 200;
            c.llm.request_timeout_ms = 5_000;
        },
    )
    .await;
    let worker = app.start_worker("w0").await;
    let first = app.send("olga", "o1", "Hello").await;
    // Once its first LLM call is under way, an operator deletes the worker's consumer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app
        .mock
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(tokio::time::Instant::now() < deadline, "no LLM call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = app.config.streams.clone();
    let _: i64 = redis::cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(&s.inbound)
        .arg(&s.group)
        .arg(worker.streams().consumer())
        .query_async(&mut app.redis.clone())
        .await
        .expect("delconsumer");
    let second = app.send("olga", "o2", "Are you there?").await;
    let replies = settled(&app, 1).await;
    assert_eq!(
        replies[&second].len(),
        1,
        "the user's next message is answered"
    );
    assert!(
        !replies.contains_key(&first),
        "the orphan is not answered behind the fence"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let letters = app.entries(&s.dead_letter).await;
        if letters.iter().any(|l| l["inbound_id"] == first) {
            assert_eq!(letters.len(), 1);
            assert_eq!(letters[0]["error_code"], "stream.orphaned");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "orphan lost: {letters:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Replayed, it is answered: with the answer committed before the consumer was deleted, if
    // the first processing got that far, else a new one.
    let letters = app.entries(&s.dead_letter).await;
    icmp::stream::dlq::replay(&app.redis, &s, &[letters[0]["__id"].clone()])
        .await
        .expect("replay");
    let reply = app.reply("o1").await;
    assert_ne!(reply["status"], "error");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE idempotency_key = 'o1'",
            &[]
        )
        .await,
        2,
        "stored once"
    );
    assert!(order_keys(&app).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_reply_to_key_that_is_not_a_stream_gets_the_reply_on_the_outbound_stream() {
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    let reply_to = format!("{}taken", app.config.streams.reply_prefix);
    let _: () = app
        .redis
        .clone()
        .set(&reply_to, "a string")
        .await
        .expect("set");
    let mut fields = message("rita", "r1", "Hello");
    fields.push((b"reply_to".to_vec(), reply_to.clone().into_bytes()));
    let id = xadd_raw(&app, &fields).await;
    app.start_worker("w0").await;
    let replies = settled(&app, 1).await;
    assert_eq!(replies[&id].len(), 1);
    assert_eq!(replies[&id][0]["status"], "ok");
    let kept: String = app.redis.clone().get(&reply_to).await.expect("get");
    assert_eq!(kept, "a string");
    app.stop().await;
}
