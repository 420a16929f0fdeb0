//! The pipeline's three phases, each run alone: the read phase (and that a continuing
//! conversation's needs no PostgreSQL), the LLM phase's decisions with their call records, and
//! the write phase's committed state.

use icmp::config::RedactedUrl;
use icmp::definitions::{StageService, TemplateService};
use icmp::llm::mock::MockOptions;
use icmp::model::Role;
use icmp::pipeline::llm_call::LlmCaller;
use icmp::pipeline::{Failpoints, decide, persist, read};
use icmp::protocol::InboundMessage;
use icmp::retry::RetryPolicy;
use icmp::startup::Dependencies;
use icmp::store::Store;
use uuid::Uuid;

use crate::helpers::{DEMO_BUSINESS, spawn_app, spawn_env};

fn message(user: &str, id: &str, content: &str) -> InboundMessage {
    InboundMessage {
        inbound_id: format!("{id}-entry"),
        message_id: Some(id.to_owned()),
        business_id: DEMO_BUSINESS.parse().expect("uuid"),
        user_id: user.to_owned(),
        content: content.to_owned(),
        conversation_id: None,
        metadata: None,
        reply_to: None,
        supersedes: None,
    }
}

#[tokio::test]
async fn a_continuing_conversations_read_phase_needs_no_postgres() {
    let app = spawn_app(MockOptions::default()).await;
    app.send("rhea", "r1", "Hello there").await;
    let first = app.reply("r1").await;
    // The business in Redis: the worker's copy may have been dropped again (a copy loaded
    // while its definitions watch connects may predate a change), so it is loaded here.
    StageService::new(app.store.clone(), app.cache.clone())
        .business(DEMO_BUSINESS.parse().expect("uuid"))
        .await
        .expect("business");
    // A store whose server does not exist: any query would fail.
    let mut config = app.config.clone();
    config.database.url = RedactedUrl::new("postgres://nobody@127.0.0.1:9/nowhere".to_owned());
    config.database.connect_timeout_ms = 200;
    config.database.pool_wait_timeout_ms = 200;
    let unreachable = Store::connect(&config.database).expect("store");
    let stages = StageService::new(unreachable.clone(), app.cache.clone());
    let business = stages
        .business(DEMO_BUSINESS.parse().expect("uuid"))
        .await
        .expect("business from the cache");
    let sources = read::Sources {
        store: &unreachable,
        cache: &app.cache,
        stages: &stages,
        history_turns: app.config.worker.history_turns,
    };
    let msg = message("rhea", "r2", "And on Saturday?");
    let read = read::read(sources, &msg, &business, false)
        .await
        .expect("served from Redis alone");
    assert_eq!(read.conversation.id.to_string(), first["conversation_id"]);
    assert!(!read.is_new);
    let history = &read.context.history;
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].role, Role::User);
    assert_eq!(history[0].content, "Hello there");
    assert_eq!(history[1].content, first["content"]);
    // After a conflict the phase reads PostgreSQL (here: fails), never the cache.
    assert!(read::read(sources, &msg, &business, true).await.is_err());
    app.stop().await;
}

#[tokio::test]
async fn the_three_phases_run_alone_and_hand_over_typed_results() {
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    // The phases connect as a worker does: under its role, row-level security applying.
    let deps = Dependencies::connect(&app.config).await.expect("connect");
    let stages = StageService::new(deps.store.clone(), deps.cache.clone());
    let templates = TemplateService::new(deps.store.clone(), deps.cache.clone());
    let business = stages
        .business(DEMO_BUSINESS.parse().expect("uuid"))
        .await
        .expect("business");
    let msg = message(
        "sam",
        "s1",
        "I'd like to book a cleaning, my name is Sam Stone",
    );

    // Read: a new conversation in the initial stage.
    let sources = read::Sources {
        store: &deps.store,
        cache: &deps.cache,
        stages: &stages,
        history_turns: 20,
    };
    let mut read = read::read(sources, &msg, &business, false)
        .await
        .expect("read");
    assert!(read.is_new);
    assert_eq!(read.stage.name, "welcome");

    // Decide: selection moves to booking, extraction learns the name, the response is
    // written; one call record per step, in order.
    let llm = icmp::startup::llm(&app.config).await.expect("client");
    let retry = RetryPolicy::new(app.config.retry.clone());
    let deciders = decide::LlmPhase {
        caller: LlmCaller {
            llm: &llm,
            retry: &retry,
            default_model: &app.config.llm.default_model,
            fallback_after: None,
            capture_content: false,
        },
        templates: &templates,
        stages: &stages,
        last_resort: "sorry",
        reply_id: uuid::Uuid::now_v7(),
        partials: None,
        extraction_limits: icmp::pipeline::extract::Limits::from_config(&app.config.limits),
    };
    let mut decisions = decide::decide(&deciders, &business, &mut read)
        .await
        .expect("decide");
    assert_eq!(decisions.stage.name, "booking");
    assert_eq!(
        decisions.transition,
        Some((read.stage.id, decisions.stage.id))
    );
    assert_eq!(decisions.learned["name"], "Sam Stone");
    assert_eq!(decisions.response.status, icmp::model::AnswerStatus::Ok);
    let purposes: Vec<&str> = decisions.calls.iter().map(|c| c.purpose).collect();
    assert_eq!(purposes, ["selection", "extraction", "response"]);
    assert_eq!(
        read.context.extracted["name"], "Sam Stone",
        "the context follows"
    );

    // Write: one transaction; the committed state comes back from the database.
    let failpoints = Failpoints::default();
    let sinks = persist::Sinks {
        store: &deps.store,
        cache: &deps.cache,
        retry: &retry,
        failpoints: &failpoints,
        history_turns: 20,
        committer: None,
    };
    let committed = persist::write(sinks, &msg, &[], &read, &mut decisions, Uuid::now_v7(), 1)
        .await
        .expect("write");
    assert_eq!(committed.state.conversation.version, 1);
    assert_eq!(committed.state.conversation.stage_id, decisions.stage.id);
    assert_eq!(committed.state.history.len(), 2);
    assert_eq!(committed.state.extracted["name"], "Sam Stone");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE idempotency_key = 's1'",
            &[]
        )
        .await,
        2
    );
    assert_eq!(app.count("SELECT count(*) FROM llm_calls", &[]).await, 3);
    assert_eq!(
        app.count("SELECT count(*) FROM stage_transitions", &[])
            .await,
        1
    );
}

#[tokio::test]
async fn cached_state_is_one_value_used_only_at_its_window_and_a_repeat_drops_it() {
    let app = spawn_app(MockOptions::default()).await;
    app.send("cora", "c1", "Hello there").await;
    let first = app.reply("c1").await;
    let business: Uuid = DEMO_BUSINESS.parse().expect("uuid");
    let conv: Uuid = first["conversation_id"].parse().expect("conversation id");
    let cache = &app.cache;
    let state = cache
        .get_state(business, "cora")
        .await
        .expect("redis")
        .expect("cached");
    assert_eq!(state.conversation.id, conv);
    assert_eq!(state.conversation.version, 1);
    assert_eq!(state.window, app.config.worker.history_turns);
    assert_eq!(state.history.len(), 2, "the user's turn and the reply");

    // The cached window is what the next prompt sees: a marker planted in it shows up.
    let mut planted = state.clone();
    planted.history[0].content = "MARKER-CACHED-WINDOW".into();
    cache.set_state(&planted).await.expect("redis");
    app.send("cora", "c2", "And Saturday?").await;
    assert_eq!(
        app.reply("c2").await["conversation_id"],
        first["conversation_id"]
    );
    assert!(prompts_containing(&app, "MARKER-CACHED-WINDOW").await > 0);

    // A window cut to another length is not used: the history comes from PostgreSQL.
    let mut other = cache
        .get_state(business, "cora")
        .await
        .expect("redis")
        .expect("cached");
    other.history[0].content = "MARKER-OTHER-WINDOW".into();
    other.window += 1;
    cache.set_state(&other).await.expect("redis");
    app.send("cora", "c3", "Or Sunday?").await;
    assert_eq!(
        app.reply("c3").await["conversation_id"],
        first["conversation_id"]
    );
    assert_eq!(prompts_containing(&app, "MARKER-OTHER-WINDOW").await, 0);

    // A repeated message id that the cached state names is answered from the database, and
    // the state stays: it already holds that commit.
    let state = cache
        .get_state(business, "cora")
        .await
        .expect("redis")
        .expect("cached");
    assert_eq!(state.recent_keys, ["c1", "c2", "c3"]);
    app.send("cora", "c1", "Hello there").await;
    assert_eq!(app.wait_replies("c1", 2).await.len(), 2);
    assert_eq!(
        cache.get_state(business, "cora").await.expect("redis"),
        Some(state.clone())
    );
    // A state that does not name a committed key (it predates that commit, say a crash came
    // between the commit and the cache write): the repeat is caught when its write set
    // commits, answered from the database, and the state is dropped.
    let mut forgetful = state.clone();
    forgetful.recent_keys.clear();
    cache.set_state(&forgetful).await.expect("redis");
    app.send("cora", "c2", "And Saturday?").await;
    assert_eq!(app.wait_replies("c2", 2).await.len(), 2);
    assert!(
        cache
            .get_state(business, "cora")
            .await
            .expect("redis")
            .is_none()
    );
    // The next message reads PostgreSQL and continues the same conversation.
    app.send("cora", "c4", "Monday then").await;
    assert_eq!(
        app.reply("c4").await["conversation_id"],
        first["conversation_id"]
    );
    let state = cache
        .get_state(business, "cora")
        .await
        .expect("redis")
        .expect("cached again");
    assert_eq!(
        (state.conversation.id, state.conversation.version),
        (conv, 4)
    );
    app.stop().await;
}

async fn prompts_containing(app: &crate::helpers::TestApp, marker: &str) -> i64 {
    app.count(
        "SELECT count(*) FROM llm_calls WHERE position($1 in prompt) > 0",
        &[&marker],
    )
    .await
}
