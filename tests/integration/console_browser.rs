//! The console in a real browser: headless Chromium, driven over WebDriver, reads every page,
//! signs in and replays a dead letter end to end. One screenshot per page goes to
//! `target/test-artifacts/console/`. Fails (saying how to install them) without chromium and
//! chromium-driver; `scripts/test` installs both.

use crate::console::{
    POISONED, TOKEN, app_with_dead_letters, dead_letter, replayed_answer, spawn_console,
};
use crate::helpers::{self, DEMO_BUSINESS};

/// Where the browser test saves its screenshots.
fn artifacts() -> std::path::PathBuf {
    let dir = helpers::root().join("target/test-artifacts/console");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_reads_every_page_signs_in_and_replays_a_dead_letter() {
    let (app, reply, path) = app_with_dead_letters(&["p1"]).await;
    let base = spawn_console(&app, Some(TOKEN)).await;
    let dead = dead_letter(&app, "p1").await;
    let dead_id = dead["__id"].clone();
    let conversation = reply["conversation_id"].clone();
    let shots = artifacts();
    let browser = crate::webdriver::Browser::start().await;

    let pages = [
        ("overview", "/".to_owned(), "Sunny Smile Dental"),
        ("dead-letters", "/dlq".to_owned(), "template.render"),
        ("dead-letter", format!("/dlq/{dead_id}"), "error_reply_id"),
        ("businesses", "/conversations".to_owned(), POISONED),
        (
            "conversations",
            format!("/conversations?business={DEMO_BUSINESS}"),
            "cleo",
        ),
        (
            "conversation",
            format!("/conversations/{conversation}"),
            "Cleo Park",
        ),
        ("trace", "/trace/c1".to_owned(), "welcome → booking"),
    ];
    for (name, path, expected) in &pages {
        browser.goto(&format!("{base}{path}")).await;
        let text = browser.text().await;
        assert!(text.contains(expected), "{name}: {expected} not in\n{text}");
        let file = shots.join(format!("{name}.png"));
        browser.screenshot(&file).await;
        println!("screenshot: {}", file.display());
    }
    // The hostile message shows as text and runs nothing.
    browser
        .goto(&format!("{base}/conversations/{conversation}"))
        .await;
    assert!(
        browser
            .text()
            .await
            .contains("<script>alert('pwned')</script>")
    );
    assert!(
        !browser.has("main script").await,
        "no script element in the page"
    );

    // The search box on every page finds a trace.
    browser.goto(&format!("{base}/dlq")).await;
    browser.type_into("input[name=id]", "c1").await;
    browser.click("header button[type=submit]").await;
    browser.wait_for_text("Trace of c1").await;
    assert!(browser.url().await.ends_with("/trace/c1"));
    assert!(browser.text().await.contains(reply["reply_id"].as_str()));

    // Not signed in: no Replay button. Sign in, then replay once the template is fixed.
    browser.goto(&format!("{base}/dlq/{dead_id}")).await;
    assert!(!browser.has("#replay").await);
    browser.goto(&format!("{base}/login")).await;
    browser.type_into("#token", TOKEN).await;
    browser.click("#sign-in").await;
    browser.wait_for_text("signed in").await;
    icmp::business::import_files(&app.store, Some(&app.cache), &[&path])
        .await
        .expect("fix");
    browser.goto(&format!("{base}/dlq/{dead_id}")).await;
    browser.click("#replay").await;
    browser
        .wait_for_text(&format!("replay of dead letter {dead_id}: replayed"))
        .await;
    let file = shots.join("replayed.png");
    browser.screenshot(&file).await;
    println!("screenshot: {}", file.display());

    let replies = replayed_answer(&app, "p1").await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[1]["status"], "ok");
    assert_eq!(replies[1]["supersedes"], dead["error_reply_id"]);
    assert!(
        app.entries(&app.config.streams.dead_letter)
            .await
            .is_empty()
    );
    browser.goto(&format!("{base}/trace/p1")).await;
    assert!(
        browser
            .text()
            .await
            .contains(replies[1]["reply_id"].as_str())
    );
    browser.quit().await;
    app.stop().await;
}
