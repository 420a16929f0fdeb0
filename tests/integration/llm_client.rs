//! The OpenAI-compatible client against a scripted HTTP server (wiremock).

use std::time::Duration;

use icmp::error::{Classify, LlmError};
use icmp::llm::structured::Level;
use icmp::llm::{ChatMessage, ChatRequest, LlmService, OpenAiClient, OutputFormat};
use secrecy::SecretString;
use serde_json::json;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers;

fn config(server: &MockServer, timeout_ms: u64) -> icmp::config::LlmConfig {
    let mut c = helpers_llm_config();
    c.base_url = format!("{}/v1", server.uri());
    c.request_timeout_ms = timeout_ms;
    c.api_key = Some(SecretString::from("sk-test-key"));
    c
}

fn client(server: &MockServer, timeout_ms: u64) -> OpenAiClient {
    OpenAiClient::new(&config(server, timeout_ms)).expect("client")
}

fn helpers_llm_config() -> icmp::config::LlmConfig {
    // The LLM section of the test profile; no services needed.
    let path = helpers::root().join("config/default.toml");
    icmp::config::Config::load(&path, Some("test"))
        .expect("config")
        .llm
}

fn request(json_mode: bool) -> ChatRequest {
    ChatRequest {
        model: "gpt-test".into(),
        messages: vec![ChatMessage::system("be brief"), ChatMessage::user("hi")],
        temperature: Some(0.2),
        max_tokens: Some(50),
        format: if json_mode {
            OutputFormat::json("answer", None)
        } else {
            OutputFormat::Text
        },
        endpoint: 0,
    }
}

fn completion(content: &str) -> serde_json::Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test-0613",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    })
}

#[tokio::test]
async fn a_200_returns_content_model_and_usage() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", "Bearer sk-test-key"))
        .and(body_partial_json(json!({"model": "gpt-test", "max_tokens": 50, "messages": [{"role": "system"}, {"role": "user", "content": "hi"}]})))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion("hello")))
        .expect(1)
        .mount(&server)
        .await;
    let r = client(&server, 2000)
        .chat(&request(false))
        .await
        .expect("ok");
    assert_eq!(r.content, "hello");
    assert_eq!(r.model, "gpt-test-0613");
    assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(12), Some(3)));
}

#[tokio::test]
async fn a_redirect_is_an_answer_of_its_own_and_is_not_followed() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(
            ResponseTemplate::new(307)
                .insert_header("location", format!("{}/elsewhere", server.uri())),
        )
        .expect(1)
        .mount(&server)
        .await;
    // Were it followed, the call (body and key with it) would get this answer.
    Mock::given(path("/elsewhere"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion("moved")))
        .expect(0)
        .mount(&server)
        .await;
    let err = client(&server, 2000)
        .chat(&request(false))
        .await
        .expect_err("a 307 is not a completion");
    assert!(err.to_string().contains("307"), "{err}");
}

#[tokio::test]
async fn json_mode_sends_response_format_and_plain_mode_does_not() {
    let server = MockServer::start().await;
    Mock::given(body_partial_json(
        json!({"response_format": {"type": "json_object"}}),
    ))
    .respond_with(ResponseTemplate::new(200).set_body_json(completion("{\"stage\":\"a\"}")))
    .expect(1)
    .mount(&server)
    .await;
    let c = client(&server, 2000);
    let r = c.chat(&request(true)).await.expect("json mode");
    assert_eq!(r.content, "{\"stage\":\"a\"}");
    // Without JSON mode the mock above does not match: wiremock answers 404, a rejection.
    let e = c
        .chat(&request(false))
        .await
        .expect_err("no response_format");
    assert!(matches!(e, LlmError::Rejected { status: 404, .. }), "{e:?}");
}

fn stage_schema() -> OutputFormat {
    OutputFormat::json(
        "stage selection",
        Some(std::sync::Arc::new(json!({
            "type": "object",
            "properties": {"stage": {"type": "string", "enum": ["a", "b"]}},
            "required": ["stage"]
        }))),
    )
}

/// The requests the server received, by their `response_format` (`none` without one).
async fn formats(server: &MockServer) -> Vec<String> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.method == wiremock::http::Method::POST)
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            match &body["response_format"] {
                serde_json::Value::Null => "none".to_owned(),
                f if f.get("schema").is_some() => {
                    format!("{}+schema", f["type"].as_str().unwrap_or(""))
                }
                f => f["type"].as_str().unwrap_or("").to_owned(),
            }
        })
        .collect()
}

#[tokio::test]
async fn a_schema_goes_as_json_schema_with_its_name_and_strict() {
    let server = MockServer::start().await;
    Mock::given(body_partial_json(json!({"response_format": {
        "type": "json_schema",
        "json_schema": {"name": "stage_selection", "strict": true,
                        "schema": {"properties": {"stage": {"enum": ["a", "b"]}}}}
    }})))
    .respond_with(ResponseTemplate::new(200).set_body_json(completion("{\"stage\":\"a\"}")))
    .expect(2)
    .mount(&server)
    .await;
    let c = client(&server, 2000);
    let mut r = request(true);
    r.format = stage_schema();
    for _ in 0..2 {
        let answer = c.chat(&r).await.expect("json_schema accepted");
        assert_eq!(answer.format, Some(Level::JsonSchema));
    }
}

/// An endpoint that refuses `json_schema` (llama-cpp-python answers 500 naming
/// `response_format`) and the grammar form, then takes `json_object`: the first call steps down
/// twice, and the endpoint's model is asked in the form it took from then on; another model of
/// the endpoint starts at the top again.
#[tokio::test]
async fn a_refused_response_format_steps_down_once_and_is_remembered_per_model() {
    let server = MockServer::start().await;
    Mock::given(body_partial_json(json!({"response_format": {"type": "json_schema"}})))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"error": {"message":
            "1 validation error: ('body', 'response_format', 'type') Input should be 'text' or 'json_object'"}})))
        .mount(&server)
        .await;
    Mock::given(body_partial_json(
        json!({"response_format": {"type": "json_object", "schema": {"type": "object"}}}),
    ))
    .respond_with(
        ResponseTemplate::new(400).set_body_json(json!({"error": {"message":
            "Unrecognized argument", "param": "response_format"}})),
    )
    .mount(&server)
    .await;
    Mock::given(body_partial_json(
        json!({"response_format": {"type": "json_object"}}),
    ))
    .respond_with(ResponseTemplate::new(200).set_body_json(completion("{\"stage\":\"b\"}")))
    .mount(&server)
    .await;
    let c = client(&server, 2000);
    let mut r = request(true);
    r.format = stage_schema();
    let first = c.chat(&r).await.expect("answered in a weaker form");
    assert_eq!(first.content, "{\"stage\":\"b\"}");
    assert_eq!(first.format, Some(Level::JsonObject));
    assert_eq!(
        formats(&server).await,
        ["json_schema", "json_object+schema", "json_object"]
    );
    let second = c.chat(&r).await.expect("answered");
    assert_eq!(second.format, Some(Level::JsonObject));
    r.model = "another-model".into();
    let _ = c.chat(&r).await.expect("answered");
    assert_eq!(
        formats(&server).await,
        [
            "json_schema",
            "json_object+schema",
            "json_object",
            "json_object",
            "json_schema",
            "json_object+schema",
            "json_object"
        ],
        "remembered for gpt-test, learned again for another-model"
    );
}

/// A 400 that does not name `response_format` is the request's fault: no step down, no retry.
#[tokio::test]
async fn another_rejection_does_not_step_down() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"error": {"message":
            "max_tokens is too large"}})),
        )
        .mount(&server)
        .await;
    let c = client(&server, 2000);
    let mut r = request(true);
    r.format = stage_schema();
    let e = c.chat(&r).await.expect_err("rejected");
    assert!(matches!(e, LlmError::Rejected { status: 400, .. }), "{e:?}");
    assert_eq!(formats(&server).await, ["json_schema"]);
}

/// With `structured_output = "prompt"` the request carries no `response_format` at all.
#[tokio::test]
async fn a_configured_level_is_where_the_endpoint_starts() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion("{\"stage\":\"a\"}")))
        .mount(&server)
        .await;
    let mut c = config(&server, 2000);
    c.structured_output = Level::Prompt;
    let client = OpenAiClient::new(&c).expect("client");
    let mut r = request(true);
    r.format = stage_schema();
    assert_eq!(
        client.chat(&r).await.expect("ok").format,
        Some(Level::Prompt)
    );
    c.structured_output = Level::JsonObjectSchema;
    let client = OpenAiClient::new(&c).expect("client");
    client.chat(&r).await.expect("ok");
    assert_eq!(formats(&server).await, ["none", "json_object+schema"]);
}

#[tokio::test]
async fn a_429_is_retryable_and_carries_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "2"))
        .mount(&server)
        .await;
    let e = client(&server, 2000)
        .chat(&request(false))
        .await
        .expect_err("429");
    assert!(
        matches!(
            e,
            LlmError::RateLimited {
                retry_after_ms: Some(2000)
            }
        ),
        "{e:?}"
    );
    assert!(e.is_retryable());
    assert_eq!(e.status_code(), 429);
}

#[tokio::test]
async fn a_500_is_retryable_and_a_400_is_not() {
    let server = MockServer::start().await;
    Mock::given(body_partial_json(json!({"model": "bad"})))
        .respond_with(ResponseTemplate::new(400).set_body_string("invalid model"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string("boom"))
        .mount(&server)
        .await;
    let c = client(&server, 2000);
    let e = c.chat(&request(false)).await.expect_err("500");
    assert!(
        matches!(&e, LlmError::Server { status: 500, body } if body == "boom"),
        "{e:?}"
    );
    assert!(e.is_retryable());
    let mut bad = request(false);
    bad.model = "bad".into();
    let e = c.chat(&bad).await.expect_err("400");
    assert!(matches!(e, LlmError::Rejected { status: 400, .. }), "{e:?}");
    assert!(!e.is_retryable());
}

#[tokio::test]
async fn a_slow_endpoint_times_out() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(completion("late"))
                .set_delay(Duration::from_millis(1500)),
        )
        .mount(&server)
        .await;
    let started = std::time::Instant::now();
    let e = client(&server, 300)
        .chat(&request(false))
        .await
        .expect_err("timeout");
    assert!(matches!(e, LlmError::Timeout(300)), "{e:?}");
    assert!(e.is_retryable());
    assert!(started.elapsed() < Duration::from_millis(1400));
}

#[tokio::test]
async fn a_malformed_body_is_reported_as_such() {
    let server = MockServer::start().await;
    Mock::given(body_partial_json(json!({"model": "empty"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"choices": []})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{\"choices\": [{\"mess"))
        .mount(&server)
        .await;
    let c = client(&server, 2000);
    let e = c.chat(&request(false)).await.expect_err("malformed");
    assert!(matches!(e, LlmError::MalformedResponse(_)), "{e:?}");
    let mut empty = request(false);
    empty.model = "empty".into();
    let e = c.chat(&empty).await.expect_err("no choices");
    assert!(
        matches!(e, LlmError::MalformedResponse(ref m) if m == "no choices"),
        "{e:?}"
    );
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_retryable_connection_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let mut c = helpers_llm_config();
    c.base_url = format!("http://{addr}/v1");
    let e = OpenAiClient::new(&c)
        .expect("client")
        .chat(&request(false))
        .await
        .expect_err("refused");
    assert!(matches!(e, LlmError::Connect(_)), "{e:?}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn an_oversized_answer_is_refused_and_an_error_body_is_read_only_in_part() {
    let server = MockServer::start().await;
    let huge = "x".repeat(3 << 20);
    Mock::given(body_partial_json(json!({"model": "big"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(&huge)))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string(huge.clone()))
        .mount(&server)
        .await;
    let c = client(&server, 5000);
    let mut big = request(false);
    big.model = "big".into();
    let e = c.chat(&big).await.expect_err("too large");
    assert!(
        matches!(e, LlmError::ResponseTooLarge { limit } if limit == 1 << 20),
        "{e:?}"
    );
    assert_eq!(e.code(), "llm.response_too_large");
    assert!(!e.is_retryable());
    let e = c.chat(&request(false)).await.expect_err("500");
    let LlmError::Server { status: 500, body } = &e else {
        panic!("{e:?}");
    };
    assert!(
        body.len() < 1024,
        "the error body is cut: {} bytes",
        body.len()
    );
}

#[tokio::test]
async fn an_error_body_echoing_the_key_never_carries_it_on() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_string("invalid key: Bearer sk-test-key (check your account)"),
        )
        .mount(&server)
        .await;
    let e = client(&server, 2000)
        .chat(&request(false))
        .await
        .expect_err("401");
    let text = format!("{e} {e:?}");
    assert!(!text.contains("sk-test-key"), "{text}");
    assert!(text.contains("invalid key: Bearer ***"), "{text}");
}

fn event_stream(chunks: &[serde_json::Value]) -> String {
    let mut body: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    body.push_str("data: [DONE]\n\n");
    body
}

/// A streamed answer grows the text so far chunk by chunk, and the usage chunk gives the
/// tokens; a stream that reaches `[DONE]` without a finish reason (an interrupted one) is
/// an error, retried like a broken body, not a short answer.
#[tokio::test]
async fn a_streamed_answer_is_read_chunk_by_chunk_and_a_cut_one_is_an_error() {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| json!({"model": "m-1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    let whole = event_stream(&[
        chunk(json!({"role": "assistant"}), serde_json::Value::Null),
        chunk(json!({"content": "Hello"}), serde_json::Value::Null),
        chunk(json!({"content": " there"}), serde_json::Value::Null),
        chunk(json!({}), json!("stop")),
        json!({"model": "m-1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}),
    ]);
    let cut = event_stream(&[
        chunk(json!({"role": "assistant"}), serde_json::Value::Null),
        chunk(json!({"content": "Hel"}), serde_json::Value::Null),
    ]);
    let server = MockServer::start().await;
    Mock::given(body_partial_json(
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    ))
    .respond_with(ResponseTemplate::new(200).set_body_raw(whole, "text/event-stream"))
    .up_to_n_times(1)
    .mount(&server)
    .await;
    Mock::given(body_partial_json(json!({"stream": true})))
        .respond_with(ResponseTemplate::new(200).set_body_raw(cut, "text/event-stream"))
        .mount(&server)
        .await;
    let c = client(&server, 2000);
    let (text, _seen) = tokio::sync::watch::channel(String::new());
    let r = c
        .chat_streamed(&request(false), &text)
        .await
        .expect("streamed");
    assert_eq!(r.content, "Hello there");
    assert_eq!(*text.borrow(), "Hello there");
    assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(7), Some(2)));
    assert_eq!(r.model, "m-1");
    let e = c
        .chat_streamed(&request(false), &text)
        .await
        .expect_err("cut short");
    assert!(matches!(e, LlmError::MalformedResponse(_)), "{e:?}");
    assert!(e.is_retryable());
}
