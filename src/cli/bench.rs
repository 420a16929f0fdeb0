//! `icmp bench`: one benchmark run, or the suite of them (`--suite`).

use anyhow::Result;

use icmp::bench::BenchOptions;
use icmp::config::Config;

pub(super) async fn run(config: Config, options: BenchOptions) -> Result<()> {
    icmp::telemetry::init_logging(&config.telemetry, std::io::stderr);
    if options.suite {
        let report = icmp::bench::suite::run_suite(config, &options).await?;
        print!("{report}");
        return Ok(());
    }
    let workers = if options.processes > 0 {
        format!("{} worker process(es)", options.processes)
    } else {
        format!("{} in-process worker(s)", options.workers)
    };
    println!(
        "bench: {} messages, {} users, {workers} × {} slots, LLM {}±{} ms",
        options.messages,
        options.users,
        config.worker.concurrency,
        options.llm_latency_ms,
        options.llm_jitter_ms
    );
    let report = icmp::bench::run(config, &options).await?;
    print!("{report}");
    Ok(())
}
