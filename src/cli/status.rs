//! `icmp status`: lag, consumers, queues, dead letters and per-business figures.

use anyhow::Result;

use icmp::startup::Operator;

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// The window of the per-business figures.
    #[arg(long, default_value_t = 15)]
    minutes: u64,
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(operator: &Operator, args: Args) -> Result<()> {
    let config = operator.config();
    let status = icmp::status::read(
        operator.redis().await?,
        &config.redis,
        &config.streams,
        operator.store().await?,
        args.minutes,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        print!("{status}");
    }
    Ok(())
}
