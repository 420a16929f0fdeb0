//! Stage actions: a booking fired by the message that completes its fields, written to the
//! outbox with the message, delivered signed, once, with retries and a final status; counted
//! at the receiver (the mock server's `/webhooks/…`) and in the outbox.

use std::sync::atomic::Ordering;
use std::time::Duration;

use icmp::llm::mock::MockOptions;

use crate::helpers::{self, TestApp, spawn_app_with};

/// The signing key of this run (`scripts/test` makes one).
pub fn secret() -> String {
    std::env::var("ICMP_TEST_WEBHOOK_SECRET").expect(
        "ICMP_TEST_WEBHOOK_SECRET (scripts/test exports one; export any value to run alone)",
    )
}

/// A mock whose receiver checks `secret`, and a worker whose dispatcher retries quickly.
async fn app_with_receiver(secret: &str) -> TestApp {
    spawn_app_with(
        MockOptions {
            webhook_secret: Some(secret.to_owned()),
            ..MockOptions::default()
        },
        |c| {
            c.actions.poll_ms = 100;
            c.actions.retry_initial_ms = 50;
            c.actions.retry_max_ms = 200;
        },
    )
    .await
}

/// A demo copy whose booking stage books through the receiver once the name and the date are
/// known (`query`: the receiver's faults; `limits`: extra action keys); returns its id.
pub(crate) async fn booking_business(app: &TestApp, query: &str, limits: &str) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let url = format!("http://{}/webhooks/book_appointment{query}", app.mock.addr);
    let action = format!(
        "transitions = [\"farewell\", \"welcome\"]\n\n[[stages.actions]]\nname = \"book_appointment\"\n\
         on = \"fields_complete\"\nfields = [\"name\", \"date\"]\nurl = \"{url}\"\n{limits}\
         body = \"\"\"{{\"name\": {{{{ extracted.name | json }}}}, \"date\": {{{{ extracted.date | json }}}}, \
         \"reason\": {{{{ extracted.reason | json }}}} }}\"\"\"\n"
    );
    helpers::import_demo_copy(
        &app.config,
        &id,
        &[
            (
                "initial_stage = \"welcome\"\n",
                "initial_stage = \"welcome\"\n\n[business.actions]\nsecret_env = \"ICMP_TEST_WEBHOOK_SECRET\"\n",
            ),
            ("transitions = [\"farewell\", \"welcome\"]\n", &action),
            // The booking stage's replies see the booking's result.
            (
                "when all are known, confirm them.\"\"\"",
                "when all are known, confirm them. Booking: {{ actions.book_appointment.status }} \
                 {{ actions.book_appointment.response?.booking_id }}\"\"\"",
            ),
        ],
    )
    .await;
    id
}

/// The outbox rows: (action, status, attempts, last_status, response).
async fn outbox(app: &TestApp) -> Vec<(String, String, i32, Option<i32>, Option<String>)> {
    app.db()
        .await
        .query(
            "SELECT action, status, attempts, last_status, response FROM action_outbox ORDER BY created_at",
            &[],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// Waits until no outbox row is pending; returns the rows.
async fn settled(app: &TestApp) -> Vec<(String, String, i32, Option<i32>, Option<String>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = outbox(app).await;
        if rows.iter().all(|r| r.1 != "pending") || tokio::time::Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn say(app: &TestApp, business: &str, user: &str, key: &str, text: &str) {
    app.send_to(business, user, key, text).await;
    let reply = app.reply(key).await;
    assert_eq!(reply["status"], "ok", "{reply:?}");
}

#[tokio::test]
async fn a_booking_fires_once_when_its_fields_are_complete_and_is_delivered_signed_once() {
    let app = app_with_receiver(&secret()).await;
    let b = booking_business(&app, "", "").await;
    say(
        &app,
        &b,
        "ada",
        "a1",
        "Hello, I want to book a cleaning. My name is Ada Lovelace.",
    )
    .await;
    assert_eq!(outbox(&app).await.len(), 0, "the date is still missing");
    say(&app, &b, "ada", "a2", "Friday please").await;
    let rows = settled(&app).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (action, status, attempts, code, response) = &rows[0];
    assert_eq!(
        (action.as_str(), status.as_str(), *attempts, *code),
        ("book_appointment", "delivered", 1, Some(200))
    );
    let response: serde_json::Value =
        serde_json::from_str(response.as_deref().unwrap_or("")).expect("JSON");
    assert_eq!(response["booking_id"], "bk-1");
    assert_eq!(response["name"], "Ada Lovelace");
    assert_eq!(response["date"], "friday");
    let r = &app.mock.receiver;
    assert_eq!(r.requests.load(Ordering::Relaxed), 1);
    assert_eq!(r.bad_signatures.load(Ordering::Relaxed), 0);
    assert_eq!(r.bookings.load(Ordering::Relaxed), 1);
    // Later messages do not fire it again (the fields were complete before them), nor does the
    // same message sent again (answered from storage).
    say(&app, &b, "ada", "a3", "It is for a cleaning.").await;
    app.send_to(&b, "ada", "a2", "Friday please").await;
    assert_eq!(app.wait_replies("a2", 2).await.len(), 2);
    app.settle(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outbox(&app).await.len(), 1);
    assert_eq!(r.requests.load(Ordering::Relaxed), 1);
    // The row belongs to the message that fired it.
    let fired_by = app
        .count(
            "SELECT count(*) FROM action_outbox o JOIN messages m ON m.business_id = o.business_id \
             AND m.id = o.message_id WHERE m.idempotency_key = 'a2' AND m.role = 'user'",
            &[],
        )
        .await;
    assert_eq!(fired_by, 1);
}

/// A receiver that does the work and then hangs past the request's timeout: the request is
/// sent again with the same key, answered from the receiver's first answer, and the slot is
/// booked once.
#[tokio::test]
async fn a_receiver_that_times_out_after_processing_books_once() {
    let app = app_with_receiver(&secret()).await;
    let b = booking_business(&app, "?hang_first=1&hang_ms=3000", "timeout_ms = 500\n").await;
    say(
        &app,
        &b,
        "bea",
        "b1",
        "I want to book a cleaning, my name is Bea Smith, on friday.",
    )
    .await;
    let rows = settled(&app).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("delivered", 2));
    let r = &app.mock.receiver;
    assert_eq!(r.requests.load(Ordering::Relaxed), 2);
    assert_eq!(r.processed.load(Ordering::Relaxed), 1);
    assert_eq!(r.repeats.load(Ordering::Relaxed), 1);
    assert_eq!(r.bookings.load(Ordering::Relaxed), 1);
}

/// A receiver failing with 500s: retried with backoff, delivered on the third attempt; one
/// that never recovers: given up (`dead`) after `max_attempts`, its last error kept.
#[tokio::test]
async fn a_failing_receiver_is_retried_and_given_up_after_its_attempts() {
    let app = app_with_receiver(&secret()).await;
    let b = booking_business(&app, "?fail_first=2", "").await;
    say(
        &app,
        &b,
        "cy",
        "c1",
        "I want to book a cleaning, my name is Cy Young, on monday.",
    )
    .await;
    let rows = settled(&app).await;
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2),
        ("delivered", 3),
        "{rows:?}"
    );
    assert_eq!(app.mock.receiver.requests.load(Ordering::Relaxed), 3);

    let app = app_with_receiver(&secret()).await;
    let b = booking_business(&app, "?fail_first=100", "max_attempts = 3\n").await;
    say(
        &app,
        &b,
        "di",
        "d1",
        "I want to book a cleaning, my name is Di Prince, on monday.",
    )
    .await;
    let rows = settled(&app).await;
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2, rows[0].3),
        ("dead", 3, Some(500)),
        "{rows:?}"
    );
    assert_eq!(app.mock.receiver.requests.load(Ordering::Relaxed), 3);
    let error: Option<String> = app
        .db()
        .await
        .query_one("SELECT last_error FROM action_outbox", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(error.as_deref(), Some("the receiver answered 500"));
}

/// The receiver refuses a request signed with another key (401: final, `rejected`), and a
/// second booking of a taken slot gets its 409 kept as the row's answer.
#[tokio::test]
async fn a_wrong_signature_and_a_taken_slot_are_the_receivers_final_answers() {
    let app = app_with_receiver("not-the-key").await;
    let b = booking_business(&app, "", "").await;
    say(
        &app,
        &b,
        "eve",
        "e1",
        "I want to book a cleaning, my name is Eve Adams, on tuesday.",
    )
    .await;
    let rows = settled(&app).await;
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2, rows[0].3),
        ("rejected", 1, Some(401)),
        "{rows:?}"
    );
    assert_eq!(app.mock.receiver.bad_signatures.load(Ordering::Relaxed), 1);
    assert_eq!(app.mock.receiver.processed.load(Ordering::Relaxed), 0);

    let app = app_with_receiver(&secret()).await;
    let b = booking_business(&app, "", "").await;
    say(
        &app,
        &b,
        "fay",
        "f1",
        "I want to book a cleaning, my name is Fay Wray, on tuesday.",
    )
    .await;
    settled(&app).await;
    say(
        &app,
        &b,
        "gus",
        "g1",
        "I want to book a cleaning, my name is Gus Grant, on tuesday.",
    )
    .await;
    let rows = settled(&app).await;
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].1.as_str(), rows[0].3), ("delivered", Some(200)));
    assert_eq!((rows[1].1.as_str(), rows[1].3), ("rejected", Some(409)));
    assert!(
        rows[1]
            .4
            .as_deref()
            .is_some_and(|r| r.contains("slot taken")),
        "{rows:?}"
    );
    assert_eq!(app.mock.receiver.bookings.load(Ordering::Relaxed), 1);
    assert_eq!(app.mock.receiver.conflicts.load(Ordering::Relaxed), 1);
}

/// A dispatcher that claimed a row and died before sending it (the row written here as it
/// would have left it: one attempt counted, claimed for two more seconds): a running
/// dispatcher leaves it alone until the claim expires, then sends it once.
#[tokio::test]
async fn a_claim_left_by_a_dead_dispatcher_expires_and_the_row_is_sent_once() {
    let app = app_with_receiver(&secret()).await;
    let b = booking_business(&app, "", "").await;
    say(&app, &b, "hal", "h1", "Hello there").await;
    let business: uuid::Uuid = b.parse().expect("uuid");
    let url = format!("http://{}/webhooks/book_appointment", app.mock.addr);
    app.db()
        .await
        .execute(
            "INSERT INTO action_outbox (business_id, id, conversation_id, action, idempotency_key, \
             url, body, timeout_ms, max_attempts, attempts, claimed_until) \
             SELECT $1, gen_random_uuid(), c.id, 'book_appointment', 'left-by-a-dead-one', $2, \
             '{\"name\": \"Hal\", \"date\": \"monday\"}', 1000, 5, 1, now() + interval '2 seconds' \
             FROM conversations c WHERE c.business_id = $1",
            &[&business, &url],
        )
        .await
        .expect("a claimed row");
    let started = std::time::Instant::now();
    let rows = settled(&app).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "sent before the claim expired: {:?}",
        started.elapsed()
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2),
        ("delivered", 2),
        "{rows:?}"
    );
    assert_eq!(app.mock.receiver.requests.load(Ordering::Relaxed), 1);
}

/// An operator lists a dead request, sends it again with `icmp actions retry` once the
/// receiver works (it is delivered, and the slot booked once), and cancels a pending one with
/// `icmp actions cancel` (never sent).
#[tokio::test]
async fn an_operator_retries_a_dead_request_and_cancels_a_pending_one() {
    let app = app_with_receiver(&secret()).await;
    // Two failures, then the receiver works: with two attempts the request dies first.
    let b = booking_business(&app, "?fail_first=2", "max_attempts = 2\n").await;
    say(
        &app,
        &b,
        "ivy",
        "i1",
        "I want to book a cleaning, my name is Ivy Lee, on monday.",
    )
    .await;
    let rows = settled(&app).await;
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("dead", 2), "{rows:?}");
    let icmp = |args: &[&str]| {
        let out = crate::processes::icmp(&app.config)
            .args(args)
            .output()
            .expect("icmp");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = icmp(&["actions", "list", "--status", "dead", "--json"]);
    let dead: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(dead.len(), 1, "{listed}");
    let id = dead[0]["id"].as_str().expect("id").to_owned();
    assert_eq!(dead[0]["last_error"], "the receiver answered 500");
    assert!(icmp(&["actions", "retry", &id]).contains("sent again: 1 of 1"));
    let rows = settled(&app).await;
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2),
        ("delivered", 3),
        "{rows:?}"
    );
    assert_eq!(app.mock.receiver.bookings.load(Ordering::Relaxed), 1);
    // A delivered request is never sent again.
    assert!(icmp(&["actions", "retry", &id]).contains("sent again: 0 of 1"));

    // A request waiting (5 s) for its next attempt is cancelled and not sent again.
    let slow = spawn_app_with(
        MockOptions {
            webhook_secret: Some(secret()),
            ..MockOptions::default()
        },
        |c| {
            c.actions.poll_ms = 100;
            c.actions.retry_initial_ms = 5_000;
        },
    )
    .await;
    let b = booking_business(&slow, "?fail_first=100", "").await;
    say(
        &slow,
        &b,
        "jo",
        "j1",
        "I want to book a cleaning, my name is Jo March, on monday.",
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while outbox(&slow).await.first().is_none_or(|r| r.3.is_none()) {
        assert!(tokio::time::Instant::now() < deadline, "the first attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id: String = slow
        .db()
        .await
        .query_one("SELECT id::text FROM action_outbox", &[])
        .await
        .expect("row")
        .get(0);
    let out = crate::processes::icmp(&slow.config)
        .args(["actions", "cancel", &id])
        .output()
        .expect("icmp");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled: 1 of 1"));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rows = outbox(&slow).await;
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2),
        ("cancelled", 1),
        "{rows:?}"
    );
    assert_eq!(
        slow.mock.receiver.requests.load(Ordering::Relaxed),
        1,
        "nothing sent after the first attempt"
    );
}

/// kill -9 of a worker process while its request is in flight (the receiver did the work and
/// hangs): another process sends the request again once the dead one's claim expires, with
/// the same key; the receiver answers it from its first answer and books once.
#[tokio::test]
async fn a_worker_killed_mid_request_leaves_it_to_another_and_the_slot_is_booked_once() {
    let mut app = app_with_receiver(&secret()).await;
    app.stop_workers().await;
    let b = booking_business(&app, "?hang_first=1&hang_ms=60000", "timeout_ms = 30000\n").await;
    let env = [
        ("ICMP__ACTIONS__POLL_MS", "100"),
        ("ICMP__ACTIONS__RETRY_INITIAL_MS", "50"),
        ("ICMP__ACTIONS__CLAIM_HOLD_MS", "3000"),
    ];
    let mut first = crate::processes::WorkerProcess::spawn(&app.config, "act-1", &env);
    say(
        &app,
        &b,
        "kim",
        "k1",
        "I want to book a cleaning, my name is Kim Lee, on monday.",
    )
    .await;
    let r = &app.mock.receiver;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while r.processed.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first request arrives"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill9();
    let _second = crate::processes::WorkerProcess::spawn(&app.config, "act-2", &env);
    let rows = settled(&app).await;
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2),
        ("delivered", 2),
        "{rows:?}"
    );
    assert_eq!(r.requests.load(Ordering::Relaxed), 2);
    assert_eq!(r.processed.load(Ordering::Relaxed), 1);
    assert_eq!(r.repeats.load(Ordering::Relaxed), 1);
    assert_eq!(r.bookings.load(Ordering::Relaxed), 1);
}

/// An action's follow-up: a message of its own, rendered from the booking's answer.
pub(crate) const FOLLOW_UP: &str = "follow_up = \"\"\"{% if result.ok %}Your cleaning is booked for \
    {{ request.date }} (booking {{ result.response?.booking_id }}).{% else %}We could not book \
    {{ request.date }}: our front desk will call you.{% endif %}\"\"\"\n";

/// Waits until `n` follow-ups of message `id` are published, then a while longer (past the
/// sweep that publishes left-over follow-ups) so that a second one would show; returns them.
pub(crate) async fn follow_ups(
    app: &TestApp,
    id: &str,
    n: usize,
) -> Vec<std::collections::HashMap<String, String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.follow_ups_of(id).await.len() < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    app.follow_ups_of(id).await
}

/// A booking's answer reaches the conversation: its follow-up is published once, after the
/// reply, with a `reply_id` of its own, and stored as the conversation's next assistant
/// message; the next message's prompt sees `actions.book_appointment` and the follow-up in its
/// history; the firing message sent again fires nothing and publishes no second follow-up.
#[tokio::test]
async fn a_result_reaches_later_templates_and_its_follow_up_is_published_once_after_the_reply() {
    let app = app_with_receiver(&secret()).await;
    let b = booking_business(&app, "", FOLLOW_UP).await;
    say(
        &app,
        &b,
        "ada",
        "a1",
        "I want to book a cleaning, my name is Ada Lovelace, on friday.",
    )
    .await;
    let sent = follow_ups(&app, "a1", 1).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    let f = &sent[0];
    assert_eq!(
        f["content"],
        "Your cleaning is booked for friday (booking bk-1)."
    );
    assert_eq!(f["action"], "book_appointment");
    let reply = app.reply("a1").await;
    assert_ne!(f["reply_id"], reply["reply_id"]);
    assert_eq!(f["conversation_id"], reply["conversation_id"]);
    // After the reply in the stream.
    let order: Vec<String> = app
        .outbound_entries()
        .await
        .into_iter()
        .filter(|e| e["message_id"] == "a1")
        .map(|e| e["status"].clone())
        .collect();
    assert_eq!(order, ["ok", "follow_up"]);
    // Stored: the conversation's third message, and its result.
    let conversation: uuid::Uuid = reply["conversation_id"].parse().expect("uuid");
    let rows = app
        .db()
        .await
        .query(
            "SELECT role, content, id::text FROM messages WHERE conversation_id = $1 ORDER BY seq",
            &[&conversation],
        )
        .await
        .expect("messages");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2].get::<_, String>(0), "assistant");
    assert_eq!(rows[2].get::<_, String>(1), f["content"]);
    assert_eq!(rows[2].get::<_, String>(2), f["reply_id"]);
    let status: String = app
        .db()
        .await
        .query_one(
            "SELECT actions->'book_appointment'->>'status' FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .expect("conversation")
        .get(0);
    assert_eq!(status, "delivered");
    // The next message sees the result and the follow-up.
    say(
        &app,
        &b,
        "ada",
        "a2",
        "Can I book a cleaning for my daughter too?",
    )
    .await;
    let prompt: String = app
        .db()
        .await
        .query_one(
            "SELECT l.prompt FROM llm_calls l JOIN messages m ON m.id = l.message_id \
             WHERE m.idempotency_key = 'a2' AND l.purpose = 'response'",
            &[],
        )
        .await
        .expect("the response call")
        .get(0);
    assert!(prompt.contains("Booking: delivered bk-1"), "{prompt}");
    assert!(
        prompt.contains("(booking bk-1)"),
        "the follow-up is in the history: {prompt}"
    );
    // The firing message again: its stored answer, no second request or follow-up.
    app.send_to(
        &b,
        "ada",
        "a1",
        "I want to book a cleaning, my name is Ada Lovelace, on friday.",
    )
    .await;
    assert_eq!(app.wait_replies("a1", 2).await.len(), 2);
    assert_eq!(follow_ups(&app, "a1", 2).await.len(), 1);
    assert_eq!(app.mock.receiver.requests.load(Ordering::Relaxed), 1);
}

/// A dispatcher that stored a follow-up and stopped before publishing it (a dead booking's
/// "we could not book"): two running workers' sweeps publish it once; publishing it again
/// publishes nothing.
#[tokio::test]
async fn a_follow_up_left_unpublished_is_published_once_by_the_sweeps() {
    let mut app = app_with_receiver(&secret()).await;
    app.start_worker("w1").await;
    app.failpoints
        .enable(icmp::pipeline::failpoint::ACTION_SETTLED_STOP);
    let b = booking_business(
        &app,
        "?fail_first=100",
        &format!("max_attempts = 2\n{FOLLOW_UP}"),
    )
    .await;
    say(
        &app,
        &b,
        "bo",
        "b1",
        "I want to book a cleaning, my name is Bo Diddley, on monday.",
    )
    .await;
    let rows = settled(&app).await;
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("dead", 2), "{rows:?}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        app.follow_ups_of("b1").await.len(),
        0,
        "stopped before publishing"
    );
    let stored = app
        .count(
            "SELECT count(*) FROM action_outbox WHERE follow_up_id IS NOT NULL \
             AND follow_up_published_at IS NULL",
            &[],
        )
        .await;
    assert_eq!(stored, 1);
    app.failpoints
        .disable(icmp::pipeline::failpoint::ACTION_SETTLED_STOP);
    let sent = follow_ups(&app, "b1", 1).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0]["content"],
        "We could not book monday: our front desk will call you."
    );
    let conversation: uuid::Uuid = sent[0]["conversation_id"].parse().expect("uuid");
    let status: String = app
        .db()
        .await
        .query_one(
            "SELECT actions->'book_appointment'->>'status' FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .expect("conversation")
        .get(0);
    assert_eq!(status, "dead");
    // Published again (as a process would after an ambiguous failure): nothing.
    let business: uuid::Uuid = b.parse().expect("uuid");
    let id: uuid::Uuid = app
        .db()
        .await
        .query_one("SELECT id FROM action_outbox", &[])
        .await
        .expect("row")
        .get(0);
    app.db()
        .await
        .execute(
            "UPDATE action_outbox SET follow_up_published_at = NULL",
            &[],
        )
        .await
        .expect("unmark");
    let f = app
        .store
        .follow_up(business, id)
        .await
        .expect("read")
        .expect("a follow-up");
    let again = icmp::actions::follow_up::publish(&app.redis, &app.config.streams, &f)
        .await
        .expect("publish");
    assert_eq!(again, icmp::stream::once::Published::Before);
    assert_eq!(follow_ups(&app, "b1", 2).await.len(), 1);
}

/// The console lists requests with a count per status and shows one (its error, answer and
/// follow-up, escaped); Retry needs the token, sends a dead request again (delivered, booked
/// once), and its new end sends a new follow-up.
#[tokio::test]
async fn the_console_shows_a_dead_request_and_a_signed_in_operator_retries_it() {
    use crate::console::{TOKEN, spawn_console};
    let app = app_with_receiver(&secret()).await;
    let b = booking_business(
        &app,
        "?fail_first=2",
        &format!("max_attempts = 2\n{FOLLOW_UP}"),
    )
    .await;
    say(
        &app,
        &b,
        "kit",
        "k1",
        "I want to book a cleaning, my name is Kit Carson, on monday.",
    )
    .await;
    let rows = settled(&app).await;
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("dead", 2), "{rows:?}");
    assert_eq!(follow_ups(&app, "k1", 1).await.len(), 1);
    let id: uuid::Uuid = app
        .db()
        .await
        .query_one("SELECT id FROM action_outbox", &[])
        .await
        .expect("row")
        .get(0);
    let base = spawn_console(&app, Some(TOKEN)).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let list = http
        .get(format!("{base}/actions?status=dead"))
        .send()
        .await
        .expect("list")
        .text()
        .await
        .expect("body");
    assert!(list.contains("1 request(s) shown; dead: 1"), "{list}");
    assert!(list.contains(&format!("/actions/{id}")), "{list}");
    let page = http
        .get(format!("{base}/actions/{id}"))
        .send()
        .await
        .expect("show")
        .text()
        .await
        .expect("body");
    assert!(page.contains("the receiver answered 500"), "{page}");
    assert!(page.contains("We could not book monday"), "{page}");
    assert!(
        page.contains("&quot;name&quot;: &quot;Kit"),
        "the body, escaped: {page}"
    );
    assert!(
        !page.contains(r#"id="retry""#),
        "not signed in: no Retry button"
    );
    // Without the token: refused, nothing changes.
    let r = http
        .post(format!("{base}/actions/{id}/retry"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(settled(&app).await[0].1, "dead");
    // With it: sent again, delivered (the receiver works by now), booked once.
    let r = http
        .post(format!("{base}/actions/{id}/retry"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], format!("/actions/{id}").as_str());
    let rows = settled(&app).await;
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2),
        ("delivered", 3),
        "{rows:?}"
    );
    assert_eq!(app.mock.receiver.bookings.load(Ordering::Relaxed), 1);
    let sent = follow_ups(&app, "k1", 2).await;
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        sent[1]["content"].starts_with("Your cleaning is booked for monday"),
        "{sent:?}"
    );
    assert_ne!(sent[0]["reply_id"], sent[1]["reply_id"]);
    // A delivered request cannot be retried.
    let r = http
        .post(format!("{base}/actions/{id}/retry"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 404);
}

/// The demo clinic as `scripts/demo` runs it (its booking lines on): a message that completes
/// the booking gets its reply, then the booking's confirmation on the same `reply_to` stream,
/// as `icmp send --follow-ups-secs` prints them; a second patient asking for the same day is
/// told the slot is taken.
#[tokio::test]
async fn the_demo_clinic_books_and_confirms_as_scripts_demo_shows() {
    let app = app_with_receiver(&secret()).await;
    let b = uuid::Uuid::new_v4().to_string();
    let mut edits = helpers::demo_booking_edits(&app.mock.addr.to_string());
    edits.push((
        "ICMP_DEMO_WEBHOOK_SECRET",
        "ICMP_TEST_WEBHOOK_SECRET".to_owned(),
    ));
    let edits: Vec<(&str, &str)> = edits.iter().map(|(f, t)| (*f, t.as_str())).collect();
    helpers::import_demo_copy(&app.config, &b, &edits).await;
    let send = |user: &str, text: &str| icmp::producer::Outgoing {
        business_id: b.clone(),
        user_id: user.to_owned(),
        content: text.to_owned(),
        ..Default::default()
    };
    let got = icmp::producer::exchange(
        &app.redis,
        &app.config.streams,
        &send(
            "cleo",
            "I want to book a cleaning, my name is Cleo Park, on friday",
        ),
        Duration::from_secs(30),
        Duration::from_secs(30),
    )
    .await
    .expect("a reply");
    assert_eq!(got.reply["status"], "ok", "{got:?}");
    assert_eq!(got.follow_ups.len(), 1, "{got:?}");
    assert_eq!(
        got.follow_ups[0]["content"],
        "Your appointment is booked for friday (booking bk-1). See you then!"
    );
    let got = icmp::producer::exchange(
        &app.redis,
        &app.config.streams,
        &send(
            "dan",
            "I want to book a cleaning, my name is Dan Fox, on friday",
        ),
        Duration::from_secs(30),
        Duration::from_secs(30),
    )
    .await
    .expect("a reply");
    assert_eq!(
        got.follow_ups[0]["content"],
        "We could not book friday (slot taken): our front desk will call you to find another time."
    );
    let r = &app.mock.receiver;
    assert_eq!(r.bad_signatures.load(Ordering::Relaxed), 0);
    assert_eq!(r.bookings.load(Ordering::Relaxed), 1);
    assert_eq!(r.conflicts.load(Ordering::Relaxed), 1);
}

/// An action whose `handoff_on` names its result hands the conversation to a person: a taken
/// slot (409, `rejected`) sends the patient to the front desk; the agents are told once, and the
/// patient's next message is theirs (status `handoff`, no LLM call).
#[tokio::test]
async fn a_result_its_action_names_hands_the_conversation_to_a_person() {
    let app = app_with_receiver(&secret()).await;
    let b = booking_business(&app, "", "handoff_on = [\"rejected\", \"dead\"]\n").await;
    say(
        &app,
        &b,
        "fay",
        "f1",
        "I want to book a cleaning, my name is Fay Wray, on tuesday.",
    )
    .await;
    settled(&app).await;
    say(
        &app,
        &b,
        "gus",
        "g1",
        "I want to book a cleaning, my name is Gus Grant, on tuesday.",
    )
    .await;
    let rows = settled(&app).await;
    assert_eq!(
        (rows[0].1.as_str(), rows[1].1.as_str()),
        ("delivered", "rejected")
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let started = loop {
        let e = app.entries(&app.config.handoff.agents).await;
        if !e.is_empty() || tokio::time::Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.entries(&app.config.handoff.agents).await.len(),
        1,
        "{started:?}"
    );
    assert_eq!(
        (
            started[0]["kind"].as_str(),
            started[0]["by"].as_str(),
            started[0]["user_id"].as_str()
        ),
        ("started", "action:book_appointment", "gus")
    );
    app.send_to(&b, "gus", "g2", "Hello? Is another day possible?")
        .await;
    assert_eq!(app.reply("g2").await["status"], "handoff");
    app.send_to(&b, "fay", "f2", "Thanks, see you tuesday")
        .await;
    assert_ne!(
        app.reply("f2").await["status"],
        "handoff",
        "fay's booking went through"
    );
}

/// A follow-up waits while the message that fired its action is unfinished: pending in its
/// group, or (after an operator's `XGROUP DELCONSUMER` took it off the pending list) still in
/// its user's order queue, where the claim put it and where only its finish or the sweep takes
/// it out.
#[tokio::test]
async fn a_follow_up_waits_for_its_message_even_when_its_consumer_was_deleted() {
    async fn waits(app: &TestApp, f: &icmp::store::outbox::FollowUp) -> bool {
        icmp::actions::follow_up::firing_message_pending(
            &app.redis,
            &app.config.streams,
            &app.config.redis.key_prefix,
            f,
        )
        .await
        .expect("check")
    }
    let mut app = helpers::spawn_env(MockOptions::default(), |_| {}).await;
    let streams = app.streams("held").await;
    streams.ensure_group().await.expect("group");
    let id = app.send("fu-user", "fu1", "I want to book").await;
    let (_, claimed) = streams.claim_new(10).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    let f = icmp::store::outbox::FollowUp {
        business_id: helpers::DEMO_BUSINESS.parse().expect("uuid"),
        outbox_id: uuid::Uuid::nil(),
        conversation_id: uuid::Uuid::nil(),
        action: "book".into(),
        user_id: "fu-user".into(),
        reply_to: None,
        reply_id: uuid::Uuid::nil(),
        text: String::new(),
        stage: String::new(),
        message_key: "fu1".into(),
        inbound_id: Some(id.clone()),
        traceparent: None,
        tracestate: None,
    };
    assert!(waits(&app, &f).await, "pending: it waits");
    let consumer = app.consumer_config("held").streams.consumer;
    let shard = app.config.streams.shard(0);
    let _: i64 = redis::cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(&shard.inbound)
        .arg(&shard.group)
        .arg(&consumer)
        .query_async(&mut app.redis.clone())
        .await
        .expect("delconsumer");
    assert_eq!(app.pending().await, 0, "off the pending list");
    assert!(waits(&app, &f).await, "still in its queue: it waits");
    // A worker's sweep settles the orphaned entry and empties its queue: the follow-up may go.
    app.start_worker("w").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while waits(&app, &f).await {
        assert!(tokio::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
