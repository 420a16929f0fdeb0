//! The command line of `icmp` (DESIGN §11): one module per command, each with its arguments
//! and what it runs. The only place that uses `anyhow`. Every command connects through
//! [`icmp::startup`]: `worker` as an [`Application`](icmp::startup::Application), the others as
//! an [`Operator`].

mod actions;
mod audit;
#[cfg(feature = "bench")]
mod bench;
mod console;
mod conversation;
mod dlq;
mod handoff;
mod import;
mod migrate;
mod mock_llm;
mod replay;
mod reshard;
mod send;
mod shard;
mod status;
mod trace;
mod user;
mod worker;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use icmp::config::Config;
use icmp::startup::Operator;

#[derive(Debug, Parser)]
#[command(
    name = "icmp",
    version,
    about = "LLM conversation worker over Redis Streams"
)]
struct Cli {
    /// Configuration file; `config/<profile>.toml` next to it is layered on top when
    /// `--profile` or ICMP_PROFILE is given, then ICMP__SECTION__KEY variables.
    #[arg(long, global = true, default_value = "config/default.toml")]
    config: PathBuf,
    /// Configuration profile.
    #[arg(long, global = true)]
    profile: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the SQL migrations (idempotent).
    Migrate,
    /// Import business definitions (business, stages, templates) from TOML files.
    Import(import::Args),
    /// Run one worker process in the consumer group.
    Worker,
    /// Serve the OpenAI-compatible mock LLM.
    MockLlm(mock_llm::Args),
    /// Send one message and print its reply.
    Send(send::SendArgs),
    /// Talk to the worker interactively (one line per message).
    Chat(send::Target),
    /// Run golden transcripts against the worker and show every difference (exit 1 if any);
    /// with `--record FILE`, talk to the worker interactively and record the conversation.
    Replay(replay::Args),
    /// Show a stored conversation: its messages with stages and template versions, and the
    /// data extracted (exit 1 when there is none).
    Conversation {
        #[command(subcommand)]
        action: conversation::Action,
    },
    /// Everything known about one message, by its message_id, log_id or inbound entry id:
    /// entry, pending state, stored rows with step timings, LLM calls, transition, reply or
    /// dead letter (exit 1 when nothing is found).
    Trace(trace::Args),
    /// Which inbound shard a user's messages go to (`streams.shards`), and the names of that
    /// shard's streams: where a producer adds the user's entries, and the prefix its
    /// `reply_to` streams must start with.
    Shard(shard::Args),
    /// Ends a move between shard layouts (`streams.previous_shards` to `streams.shards`):
    /// waits until the previous layout has drained, then switches every worker to the new
    /// one (exit 1 when it does not drain in time); `--status` only shows what is left.
    Reshard(reshard::Args),
    /// The group's lag and pending entries, consumers, order queues, dead letters, and each
    /// business's replies, fallbacks and errors over the last minutes.
    Status(status::Args),
    /// Serve the web console: status, dead letters (with replay and purge), conversations and
    /// traces. Read-only unless ICMP_CONSOLE_TOKEN is set; writes then need that token.
    Console(console::Args),
    /// Stage actions' requests: list, show, retry, cancel.
    Actions {
        #[command(subcommand)]
        action: actions::Action,
    },
    /// Human handoff: the conversations with a person; hand one over, give one back.
    Handoff {
        #[command(subcommand)]
        action: handoff::Action,
    },
    /// One user's personal data: export it, erase it (recorded in the audit trail).
    User {
        #[command(subcommand)]
        action: user::Action,
    },
    /// The audit trail of operators' actions on user data, newest first.
    Audit(audit::Args),
    /// Inspect or replay the dead-letter stream.
    Dlq {
        #[command(subcommand)]
        action: dlq::Action,
    },
    /// Measure throughput and latency of the whole pipeline (mock LLM, in-process workers).
    #[cfg(feature = "bench")]
    Bench(icmp::bench::BenchOptions),
}

/// Appends `record` to the audit trail (docs/security.md, "Audit"); the command fails when it
/// cannot, after saying that what it did is done.
async fn audit(operator: &Operator, record: icmp::personal_data::audit::AuditRecord) -> Result<()> {
    operator
        .store()
        .await?
        .audit(&record)
        .await
        .with_context(|| format!("{} done, but writing the audit trail failed", record.action))
}

/// Many ids as one audit target (at most 1,000 characters of them).
fn audit_target(ids: &[impl ToString]) -> String {
    let mut out = ids
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    if out.len() > 1000 {
        let mut end = 1000;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let config = Config::load(&cli.config, cli.profile.as_deref())
        .with_context(|| format!("loading {}", cli.config.display()))?;
    let operator = || Operator::new(&config);
    match cli.command {
        Command::Migrate => migrate::run(&config).await,
        Command::Import(args) => import::run(&operator(), args).await,
        Command::Worker => worker::run(config).await,
        Command::MockLlm(args) => mock_llm::run(&config, args).await,
        Command::Send(args) => send::send(&operator(), args).await,
        Command::Chat(target) => send::chat(&operator(), target).await,
        Command::Replay(args) => replay::run(&operator(), args).await,
        Command::Conversation { action } => conversation::run(&operator(), action).await,
        Command::Trace(args) => trace::run(&operator(), args).await,
        Command::Shard(args) => shard::run(&config.streams, &args),
        Command::Reshard(args) => reshard::run(&operator(), args).await,
        Command::Status(args) => status::run(&operator(), args).await,
        Command::Console(args) => console::run(&operator(), args).await,
        Command::Dlq { action } => dlq::run(&operator(), action).await,
        Command::User { action } => user::run(&operator(), action).await,
        Command::Audit(args) => audit::run(&operator(), args).await,
        Command::Actions { action } => actions::run(&operator(), action).await,
        Command::Handoff { action } => handoff::run(&operator(), action).await,
        #[cfg(feature = "bench")]
        Command::Bench(options) => bench::run(config, options).await,
    }
}

/// Prompts `you> ` and reads the next non-blank line; `None` at the end of input.
fn prompt_line() -> Result<Option<String>> {
    let stdin = std::io::stdin();
    loop {
        print!("you> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            return Ok(None);
        }
        let text = line.trim_end_matches(['\n', '\r']);
        if !text.trim().is_empty() {
            return Ok(Some(text.to_owned()));
        }
    }
}

/// A token cancelled on SIGINT or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let stop = CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        cancel.cancel();
    });
    stop
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
