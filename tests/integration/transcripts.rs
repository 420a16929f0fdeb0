//! Golden transcripts: the demo business's recorded conversations replay without a difference
//! against a live worker and the mock LLM, and a changed recording is reported turn by turn.

use std::process::Stdio;

use icmp::llm::mock::MockOptions;

use crate::helpers::{root, spawn_app};
use crate::processes::icmp;

fn transcripts() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("config/businesses/transcripts"))
        .expect("transcripts")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_transcripts_replay_without_a_difference_and_a_change_is_reported() {
    let app = spawn_app(MockOptions::default()).await;
    let files = transcripts();
    assert!(files.len() >= 3, "the demo ships at least three: {files:?}");

    let config = app.config.clone();
    let run = move |files: Vec<std::path::PathBuf>| {
        let config = config.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                icmp(&config)
                    .arg("replay")
                    .args(&files)
                    .stdin(Stdio::null())
                    .output()
                    .expect("icmp replay")
            })
            .await
            .expect("join")
        }
    };
    let out = run(files.clone()).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        files.len()
    );

    // The same recording with one reply and one stage changed: both named, exit 1.
    let text = std::fs::read_to_string(&files[0]).expect("read");
    let changed = text
        .replacen("How else can I help?", "How may I help?", 1)
        .replacen("stage = \"farewell\"", "stage = \"welcome\"", 1);
    assert_ne!(changed, text);
    let path = std::env::temp_dir().join(format!("icmp-transcript-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, changed).expect("write");
    let out = run(vec![path.clone()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("turn 1: reply differs"), "{stdout}");
    assert!(stdout.contains("stage differs"), "{stdout}");
    let _ = std::fs::remove_file(&path);
    app.stop().await;
}
