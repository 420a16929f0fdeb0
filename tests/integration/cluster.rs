//! The worker on a real Redis Cluster: 3 masters and 3 replicas on loopback, started by
//! `scripts/services.sh cluster`. Streams named with one hash tag live on one master; the
//! worker connects through a seed node and follows the topology, through a manual failover of
//! that master, answering every message exactly once and in order.

use std::collections::HashMap;
use std::time::Duration;

use icmp::config::{Config, RedactedUrl, RedisMode};
use icmp::llm::mock::MockOptions;

use crate::helpers::{TestApp, services_sh, spawn_env};
use crate::processes::WorkerProcess;
use crate::reliability::{
    assert_exactly_once, assert_stored_in_order, ids, quick_recovery, workload,
};

/// Failovers change the cluster every cluster test shares: one test at a time.
pub(crate) static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The URLs of the cluster's nodes, starting it when it does not run.
pub(crate) fn cluster_urls() -> Vec<String> {
    services_sh("cluster")["ICMP_TEST_REDIS_CLUSTER_URLS"]
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// Cluster mode through the first node as the seed, and streams named with one hash tag (the
/// finish script writes the inbound, reply and dead-letter streams together).
pub(crate) fn on_cluster(c: &mut Config, seed: &str) {
    c.redis.mode = RedisMode::Cluster;
    c.redis.url = RedactedUrl::new(seed.to_owned());
    let tag = c.streams.group.clone();
    c.streams.inbound = format!("{{{tag}}}:inbound");
    c.streams.outbound = format!("{{{tag}}}:outbound");
    c.streams.dead_letter = format!("{{{tag}}}:dead");
    c.streams.reply_prefix = format!("{{{tag}}}:reply:");
}

/// A plain connection to one node (for `CLUSTER` commands).
pub(crate) async fn node(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("node url")
        .get_multiplexed_async_connection()
        .await
        .expect("node")
}

/// The nodes (`host:port`) that serve `key`'s slot, its master first, from `CLUSTER SLOTS`.
pub(crate) async fn nodes_serving(seed: &str, key: &str) -> Vec<String> {
    let mut conn = node(seed).await;
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("keyslot");
    // `[[first slot, last slot, [host, port, id], [host, port, id] …], …]`, master first.
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .expect("slots");
    let address = |n: &redis::Value| match n {
        redis::Value::Array(parts) => match parts.as_slice() {
            [redis::Value::BulkString(host), redis::Value::Int(port), ..] => {
                Some(format!("{}:{port}", String::from_utf8_lossy(host)))
            }
            _ => None,
        },
        _ => None,
    };
    ranges
        .iter()
        .find(|r| {
            matches!(r.as_slice(), [redis::Value::Int(a), redis::Value::Int(b), ..]
                if *a <= slot && slot <= *b)
        })
        .map(|r| r[2..].iter().filter_map(address).collect())
        .unwrap_or_else(|| panic!("no node serves slot {slot}"))
}

/// A test app on the cluster through `seed`, as `on_cluster` configures it, with quick
/// recovery and a mock LLM of 5 ms.
async fn cluster_app(seed: &str) -> TestApp {
    spawn_env(
        MockOptions {
            latency_ms: 5,
            ..Default::default()
        },
        |c| {
            quick_recovery(c);
            on_cluster(c, seed);
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_every_message_is_answered_once_in_order_through_a_failover() {
    let _one = CLUSTER.lock().await;
    let urls = cluster_urls();
    let seed = urls[0].clone();
    let mut app = cluster_app(&seed).await;
    // An `icmp worker` process, configured by the environment as in production, answers the
    // first messages alone; a worker in this process joins it for the failover.
    let mut process = WorkerProcess::spawn(&app.config, "p1", &[]);
    let before = workload("cb", 10, 6);
    app.send_many(&before).await;
    app.wait_all(&ids(&before), Duration::from_secs(60)).await;
    app.start_worker("w0").await;

    // The master that holds the streams hands over to its replica (`CLUSTER FAILOVER`, as
    // an operator does for maintenance) while messages keep coming.
    let replica = nodes_serving(&seed, &app.config.streams.inbound).await[1].clone();
    let during = workload("cd", 10, 6);
    app.send_many(&during[..30]).await;
    let ok: String = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query_async(&mut node(&format!("redis://{replica}/")).await)
        .await
        .expect("failover");
    assert_eq!(ok, "OK");
    app.send_many(&during[30..]).await;

    let mut all = ids(&before);
    all.extend(ids(&during));
    let replies: HashMap<String, Vec<HashMap<String, String>>> =
        app.wait_all(&all, Duration::from_secs(90)).await;
    for id in &all {
        let r = &replies[id];
        assert_eq!(r.len(), 1, "{id}: one reply, got {r:?}");
        assert_eq!(r[0]["status"], "ok", "{id}: {:?}", r[0]);
    }
    assert_eq!(replies.len(), all.len(), "no reply to anything else");
    assert!(
        app.entries(&app.config.streams.dead_letter)
            .await
            .is_empty(),
        "no dead letters"
    );
    assert_exactly_once(&app, all.len()).await;
    assert_stored_in_order(&app).await;
    // The replica now serves the streams' slot.
    let promoted: Vec<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut node(&format!("redis://{replica}/")).await)
        .await
        .expect("role");
    assert_eq!(
        promoted.first(),
        Some(&redis::Value::BulkString(b"master".to_vec())),
        "{replica} was promoted"
    );
    assert!(
        process.is_running(),
        "the worker process survived the failover"
    );
    assert_eq!(process.terminate().await.code(), Some(0));
    app.stop().await;
}

/// The process id of the node at `address` (`host:port`).
pub(crate) async fn pid_of(address: &str) -> String {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut node(&format!("redis://{address}/")).await)
        .await
        .expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .expect("process_id")
        .trim()
        .to_owned()
}

/// A master killed with SIGKILL, the first seed node of the configuration: its replica is
/// promoted after `cluster-node-timeout` and the worker carries on through the other seeds
/// (`redis.urls`), which serve the topology and the wake-up subscription. Replication is
/// asynchronous, so a write the master acknowledged but had not sent on is lost with it: an
/// entry the producer added in that window is gone from the stream (never answered), and a
/// finish in that window is undone whole (the script's effects replicate together), so its
/// entry is delivered again and answered from the stored reply. The account: every message
/// still in the stream, or answered, is answered exactly once and stored once; nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_killed_master_loses_at_most_its_unreplicated_writes() {
    let _one = CLUSTER.lock().await;
    let urls = cluster_urls();
    let mut app = cluster_app(&urls[0]).await;
    let master = nodes_serving(&urls[0], &app.config.streams.inbound).await[0].clone();
    // The first seed is the master to be killed; the others (`redis.urls`) serve the topology
    // and the wake-up subscription after it.
    let killed_url = format!("redis://{master}/");
    app.config.redis.url = RedactedUrl::new(killed_url.clone());
    app.config.redis.urls = urls
        .iter()
        .filter(|u| !u.contains(&master))
        .map(|u| RedactedUrl::new(u.clone()))
        .collect();
    app.redis = icmp::redis_connection::connect(&app.config.redis)
        .await
        .expect("cluster");
    app.start_worker("w0").await;
    app.start_worker("w1").await;

    let before = workload("kb", 10, 4);
    app.send_many(&before).await;
    app.wait_all(&ids(&before), Duration::from_secs(60)).await;

    let killed = std::process::Command::new("kill")
        .arg("-9")
        .arg(pid_of(&master).await)
        .status()
        .expect("kill");
    assert!(killed.success());
    // The producer keeps sending while the replica takes over (its XADDs fail until then).
    let after = workload("ka", 10, 4);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for chunk in after.chunks(10) {
        while let Err(e) = app.try_send_many(chunk).await {
            tracing::debug!(error = %e, "no master for the streams yet");
            assert!(
                tokio::time::Instant::now() < deadline,
                "no master took over the streams' slot"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut all = ids(&before);
    all.extend(ids(&after));
    // Until every message is answered or gone from the stream, and nothing is pending.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let (replies, in_stream) = loop {
        let mut replies: HashMap<String, Vec<HashMap<String, String>>> = HashMap::new();
        for e in app.entries(&app.config.streams.outbound).await {
            replies.entry(e["message_id"].clone()).or_default().push(e);
        }
        let in_stream: std::collections::HashSet<String> = app
            .entries(&app.config.streams.inbound)
            .await
            .into_iter()
            .filter_map(|e| e.get("message_id").cloned())
            .collect();
        let open = all
            .iter()
            .filter(|id| !replies.contains_key(*id) && in_stream.contains(*id))
            .count();
        if open == 0 && app.pending().await == 0 {
            break (replies, in_stream);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} messages in the stream still unanswered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut lost = 0;
    for id in &all {
        match replies.get(id).map(Vec::len) {
            Some(1) => assert_eq!(replies[id][0]["status"], "ok", "{id}"),
            None => {
                assert!(!in_stream.contains(id), "{id} is in the stream, unanswered");
                lost += 1;
            }
            Some(n) => panic!("{id}: {n} replies"),
        }
    }
    assert!(
        app.entries(&app.config.streams.dead_letter)
            .await
            .is_empty(),
        "no dead letters"
    );
    assert_exactly_once(&app, all.len() - lost).await;
    assert_stored_in_order(&app).await;
    // On loopback the replica is all but always in step: report what was lost.
    eprintln!(
        "killed master {master}: {lost} of {} entries lost with it",
        all.len()
    );
    app.stop().await;
}

/// Streams without one hash tag would make every finish fail with `CROSSSLOT` and leave each
/// user's queue stuck: the worker refuses to start and says how to name them.
#[tokio::test]
async fn a_worker_refuses_a_cluster_whose_stream_keys_span_slots() {
    let urls = cluster_urls();
    let app: TestApp = spawn_env(MockOptions::default(), |c| {
        on_cluster(c, &urls[0]);
        c.streams.outbound = "icmp-test:outbound".into();
    })
    .await;
    let err = icmp::startup::Application::build(&app.config, Default::default())
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("streams.outbound") && text.contains("{icmp}:inbound"),
        "{text}"
    );
}

/// `WAIT` calls per master so far (`INFO commandstats`), by address.
async fn waits_per_master(urls: &[String]) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for url in urls {
        let mut conn = node(url).await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .expect("info");
        if !info.lines().any(|l| l.trim() == "role:master") {
            continue;
        }
        let waits = info
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_wait:"))
            .and_then(|rest| rest.split(',').find_map(|kv| kv.strip_prefix("calls=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        out.insert(url.clone(), waits);
    }
    out
}

/// With `streams.wait_replicas = 1` on a cluster, the next message of a user is woken once a
/// replica holds the finish before it: the wait goes to the master of the streams' slot alone
/// (a keyless `WAIT` would go to every master), and every message is answered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_durability_wait_goes_to_the_streams_master_alone() {
    let _one = CLUSTER.lock().await;
    let urls = cluster_urls();
    let seed = urls[0].clone();
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 2,
            ..Default::default()
        },
        |c| {
            quick_recovery(c);
            on_cluster(c, &seed);
            c.streams.wait_replicas = 1;
            c.streams.wait_timeout_ms = 2_000;
        },
    )
    .await;
    let master = nodes_serving(&seed, &app.config.streams.inbound).await[0].clone();
    let before = waits_per_master(&urls).await;
    app.start_worker("w0").await;
    let messages = workload("dw", 10, 4);
    app.send_many(&messages).await;
    let replies = app.wait_all(&ids(&messages), Duration::from_secs(60)).await;
    for (_, id, _) in &messages {
        assert_eq!(replies[id].len(), 1, "{id}");
    }
    assert_exactly_once(&app, messages.len()).await;
    assert_stored_in_order(&app).await;
    let after = waits_per_master(&urls).await;
    for (url, n) in &after {
        let waited = n - before.get(url).copied().unwrap_or(0);
        if url.contains(&master) {
            assert!(waited > 0, "the streams' master {url} saw no WAIT");
        } else {
            assert_eq!(
                waited, 0,
                "{url} is not the streams' master but saw {waited} WAITs"
            );
        }
    }
    app.stop().await;
}
