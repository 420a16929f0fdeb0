//! `icmp bench`: one benchmark run, or the suite of them (`--suite`).

use anyhow::Result;

use icmp::bench::BenchOptions;
use icmp::config::Config;

pub(super) async fn run(config: Config, options: BenchOptions) -> Result<()> {
    let _traces = icmp::telemetry::init_logging(&config.telemetry, std::io::stderr);
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
    if options.retention_backlog > 0 {
        return retention(config, options).await;
    }
    if options.trace_export {
        print!(
            "{}",
            icmp::bench::trace_export::run(config, &options).await?
        );
        return Ok(());
    }
    let report = icmp::bench::run(config, &options).await?;
    print!("{report}");
    Ok(())
}

/// The flood without the retention sweep, then with it deleting a backlog.
async fn retention(config: Config, options: BenchOptions) -> Result<()> {
    let without = icmp::bench::run(
        config.clone(),
        &BenchOptions {
            retention_backlog: 0,
            ..options.clone()
        },
    )
    .await?;
    let with = icmp::bench::run(config, &options).await?;
    let swept = with.retention_swept.clone().unwrap_or_default();
    let secs = with.elapsed.as_secs_f64();
    println!(
        "without the sweep  {:.0} messages/s · overhead p99 {:.1} ms",
        without.per_second,
        without.overhead_p99.as_secs_f64() * 1000.0
    );
    println!(
        "with the sweep     {:.0} messages/s · overhead p99 {:.1} ms ({:.2} of without)",
        with.per_second,
        with.overhead_p99.as_secs_f64() * 1000.0,
        with.per_second / without.per_second.max(f64::MIN_POSITIVE)
    );
    println!(
        "swept meanwhile    {} messages, {} prompts blanked, {} conversations, {} users \
         ({:.0} messages/s)",
        swept.messages,
        swept.llm_prompts,
        swept.conversations,
        swept.users,
        swept.messages as f64 / secs
    );
    Ok(())
}
