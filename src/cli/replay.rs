//! `icmp replay`: run golden transcripts against a running worker, or record one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use icmp::startup::Operator;
use icmp::transcript::{Runner, Transcript};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Transcript files to run.
    files: Vec<PathBuf>,
    /// Record a new transcript to this file from an interactive conversation.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Business id (for --record).
    #[arg(long, default_value = "7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001")]
    business: String,
    /// Seconds to wait for each reply.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

pub(super) async fn run(operator: &Operator, args: Args) -> Result<()> {
    let runner = Runner {
        conn: operator.redis().await?,
        streams: &operator.config().streams,
        store: operator.store().await?,
        timeout: Duration::from_secs(args.timeout_secs),
    };
    if let Some(path) = &args.record {
        return record(&runner, &args.business, path).await;
    }
    let mut failed = 0;
    for file in &args.files {
        let t = Transcript::load(file)?;
        let differences = runner.replay(&t).await?;
        if differences.is_empty() {
            println!("ok    {} ({} turns)", file.display(), t.turns.len());
        } else {
            failed += 1;
            println!("DIFF  {}", file.display());
            for d in differences {
                println!("{d}");
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} transcripts differ", args.files.len());
    }
    Ok(())
}

/// `icmp replay --record`: an interactive conversation (as `icmp chat`), written to `path` as a
/// transcript after every turn.
async fn record(runner: &Runner<'_>, business: &str, path: &Path) -> Result<()> {
    let user = format!("record-{}", uuid::Uuid::new_v4().simple());
    let mut conversation = None;
    let mut t = Transcript {
        business: business.to_owned(),
        description: String::new(),
        turns: Vec::new(),
    };
    println!("Recording to {} (Ctrl-D to finish).", path.display());
    loop {
        let Some(text) = super::prompt_line()? else {
            return Ok(());
        };
        let turn = runner
            .turn(business, &user, &mut conversation, &text)
            .await?;
        println!("bot> [{} · {}] {}", turn.status, turn.stage, turn.reply);
        t.turns.push(turn);
        std::fs::write(path, t.to_toml())?;
    }
}
