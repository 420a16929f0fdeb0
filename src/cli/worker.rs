//! `icmp worker`: one worker process in the consumer group, until SIGINT or SIGTERM.

use anyhow::Result;

use icmp::config::Config;
use icmp::pipeline::Failpoints;
use icmp::startup::Application;

pub(super) async fn run(config: Config) -> Result<()> {
    let _traces = icmp::telemetry::init_logging(&config.telemetry, std::io::stderr);
    let app = Application::build(&config, Failpoints::from_env()).await?;
    app.run_until_stopped(super::stop_on_signal()).await;
    Ok(())
}
