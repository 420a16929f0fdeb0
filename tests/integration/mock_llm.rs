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
        format: icmp::llm::OutputFormat::Text,
        endpoint: 0,
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
            format: icmp::llm::OutputFormat::Text,
            endpoint: 0,
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

/// Sends 300 messages (one per user, so all of them can be in flight at once) and checks that
/// each got exactly one `ok` reply; returns how many connections the mock accepted.
async fn three_hundred_at_once(app: &crate::helpers::TestApp) -> u64 {
    let ids: std::collections::HashSet<String> = (0..300).map(|i| format!("v-{i}")).collect();
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
    app.mock
        .stats
        .connections
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_worker_speaks_cleartext_http2_to_the_mock_over_one_connection() {
    // `llm.http_version = "auto"` (the default): the worker asks the `http://` endpoint at
    // start, and then every call shares one HTTP/2 connection (the probe's); the mock serves
    // HTTP/1.1 and HTTP/2 on the same port, with room for many streams at once.
    let options = MockOptions {
        latency_ms: 200,
        ..MockOptions::default()
    };
    let app = crate::helpers::spawn_app(options).await;
    assert_eq!(
        three_hundred_at_once(&app).await,
        1,
        "every call over one connection"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_speaks_only_http1_is_called_over_http1() {
    // The probe's HTTP/2 preface gets an HTTP/1.1 error back: the worker settles on HTTP/1.1,
    // one connection per call in flight, and no call fails.
    let options = MockOptions {
        latency_ms: 200,
        http1_only: true,
        ..MockOptions::default()
    };
    let app = crate::helpers::spawn_app(options).await;
    let connections = three_hundred_at_once(&app).await;
    assert!(connections > 200, "one connection per call: {connections}");
    app.stop().await;
}

#[tokio::test]
async fn the_http_version_to_a_cleartext_endpoint_is_asked_once() {
    use icmp::llm::transport::HttpVersion;
    let config = |url: String, version: HttpVersion| {
        let mut c = crate::helpers::base_config().llm;
        c.base_url = url;
        c.http_version = version;
        c
    };
    let both = start(MockOptions::default()).await;
    let auto = OpenAiClient::new(&config(both.base_url(), HttpVersion::Auto)).expect("client");
    assert_eq!(auto.settle_http_version().await, Some(true), "HTTP/2");
    assert_eq!(auto.settle_http_version().await, Some(true));
    auto.chat(&request()).await.expect("answered over HTTP/2");
    assert_eq!(
        both.stats
            .models_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "asked once"
    );
    let forced = OpenAiClient::new(&config(both.base_url(), HttpVersion::Http1)).expect("client");
    assert_eq!(forced.settle_http_version().await, None, "nothing to ask");

    let http1 = start(MockOptions {
        http1_only: true,
        ..MockOptions::default()
    })
    .await;
    let auto = OpenAiClient::new(&config(http1.base_url(), HttpVersion::Auto)).expect("client");
    assert_eq!(auto.settle_http_version().await, Some(false), "HTTP/1.1");
    let request = request();
    auto.chat(&request).await.expect("answered over HTTP/1.1");
    // Told to speak HTTP/2 to it anyway, every call fails.
    let forced = OpenAiClient::new(&config(http1.base_url(), HttpVersion::Http2)).expect("client");
    assert!(forced.chat(&request).await.is_err());
}
