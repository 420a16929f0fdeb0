//! The message pipeline end to end: a worker on real PostgreSQL and Redis with the mock LLM.

use icmp::llm::mock::MockOptions;
use icmp::pipeline::failpoint;
use uuid::Uuid;

use crate::helpers::{self, DEMO_BUSINESS, TestApp, spawn_app, spawn_app_with};

async fn messages_with_key(app: &TestApp, key: &str) -> i64 {
    app.count(
        "SELECT count(*) FROM messages WHERE idempotency_key = $1",
        &[&key],
    )
    .await
}

#[tokio::test]
async fn a_new_conversation_is_created_and_answered() {
    let app = spawn_app(MockOptions::default()).await;
    app.send("alice", "m1", "Hello, are you open on Saturday?")
        .await;
    let reply = app.reply("m1").await;
    assert_eq!(reply["status"], "ok");
    assert_eq!(reply["status_code"], "200");
    assert_eq!(reply["stage"], "welcome");
    assert_eq!(reply["business_id"], DEMO_BUSINESS);
    assert_eq!(reply["user_id"], "alice");
    assert!(
        reply["content"].contains("are you open on Saturday?"),
        "{}",
        reply["content"]
    );
    let conv: Uuid = reply["conversation_id"].parse().expect("conversation id");
    assert_eq!(
        app.count("SELECT count(*) FROM conversations WHERE id = $1", &[&conv])
            .await,
        1
    );
    assert_eq!(messages_with_key(&app, "m1").await, 2);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM users WHERE external_id = 'alice'",
            &[]
        )
        .await,
        1
    );
    // The LLM calls are logged with their template version, tokens and latency.
    let calls = app
        .count(
            "SELECT count(*) FROM llm_calls WHERE conversation_id = $1 AND outcome = 'ok' \
             AND template_version = 1 AND prompt_tokens > 0",
            &[&conv],
        )
        .await;
    assert_eq!(calls, 2, "selection and response");
    app.stop().await;
}

#[tokio::test]
async fn a_second_message_continues_with_the_first_turn_in_the_history() {
    let app = spawn_app(MockOptions::default()).await;
    app.send("bob", "b1", "What are your opening hours?").await;
    let first = app.reply("b1").await;
    app.xadd(&[
        ("business_id", DEMO_BUSINESS.as_bytes()),
        ("user_id", b"bob"),
        ("message_id", b"b2"),
        ("conversation_id", first["conversation_id"].as_bytes()),
        ("content", b"And where are you?"),
    ])
    .await;
    let second = app.reply("b2").await;
    assert_eq!(second["conversation_id"], first["conversation_id"]);
    let conv: Uuid = first["conversation_id"].parse().expect("uuid");
    let prompt: String = app
        .db()
        .await
        .query_one(
            "SELECT c.prompt FROM llm_calls c JOIN messages m ON m.id = c.message_id \
             WHERE c.conversation_id = $1 AND c.purpose = 'response' AND m.idempotency_key = 'b2'",
            &[&conv],
        )
        .await
        .expect("response call")
        .get(0);
    assert!(
        prompt.contains("user: What are your opening hours?"),
        "{prompt}"
    );
    assert!(
        prompt.contains(&format!("assistant: {}", first["content"])),
        "{prompt}"
    );
    let version: i64 = app
        .db()
        .await
        .query_one("SELECT version FROM conversations WHERE id = $1", &[&conv])
        .await
        .expect("conv")
        .get(0);
    assert_eq!(version, 2);
    app.stop().await;
}

#[tokio::test]
async fn selection_moves_the_stage_and_updates_the_cache() {
    let app = spawn_app(MockOptions::default()).await;
    app.send("carol", "c1", "I would like to book an appointment")
        .await;
    let reply = app.reply("c1").await;
    assert_eq!(reply["stage"], "booking");
    let conv: Uuid = reply["conversation_id"].parse().expect("uuid");
    let row = app
        .db()
        .await
        .query_one(
            "SELECT f.name, t.name FROM stage_transitions st \
             JOIN stages f ON f.id = st.from_stage_id JOIN stages t ON t.id = st.to_stage_id \
             WHERE st.conversation_id = $1",
            &[&conv],
        )
        .await
        .expect("one transition");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("welcome".into(), "booking".into())
    );
    let booking: Uuid = app
        .db()
        .await
        .query_one(
            "SELECT current_stage_id FROM conversations WHERE id = $1",
            &[&conv],
        )
        .await
        .expect("conv")
        .get(0);
    let business: Uuid = DEMO_BUSINESS.parse().expect("uuid");
    let cached = app
        .cache
        .get_state(business, "carol")
        .await
        .expect("redis")
        .expect("cached")
        .conversation;
    assert_eq!(cached.stage_id, booking);
    assert_eq!(cached.version, 1);
    // The booking stage's templates were used after the change (step 7).
    let purposes: Vec<String> = app
        .db()
        .await
        .query(
            "SELECT purpose FROM llm_calls WHERE conversation_id = $1 ORDER BY created_at, id",
            &[&conv],
        )
        .await
        .expect("calls")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(purposes, ["selection", "extraction", "response"]);
    app.stop().await;
}

#[tokio::test]
async fn extraction_is_stored_and_merged_across_turns() {
    let app = spawn_app(MockOptions::default()).await;
    app.send(
        "dave",
        "d1",
        "I want to book a visit, my name is Dave Miller",
    )
    .await;
    let first = app.reply("d1").await;
    assert!(
        first["content"].contains("date and reason"),
        "{}",
        first["content"]
    );
    app.send("dave", "d2", "Could it be on 2026-12-03 for a cleaning?")
        .await;
    let second = app.reply("d2").await;
    assert_eq!(second["conversation_id"], first["conversation_id"]);
    assert!(
        second["content"].contains("you're booked"),
        "{}",
        second["content"]
    );
    let conv: Uuid = first["conversation_id"].parse().expect("uuid");
    let rows = app
        .db()
        .await
        .query("SELECT field, value #>> '{}' FROM extracted_data WHERE conversation_id = $1 ORDER BY field", &[&conv])
        .await
        .expect("data");
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        [
            ("date".to_owned(), "2026-12-03".to_owned()),
            ("name".to_owned(), "Dave Miller".to_owned()),
            ("reason".to_owned(), "cleaning".to_owned())
        ]
    );
    let business: Uuid = DEMO_BUSINESS.parse().expect("uuid");
    let state = app
        .cache
        .get_state(business, "dave")
        .await
        .expect("redis")
        .expect("cached state");
    assert_eq!(state.conversation.id, conv);
    let cached = state.extracted;
    assert_eq!(cached.len(), 3);
    assert_eq!(cached["name"], "Dave Miller");
    app.stop().await;
}

#[tokio::test]
async fn a_fault_inside_the_write_phase_leaves_no_row_and_no_cache_key() {
    let app = spawn_app(MockOptions::default()).await;
    app.send("erin", "e1", "Hi! I want to book, my name is Erin Hale")
        .await;
    let first = app.reply("e1").await;
    let conv: Uuid = first["conversation_id"].parse().expect("uuid");
    let business: Uuid = DEMO_BUSINESS.parse().expect("uuid");
    let state_key = app.cache.state_key(business, "erin");
    assert!(app.key_exists(&state_key).await);

    app.failpoints.enable(failpoint::BEFORE_COMMIT);
    app.send("erin", "e2", "On friday for a checkup").await;
    let failed = app.reply("e2").await;
    assert_eq!(failed["status"], "error");
    assert_eq!(failed["error_code"], "db.injected_fault");
    assert_eq!(failed["status_code"], "500");
    assert_eq!(messages_with_key(&app, "e2").await, 0);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM extracted_data WHERE field IN ('date', 'reason')",
            &[]
        )
        .await,
        0
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM llm_calls WHERE conversation_id = $1",
            &[&conv]
        )
        .await,
        3
    );
    assert_eq!(
        app.count("SELECT version FROM conversations WHERE id = $1", &[&conv])
            .await,
        1
    );
    assert!(
        !app.key_exists(&state_key).await,
        "the state must be cleared"
    );
    let dead = app.entries(&app.config.streams.dead_letter).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["message_id"], "e2");

    // The conversation carries on once the fault is gone.
    app.failpoints.disable(failpoint::BEFORE_COMMIT);
    app.send("erin", "e3", "On friday for a checkup").await;
    assert_eq!(app.reply("e3").await["status"], "ok");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM extracted_data WHERE conversation_id = $1",
            &[&conv]
        )
        .await,
        3
    );
    app.stop().await;
}

#[tokio::test]
async fn every_bad_input_gets_its_error_code_and_writes_nothing() {
    let app = spawn_app(MockOptions::default()).await;
    // A conversation of another user, to be refused.
    app.send("owner", "own1", "hello").await;
    let owned = app.reply("own1").await["conversation_id"].clone();
    let rows_before = app.count("SELECT count(*) FROM messages", &[]).await;
    let big = vec![b'x'; app.config.limits.max_content_bytes + 1];
    let big_meta = format!(
        "{{\"k\": \"{}\"}}",
        "y".repeat(app.config.limits.max_metadata_bytes)
    );
    let unknown_business = Uuid::new_v4().to_string();
    let biz = DEMO_BUSINESS.as_bytes();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a [u8])>, &'a str, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "x1",
            vec![("user_id", b"u"), ("content", b"hi")],
            "validation.missing_field",
            "400",
        ),
        (
            "x2",
            vec![
                ("business_id", b"not-a-uuid"),
                ("user_id", b"u"),
                ("content", b"hi"),
            ],
            "validation.invalid_field",
            "400",
        ),
        (
            "x3",
            vec![
                ("business_id", unknown_business.as_bytes()),
                ("user_id", b"u"),
                ("content", b"hi"),
            ],
            "validation.unknown_business",
            "404",
        ),
        (
            "x4",
            vec![
                ("business_id", biz),
                ("user_id", b"intruder"),
                ("conversation_id", owned.as_bytes()),
                ("content", b"hi"),
            ],
            "validation.unknown_conversation",
            "404",
        ),
        (
            "x5",
            vec![("business_id", biz), ("user_id", b"u"), ("content", b"   ")],
            "validation.empty_content",
            "400",
        ),
        (
            "x6",
            vec![("business_id", biz), ("user_id", b"u"), ("content", &big)],
            "validation.content_too_large",
            "422",
        ),
        (
            "x7",
            vec![
                ("business_id", biz),
                ("user_id", b"u"),
                ("content", &[0xc3, 0x28, 0xff]),
            ],
            "validation.invalid_utf8",
            "400",
        ),
        (
            "x8",
            vec![
                ("business_id", biz),
                ("user_id", b"u"),
                ("content", b"hi"),
                ("metadata", b"{not json"),
            ],
            "validation.invalid_metadata",
            "400",
        ),
        (
            "x9",
            vec![
                ("business_id", biz),
                ("user_id", b"u"),
                ("content", b"hi"),
                ("metadata", big_meta.as_bytes()),
            ],
            "validation.metadata_too_large",
            "422",
        ),
        (
            "x10",
            vec![
                ("business_id", biz),
                ("user_id", b"u"),
                ("content", b"hi"),
                ("reply_to", b"somebody:else"),
            ],
            "validation.reply_to_not_allowed",
            "400",
        ),
        (
            "x11",
            vec![("business_id", biz), ("content", b"hi")],
            "validation.missing_field",
            "400",
        ),
        (
            "x12",
            vec![
                ("business_id", biz),
                ("user_id", b"u"),
                ("content", b"hi"),
                ("conversation_id", b"123"),
            ],
            "validation.invalid_field",
            "400",
        ),
        (
            "x13",
            vec![
                ("business_id", biz),
                ("user_id", b"u"),
                ("content", b"hi"),
                (
                    "conversation_id",
                    Uuid::new_v4().to_string().into_bytes().leak(),
                ),
            ],
            "validation.unknown_conversation",
            "404",
        ),
    ];
    for (id, mut fields, _, _) in cases.clone() {
        fields.push(("message_id", id.as_bytes()));
        app.xadd(&fields).await;
    }
    for (id, _, code, status) in cases {
        let reply = app.reply(id).await;
        assert_eq!(reply["status"], "error", "{id}");
        assert_eq!(reply["error_code"], code, "{id}");
        assert_eq!(reply["status_code"], status, "{id}");
        assert!(!reply["error"].is_empty(), "{id}: a human message");
        assert!(reply["content"].is_empty(), "{id}");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM messages", &[]).await,
        rows_before
    );
    assert_eq!(app.count("SELECT count(*) FROM users", &[]).await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM conversations", &[]).await,
        1
    );
    assert!(
        app.entries(&app.config.streams.dead_letter)
            .await
            .is_empty()
    );
    // Every entry was acked.
    let pending: redis::streams::StreamPendingReply = redis::AsyncCommands::xpending(
        &mut app.redis.clone(),
        &app.config.streams.inbound,
        &app.config.streams.group,
    )
    .await
    .expect("xpending");
    assert_eq!(pending.count(), 0);
    app.stop().await;
}

#[tokio::test]
async fn odd_but_valid_content_is_stored_verbatim_and_never_run_as_a_template() {
    let app = spawn_app(MockOptions::default()).await;
    let odd = "{{ business.name }} {% if x %}y{% endif %} '; DROP TABLE messages; -- <b>bold</b> 😀 \\n \u{202e}";
    app.send("frank", "f1", odd).await;
    let reply = app.reply("f1").await;
    assert_eq!(reply["status"], "ok");
    let stored: String = app
        .db()
        .await
        .query_one(
            "SELECT content FROM messages WHERE idempotency_key = 'f1' AND role = 'user'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    assert_eq!(stored, odd);
    let prompt: String = app
        .db()
        .await
        .query_one(
            "SELECT prompt FROM llm_calls WHERE purpose = 'response'",
            &[],
        )
        .await
        .expect("call")
        .get(0);
    assert!(
        prompt.contains(odd),
        "the prompt carries the raw text: {prompt}"
    );
    assert!(
        reply["content"].contains("{{ business.name }}"),
        "{}",
        reply["content"]
    );
    app.stop().await;
}

#[tokio::test]
async fn a_failing_response_call_gives_the_fallback_reply() {
    let app = spawn_app(MockOptions {
        error_rate: 1.0,
        ..Default::default()
    })
    .await;
    app.send("gina", "g1", "Hello?").await;
    let reply = app.reply("g1").await;
    assert_eq!(reply["status"], "fallback");
    assert_eq!(
        reply["stage"], "welcome",
        "a failed selection keeps the stage"
    );
    assert!(
        reply["content"].starts_with("Thanks for writing to Sunny Smile Dental!"),
        "{}",
        reply["content"]
    );
    let row = app
        .db()
        .await
        .query_one("SELECT content, status FROM messages WHERE idempotency_key = 'g1' AND role = 'assistant'", &[])
        .await
        .expect("assistant row");
    assert_eq!(row.get::<_, String>(0), reply["content"]);
    assert_eq!(row.get::<_, String>(1), "fallback");
    // The stored reply names the fallback template and version it was rendered from.
    let explained = app
        .count(
            "SELECT count(*) FROM messages m JOIN stages s ON s.id = m.stage_id \
             JOIN templates t ON t.id = s.fallback_template_id \
             WHERE m.idempotency_key = 'g1' AND m.role = 'assistant' \
             AND m.fallback_template_id = t.id AND m.fallback_template_version = t.version",
            &[],
        )
        .await;
    assert_eq!(explained, 1, "fallback template recorded on the reply");
    let outcomes = app
        .count(
            // The breaker may open during the retries of the second call.
            "SELECT count(*) FROM llm_calls WHERE outcome IN ('llm.server_error', 'llm.circuit_open')",
            &[],
        )
        .await;
    assert_eq!(outcomes, 2, "selection and response failed and were logged");
    assert!(
        app.mock
            .stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            > 2,
        "retried"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_message_id_is_answered_once() {
    let app = spawn_app(MockOptions::default()).await;
    app.send("hank", "h1", "Hello").await;
    let first = app.reply("h1").await;
    app.send("hank", "h1", "Hello").await;
    let replies = app.wait_replies("h1", 2).await;
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[1]["content"], first["content"]);
    assert_eq!(replies[1]["log_id"], first["log_id"]);
    assert_eq!(messages_with_key(&app, "h1").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_repeat_older_than_the_cached_keys_is_caught_when_it_commits() {
    // The user's cached state remembers the keys of their latest 64 messages; a repeat of an
    // older one runs its LLM phase, and its write set meets the unique key: the stored answer
    // is published, and nothing is stored twice.
    let app = spawn_app(MockOptions::default()).await;
    let n = icmp::model::ConversationState::RECENT_KEYS + 2;
    let mut first = None;
    for i in 0..n {
        let id = format!("old-{i}");
        app.send("olga", &id, &format!("Hello number {i}")).await;
        let r = app.reply(&id).await;
        if i == 0 {
            first = Some(r);
        }
    }
    let first = first.expect("the first reply");
    let business: Uuid = DEMO_BUSINESS.parse().expect("uuid");
    let state = app
        .cache
        .get_state(business, "olga")
        .await
        .expect("redis")
        .expect("cached");
    assert!(!state.recent_keys.contains(&"old-0".to_owned()));
    assert_eq!(
        state.recent_keys.len(),
        icmp::model::ConversationState::RECENT_KEYS
    );

    let calls_before = app
        .mock
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    app.send("olga", "old-0", "Hello number 0").await;
    let replies = app
        .wait_all(
            &["old-0".to_owned()].into(),
            std::time::Duration::from_secs(30),
        )
        .await;
    let replies = &replies["old-0"];
    assert_eq!(replies.len(), 2, "one reply per inbound entry");
    assert_eq!(
        replies[1]["reply_id"], first["reply_id"],
        "the stored answer"
    );
    assert_eq!(replies[1]["content"], first["content"]);
    assert_eq!(
        messages_with_key(&app, "old-0").await,
        2,
        "nothing stored twice"
    );
    let assistant_rows = app
        .count(
            "SELECT count(*) FROM messages WHERE business_id = $1 AND role = 'assistant'",
            &[&business],
        )
        .await;
    assert_eq!(assistant_rows as usize, n);
    // It ran its LLM phase (the commit-time path, not the lookup), and none of those calls
    // was stored.
    let calls = app
        .mock
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(calls > calls_before, "the repeat reached the LLM");
    let stored_calls = app
        .count(
            "SELECT count(*) FROM llm_calls c JOIN messages m ON m.id = c.message_id \
             WHERE m.idempotency_key = 'old-0'",
            &[],
        )
        .await;
    let first_calls = app
        .count(
            "SELECT count(*) FROM llm_calls WHERE log_id = $1",
            &[&first["log_id"].parse::<Uuid>().expect("log id")],
        )
        .await;
    assert_eq!(stored_calls, first_calls, "only the first delivery's calls");
    // The user's next message continues the same conversation.
    app.send("olga", "after", "Thanks").await;
    assert_eq!(
        app.reply("after").await["conversation_id"],
        first["conversation_id"]
    );
    app.stop().await;
}

#[tokio::test]
async fn another_business_never_uses_this_business_templates_or_conversations() {
    let app = spawn_app(MockOptions::default()).await;
    let other = "5b0e8a7c-1111-4c1d-8e2f-000000000003";
    helpers::import_demo_copy(
        &app.config,
        other,
        &[("Sunny Smile Dental", "Northside Vet")],
    )
    .await;

    app.send("ivy", "i1", "hello").await;
    let demo_conv = app.reply("i1").await["conversation_id"].clone();
    // Same user name, other business, the demo business's conversation id: refused.
    app.xadd(&[
        ("business_id", other.as_bytes()),
        ("user_id", b"ivy"),
        ("message_id", b"i2"),
        ("conversation_id", demo_conv.as_bytes()),
        ("content", b"hello"),
    ])
    .await;
    assert_eq!(
        app.reply("i2").await["error_code"],
        "validation.unknown_conversation"
    );
    // Without a conversation id: a conversation of its own, rendered with its own templates.
    app.xadd(&[
        ("business_id", other.as_bytes()),
        ("user_id", b"ivy"),
        ("message_id", b"i3"),
        ("content", b"hello"),
    ])
    .await;
    let vet = app.reply("i3").await;
    assert_eq!(vet["status"], "ok");
    assert_ne!(vet["conversation_id"], demo_conv);
    let other_id: Uuid = other.parse().expect("uuid");
    let prompts: Vec<String> = app
        .db()
        .await
        .query("SELECT c.prompt FROM llm_calls c JOIN templates t ON t.id = c.template_id AND t.business_id = c.business_id WHERE c.business_id = $1", &[&other_id])
        .await
        .expect("calls")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(prompts.len(), 2);
    assert!(
        prompts
            .iter()
            .all(|p| p.contains("Northside Vet") && !p.contains("Sunny Smile")),
        "{prompts:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_selection_naming_an_unknown_stage_keeps_the_current_one() {
    // A business without a `booking` stage: the mock still answers {"stage": "booking"} to
    // "book", a name this business does not have.
    let app = spawn_app(MockOptions::default()).await;
    let other = "5b0e8a7c-1111-4c1d-8e2f-000000000004";
    helpers::import_demo_copy(
        &app.config,
        other,
        &[
            ("name = \"booking\"", "name = \"reservations\""),
            (
                "transitions = [\"booking\", \"farewell\"]",
                "transitions = [\"reservations\", \"farewell\"]",
            ),
            (
                "transitions = [\"welcome\", \"booking\"]",
                "transitions = [\"welcome\", \"reservations\"]",
            ),
        ],
    )
    .await;
    let before = unknown_stages_counted();

    app.xadd(&[
        ("business_id", other.as_bytes()),
        ("user_id", b"uma"),
        ("message_id", b"u1"),
        ("content", b"I want to book an appointment"),
    ])
    .await;
    let reply = app.reply("u1").await;
    assert_eq!(reply["status"], "ok");
    assert_eq!(reply["stage"], "welcome", "the unknown stage was not taken");
    assert_eq!(
        app.count("SELECT count(*) FROM stage_transitions", &[])
            .await,
        0
    );
    // The unknown name got one repair prompt naming the real stages; the model insisted.
    let calls: Vec<(String, String)> = app
        .db()
        .await
        .query(
            "SELECT output, outcome FROM llm_calls WHERE purpose = 'selection'",
            &[],
        )
        .await
        .expect("selection calls")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for (output, outcome) in &calls {
        assert_eq!(output, r#"{"stage":"booking"}"#);
        assert_eq!(outcome, "llm.invalid_output");
    }
    assert_eq!(
        app.count(
            "SELECT count(*) FROM llm_calls WHERE purpose = 'selection' \
             AND position('`booking` is not a stage; the stages are welcome, reservations, farewell' in prompt) > 0",
            &[]
        )
        .await,
        1,
        "the repair prompt names the problem"
    );
    assert!(
        unknown_stages_counted() > before,
        "counted in icmp_unknown_stages_total"
    );
    app.stop().await;
}

fn unknown_stages_counted() -> f64 {
    icmp::telemetry::metrics::install()
        .render()
        .lines()
        .find(|l| l.starts_with("icmp_unknown_stages_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_template_edited_in_sql_is_used_by_the_next_message_within_a_second() {
    let app = spawn_app(MockOptions::default()).await;
    let business: Uuid = DEMO_BUSINESS.parse().expect("uuid");
    app.send("gail", "g1", "Hello there").await;
    assert_eq!(app.reply("g1").await["status"], "ok");
    let (template, version) = response_template_of(&app, "g1").await;
    let key = app.cache.key("tmpl", template);
    assert!(
        app.key_exists(&key).await,
        "the template is cached in Redis"
    );

    // A direct SQL edit: no import, no cache command. The trigger's notification reaches the
    // worker, which drops its in-process copy and the Redis key.
    let edited = app
        .db()
        .await
        .execute(
            "UPDATE templates SET body = body || ' EDITED-IN-SQL', version = version + 1 \
             WHERE business_id = $1 AND id = $2",
            &[&business, &template],
        )
        .await
        .expect("update");
    assert_eq!(edited, 1);
    helpers::announce_sql_edit(&app, business).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(!app.key_exists(&key).await, "the Redis copy was dropped");

    app.send("hank", "h1", "Hello there").await;
    assert_eq!(app.reply("h1").await["status"], "ok");
    assert_eq!(
        response_template_of(&app, "h1").await,
        (template, version + 1)
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM llm_calls c JOIN messages m ON m.id = c.message_id \
             WHERE m.idempotency_key = 'h1' AND c.purpose = 'response' \
             AND position('EDITED-IN-SQL' in c.prompt) > 0",
            &[]
        )
        .await,
        1
    );
    app.stop().await;
}

/// The response template (id, version) the message with this key was answered with.
async fn response_template_of(app: &TestApp, key: &str) -> (Uuid, i32) {
    let row = app
        .db()
        .await
        .query_one(
            "SELECT c.template_id, c.template_version FROM llm_calls c \
             JOIN messages m ON m.id = c.message_id \
             WHERE m.idempotency_key = $1 AND m.role = 'user' AND c.purpose = 'response'",
            &[&key],
        )
        .await
        .expect("one response call");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn an_extraction_answer_beyond_the_limits_teaches_nothing_and_is_logged_with_its_code() {
    // The demo's extraction answers name and reason here: two fields, one more than allowed.
    let app = helpers::spawn_app_with(MockOptions::default(), |c| {
        c.limits.max_extracted_fields = 1;
    })
    .await;
    app.send(
        "xena",
        "x1",
        "I want to book a visit, my name is Xena Park, for a cleaning",
    )
    .await;
    let reply = app.reply("x1").await;
    assert_eq!(reply["status"], "ok", "the message is still answered");
    let conv: Uuid = reply["conversation_id"].parse().expect("uuid");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM extracted_data WHERE conversation_id = $1",
            &[&conv]
        )
        .await,
        0,
        "nothing learned from an oversized answer"
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM llm_calls WHERE conversation_id = $1 \
             AND purpose = 'extraction' AND outcome = 'llm.output_too_large'",
            &[&conv]
        )
        .await,
        2,
        "the answer and its repair, both too large"
    );
    app.stop().await;
}

/// (purpose, outcome) of every LLM call of the message with this key, sorted.
async fn calls_of(app: &TestApp, key: &str) -> Vec<(String, String)> {
    let mut calls: Vec<(String, String)> = app
        .db()
        .await
        .query(
            "SELECT c.purpose, c.outcome FROM llm_calls c JOIN messages m ON m.id = c.message_id \
             WHERE m.idempotency_key = $1 AND m.role = 'user'",
            &[&key],
        )
        .await
        .expect("calls")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    calls.sort();
    calls
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = list
        .iter()
        .map(|(p, o)| ((*p).to_owned(), (*o).to_owned()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn malformed_structured_output_gets_one_repair_then_degrades() {
    let app = spawn_app(MockOptions::default()).await;
    // Selection and extraction both answer prose first; the repair prompt gets JSON.
    app.send(
        "rita",
        "r1",
        "MALFORMED-ONCE: I want to book, my name is Rita Moreno",
    )
    .await;
    let reply = app.reply("r1").await;
    assert_eq!(reply["status"], "ok");
    assert_eq!(reply["stage"], "booking", "the repaired selection was used");
    assert_eq!(
        calls_of(&app, "r1").await,
        pairs(&[
            ("selection", "llm.invalid_output"),
            ("selection", "ok"),
            ("extraction", "llm.invalid_output"),
            ("extraction", "ok"),
            ("response", "ok"),
        ])
    );
    let conv: Uuid = reply["conversation_id"].parse().expect("uuid");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM extracted_data WHERE conversation_id = $1 \
             AND field = 'name' AND value #>> '{}' = 'Rita Moreno'",
            &[&conv]
        )
        .await,
        1,
        "the repaired extraction was stored"
    );
    let repair_prompts = app
        .count(
            "SELECT count(*) FROM llm_calls WHERE conversation_id = $1 \
             AND position('Your previous answer was not valid' in prompt) > 0",
            &[&conv],
        )
        .await;
    assert_eq!(
        repair_prompts, 2,
        "one repair per failed step, carrying the problem"
    );

    // Prose every time: one repair, then the step degrades as before.
    app.send("mal", "m1", "MALFORMED-ALWAYS: I want to book")
        .await;
    let reply = app.reply("m1").await;
    assert_eq!(reply["status"], "ok");
    assert_eq!(
        reply["stage"], "welcome",
        "no usable selection: the stage stays"
    );
    assert_eq!(
        calls_of(&app, "m1").await,
        pairs(&[
            ("selection", "llm.invalid_output"),
            ("selection", "llm.invalid_output"),
            ("response", "ok"),
        ])
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_changed_under_load_serves_every_later_message_and_no_earlier_one() {
    let app = spawn_app(MockOptions {
        latency_ms: 20,
        ..Default::default()
    })
    .await;
    // The change notification reaches the workers at once: a second covers it.
    template_edited_under_load(&app, "load", false, chrono::Duration::seconds(1)).await;
    app.stop().await;
}

/// The path without a change notification: every copy of the template (in-process, Redis)
/// must expire before the edit is seen, and the compiled form the worker remembers across
/// those reloads must never stand in for the edited record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_edited_unannounced_under_load_is_used_once_its_copies_expire_never_mixed() {
    let app = spawn_app_with(
        MockOptions {
            latency_ms: 20,
            ..Default::default()
        },
        |c| c.cache.definition_ttl_secs = 1,
    )
    .await;
    // In-process copies live a second, and may have been loaded from a Redis copy a second
    // old: three seconds cover both.
    template_edited_under_load(&app, "quiet", true, chrono::Duration::seconds(3)).await;
    assert!(
        app.count(
            "SELECT count(*) FROM messages WHERE role = 'assistant' AND template_version = 1 \
             AND idempotency_key LIKE 'quiet%'",
            &[],
        )
        .await
            > 0,
        "the old version served until its copies expired"
    );
    app.stop().await;
}

/// Sends ten messages every 100 ms from 40 users, all answered by `welcome_reply`, and edits
/// that template (its body and version) after the first 100, until a second past `settle`; with `unannounced`, the
/// edit is made with the change trigger off. Then checks every reply: it names version 1 or
/// 2, its prompt is that version's text, replies written before the edit have version 1 and
/// messages sent `settle` after it have version 2.
async fn template_edited_under_load(
    app: &TestApp,
    prefix: &str,
    unannounced: bool,
    settle: chrono::Duration,
) {
    let business: Uuid = DEMO_BUSINESS.parse().expect("uuid");
    let template: Uuid = app
        .db()
        .await
        .query_one(
            "SELECT id FROM templates WHERE business_id = $1 AND name = 'welcome_reply'",
            &[&business],
        )
        .await
        .expect("template")
        .get(0);
    let old: i32 = 1;
    let mut sent_at = std::collections::HashMap::new();
    let mut ids = std::collections::HashSet::new();
    let mut changed_at = None;
    // Ten batches a second: ten before the edit, and a second's worth past `settle`.
    let batches = 20 + 10 * settle.num_seconds();
    for batch in 0..batches {
        if batch == 10 {
            let db = app.db().await;
            // On Citus no trigger announces an edit in SQL: it is unannounced unless told.
            if unannounced && !helpers::on_test_citus() {
                db.batch_execute("ALTER TABLE templates DISABLE TRIGGER templates_changed")
                    .await
                    .expect("trigger off");
            }
            db.execute(
                "UPDATE templates SET body = body || ' (v2)', version = version + 1 \
                 WHERE id = $1",
                &[&template],
            )
            .await
            .expect("update");
            if !unannounced {
                helpers::announce_sql_edit(app, business).await;
            }
            changed_at = Some(chrono::Utc::now());
        }
        for i in 0..10 {
            let id = format!("{prefix}{batch}-{i}");
            app.send(&format!("u{}", (batch * 10 + i) % 40), &id, "Hello there")
                .await;
            sent_at.insert(id.clone(), chrono::Utc::now());
            ids.insert(id);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let changed_at = changed_at.expect("changed");
    let replies = app.wait_all(&ids, std::time::Duration::from_secs(60)).await;
    assert!(
        ids.iter().all(|id| replies[id].len() == 1),
        "one reply each"
    );

    let rows = app
        .db()
        .await
        .query(
            "SELECT m.idempotency_key, m.template_id, m.template_version, m.created_at, c.prompt \
             FROM messages m \
             JOIN messages u ON u.business_id = m.business_id \
               AND u.idempotency_key = m.idempotency_key AND u.role = 'user' \
             JOIN llm_calls c ON c.business_id = u.business_id AND c.message_id = u.id \
               AND c.purpose = 'response' AND c.template_version = m.template_version \
             WHERE m.business_id = $1 AND m.role = 'assistant' AND m.idempotency_key LIKE $2",
            &[&business, &format!("{prefix}%")],
        )
        .await
        .expect("rows");
    assert_eq!(
        rows.len(),
        ids.len(),
        "one answer and one response call each"
    );
    let (mut before, mut after) = (0, 0);
    for r in &rows {
        let key: String = r.get(0);
        let id: Option<Uuid> = r.get(1);
        let version: Option<i32> = r.get(2);
        let committed: chrono::DateTime<chrono::Utc> = r.get(3);
        let prompt: String = r.get(4);
        assert_eq!(id, Some(template), "{key}: every reply names its template");
        let version = version.expect("a version");
        assert!(
            version == old || version == old + 1,
            "{key}: version {version}"
        );
        assert_eq!(
            prompt.contains("(v2)"),
            version == old + 1,
            "{key}: the prompt is the text of the version it names ({version})"
        );
        if committed < changed_at {
            before += 1;
            assert_eq!(version, old, "{key} was written before the change");
        }
        if sent_at[&key] > changed_at + settle {
            after += 1;
            assert_eq!(version, old + 1, "{key} was sent well after the change");
        }
    }
    assert!(
        before > 0 && after > 0,
        "both sides measured: {before} / {after}"
    );
}
