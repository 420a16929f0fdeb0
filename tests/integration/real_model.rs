//! Against a real inference server: llama-cpp-python's OpenAI-compatible server with
//! SmolLM2-135M-Instruct (`scripts/services.sh llm`, built once per machine). The model's words
//! are its own; what is checked is what icmp promises whatever they are.

use std::sync::OnceLock;

use icmp::llm::mock::MockOptions;

use crate::helpers::{self, spawn_app_with};

/// The real server's base URL and model name (started once per test process).
pub(crate) fn real_llm() -> &'static (String, String) {
    static LLM: OnceLock<(String, String)> = OnceLock::new();
    LLM.get_or_init(|| {
        let env = helpers::services_sh("llm");
        (
            env["ICMP_TEST_LLM_URL"].clone(),
            env["ICMP_TEST_LLM_MODEL"].clone(),
        )
    })
}

/// A worker (and the demo business) answered by the real server, with `tweak` applied.
async fn real_app(tweak: impl FnOnce(&mut icmp::config::Config)) -> helpers::TestApp {
    let (url, model) = real_llm().clone();
    spawn_app_with(MockOptions::default(), |c| {
        c.llm.base_url = url;
        c.llm.default_model = model;
        c.llm.request_timeout_ms = 120_000;
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn a_demo_conversation_with_a_real_model_is_answered_turn_by_turn() {
    let app = real_app(|_| {}).await;
    let turns = [
        "Hello, I would like to book a cleaning.",
        "My name is Ada Lovelace.",
        "Next Tuesday at 10 in the morning, please.",
        "Thanks, goodbye!",
    ];
    let mut conversation = None;
    for (i, text) in turns.iter().enumerate() {
        let id = format!("real-{i}");
        app.send("ada", &id, text).await;
        let reply = app.reply(&id).await;
        assert_eq!(reply["status"], "ok", "turn {i}: {reply:?}");
        assert!(!reply["content"].trim().is_empty(), "turn {i}: {reply:?}");
        let conv = reply["conversation_id"].clone();
        assert_eq!(
            conversation.get_or_insert(conv.clone()),
            &conv,
            "one conversation"
        );
    }
    // Each message stored once with its reply, and each answered by the server, which counted
    // the tokens.
    assert_eq!(app.count("SELECT count(*) FROM messages", &[]).await, 8);
    let calls = app
        .db()
        .await
        .query(
            "SELECT c.outcome, c.prompt_tokens, c.completion_tokens, c.output FROM llm_calls c \
             WHERE c.purpose = 'response'",
            &[],
        )
        .await
        .expect("calls");
    assert_eq!(calls.len(), turns.len());
    for call in &calls {
        let outcome: String = call.get(0);
        let prompt: Option<i32> = call.get(1);
        let completion: Option<i32> = call.get(2);
        let output: Option<String> = call.get(3);
        assert_eq!(outcome, "ok");
        assert!(prompt.is_some_and(|n| n > 0), "prompt tokens: {prompt:?}");
        assert!(
            completion.is_some_and(|n| n > 0),
            "completion tokens: {completion:?}"
        );
        assert!(output.is_some_and(|o| !o.is_empty()));
    }
    assert_eq!(
        app.mock
            .stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the mock answered nothing"
    );
}

/// The demo conversation again, checking every structured call: the server (llama-cpp-python)
/// refuses `json_schema` and takes the schema inside `json_object`, which it turns into a
/// grammar, so every selection names a stage the conversation may be in next and every
/// extraction validates against the template's schema, without a repair turn.
#[tokio::test]
async fn a_real_model_under_a_schema_names_only_allowed_stages_and_extracts_valid_json() {
    let app = real_app(|_| {}).await;
    let turns = [
        "Hello! I would like to book an appointment for a cleaning.",
        "My name is Grace Hopper and I would like to come on 2026-12-09.",
        "The reason is a toothache.",
        "That is all, thank you. Goodbye!",
    ];
    for (i, text) in turns.iter().enumerate() {
        let id = format!("schema-{i}");
        app.send("grace", &id, text).await;
        let reply = app.reply(&id).await;
        assert_eq!(reply["status"], "ok", "turn {i}: {reply:?}");
        assert_eq!(reply["endpoint"], "default", "turn {i}: {reply:?}");
        assert_eq!(reply["model"], "smollm2", "turn {i}: {reply:?}");
    }
    let db = app.db().await;
    let schema: serde_json::Value = db
        .query_one(
            "SELECT output_schema FROM templates WHERE name = 'extract_booking'",
            &[],
        )
        .await
        .expect("schema")
        .get(0);
    let validator = jsonschema::validator_for(&schema).expect("a schema");
    // Each user message with the stage it was received in and the stage after it.
    let moves: Vec<(String, String, String)> = db
        .query(
            "SELECT u.idempotency_key, su.name, sa.name FROM messages u \
             JOIN messages a ON a.business_id = u.business_id AND a.idempotency_key = u.idempotency_key \
               AND a.role = 'assistant' \
             JOIN stages su ON su.id = u.stage_id JOIN stages sa ON sa.id = a.stage_id \
             WHERE u.role = 'user' ORDER BY u.seq",
            &[],
        )
        .await
        .expect("stages")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(moves.len(), turns.len());
    let allowed = |from: &str| match from {
        "welcome" => vec!["welcome", "booking", "farewell"],
        "booking" => vec!["booking", "farewell", "welcome"],
        _ => vec!["farewell", "welcome", "booking"],
    };
    let mut extractions_expected = 0;
    for (key, from, to) in &moves {
        let calls = db
            .query(
                "SELECT c.purpose, c.response_format, c.outcome, c.output FROM llm_calls c \
                 JOIN messages m ON m.business_id = c.business_id AND m.id = c.message_id \
                 WHERE m.idempotency_key = $1 ORDER BY c.id",
                &[key],
            )
            .await
            .expect("calls");
        let purposes: Vec<String> = calls.iter().map(|c| c.get(0)).collect();
        let with_extraction = to == "booking";
        extractions_expected += usize::from(with_extraction);
        let expected: Vec<&str> = if with_extraction {
            vec!["selection", "extraction", "response"]
        } else {
            vec!["selection", "response"]
        };
        assert_eq!(purposes, expected, "{key}: one call each, no repair");
        for c in &calls {
            let purpose: String = c.get(0);
            let format: Option<String> = c.get(1);
            let outcome: String = c.get(2);
            let output: Option<String> = c.get(3);
            assert_eq!(outcome, "ok", "{key} {purpose}: {output:?}");
            if purpose == "response" {
                assert_eq!(format, None);
                continue;
            }
            assert_eq!(
                format.as_deref(),
                Some("json_object_schema"),
                "{key} {purpose}"
            );
            let value: serde_json::Value =
                serde_json::from_str(output.as_deref().unwrap_or("")).expect("JSON");
            if purpose == "selection" {
                let stage = value["stage"].as_str().unwrap_or("");
                assert!(allowed(from).contains(&stage), "{key}: {from} -> {value}");
                assert_eq!(stage, to, "{key}: the stage chosen is the stage after it");
            } else {
                assert!(
                    validator.is_valid(&value),
                    "{key}: {value} does not fit {schema}"
                );
            }
        }
    }
    let extractions = app
        .count(
            "SELECT count(*) FROM llm_calls WHERE purpose = 'extraction'",
            &[],
        )
        .await;
    assert_eq!(extractions, extractions_expected as i64);
}

/// Two endpoints serve the model: a real server of its own (on another port) and the mock.
/// The first turn is answered by the real server; it is stopped; the next turn is answered by
/// the mock, each of its calls recorded first as the real endpoint's failure, then as the
/// mock's answer. Nothing falls back to a template.
#[tokio::test]
async fn the_mock_takes_over_when_the_real_server_stops_mid_conversation() {
    const PORT: &str = "8093";
    let env = helpers::services_sh_with("llm", &[("ICMP_LLM_PORT", PORT)]);
    let url = env["ICMP_TEST_LLM_URL"].clone();
    let model = env["ICMP_TEST_LLM_MODEL"].clone();
    let app = spawn_app_with(MockOptions::default(), |c| {
        let mock = c.llm.base_url.clone();
        c.llm.request_timeout_ms = 120_000;
        c.llm.default_model.clone_from(&model);
        c.llm.endpoints = vec![
            icmp::config::EndpointConfig {
                name: "local".into(),
                base_url: url,
                models: vec![model.clone()],
                ..Default::default()
            },
            icmp::config::EndpointConfig {
                name: "mock".into(),
                base_url: mock,
                models: vec![model.clone()],
                ..Default::default()
            },
        ];
    })
    .await;
    app.send("hedy", "t0", "Hello, what are your opening hours?")
        .await;
    let first = app.reply("t0").await;
    assert_eq!(first["status"], "ok", "{first:?}");
    assert_eq!(first["endpoint"], "local", "{first:?}");
    let mock_calls = app
        .mock
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(mock_calls, 0);

    helpers::services_sh_with("llm-down", &[("ICMP_LLM_PORT", PORT)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", 8093)).is_ok() {
        assert!(std::time::Instant::now() < deadline, "the server stopped");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    app.send("hedy", "t1", "Thanks, goodbye!").await;
    let second = app.reply("t1").await;
    assert_eq!(second["status"], "ok", "{second:?}");
    assert_eq!(second["endpoint"], "mock", "{second:?}");
    assert_eq!(second["conversation_id"], first["conversation_id"]);
    let calls: Vec<(String, String, String)> = app
        .db()
        .await
        .query(
            "SELECT c.purpose, c.endpoint, c.outcome FROM llm_calls c JOIN messages m \
             ON m.business_id = c.business_id AND m.id = c.message_id \
             WHERE m.idempotency_key = 't1' ORDER BY c.id",
            &[],
        )
        .await
        .expect("calls")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // Selection and the response, each first failing on the stopped server.
    assert_eq!(calls.len(), 4, "{calls:?}");
    for pair in calls.chunks(2) {
        assert_eq!(pair[0].0, pair[1].0, "{calls:?}");
        assert_eq!(pair[0].1, "local");
        assert!(
            pair[0].2 == "llm.unavailable" || pair[0].2 == "llm.circuit_open",
            "{calls:?}"
        );
        assert_eq!((pair[1].1.as_str(), pair[1].2.as_str()), ("mock", "ok"));
    }
    assert_eq!(
        app.mock
            .stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

/// A business that streams its replies, answered by the real server: the text so far arrives in
/// partials before the one final reply, whose text they begin. (A small model may answer with
/// nothing at all, which falls back: then no partial is published. Up to three messages are
/// sent until one is answered by the model.)
#[tokio::test]
async fn a_real_models_streamed_reply_arrives_in_partials_before_the_final_reply() {
    let app = real_app(|c| c.llm.partial_interval_ms = 50).await;
    let business = crate::streamed_replies::streaming_business(&app).await;
    let mut answered = 0;
    for i in 0..3 {
        let key = format!("stream-{i}");
        app.send_to(
            &business,
            "lin",
            &key,
            "Hello! Could you tell me about your clinic and its opening hours?",
        )
        .await;
        let reply = app.reply(&key).await;
        app.settle(std::time::Duration::from_secs(30)).await;
        let entries = crate::streamed_replies::entries_of(&app, &key).await;
        if reply["status"] == "fallback" {
            assert_eq!(entries.len(), 1, "a fallback has no partial: {entries:?}");
            continue;
        }
        assert_eq!(reply["status"], "ok", "{reply:?}");
        let partials = crate::streamed_replies::check_partials(&entries, 50);
        assert!(partials >= 1, "{entries:?}");
        answered += 1;
        break;
    }
    assert_eq!(answered, 1, "the model answered one of three messages");
}

/// History that fits, with the real model: the welcome reply's history is bounded to 1,000
/// tokens, and after every reply the conversation's turns but the newest two are folded into a
/// summary the model writes. Each summary is waited for before the next message, so the prompt
/// of the fourth message carries the summary of the first two exchanges and only the turns
/// after it; every summary call is recorded with the server's token counts.
#[tokio::test]
async fn a_real_model_summarises_older_turns_and_the_next_prompt_carries_the_summary() {
    let app = real_app(|_| {}).await;
    let id = uuid::Uuid::new_v4().to_string();
    let summarize = crate::history::summarizing(1, 2);
    helpers::import_demo_copy(
        &app.config,
        &id,
        &[
            (summarize.0, &summarize.1),
            (
                "name = \"welcome_reply\"\n",
                "name = \"welcome_reply\"\ncontext_tokens = 1000\n",
            ),
        ],
    )
    .await;
    let summary_now = async || -> (String, i64) {
        let row = app
            .db()
            .await
            .query_one("SELECT summary, summarized_seq FROM conversations", &[])
            .await
            .expect("conversation");
        (row.get(0), row.get(1))
    };
    let texts = [
        "Hi, what are your opening hours?",
        "Do you also work on Saturdays?",
        "Where is the clinic exactly?",
    ];
    for (i, text) in texts.iter().enumerate() {
        app.send_to(&id, "mia", &format!("sum-{i}"), text).await;
        let reply = app.reply(&format!("sum-{i}")).await;
        assert_eq!(reply["status"], "ok", "{reply:?}");
        // After exchange k (from 1) the summary covers every message but the newest two.
        let expected = 2 * (i as i64 + 1) - 2;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        while summary_now().await.1 != expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "summary after message {i}: {:?}",
                summary_now().await
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let (summary, upto) = summary_now().await;
    assert_eq!(upto, 4);
    assert!(!summary.is_empty());
    let calls: Vec<(String, String, Option<i32>)> = app
        .db()
        .await
        .query(
            "SELECT outcome, endpoint, prompt_tokens FROM llm_calls WHERE purpose = 'summary'",
            &[],
        )
        .await
        .expect("calls")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for c in &calls {
        assert_eq!((c.0.as_str(), c.1.as_str()), ("ok", "default"));
        assert!(c.2.is_some_and(|t| t > 0), "{calls:?}");
    }
    app.send_to(
        &id,
        "mia",
        "sum-3",
        "Thanks, and how do I get there by bus?",
    )
    .await;
    assert_eq!(app.reply("sum-3").await["status"], "ok");
    let prompt = app.prompt_of("sum-3", "response").await;
    assert!(
        prompt.contains(&format!("Earlier in this conversation: {summary}")),
        "{prompt}"
    );
    // (The summary may quote them; the history lines may not.)
    assert!(
        !prompt.contains(&format!("user: {}", texts[0]))
            && !prompt.contains(&format!("user: {}", texts[1])),
        "the first two exchanges are folded: {prompt}"
    );
    assert!(
        prompt.contains(&format!("user: {}", texts[2])),
        "the third is kept: {prompt}"
    );
}
