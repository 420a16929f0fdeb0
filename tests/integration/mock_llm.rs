//! The mock LLM answers a real HTTP client in the OpenAI format, with injected faults.

use icmp::llm::mock::{self, MockOptions};
use icmp::llm::{ChatMessage, ChatRequest, LlmError, LlmService, OpenAiClient};
use serde_json::{Value, json};

async fn start(options: MockOptions) -> mock::MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    mock::spawn(listener, options).expect("spawn")
}

#[tokio::test]
async fn mock_llm_answers_a_plain_http_client_in_the_openai_format() {
    let server = start(MockOptions::default()).await;
    let http = reqwest::Client::new();
    let body: Value = http
        .post(format!("{}/chat/completions", server.base_url()))
        .json(&json!({
            "model": "any",
            "messages": [{"role": "user", "content": "Current stage: welcome\nUser message: I want to book a visit"}],
            "response_format": {"type": "json_object"}
        }))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "any");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "{\"stage\":\"booking\"}"
    );
    assert!(body["usage"]["prompt_tokens"].as_u64().expect("usage") > 0);

    let models: Value = http
        .get(format!("{}/models", server.base_url()))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["id"], "mock-1");
}

fn request() -> ChatRequest {
    ChatRequest {
        model: "mock-1".into(),
        messages: vec![ChatMessage::user("User message: hello")],
        temperature: None,
        max_tokens: None,
        json_mode: false,
    }
}

async fn client_for(server: &mock::MockServer, timeout_ms: u64) -> OpenAiClient {
    let path = crate::helpers::root().join("config/default.toml");
    let mut c = icmp::config::Config::load(&path, Some("test"))
        .expect("config")
        .llm;
    c.base_url = server.base_url();
    c.request_timeout_ms = timeout_ms;
    OpenAiClient::new(&c).expect("client")
}

#[tokio::test]
async fn mock_llm_injects_each_fault_kind() {
    type Expect = fn(&LlmError) -> bool;
    let cases: [(MockOptions, Expect); 4] = [
        (
            MockOptions {
                error_rate: 1.0,
                ..Default::default()
            },
            |e| matches!(e, LlmError::Server { status: 500, .. }),
        ),
        (
            MockOptions {
                rate_limit_rate: 1.0,
                retry_after_secs: 3,
                ..Default::default()
            },
            |e| {
                matches!(
                    e,
                    LlmError::RateLimited {
                        retry_after_ms: Some(3000)
                    }
                )
            },
        ),
        (
            MockOptions {
                malformed_rate: 1.0,
                ..Default::default()
            },
            |e| matches!(e, LlmError::MalformedResponse(_)),
        ),
        (
            MockOptions {
                timeout_rate: 1.0,
                hang_ms: 5_000,
                ..Default::default()
            },
            |e| matches!(e, LlmError::Timeout(_)),
        ),
    ];
    for (options, expected) in cases {
        let server = start(options.clone()).await;
        let e = client_for(&server, 300)
            .await
            .chat(&request())
            .await
            .expect_err("fault");
        assert!(expected(&e), "{options:?} gave {e:?}");
        assert_eq!(
            server
                .stats
                .faults
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}

#[tokio::test]
async fn mock_llm_fault_shares_follow_the_rates() {
    let server = start(MockOptions {
        error_rate: 0.3,
        seed: 7,
        ..Default::default()
    })
    .await;
    let client = client_for(&server, 2000).await;
    let mut failures = 0;
    for _ in 0..200 {
        if client.chat(&request()).await.is_err() {
            failures += 1;
        }
    }
    assert!(
        (35..=85).contains(&failures),
        "{failures} of 200 failed at a 30% rate"
    );
}

#[tokio::test]
async fn the_client_keeps_at_most_max_concurrent_calls_in_flight() {
    let peak = |cap: usize| async move {
        let server = start(MockOptions {
            latency_ms: 200,
            ..Default::default()
        })
        .await;
        let mut config = crate::helpers::base_config().llm;
        config.base_url = server.base_url();
        config.max_concurrent_calls = cap;
        let client = OpenAiClient::new(&config).expect("client");
        let request = ChatRequest {
            model: "any".into(),
            messages: vec![ChatMessage::user("hello")],
            temperature: None,
            max_tokens: None,
            json_mode: false,
        };
        let calls = (0..6).map(|_| client.chat(&request));
        for result in futures::future::join_all(calls).await {
            result.expect("answered");
        }
        server
            .stats
            .peak_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(peak(2).await, 2, "the cap holds");
    assert_eq!(peak(0).await, 6, "0: no limit, all six at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_speaks_cleartext_http2_to_the_mock_over_one_connection() {
    // `llm.http2_prior_knowledge`: every call of the worker shares one HTTP/2 connection; the
    // mock serves HTTP/1.1 and HTTP/2 on the same port, with room for many streams at once.
    let options = MockOptions {
        latency_ms: 200,
        ..MockOptions::default()
    };
    let app = crate::helpers::spawn_app_with(options, |c| c.llm.http2_prior_knowledge = true).await;
    let ids: std::collections::HashSet<String> = (0..300).map(|i| format!("h2-{i}")).collect();
    let messages: Vec<(String, String, String)> = ids
        .iter()
        .map(|id| (format!("user-{id}"), id.clone(), "hello".to_owned()))
        .collect();
    app.send_many(&messages).await;
    let replies = app.wait_all(&ids, std::time::Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "{id}");
        assert_eq!(replies[id][0]["status"], "ok", "{id}: {:?}", replies[id][0]);
    }
    // Far more calls at once than the 200 streams an HTTP/2 server allows by default.
    let peak = app
        .mock
        .stats
        .peak_in_flight
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(peak > 200, "calls in flight at once: {peak}");
    let connections = app
        .mock
        .stats
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(connections, 1, "every call over one connection");
    app.stop().await;
}
