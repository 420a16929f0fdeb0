//! `icmp console`: the web console, read-only unless `ICMP_CONSOLE_TOKEN` is set.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};

use icmp::startup::Operator;

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
}

pub(super) async fn run(operator: &Operator, args: Args) -> Result<()> {
    let config = operator.config();
    let _traces = icmp::telemetry::init_logging(&config.telemetry, std::io::stderr);
    let token = std::env::var("ICMP_CONSOLE_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(secrecy::SecretString::from);
    let writable = token.is_some();
    let console = icmp::console::Console::for_listener(
        args.listen,
        operator.redis().await?.clone(),
        operator.store().await?.clone(),
        config.redis.clone(),
        config.streams.clone(),
        config.handoff.clone(),
        token,
    )?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let mode = if writable {
        "replay and purge need the token"
    } else {
        "read-only: no ICMP_CONSOLE_TOKEN"
    };
    eprintln!(
        "console listening on http://{} ({mode})",
        listener.local_addr()?
    );
    icmp::console::serve(listener, console, super::shutdown_signal()).await?;
    Ok(())
}
