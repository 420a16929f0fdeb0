//! `icmp mock-llm`: serve the OpenAI-compatible mock LLM.

use std::net::SocketAddr;

use anyhow::Result;

use icmp::config::Config;
use icmp::llm::mock::{self, MockOptions};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    #[command(flatten)]
    options: MockOptions,
}

pub(super) async fn run(config: &Config, args: Args) -> Result<()> {
    let _traces = icmp::telemetry::init_logging(&config.telemetry, std::io::stderr);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("mock LLM listening on http://{}/v1", listener.local_addr()?);
    mock::serve(listener, args.options, super::shutdown_signal()).await?;
    Ok(())
}
