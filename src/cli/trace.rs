//! `icmp trace`: everything known about one message.

use anyhow::Result;

use icmp::startup::Operator;

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// A message_id, log_id or inbound entry id.
    id: String,
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(operator: &Operator, args: Args) -> Result<()> {
    let config = operator.config();
    let t = icmp::trace::trace(
        operator.redis().await?,
        &config.streams,
        operator.store().await?,
        &args.id,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string(&t)?);
    } else {
        print!("{t}");
    }
    if !t.found() {
        anyhow::bail!("nothing found for {}", args.id);
    }
    Ok(())
}
