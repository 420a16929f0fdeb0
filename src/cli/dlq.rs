//! `icmp dlq`: list, show, replay and purge dead letters.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::Result;

use icmp::config::StreamsConfig;
use icmp::personal_data::audit;
use icmp::redis_connection::RedisConnection;
use icmp::startup::Operator;
use icmp::stream::dlq;

#[derive(Debug, clap::Subcommand)]
pub(super) enum Action {
    /// Show the oldest dead letters with their error, and how many there are by error code.
    List {
        #[command(flatten)]
        filter: Filter,
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
        filter: Filter,
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead letters a command is about.
#[derive(Debug, clap::Args)]
pub(super) struct Filter {
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

impl Filter {
    fn filter(&self) -> dlq::Filter {
        dlq::Filter {
            business: self.business.clone(),
            code: self.code.clone(),
            older_than: self.older_than_secs.map(Duration::from_secs),
        }
    }
}

pub(super) async fn run(operator: &Operator, action: Action) -> Result<()> {
    let conn = operator.redis().await?;
    let streams = &operator.config().streams;
    match action {
        Action::List {
            filter,
            count,
            json,
        } => list(conn, streams, &filter, count, json).await,
        Action::Show { id, json } => {
            let Some(d) = dlq::show(conn, streams, &id).await? else {
                anyhow::bail!("no dead letter {id}");
            };
            // Read access to user data is audited before anything is shown.
            let mut record = audit::record(&audit::actor(), "dlq.read").target(id.clone());
            if let Some(subject) =
                icmp::personal_data::Subject::new(&d.field("business_id"), &d.field("user_id"))
            {
                record = record.business(subject.business).user(subject.key());
            }
            super::audit(operator, record).await?;
            show(&d, json);
            Ok(())
        }
        Action::Purge { ids, filter, yes } => {
            let removed = purge(conn, streams, ids, &filter, yes).await?;
            if removed.is_empty() {
                return Ok(());
            }
            let counts = BTreeMap::from([("dead_letters".to_owned(), removed.len() as u64)]);
            let record = audit::record(&audit::actor(), "dlq.purge")
                .target(super::audit_target(&removed))
                .counts(&counts);
            super::audit(operator, record).await
        }
        Action::Replay { ids } => {
            let done = dlq::replay(conn, streams, &ids).await?;
            println!("replayed {} of {}: {done:?}", done.len(), ids.len());
            let counts = BTreeMap::from([("dead_letters".to_owned(), done.len() as u64)]);
            let record = audit::record(&audit::actor(), "dlq.replay")
                .target(super::audit_target(&ids))
                .counts(&counts);
            super::audit(operator, record).await
        }
    }
}

async fn list(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    filter: &Filter,
    count: usize,
    json: bool,
) -> Result<()> {
    let found = dlq::find(conn, streams, &filter.filter(), count).await?;
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
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
        let counts: Vec<String> = by_code.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        println!(
            "{} dead letter(s) shown; {}",
            found.len(),
            counts.join(", ")
        );
    }
    Ok(())
}

fn show(d: &dlq::DeadLetter, json: bool) {
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

async fn purge(
    conn: &RedisConnection,
    streams: &StreamsConfig,
    ids: Vec<String>,
    filter: &Filter,
    yes: bool,
) -> Result<Vec<String>> {
    let ids = if ids.is_empty() {
        let f = filter.filter();
        if f.business.is_none() && f.code.is_none() && f.older_than.is_none() {
            anyhow::bail!("name the dead letters to purge: ids, or filters");
        }
        dlq::find(conn, streams, &f, usize::MAX)
            .await?
            .into_iter()
            .map(|d| d.id)
            .collect()
    } else {
        ids
    };
    if ids.is_empty() {
        println!("nothing to purge");
        return Ok(Vec::new());
    }
    if !yes && !confirm(&format!("Delete {} dead letter(s)?", ids.len()))? {
        println!("nothing removed");
        return Ok(Vec::new());
    }
    let removed = dlq::purge(conn, streams, &ids).await?;
    for id in &removed {
        println!("removed {id}");
    }
    tracing::info!(count = removed.len(), "dead letters purged");
    println!("removed {} of {}", removed.len(), ids.len());
    Ok(removed)
}

/// Asks `question [y/N]` on the terminal.
fn confirm(question: &str) -> Result<bool> {
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
