//! `icmp trace`: everything known about one message.

use anyhow::Result;

use icmp::personal_data::audit;
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
    if t.found() {
        // Read access to user data is audited before anything is shown.
        let counts = [
            ("messages".to_owned(), t.messages.len() as u64),
            ("llm_calls".to_owned(), t.llm_calls.len() as u64),
            ("replies".to_owned(), t.replies.len() as u64),
            ("dead_letters".to_owned(), t.dead_letters.len() as u64),
        ]
        .into();
        let mut record = audit::record(&audit::actor(), "trace.read")
            .target(t.reference())
            .counts(&counts);
        if let Some(business) = t.business_id() {
            record = record.business(business);
        }
        super::audit(operator, record).await?;
    }
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
