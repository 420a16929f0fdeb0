//! Structured outputs and model chains against mock endpoints: how JSON is asked for and what an
//! endpoint that refuses a form is asked next; a template's chain of models over several
//! endpoints, each call recorded with the endpoint and model that answered it.

use std::sync::atomic::Ordering;

use icmp::config::EndpointConfig;
use icmp::llm::mock::{self, MockOptions, MockServer};

use crate::helpers::{self, DEMO_BUSINESS, spawn_app_with};

/// The calls made for the message stored under `key`, in order: (purpose, endpoint, model,
/// response_format, outcome).
async fn calls_of(
    app: &helpers::TestApp,
    key: &str,
) -> Vec<(String, String, String, Option<String>, String)> {
    app.db()
        .await
        .query(
            "SELECT c.purpose, c.endpoint, c.model, c.response_format, c.outcome \
             FROM llm_calls c JOIN messages m ON m.business_id = c.business_id \
             AND m.id = c.message_id WHERE m.idempotency_key = $1 AND m.role = 'user' \
             ORDER BY c.id",
            &[&key],
        )
        .await
        .expect("calls")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

fn call(
    purpose: &str,
    endpoint: &str,
    model: &str,
    format: Option<&str>,
    outcome: &str,
) -> (String, String, String, Option<String>, String) {
    (
        purpose.into(),
        endpoint.into(),
        model.into(),
        format.map(Into::into),
        outcome.into(),
    )
}

async fn mock_server(options: MockOptions) -> MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    mock::spawn(listener, options).expect("mock")
}

fn endpoint(name: &str, server: &MockServer, models: &[&str]) -> EndpointConfig {
    EndpointConfig {
        name: name.into(),
        base_url: server.base_url(),
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        ..EndpointConfig::default()
    }
}

const BOOKING: &str = "Hello, I want to book a cleaning. My name is Ada Lovelace, friday please.";

/// Selection and extraction ask for `json_schema` (the selection's schema an enum of the
/// stages it may choose, the extraction's the template's own), the response for text; the
/// reply, its stored row and every call name the endpoint and the model that answered, and a
/// repeated message's reply, answered from storage, names them too.
#[tokio::test]
async fn json_is_asked_for_by_schema_and_every_reply_names_its_model_and_endpoint() {
    let app = spawn_app_with(MockOptions::default(), |_| {}).await;
    app.send("ada", "s1", BOOKING).await;
    let reply = app.reply("s1").await;
    assert_eq!(reply["status"], "ok", "{reply:?}");
    assert_eq!(reply["stage"], "booking", "{reply:?}");
    assert_eq!(
        (reply["model"].as_str(), reply["endpoint"].as_str()),
        ("mock-1", "default")
    );
    assert_eq!(
        calls_of(&app, "s1").await,
        [
            call("selection", "default", "mock-1", Some("json_schema"), "ok"),
            call("extraction", "default", "mock-1", Some("json_schema"), "ok"),
            call("response", "default", "mock-1", None, "ok"),
        ]
    );
    let stats = &app.mock.stats;
    assert_eq!(stats.json_schema_requests.load(Ordering::Relaxed), 2);
    assert_eq!(stats.json_object_requests.load(Ordering::Relaxed), 0);
    assert_eq!(stats.text_requests.load(Ordering::Relaxed), 1);
    let stored = app
        .count(
            "SELECT count(*) FROM messages WHERE role = 'assistant' AND model = 'mock-1' \
             AND endpoint = 'default'",
            &[],
        )
        .await;
    assert_eq!(stored, 1);

    // The same message again: answered from storage, with the same names, and no call.
    app.send("ada", "s1", BOOKING).await;
    let replies = app.wait_replies("s1", 2).await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[1]["reply_id"], reply["reply_id"]);
    assert_eq!(
        (
            replies[1]["model"].as_str(),
            replies[1]["endpoint"].as_str()
        ),
        ("mock-1", "default")
    );
    assert_eq!(app.mock.stats.requests.load(Ordering::Relaxed), 3);
}

/// An endpoint that refuses `json_schema` answers the first structured call after one refusal,
/// asked with the schema inside `json_object`, and is asked that way from then on: one refusal
/// in all, every selection and extraction recorded with the form that was answered.
#[tokio::test]
async fn an_endpoint_that_refuses_json_schema_is_asked_in_the_weaker_form_from_then_on() {
    let app = spawn_app_with(
        MockOptions {
            refuse_json_schema: true,
            ..MockOptions::default()
        },
        |_| {},
    )
    .await;
    let texts = [BOOKING, "It is for a check-up.", "Thanks, bye!"];
    for (i, text) in texts.iter().enumerate() {
        let key = format!("r{i}");
        app.send("bea", &key, text).await;
        let reply = app.reply(&key).await;
        assert_eq!(reply["status"], "ok", "{reply:?}");
    }
    let stats = &app.mock.stats;
    assert_eq!(stats.refused_formats.load(Ordering::Relaxed), 1);
    assert_eq!(stats.json_schema_requests.load(Ordering::Relaxed), 1);
    let structured: Vec<(String, Option<String>, String)> = app
        .db()
        .await
        .query(
            "SELECT purpose, response_format, outcome FROM llm_calls \
             WHERE purpose <> 'response' ORDER BY id",
            &[],
        )
        .await
        .expect("calls")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // Selection in every message; extraction in the booking stage (the first two: the third
    // moves to farewell, which extracts nothing).
    assert_eq!(structured.len(), 5, "{structured:?}");
    for (purpose, format, outcome) in &structured {
        assert_eq!(
            (format.as_deref(), outcome.as_str()),
            (Some("json_object_schema"), "ok"),
            "{purpose}"
        );
    }
    assert_eq!(
        stats.json_object_requests.load(Ordering::Relaxed),
        5,
        "one request per structured call after the refusal"
    );
}

/// A template's chain `["big", "small"]` over two endpoints: "big" is served by an endpoint
/// that fails every call, "small" by a healthy one. Each call moves on after the first entry's
/// retries (or at once, when its circuit is open): every message answered by the second
/// endpoint, each of its calls recorded twice, the failure on the first endpoint and the
/// answer on the second.
#[tokio::test]
async fn a_failing_endpoint_hands_each_call_to_the_next_model_of_the_chain() {
    let broken = mock_server(MockOptions {
        error_rate: 1.0,
        ..MockOptions::default()
    })
    .await;
    let healthy = mock_server(MockOptions::default()).await;
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.llm.endpoints = vec![
            endpoint("primary", &broken, &["big"]),
            endpoint("backup", &healthy, &["small"]),
        ];
    })
    .await;
    let id = uuid::Uuid::new_v4().to_string();
    helpers::import_demo_copy(
        &app.config,
        &id,
        &[("kind = \"", "models = [\"big\", \"small\"]\nkind = \"")],
    )
    .await;
    for i in 0..4 {
        let key = format!("c{i}");
        app.send_to(&id, "cy", &key, BOOKING).await;
        let reply = app.reply(&key).await;
        assert_eq!(reply["status"], "ok", "{reply:?}");
        assert_eq!(
            (reply["model"].as_str(), reply["endpoint"].as_str()),
            ("small", "backup")
        );
        let calls = calls_of(&app, &key).await;
        let purposes = ["selection", "extraction", "response"];
        assert_eq!(calls.len(), 2 * purposes.len(), "{calls:?}");
        for (pair, purpose) in calls.chunks(2).zip(purposes) {
            let (p, e, m, f, outcome) = &pair[0];
            assert_eq!(
                (p.as_str(), e.as_str(), m.as_str(), f),
                (purpose, "primary", "big", &None)
            );
            assert!(
                outcome == "llm.server_error" || outcome == "llm.circuit_open",
                "{outcome}"
            );
            assert_eq!(pair[1].0, purpose);
            assert_eq!(
                (pair[1].1.as_str(), pair[1].2.as_str()),
                ("backup", "small")
            );
            assert_eq!(pair[1].4, "ok");
        }
        // Each record of a call carries its prompt, the one moved on from as the one that
        // answered.
        let prompts = app
            .db()
            .await
            .query(
                "SELECT c.purpose, count(*), count(DISTINCT c.prompt), min(length(c.prompt)) \
                 FROM llm_calls c JOIN messages m ON m.business_id = c.business_id \
                 AND m.id = c.message_id WHERE m.idempotency_key = $1 AND m.role = 'user' \
                 GROUP BY c.purpose",
                &[&key],
            )
            .await
            .expect("prompts");
        assert_eq!(prompts.len(), 3);
        for row in prompts {
            let (purpose, records, distinct, shortest): (String, i64, i64, i32) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            assert_eq!((records, distinct), (2, 1), "{purpose}");
            assert!(
                shortest > 20,
                "{purpose}: a prompt of {shortest} characters"
            );
        }
    }
    assert_eq!(
        healthy.stats.requests.load(Ordering::Relaxed),
        12,
        "each call answered once by the backup"
    );
    assert!(broken.stats.requests.load(Ordering::Relaxed) >= 3);
    assert_eq!(
        app.mock.stats.requests.load(Ordering::Relaxed),
        0,
        "no endpoint is the default one"
    );
    // The demo business of this app names no model: its chain is the default model, which no
    // endpoint lists and none catches.
    app.send_to(DEMO_BUSINESS, "dee", "d0", "hello").await;
    let reply = app.reply("d0").await;
    assert_eq!(reply["status"], "fallback", "{reply:?}");
    assert_eq!(
        (reply["model"].as_str(), reply["endpoint"].as_str()),
        ("", "")
    );
}

/// An entry that hangs is left when `llm.fallback_after_ms` is spent, well before the request
/// timeout, and the call is answered by the next entry; when every entry fails the message gets
/// its fallback reply, with every entry's failure recorded.
#[tokio::test]
async fn a_time_budget_moves_a_hung_call_on_and_a_chain_that_fails_falls_back() {
    let hung = mock_server(MockOptions {
        timeout_rate: 1.0,
        hang_ms: 60_000,
        ..MockOptions::default()
    })
    .await;
    let healthy = mock_server(MockOptions::default()).await;
    let broken = mock_server(MockOptions {
        error_rate: 1.0,
        ..MockOptions::default()
    })
    .await;
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.llm.request_timeout_ms = 30_000;
        c.llm.fallback_after_ms = 300;
        c.llm.endpoints = vec![
            endpoint("slow", &hung, &["mock-1"]),
            endpoint("fast", &healthy, &["mock-1"]),
        ];
    })
    .await;
    let started = std::time::Instant::now();
    app.send("eve", "h0", "hello there").await;
    let reply = app.reply("h0").await;
    assert_eq!(reply["status"], "ok", "{reply:?}");
    assert_eq!(reply["endpoint"], "fast");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "left after the budget, not the request timeout: {:?}",
        started.elapsed()
    );
    let calls = calls_of(&app, "h0").await;
    let outcomes: Vec<(&str, &str)> = calls.iter().map(|c| (c.1.as_str(), c.4.as_str())).collect();
    // The welcome stage: selection then the response, each first on the hung endpoint.
    assert_eq!(
        outcomes,
        [
            ("slow", "llm.timeout"),
            ("fast", "ok"),
            ("slow", "llm.timeout"),
            ("fast", "ok")
        ]
    );
    drop(app);

    // Both endpoints failing: the fallback reply, each entry's failure on record.
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.llm.endpoints = vec![endpoint("one", &broken, &[]), endpoint("two", &broken, &[])];
    })
    .await;
    app.send("fay", "f0", "hello there").await;
    let reply = app.reply("f0").await;
    assert_eq!(reply["status"], "fallback", "{reply:?}");
    let calls = calls_of(&app, "f0").await;
    let endpoints: Vec<&str> = calls.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(endpoints, ["one", "two", "one", "two"], "{calls:?}");
    assert!(calls.iter().all(|c| c.4 != "ok"), "{calls:?}");
}
