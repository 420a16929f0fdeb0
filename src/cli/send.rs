//! `icmp send` and `icmp chat`: talk to a running worker through the streams.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;

use icmp::producer::{self, Outgoing};
use icmp::startup::Operator;

/// Whom a message goes to, as whom, and how long to wait for the reply.
#[derive(Debug, clap::Args)]
pub(super) struct Target {
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
    /// After the reply, wait up to this many seconds for a follow-up of an action the message
    /// fired (a booking's confirmation), and print it.
    #[arg(long, default_value_t = 0.0)]
    follow_ups_secs: f64,
}

impl Target {
    fn follow_ups_within(&self) -> Duration {
        Duration::try_from_secs_f64(self.follow_ups_secs).unwrap_or_default()
    }
}

#[derive(Debug, clap::Args)]
pub(super) struct SendArgs {
    #[command(flatten)]
    target: Target,
    /// Idempotency key of the message.
    #[arg(long)]
    message_id: Option<String>,
    /// The message text.
    text: String,
}

/// `icmp send`: one message, its reply printed; exit 1 when the reply is an error.
pub(super) async fn send(operator: &Operator, args: SendArgs) -> Result<()> {
    let got = producer::exchange(
        operator.redis().await?,
        &operator.config().streams,
        &outgoing(&args.target, None, args.message_id, args.text),
        Duration::from_secs(args.target.timeout_secs),
        args.target.follow_ups_within(),
    )
    .await?;
    print_exchange(&got);
    let reply = got.reply;
    if reply.get("status").map(String::as_str) == Some("error") {
        // Scripts can tell an error reply from an answer by the exit code.
        anyhow::bail!(
            "the reply is an error: {}",
            reply.get("error_code").cloned().unwrap_or_default()
        );
    }
    Ok(())
}

/// `icmp chat`: one message per line read, each reply printed, in one conversation.
pub(super) async fn chat(operator: &Operator, target: Target) -> Result<()> {
    let conn = operator.redis().await?;
    let mut conversation = target.conversation.clone();
    println!(
        "Talking to business {} as {} (Ctrl-D to quit).",
        target.business, target.user
    );
    loop {
        let Some(text) = super::prompt_line()? else {
            return Ok(());
        };
        let got = producer::exchange(
            conn,
            &operator.config().streams,
            &outgoing(&target, conversation.clone(), None, text),
            Duration::from_secs(target.timeout_secs),
            target.follow_ups_within(),
        )
        .await?;
        if let Some(c) = got.reply.get("conversation_id").filter(|c| !c.is_empty()) {
            conversation = Some(c.clone());
        }
        print_exchange(&got);
    }
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

fn print_exchange(got: &producer::Exchange) {
    print_reply(&got.reply);
    for f in &got.follow_ups {
        let get = |k: &str| f.get(k).map(String::as_str).unwrap_or("");
        println!("[follow-up · action {}] {}", get("action"), get("content"));
    }
}

fn print_reply(reply: &HashMap<String, String>) {
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
