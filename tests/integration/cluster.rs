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

/// ACL credentials in the URLs reach every node: a worker that logs in as a user of its own
/// (created on every node) answers messages through the cluster, and a wrong password gets no
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_worker_logs_in_to_every_node_as_its_acl_user() {
    let _one = CLUSTER.lock().await;
    let urls = cluster_urls();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (user, password) = (format!("icmp-{}", &id[..8]), id.clone());
    for url in &urls {
        let _: String = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("reset")
            .arg("on")
            .arg(format!(">{password}"))
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query_async(&mut node(url).await)
            .await
            .expect("acl setuser");
    }
    let with_login =
        |url: &str, secret: &str| url.replacen("redis://", &format!("redis://{user}:{secret}@"), 1);
    let seeds: Vec<String> = urls.iter().map(|u| with_login(u, &password)).collect();
    let mut app = spawn_env(MockOptions::default(), |c| {
        quick_recovery(c);
        on_cluster(c, &seeds[0]);
        c.redis.urls = seeds[1..].iter().cloned().map(RedactedUrl::new).collect();
    })
    .await;
    app.start_worker("w0").await;
    let messages = workload("acl", 5, 2);
    app.send_many(&messages).await;
    let replies = app.wait_all(&ids(&messages), Duration::from_secs(60)).await;
    assert_eq!(replies.len(), messages.len());
    // A wrong password: no connection, and no secret in the error.
    let mut wrong = app.config.clone();
    wrong.redis.url = RedactedUrl::new(with_login(&urls[0], "wrong"));
    wrong.redis.urls = Vec::new();
    let err = icmp::redis_connection::connect(&wrong.redis)
        .await
        .expect_err("a wrong password");
    let text = err.to_string();
    assert!(!text.contains("wrong@"), "no secret in the error: {text}");
    app.stop().await;
    for url in &urls {
        let _: i64 = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&user)
            .query_async(&mut node(url).await)
            .await
            .expect("acl deluser");
    }
}

/// A Redis Cluster of this test's own that speaks TLS only: three masters on 7201–7203 (their
/// bus on 17201–17203), `tls-cluster` and `tls-replication` on, no replicas.
struct TlsCluster {
    children: Vec<std::process::Child>,
    dir: std::path::PathBuf,
}

impl TlsCluster {
    const PORTS: [u16; 3] = [7201, 7202, 7203];

    async fn start(certs: &crate::processes::TestCerts) -> TlsCluster {
        let dir = std::env::temp_dir().join(format!(
            "icmp-tls-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let mut children = Vec::new();
        for port in Self::PORTS {
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let child = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                ])
                .args(["--cluster-port", &(port + 10_000).to_string()])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .args(["--tls-auth-clients", "no", "--cluster-enabled", "yes"])
                .args([
                    "--cluster-node-timeout",
                    "2000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(&certs.server_cert)
                .arg("--tls-key-file")
                .arg(&certs.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&certs.ca_cert)
                .arg("--dir")
                .arg(&node_dir)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server");
            children.push(child);
        }
        let cluster = TlsCluster { children, dir };
        for port in Self::PORTS {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "TLS node {port} did not start"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Bounded: `--cluster create` waits for the nodes to meet however long that takes.
        let cli = |args: &[&str]| {
            std::process::Command::new("timeout")
                .args(["30", "redis-cli", "--tls", "--cacert"])
                .arg(&certs.ca_cert)
                .args(args)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("redis-cli")
        };
        let nodes: Vec<String> = Self::PORTS
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(nodes.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cli(&create);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ok = Self::PORTS.iter().all(|p| {
                let info = cli(&["-p", &p.to_string(), "cluster", "info"]);
                String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok")
            });
            if ok {
                return cluster;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the TLS cluster did not form"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn urls(&self) -> Vec<String> {
        Self::PORTS
            .iter()
            .map(|p| format!("rediss://127.0.0.1:{p}/"))
            .collect()
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// TLS as on one server: a worker reaches every node of a TLS-only cluster over `rediss://`,
/// verified against `redis.ca_file`, and answers messages on three shards; without that CA
/// (the system's roots) it does not connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_tls_only_redis_cluster_a_worker_verifies_every_node_and_answers() {
    let certs = crate::processes::TestCerts::generate();
    let cluster = TlsCluster::start(&certs).await;
    let urls = cluster.urls();
    let ca = certs.ca_cert.to_string_lossy().into_owned();
    let mut app = spawn_env(MockOptions::default(), |c| {
        quick_recovery(c);
        c.redis.mode = RedisMode::Cluster;
        c.redis.url = RedactedUrl::new(urls[0].clone());
        c.redis.urls = urls[1..].iter().cloned().map(RedactedUrl::new).collect();
        c.redis.ca_file = ca.clone();
        c.streams.shards = 3;
    })
    .await;
    app.start_worker("w0").await;
    let messages = workload("tls", 6, 2);
    app.send_many(&messages).await;
    let replies = app.wait_all(&ids(&messages), Duration::from_secs(60)).await;
    assert_eq!(replies.len(), messages.len());
    for (_, id, _) in &messages {
        assert_eq!(replies[id].len(), 1, "{id}");
    }
    let mut unverified = app.config.redis.clone();
    unverified.ca_file = String::new();
    assert!(
        icmp::redis_connection::connect(&unverified).await.is_err(),
        "a certificate no system root signed is refused"
    );
    app.stop().await;
    drop(cluster);
}
