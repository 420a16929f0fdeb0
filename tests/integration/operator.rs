//! What operators and people see: the worker's HTTP endpoint, its logs, and the `icmp send` /
//! `icmp chat` commands against a running worker.

use std::io::Write;
use std::process::Stdio;

use icmp::llm::mock::MockOptions;

use crate::helpers::spawn_env;
use crate::processes::{WorkerProcess, free_port, icmp};

const API_KEY: &str = "sk-live-0123456789abcdef";
const DB_PASSWORD: &str = "pw-do-not-print-42";

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("http");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_metrics_and_health_and_never_logs_secrets() {
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut worker = WorkerProcess::spawn(
        &app.config,
        "ops",
        &[
            ("ICMP__TELEMETRY__LISTEN", listen.as_str()),
            ("ICMP__TELEMETRY__LOG_FILTER", "debug"),
            ("ICMP__TELEMETRY__LOG_FORMAT", "json"),
            ("ICMP__LLM__API_KEY", API_KEY),
            ("ICMP__DATABASE__PASSWORD", DB_PASSWORD),
        ],
    );
    app.send("opal", "op1", "Hello").await;
    assert_eq!(app.reply("op1").await["status"], "ok");

    let base = format!("http://{listen}");
    assert_eq!(
        get(&format!("{base}/healthz")).await,
        (200, "ok".to_owned())
    );
    assert_eq!(get(&format!("{base}/readyz")).await.0, 200);
    let (status, metrics) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    for expected in [
        "icmp_messages_total{outcome=\"ok\"} 1",
        "icmp_llm_requests_total{purpose=\"response\",outcome=\"ok\"} 1",
        "icmp_llm_tokens_total{purpose=\"response\",kind=\"prompt\"}",
        "icmp_step_duration_seconds_bucket{step=\"persist\"",
        "icmp_message_duration_seconds_count{outcome=\"ok\"} 1",
        "icmp_cache_requests_total{cache=\"business\",result=\"miss\"} 1",
        "# HELP icmp_messages_total",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected} in\n{metrics}"
        );
    }

    assert_eq!(worker.terminate().await.code(), Some(0));
    let log = std::fs::read_to_string(&worker.log).expect("log");
    assert!(
        log.contains("\"message\":\"worker started\""),
        "JSON logs: {log}"
    );
    assert!(log.contains("\"log_id\""), "message span fields are logged");
    for secret in [API_KEY, DB_PASSWORD] {
        assert!(!log.contains(secret), "a secret leaked into the log");
        assert!(!metrics.contains(secret));
    }
    assert!(!log.contains("Hello"), "message content is not logged");
}

/// Runs `icmp ARGS` against `config`'s streams with `input` on stdin; returns its stdout after
/// checking it succeeded.
async fn run_icmp(config: &icmp::config::Config, args: &[&str], input: &[u8]) -> String {
    let (config, args, input) = (
        config.clone(),
        args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>(),
        input.to_vec(),
    );
    let out = tokio::task::spawn_blocking(move || {
        let mut child = icmp(&config)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("icmp");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&input).expect("write");
        drop(stdin);
        child.wait_with_output().expect("output")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmp_send_and_chat_talk_to_a_running_worker() {
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    app.start_worker("w0").await;

    let stdout = run_icmp(
        &app.config,
        &[
            "send",
            "--user",
            "sam",
            "--timeout-secs",
            "30",
            "Hello there",
        ],
        b"",
    )
    .await;
    assert!(
        stdout.starts_with("[ok · stage welcome] Thanks for your message: \"Hello there\""),
        "{stdout}"
    );

    let stdout = run_icmp(
        &app.config,
        &["chat", "--user", "tess", "--timeout-secs", "30"],
        b"Hello!\nI want to book an appointment, my name is Tess Ray\n",
    )
    .await;
    assert!(stdout.contains("[ok · stage welcome]"), "{stdout}");
    assert!(stdout.contains("[ok · stage booking]"), "{stdout}");
    let conversations: std::collections::HashSet<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("conversation "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        conversations.len(),
        1,
        "chat follows one conversation: {stdout}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_python_client_sends_a_message_and_reads_its_reply() {
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    app.start_worker("w0").await;
    let s = &app.config.streams;
    let out = tokio::process::Command::new("python3")
        .arg(crate::helpers::root().join("examples/python/icmp_client.py"))
        .args(["--redis", app.config.redis.url.expose()])
        .args(["--inbound", &s.inbound, "--outbound", &s.outbound])
        .args(["--user", "pia", "--timeout", "30", "Hello from Python"])
        .output()
        .await
        .expect("python3 (the test command installs redis-py)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON reply");
    assert_eq!(reply["status"], "ok");
    assert_eq!(reply["user_id"], "pia");
    assert!(
        reply["content"]
            .as_str()
            .is_some_and(|c| c.contains("Hello from Python")),
        "{reply}"
    );
    app.stop().await;
}
