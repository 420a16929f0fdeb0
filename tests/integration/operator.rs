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
pub(crate) async fn run_icmp(config: &icmp::config::Config, args: &[&str], input: &[u8]) -> String {
    let (ok, stdout, stderr) = run_icmp_status(config, args, input).await;
    assert!(ok, "{stdout} {stderr}");
    stdout
}

/// Runs `icmp ARGS` with `input` on stdin; returns (exit success, stdout, stderr).
pub(crate) async fn run_icmp_status(
    config: &icmp::config::Config,
    args: &[&str],
    input: &[u8],
) -> (bool, String, String) {
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
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    // An error reply is printed and makes the exit code non-zero.
    let (ok, stdout, stderr) = run_icmp_status(
        &app.config,
        &["send", "--user", "sam", "--timeout-secs", "30", "   "],
        b"",
    )
    .await;
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("validation.empty_content"), "{stderr}");

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
    // The client sent a traceparent; a worker that exports no spans passes it on unchanged.
    let sent = stderr
        .lines()
        .find_map(|l| l.strip_prefix("traceparent "))
        .expect("the client prints the traceparent it sent");
    assert_eq!(reply["traceparent"], sent);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_shows_and_purges_by_filter_with_exit_codes_scripts_can_use() {
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    let dead = app.config.streams.dead_letter.clone();
    let mut ids = Vec::new();
    for (business, code, message) in [
        ("b-1", "template.render", "m1"),
        ("b-1", "db.error", "m2"),
        ("b-2", "template.render", "m3"),
    ] {
        let id: String = redis::cmd("XADD")
            .arg(&dead)
            .arg("*")
            .arg(&[
                ("business_id", business),
                ("user_id", "u"),
                ("message_id", message),
                ("content", "hi"),
                ("error_code", code),
                ("error_detail", "detail"),
                ("deliveries", "3"),
            ])
            .query_async(&mut app.redis.clone())
            .await
            .expect("xadd");
        ids.push(id);
    }
    let c = &app.config;
    let json = run_icmp(
        c,
        &["dlq", "list", "--code", "template.render", "--json"],
        b"",
    )
    .await;
    let listed: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|d| d["error_code"] == "template.render"));
    let text = run_icmp(c, &["dlq", "list", "--business", "b-1"], b"").await;
    assert!(
        text.contains("2 dead letter(s) shown; db.error: 1, template.render: 1"),
        "{text}"
    );

    let shown = run_icmp(c, &["dlq", "show", &ids[1]], b"").await;
    assert!(
        shown.contains("db.error") && shown.contains("m2"),
        "{shown}"
    );
    let (ok, _, stderr) = run_icmp_status(c, &["dlq", "show", "1-1"], b"").await;
    assert!(!ok, "an unknown id is an error exit");
    assert!(stderr.contains("no dead letter 1-1"), "{stderr}");

    // Purge asks first: "n" removes nothing.
    let out = run_icmp(c, &["dlq", "purge", "--code", "template.render"], b"n\n").await;
    assert!(out.contains("nothing removed"), "{out}");
    assert_eq!(app.entries(&dead).await.len(), 3);
    let out = run_icmp(
        c,
        &["dlq", "purge", "--code", "template.render", "--yes"],
        b"",
    )
    .await;
    assert!(out.contains(&format!("removed {}", ids[0])), "{out}");
    assert!(out.contains(&format!("removed {}", ids[2])), "{out}");
    assert!(out.contains("removed 2 of 2"), "{out}");
    let left = app.entries(&dead).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["message_id"], "m2");
    // The dead letter shown and the purge that removed something are in the audit trail (newest
    // first); the purge answered "n" and the unknown id shown are not.
    let trail = app
        .store
        .audit_log(&icmp::store::audit::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("audit trail");
    assert_eq!(trail.len(), 2, "{trail:?}");
    assert_eq!(trail[1].action, "dlq.read");
    assert_eq!(trail[1].target.as_deref(), Some(ids[1].as_str()));
    assert_eq!(trail[0].action, "dlq.purge");
    assert_eq!(
        trail[0].target.as_deref(),
        Some(format!("{},{}", ids[0], ids[2]).as_str())
    );
    assert_eq!(trail[0].counts["dead_letters"], 2);
    assert!(!trail[0].actor.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_show_prints_the_transcript_with_stages_templates_and_data() {
    let app = crate::helpers::spawn_app(MockOptions::default()).await;
    app.send("cleo", "c1", "I'd like to book, my name is Cleo Park")
        .await;
    let first = app.reply("c1").await;
    app.send("cleo", "c2", "On 2026-12-04 for a checkup").await;
    let _ = app.reply("c2").await;
    let conv = first["conversation_id"].clone();
    let c = &app.config;

    let json = run_icmp(c, &["conversation", "show", &conv, "--json"], b"").await;
    let record: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    assert_eq!(record["id"], conv.as_str());
    assert_eq!(record["user_id"], "cleo");
    assert_eq!(record["stage"], "booking");
    let messages = record["messages"].as_array().expect("messages");
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(messages[1]["template"], "booking_reply");
    assert_eq!(messages[1]["template_version"], 1);
    assert_eq!(record["extracted"]["name"], "Cleo Park");

    let lines = run_icmp(
        c,
        &[
            "conversation",
            "show",
            "--business",
            crate::helpers::DEMO_BUSINESS,
            "--user",
            "cleo",
            "--jsonl",
        ],
        b"",
    )
    .await;
    assert_eq!(lines.lines().count(), 4, "one line per message");
    let text = run_icmp(c, &["conversation", "show", &conv], b"").await;
    assert!(text.contains("booking, ok, booking_reply v1"), "{text}");

    let (ok, _, stderr) = run_icmp_status(
        c,
        &["conversation", "show", &uuid::Uuid::new_v4().to_string()],
        b"",
    )
    .await;
    assert!(!ok, "an unknown conversation is an error exit");
    assert!(stderr.contains("no such conversation"), "{stderr}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_group_consumers_queues_and_each_business() {
    let app = crate::helpers::spawn_app(MockOptions::default()).await;
    for (user, id) in [("sue", "s1"), ("sam", "s2"), ("sue", "s3")] {
        app.send(user, id, "Hello there").await;
        assert_eq!(app.reply(id).await["status"], "ok");
    }
    // Bad input for the same business: an error reply.
    app.xadd(&[
        ("business_id", crate::helpers::DEMO_BUSINESS.as_bytes()),
        ("user_id", b"sue"),
        ("message_id", b"bad"),
        ("content", b"   "),
    ])
    .await;
    assert_eq!(app.reply("bad").await["status"], "error");
    app.settle(std::time::Duration::from_secs(30)).await;

    let json = run_icmp(&app.config, &["status", "--json"], b"").await;
    let s: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    assert_eq!(s["group_exists"], true);
    assert_eq!(s["pending"], 0);
    assert_eq!(s["lag"], 0);
    assert!(!s["consumers"].as_array().expect("consumers").is_empty());
    let demo = s["businesses"]
        .as_array()
        .expect("businesses")
        .iter()
        .find(|b| b["business_id"] == crate::helpers::DEMO_BUSINESS)
        .cloned()
        .expect("the demo business");
    assert_eq!(demo["replies"], 3);
    assert_eq!(demo["errors"], 1);
    assert_eq!(demo["error_ratio"], 0.25);
    let text = run_icmp(&app.config, &["status"], b"").await;
    assert!(text.contains("lag 0 · pending 0"), "{text}");
    assert!(text.contains("3 replies"), "{text}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_explains_a_message_by_any_of_its_ids_after_the_fact() {
    let app = crate::helpers::spawn_app(MockOptions::default()).await;
    app.send("tia", "t1", "I'd like to book, my name is Tia Cruz")
        .await;
    let reply = app.reply("t1").await;
    assert_eq!(reply["status"], "ok");
    app.settle(std::time::Duration::from_secs(30)).await;
    let c = &app.config;

    let json = run_icmp(c, &["trace", "t1", "--json"], b"").await;
    let t: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    let messages = t["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2, "the user's row and the reply");
    let reply_row = &messages[1];
    assert_eq!(reply_row["role"], "assistant");
    assert_eq!(reply_row["template"], "booking_reply");
    for step in ["read", "select", "extract", "respond"] {
        assert!(reply_row["timings"][step].is_u64(), "{step}: {reply_row}");
    }
    let purposes: Vec<&str> = t["llm_calls"]
        .as_array()
        .expect("calls")
        .iter()
        .map(|c| c["purpose"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(purposes.len(), 3, "{purposes:?}");
    assert_eq!(
        t["transitions"][0],
        serde_json::json!(["welcome", "booking"])
    );
    assert_eq!(t["extracted"]["name"], "Tia Cruz");
    assert_eq!(t["replies"].as_array().expect("replies").len(), 1);
    assert_eq!(
        t["replies"][0]["fields"]["reply_id"],
        reply["reply_id"].as_str()
    );
    assert!(t["pending"].is_null(), "acknowledged");
    assert!(t["inbound"]["id"].is_string());

    // The same message by its inbound entry id and by its log id.
    for other in [&reply["inbound_id"], &reply["log_id"]] {
        let json = run_icmp(c, &["trace", other, "--json"], b"").await;
        let again: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
        assert_eq!(again["messages"], t["messages"], "traced by {other}");
    }
    let text = run_icmp(c, &["trace", "t1"], b"").await;
    assert!(
        text.contains("stage transition: welcome → booking"),
        "{text}"
    );
    let (ok, _, stderr) = run_icmp_status(c, &["trace", "no-such-message"], b"").await;
    assert!(!ok);
    assert!(
        stderr.contains("nothing found for no-such-message"),
        "{stderr}"
    );
    app.stop().await;
}
