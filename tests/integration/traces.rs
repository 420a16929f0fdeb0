//! Distributed traces: a worker process exports its spans over OTLP (gRPC and HTTP/protobuf)
//! to a receiver in the test that decodes real OTLP protobuf; the trace a producer started
//! continues through the message's phases and LLM calls and onto the reply. With the receiver
//! down, every message is still answered exactly once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

use crate::helpers::{self, DEMO_BUSINESS, TestApp};
use crate::processes::{WorkerProcess, free_port};
use icmp::llm::mock::MockOptions;

/// Every span a receiver got, with its resource's `service.name`.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>, Arc<Mutex<Vec<String>>>);

impl Received {
    fn take_in(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().expect("lock");
        for rs in request.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attribute(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
    }

    fn of_trace(&self, trace_id: &[u8]) -> Vec<Span> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, s)| s.trace_id == trace_id)
            .map(|(_, s)| s.clone())
            .collect()
    }

    fn services(&self) -> HashSet<String> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .map(|(s, _)| s.clone())
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take_in(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC receiver on a loopback port.
async fn grpc_receiver() -> (Received, String) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("grpc receiver");
    });
    (received, format!("http://{addr}"))
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf bodies) on a loopback port.
async fn http_receiver() -> (Received, String) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
                    sink.1.lock().expect("lock").push(key.to_owned());
                }
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => {
                        sink.take_in(request);
                        (
                            axum::http::StatusCode::OK,
                            ExportTraceServiceResponse {
                                partial_success: None,
                            }
                            .encode_to_vec(),
                        )
                    }
                    Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.expect("http receiver") });
    (received, format!("http://{addr}"))
}

fn attribute(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<String> {
    let v = attributes.iter().find(|a| a.key == key)?.value.as_ref()?;
    Some(match v.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

/// A producer's span: trace id, span id (random, so parallel runs never meet).
fn producer_span() -> (String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (trace, span)
}

/// Sends a message of `user` carrying the producer's `traceparent`; returns its entry id.
async fn send_traced(app: &TestApp, user: &str, id: &str, content: &str, tp: &str) -> String {
    let inbound = app.config.streams.for_fields(DEMO_BUSINESS, user).inbound;
    app.xadd_on(
        &inbound,
        &[
            ("business_id", DEMO_BUSINESS.as_bytes()),
            ("user_id", user.as_bytes()),
            ("message_id", id.as_bytes()),
            ("content", content.as_bytes()),
            ("traceparent", tp.as_bytes()),
            ("tracestate", b"producer=1"),
        ],
    )
    .await
}

/// Waits until the receiver holds the trace's spans named `names` (and returns them all).
async fn wait_for_spans(received: &Received, trace: &[u8], names: &[&str]) -> Vec<Span> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let spans = received.of_trace(trace);
        let got: HashSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        if names.iter().all(|n| got.contains(n)) {
            return spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans of the trace: {got:?}; wanted {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Spans a worker process exports to `endpoint` over `protocol`.
fn exporting_worker(app: &TestApp, name: &str, protocol: &str, endpoint: &str) -> WorkerProcess {
    WorkerProcess::spawn(
        &app.config,
        name,
        &[
            ("ICMP__TELEMETRY__OTLP_ENDPOINT", endpoint),
            ("ICMP__TELEMETRY__OTLP_PROTOCOL", protocol),
            ("ICMP__TELEMETRY__SERVICE_NAME", "icmp-under-test"),
            ("ICMP__TELEMETRY__LOG_FORMAT", "json"),
            ("ICMP__TELEMETRY__LOG_FILTER", "debug"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
}

/// One trace from the producer's span to the reply: the message span is the producer span's
/// child and starts at the XADD, every phase and LLM call is in it, the LLM spans carry the
/// gen_ai attributes and the token counts the server reported (as stored with the calls), the
/// reply and the log lines carry the trace.
#[tokio::test]
async fn a_message_s_trace_runs_from_the_producer_through_every_phase_to_the_reply() {
    let app = helpers::spawn_env(MockOptions::default(), |_| {}).await;
    let (received, endpoint) = grpc_receiver().await;
    let mut worker = exporting_worker(&app, "otlp-grpc", "grpc", &endpoint);

    // A continuing conversation, so that the second message runs every step.
    let user = format!("traced-{}", uuid::Uuid::new_v4().simple());
    app.send(&user, "t-1", "Hello").await;
    let replies = app
        .wait_all(&HashSet::from(["t-1".to_owned()]), Duration::from_secs(60))
        .await;
    assert_eq!(replies["t-1"].len(), 1);

    let (trace, parent) = producer_span();
    let tp = format!("00-{trace}-{parent}-01");
    let second = send_traced(&app, &user, "t-2", "I'd like to book, my name is Ada", &tp).await;
    let replies = app
        .wait_all(&HashSet::from(["t-2".to_owned()]), Duration::from_secs(60))
        .await;
    assert_eq!(replies["t-2"].len(), 1, "one reply");
    let reply = &replies["t-2"][0];
    assert_eq!(reply["status"], "ok", "{reply:?}");

    let stream = app.config.streams.for_fields(DEMO_BUSINESS, &user).inbound;
    let root_name = format!("process {stream}");
    let phases = [
        root_name.as_str(),
        "wait for turn",
        "wait for a slot",
        "message",
        "read",
        "select",
        "extract",
        "respond",
        "persist",
        "finish",
    ];
    let spans = wait_for_spans(&received, &unhex(&trace), &phases).await;
    assert_eq!(
        received.services(),
        HashSet::from(["icmp-under-test".to_owned()])
    );
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    let named = |n: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == n).collect() };

    // The message span: the producer's child, a consumer span from the XADD time on, with
    // the messaging attributes.
    let roots = named(&root_name);
    assert_eq!(roots.len(), 1, "one delivery, one message span");
    let root = roots[0];
    assert_eq!(
        root.parent_span_id,
        unhex(&parent),
        "the producer's span is the parent"
    );
    assert_eq!(root.kind, 5, "SPAN_KIND_CONSUMER");
    let xadd_ms: u64 = second.split('-').next().expect("ms").parse().expect("ms");
    assert_eq!(
        root.start_time_unix_nano,
        xadd_ms * 1_000_000,
        "starts at the XADD"
    );
    for (k, v) in [
        ("messaging.system", "redis"),
        ("messaging.operation.type", "process"),
        ("messaging.destination.name", stream.as_str()),
        (
            "messaging.consumer.group.name",
            app.config.streams.group.as_str(),
        ),
        ("messaging.message.id", second.as_str()),
        ("icmp.outcome", "replied"),
    ] {
        assert_eq!(attribute(&root.attributes, k).as_deref(), Some(v), "{k}");
    }

    // Every other span descends from it, and everything ended within it.
    for s in &spans {
        if s.span_id == root.span_id {
            continue;
        }
        let mut up = s;
        let mut hops = 0;
        while up.parent_span_id != root.span_id {
            up = by_id
                .get(&up.parent_span_id)
                .unwrap_or_else(|| panic!("{}'s parent is not in the trace", s.name));
            hops += 1;
            assert!(hops < 10);
        }
        assert!(
            s.end_time_unix_nano <= root.end_time_unix_nano,
            "{}",
            s.name
        );
    }
    let message = named("message")[0];
    assert_eq!(message.parent_span_id, root.span_id);
    assert_eq!(
        attribute(&message.attributes, "business.id").as_deref(),
        Some(DEMO_BUSINESS)
    );
    assert!(attribute(&message.attributes, "stage").is_some());
    assert_eq!(
        attribute(&message.attributes, "outcome").as_deref(),
        Some("replied")
    );
    for phase in ["read", "select", "extract", "respond", "persist", "finish"] {
        assert_eq!(named(phase).len(), 1, "{phase}");
        assert_eq!(named(phase)[0].parent_span_id, message.span_id, "{phase}");
    }

    // The LLM calls: client spans with the gen_ai attributes and the server's token counts,
    // the same as the call log stored with the message.
    let llm: Vec<&Span> = spans
        .iter()
        .filter(|s| attribute(&s.attributes, "gen_ai.operation.name").is_some())
        .collect();
    let stored = app
        .db()
        .await
        .query(
            "SELECT c.purpose, c.model, c.prompt_tokens, c.completion_tokens
               FROM llm_calls c JOIN messages m
                 ON m.business_id = c.business_id AND m.id = c.message_id
              WHERE m.inbound_id = $1 ORDER BY c.created_at",
            &[&second],
        )
        .await
        .expect("calls");
    assert_eq!(llm.len(), stored.len(), "one span per LLM call");
    assert!(stored.len() >= 3, "selection, extraction, response");
    for row in &stored {
        let purpose: String = row.get(0);
        let span = llm
            .iter()
            .find(|s| attribute(&s.attributes, "purpose").as_deref() == Some(purpose.as_str()))
            .unwrap_or_else(|| panic!("no span for the {purpose} call"));
        let model: String = row.get(1);
        assert_eq!(span.name, format!("chat {model}"));
        assert_eq!(span.kind, 3, "SPAN_KIND_CLIENT");
        for (k, v) in [
            ("gen_ai.operation.name", "chat".to_owned()),
            ("gen_ai.request.model", model.clone()),
            ("gen_ai.response.model", model.clone()),
            ("gen_ai.response.finish_reasons", "stop".to_owned()),
            (
                "gen_ai.usage.input_tokens",
                row.get::<_, Option<i32>>(2)
                    .expect("prompt tokens")
                    .to_string(),
            ),
            (
                "gen_ai.usage.output_tokens",
                row.get::<_, Option<i32>>(3)
                    .expect("completion tokens")
                    .to_string(),
            ),
        ] {
            assert_eq!(attribute(&span.attributes, k), Some(v), "{purpose}: {k}");
        }
        // No content without `telemetry.capture_content`.
        assert_eq!(attribute(&span.attributes, "gen_ai.input.messages"), None);
        assert_eq!(attribute(&span.attributes, "gen_ai.output.messages"), None);
    }
    let all_text = format!("{spans:?}");
    assert!(!all_text.contains("Ada"), "no message content in spans");

    // The reply continues the trace: its traceparent names a span of it, and the producer's
    // tracestate is kept.
    let reply_tp = reply
        .get("traceparent")
        .expect("the reply carries a traceparent");
    let parts: Vec<&str> = reply_tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{reply_tp}");
    assert_eq!(parts[1], trace);
    assert!(by_id.contains_key(&unhex(parts[2])), "a span of the trace");
    assert_eq!(
        reply.get("tracestate").map(String::as_str),
        Some("producer=1")
    );

    // The log lines of the message carry its trace id and the id of their span.
    worker.terminate().await;
    let log = std::fs::read_to_string(&worker.log).expect("log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l["trace_id"] == trace.as_str())
        .collect();
    assert!(!lines.is_empty(), "log lines with the trace id");
    for line in &lines {
        let span_id = line["span_id"].as_str().expect("span_id");
        assert!(by_id.contains_key(&unhex(span_id)), "{line}");
    }
    assert!(
        lines.iter().any(|l| l["message"] == "message done"
            && l["span_id"].as_str().map(unhex) == Some(message.span_id.clone())),
        "the message's last line names its span"
    );
    assert!(!log.contains("Ada"));
}

/// Over OTLP/HTTP, with content capture on: the export decodes as protobuf, the message span's
/// parent is the producer's, and the LLM spans carry the prompts and outputs. A message
/// without a `traceparent` starts a trace of its own, and its reply carries it; a malformed
/// one is ignored and the message answered.
#[tokio::test]
async fn over_http_a_trace_without_a_producer_starts_in_icmp_and_content_is_captured_on_demand() {
    let app = helpers::spawn_env(MockOptions::default(), |_| {}).await;
    let (received, endpoint) = http_receiver().await;
    let mut worker = WorkerProcess::spawn(
        &app.config,
        "otlp-http",
        &[
            ("ICMP__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("ICMP__TELEMETRY__OTLP_PROTOCOL", "http"),
            ("ICMP__TELEMETRY__CAPTURE_CONTENT", "true"),
            ("ICMP__TELEMETRY__LOG_FILTER", "debug"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=otlp-k3y-0451"),
        ],
    );
    let user = format!("traced-{}", uuid::Uuid::new_v4().simple());
    let (trace, parent) = producer_span();
    send_traced(
        &app,
        &user,
        "h-1",
        "Hello from Grace",
        &format!("00-{trace}-{parent}-01"),
    )
    .await;
    app.send(&format!("{user}-2"), "h-2", "Hello").await;
    send_traced(&app, &format!("{user}-3"), "h-3", "Hello", "00-zz-01").await;
    let ids = HashSet::from(["h-1".to_owned(), "h-2".to_owned(), "h-3".to_owned()]);
    let replies = app.wait_all(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "{id}");
        assert_eq!(replies[id][0]["status"], "ok", "{id}");
    }

    let stream = app.config.streams.for_fields(DEMO_BUSINESS, &user).inbound;
    let root_name = format!("process {stream}");
    let spans = wait_for_spans(&received, &unhex(&trace), &[&root_name, "respond"]).await;
    let root = spans.iter().find(|s| s.name == root_name).expect("root");
    assert_eq!(root.parent_span_id, unhex(&parent));
    let response = spans
        .iter()
        .find(|s| attribute(&s.attributes, "purpose").as_deref() == Some("response"))
        .expect("the response's LLM span");
    let input = attribute(&response.attributes, "gen_ai.input.messages").expect("prompt");
    assert!(input.contains("Hello from Grace"), "{input}");
    assert!(attribute(&response.attributes, "gen_ai.output.messages").is_some());

    // The other two started traces in icmp: their replies name them, and their message
    // spans have no parent.
    for id in ["h-2", "h-3"] {
        let tp = replies[id][0]
            .get("traceparent")
            .unwrap_or_else(|| panic!("{id}: no traceparent"));
        let own = tp.split('-').nth(1).expect("trace id").to_owned();
        assert_ne!(own, trace);
        let spans = wait_for_spans(&received, &unhex(&own), &["message"]).await;
        let root = spans
            .iter()
            .find(|s| s.name.starts_with("process "))
            .expect("message span");
        assert!(root.parent_span_id.is_empty(), "{id}: a root span");
        assert_eq!(hex(&root.trace_id), own);
    }
    // The exporter's headers came from the environment, and the key is not in the log.
    let keys = received.1.lock().expect("lock").clone();
    assert!(
        !keys.is_empty() && keys.iter().all(|k| k == "otlp-k3y-0451"),
        "{keys:?}"
    );
    worker.terminate().await;
    let log = std::fs::read_to_string(&worker.log).expect("log");
    assert!(!log.contains("otlp-k3y-0451"));
    assert!(
        !log.contains("Grace"),
        "captured content stays out of the log"
    );
}

/// `telemetry.sampling_ratio = 0`: the traces icmp starts are not exported (their replies still
/// carry a `traceparent`, unsampled), and a producer's sampled trace is followed.
#[tokio::test]
async fn the_sampling_ratio_drops_icmp_s_own_traces_and_follows_the_producer_s_decision() {
    let app = helpers::spawn_env(MockOptions::default(), |_| {}).await;
    let (received, endpoint) = grpc_receiver().await;
    let mut worker = WorkerProcess::spawn(
        &app.config,
        "otlp-sampling",
        &[
            ("ICMP__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("ICMP__TELEMETRY__SAMPLING_RATIO", "0"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let (trace, parent) = producer_span();
    send_traced(
        &app,
        "s-1",
        "s-1",
        "Hello",
        &format!("00-{trace}-{parent}-01"),
    )
    .await;
    app.send("s-2", "s-2", "Hello").await;
    let ids = HashSet::from(["s-1".to_owned(), "s-2".to_owned()]);
    let replies = app.wait_all(&ids, Duration::from_secs(60)).await;
    wait_for_spans(&received, &unhex(&trace), &["message", "finish"]).await;
    let own = replies["s-2"][0]
        .get("traceparent")
        .expect("a traceparent all the same")
        .clone();
    assert!(own.ends_with("-00"), "not sampled: {own}");
    worker.terminate().await;
    let own_trace = unhex(own.split('-').nth(1).expect("trace id"));
    assert!(
        received.of_trace(&own_trace).is_empty(),
        "nothing of it exported"
    );
}

/// With the receiver down (nothing listens on its port), every message is answered exactly
/// once and the worker stops cleanly; the dead letter of a poisoned message carries icmp's
/// trace context in place of the producer's.
#[tokio::test]
async fn with_the_receiver_down_every_message_is_answered_once() {
    let app = helpers::spawn_env(MockOptions::default(), |c| {
        c.streams.max_deliveries = 1;
    })
    .await;
    let poisoned = "5b0e8a7c-2222-4c1d-8e2f-00000000002c";
    helpers::import_poisoned_demo(&app, poisoned).await;
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let mut worker = WorkerProcess::spawn(
        &app.config,
        "otlp-down",
        &[
            ("ICMP__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("ICMP__TELEMETRY__LISTEN", listen.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let mut ids = HashSet::new();
    for u in 0..20 {
        for m in 0..3 {
            let (trace, parent) = producer_span();
            let id = format!("d-{u}-{m}");
            send_traced(
                &app,
                &format!("down-{u}"),
                &id,
                "Hello",
                &format!("00-{trace}-{parent}-01"),
            )
            .await;
            ids.insert(id);
        }
    }
    let (trace, parent) = producer_span();
    let inbound = app.config.streams.for_fields(poisoned, "p").inbound;
    app.xadd_on(
        &inbound,
        &[
            ("business_id", poisoned.as_bytes()),
            ("user_id", b"p"),
            ("message_id", b"poison"),
            ("content", b"Hello"),
            ("traceparent", format!("00-{trace}-{parent}-01").as_bytes()),
        ],
    )
    .await;
    ids.insert("poison".to_owned());
    let replies = app.wait_all(&ids, Duration::from_secs(90)).await;
    for id in &ids {
        assert_eq!(replies[id].len(), 1, "{id}: exactly one reply");
    }
    let answered = ids
        .iter()
        .filter(|id| replies[*id][0]["status"] == "ok")
        .count();
    assert_eq!(answered, 60);
    let stored: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM messages WHERE business_id = $1::text::uuid",
            &[&DEMO_BUSINESS],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(stored, 120, "two rows per message");

    let dead = app.entries(&app.config.streams.dead_letter).await;
    assert_eq!(dead.len(), 1);
    let tp = dead[0]
        .get("traceparent")
        .expect("the dead letter's traceparent");
    assert!(tp.contains(&trace), "the producer's trace goes on");
    assert!(!tp.contains(&parent), "icmp's span, not the producer's");
    // The failed exports are counted: the operator's one sign of a collector that is down.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = reqwest::get(format!("http://{listen}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let failed = metrics
            .lines()
            .find(|l| l.starts_with("icmp_trace_export_spans_total{outcome=\"failed\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if failed > 0.0 {
            assert!(!metrics.contains("icmp_trace_export_spans_total{outcome=\"exported\"}"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed export counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(worker.terminate().await.code(), Some(0), "a clean stop");
}

/// The Python example as a third-party producer and consumer: the trace it sends continues in
/// the worker's spans, and the reply it reads names a span of that trace.
#[tokio::test]
async fn the_python_client_s_trace_goes_through_icmp_and_back() {
    let app = helpers::spawn_env(MockOptions::default(), |_| {}).await;
    let (received, endpoint) = grpc_receiver().await;
    let mut worker = exporting_worker(&app, "otlp-python", "grpc", &endpoint);
    let s = &app.config.streams;
    let out = tokio::process::Command::new("python3")
        .arg(helpers::root().join("examples/python/icmp_client.py"))
        .args(["--redis", app.config.redis.url.expose()])
        .args(["--inbound", &s.inbound, "--outbound", &s.outbound])
        .args([
            "--user",
            "py-traced",
            "--timeout",
            "60",
            "Hello from Python",
        ])
        .output()
        .await
        .expect("python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON reply");
    let sent = stderr
        .lines()
        .find_map(|l| l.strip_prefix("traceparent "))
        .expect("the client prints its traceparent");
    let sent: Vec<&str> = sent.split('-').collect();
    let got: Vec<&str> = reply["traceparent"]
        .as_str()
        .expect("the reply's traceparent")
        .split('-')
        .collect();
    assert_eq!(got[1], sent[1], "the same trace");
    assert_ne!(got[2], sent[2], "icmp's span, not the producer's");
    let spans = wait_for_spans(&received, &unhex(sent[1]), &["message", "finish"]).await;
    let root = spans
        .iter()
        .find(|s| s.name.starts_with("process "))
        .expect("the message span");
    assert_eq!(
        root.parent_span_id,
        unhex(sent[2]),
        "the client's span is the parent"
    );
    assert!(spans.iter().any(|s| s.span_id == unhex(got[2])));
    worker.terminate().await;
}

/// A stage action fired by a traced message: its webhook request carries a `traceparent` of the
/// message's trace, its `POST <action>` client span is in that trace with the receiver's
/// status, and its follow-up reply carries the trace on.
#[tokio::test]
async fn an_action_s_request_and_follow_up_continue_the_firing_message_s_trace() {
    let app = helpers::spawn_env(
        MockOptions {
            webhook_secret: Some(crate::actions::secret()),
            ..MockOptions::default()
        },
        |_| {},
    )
    .await;
    let business = crate::actions::booking_business(&app, "", crate::actions::FOLLOW_UP).await;
    let (received, endpoint) = grpc_receiver().await;
    let mut worker = WorkerProcess::spawn(
        &app.config,
        "otlp-actions",
        &[
            ("ICMP__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("ICMP__ACTIONS__POLL_MS", "100"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let (trace, parent) = producer_span();
    let inbound = app.config.streams.for_fields(&business, "ada").inbound;
    app.xadd_on(
        &inbound,
        &[
            ("business_id", business.as_bytes()),
            ("user_id", b"ada"),
            ("message_id", b"a1"),
            (
                "content",
                b"I want to book a cleaning, my name is Ada Lovelace, on friday.",
            ),
            ("traceparent", format!("00-{trace}-{parent}-01").as_bytes()),
        ],
    )
    .await;
    let sent = crate::actions::follow_ups(&app, "a1", 1).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    let follow_up_tp = sent[0]
        .get("traceparent")
        .expect("the follow-up's traceparent");
    assert_eq!(follow_up_tp.split('-').nth(1), Some(trace.as_str()));
    let headers = app.mock.receiver.traceparents.lock().expect("lock").clone();
    assert_eq!(headers.len(), 1, "one request: {headers:?}");
    let header: Vec<&str> = headers[0].split('-').collect();
    assert_eq!(header[1], trace, "the request is in the message's trace");

    let spans = wait_for_spans(
        &received,
        &unhex(&trace),
        &["POST book_appointment", "publish follow-up"],
    )
    .await;
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    let action = spans
        .iter()
        .find(|s| s.name == "POST book_appointment")
        .expect("the action's span");
    assert_eq!(action.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(
        hex(&action.span_id),
        header[2],
        "the header names the action's span"
    );
    assert_eq!(
        attribute(&action.attributes, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(
        by_id.contains_key(&action.parent_span_id),
        "its parent is a span of the message"
    );
    // The follow-up is published in a span of its own, in the firing message's trace
    // whichever sweep publishes it.
    let publish = spans
        .iter()
        .find(|s| s.name == "publish follow-up")
        .expect("the follow-up's span");
    assert_eq!(
        follow_up_tp.split('-').nth(2),
        Some(hex(&publish.span_id).as_str())
    );
    assert!(by_id.contains_key(&publish.parent_span_id));
    worker.terminate().await;
}
