//! `icmp user`: one user's personal data: export it, erase it (docs/operations.md, "Personal
//! data"). Both are recorded in the audit trail.

use std::time::Duration;

use anyhow::{Context as _, Result};

use icmp::error::Classify as _;
use icmp::personal_data::places::Streams;
use icmp::personal_data::{Subject, audit, erase, export};
use icmp::startup::Operator;

#[derive(Debug, clap::Subcommand)]
pub(super) enum Action {
    /// Everything stored about one user, as one JSON document (exit 1 when nothing is found).
    Export {
        #[command(flatten)]
        who: Who,
        /// Print the document on one line (the default is indented).
        #[arg(long)]
        json: bool,
    },
    /// Remove one user's data everywhere: rows, cached state, stream entries, LLM prompts;
    /// prints counts per place. Messages of the user that arrived before it are dropped
    /// unanswered; later ones are a new user's. Safe with workers running; idempotent.
    Erase {
        #[command(flatten)]
        who: Who,
        /// How long to wait for the user's messages that workers are processing (exit 1 if
        /// some are still in flight then: run it again).
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub(super) struct Who {
    /// The business id.
    #[arg(long)]
    business: String,
    /// The user's id, as producers send it.
    #[arg(long)]
    user: String,
}

pub(super) async fn run(operator: &Operator, action: Action) -> Result<()> {
    let config = operator.config();
    let at = Streams {
        streams: &config.streams,
        handoff: &config.handoff,
    };
    let prefix = &config.redis.key_prefix;
    let store = operator.store().await?;
    let conn = operator.redis().await?;
    let actor = audit::actor();
    let subject = |who: &Who| {
        Subject::new(&who.business, &who.user)
            .context("--business must be a UUID and --user must not be blank")
    };
    match action {
        Action::Export { who, json } => {
            let subject = subject(&who)?;
            let record = audit::record(&actor, "user.export")
                .business(subject.business)
                .user(subject.key());
            let found = export::export(store, conn, prefix, at, &subject).await;
            let record = match &found {
                Ok(e) => record.counts(&e.counts()),
                Err(e) => record.failed(e.code()),
            };
            store
                .audit(&record)
                .await
                .context("writing the audit trail")?;
            let found = found?;
            if json {
                println!("{}", serde_json::to_string(&found)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&found)?);
            }
            if found.is_empty() {
                anyhow::bail!("nothing stored for this user");
            }
            Ok(())
        }
        Action::Erase {
            who,
            wait_secs,
            json,
        } => {
            let subject = subject(&who)?;
            let wait = Duration::from_secs(wait_secs);
            let record = audit::record(&actor, "user.erase")
                .business(subject.business)
                .user(subject.key());
            let done = erase::erase(store, conn, prefix, at, &subject, wait).await;
            let record = match &done {
                Ok(e) if e.in_flight.is_empty() => record.counts(&e.counts),
                Ok(e) => record.counts(&e.counts).failed("erase.in_flight"),
                Err(e) => record.failed(e.code()),
            };
            store
                .audit(&record)
                .await
                .context("writing the audit trail")?;
            let done = done?;
            print_erasure(&done, json)?;
            if !done.in_flight.is_empty() {
                anyhow::bail!(
                    "{} message(s) of the user are still being processed; run the erase again",
                    done.in_flight.len()
                );
            }
            Ok(())
        }
    }
}

fn print_erasure(done: &erase::Erasure, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(done)?);
        return Ok(());
    }
    println!(
        "erased at entry {} of the user's inbound stream (later messages are a new user's)",
        done.erased_at
    );
    for (place, n) in &done.counts {
        println!("  {place:<20} {n}");
    }
    Ok(())
}
