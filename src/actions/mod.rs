//! Stage actions: webhooks a stage fires, delivered effectively once.
//!
//! A message whose stage (after selection) has actions fires those whose trigger holds
//! ([`fired`]): each becomes an [`OutboxRow`] written in the message's own write transaction,
//! so the request exists if and only if the message committed, under an idempotency key derived
//! from (business, conversation, message, action) that no redelivery, replay or repeat of the
//! message can write twice. The [`dispatcher`] delivers outbox rows: signed (HMAC-SHA256 over the
//! timestamp and the body, [`signature`]), with the key in `Idempotency-Key`, retried with
//! exponential backoff, its status, latency and a bounded response stored, and never sent again
//! after a 2xx.

pub mod dispatcher;
pub mod follow_up;
pub mod receiver;

use hmac::{KeyInit, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::model::{ActionDef, ActionTrigger, Extracted, StageInfo};
use crate::telemetry::trace_context::{TRACEPARENT, TRACESTATE};
use crate::template::Context;

/// The header carrying the signature: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "X-Icmp-Signature";

/// A request of a stage action, as the write set stores it in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxRow {
    pub id: Uuid,
    pub action: String,
    /// The idempotency key ([`idempotency_key`]).
    pub key: String,
    /// The URL, or `env:NAME` for one the dispatcher reads from the environment.
    pub url: String,
    pub body: serde_json::Value,
    pub timeout_ms: u32,
    pub max_attempts: u32,
    /// The firing message's `reply_to`: where the follow-up goes (`None`: the outbound stream).
    pub reply_to: Option<String>,
    /// The action's follow-up template.
    pub follow_up: Option<String>,
    /// The results that hand the conversation to a person.
    pub handoff_on: Vec<String>,
    /// The trace context of the span that fired it (`None`: no span export).
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// An action's result as templates see it (`actions.<name>`): `status` (`none` until the
/// action has a result; `delivered`, `rejected` or `dead`), `ok` (delivered: templates test
/// it with `{% if %}`, which compares nothing), the receiver's `http_status`, its `response`
/// (the answer when it is a JSON object, else `{}`: its members are unknown until it comes,
/// so templates read them with `?.`), `text` (the answer as received, at most 4 KiB) and
/// `at`.
pub fn result(
    status: &str,
    http_status: Option<i32>,
    response: Option<&str>,
    at: Option<chrono::DateTime<chrono::Utc>>,
) -> serde_json::Value {
    let parsed = response
        .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    serde_json::json!({
        "status": status,
        "ok": status == "delivered",
        "http_status": http_status,
        "response": parsed,
        "text": response,
        "at": at.map(|t| t.to_rfc3339()),
    })
}

/// The `actions` variable: every action of the business's stages, with the conversation's
/// result of it or `status = "none"`.
pub fn results_of(
    business: &crate::model::Business,
    stored: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    business
        .stages
        .iter()
        .flat_map(|s| &s.actions)
        .map(|a| {
            let r = stored
                .get(&a.name)
                .cloned()
                .unwrap_or_else(|| result("none", None, None, None));
            (a.name.clone(), r)
        })
        .collect()
}

/// The `actions` variable of import's sample context: every action delivered with an answer
/// whose shape is unknown (`null`: templates reach into it with `?.`).
pub fn sample_results<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> serde_json::Map<String, serde_json::Value> {
    names
        .into_iter()
        .map(|n| {
            (
                n.to_owned(),
                result("delivered", Some(200), None, Some(chrono::Utc::now())),
            )
        })
        .collect()
}

/// What a follow-up template sees: the action's name, the body it sent, its result.
#[derive(Debug, Serialize)]
pub struct FollowUpContext<'a> {
    pub action: &'a str,
    pub request: &'a serde_json::Value,
    pub result: &'a serde_json::Value,
}

/// Renders a follow-up (trimmed; `None` when it renders to nothing: no message is sent).
///
/// # Errors
/// A template that does not compile or render.
pub fn render_follow_up(
    engine: &upon::Engine<'static>,
    source: &str,
    ctx: &FollowUpContext<'_>,
) -> Result<Option<String>, BodyError> {
    let text = render(engine, source, ctx)?;
    let text = text.trim();
    Ok((!text.is_empty()).then(|| text.to_owned()))
}

/// Why an action's body (or follow-up) could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("it does not compile: {0}")]
    Compile(String),
    #[error("it does not render: {0}")]
    Render(String),
    #[error("the body does not render to JSON: {0}")]
    NotJson(String),
}

/// Renders an action's body against `ctx`; it must be JSON.
///
/// # Errors
/// A body that does not compile, render, or parse as JSON.
pub fn render_body(
    engine: &upon::Engine<'static>,
    source: &str,
    ctx: &Context,
) -> Result<serde_json::Value, BodyError> {
    let text = render(engine, source, ctx)?;
    serde_json::from_str(&text).map_err(|e| BodyError::NotJson(e.to_string()))
}

/// Compiles and renders an action's template (its body, its follow-up).
fn render(
    engine: &upon::Engine<'static>,
    source: &str,
    ctx: &impl Serialize,
) -> Result<String, BodyError> {
    let template = engine
        .compile(source)
        .map_err(|e| BodyError::Compile(e.to_string()))?;
    template
        .render(engine, ctx)
        .to_string()
        .map_err(|e| BodyError::Render(e.to_string()))
}

/// The idempotency key of `action` fired by the message `message_key` (the producer's
/// `message_id`, else the inbound entry id) of a conversation: a hex SHA-256, the same for
/// every delivery, replay or repeat of the message.
pub fn idempotency_key(
    business: Uuid,
    conversation: Uuid,
    message_key: &str,
    action: &str,
) -> String {
    let digest = Sha256::new()
        .chain_update(business.as_bytes())
        .chain_update(conversation.as_bytes())
        .chain_update((message_key.len() as u64).to_be_bytes())
        .chain_update(message_key.as_bytes())
        .chain_update(action.as_bytes())
        .finalize();
    hex::encode(digest)
}

/// The signature header's value for `body` sent at `timestamp` (unix seconds): HMAC-SHA256 with
/// `secret` over `<timestamp>.<body>`, as Stripe signs webhooks.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac(secret, timestamp, body))
    )
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// What a receiver checks: the header's `v1` is the HMAC of `<t>.<body>` (compared in constant
/// time) and `t` is within `tolerance_secs` of `now`.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: i64, tolerance_secs: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if (now - t).abs() > tolerance_secs {
        return false;
    }
    let mut check = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    check.update(t.to_string().as_bytes());
    check.update(b".");
    check.update(body);
    check.verify_slice(&v1).is_ok()
}

/// What a message did that actions fire on.
#[derive(Debug)]
pub struct Fired<'a> {
    pub business: Uuid,
    pub conversation: Uuid,
    /// The message's idempotency key.
    pub message_key: &'a str,
    /// The message's `reply_to`.
    pub reply_to: Option<&'a str>,
    /// The stage after the message, and whether the message brought the conversation into it.
    pub stage: &'a StageInfo,
    pub entered: bool,
    /// The fields known before the message, and those known after it.
    pub before: &'a Extracted,
    pub after: &'a Extracted,
}

fn known(fields: &[String], data: &Extracted) -> bool {
    fields
        .iter()
        .all(|f| data.get(f).is_some_and(|v| !v.is_null()))
}

/// The outbox rows of the actions `m` fires, their bodies rendered against `ctx` (the context
/// after the message's decisions). An action whose body fails to render is skipped (counted,
/// logged): import checked it against a sample, so only data can break it.
pub fn fired(engine: &upon::Engine<'static>, m: &Fired<'_>, ctx: &Context) -> Vec<OutboxRow> {
    m.stage
        .actions
        .iter()
        .filter(|a| match a.on {
            ActionTrigger::Enter => m.entered,
            ActionTrigger::Message => true,
            ActionTrigger::FieldsComplete => known(&a.fields, m.after) && !known(&a.fields, m.before),
        })
        .filter_map(|a| match render_body(engine, &a.body, ctx) {
            Ok(body) => Some(row(a, m, body)),
            Err(e) => {
                crate::telemetry::metrics::action(&a.name, "body_failed");
                tracing::error!(action = %a.name, error = %e, "an action's body did not render; not fired");
                None
            }
        })
        .collect()
}

fn row(a: &ActionDef, m: &Fired<'_>, body: serde_json::Value) -> OutboxRow {
    let trace: std::collections::HashMap<&str, String> = crate::telemetry::trace_context::current()
        .into_iter()
        .collect();
    OutboxRow {
        id: Uuid::now_v7(),
        action: a.name.clone(),
        key: idempotency_key(m.business, m.conversation, m.message_key, &a.name),
        url: match (&a.url, &a.url_env) {
            (Some(url), _) => url.clone(),
            (None, Some(var)) => format!("env:{var}"),
            (None, None) => String::new(),
        },
        body,
        timeout_ms: a.timeout_ms,
        max_attempts: a.max_attempts,
        reply_to: m.reply_to.map(str::to_owned),
        follow_up: a.follow_up.clone(),
        handoff_on: a.handoff_on.clone(),
        traceparent: trace.get(TRACEPARENT).cloned(),
        tracestate: trace.get(TRACESTATE).cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_its_key_and_body_only_and_within_the_tolerance() {
        let body = br#"{"name":"Ada"}"#;
        let header = signature(b"s3cret", 1_800_000_000, body);
        assert!(header.starts_with("t=1800000000,v1="));
        assert!(verify(b"s3cret", &header, body, 1_800_000_010, 300));
        assert!(!verify(b"other", &header, body, 1_800_000_010, 300));
        assert!(!verify(
            b"s3cret",
            &header,
            br#"{"name":"Eve"}"#,
            1_800_000_010,
            300
        ));
        assert!(
            !verify(b"s3cret", &header, body, 1_800_001_000, 300),
            "too old"
        );
        assert!(!verify(b"s3cret", "v1=00", body, 1_800_000_000, 300));
    }

    #[test]
    fn a_follow_up_sees_the_request_and_the_result_and_reaches_into_an_answer_with_optional_access()
    {
        let engine = crate::template::engine();
        let source = "{% if result.ok %}Booked for {{ request.date }} \
                      (ref {{ result.response?.booking_id }}).{% else %}We could not book \
                      {{ request.date }}: {{ result.http_status }}.{% endif %}";
        let request = serde_json::json!({"date": "Tuesday 8 December 10:00"});
        let delivered = result(
            "delivered",
            Some(200),
            Some(r#"{"booking_id":"B-17"}"#),
            None,
        );
        let ctx = FollowUpContext {
            action: "book",
            request: &request,
            result: &delivered,
        };
        assert_eq!(
            render_follow_up(&engine, source, &ctx).expect("renders"),
            Some("Booked for Tuesday 8 December 10:00 (ref B-17).".to_owned())
        );
        // An answer that is not JSON is `text` alone; a missing member renders as nothing.
        let text = result("delivered", Some(200), Some("ok"), None);
        assert_eq!(text["response"], serde_json::json!({}));
        assert_eq!(text["text"], serde_json::json!("ok"));
        let ctx = FollowUpContext {
            result: &text,
            ..ctx
        };
        assert_eq!(
            render_follow_up(&engine, source, &ctx).expect("renders"),
            Some("Booked for Tuesday 8 December 10:00 (ref ).".to_owned())
        );
        let taken = result("rejected", Some(409), Some(r#"{"error":"taken"}"#), None);
        let ctx = FollowUpContext {
            result: &taken,
            ..ctx
        };
        assert_eq!(
            render_follow_up(&engine, source, &ctx).expect("renders"),
            Some("We could not book Tuesday 8 December 10:00: 409.".to_owned())
        );
        // A follow-up that renders to nothing sends nothing.
        assert_eq!(
            render_follow_up(&engine, "{% if false %}x{% endif %}  ", &ctx).expect("renders"),
            None
        );
    }

    #[test]
    fn every_action_of_the_business_is_a_variable_with_none_until_it_has_a_result() {
        let action = |name: &str| crate::model::ActionDef {
            name: name.into(),
            on: ActionTrigger::Message,
            fields: Vec::new(),
            url: Some("http://x/".into()),
            url_env: None,
            body: "{}".into(),
            timeout_ms: 1000,
            max_attempts: 1,
            follow_up: None,
            handoff_on: Vec::new(),
        };
        let business = crate::model::Business {
            stages: vec![StageInfo {
                id: Uuid::from_u128(1),
                name: "s".into(),
                description: String::new(),
                next: None,
                actions: vec![action("book"), action("notify")],
                handoff: false,
            }],
            ..Default::default()
        };
        let mut stored = serde_json::Map::new();
        stored.insert(
            "book".into(),
            result("delivered", Some(201), Some(r#"{"id":1}"#), None),
        );
        stored.insert("removed".into(), result("dead", None, None, None));
        let vars = results_of(&business, &stored);
        assert_eq!(vars.len(), 2, "{vars:?}");
        assert_eq!(vars["book"]["response"]["id"], 1);
        assert_eq!(vars["notify"]["status"], "none");
        assert_eq!(vars["notify"]["response"], serde_json::json!({}));
    }

    #[test]
    fn the_key_depends_on_every_part_and_on_nothing_else() {
        let (b, c) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let k = idempotency_key(b, c, "m1", "book");
        assert_eq!(k.len(), 64);
        assert_eq!(k, idempotency_key(b, c, "m1", "book"));
        assert_ne!(k, idempotency_key(Uuid::from_u128(3), c, "m1", "book"));
        assert_ne!(k, idempotency_key(b, Uuid::from_u128(3), "m1", "book"));
        assert_ne!(k, idempotency_key(b, c, "m2", "book"));
        assert_ne!(k, idempotency_key(b, c, "m1", "cancel"));
        // The message key's length is part of the input: no two splits collide.
        assert_ne!(idempotency_key(b, c, "m1b", "ook"), k);
    }
}
