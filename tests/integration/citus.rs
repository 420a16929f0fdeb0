//! icmp on a real Citus cluster (`scripts/services.sh citus`: a coordinator and two worker
//! nodes on loopback): the tenant tables distributed by business, every hot-path statement a
//! single-shard router query, and operations on the cluster under load. With
//! `ICMP_TEST_PG=citus` (a job of the test command) every isolated test database is a Citus
//! database, so the pipeline, stream-guarantee and isolation tests run on it too.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use icmp::config::RedactedUrl;
use icmp::llm::mock::MockOptions;
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::helpers;
use crate::processes::WorkerProcess;

/// The Citus cluster of `scripts/services.sh citus` (started once per test process).
pub(crate) struct CitusCluster {
    /// A superuser URL of the coordinator's `postgres` database.
    pub admin_url: String,
    /// The worker nodes, `host:port`.
    pub workers: Vec<(String, u16)>,
}

impl CitusCluster {
    /// From the variables `scripts/services.sh citus` prints.
    fn from_env(env: &HashMap<String, String>) -> CitusCluster {
        CitusCluster {
            admin_url: env["ICMP_TEST_CITUS_URL"].clone(),
            workers: env["ICMP_TEST_CITUS_WORKERS"]
                .split(',')
                .map(|w| {
                    let (host, port) = w.rsplit_once(':').expect("host:port");
                    (host.to_owned(), port.parse().expect("port"))
                })
                .collect(),
        }
    }
}

/// The cluster the tests share.
pub(crate) fn cluster() -> &'static CitusCluster {
    static CLUSTER: OnceLock<CitusCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| CitusCluster::from_env(&helpers::services_sh("citus")))
}

/// `url` with its database replaced by `db` (and its port by `port`, when given).
pub(crate) fn url_of(url: &str, port: Option<u16>, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("url has a database");
    let base = match port {
        Some(p) => format!("{}:{p}", base.rsplit_once(':').expect("url has a port").0),
        None => base.to_owned(),
    };
    format!("{base}/{db}")
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A new database on every node of the cluster, with the extension, the workers registered
/// with the coordinator, and `icmp migrate` applied (which distributes the tenant tables).
/// Returns the coordinator URL of it.
pub(crate) async fn citus_database() -> String {
    database_on(cluster()).await
}

/// [`citus_database`] on cluster `c`.
async fn database_on(c: &CitusCluster) -> String {
    let name = format!("icmp_test_{}", Uuid::new_v4().simple());
    let mut nodes = vec![None];
    nodes.extend(c.workers.iter().map(|(_, p)| Some(*p)));
    for port in &nodes {
        let admin = connect(&url_of(&c.admin_url, *port, "postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        connect(&url_of(&c.admin_url, *port, &name))
            .await
            .batch_execute("CREATE EXTENSION citus")
            .await
            .expect("create extension");
    }
    let url = url_of(&c.admin_url, None, &name);
    let coordinator = connect(&url).await;
    let port = |u: &str| -> u16 {
        u.rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
            .expect("port")
    };
    coordinator
        .execute(
            "SELECT citus_set_coordinator_host('127.0.0.1', $1)",
            &[&i32::from(port(&c.admin_url))],
        )
        .await
        .expect("coordinator host");
    // Tests create their databases at once: registering a node, which takes locks on it, is
    // retried when a concurrent one got in the way.
    for (host, p) in &c.workers {
        let mut attempt = 0;
        while let Err(e) = coordinator
            .execute("SELECT citus_add_node($1, $2)", &[host, &i32::from(*p)])
            .await
        {
            attempt += 1;
            assert!(attempt < 10, "add node {host}:{p}: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
        }
    }
    // The tests' own checks join tables on other columns than the business (an operator's
    // ad-hoc query); the worker's statements never do.
    coordinator
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET citus.enable_repartition_joins = on"
        ))
        .await
        .expect("repartition joins");
    let mut cfg = helpers::base_config();
    cfg.database.url = icmp::config::RedactedUrl::new(url.clone());
    // Tests create their databases at once on a cluster that may have just started: a first
    // migration that meets a concurrent one's locks is shown and run again (it is idempotent).
    if let Err(e) = icmp::store::migrate(&cfg.database).await {
        eprintln!("migrate on citus, first attempt: {e}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        icmp::store::migrate(&cfg.database)
            .await
            .expect("migrate on citus");
    }
    url
}

/// How many nodes hold shards.
pub(crate) async fn nodes_holding_shards(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(DISTINCT nodeport) FROM pg_dist_shard_placement",
        &[],
    )
    .await
    .expect("placements")
    .get(0)
}

/// `pg_dist_partition`'s rows: (table, distribution column, co-location group).
async fn distribution(db: &tokio_postgres::Client) -> Vec<(String, String, i32)> {
    db.query(
        "SELECT logicalrelid::text, column_to_column_name(logicalrelid, partkey), colocationid \
         FROM pg_dist_partition ORDER BY 1",
        &[],
    )
    .await
    .expect("pg_dist_partition")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test]
async fn migrate_distributes_every_tenant_table_by_business_co_located_and_again_changes_nothing() {
    let url = citus_database().await;
    let db = connect(&url).await;
    let tables = distribution(&db).await;
    let mut expected: Vec<&str> = icmp::store::distribution::TENANT_TABLES.to_vec();
    expected.sort_unstable();
    assert_eq!(
        tables.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(),
        expected
    );
    for (table, column, group) in &tables {
        let want = if table == "businesses" {
            "id"
        } else {
            "business_id"
        };
        assert_eq!(column, want, "{table}");
        assert_eq!(*group, tables[0].2, "{table} is not co-located: {tables:?}");
    }
    let nodes = nodes_holding_shards(&db).await;
    assert_eq!(nodes, 2, "the shards are on both workers");
    // Running it again applies and distributes nothing.
    let mut cfg = helpers::base_config();
    cfg.database.url = icmp::config::RedactedUrl::new(url.clone());
    assert!(
        icmp::store::migrate(&cfg.database)
            .await
            .expect("again")
            .is_empty()
    );
    assert!(
        icmp::store::distribution::distribute(&db)
            .await
            .expect("again")
            .is_empty()
    );
    assert_eq!(distribution(&db).await, tables);
    // The definitions' change triggers are gone (writers notify instead).
    let triggers: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE '%_changed'",
            &[],
        )
        .await
        .expect("triggers")
        .get(0);
    assert_eq!(triggers, 0);
}

/// `EXPLAIN` of `sql`: one task, on the node that holds `business`'s shards, and nothing that
/// runs elsewhere first (a subplan, rows pulled to the coordinator, a repartition).
async fn assert_one_task_on(db: &tokio_postgres::Client, sql: &str, port: i32) {
    let plan: Vec<String> = db
        .query(&format!("EXPLAIN (COSTS OFF) {sql}"), &[])
        .await
        .unwrap_or_else(|e| panic!("explain {sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert_eq!(plan.matches("Task Count: 1").count(), 1, "{sql}\n{plan}");
    assert_eq!(plan.matches("Task Count:").count(), 1, "{sql}\n{plan}");
    assert_eq!(plan.matches("Node: host=").count(), 1, "{sql}\n{plan}");
    assert!(plan.contains(&format!("port={port} ")), "{sql}\n{plan}");
    for elsewhere in [
        "Subplan",
        "pull to coordinator",
        "repartition",
        "intermediate",
    ] {
        assert!(!plan.contains(elsewhere), "{elsewhere}: {sql}\n{plan}");
    }
}

#[tokio::test]
async fn every_hot_path_statement_is_one_task_on_the_node_of_its_business() {
    use icmp::store::{conversations as c, outbox, summaries, write_set};
    let url = citus_database().await;
    let app = helpers::spawn_app_with(icmp::llm::mock::MockOptions::default(), |cfg| {
        cfg.database.url = icmp::config::RedactedUrl::new(url.clone());
    })
    .await;
    app.send("alice", "m1", "Hello there").await;
    let reply = app.reply("m1").await;
    assert_eq!(reply["status"], "ok", "{reply:?}");
    let conversation = &reply["conversation_id"];
    // The worker's connections are encrypted (Citus turns TLS on with a self-signed v1
    // certificate, which `sslmode=prefer` takes without verifying it, as libpq does).
    let ssl: bool = app
        .db()
        .await
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "the connection to the coordinator is encrypted");
    let db = connect(&url).await;
    let business = helpers::DEMO_BUSINESS;
    let port: i32 = db
        .query_one(
            "SELECT nodeport FROM pg_dist_shard_placement \
             WHERE shardid = get_shard_id_for_distribution_column('messages', $1::text::uuid)",
            &[&business],
        )
        .await
        .expect("placement")
        .get(0);
    let stage: String = db
        .query_one(
            "SELECT id::text FROM stages WHERE business_id = $1::text::uuid AND is_initial",
            &[&business],
        )
        .await
        .expect("stage")
        .get(0);
    let b = format!("'{business}'::uuid");
    let reads = [
        (
            c::FIND_REPLY,
            vec![b.clone(), "'alice'".into(), "'m1'".into()],
        ),
        (
            c::LOAD_CONVERSATION,
            vec![b.clone(), format!("'{conversation}'::uuid")],
        ),
        (c::LATEST_CONVERSATION, vec![b.clone(), "'alice'".into()]),
        (
            c::HISTORY,
            vec![
                b.clone(),
                format!("'{conversation}'::uuid"),
                "20".into(),
                "0".into(),
            ],
        ),
        // The summariser's read (not on a message's path, but one task as well).
        (
            summaries::UNSUMMARIZED,
            vec![b.clone(), format!("'{conversation}'::uuid"), "200".into()],
        ),
        (
            c::EXTRACTED,
            vec![b.clone(), format!("'{conversation}'::uuid")],
        ),
    ];
    for (sql, values) in reads {
        let sql = write_set::bind(sql, |n| values[n - 1].clone());
        assert_one_task_on(&db, &sql, port).await;
    }
    let id = || format!("'{}'::uuid", Uuid::new_v4());
    let rows = format!(
        "'[{{\"pos\": 1, \"id\": \"{}\", \"role\": \"user\", \"content\": \"x\", \"key\": \"k\", \
         \"inbound\": \"1-0\", \"stage\": \"{stage}\"}}]'::jsonb",
        Uuid::new_v4()
    );
    let calls = format!(
        "'[{{\"id\": \"{}\", \"purpose\": \"response\", \"model\": \"m\", \"prompt\": \"p\", \
         \"latency_ms\": 1, \"outcome\": \"ok\"}}]'::jsonb",
        Uuid::new_v4()
    );
    for new_conversation in [true, false] {
        let conv = if new_conversation {
            id()
        } else {
            format!("'{conversation}'::uuid")
        };
        let values = [
            b.clone(),
            conv,
            format!("'{stage}'::uuid"),
            "'alice'".into(),
            if new_conversation {
                "NULL::bigint".into()
            } else {
                "1".into()
            },
            rows.clone(),
            "1".into(),
            format!("'{stage}'::uuid"),
            format!("'{stage}'::uuid"),
            id(),
            id(),
            "'{\"name\": \"Ada\"}'::jsonb".into(),
            calls.clone(),
            format!(
                "'[{{\"id\": \"{}\", \"action\": \"book\", \"key\": \"k\", \"url\": \"http://x\", \
                 \"body\": {{}}, \"timeout_ms\": 1000, \"max_attempts\": 3}}]'::jsonb",
                Uuid::new_v4()
            ),
            "'{\"since\": \"2026-12-05T00:00:00Z\", \"since_ms\": 1, \"by\": \"operator\"}'::jsonb"
                .into(),
            // The user's key and the message's entry id (the erasure check).
            "'0123abcd'".into(),
            "1795000000000::bigint".into(),
            "0::bigint".into(),
        ];
        assert_eq!(values.len(), write_set::PARAMETERS);
        for sql in write_set::statements(new_conversation, true, true, true, true, true) {
            let sql = write_set::bind(sql, |n| values[n - 1].clone());
            assert_one_task_on(&db, &sql, port).await;
        }
    }
    // The dispatcher's claim and outcomes of a row.
    let row = [b.clone(), id(), "65000".into()];
    assert_one_task_on(
        &db,
        &write_set::bind(outbox::CLAIM, |n| row[n - 1].clone()),
        port,
    )
    .await;
    let done = [
        b.clone(),
        id(),
        "'delivered'".into(),
        "200".into(),
        "12".into(),
        "'{}'".into(),
        id(),
        "'Booked.'".into(),
    ];
    assert_one_task_on(
        &db,
        &write_set::bind(outbox::DONE, |n| done[n - 1].clone()),
        port,
    )
    .await;
    let failed = [
        b.clone(),
        id(),
        "500".into(),
        "'boom'".into(),
        "12".into(),
        "1000".into(),
        id(),
        "'Not booked.'".into(),
    ];
    assert_one_task_on(
        &db,
        &write_set::bind(outbox::FAILED, |n| failed[n - 1].clone()),
        port,
    )
    .await;
    // A final result on the conversation, its follow-up message, and the follow-up's read.
    let result = [
        b.clone(),
        format!("'{conversation}'::uuid"),
        "'book'".into(),
        "'{\"status\": \"delivered\"}'::jsonb".into(),
        "1".into(),
        "NULL::jsonb".into(),
    ];
    assert_one_task_on(
        &db,
        &write_set::bind(outbox::RESULT, |n| result[n - 1].clone()),
        port,
    )
    .await;
    let message = [
        b.clone(),
        format!("'{conversation}'::uuid"),
        id(),
        "'Booked.'".into(),
        "'action:k'".into(),
        id(),
        "7".into(),
        id(),
        format!("'{stage}'::uuid"),
    ];
    assert_one_task_on(
        &db,
        &write_set::bind(outbox::FOLLOW_UP_MESSAGE, |n| message[n - 1].clone()),
        port,
    )
    .await;
    let read = [b.clone(), id()];
    assert_one_task_on(
        &db,
        &write_set::bind(outbox::FOLLOW_UP, |n| read[n - 1].clone()),
        port,
    )
    .await;
    // The summary's save: the conversation, then its call rows through it.
    let save = [
        b.clone(),
        format!("'{conversation}'::uuid"),
        "'a summary'".into(),
        "4".into(),
        "0".into(),
    ];
    assert_one_task_on(
        &db,
        &write_set::bind(summaries::SAVE, |n| save[n - 1].clone()),
        port,
    )
    .await;
    let insert = [
        b.clone(),
        format!("'{conversation}'::uuid"),
        id(),
        calls.replace("response", "summary"),
        "4".into(),
    ];
    assert_one_task_on(
        &db,
        &write_set::bind(summaries::CALLS, |n| insert[n - 1].clone()),
        port,
    )
    .await;
}

/// A Citus cluster of one test's own (`scripts/services.sh citus` from `port`: coordinator on
/// `port`, workers on the next two, a spare on the third after them): the test stops, starts
/// and adds its nodes, so no other test may share it. Stopped and deleted when dropped.
pub(crate) struct PrivateCitus {
    pub port: u16,
    cluster: CitusCluster,
}

impl PrivateCitus {
    pub(crate) fn start(port: u16) -> PrivateCitus {
        let env = Self::sh_at(port, &["citus"]);
        PrivateCitus {
            port,
            cluster: CitusCluster::from_env(&env),
        }
    }

    fn sh_at(port: u16, args: &[&str]) -> HashMap<String, String> {
        let out = std::process::Command::new(helpers::root().join("scripts/services.sh"))
            .args(args)
            .env("ICMP_CITUS_PORT", port.to_string())
            .output()
            .expect("run scripts/services.sh");
        assert!(
            out.status.success(),
            "services.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        helpers::exports(&String::from_utf8_lossy(&out.stdout))
    }

    /// Crashes the node on `port` (immediate shutdown).
    pub(crate) fn stop_node(&self, port: u16) {
        Self::sh_at(self.port, &["citus-stop-node", &port.to_string()]);
    }

    /// Starts the node on `port` again, or a new one there (not registered).
    pub(crate) fn start_node(&self, port: u16) {
        Self::sh_at(self.port, &["citus-start-node", &port.to_string()]);
    }

    /// Starts the spare node (the third after the workers) and registers it for the database
    /// at `url`; returns a superuser connection to that database on the coordinator.
    pub(crate) async fn add_spare_node(&self, url: &str) -> tokio_postgres::Client {
        let spare = self.port + 3;
        self.start_node(spare);
        let name = url.rsplit_once('/').expect("db").1.to_owned();
        let admin = &self.cluster.admin_url;
        connect(&url_of(admin, Some(spare), "postgres"))
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("database on the new node");
        connect(&url_of(admin, Some(spare), &name))
            .await
            .batch_execute("CREATE EXTENSION citus")
            .await
            .expect("extension on the new node");
        let db = connect(&url_of(admin, None, &name)).await;
        db.execute(
            "SELECT citus_add_node('127.0.0.1', $1)",
            &[&i32::from(spare)],
        )
        .await
        .expect("add node");
        db
    }

    /// A new migrated database on this cluster (see [`citus_database`]).
    pub(crate) async fn database(&self) -> String {
        database_on(&self.cluster).await
    }
}

impl Drop for PrivateCitus {
    fn drop(&mut self) {
        let _ = std::process::Command::new(helpers::root().join("scripts/services.sh"))
            .arg("citus-down")
            .env("ICMP_CITUS_PORT", self.port.to_string())
            .output();
    }
}

/// The port of the node that holds `business`'s shard group.
async fn node_of(db: &tokio_postgres::Client, business: Uuid) -> u16 {
    let port: i32 = db
        .query_one(
            "SELECT nodeport FROM pg_dist_shard_placement \
             WHERE shardid = get_shard_id_for_distribution_column('businesses', $1::uuid)",
            &[&business],
        )
        .await
        .expect("placement")
        .get(0);
    u16::try_from(port).expect("port")
}

/// An app whose worker runs against the Citus database `url`, with the demo business.
async fn app_on(url: &str, latency_ms: u64) -> helpers::TestApp {
    let mut app = helpers::spawn_env(
        MockOptions {
            latency_ms,
            ..Default::default()
        },
        crate::reliability::quick_recovery,
    )
    .await;
    app.config.database.url = RedactedUrl::new(url.to_owned());
    helpers::import(&app.config, &[&helpers::demo_file()]).await;
    app.store = icmp::store::Store::connect(&app.config.database).expect("store");
    app
}

/// Every message answered once, without an error or a dead letter; one user row and one reply
/// row per message; each user's messages stored in order.
async fn assert_every_message_answered_once(
    app: &helpers::TestApp,
    replies: &HashMap<String, Vec<HashMap<String, String>>>,
    expected: usize,
) {
    // A dead letter's `error_detail` names the SQLSTATE: shown with any failure below.
    let dead: Vec<String> = app
        .entries(&app.config.streams.dead_letter)
        .await
        .into_iter()
        .map(|d| {
            format!(
                "{}: {} ({})",
                d.get("message_id").cloned().unwrap_or_default(),
                d.get("error_code").cloned().unwrap_or_default(),
                d.get("error_detail").cloned().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(replies.len(), expected);
    for (id, r) in replies {
        assert_eq!(r.len(), 1, "{id}: {r:?}; dead letters: {dead:?}");
        assert_eq!(r[0]["status"], "ok", "{id}: {r:?}; dead letters: {dead:?}");
    }
    assert!(dead.is_empty(), "{dead:?}");
    crate::reliability::assert_exactly_once(app, expected).await;
    crate::reliability::assert_stored_in_order(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_node_restarted_under_load_delays_only_its_tenants_and_loses_nothing() {
    use crate::reliability::{ids, workload};
    let cluster = PrivateCitus::start(25440);
    let url = cluster.database().await;
    let app = app_on(&url, 5).await;
    let db = connect(&url).await;
    let demo: Uuid = helpers::DEMO_BUSINESS.parse().expect("uuid");
    let down = node_of(&db, demo).await;
    // Another business, whose shards are on the other node.
    let mut other = Uuid::new_v4();
    while node_of(&db, other).await == down {
        other = Uuid::new_v4();
    }
    helpers::import_demo_copy(&app.config, &other.to_string(), &[]).await;

    let first = workload("na", 20, 6);
    app.send_many(&first).await;
    let mut worker = WorkerProcess::spawn(&app.config, "citus-node", &[]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while app.count("SELECT count(*) FROM messages", &[]).await < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress: {:?}",
            worker.log
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.stop_node(down);
    // While the demo's node is down, the other business is answered as usual.
    let others = workload("nb", 10, 3);
    app.send_many_to(&other.to_string(), &others).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let replies_so_far = || async {
        let mut by_id: HashMap<String, usize> = HashMap::new();
        for e in app.outbound_entries().await {
            *by_id.entry(e["message_id"].clone()).or_default() += 1;
        }
        by_id
    };
    let so_far = loop {
        let so_far = replies_so_far().await;
        if ids(&others).iter().all(|id| so_far.contains_key(id)) {
            break so_far;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other tenant is answered while the demo's node is down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let waiting = ids(&first)
        .iter()
        .filter(|id| !so_far.contains_key(*id))
        .count();
    assert!(waiting > 0, "the demo's messages wait for their node");
    cluster.start_node(down);
    let mut all = first.clone();
    all.extend(others.iter().cloned());
    let replies = app.wait_all(&ids(&all), Duration::from_secs(120)).await;
    assert!(worker.is_running(), "the worker survives the outage");
    assert_every_message_answered_once(&app, &replies, first.len() + others.len()).await;
    assert_eq!(worker.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_onto_a_new_node_and_an_isolated_tenant_under_load_lose_nothing() {
    use crate::reliability::{ids, workload};
    let cluster = PrivateCitus::start(25450);
    let url = cluster.database().await;
    let app = app_on(&url, 10).await;
    let db = connect(&url).await;
    let mut worker = WorkerProcess::spawn(&app.config, "citus-moves", &[]);

    // A third worker node, registered (it holds no shard yet).
    cluster.add_spare_node(&url).await;

    // Messages flow the whole time: a batch every 50 ms, until the moves are done.
    let workload = workload("mv", 40, 1000);
    let done = std::sync::atomic::AtomicBool::new(false);
    let send = async {
        let mut sent = Vec::new();
        for batch in workload.chunks(10) {
            if done.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            app.send_many(batch).await;
            sent.extend_from_slice(batch);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    };
    let moves = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The new node given its share of the shards, online.
        // Two statements: the job must be committed before anything can wait for it.
        db.batch_execute("SELECT citus_rebalance_start()")
            .await
            .expect("rebalance");
        db.batch_execute("SELECT citus_rebalance_wait()")
            .await
            .expect("rebalance done");
        // The demo business alone in a shard group of its own. Its writes wait while its rows
        // are copied (`block_writes`; the logical mode's replication of a split stalled here
        // on "publisher did not send replica identity column", docs/operations.md).
        db.execute(
            "SELECT isolate_tenant_to_new_shard('businesses', $1::text::uuid, 'CASCADE', \
             shard_transfer_mode => 'block_writes')",
            &[&helpers::DEMO_BUSINESS],
        )
        .await
        .expect("isolate");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let (all, ()) = tokio::join!(send, moves);
    assert!(
        all.len() < workload.len(),
        "messages flowed until the moves were done"
    );
    let nodes = nodes_holding_shards(&db).await;
    assert_eq!(nodes, 3, "the new node holds shards");
    let (min, max): (String, String) = {
        let r = db
            .query_one(
                "SELECT shardminvalue, shardmaxvalue FROM pg_dist_shard \
                 WHERE shardid = get_shard_id_for_distribution_column('messages', $1::text::uuid)",
                &[&helpers::DEMO_BUSINESS],
            )
            .await
            .expect("shard");
        (r.get(0), r.get(1))
    };
    assert_eq!(min, max, "one hash value in the demo's shard");

    let replies = app.wait_all(&ids(&all), Duration::from_secs(180)).await;
    assert!(worker.is_running());
    assert_every_message_answered_once(&app, &replies, all.len()).await;
    assert_eq!(worker.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_node_connection_breaks_is_retried_and_answered_once() {
    commits_broken_on_the_node(Some(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_and_then_a_commit_alone_whose_node_connection_breaks_are_retried() {
    commits_broken_on_the_node(None).await;
}

/// A worker with `commit_batch_max` (`None`: the default, batches) meets two commits whose
/// connection to the demo's node breaks under `COMMIT` (a node stopping at that moment): with
/// batches, a batch and then the commit alone it leads to; without, two commits alone. Every
/// message is answered once.
async fn commits_broken_on_the_node(commit_batch_max: Option<usize>) {
    use crate::reliability::{ids, workload};
    let url = citus_database().await;
    let mut app = app_on(&url, 0).await;
    if let Some(max) = commit_batch_max {
        app.config.worker.commit_batch_max = max;
    }
    assert_eq!(
        commit_batch_max.is_none(),
        app.config.worker.commit_batch_max > 1
    );
    let db = connect(&url).await;
    let demo: Uuid = helpers::DEMO_BUSINESS.parse().expect("uuid");
    let port = node_of(&db, demo).await;
    let shard: String = db
        .query_one(
            "SELECT shard_name('messages'::regclass, \
             get_shard_id_for_distribution_column('messages', $1::uuid))",
            &[&demo],
        )
        .await
        .expect("shard name")
        .get(0);
    // On the node, the demo's shard of `messages` gets a deferred trigger that ends its own
    // session at the first two COMMITs that wrote to it: the coordinator's connection breaks
    // under its COMMIT. A sequence, which no rollback takes back, counts them. (Citus lets a
    // shard be changed on its node when told to.)
    let name = url.rsplit_once('/').expect("db").1;
    let node = connect(&url_of(&cluster().admin_url, Some(port), name)).await;
    node.batch_execute(&format!(
        "SET citus.enable_ddl_propagation = off;
         SET citus.enable_manual_changes_to_shards = on;
         CREATE SEQUENCE commits_seen;
         CREATE FUNCTION break_first_commits() RETURNS trigger LANGUAGE plpgsql
           SECURITY DEFINER SET search_path = public AS $$
         BEGIN
           IF nextval('commits_seen') <= 2 THEN
             PERFORM pg_terminate_backend(pg_backend_pid());
             PERFORM pg_sleep(5);
           END IF;
           RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER break_first_commits AFTER INSERT ON {shard}
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION break_first_commits();"
    ))
    .await
    .expect("trigger on the shard");

    let messages = workload("cb", 3, 2);
    app.send_many(&messages).await;
    let mut worker = WorkerProcess::spawn(&app.config, "citus-commit", &[]);
    let replies = app.wait_all(&ids(&messages), Duration::from_secs(60)).await;
    let seen: i64 = node
        .query_one("SELECT last_value FROM commits_seen", &[])
        .await
        .expect("sequence")
        .get(0);
    assert!(
        seen > 2,
        "two commits broke and later ones went on ({seen})"
    );
    assert_every_message_answered_once(&app, &replies, messages.len()).await;
    assert_eq!(worker.terminate().await.code(), Some(0));
}
