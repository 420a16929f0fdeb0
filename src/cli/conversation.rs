//! `icmp conversation show`: a stored conversation, its messages and the data extracted.

use anyhow::{Context as _, Result};

use icmp::model::ConversationRecord;
use icmp::personal_data::audit;
use icmp::startup::Operator;
use icmp::store::conversations::ConversationRef;

#[derive(Debug, clap::Subcommand)]
pub(super) enum Action {
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

pub(super) async fn run(operator: &Operator, action: Action) -> Result<()> {
    let Action::Show {
        id,
        business,
        user,
        json,
        jsonl,
    } = action;
    let which = match (&id, &business, &user) {
        (Some(id), None, None) => ConversationRef::Id(
            uuid::Uuid::parse_str(id).context("the conversation id is not a UUID")?,
        ),
        (None, Some(b), Some(u)) => ConversationRef::Latest {
            business_id: uuid::Uuid::parse_str(b).context("the business id is not a UUID")?,
            user: u,
        },
        _ => anyhow::bail!("give a conversation id, or --business and --user"),
    };
    let Some(c) = operator.store().await?.conversation_record(which).await? else {
        anyhow::bail!("no such conversation");
    };
    // Read access to user data is audited before anything is shown.
    let counts = [("messages".to_owned(), c.messages.len() as u64)].into();
    let record = audit::record(&audit::actor(), "conversation.read")
        .business(c.business_id)
        .user(icmp::store::write_set::user_key(&c.user_id))
        .target(c.id.to_string())
        .counts(&counts);
    super::audit(operator, record).await?;
    if json {
        println!("{}", serde_json::to_string(&c)?);
    } else if jsonl {
        for m in &c.messages {
            println!("{}", serde_json::to_string(m)?);
        }
    } else {
        print_conversation(&c);
    }
    Ok(())
}

fn print_conversation(c: &ConversationRecord) {
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
