//! `icmp reshard`: ends a move between shard layouts (`streams.previous_shards` shards to
//! `streams.shards`): waits until the previous layout has drained, then switches every worker
//! to the new one (docs/operations.md, "Changing the number of shards").

use std::time::{Duration, Instant};

use anyhow::Result;
use redis::AsyncCommands;

use icmp::startup::Operator;
use icmp::stream::resharding::{self, Remains};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Give up (exit 1) when the previous layout has not drained after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Only show what is left in the previous layout, and whether the switch happened.
    #[arg(long)]
    status: bool,
}

pub(super) async fn run(operator: &Operator, args: Args) -> Result<()> {
    let config = operator.config();
    let (s, prefix) = (&config.streams, &config.redis.key_prefix);
    let Some(old) = resharding::previous_layout(s) else {
        anyhow::bail!(
            "no move under way: set streams.previous_shards to the shard count you move from \
             (docs/operations.md, \"Changing the number of shards\")"
        );
    };
    let conn = operator.redis().await?;
    let marker = resharding::marker_key(s, prefix, s.previous_shards);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut shown = Vec::new();
    loop {
        if conn.clone().exists::<_, bool>(&marker).await? {
            println!(
                "switched: the workers read the {} shards of the new layout; the {} of the \
                 previous one refuse what still reaches them (validation.wrong_shard)",
                s.shards, s.previous_shards
            );
            return Ok(());
        }
        let remains = resharding::remains(conn, &old, prefix).await?;
        if remains != shown {
            for r in &remains {
                let lag = r.lag.map_or("unknown".to_owned(), |l| l.to_string());
                println!(
                    "{}: lag {lag} · pending {} · queues in use {}{}",
                    r.stream,
                    r.pending,
                    r.queues_in_use,
                    if r.drained() { " · drained" } else { "" }
                );
            }
            shown = remains.clone();
        }
        if args.status {
            return Ok(());
        }
        if remains.iter().all(Remains::drained) {
            resharding::mark_switched(conn, s, prefix).await?;
            continue;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the previous layout has not drained in {} s (are its workers running, and \
                 have every producer moved to {} shards?)",
                args.timeout_secs,
                s.shards
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
