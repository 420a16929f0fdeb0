//! History that fits: the turns a template puts in its prompt are bounded by tokens
//! (`context_tokens`), and older turns are folded into a rolling summary made after the reply
//! by the business's `summary` template (`[business.history]`).

use std::time::Duration;

use icmp::llm::mock::MockOptions;

use crate::helpers::{self, TestApp, spawn_app_with};

/// Imports a demo copy with `edits`; returns its id.
async fn business(app: &TestApp, edits: &[(&str, &str)]) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    helpers::import_demo_copy(&app.config, &id, edits).await;
    id
}

/// The history lines (`user: …`, `assistant: …`) of a prompt.
pub(crate) fn history_lines(prompt: &str) -> Vec<&str> {
    prompt
        .lines()
        .filter(|l| l.starts_with("user: ") || l.starts_with("assistant: "))
        .collect()
}

/// Sends `text` as `key` and waits for its final reply.
async fn say(app: &TestApp, business: &str, user: &str, key: &str, text: &str) {
    app.send_to(business, user, key, text).await;
    let reply = app.reply(key).await;
    assert_eq!(reply["status"], "ok", "{reply:?}");
}

const WELCOME: &str = "name = \"welcome_reply\"\n";

/// The demo edit that turns summaries on: the `summarize` template after `after_tokens`,
/// keeping the newest `keep` turns.
pub(crate) fn summarizing(after_tokens: u32, keep: u32) -> (&'static str, String) {
    (
        "initial_stage = \"welcome\"\n",
        format!(
            "initial_stage = \"welcome\"\n\n[business.history]\nsummary_template = \"summarize\"\n\
             summarize_after_tokens = {after_tokens}\nkeep_turns = {keep}\n"
        ),
    )
}

/// The welcome reply keeps only the newest turns within its 40 tokens (one of the mock's
/// answers, about 30 tokens, fits; the user's message before it would not), while the
/// selection template, bounded by the default `llm.context_tokens`, sees every turn.
#[tokio::test]
async fn a_templates_history_is_bounded_by_its_context_tokens() {
    let app = spawn_app_with(MockOptions::default(), |_| {}).await;
    let id = business(
        &app,
        &[(WELCOME, "name = \"welcome_reply\"\ncontext_tokens = 40\n")],
    )
    .await;
    let texts = [
        "Tell me about the first thing you offer, in a few words.",
        "Tell me about the second thing you offer, in a few words.",
        "Tell me about the third thing you offer, in a few words.",
        "And what about the fourth thing you offer, in a few words?",
    ];
    for (i, text) in texts.iter().enumerate() {
        say(&app, &id, "ola", &format!("h{i}"), text).await;
    }
    let response = app.prompt_of("h3", "response").await;
    let lines = history_lines(&response);
    assert_eq!(lines.len(), 1, "{response}");
    assert!(
        lines[0].starts_with("assistant: ") && lines[0].contains("third"),
        "{response}"
    );
    let selection = app.prompt_of("h3", "selection").await;
    assert_eq!(history_lines(&selection).len(), 6, "{selection}");
}

/// Summaries with 100 tokens of history before a summary and two turns kept: each exchange
/// here takes about 45 tokens, so the third reply folds the first two exchanges, the fifth the
/// next two (with the first summary). Each summary is one call of purpose `summary`, after the
/// reply, saved with the last message it covers; the next prompt has the summary and only the
/// turns after it.
#[tokio::test]
async fn older_turns_are_folded_into_a_rolling_summary_after_the_reply() {
    let app = spawn_app_with(MockOptions::default(), |_| {}).await;
    let (from, to) = summarizing(100, 2);
    let id = business(&app, &[(from, &to)]).await;
    let texts = [
        "ALPHA is my first question about your clinic.",
        "BRAVO is my second question about your clinic.",
        "CHARLIE is my third question about your clinic.",
        "DELTA is my fourth question about your clinic.",
        "ECHO is my fifth question about your clinic.",
        "FOXTROT is my sixth question about your clinic.",
    ];
    let summary_of = async |app: &TestApp| -> (String, i64, i64) {
        let row = app
            .db()
            .await
            .query_one(
                "SELECT c.summary, c.summarized_seq, \
                 (SELECT count(*) FROM llm_calls k WHERE k.conversation_id = c.id \
                  AND k.purpose = 'summary' AND k.message_id IS NULL AND k.outcome = 'ok') \
                 FROM conversations c JOIN users u ON u.id = c.user_id WHERE u.external_id = 'pat'",
                &[],
            )
            .await
            .expect("conversation");
        (row.get(0), row.get(1), row.get(2))
    };
    let wait_for = async |app: &TestApp, calls: i64| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let now = summary_of(app).await;
            if now.2 >= calls || tokio::time::Instant::now() > deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    say(&app, &id, "pat", "s0", texts[0]).await;
    say(&app, &id, "pat", "s1", texts[1]).await;
    assert_eq!(summary_of(&app).await, (String::new(), 0, 0));
    say(&app, &id, "pat", "s2", texts[2]).await;
    let (first, upto, calls) = wait_for(&app, 1).await;
    assert_eq!((upto, calls), (4, 1), "{first}");
    assert_eq!(
        first,
        format!("Summary: {}; {}", texts[0], texts[1]),
        "the mock lists the user's folded lines"
    );
    // The next prompt: the summary, then only the turns after it.
    say(&app, &id, "pat", "s3", texts[3]).await;
    let prompt = app.prompt_of("s3", "response").await;
    assert!(
        prompt.contains(&format!("Earlier in this conversation: {first}")),
        "{prompt}"
    );
    let lines = history_lines(&prompt);
    assert_eq!(lines.len(), 2, "{prompt}");
    assert!(lines[0].contains("CHARLIE"), "{prompt}");
    assert!(!prompt.contains("user: ALPHA"), "{prompt}");
    assert_eq!(
        wait_for(&app, 1).await.2,
        1,
        "90 tokens since: no summary yet"
    );
    say(&app, &id, "pat", "s4", texts[4]).await;
    let (second, upto, calls) = wait_for(&app, 2).await;
    assert_eq!((upto, calls), (8, 2), "{second}");
    let summary_prompt: String = app
        .db()
        .await
        .query_one(
            "SELECT prompt FROM llm_calls WHERE purpose = 'summary' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .expect("call")
        .get(0);
    assert!(
        summary_prompt.contains(&format!("Earlier summary: {first}")),
        "{summary_prompt}"
    );
    assert!(
        second.contains("CHARLIE") && second.contains("DELTA"),
        "{second}"
    );
    say(&app, &id, "pat", "s5", texts[5]).await;
    let prompt = app.prompt_of("s5", "response").await;
    assert!(prompt.contains(&second), "{prompt}");
    // Every message answered once, stored once; the summaries are not messages.
    assert_eq!(app.count("SELECT count(*) FROM messages", &[]).await, 12);
}

/// A summary call that fails changes nothing and holds nothing up: every message is answered,
/// the conversation keeps no summary and its history, and no summary call is recorded.
#[tokio::test]
async fn a_failing_summary_changes_nothing_and_replies_go_on() {
    let app = spawn_app_with(MockOptions::default(), |_| {}).await;
    let (from, to) = summarizing(10, 0);
    let id = business(&app, &[(from, &to)]).await;
    for i in 0..4 {
        say(
            &app,
            &id,
            "quin",
            &format!("x{i}"),
            &format!("FAIL-SUMMARY number {i}"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (summary, upto): (String, i64) = {
        let row = app
            .db()
            .await
            .query_one("SELECT summary, summarized_seq FROM conversations", &[])
            .await
            .expect("conversation");
        (row.get(0), row.get(1))
    };
    assert_eq!((summary.as_str(), upto), ("", 0));
    assert_eq!(
        app.count(
            "SELECT count(*) FROM llm_calls WHERE purpose = 'summary'",
            &[]
        )
        .await,
        0
    );
    let prompt = app.prompt_of("x3", "response").await;
    assert_eq!(history_lines(&prompt).len(), 6, "{prompt}");
}
