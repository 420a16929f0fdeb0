//! Streamed replies: a business with `[business.replies] stream = true` gets `partial` entries
//! of the text so far before its one final reply; a repeat, a fallback and a business that does
//! not stream get none.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use icmp::llm::mock::MockOptions;

use crate::helpers::{self, TestApp, spawn_app_with};

/// A copy of the demo whose replies are streamed; returns its id.
pub(crate) async fn streaming_business(app: &TestApp) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    helpers::import_demo_copy(
        &app.config,
        &id,
        &[(
            "initial_stage = \"welcome\"\n",
            "initial_stage = \"welcome\"\n\n[business.replies]\nstream = true\n",
        )],
    )
    .await;
    id
}

/// An app whose mock streams a word every `chunk_ms`, its partials `interval_ms` apart at least,
/// and a streaming business of it.
async fn streaming_app(chunk_ms: u64, interval_ms: u64) -> (TestApp, String) {
    let app = spawn_app_with(
        MockOptions {
            stream_chunk_ms: chunk_ms,
            ..MockOptions::default()
        },
        |c| c.llm.partial_interval_ms = interval_ms,
    )
    .await;
    let business = streaming_business(&app).await;
    (app, business)
}

/// The entries of the outbound stream for `message_id`, in stream order, with their ids.
pub(crate) async fn entries_of(
    app: &TestApp,
    message_id: &str,
) -> Vec<(String, HashMap<String, String>)> {
    let stream = app.config.streams.outbound.clone();
    let raw: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut app.redis.clone())
        .await
        .expect("xrange");
    raw.into_iter()
        .filter(|(_, f)| f.get("message_id").map(String::as_str) == Some(message_id))
        .collect()
}

/// Checks what a streamed reply promises: partials first, each with the final reply's
/// `reply_id`, sequences 1, 2, …, each text a prefix of the next and of the final text, at
/// least `interval_ms` apart; then exactly one final reply. Returns the number of partials.
pub(crate) fn check_partials(
    entries: &[(String, HashMap<String, String>)],
    interval_ms: u64,
) -> usize {
    let finals: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].1["status"] != "partial")
        .collect();
    assert_eq!(finals.len(), 1, "one final reply: {entries:?}");
    let last = finals[0];
    assert_eq!(last, entries.len() - 1, "no partial after the final reply");
    let final_reply = &entries[last].1;
    let partials = &entries[..last];
    let millis = |id: &str| -> u64 {
        id.split('-')
            .next()
            .and_then(|m| m.parse().ok())
            .expect("id")
    };
    let mut previous: Option<(&str, u64)> = None;
    for (n, (id, p)) in partials.iter().enumerate() {
        assert_eq!(p["status"], "partial");
        assert_eq!(p["reply_id"], final_reply["reply_id"], "{p:?}");
        assert_eq!(p["conversation_id"], final_reply["conversation_id"]);
        assert_eq!(p["sequence"], (n + 1).to_string());
        assert!(
            final_reply["content"].starts_with(&p["content"]),
            "{:?} is not the start of {:?}",
            p["content"],
            final_reply["content"]
        );
        if let Some((text, at)) = previous {
            assert!(p["content"].starts_with(text) && p["content"].len() > text.len());
            assert!(
                millis(id) + 1 >= at + interval_ms,
                "partials {interval_ms} ms apart at least: {at} then {id}"
            );
        }
        previous = Some((&p["content"], millis(id)));
    }
    partials.len()
}

#[tokio::test]
async fn partials_of_the_text_so_far_precede_exactly_one_final_reply() {
    let (app, business) = streaming_app(25, 60).await;
    app.send_to(
        &business,
        "ivy",
        "p0",
        "Hello, what are your opening hours on a sunny day?",
    )
    .await;
    let reply = app.reply("p0").await;
    assert_eq!(reply["status"], "ok", "{reply:?}");
    let entries = entries_of(&app, "p0").await;
    let partials = check_partials(&entries, 60);
    // The mock streams ~15 words 25 ms apart: well over one interval.
    assert!(partials >= 2, "{entries:?}");
    assert_eq!(app.mock.stats.streamed_requests.load(Ordering::Relaxed), 1);
    // The streamed call's tokens are the server's (its usage chunk).
    let tokens: Option<i32> = app
        .db()
        .await
        .query_one(
            "SELECT completion_tokens FROM llm_calls WHERE purpose = 'response'",
            &[],
        )
        .await
        .expect("call")
        .get(0);
    assert!(tokens.is_some_and(|t| t > 0), "{tokens:?}");

    // A repeat is answered from storage: one more final reply, no partial.
    app.send_to(
        &business,
        "ivy",
        "p0",
        "Hello, what are your opening hours on a sunny day?",
    )
    .await;
    app.wait_replies("p0", 2).await;
    app.settle(std::time::Duration::from_secs(10)).await;
    let again = entries_of(&app, "p0").await;
    assert_eq!(again.len(), entries.len() + 1, "{again:?}");
    assert_eq!(again.last().map(|e| e.1["status"].as_str()), Some("ok"));
    assert_eq!(
        app.mock.stats.requests.load(Ordering::Relaxed),
        2,
        "selection and response"
    );

    // The demo business does not stream: no partial.
    app.send("ivy", "q0", "Hello there").await;
    app.reply("q0").await;
    let plain = entries_of(&app, "q0").await;
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert_eq!(app.mock.stats.streamed_requests.load(Ordering::Relaxed), 1);
}

/// When the streamed call fails, the reply is the fallback template's and no partial is
/// published (the failing endpoint wrote nothing).
#[tokio::test]
async fn a_fallback_reply_of_a_streaming_business_has_no_partials() {
    let app = spawn_app_with(
        MockOptions {
            error_rate: 1.0,
            ..MockOptions::default()
        },
        |_| {},
    )
    .await;
    let business = streaming_business(&app).await;
    app.send_to(&business, "jo", "f0", "Hello").await;
    let reply = app.reply("f0").await;
    assert_eq!(reply["status"], "fallback", "{reply:?}");
    app.settle(std::time::Duration::from_secs(10)).await;
    let entries = entries_of(&app, "f0").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
}

/// A stream broken in the middle (the endpoint hangs up after some words) is retried: the
/// partials of the second attempt start over, the final reply is the whole answer, once.
#[tokio::test]
async fn the_partials_of_a_retried_stream_start_over_and_the_final_reply_is_whole() {
    let (app, business) = streaming_app(20, 10).await;
    app.send_to(
        &business,
        "kim",
        "b0",
        "Hello BREAK-STREAM-ONCE what are your hours?",
    )
    .await;
    let reply = app.reply("b0").await;
    assert_eq!(reply["status"], "ok", "{reply:?}");
    app.settle(std::time::Duration::from_secs(10)).await;
    let entries = entries_of(&app, "b0").await;
    let finals = entries
        .iter()
        .filter(|e| e.1["status"] != "partial")
        .count();
    assert_eq!(finals, 1, "{entries:?}");
    assert_eq!(entries.last().map(|e| e.1["status"].as_str()), Some("ok"));
    let sequences: Vec<u64> = entries
        .iter()
        .filter(|e| e.1["status"] == "partial")
        .map(|e| e.1["sequence"].parse().expect("a number"))
        .collect();
    assert!(
        sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "{sequences:?}"
    );
    // Some partial of the broken attempt was longer than a later one of the retry.
    let lengths: Vec<usize> = entries
        .iter()
        .filter(|e| e.1["status"] == "partial")
        .map(|e| e.1["content"].len())
        .collect();
    assert!(lengths.windows(2).any(|w| w[1] < w[0]), "{lengths:?}");
    assert_eq!(app.mock.stats.streamed_requests.load(Ordering::Relaxed), 2);
}

/// The Python example renders the partials of a streamed reply as they arrive, then prints the
/// final reply, whose text the last partial begins.
#[tokio::test]
async fn the_python_client_renders_partials_then_the_final_reply() {
    let (app, business) = streaming_app(25, 50).await;
    let s = &app.config.streams;
    let out = tokio::process::Command::new("python3")
        .arg(helpers::root().join("examples/python/icmp_client.py"))
        .args(["--redis", app.config.redis.url.expose()])
        .args(["--inbound", &s.inbound, "--outbound", &s.outbound])
        .args(["--business", &business, "--partials"])
        .args(["--user", "max", "--timeout", "30"])
        .arg("Hello from Python, what are your opening hours on a sunny day?")
        .output()
        .await
        .expect("python3 (the test command installs redis-py)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON reply");
    assert_eq!(reply["status"], "ok");
    let partials: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("partial "))
        .collect();
    assert!(partials.len() >= 2, "{stderr}");
    for (n, line) in partials.iter().enumerate() {
        let (sequence, text) = line.split_once(": ").expect("partial N: text");
        assert_eq!(sequence, (n + 1).to_string());
        assert!(
            reply["content"]
                .as_str()
                .is_some_and(|c| c.starts_with(text)),
            "{text:?} begins {reply}"
        );
    }
}
