//! `icmp console` against real PostgreSQL and Redis: the pages show what the operator commands
//! show, escape what users wrote, and replay or purge a dead letter only with the token.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use icmp::llm::mock::MockOptions;
use secrecy::SecretString;

use crate::helpers::{self, DEMO_BUSINESS, TestApp, spawn_env};

/// A second business (a copy of the demo) whose welcome reply cannot render.
pub const POISONED: &str = "5b0e8a7c-1111-4c1d-8e2f-00000000c0c0";
pub const HOSTILE: &str = "<script>alert('pwned')</script> I'd like to book, my name is Cleo Park";
pub const TOKEN: &str = "console-token-5f2a9c";

/// Starts the console for `app` on an ephemeral port; returns its base URL.
pub async fn spawn_console(app: &TestApp, token: Option<&str>) -> String {
    let console = icmp::console::Console::new(
        app.redis.clone(),
        app.store.clone(),
        app.config.redis.clone(),
        app.config.streams.clone(),
        app.config.handoff.clone(),
        token.map(SecretString::from),
    )
    .expect("console");
    serve_console(console).await
}

/// Serves `console` on an ephemeral loopback port; returns its base URL.
async fn serve_console(console: Arc<icmp::console::Console>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(icmp::console::serve(
        listener,
        console,
        std::future::pending(),
    ));
    base
}

/// The demo business with a worker, plus the poisoned business: a conversation whose first
/// message is hostile markup, and one dead letter per id in `poison`. Returns the app, the
/// demo reply and the poisoned definition file (import it again to fix the template).
pub async fn app_with_dead_letters(
    poison: &[&str],
) -> (TestApp, HashMap<String, String>, std::path::PathBuf) {
    let mut app = spawn_env(MockOptions::default(), |c| {
        c.streams.claim_idle_ms = 1_000;
        c.streams.max_deliveries = 3;
    })
    .await;
    let path = helpers::import_poisoned_demo(&app, POISONED).await;
    app.start_worker("w0").await;
    app.send("cleo", "c1", HOSTILE).await;
    let reply = app.reply("c1").await;
    assert_eq!(reply["status"], "ok", "{reply:?}");
    for id in poison {
        app.xadd(&[
            ("business_id", POISONED.as_bytes()),
            ("user_id", b"pat"),
            ("message_id", id.as_bytes()),
            ("content", b"hello"),
        ])
        .await;
        assert_eq!(app.reply(id).await["status"], "error");
    }
    app.settle(Duration::from_secs(30)).await;
    assert_eq!(
        app.entries(&app.config.streams.dead_letter).await.len(),
        poison.len()
    );
    (app, reply, path)
}

/// The dead letter of `message_id`.
pub async fn dead_letter(app: &TestApp, message_id: &str) -> HashMap<String, String> {
    app.entries(&app.config.streams.dead_letter)
        .await
        .into_iter()
        .find(|d| d["message_id"] == message_id)
        .expect("a dead letter")
}

/// Waits for the answer to a replayed message; returns every reply of `message_id`.
pub async fn replayed_answer(app: &TestApp, message_id: &str) -> Vec<HashMap<String, String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if app
            .replies_of(message_id)
            .await
            .iter()
            .any(|e| e["status"] == "ok")
        {
            app.settle(Duration::from_secs(30)).await;
            return app.replies_of(message_id).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replayed message not answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("http");
    (r.status().as_u16(), r.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_pages_show_status_dead_letters_conversations_and_traces_escaped() {
    let (app, reply, _) = app_with_dead_letters(&["p1"]).await;
    let base = spawn_console(&app, None).await;
    let dead = dead_letter(&app, "p1").await;
    let dead_id = &dead["__id"];
    let conversation = &reply["conversation_id"];

    let (status, page) = get(&format!("{base}/")).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Sunny Smile Dental"), "{page}");
    assert!(page.contains(DEMO_BUSINESS), "{page}");
    assert!(page.contains(r#"id="dead-letters">1<"#), "{page}");
    assert!(page.contains("read-only"), "{page}");
    assert!(page.contains(r#"action="/trace""#), "the trace search box");

    let (status, page) = get(&format!("{base}/dlq")).await;
    assert_eq!(status, 200);
    assert!(page.contains("template.render"), "{page}");
    assert!(page.contains(dead_id.as_str()), "{page}");
    assert!(
        page.contains("1 dead letter(s) shown; template.render: 1"),
        "{page}"
    );
    let (_, page) = get(&format!(
        "{base}/dlq?code=db.error&business=&older_than_secs="
    ))
    .await;
    assert!(page.contains("0 dead letter(s) shown"), "{page}");
    let (_, page) = get(&format!("{base}/dlq?business={POISONED}&older_than_secs=0")).await;
    assert!(page.contains("1 dead letter(s) shown"), "{page}");
    let (status, _) = get(&format!("{base}/dlq?older_than_secs=soon")).await;
    assert_eq!(status, 400);

    let (status, page) = get(&format!("{base}/dlq/{dead_id}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("error_reply_id"), "{page}");
    assert!(
        !page.contains(r#"id="replay""#),
        "read-only: no Replay button"
    );
    for unknown in ["1-1", "no-such-id", "1-1%20x"] {
        let (status, page) = get(&format!("{base}/dlq/{unknown}")).await;
        assert_eq!(status, 404, "{unknown}: {page}");
    }

    let (status, page) = get(&format!("{base}/conversations")).await;
    assert_eq!(status, 200);
    assert!(
        page.contains(DEMO_BUSINESS) && page.contains(POISONED),
        "{page}"
    );
    let (status, page) = get(&format!("{base}/conversations?business={DEMO_BUSINESS}")).await;
    assert_eq!(status, 200);
    assert!(page.contains(conversation.as_str()), "{page}");
    assert!(page.contains("cleo"), "{page}");
    let (status, page) = get(&format!("{base}/conversations/{conversation}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("booking_reply v1"), "{page}");
    assert!(page.contains("Cleo Park"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"),
        "{page}"
    );
    assert!(
        !page.contains("<script"),
        "hostile content is escaped: {page}"
    );
    let (status, _) = get(&format!("{base}/conversations/{}", uuid::Uuid::new_v4())).await;
    assert_eq!(status, 404);
    let (status, _) = get(&format!("{base}/conversations?business=not-a-uuid")).await;
    assert_eq!(status, 400);

    // The trace search box redirects to the trace page.
    let (status, page) = get(&format!("{base}/trace?id=c1")).await;
    assert_eq!(status, 200);
    assert!(page.contains(reply["reply_id"].as_str()), "{page}");
    assert!(page.contains(reply["log_id"].as_str()), "{page}");
    assert!(page.contains("welcome → booking"), "{page}");
    assert!(!page.contains("<script"), "{page}");
    let (status, page) = get(&format!("{base}/trace/{}", reply["log_id"])).await;
    assert_eq!(status, 200);
    assert!(page.contains(reply["reply_id"].as_str()), "{page}");
    let (status, page) = get(&format!("{base}/trace/p1")).await;
    assert_eq!(status, 200);
    assert!(page.contains(&format!("/dlq/{dead_id}")), "{page}");
    let (status, page) = get(&format!("{base}/trace/no-such-message")).await;
    assert_eq!(status, 404);
    assert!(page.contains("nothing found for no-such-message"), "{page}");
    let (status, _) = get(&format!("{base}/no/such/page")).await;
    assert_eq!(status, 404);

    // Read-only: no sign-in, and a write is refused and changes nothing.
    let (status, _) = get(&format!("{base}/login")).await;
    assert_eq!(status, 403);
    let outbound_before = app.entries(&app.config.streams.outbound).await.len();
    let r = client()
        .post(format!("{base}/dlq/{dead_id}/replay"))
        .bearer_auth("anything")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 403);
    let r = client()
        .post(format!("{base}/dlq/{dead_id}/purge"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 403);
    app.settle(Duration::from_secs(5)).await;
    assert_eq!(app.entries(&app.config.streams.dead_letter).await.len(), 1);
    assert_eq!(
        app.entries(&app.config.streams.outbound).await.len(),
        outbound_before
    );
    app.stop().await;
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

#[tokio::test]
async fn beyond_loopback_the_console_needs_a_token_for_every_page() {
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    let open = |token: Option<&str>| {
        icmp::console::Console::for_listener(
            "0.0.0.0:8090".parse().expect("addr"),
            app.redis.clone(),
            app.store.clone(),
            app.config.redis.clone(),
            app.config.streams.clone(),
            app.config.handoff.clone(),
            token.map(SecretString::from),
        )
    };
    let refused = open(None).expect_err("no token, not loopback");
    assert!(
        refused.to_string().contains("ICMP_CONSOLE_TOKEN"),
        "{refused}"
    );
    let base = serve_console(open(Some(TOKEN)).expect("with a token")).await;
    let http = client();
    for path in ["/", "/dlq", "/conversations", "/trace/1-1"] {
        let r = http.get(format!("{base}{path}")).send().await.expect("get");
        assert_eq!(r.status().as_u16(), 403, "{path} without the token");
        let r = http
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("get");
        assert_ne!(r.status().as_u16(), 403, "{path} with the token");
    }
    let r = http.get(format!("{base}/login")).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 200, "the sign-in page stays open");
}

// One thread, so that the subscriber set for this test sees the console's tasks. Run alone
// (`scripts/test` runs it in a process of its own): tracing caches which log lines are wanted
// per line of code and process-wide, and other tests' console writes on other threads race
// with this test's subscriber for that cache.
#[tokio::test(flavor = "current_thread")]
#[ignore = "captures the process-wide log: scripts/test runs it alone"]
async fn replay_and_purge_need_the_token_act_on_one_dead_letter_and_are_logged() {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (app, _, path) = app_with_dead_letters(&["p1", "p2", "p3"]).await;
    let base = spawn_console(&app, Some(TOKEN)).await;
    let (p1, p2) = (dead_letter(&app, "p1").await, dead_letter(&app, "p2").await);
    let http = client();

    // Without the token, or with a wrong one: 403, nothing changes.
    for auth in [None, Some("Bearer wrong-token"), Some("Basic Y29uc29sZQ==")] {
        let mut req = http.post(format!("{base}/dlq/{}/replay", p1["__id"]));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.expect("post");
        assert_eq!(r.status().as_u16(), 403, "{auth:?}");
    }
    // With the token but from another site (a form on a page elsewhere): 403 too.
    for (name, value) in [
        ("sec-fetch-site", "cross-site"),
        ("origin", "http://attacker.example"),
    ] {
        let r = http
            .post(format!("{base}/dlq/{}/purge", p1["__id"]))
            .bearer_auth(TOKEN)
            .header(name, value)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status().as_u16(), 403, "{name}: {value}");
    }
    let (_, page) = get(&format!("{base}/dlq/{}", p1["__id"])).await;
    assert!(
        !page.contains(r#"id="replay""#),
        "not signed in: no Replay button"
    );
    assert!(page.contains("/login"), "{page}");
    assert_eq!(app.entries(&app.config.streams.dead_letter).await.len(), 3);

    // The operator fixes the template (the import drops the cached copy), then replays p1.
    icmp::business::import_files(&app.store, Some(&app.cache), &[&path])
        .await
        .expect("fix");
    let r = http
        .post(format!("{base}/dlq/{}/replay", p1["__id"]))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 303);
    let location = r.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    assert!(location.starts_with("/dlq?done="), "{location}");
    let (_, page) = get(&format!("{base}{location}")).await;
    assert!(
        page.contains(&format!("replay of dead letter {}: replayed", p1["__id"])),
        "{page}"
    );
    let replies = replayed_answer(&app, "p1").await;
    assert_eq!(
        replies.len(),
        2,
        "the error, then one new reply: {replies:?}"
    );
    assert_eq!(replies[1]["status"], "ok");
    assert_eq!(replies[1]["supersedes"], p1["error_reply_id"]);
    let left: Vec<String> = app
        .entries(&app.config.streams.dead_letter)
        .await
        .into_iter()
        .map(|d| d["message_id"].clone())
        .collect();
    assert_eq!(
        left,
        ["p2", "p3"],
        "the replayed entry left the dead-letter stream"
    );

    // Sign in with the form; the session cookie purges p2 and nothing else.
    let r = http
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=wrong")
        .send()
        .await
        .expect("login");
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = http
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(TOKEN),
        "the cookie is a session id, not the token"
    );
    let session = cookie.split(';').next().expect("name=value").to_owned();
    let (_, page) = {
        let r = http
            .get(format!("{base}/dlq/{}", p2["__id"]))
            .header("cookie", &session)
            .send()
            .await
            .expect("get");
        (r.status().as_u16(), r.text().await.expect("body"))
    };
    assert!(page.contains(r#"id="purge""#), "signed in: Purge button");
    let r = http
        .post(format!("{base}/dlq/{}/purge", p2["__id"]))
        .header("cookie", &session)
        .send()
        .await
        .expect("purge");
    assert_eq!(r.status().as_u16(), 303);
    let left: Vec<String> = app
        .entries(&app.config.streams.dead_letter)
        .await
        .into_iter()
        .map(|d| d["message_id"].clone())
        .collect();
    assert_eq!(left, ["p3"], "exactly that entry is purged");
    // Purging it again: it is gone.
    let r = http
        .post(format!("{base}/dlq/{}/purge", p2["__id"]))
        .header("cookie", &session)
        .send()
        .await
        .expect("purge");
    assert_eq!(r.status().as_u16(), 404);

    // Signed out, the cookie no longer writes.
    http.post(format!("{base}/logout"))
        .header("cookie", &session)
        .send()
        .await
        .expect("logout");
    let r = http
        .post(format!(
            "{base}/dlq/{}/purge",
            dead_letter(&app, "p3").await["__id"]
        ))
        .header("cookie", &session)
        .send()
        .await
        .expect("purge");
    assert_eq!(r.status().as_u16(), 403);

    // Every attempt is on the page and in the log, without the token.
    let (_, page) = get(&format!("{base}/dlq")).await;
    assert!(page.contains("Recent console writes"), "{page}");
    let text = log.text();
    for expected in [
        format!("target.id={} outcome=replayed", p1["__id"]),
        format!("target.id={} outcome=purged", p2["__id"]),
        format!("target.id={} outcome=forbidden", p1["__id"]),
        format!("target.id={} outcome=not_found", p2["__id"]),
    ] {
        assert!(text.contains(&expected), "missing {expected} in\n{text}");
    }
    assert!(text.contains("remote.addr=127.0.0.1:"), "{text}");
    assert!(!text.contains(TOKEN), "the token is never logged");
    assert!(!page.contains(TOKEN));

    // The audit trail holds each write that acted or failed (not the refused ones), by the
    // console's client, and the console shows it.
    let trail = app
        .store
        .audit_log(&icmp::store::audit::AuditFilter {
            limit: 50,
            ..Default::default()
        })
        .await
        .expect("audit trail");
    let got: Vec<(&str, &str, &str)> = trail
        .iter()
        .rev()
        .filter(|r| r.action != "dlq.read")
        .map(|r| {
            (
                r.action.as_str(),
                r.target.as_deref().unwrap_or_default(),
                r.outcome.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("dlq.replay", p1["__id"].as_str(), "ok"),
            ("dlq.purge", p2["__id"].as_str(), "ok"),
            ("dlq.purge", p2["__id"].as_str(), "not_found"),
        ]
    );
    assert!(
        trail
            .iter()
            .all(|r| r.actor.starts_with("console:127.0.0.1:")),
        "{trail:?}"
    );
    // And each dead letter shown: p1 before its replay, p2 signed in before its purge.
    let reads: Vec<&str> = trail
        .iter()
        .rev()
        .filter(|r| r.action == "dlq.read")
        .filter_map(|r| r.target.as_deref())
        .collect();
    assert_eq!(reads, [p1["__id"].as_str(), p2["__id"].as_str()]);
    let (_, page) = get(&format!("{base}/audit")).await;
    assert!(
        page.contains("dlq.replay") && page.contains(p1["__id"].as_str()),
        "{page}"
    );
    assert!(!page.contains(TOKEN));
    app.stop().await;
}

#[tokio::test]
async fn a_database_that_cannot_be_reached_is_a_503_page_with_its_code() {
    let app = spawn_env(MockOptions::default(), |_| {}).await;
    let mut database = app.config.database.clone();
    let port = crate::processes::free_port();
    database.url =
        icmp::config::RedactedUrl::new(format!("postgres://postgres@127.0.0.1:{port}/icmp"));
    let store = icmp::store::Store::connect(&database).expect("a lazy pool");
    let console = icmp::console::Console::new(
        app.redis.clone(),
        store,
        app.config.redis.clone(),
        app.config.streams.clone(),
        app.config.handoff.clone(),
        None,
    )
    .expect("console");
    let base = serve_console(console).await;
    for page in [
        "/",
        "/conversations",
        &format!("/conversations?business={DEMO_BUSINESS}"),
    ] {
        let (status, body) = get(&format!("{base}{page}")).await;
        assert_eq!(status, 503, "{page}: {body}");
        assert!(body.contains(r#"<code id="code">db."#), "{page}: {body}");
    }
    // Dead letters live in Redis alone: that page still works.
    assert_eq!(get(&format!("{base}/dlq")).await.0, 200);
}
