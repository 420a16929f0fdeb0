//! `icmp handoff`: list the conversations with a person, hand one over, give one back.

use anyhow::{Result, bail};
use uuid::Uuid;

use icmp::personal_data::audit;
use icmp::startup::Operator;

#[derive(Debug, clap::Subcommand)]
pub(super) enum Action {
    /// The conversations with a person, the oldest handoff first.
    List {
        #[arg(long)]
        business: Option<Uuid>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Hand a conversation to a person: its user's messages go to the agents' stream.
    Start { conversation: Uuid },
    /// Give a conversation back to the bot (with the agents' turns in its history).
    End { conversation: Uuid },
}

pub(super) async fn run(operator: &Operator, action: Action) -> Result<()> {
    let store = operator.store().await?;
    match action {
        Action::List { business, json } => {
            let rows = store.list_handoffs(business).await?;
            for r in &rows {
                if json {
                    println!("{}", serde_json::to_string(r)?);
                } else {
                    println!(
                        "{}  {}  user {}  stage {}  since {}  by {}{}",
                        r.conversation_id,
                        r.business_id,
                        r.user_id,
                        r.stage,
                        r.handoff.since,
                        r.handoff.by,
                        if r.handoff.answered == Some(true) {
                            "  answered"
                        } else {
                            ""
                        }
                    );
                }
            }
            if !json {
                println!("{} conversation(s) with a person", rows.len());
            }
            Ok(())
        }
        Action::Start { conversation } => {
            let cache = operator.cache().await?;
            let config = &operator.config().handoff;
            if !icmp::handoff::start_by_operator(store, &cache, config, conversation).await? {
                bail!("no conversation {conversation} without a person");
            }
            println!("conversation {conversation} handed to a person");
            let record =
                audit::record(&audit::actor(), "handoff.start").target(conversation.to_string());
            super::audit(operator, record).await
        }
        Action::End { conversation } => {
            let cache = operator.cache().await?;
            if !icmp::handoff::end_by_operator(store, &cache, conversation).await? {
                bail!("no conversation {conversation} with a person");
            }
            println!("conversation {conversation} given back to the bot");
            let record =
                audit::record(&audit::actor(), "handoff.end").target(conversation.to_string());
            super::audit(operator, record).await
        }
    }
}
