//! `icmp actions`: list, show, retry and cancel stage actions' requests (the outbox).

use anyhow::{Context, Result, bail};
use uuid::Uuid;

use icmp::personal_data::audit;
use icmp::startup::Operator;

#[derive(Debug, clap::Subcommand)]
pub(super) enum Action {
    /// The newest requests, with their status and last outcome.
    List {
        #[arg(long)]
        business: Option<Uuid>,
        /// pending, delivered, rejected, dead or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        count: i64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Every field of one request (exit 1 when there is none with that id).
    Show { id: Uuid },
    /// Send requests that ended (dead, rejected, cancelled) again.
    Retry {
        #[arg(required = true)]
        ids: Vec<Uuid>,
    },
    /// Cancel pending requests.
    Cancel {
        #[arg(required = true)]
        ids: Vec<Uuid>,
    },
}

pub(super) async fn run(operator: &Operator, action: Action) -> Result<()> {
    let store = operator.store().await?;
    match action {
        Action::List {
            business,
            status,
            count,
            json,
        } => {
            let rows = store
                .list_actions(business, status.as_deref(), count)
                .await?;
            for r in &rows {
                if json {
                    println!("{}", serde_json::to_string(r)?);
                } else {
                    println!(
                        "{}  {:<10} {:<20} attempts {}/{}  last {}  {}",
                        r.id,
                        r.status,
                        r.action,
                        r.attempts,
                        r.max_attempts,
                        r.last_status.map_or("-".to_owned(), |s| s.to_string()),
                        r.last_error.as_deref().unwrap_or("")
                    );
                }
            }
            if !json {
                println!("{} request(s)", rows.len());
            }
            Ok(())
        }
        Action::Show { id } => match store.action(id).await? {
            Some(r) => {
                println!("{}", serde_json::to_string_pretty(&r)?);
                Ok(())
            }
            None => bail!("no action request {id}"),
        },
        Action::Retry { ids } => {
            let done = store.retry_actions(&ids).await.context("retry")?;
            println!("sent again: {} of {}: {done:?}", done.len(), ids.len());
            let counts = [("action_requests".to_owned(), done.len() as u64)].into();
            let record = audit::record(&audit::actor(), "actions.retry")
                .target(super::audit_target(&ids))
                .counts(&counts);
            super::audit(operator, record).await
        }
        Action::Cancel { ids } => {
            let done = store.cancel_actions(&ids).await.context("cancel")?;
            println!("cancelled: {} of {}: {done:?}", done.len(), ids.len());
            let counts = [("action_requests".to_owned(), done.len() as u64)].into();
            let record = audit::record(&audit::actor(), "actions.cancel")
                .target(super::audit_target(&ids))
                .counts(&counts);
            super::audit(operator, record).await
        }
    }
}
