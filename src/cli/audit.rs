//! `icmp audit`: the operators' audit trail, newest first.

use anyhow::{Context as _, Result};

use icmp::personal_data::Subject;
use icmp::personal_data::audit::AuditFilter;
use icmp::startup::Operator;

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Only records of this business.
    #[arg(long)]
    business: Option<String>,
    /// Only records of this user (with --business).
    #[arg(long, requires = "business")]
    user: Option<String>,
    /// Only records of this action (`user.erase`, `dlq.replay`, …).
    #[arg(long)]
    action: Option<String>,
    #[arg(long, default_value_t = 50)]
    count: i64,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(operator: &Operator, args: Args) -> Result<()> {
    let business = args
        .business
        .as_deref()
        .map(|b| {
            icmp::protocol::inbound::canonical_business(b).context("--business must be a UUID")
        })
        .transpose()?;
    let user_key = match (&args.business, &args.user) {
        (Some(b), Some(u)) => Some(
            Subject::new(b, u)
                .context("--user must not be blank")?
                .key(),
        ),
        _ => None,
    };
    let filter = AuditFilter {
        business_id: business,
        user_key,
        action: args.action,
        limit: args.count,
    };
    for record in operator.store().await?.audit_log(&filter).await? {
        if args.json {
            println!("{}", serde_json::to_string(&record)?);
        } else {
            println!("{record}");
        }
    }
    Ok(())
}
