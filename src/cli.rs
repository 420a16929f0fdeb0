//! Subcommands of `icmp` (DESIGN §11). The only place that uses `anyhow`.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use icmp::cache::{self, Cache};
use icmp::client::{self, Outgoing};
use icmp::config::Config;
use icmp::llm::mock::{self, MockOptions};
use icmp::store::{self, Store};
use icmp::stream::dead_letter;
use icmp::telemetry;
use icmp::transcript;

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
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run one worker process in the consumer group.
    Worker,
    /// Serve the OpenAI-compatible mock LLM.
    MockLlm(MockArgs),
    /// Send one message and print its reply.
    Send {
        #[command(flatten)]
        target: Target,
        /// Idempotency key of the message.
        #[arg(long)]
        message_id: Option<String>,
        /// The message text.
        text: String,
    },
    /// Talk to the worker interactively (one line per message).
    Chat {
        #[command(flatten)]
        target: Target,
    },
    /// Run golden transcripts against the worker and show every difference (exit 1 if any);
    /// with `--record FILE`, talk to the worker interactively and record the conversation.
    Replay {
        /// Transcript files to run.
        files: Vec<std::path::PathBuf>,
        /// Record a new transcript to this file from an interactive conversation.
        #[arg(long)]
        record: Option<std::path::PathBuf>,
        /// Business id (for --record).
        #[arg(long, default_value = "7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001")]
        business: String,
        /// Seconds to wait for each reply.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Show a stored conversation: its messages with stages and template versions, and the
    /// data extracted (exit 1 when there is none).
    Conversation {
        #[command(subcommand)]
        action: ConversationAction,
    },
    /// Everything known about one message, by its message_id, log_id or inbound entry id:
    /// entry, pending state, stored rows with step timings, LLM calls, transition, reply or
    /// dead letter (exit 1 when nothing is found).
    Trace {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The group's lag and pending entries, consumers, order queues, dead letters, and each
    /// business's replies, fallbacks and errors over the last minutes.
    Status {
        /// The window of the per-business figures.
        #[arg(long, default_value_t = 15)]
        minutes: u64,
        #[arg(long)]
        json: bool,
    },
    /// Serve the web console: status, dead letters (with replay and purge), conversations and
    /// traces. Read-only unless ICMP_CONSOLE_TOKEN is set; writes then need that token.
    Console {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
    },
    /// Inspect or replay the dead-letter stream.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Measure throughput and latency of the whole pipeline (mock LLM, in-process workers).
    Bench(icmp::bench::BenchOptions),
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Show the oldest dead letters with their error, and how many there are by error code.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show every field of one dead letter (exit 1 when there is none with that id).
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on the inbound stream (after fixing their cause).
    Replay {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete dead letters: the given ids, or every one the filters match. Asks first unless
    /// `--yes`; prints what it removed.
    Purge {
        ids: Vec<String>,
        #[command(flatten)]
        filter: DlqFilter,
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConversationAction {
    /// The transcript of a conversation: by id, or a user's latest with --business and --user.
    Show {
        id: Option<String>,
        #[arg(long)]
        business: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// One JSON object (the conversation with its messages).
        #[arg(long)]
        json: bool,
        /// One JSON object per message.
        #[arg(long, conflicts_with = "json")]
        jsonl: bool,
    },
}

#[derive(Debug, clap::Args)]
struct DlqFilter {
    /// Only dead letters of this business.
    #[arg(long)]
    business: Option<String>,
    /// Only dead letters with this error code.
    #[arg(long)]
    code: Option<String>,
    /// Only dead letters at least this many seconds old.
    #[arg(long)]
    older_than_secs: Option<u64>,
}

impl DlqFilter {
    fn filter(&self) -> dead_letter::Filter {
        dead_letter::Filter {
            business: self.business.clone(),
            code: self.code.clone(),
            older_than: self.older_than_secs.map(Duration::from_secs),
        }
    }
}

#[derive(Debug, clap::Args)]
struct Target {
    /// Business id (the demo business: 7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001).
    #[arg(long, default_value = "7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001")]
    business: String,
    #[arg(long, default_value = "alice")]
    user: String,
    /// Continue this conversation (default: the user's latest, or a new one).
    #[arg(long)]
    conversation: Option<String>,
    /// Seconds to wait for a reply.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

#[derive(Debug, clap::Args)]
struct MockArgs {
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Share of calls answered 500 (0..1).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Share of calls answered 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    rate_limit_rate: f64,
    #[arg(long, default_value_t = 1)]
    retry_after_secs: u64,
    /// Share of calls that hang for --hang-ms.
    #[arg(long, default_value_t = 0.0)]
    timeout_rate: f64,
    #[arg(long, default_value_t = 60_000)]
    hang_ms: u64,
    /// Share of calls answered with truncated JSON.
    #[arg(long, default_value_t = 0.0)]
    malformed_rate: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Serve HTTP/1.1 only (by default cleartext HTTP/2 is served on the same port too).
    #[arg(long)]
    http1_only: bool,
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
    match cli.command {
        Command::Migrate => {
            let applied = store::migrate(&config.database).await?;
            if applied.is_empty() {
                println!("database is up to date");
            } else {
                println!("applied migrations: {applied:?}");
            }
        }
        Command::Import { files } => {
            let store = Store::connect(&config.database)?;
            let cache = match cache::connect(&config.redis).await {
                Ok(conn) => Some(Cache::new(conn, &config.redis, &config.cache)),
                Err(e) => {
                    eprintln!("warning: redis unreachable ({e}); cached definitions expire by TTL");
                    None
                }
            };
            let reports = icmp::business::import_files(&store, cache.as_ref(), &files).await?;
            for r in reports {
                println!("business {}:", r.business_id);
                for (name, change, version) in r.templates {
                    println!("  template {name}: {change:?} (version {version})");
                }
                println!("  stages: {}", r.stage_ids.len());
            }
        }
        Command::Worker => {
            telemetry::init_logging(&config.telemetry, std::io::stderr);
            icmp::worker::run_until_stopped(config, shutdown_signal()).await?;
        }
        Command::MockLlm(a) => {
            telemetry::init_logging(&config.telemetry, std::io::stderr);
            let listener = tokio::net::TcpListener::bind(a.listen).await?;
            eprintln!("mock LLM listening on http://{}/v1", listener.local_addr()?);
            let options = MockOptions {
                latency_ms: a.latency_ms,
                jitter_ms: a.jitter_ms,
                error_rate: a.error_rate,
                rate_limit_rate: a.rate_limit_rate,
                retry_after_secs: a.retry_after_secs,
                timeout_rate: a.timeout_rate,
                hang_ms: a.hang_ms,
                malformed_rate: a.malformed_rate,
                seed: a.seed,
                http1_only: a.http1_only,
            };
            mock::serve(listener, options, shutdown_signal()).await?;
        }
        Command::Send {
            target,
            message_id,
            text,
        } => {
            let conn = cache::connect(&config.redis).await?;
            let reply = client::send_and_wait(
                &conn,
                &config.streams,
                &outgoing(&target, None, message_id, text),
                Duration::from_secs(target.timeout_secs),
            )
            .await?;
            print_reply(&reply);
            if reply.get("status").map(String::as_str) == Some("error") {
                // Scripts can tell an error reply from an answer by the exit code.
                anyhow::bail!(
                    "the reply is an error: {}",
                    reply.get("error_code").cloned().unwrap_or_default()
                );
            }
        }
        Command::Chat { target } => chat(&config, target).await?,
        Command::Replay {
            files,
            record,
            business,
            timeout_secs,
        } => {
            let conn = cache::connect(&config.redis).await?;
            let store = Store::connect(&config.database)?;
            let runner = transcript::Runner {
                conn: &conn,
                streams: &config.streams,
                store: &store,
                timeout: Duration::from_secs(timeout_secs),
            };
            if let Some(path) = record {
                record_transcript(&runner, &business, &path).await?;
                return Ok(());
            }
            let mut failed = 0;
            for file in &files {
                let t = transcript::Transcript::load(file)?;
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
                anyhow::bail!("{failed} of {} transcripts differ", files.len());
            }
        }
        Command::Conversation {
            action:
                ConversationAction::Show {
                    id,
                    business,
                    user,
                    json,
                    jsonl,
                },
        } => {
            let store = Store::connect(&config.database)?;
            let which = match (&id, &business, &user) {
                (Some(id), None, None) => store::conversations::ConversationRef::Id(
                    uuid::Uuid::parse_str(id).context("the conversation id is not a UUID")?,
                ),
                (None, Some(b), Some(u)) => store::conversations::ConversationRef::Latest {
                    business_id: uuid::Uuid::parse_str(b)
                        .context("the business id is not a UUID")?,
                    user: u,
                },
                _ => anyhow::bail!("give a conversation id, or --business and --user"),
            };
            let Some(c) = store.conversation_record(which).await? else {
                anyhow::bail!("no such conversation");
            };
            if json {
                println!("{}", serde_json::to_string(&c)?);
            } else if jsonl {
                for m in &c.messages {
                    println!("{}", serde_json::to_string(m)?);
                }
            } else {
                print_conversation(&c);
            }
        }
        Command::Trace { id, json } => {
            let conn = cache::connect(&config.redis).await?;
            let store = Store::connect(&config.database)?;
            let t = icmp::trace::trace(&conn, &config.streams, &store, &id).await?;
            if json {
                println!("{}", serde_json::to_string(&t)?);
            } else {
                print!("{t}");
            }
            if !t.found() {
                anyhow::bail!("nothing found for {id}");
            }
        }
        Command::Status { minutes, json } => {
            let conn = cache::connect(&config.redis).await?;
            let store = Store::connect(&config.database)?;
            let status =
                icmp::status::read(&conn, &config.redis, &config.streams, &store, minutes).await?;
            if json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                print!("{status}");
            }
        }
        Command::Console { listen } => {
            telemetry::init_logging(&config.telemetry, std::io::stderr);
            let conn = cache::connect(&config.redis).await?;
            let store = Store::connect(&config.database)?;
            let token = std::env::var("ICMP_CONSOLE_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .map(secrecy::SecretString::from);
            let writable = token.is_some();
            let console = icmp::console::Console::for_listener(
                listen,
                conn,
                store,
                config.redis.clone(),
                config.streams.clone(),
                token,
            )?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let mode = if writable {
                "replay and purge need the token"
            } else {
                "read-only: no ICMP_CONSOLE_TOKEN"
            };
            eprintln!(
                "console listening on http://{} ({mode})",
                listener.local_addr()?
            );
            icmp::console::serve(listener, console, shutdown_signal()).await?;
        }
        Command::Dlq { action } => {
            let conn = cache::connect(&config.redis).await?;
            match action {
                DlqAction::List {
                    filter,
                    count,
                    json,
                } => {
                    let found =
                        dead_letter::find(&conn, &config.streams, &filter.filter(), count).await?;
                    let mut by_code: std::collections::BTreeMap<String, usize> =
                        std::collections::BTreeMap::new();
                    for d in &found {
                        *by_code.entry(d.field("error_code")).or_default() += 1;
                        if json {
                            println!("{}", d.to_json());
                            continue;
                        }
                        println!(
                            "{}  {}  business {} user {} message {}  after {} deliveries at {}",
                            d.id,
                            d.field("error_code"),
                            d.field("business_id"),
                            d.field("user_id"),
                            d.field("message_id"),
                            d.field("deliveries"),
                            d.field("failed_at"),
                        );
                        println!("    {}", d.field("error_detail"));
                    }
                    if !json {
                        let counts: Vec<String> =
                            by_code.iter().map(|(c, n)| format!("{c}: {n}")).collect();
                        println!(
                            "{} dead letter(s) shown; {}",
                            found.len(),
                            counts.join(", ")
                        );
                    }
                }
                DlqAction::Show { id, json } => {
                    let Some(d) = dead_letter::show(&conn, &config.streams, &id).await? else {
                        anyhow::bail!("no dead letter {id}");
                    };
                    if json {
                        println!("{}", d.to_json());
                    } else {
                        println!("{}", d.id);
                        for (k, v) in &d.fields {
                            println!(
                                "  {:<16} {}",
                                String::from_utf8_lossy(k),
                                String::from_utf8_lossy(v)
                            );
                        }
                    }
                }
                DlqAction::Purge { ids, filter, yes } => {
                    let ids = if ids.is_empty() {
                        let f = filter.filter();
                        if f.business.is_none() && f.code.is_none() && f.older_than.is_none() {
                            anyhow::bail!("name the dead letters to purge: ids, or filters");
                        }
                        dead_letter::find(&conn, &config.streams, &f, usize::MAX)
                            .await?
                            .into_iter()
                            .map(|d| d.id)
                            .collect()
                    } else {
                        ids
                    };
                    if ids.is_empty() {
                        println!("nothing to purge");
                        return Ok(());
                    }
                    if !yes {
                        print!("Delete {} dead letter(s)? [y/N] ", ids.len());
                        std::io::stdout().flush()?;
                        let mut answer = String::new();
                        std::io::stdin().lock().read_line(&mut answer)?;
                        if !matches!(answer.trim(), "y" | "Y" | "yes") {
                            println!("nothing removed");
                            return Ok(());
                        }
                    }
                    let removed = dead_letter::purge(&conn, &config.streams, &ids).await?;
                    for id in &removed {
                        println!("removed {id}");
                    }
                    tracing::info!(count = removed.len(), "dead letters purged");
                    println!("removed {} of {}", removed.len(), ids.len());
                }
                DlqAction::Replay { ids } => {
                    let done = dead_letter::replay(&conn, &config.streams, &ids).await?;
                    println!("replayed {} of {}: {done:?}", done.len(), ids.len());
                }
            }
        }
        Command::Bench(options) if options.suite => {
            telemetry::init_logging(&config.telemetry, std::io::stderr);
            let report = icmp::bench::suite::run_suite(config, &options).await?;
            print!("{report}");
        }
        Command::Bench(options) => {
            telemetry::init_logging(&config.telemetry, std::io::stderr);
            let workers = if options.processes > 0 {
                format!("{} worker process(es)", options.processes)
            } else {
                format!("{} in-process worker(s)", options.workers)
            };
            println!(
                "bench: {} messages, {} users, {workers} × {} slots, LLM {}±{} ms",
                options.messages,
                options.users,
                config.worker.concurrency,
                options.llm_latency_ms,
                options.llm_jitter_ms
            );
            let report = icmp::bench::run(config, &options).await?;
            print!("{report}");
        }
    }
    Ok(())
}

fn outgoing(
    target: &Target,
    conversation: Option<String>,
    message_id: Option<String>,
    text: String,
) -> Outgoing {
    Outgoing {
        business_id: target.business.clone(),
        user_id: target.user.clone(),
        content: text,
        conversation_id: conversation.or_else(|| target.conversation.clone()),
        message_id,
        metadata: None,
    }
}

fn print_reply(reply: &std::collections::HashMap<String, String>) {
    let get = |k: &str| reply.get(k).map(String::as_str).unwrap_or("");
    match get("status") {
        "error" => println!(
            "[error {} {}] {}",
            get("status_code"),
            get("error_code"),
            get("error")
        ),
        status => println!("[{status} · stage {}] {}", get("stage"), get("content")),
    }
    println!(
        "  conversation {}  log {}",
        get("conversation_id"),
        get("log_id")
    );
}

async fn chat(config: &Config, target: Target) -> Result<()> {
    let conn = cache::connect(&config.redis).await?;
    let mut conversation = target.conversation.clone();
    println!(
        "Talking to business {} as {} (Ctrl-D to quit).",
        target.business, target.user
    );
    loop {
        let Some(text) = prompt_line()? else {
            return Ok(());
        };
        let reply = client::send_and_wait(
            &conn,
            &config.streams,
            &outgoing(&target, conversation.clone(), None, text),
            Duration::from_secs(target.timeout_secs),
        )
        .await?;
        if let Some(c) = reply.get("conversation_id").filter(|c| !c.is_empty()) {
            conversation = Some(c.clone());
        }
        print_reply(&reply);
    }
}

fn print_conversation(c: &icmp::model::ConversationRecord) {
    println!(
        "conversation {} · business {} · user {} · stage {} · version {}",
        c.id, c.business_id, c.user_id, c.stage, c.version
    );
    for m in &c.messages {
        let stage = m.stage.as_deref().unwrap_or("?");
        let how = match (&m.status, &m.template, m.template_version) {
            (Some(status), Some(t), Some(v)) => format!("{stage}, {status}, {t} v{v}"),
            (Some(status), _, _) => format!("{stage}, {status}"),
            _ => stage.to_owned(),
        };
        println!(
            "{}  {:<9} ({how})  {}",
            m.created_at.format("%Y-%m-%d %H:%M:%S"),
            m.role,
            m.content
        );
    }
    let extracted = serde_json::Value::Object(c.extracted.clone());
    println!("extracted: {extracted}");
}

/// `icmp replay --record`: an interactive conversation (as `icmp chat`), written to `path` as a
/// transcript after every turn.
async fn record_transcript(
    runner: &transcript::Runner<'_>,
    business: &str,
    path: &std::path::Path,
) -> Result<()> {
    let user = format!("record-{}", uuid::Uuid::new_v4().simple());
    let mut conversation = None;
    let mut t = transcript::Transcript {
        business: business.to_owned(),
        description: String::new(),
        turns: Vec::new(),
    };
    println!("Recording to {} (Ctrl-D to finish).", path.display());
    loop {
        let Some(text) = prompt_line()? else {
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
