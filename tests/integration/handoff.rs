//! Human handoff: a stage, an action's result or an operator hands a conversation to a person;
//! the user's messages then go to the agents' stream, one entry each, and are each answered
//! once (status `handoff`) without an LLM call; agents' answers are stored (role `agent`) and
//! published to the user once each, in their order, across desk restarts; `end` gives the
//! conversation back to the bot with the agents' turns in its history; a handoff nobody
//! answers gets the timeout reply once. Counted at the streams and in the tables.

use std::collections::HashMap;
use std::time::Duration;

use icmp::llm::mock::MockOptions;
use uuid::Uuid;

use crate::helpers::{self, TestApp, spawn_app_with};

const WAITING: &str = "A colleague has your message.";
const TIMED_OUT: &str = "Sorry, nobody is free right now; we will write as soon as we can.";

async fn app() -> TestApp {
    spawn_app_with(MockOptions::default(), |c| {
        c.handoff.poll_ms = 50;
        c.handoff.lease_ms = 2_000;
    })
    .await
}

/// The edits of the demo that add a `human` stage (handoff) the welcome stage may move to,
/// with `reply` while a person has the conversation and no timeout.
pub fn human_stage_edits(reply: &str) -> Vec<(&'static str, String)> {
    human_stage_edits_with(reply, 0)
}

fn human_stage_edits_with(reply: &str, timeout_ms: u64) -> Vec<(&'static str, String)> {
    vec![
        (
            "initial_stage = \"welcome\"\n",
            format!(
                "initial_stage = \"welcome\"\n\n[business.handoff]\nreply = \"{reply}\"\n\
                 timeout_ms = {timeout_ms}\ntimeout_reply = \"{TIMED_OUT}\"\n"
            ),
        ),
        (
            "transitions = [\"booking\", \"farewell\"]",
            "transitions = [\"booking\", \"farewell\", \"human\"]".to_owned(),
        ),
        (
            "[[templates]]\nname = \"select_stage\"",
            "[[stages]]\nname = \"human\"\ndescription = \"A person answers.\"\n\
             response_template = \"welcome_reply\"\nhandoff = true\n\
             transitions = [\"welcome\"]\n\n[[templates]]\nname = \"select_stage\""
                .to_owned(),
        ),
    ]
}

/// A demo copy with the `human` stage and a handoff reply; `timeout_ms` 0: no timeout.
/// Returns its id.
async fn business(app: &TestApp, timeout_ms: u64) -> String {
    let id = Uuid::new_v4().to_string();
    let edits = human_stage_edits_with(WAITING, timeout_ms);
    let edits: Vec<(&str, &str)> = edits.iter().map(|(f, t)| (*f, t.as_str())).collect();
    helpers::import_demo_copy(&app.config, &id, &edits).await;
    id
}

/// The agents' stream.
async fn agents(app: &TestApp) -> Vec<HashMap<String, String>> {
    app.entries(&app.config.handoff.agents).await
}

/// Waits until the agents' stream holds `n` entries, then a little longer (so that one more
/// would show); returns them.
async fn wait_agents(app: &TestApp, n: usize) -> Vec<HashMap<String, String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while agents(app).await.len() < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    agents(app).await
}

/// Entries on the outbound stream of `status`, in stream order.
async fn outbound_of(app: &TestApp, status: &str) -> Vec<HashMap<String, String>> {
    app.outbound_entries()
        .await
        .into_iter()
        .filter(|e| e["status"] == status)
        .collect()
}

/// Waits until `n` outbound entries have `status`, then a little longer; returns them.
async fn wait_outbound(app: &TestApp, status: &str, n: usize) -> Vec<HashMap<String, String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while outbound_of(app, status).await.len() < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    outbound_of(app, status).await
}

/// An agent's answer on the agent-replies stream.
async fn agent_says(app: &TestApp, fields: &[(&str, &str)]) {
    let fields: Vec<(&str, &[u8])> = fields.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    app.xadd_on(&app.config.handoff.agent_replies, &fields)
        .await;
}

/// Sends a message and waits for its reply.
async fn say(app: &TestApp, b: &str, user: &str, key: &str, text: &str) -> HashMap<String, String> {
    app.send_to(b, user, key, text).await;
    app.reply(key).await
}

/// Hands `user`'s conversation over through the `human` stage; returns the conversation id.
async fn handed_over(app: &TestApp, b: &str, user: &str) -> String {
    let r = say(app, b, user, &format!("{user}-h0"), "Hello").await;
    assert_eq!(r["status"], "ok");
    let r = say(
        app,
        b,
        user,
        &format!("{user}-h1"),
        "I want to talk to a human please",
    )
    .await;
    assert_eq!(
        (r["status"].as_str(), r["stage"].as_str()),
        ("ok", "human"),
        "{r:?}"
    );
    r["conversation_id"].clone()
}

#[tokio::test]
async fn a_stage_hands_over_and_each_later_message_reaches_the_agents_once_answered_once() {
    let app = app().await;
    let b = business(&app, 0).await;
    let conversation = handed_over(&app, &b, "ann").await;
    let started = wait_agents(&app, 1).await;
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(
        (
            started[0]["kind"].as_str(),
            started[0]["message_id"].as_str()
        ),
        ("started", "ann-h1")
    );
    assert_eq!(started[0]["by"], "stage:human");
    assert_eq!(
        started[0]["transcript"],
        format!("/conversations/{conversation}")
    );
    for (key, text) in [
        ("ann-h2", "Are you there?"),
        ("ann-h3", "I need to move my booking"),
    ] {
        let r = say(&app, &b, "ann", key, text).await;
        assert_eq!(
            (r["status"].as_str(), r["content"].as_str()),
            ("handoff", WAITING),
            "{r:?}"
        );
    }
    // The same message again: its stored answer, and no second entry for the agents.
    app.send_to(&b, "ann", "ann-h2", "Are you there?").await;
    let twice = app.wait_replies("ann-h2", 2).await;
    assert_eq!(twice.len(), 2);
    assert_eq!(twice[0]["reply_id"], twice[1]["reply_id"]);
    let entries = wait_agents(&app, 3).await;
    let got: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["kind"].as_str(),
                e["message_id"].as_str(),
                e["content"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("started", "ann-h1", "I want to talk to a human please"),
            ("message", "ann-h2", "Are you there?"),
            ("message", "ann-h3", "I need to move my booking"),
        ]
    );
    // Stored, without an LLM call.
    let calls = app
        .count(
            "SELECT count(*) FROM llm_calls l JOIN messages m ON m.id = l.message_id \
             WHERE m.idempotency_key IN ('ann-h2', 'ann-h3')",
            &[],
        )
        .await;
    assert_eq!(calls, 0);
    let rows = app
        .count(
            "SELECT count(*) FROM messages WHERE idempotency_key IN ('ann-h2', 'ann-h3')",
            &[],
        )
        .await;
    assert_eq!(rows, 4, "a user row and an acknowledgement each");
}

#[tokio::test]
async fn agents_answers_reach_the_user_once_each_in_order_across_desk_restarts_and_end_gives_back()
{
    let mut app = app().await;
    let b = business(&app, 0).await;
    let conversation = handed_over(&app, &b, "bo").await;
    let agent = |key: &'static str, text: &'static str| {
        [
            ("business_id", b.clone()),
            ("conversation_id", conversation.clone()),
            ("agent_id", "ann".to_owned()),
            ("message_id", key.to_owned()),
            ("text", text.to_owned()),
        ]
    };
    let send = async |app: &TestApp, fields: [(&'static str, String); 5], end: bool| {
        let mut f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if end {
            f.push(("end", "true"));
        }
        agent_says(app, &f).await;
    };
    send(&app, agent("a1", "Hi Bo, Ann here."), false).await;
    send(&app, agent("a2", "Which day suits you?"), false).await;
    send(&app, agent("a1", "Hi Bo, Ann here."), false).await;
    let answers = wait_outbound(&app, "agent", 2).await;
    let texts: Vec<&str> = answers.iter().map(|e| e["content"].as_str()).collect();
    assert_eq!(texts, ["Hi Bo, Ann here.", "Which day suits you?"]);
    assert_eq!(answers[0]["agent_id"], "ann");
    assert_eq!(answers[0]["message_id"], "a1");
    // Every desk stops; an answer waits; a new process's desk takes it.
    app.stop_workers().await;
    send(&app, agent("a3", "Thursday at 9 is free."), false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outbound_of(&app, "agent").await.len(), 2);
    app.start_worker("w1").await;
    let answers = wait_outbound(&app, "agent", 3).await;
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[2]["content"], "Thursday at 9 is free.");
    // An answer to a conversation nobody handed over: refused on the agents' stream.
    agent_says(
        &app,
        &[
            ("business_id", b.as_str()),
            ("conversation_id", &Uuid::new_v4().to_string()),
            ("agent_id", "ann"),
            ("message_id", "x1"),
            ("text", "Hello?"),
        ],
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let error = loop {
        if let Some(e) = agents(&app)
            .await
            .into_iter()
            .find(|e| e["kind"] == "error")
        {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "no error entry");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(error["error_code"], "handoff.unknown_conversation");
    assert_eq!(error["message_id"], "x1");
    // The last answer ends the handoff: back to the bot, in the initial stage.
    send(&app, agent("a4", "See you Thursday, Bo!"), true).await;
    assert_eq!(wait_outbound(&app, "agent", 4).await.len(), 4);
    let r = say(&app, &b, "bo", "bo-h9", "What are your opening hours?").await;
    assert_eq!(
        (r["status"].as_str(), r["stage"].as_str()),
        ("ok", "welcome"),
        "{r:?}"
    );
    let prompt: String = app
        .db()
        .await
        .query_one(
            "SELECT l.prompt FROM llm_calls l JOIN messages m ON m.id = l.message_id \
             WHERE m.idempotency_key = 'bo-h9' AND l.purpose = 'response'",
            &[],
        )
        .await
        .expect("the response call")
        .get(0);
    assert!(
        prompt.contains("See you Thursday, Bo!"),
        "the agent's turns: {prompt}"
    );
    let agent_rows = app
        .count("SELECT count(*) FROM messages WHERE role = 'agent'", &[])
        .await;
    assert_eq!(agent_rows, 4, "one row per answer");
}

#[tokio::test]
async fn a_handoff_nobody_answers_gets_the_timeout_reply_once() {
    let app = app().await;
    let b = business(&app, 300).await;
    let conversation = handed_over(&app, &b, "cy").await;
    let sent = wait_outbound(&app, "handoff", 1).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sent: Vec<_> = sent
        .into_iter()
        .chain(outbound_of(&app, "handoff").await)
        .filter(|e| e["content"] == TIMED_OUT)
        .map(|e| e["reply_id"].clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(sent.len(), 1, "one timeout reply");
    let conversation: Uuid = conversation.parse().expect("uuid");
    let state: serde_json::Value = app
        .db()
        .await
        .query_one(
            "SELECT handoff FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .expect("row")
        .get::<_, tokio_postgres::types::Json<serde_json::Value>>(0)
        .0;
    assert_eq!(state["timed_out"], true, "{state}");
    assert_eq!(state["timeout_published"], true, "{state}");
    let stored = app
        .count(
            "SELECT count(*) FROM messages WHERE status = 'handoff_timeout'",
            &[],
        )
        .await;
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn an_operator_hands_a_conversation_over_and_gives_it_back() {
    let app = app().await;
    let b = business(&app, 0).await;
    let r = say(&app, &b, "di", "di-1", "Hello").await;
    let conversation: Uuid = r["conversation_id"].parse().expect("uuid");
    let config = &app.config.handoff;
    assert!(
        icmp::handoff::start_by_operator(&app.store, &app.cache, config, conversation)
            .await
            .expect("start")
    );
    assert!(
        !icmp::handoff::start_by_operator(&app.store, &app.cache, config, conversation)
            .await
            .expect("start again"),
        "already with a person"
    );
    let started = wait_agents(&app, 1).await;
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["by"], "operator");
    let r = say(&app, &b, "di", "di-2", "Is someone there?").await;
    assert_eq!(r["status"], "handoff");
    assert!(
        icmp::handoff::end_by_operator(&app.store, &app.cache, conversation)
            .await
            .expect("end")
    );
    let r = say(&app, &b, "di", "di-3", "Hello again").await;
    assert_eq!(r["status"], "ok", "the bot answers again: {r:?}");
    assert_eq!(wait_agents(&app, 2).await.len(), 2, "started, and di-2");
}

/// A signed-in operator hands a conversation over and gives it back from the console; without
/// the token nothing changes; `/handoffs` lists it meanwhile.
#[tokio::test]
async fn a_signed_in_operator_hands_over_and_gives_back_from_the_console() {
    use crate::console::{TOKEN, spawn_console};
    let app = app().await;
    let b = business(&app, 0).await;
    let r = say(&app, &b, "eve", "eve-1", "Hello").await;
    let conversation = r["conversation_id"].clone();
    let base = spawn_console(&app, Some(TOKEN)).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let page = |auth: bool| {
        let mut req = http.get(format!("{base}/conversations/{conversation}"));
        if auth {
            req = req.bearer_auth(TOKEN);
        }
        async move { req.send().await.expect("get").text().await.expect("body") }
    };
    assert!(
        !page(false).await.contains(r#"id="hand-over""#),
        "not signed in"
    );
    assert!(page(true).await.contains(r#"id="hand-over""#));
    let post = |path: &'static str, auth: bool| {
        let mut req = http.post(format!("{base}/conversations/{conversation}/{path}"));
        if auth {
            req = req.bearer_auth(TOKEN);
        }
        async move { req.send().await.expect("post") }
    };
    assert_eq!(post("handoff", false).await.status().as_u16(), 403);
    assert_eq!(
        say(&app, &b, "eve", "eve-2", "Still the bot?").await["status"],
        "ok"
    );
    let r = post("handoff", true).await;
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(
        r.headers()["location"],
        format!("/conversations/{conversation}").as_str()
    );
    let shown = page(true).await;
    assert!(shown.contains("With a person since"), "{shown}");
    assert!(shown.contains(r#"id="give-back""#), "{shown}");
    let list = http
        .get(format!("{base}/handoffs"))
        .send()
        .await
        .expect("list")
        .text()
        .await
        .expect("body");
    assert!(list.contains("1 conversation(s) with a person"), "{list}");
    assert!(list.contains(&conversation), "{list}");
    assert_eq!(
        say(&app, &b, "eve", "eve-3", "Hello?").await["status"],
        "handoff"
    );
    assert_eq!(
        post("handoff", true).await.status().as_u16(),
        404,
        "already with a person"
    );
    assert_eq!(post("give-back", true).await.status().as_u16(), 303);
    assert_eq!(
        say(&app, &b, "eve", "eve-4", "Hello again").await["status"],
        "ok"
    );
    assert_eq!(wait_agents(&app, 2).await.len(), 2, "started, and eve-3");
}

/// An answer that can never be delivered (the user's reply stream is a key of another type)
/// is refused and acknowledged: the answers behind it, to another user, still flow.
#[tokio::test]
async fn an_answer_that_cannot_be_delivered_is_refused_and_holds_up_nothing_behind_it() {
    let app = app().await;
    let b = business(&app, 0).await;
    let first = handed_over(&app, &b, "fox").await;
    let second = handed_over(&app, &b, "gil").await;
    // fox's next message asks its reply on a stream of its own, which then holds a string.
    let reply_to = format!("{}fox-private", app.config.streams.reply_prefix);
    let inbound = app.config.streams.for_fields(&b, "fox").inbound;
    app.xadd_on(
        &inbound,
        &[
            ("business_id", b.as_bytes()),
            ("user_id", b"fox"),
            ("message_id", b"fox-h2"),
            ("content", b"Anyone?"),
            ("reply_to", reply_to.as_bytes()),
        ],
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.entries(&reply_to).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no reply to fox-h2");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _: () = redis::AsyncCommands::del(&mut app.redis.clone(), &reply_to)
        .await
        .expect("del");
    let _: () = redis::AsyncCommands::set(&mut app.redis.clone(), &reply_to, "not a stream")
        .await
        .expect("set");
    for (conversation, key) in [(&first, "f1"), (&second, "g1")] {
        agent_says(
            &app,
            &[
                ("business_id", b.as_str()),
                ("conversation_id", conversation.as_str()),
                ("agent_id", "ann"),
                ("message_id", key),
                ("text", "Ann here."),
            ],
        )
        .await;
    }
    let delivered = wait_outbound(&app, "agent", 1).await;
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0]["message_id"], "g1");
    let refused: Vec<_> = agents(&app)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "error")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["error_code"], "handoff.refused");
    assert_eq!(refused[0]["message_id"], "f1");
}

/// A handoff whose `started` entry did not get through (the process stopped, Redis failed):
/// the desk's sweep tells the agents, once, and notes it.
#[tokio::test]
async fn a_handoff_the_agents_were_not_told_of_is_told_by_the_sweep_once() {
    let app = app().await;
    let b = business(&app, 0).await;
    let r = say(&app, &b, "hal", "hal-1", "Hello").await;
    let conversation: Uuid = r["conversation_id"].parse().expect("uuid");
    let business: Uuid = b.parse().expect("uuid");
    // Started as a process would, which then stopped before telling anyone.
    let state = icmp::model::HandoffState::starting("operator".into(), None, 0);
    app.store
        .start_handoff(business, conversation, &state)
        .await
        .expect("start")
        .expect("a conversation without a person");
    app.cache
        .invalidate_conversation(business, "hal")
        .await
        .expect("invalidate");
    let told = wait_agents(&app, 1).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(agents(&app).await.len(), 1, "{told:?}");
    assert_eq!(
        (told[0]["kind"].as_str(), told[0]["by"].as_str()),
        ("started", "operator")
    );
    let flag: serde_json::Value = app
        .db()
        .await
        .query_one(
            "SELECT handoff -> 'told' FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .expect("row")
        .get::<_, tokio_postgres::types::Json<serde_json::Value>>(0)
        .0;
    assert_eq!(flag, serde_json::json!(true));
}
