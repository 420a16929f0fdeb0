//! icmp on a real Citus cluster (`scripts/services.sh citus`: a coordinator and two worker
//! nodes on loopback): the tenant tables distributed by business, every hot-path statement a
//! single-shard router query, and operations on the cluster under load. With
//! `ICMP_TEST_PG=citus` (a job of the test command) every isolated test database is a Citus
//! database, so the pipeline, stream-guarantee and isolation tests run on it too.

use std::collections::HashMap;
use std::sync::OnceLock;

use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::helpers;

/// The Citus cluster of `scripts/services.sh citus` (started once per test process).
pub(crate) struct CitusCluster {
    /// A superuser URL of the coordinator's `postgres` database.
    pub admin_url: String,
    /// The worker nodes, `host:port`.
    pub workers: Vec<(String, u16)>,
}

pub(crate) fn cluster() -> &'static CitusCluster {
    static CLUSTER: OnceLock<CitusCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let env: HashMap<String, String> = helpers::services_sh("citus");
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
    })
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
    let c = cluster();
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
    icmp::store::migrate(&cfg.database)
        .await
        .expect("migrate on citus");
    url
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
    let nodes: i64 = db
        .query_one(
            "SELECT count(DISTINCT nodeport) FROM pg_dist_shard_placement",
            &[],
        )
        .await
        .expect("placements")
        .get(0);
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
    use icmp::store::{conversations as c, write_set};
    let url = citus_database().await;
    let app = helpers::spawn_app_with(icmp::llm::mock::MockOptions::default(), |cfg| {
        cfg.database.url = icmp::config::RedactedUrl::new(url.clone());
    })
    .await;
    app.send("alice", "m1", "Hello there").await;
    let reply = app.reply("m1").await;
    assert_eq!(reply["status"], "ok", "{reply:?}");
    let conversation = &reply["conversation_id"];
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
            vec![b.clone(), format!("'{conversation}'::uuid"), "20".into()],
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
        ];
        assert_eq!(values.len(), write_set::PARAMETERS);
        for sql in write_set::statements(new_conversation, true, true, true) {
            let sql = write_set::bind(sql, |n| values[n - 1].clone());
            assert_one_task_on(&db, &sql, port).await;
        }
    }
}
