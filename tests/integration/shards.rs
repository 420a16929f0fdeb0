//! Sharded inbound streams (`streams.shards`): every shard a stream of its own with its own
//! hash tag, each user's messages on the user's shard, every worker reading every shard. On one
//! Redis and on the 3 + 3 cluster (one shard per master): every message answered exactly once,
//! in its user's order, on its own shard's streams; an entry on the wrong shard is answered
//! with `validation.wrong_shard` and stores nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use icmp::config::{Config, RedactedUrl, RedisMode};
use icmp::llm::mock::MockOptions;
use icmp::protocol::shard::shard_of;

use crate::cluster::{CLUSTER, cluster_urls, nodes_serving};
use crate::helpers::{DEMO_BUSINESS, TestApp, spawn_env};
use crate::operator::run_icmp;
use crate::reliability::{
    assert_exactly_once, assert_stored_in_order, ids, quick_recovery, workload,
};

fn demo() -> uuid::Uuid {
    uuid::Uuid::parse_str(DEMO_BUSINESS).expect("demo business id")
}

/// Three shards; the streams named as the isolated configuration names them, without a tag.
fn three_shards(c: &mut Config) {
    quick_recovery(c);
    c.streams.shards = 3;
}

/// Sends `messages`, waits for every reply, and checks the account: one `ok` reply per
/// message, on the outbound stream of its user's shard, nothing stored twice or out of order,
/// nothing pending and no dead letters on any shard.
async fn assert_answered_on_their_shards(app: &TestApp, messages: &[(String, String, String)]) {
    app.send_many(messages).await;
    let all = ids(messages);
    let replies = app.wait_all(&all, Duration::from_secs(120)).await;
    for id in &all {
        let r = &replies[id];
        assert_eq!(r.len(), 1, "{id}: one reply, got {r:?}");
        assert_eq!(r[0]["status"], "ok", "{id}: {:?}", r[0]);
    }
    assert_eq!(replies.len(), all.len(), "no reply to anything else");
    assert_exactly_once(app, all.len()).await;
    assert_stored_in_order(app).await;
    let mut per_shard = Vec::new();
    for shard in app.config.streams.all_shards() {
        let s = shard.shard.expect("a shard");
        let on_it = app.entries(&shard.outbound).await;
        for reply in &on_it {
            let user = &reply["user_id"];
            assert_eq!(
                shard_of(&demo(), user, shard.shards),
                s,
                "{user}'s reply on shard {s}"
            );
        }
        per_shard.push(on_it.len());
        assert!(
            app.entries(&shard.dead_letter).await.is_empty(),
            "shard {s}: dead letters"
        );
    }
    assert!(
        per_shard.iter().all(|n| *n > 0),
        "every shard carried some: {per_shard:?}"
    );
    assert_eq!(app.pending().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_shards_every_message_is_answered_once_in_order_on_its_users_shard() {
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 2,
            ..Default::default()
        },
        three_shards,
    )
    .await;
    let w0 = app.start_worker("w0").await;
    app.start_worker("w1").await;
    assert_answered_on_their_shards(&app, &workload("sh", 30, 4)).await;
    // One set of counters per process, over its shards.
    assert!(icmp::worker::WorkerStats::get(&w0.stats().replied) > 0);

    // `icmp status` shows each shard, and the totals over them.
    let status = icmp::status::read(
        &app.redis,
        &app.config.redis,
        &app.config.streams,
        &app.store,
        5,
    )
    .await
    .expect("status");
    assert_eq!(status.shards.len(), 3);
    assert!(
        status
            .shards
            .iter()
            .all(|s| s.figures.group_exists && s.figures.pending == 0)
    );
    assert_eq!(status.totals.lag, Some(0));
    let names: HashSet<&str> = status
        .shards
        .iter()
        .map(|s| s.figures.stream.as_str())
        .collect();
    assert_eq!(names.len(), 3);
    let text = status.to_string();
    assert!(text.contains("shard   2 "), "{text}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_on_the_wrong_shard_is_refused_and_stores_nothing_and_its_user_goes_on() {
    let app = spawn_env(MockOptions::default(), three_shards).await;
    let mut app = app;
    app.start_worker("w0").await;
    let user = "wrong-shard-user";
    let right = shard_of(&demo(), user, 3);
    let wrong = app.config.streams.shard((right + 1) % 3);
    // On the wrong shard, with a reply_to in that shard's slot: the error goes there.
    let reply_to = format!("{}misdirected", wrong.reply_prefix);
    app.xadd_on(
        &wrong.inbound,
        &[
            ("business_id", DEMO_BUSINESS.as_bytes()),
            ("user_id", user.as_bytes()),
            ("message_id", b"ws-1"),
            ("content", b"Hello"),
            ("reply_to", reply_to.as_bytes()),
        ],
    )
    .await;
    let err = app.reply_on(&reply_to, "ws-1").await;
    assert_eq!(err["status"], "error");
    assert_eq!(err["error_code"], "validation.wrong_shard");
    let home = app.config.streams.shard(right).inbound;
    assert!(err["error"].contains(&home), "{err:?}");
    // A reply_to in another shard's slot is refused too (its finish could not publish there).
    let elsewhere = format!("{}x", app.config.streams.shard(right).reply_prefix);
    app.xadd_on(
        &wrong.inbound,
        &[
            ("business_id", DEMO_BUSINESS.as_bytes()),
            ("user_id", user.as_bytes()),
            ("message_id", b"ws-2"),
            ("content", b"Hello"),
            ("reply_to", elsewhere.as_bytes()),
        ],
    )
    .await;
    let err = app.reply_on(&wrong.outbound, "ws-2").await;
    assert_eq!(
        err["error_code"], "validation.reply_to_not_allowed",
        "{err:?}"
    );
    // Nothing of either was stored; sent to its shard, the same message is answered.
    let stored = "SELECT count(*) FROM messages WHERE idempotency_key LIKE 'ws-%'";
    assert_eq!(app.count(stored, &[]).await, 0);
    app.send(user, "ws-1", "Hello").await;
    let ok = app
        .reply_on(&app.config.streams.shard(right).outbound, "ws-1")
        .await;
    assert_eq!(ok["status"], "ok", "{ok:?}");
    app.settle(Duration::from_secs(10)).await;
    assert_eq!(
        app.count(stored, &[]).await,
        2,
        "one user and one assistant row"
    );
    assert_eq!(
        app.replies_of("ws-1").await.len(),
        1,
        "once on its own shard"
    );
    app.stop().await;
}

/// Cluster mode through `seed`, three shards, streams named without a tag (each shard adds
/// its own).
fn sharded_on_cluster(c: &mut Config, seed: &str) {
    three_shards(c);
    c.redis.mode = RedisMode::Cluster;
    c.redis.url = RedactedUrl::new(seed.to_owned());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_three_shards_live_on_three_masters_and_answer_once_in_order() {
    let _one = CLUSTER.lock().await;
    let urls = cluster_urls();
    let seed = urls[0].clone();
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 2,
            ..Default::default()
        },
        |c| sharded_on_cluster(c, &seed),
    )
    .await;
    let mut masters = HashMap::new();
    for shard in app.config.streams.all_shards() {
        let master = nodes_serving(&seed, &shard.inbound).await[0].clone();
        masters.insert(master, shard.inbound);
    }
    assert_eq!(masters.len(), 3, "one shard per master: {masters:?}");
    app.start_worker("w0").await;
    app.start_worker("w1").await;
    assert_answered_on_their_shards(&app, &workload("cs", 30, 4)).await;
    app.stop().await;
}

/// The Python example computes every user's shard and names as the worker does, and its
/// message to a sharded deployment is answered on its user's shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_names_the_same_shard_and_is_answered_there() {
    let mut app = spawn_env(MockOptions::default(), three_shards).await;
    app.start_worker("w0").await;
    let s = &app.config.streams;
    let python = |args: Vec<String>| {
        let url = app.config.redis.url.expose().to_owned();
        let (inbound, outbound) = (s.inbound.clone(), s.outbound.clone());
        let reply_prefix = s.reply_prefix.clone();
        async move {
            tokio::process::Command::new("python3")
                .arg(crate::helpers::root().join("examples/python/icmp_client.py"))
                .args([
                    "--redis",
                    &url,
                    "--inbound",
                    &inbound,
                    "--outbound",
                    &outbound,
                ])
                .args([
                    "--reply-prefix",
                    &reply_prefix,
                    "--shards",
                    "3",
                    "--timeout",
                    "30",
                ])
                .args(args)
                .output()
                .await
                .expect("python3 (the test command installs redis-py)")
        }
    };
    for user in ["alice", "bob", "heidi", " padded ", "Zoë", "user-42"] {
        let out = python(vec!["--user".into(), user.into(), "--print-shard".into()]).await;
        let named: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let ours = s.for_user(&demo(), user.trim_ascii());
        assert_eq!(named["shard"], ours.shard.expect("a shard"), "{user}");
        assert_eq!(named["inbound"], ours.inbound, "{user}");
        assert_eq!(named["outbound"], ours.outbound, "{user}");
        assert_eq!(named["reply_prefix"], ours.reply_prefix, "{user}");
    }
    let out = python(vec![
        "--user".into(),
        "pia".into(),
        "Hello from Python".into(),
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON reply");
    assert_eq!(reply["status"], "ok", "{reply}");
    let home = s.for_user(&demo(), "pia").outbound;
    assert_eq!(app.entries(&home).await.len(), 1, "answered on pia's shard");
    // `icmp shard` names the same, and `icmp send` is answered through its user's shard.
    let bob = s.for_user(&demo(), "bob");
    let named = run_icmp(&app.config, &["shard", DEMO_BUSINESS, "bob", "--json"], b"").await;
    let named: serde_json::Value = serde_json::from_str(&named).expect("json");
    assert_eq!(named["inbound"], bob.inbound);
    assert_eq!(named["reply_prefix"], bob.reply_prefix);
    let sent = run_icmp(
        &app.config,
        &["send", "--user", "bob", "Hello from icmp send"],
        b"",
    )
    .await;
    assert!(sent.contains("Hello from icmp send"), "{sent}");
    // Its entry is on bob's shard, acknowledged there.
    let on_bobs = app.entries(&bob.inbound).await;
    assert!(
        on_bobs
            .iter()
            .any(|e| e["content"] == "Hello from icmp send"),
        "{on_bobs:?}"
    );
    app.stop().await;
}

/// A hot shard does not starve a quiet one: with two processing slots busy on a backlog of
/// shard A, a message on shard B takes the next slot that frees, long before the backlog is
/// done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_on_a_quiet_shard_is_not_starved_by_a_hot_one() {
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 300,
            ..Default::default()
        },
        |c| {
            three_shards(c);
            c.worker.concurrency = 2;
        },
    )
    .await;
    let hot = shard_of(&demo(), "hot-0", 3);
    let backlog: Vec<(String, String, String)> = (0..200)
        .map(|i| format!("hot-{i}"))
        .filter(|u| shard_of(&demo(), u, 3) == hot)
        .take(30)
        .map(|u| (u.clone(), format!("{u}-m"), "Hello".to_owned()))
        .collect();
    let quiet_user = (0..)
        .map(|i| format!("quiet-{i}"))
        .find(|u| shard_of(&demo(), u, 3) != hot)
        .expect("a user of another shard");
    app.start_worker("w0").await;
    app.send_many(&backlog).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.send(&quiet_user, "quiet-m", "Hello").await;
    let quiet = app.config.streams.for_user(&demo(), &quiet_user);
    let reply = app.reply_on(&quiet.outbound, "quiet-m").await;
    assert_eq!(reply["status"], "ok");
    let hot_done = app
        .entries(&app.config.streams.shard(hot).outbound)
        .await
        .len();
    // 30 messages on 2 slots take 15 rounds of 300 ms; the quiet one waited about one.
    assert!(
        hot_done <= 10,
        "{hot_done} of the hot shard's 30 were answered first"
    );
    app.wait_all(&ids(&backlog), Duration::from_secs(60)).await;
    app.stop().await;
}

/// Moving from one shard to three while users keep writing: the workers drain the old layout
/// before they read the new one, `icmp reshard` switches once it has drained, every message is
/// answered exactly once and stored in its user's order across the move, and a producer that
/// did not move is told where its user's messages go now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_from_one_shard_to_three_keeps_every_users_order() {
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 20,
            ..Default::default()
        },
        quick_recovery,
    )
    .await;
    let all = workload("mv", 20, 10);
    // Turns 0 to 5 of every user on the one shard of today's layout.
    let (before, after) = all.split_at(20 * 6);
    app.start_worker("old").await;
    app.send_many(before).await;
    // The workers move (held entries of the stopped one are reclaimed by the new one).
    app.stop_workers().await;
    app.config.streams.shards = 3;
    app.config.streams.previous_shards = 1;
    app.start_worker("new").await;
    // The producers move: turns 6 to 9 go to each user's shard of the new layout, and wait.
    app.send_many(after).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let early: usize = futures::future::join_all(after.iter().map(|(_, id, _)| app.replies_of(id)))
        .await
        .iter()
        .map(Vec::len)
        .sum();
    assert_eq!(
        early, 0,
        "nothing of the new layout is answered before the switch"
    );
    let out = run_icmp(&app.config, &["reshard", "--timeout-secs", "120"], b"").await;
    assert!(out.contains("switched"), "{out}");
    let replies = app.wait_all(&ids(&all), Duration::from_secs(120)).await;
    for (_, id, _) in &all {
        assert_eq!(replies[id].len(), 1, "{id}: {:?}", replies[id]);
        assert_eq!(replies[id][0]["status"], "ok", "{id}: {:?}", replies[id]);
    }
    assert_exactly_once(&app, all.len()).await;
    assert_stored_in_order(&app).await;
    // A producer still on the old layout is refused, with the user's new stream.
    let old = icmp::stream::resharding::previous_layout(&app.config.streams)
        .expect("a move")
        .shard(0);
    app.xadd_on(
        &old.inbound,
        &[
            ("business_id", DEMO_BUSINESS.as_bytes()),
            ("user_id", b"mv-u0"),
            ("message_id", b"mv-late"),
            ("content", b"Hello again"),
        ],
    )
    .await;
    let late = app.reply_on(&old.outbound, "mv-late").await;
    assert_eq!(late["error_code"], "validation.wrong_shard", "{late:?}");
    let home = app.config.streams.for_user(&demo(), "mv-u0").inbound;
    assert!(late["error"].contains(&home), "{late:?}");
    let status = run_icmp(&app.config, &["reshard", "--status"], b"").await;
    assert!(status.contains("switched"), "{status}");
    app.stop().await;
}

/// One command as `MONITOR` printed it: its arguments, and whether a script ran it.
#[derive(Debug, Clone)]
struct Logged {
    client: String,
    args: Vec<Vec<u8>>,
}

/// Parses a `MONITOR` line: `<time> [<db> <client>] "ARG" "ARG" …` (arguments quoted as
/// `redis-cli` quotes them: `\"`, `\\`, `\n`, `\r`, `\t`, `\a`, `\b`, `\xHH`).
fn parse_monitor_line(line: &str) -> Option<Logged> {
    let open = line.find('[')?;
    let close = line[open..].find(']')? + open;
    let client = line[open + 1..close].split_whitespace().nth(1)?.to_owned();
    let mut args = Vec::new();
    let mut chars = line[close + 1..].bytes().peekable();
    while let Some(c) = chars.next() {
        if c != b'"' {
            continue;
        }
        let mut arg = Vec::new();
        while let Some(c) = chars.next() {
            match c {
                b'"' => break,
                b'\\' => match chars.next()? {
                    b'n' => arg.push(b'\n'),
                    b'r' => arg.push(b'\r'),
                    b't' => arg.push(b'\t'),
                    b'a' => arg.push(7),
                    b'b' => arg.push(8),
                    b'x' => {
                        let hex = [chars.next()?, chars.next()?];
                        arg.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
                    }
                    other => arg.push(other),
                },
                other => arg.push(other),
            }
        }
        args.push(arg);
    }
    Some(Logged { client, args })
}

/// Every command the workers and the operator commands send to a Redis Cluster, recorded with
/// `MONITOR` on each master while a sharded workload runs (coalesced bursts, `reply_to`
/// streams, invalid entries, a misdirected entry, operator reads): the keys of each command,
/// of each script together with every key it touched inside (the claim scripts reach queue
/// keys they compute), and of each `MULTI` block lie in one slot, as a cluster requires; and
/// nothing scans the keyspace (`KEYS`, `SCAN`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_and_script_keeps_its_keys_in_one_slot_on_a_cluster() {
    use futures::StreamExt;
    let _one = CLUSTER.lock().await;
    let urls = cluster_urls();
    let seed = urls[0].clone();
    let mut app = spawn_env(MockOptions::default(), |c| sharded_on_cluster(c, &seed)).await;
    let test_id = app.config.streams.group.clone();
    let id = test_id.trim_start_matches("g-").to_owned();
    // Monitor every node (a failover elsewhere may have moved masters around).
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(usize, String)>::new()));
    let mut monitors = Vec::new();
    for (n, url) in urls.iter().enumerate() {
        let client = redis::Client::open(url.as_str()).expect("node url");
        let monitor = client.get_async_monitor().await.expect("monitor");
        let lines = lines.clone();
        monitors.push(tokio::spawn(async move {
            let mut stream = monitor.into_on_message::<String>();
            while let Some(line) = stream.next().await {
                lines.lock().expect("lines").push((n, line));
            }
        }));
    }
    app.start_worker("w0").await;
    let mut messages = workload("au", 12, 3);
    messages.push(("au-u0".into(), "au-bad".into(), " ".into()));
    app.send_many(&messages).await;
    let user = "au-misdirected";
    let wrong = app
        .config
        .streams
        .shard((shard_of(&demo(), user, 3) + 1) % 3);
    app.xadd_on(
        &wrong.inbound,
        &[
            ("business_id", DEMO_BUSINESS.as_bytes()),
            ("user_id", user.as_bytes()),
            ("message_id", b"au-wrong"),
            ("content", b"Hello"),
        ],
    )
    .await;
    let mut all = ids(&messages);
    all.insert("au-wrong".into());
    app.wait_all(&all, Duration::from_secs(60)).await;
    let out = run_icmp(&app.config, &["send", "--user", "au-send", "Hello"], b"").await;
    assert!(out.contains("Hello"), "{out}");
    run_icmp(&app.config, &["status"], b"").await;
    run_icmp(&app.config, &["dlq", "list"], b"").await;
    app.stop_workers().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for m in monitors {
        m.abort();
    }
    let lines = std::mem::take(&mut *lines.lock().expect("lines"));

    // Group per node: a script with the commands it ran (they follow it at once, scripts being
    // atomic), a MULTI block per client, every other command alone.
    let mut groups: Vec<Vec<Logged>> = Vec::new();
    let mut in_script: HashMap<usize, usize> = HashMap::new();
    let mut in_multi: HashMap<(usize, String), usize> = HashMap::new();
    for (node, line) in &lines {
        let Some(cmd) = parse_monitor_line(line) else {
            continue;
        };
        let name = String::from_utf8_lossy(cmd.args.first().map_or(&[][..], |a| a)).to_uppercase();
        if cmd.client == "lua" {
            if let Some(g) = in_script.get(node) {
                groups[*g].push(cmd);
            }
            continue;
        }
        in_script.remove(node);
        let key = (*node, cmd.client.clone());
        if name == "MULTI" {
            groups.push(Vec::new());
            in_multi.insert(key, groups.len() - 1);
            continue;
        }
        if name == "EXEC" || name == "DISCARD" {
            in_multi.remove(&key);
            continue;
        }
        if let Some(g) = in_multi.get(&key) {
            groups[*g].push(cmd);
            continue;
        }
        groups.push(vec![cmd]);
        if name.starts_with("EVAL") || name.starts_with("FCALL") {
            in_script.insert(*node, groups.len() - 1);
        }
    }
    // This test's groups: any argument names its streams or keys.
    let ours: Vec<&Vec<Logged>> = groups
        .iter()
        .filter(|g| {
            g.iter().any(|c| {
                c.args
                    .iter()
                    .any(|a| String::from_utf8_lossy(a).contains(&id))
            })
        })
        .collect();
    let mut conn = app.redis.clone();
    let mut seen = std::collections::BTreeSet::new();
    for group in &ours {
        let mut slots = std::collections::BTreeMap::new();
        for c in group.iter() {
            let name = String::from_utf8_lossy(&c.args[0]).to_uppercase();
            assert!(
                name != "KEYS" && name != "SCAN",
                "scans the keyspace: {c:?}"
            );
            seen.insert(name.clone());
            let mut getkeys = redis::cmd("COMMAND");
            getkeys.arg("GETKEYS");
            for a in &c.args {
                getkeys.arg(a.as_slice());
            }
            // Commands without keys (PUBLISH's channel is none) answer an error.
            let keys: Vec<Vec<u8>> = getkeys.query_async(&mut conn).await.unwrap_or_default();
            for k in keys {
                let k = String::from_utf8_lossy(&k).into_owned();
                slots.insert(icmp::protocol::shard::slot(&k), k);
            }
        }
        assert!(
            slots.len() <= 1,
            "keys in {} slots in one command, script or transaction: {slots:?}\n{group:?}",
            slots.len()
        );
    }
    // The audit saw the workload: scripts, reads, adds and the commands inside scripts.
    for name in ["EVALSHA", "XREADGROUP", "XADD", "XACK"] {
        assert!(seen.contains(name), "{name} not seen among {seen:?}");
    }
    assert!(ours.len() > 100, "{} groups", ours.len());
    app.stop().await;
}
