//! `icmp migrate`: apply the SQL migrations (idempotent).

use anyhow::Result;

use icmp::config::Config;

pub(super) async fn run(config: &Config) -> Result<()> {
    let applied = icmp::store::migrate(&config.database).await?;
    if applied.is_empty() {
        println!("database is up to date");
    } else {
        println!("applied migrations: {applied:?}");
    }
    Ok(())
}
