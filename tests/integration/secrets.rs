//! Secret hygiene of a whole run: a worker process with known secrets (the LLM key, the database
//! password) at debug level, answering good, bad and poison messages through a flaky LLM; its
//! log, every reply, every dead letter and `/metrics` are scanned for the secrets.

use std::time::Duration;

use icmp::llm::mock::MockOptions;

use crate::helpers::{self, spawn_env};
use crate::processes::{WorkerProcess, free_port};

const LLM_KEY: &str = "sk-CANARY-7f3a9c0d";
const DB_PASSWORD: &str = "pg-CANARY-51be20aa";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_known_secrets_shows_none_in_logs_replies_dead_letters_or_metrics() {
    let app = spawn_env(
        MockOptions {
            latency_ms: 5,
            error_rate: 0.3,
            ..Default::default()
        },
        |c| {
            c.streams.claim_idle_ms = 1_000;
            c.streams.max_deliveries = 2;
            c.retry.max_elapsed_ms = 300;
        },
    )
    .await;
    // A second business whose welcome reply cannot render: its message is dead-lettered.
    let poison_business = "5b0e8a7c-2222-4c1d-8e2f-00000000000a";
    helpers::import_poisoned_demo(&app, poison_business).await;

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut worker = WorkerProcess::spawn(
        &app.config,
        "secrets",
        &[
            ("ICMP__LLM__API_KEY", LLM_KEY),
            ("ICMP__DATABASE__PASSWORD", DB_PASSWORD),
            ("ICMP__TELEMETRY__LISTEN", &listen),
            ("ICMP__TELEMETRY__LOG_FILTER", "debug"),
        ],
    );
    let mut ids = std::collections::HashSet::new();
    for i in 0..12 {
        let id = format!("s{i}");
        app.send(
            &format!("user{}", i % 4),
            &id,
            "I'd like to book, my name is Ann Lee",
        )
        .await;
        ids.insert(id);
    }
    // Bad input: an error reply each.
    app.xadd(&[
        ("business_id", b"not-a-uuid"),
        ("user_id", b"u"),
        ("message_id", b"bad1"),
        ("content", b"hi"),
    ])
    .await;
    ids.insert("bad1".into());
    app.xadd(&[
        ("business_id", poison_business.as_bytes()),
        ("user_id", b"p"),
        ("message_id", b"poison"),
        ("content", b"hello"),
    ])
    .await;
    ids.insert("poison".into());
    let replies = app.wait_all(&ids, Duration::from_secs(90)).await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "{id}: exactly one reply");
    }
    assert_eq!(replies["bad1"][0]["status"], "error");
    assert_eq!(replies["poison"][0]["status"], "error");

    let metrics = reqwest::get(format!("http://{listen}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(metrics.contains("icmp_messages_total"), "{metrics}");
    worker.terminate().await;
    let log = std::fs::read_to_string(&worker.log).expect("log");
    assert!(log.lines().count() > 20, "a debug log was written");

    let mut places = vec![("log", log), ("metrics", metrics)];
    for (name, stream) in [
        ("replies", &app.config.streams.outbound),
        ("dead letters", &app.config.streams.dead_letter),
    ] {
        let entries = app.entries(stream).await;
        assert!(!entries.is_empty(), "{name}: none written");
        places.push((name, format!("{entries:?}")));
    }
    for (name, text) in places {
        for secret in [LLM_KEY, DB_PASSWORD] {
            assert!(!text.contains(secret), "{name} carries a secret");
        }
    }
}
