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

#[tokio::test]
async fn a_demo_conversation_with_a_real_model_is_answered_turn_by_turn() {
    let (url, model) = real_llm().clone();
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.llm.base_url = url;
        c.llm.default_model = model;
        c.llm.request_timeout_ms = 120_000;
    })
    .await;
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
