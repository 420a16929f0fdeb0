//! `icmp shard`: which inbound shard a user's messages go to, and that shard's stream names.

use anyhow::Result;

use icmp::config::StreamsConfig;
use icmp::protocol::inbound::{canonical_business, canonical_user};
use icmp::protocol::shard::shard_of;

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// The business id (any spelling of the UUID).
    business: String,
    /// The user id (surrounding whitespace is not part of it).
    user: String,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(streams: &StreamsConfig, args: &Args) -> Result<()> {
    let Some(business) = canonical_business(&args.business) else {
        anyhow::bail!("`{}` is not a business id (a UUID)", args.business);
    };
    let user = canonical_user(&args.user);
    let s = shard_of(&business, user, streams.shards);
    let shard = streams.shard(s);
    if args.json {
        let out = serde_json::json!({
            "shard": s,
            "shards": streams.shards,
            "inbound": shard.inbound,
            "outbound": shard.outbound,
            "dead_letter": shard.dead_letter,
            "reply_prefix": shard.reply_prefix,
        });
        println!("{out}");
    } else {
        println!("shard        {s} of {}", streams.shards);
        println!("inbound      {}", shard.inbound);
        println!("outbound     {}", shard.outbound);
        println!("dead_letter  {}", shard.dead_letter);
        println!("reply_to     {}<your suffix>", shard.reply_prefix);
    }
    Ok(())
}
