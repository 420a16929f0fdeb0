//! A webhook receiver for stage actions, served by the mock LLM server under
//! `POST /webhooks/{action}` (the demo clinic books through it; tests count what it saw).
//!
//! It does what a careful receiver does: it checks the signature (when it has the secret),
//! answers a repeated `Idempotency-Key` with the answer it gave the first time without doing
//! the work again, and for a body with a `date` books that slot: `200` with a booking, or `409`
//! when another request took the slot. Faults are asked for in the URL, per idempotency key:
//! `?fail_first=N` answers the first N attempts `500` before doing anything; `?hang_first=N`
//! does the work on the next N attempts and then hangs for `hang_ms` (default 30 s), so the
//! sender times out after the receiver processed the request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// What the receiver saw, for tests and the demo.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Requests received.
    pub requests: AtomicU64,
    /// Requests refused for a missing or wrong signature.
    pub bad_signatures: AtomicU64,
    /// Requests whose work was done (one per idempotency key).
    pub processed: AtomicU64,
    /// Requests answered from a key's first answer.
    pub repeats: AtomicU64,
    /// Slots booked, and requests refused because their slot was taken.
    pub bookings: AtomicU64,
    pub conflicts: AtomicU64,
    /// The `traceparent` header of each request that had one, in arrival order.
    pub traceparents: std::sync::Mutex<Vec<String>>,
}

#[derive(Default)]
struct Book {
    /// The first answer to each idempotency key.
    answers: HashMap<String, (u16, Value)>,
    /// The key that booked each slot.
    slots: HashMap<String, String>,
    /// Attempts seen per key.
    attempts: HashMap<String, u32>,
}

struct ReceiverState {
    secret: Option<String>,
    stats: Arc<ReceiverStats>,
    book: Mutex<Book>,
}

#[derive(Debug, Deserialize)]
struct Faults {
    #[serde(default)]
    fail_first: u32,
    #[serde(default)]
    hang_first: u32,
    #[serde(default = "default_hang_ms")]
    hang_ms: u64,
}

fn default_hang_ms() -> u64 {
    30_000
}

/// The receiver's routes; `secret`: the signing key requests must carry (`None`: unchecked).
pub fn router(secret: Option<String>, stats: Arc<ReceiverStats>) -> Router {
    Router::new()
        .route("/webhooks/{action}", post(receive))
        .with_state(Arc::new(ReceiverState {
            secret,
            stats,
            book: Mutex::new(Book::default()),
        }))
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    Path(action): Path<String>,
    Query(faults): Query<Faults>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let stats = &state.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(tp) = header("traceparent") {
        stats
            .traceparents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tp.to_owned());
    }
    if let Some(secret) = &state.secret {
        let now = chrono::Utc::now().timestamp();
        let signed = header(super::SIGNATURE_HEADER)
            .is_some_and(|h| super::verify(secret.as_bytes(), h, &body, now, 300));
        if !signed {
            stats.bad_signatures.fetch_add(1, Ordering::Relaxed);
            return answer(StatusCode::UNAUTHORIZED, json!({"error": "bad signature"}));
        }
    }
    let Some(key) = header("Idempotency-Key").map(str::to_owned) else {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "no Idempotency-Key"}),
        );
    };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "the body is not JSON"}),
        );
    };
    let (status, reply, attempt) = {
        let mut book = state.book.lock().await;
        let attempt = {
            let n = book.attempts.entry(key.clone()).or_insert(0);
            *n += 1;
            *n
        };
        if attempt <= faults.fail_first {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "injected failure"}),
            );
        }
        if let Some((status, reply)) = book.answers.get(&key) {
            stats.repeats.fetch_add(1, Ordering::Relaxed);
            (*status, reply.clone(), attempt)
        } else {
            stats.processed.fetch_add(1, Ordering::Relaxed);
            let (status, reply) = book_slot(&mut book, stats, &action, &key, &request);
            book.answers.insert(key.clone(), (status, reply.clone()));
            (status, reply, attempt)
        }
    };
    if attempt <= faults.fail_first + faults.hang_first {
        tokio::time::sleep(Duration::from_millis(faults.hang_ms)).await;
    }
    answer(
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        reply,
    )
}

/// The work of a first request: a booking of the body's `date` (any other body is accepted
/// as it is).
fn book_slot(
    book: &mut Book,
    stats: &ReceiverStats,
    action: &str,
    key: &str,
    request: &Value,
) -> (u16, Value) {
    let Some(date) = request
        .get("date")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return (200, json!({"action": action, "received": request}));
    };
    if let Some(holder) = book.slots.get(&date)
        && holder != key
    {
        stats.conflicts.fetch_add(1, Ordering::Relaxed);
        return (409, json!({"error": "slot taken", "date": date}));
    }
    book.slots.insert(date.clone(), key.to_owned());
    let n = stats.bookings.fetch_add(1, Ordering::Relaxed) + 1;
    (
        200,
        json!({
            "booking_id": format!("bk-{n}"),
            "date": date,
            "name": request.get("name").cloned().unwrap_or(Value::Null),
            "confirmed": true
        }),
    )
}
