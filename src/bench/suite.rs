//! `icmp bench --suite`: every scenario the performance targets name, run one after the other
//! on the same machine, and one table of each figure against its target (plus a JSON line).

use super::{BenchError, BenchOptions, BenchReport, run};
use crate::config::Config;

/// The figures of a suite run.
#[derive(Debug)]
pub struct SuiteReport {
    /// LLM latency 0, all messages at once, every one continuing a conversation, with the
    /// pgbench ceiling (group commit as configured).
    pub flood: BenchReport,
    /// The same with group commit off (`worker.commit_batch_max = 1`), its own ceiling.
    pub flood_alone: BenchReport,
    /// LLM latency 0, all messages at once, each from a new user.
    pub new_users: BenchReport,
    /// The flood answered by the peer of the seed's design instead (the reason it could not
    /// run otherwise).
    pub peer: Result<BenchReport, String>,
    /// Low load (100 messages/s), group commit as configured, and off.
    pub low_load: BenchReport,
    pub low_load_alone: BenchReport,
    /// LLM latency 300 ms, enough users for 4,000 messages in flight.
    pub in_flight: BenchReport,
    /// The same as one `icmp worker` process: the worker's own memory.
    pub in_flight_worker: BenchReport,
    /// The same again with `llm.http_version = "1.1"` (one connection per call in flight).
    pub in_flight_http1: BenchReport,
    /// LLM latency 0, paced at half the flood's throughput.
    pub paced: BenchReport,
    /// The flood again with 1, 2 and 4 worker processes.
    pub scale: Vec<BenchReport>,
}

/// Lets the database finish what the last scenario left (autovacuum, checkpoint writes), so
/// that it does not weigh on the next one.
async fn settle() {
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
}

fn scenario(base: &BenchOptions) -> BenchOptions {
    BenchOptions {
        suite: false,
        llm_jitter_ms: 0,
        workers: 1,
        processes: 0,
        rate: 0.0,
        pgbench_seconds: 0,
        ..base.clone()
    }
}

/// The group-commit scenarios' figures.
struct Commits {
    flood: BenchReport,
    flood_alone: BenchReport,
    new_users: BenchReport,
    low_load: BenchReport,
    low_load_alone: BenchReport,
}

/// The flood of continuing conversations with group commit as configured and off, a flood of
/// new users, and low load with group commit on and off.
async fn group_commit(
    config: &Config,
    options: &BenchOptions,
    flood_options: &BenchOptions,
) -> Result<Commits, BenchError> {
    let mut alone = config.clone();
    alone.worker.commit_batch_max = 1;
    eprintln!("suite: flood of continuing conversations, LLM 0 ms, with the pgbench ceiling");
    let flood = run(config.clone(), flood_options).await?;
    settle().await;
    eprintln!("suite: the same, group commit off");
    let flood_alone = run(alone.clone(), flood_options).await?;
    settle().await;
    eprintln!("suite: flood of new users, LLM 0 ms");
    let new_users = run(
        config.clone(),
        &BenchOptions {
            users: flood_options.messages,
            pgbench_seconds: 0,
            warm_up: false,
            ..flood_options.clone()
        },
    )
    .await?;
    settle().await;
    let low_options = BenchOptions {
        messages: 1500,
        users: 500,
        llm_latency_ms: 0,
        rate: 100.0,
        warm_up: true,
        ..scenario(options)
    };
    eprintln!("suite: 100 messages/s, LLM 0 ms, group commit on, then off");
    let low_load = run(config.clone(), &low_options).await?;
    settle().await;
    let low_load_alone = run(alone, &low_options).await?;
    settle().await;
    Ok(Commits {
        flood,
        flood_alone,
        new_users,
        low_load,
        low_load_alone,
    })
}

/// The flood with 1, 2 and 4 worker processes.
async fn scale_out(
    config: &Config,
    flood_options: &BenchOptions,
) -> Result<Vec<BenchReport>, BenchError> {
    let mut scale = Vec::new();
    for processes in [1, 2, 4] {
        settle().await;
        eprintln!("suite: {processes} worker process(es), LLM 0 ms");
        scale.push(
            run(
                config.clone(),
                &BenchOptions {
                    processes,
                    ..flood_options.clone()
                },
            )
            .await
            .map(|mut r| {
                // The ceiling is the flood's; scale-out runs skip it.
                r.ceiling_tps = None;
                r
            })?,
        );
    }
    Ok(scale)
}

/// Runs the suite.
///
/// # Errors
/// Any scenario's failure.
pub async fn run_suite(config: Config, options: &BenchOptions) -> Result<SuiteReport, BenchError> {
    let flood_options = BenchOptions {
        messages: 6000,
        users: 1200,
        llm_latency_ms: 0,
        pgbench_seconds: options.pgbench_seconds.max(1),
        warm_up: true,
        ..scenario(options)
    };
    let commits = group_commit(&config, options, &flood_options).await?;
    let flood = commits.flood;
    eprintln!("suite: the same flood, answered by the peer of the seed's design");
    let peer = run(
        config.clone(),
        &BenchOptions {
            peer: true,
            pgbench_seconds: 0,
            ..flood_options.clone()
        },
    )
    .await
    .map_err(|e| {
        format!("{e} (the peer needs python3 with asyncpg, aiohttp and redis: pip install them)")
    });
    settle().await;
    eprintln!("suite: 4,000 in flight, LLM 300 ms");
    let in_flight = run(
        config.clone(),
        &BenchOptions {
            messages: 8000,
            users: 4000,
            llm_latency_ms: 300,
            ..scenario(options)
        },
    )
    .await?;
    settle().await;
    let worker_options = BenchOptions {
        messages: 8000,
        users: 4000,
        llm_latency_ms: 300,
        processes: 1,
        ..scenario(options)
    };
    eprintln!("suite: 4,000 in flight, LLM 300 ms, one worker process");
    let in_flight_worker = run(config.clone(), &worker_options).await?;
    settle().await;
    eprintln!("suite: 4,000 in flight, LLM 300 ms, one worker process, HTTP/1.1 to the LLM");
    let mut http1 = config.clone();
    http1.llm.http_version = crate::llm::transport::HttpVersion::Http1;
    let in_flight_http1 = run(http1, &worker_options).await?;
    let rate = (flood.per_second / 2.0).max(1.0);
    settle().await;
    eprintln!("suite: paced at {rate:.0} messages/s, LLM 0 ms");
    let paced = run(
        config.clone(),
        &BenchOptions {
            messages: ((rate * 8.0) as usize).max(200),
            users: 800,
            llm_latency_ms: 0,
            rate,
            ..scenario(options)
        },
    )
    .await?;
    let scale = scale_out(&config, &flood_options).await?;
    Ok(SuiteReport {
        flood,
        peer,
        flood_alone: commits.flood_alone,
        new_users: commits.new_users,
        low_load: commits.low_load,
        low_load_alone: commits.low_load_alone,
        in_flight,
        in_flight_worker,
        in_flight_http1,
        paced,
        scale,
    })
}

/// One target: what was measured, the bound, and whether it was met.
struct Row {
    target: &'static str,
    measured: String,
    met: bool,
}

impl SuiteReport {
    /// The group-commit targets.
    fn commit_rows(&self) -> Vec<Row> {
        let f = &self.flood;
        let ratio = f.ratio().unwrap_or(0.0);
        let a = &self.flood_alone;
        let ratio_alone = a.ratio().unwrap_or(0.0);
        let new_user = self.new_users.per_second / f.per_second.max(1e-9);
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let added_p50 = ms(self.low_load.overhead_p50) - ms(self.low_load_alone.overhead_p50);
        vec![
            Row {
                target: "group commit: throughput > 1.0 of the same-run pgbench (LLM 0 ms)",
                measured: format!(
                    "{:.0} msg/s, {ratio:.2} of {:.0} write sets/s",
                    f.per_second,
                    f.ceiling_tps.unwrap_or(0.0)
                ),
                met: ratio > 1.0,
            },
            Row {
                target: "  the same, group commit off (commit_batch_max = 1)",
                measured: format!(
                    "{:.0} msg/s, {ratio_alone:.2} of {:.0}; on/off {:.2}",
                    a.per_second,
                    a.ceiling_tps.unwrap_or(0.0),
                    f.per_second / a.per_second.max(1e-9)
                ),
                met: f.per_second >= a.per_second,
            },
            Row {
                target: "group commit adds < 2 ms to the overhead p50 at low load",
                measured: format!(
                    "p50 {:.1} ms on, {:.1} ms off at 100 msg/s ({added_p50:+.1})",
                    ms(self.low_load.overhead_p50),
                    ms(self.low_load_alone.overhead_p50)
                ),
                met: added_p50 < 2.0,
            },
            Row {
                target: "a new user costs <= 1.25x a continuing one",
                measured: format!(
                    "{:.0} msg/s new = {new_user:.2} of continuing",
                    self.new_users.per_second
                ),
                met: new_user >= 0.8,
            },
            match &self.peer {
                Ok(p) => {
                    let times = f.per_second / p.per_second.max(1e-9);
                    Row {
                        target: ">= 8x a peer of the seed's design (LLM 0 ms)",
                        measured: format!("{times:.1}x its {:.0} msg/s", p.per_second),
                        met: times >= 8.0,
                    }
                }
                Err(e) => Row {
                    target: ">= 8x a peer of the seed's design (LLM 0 ms)",
                    measured: format!("not run: {e}"),
                    met: false,
                },
            },
        ]
    }

    fn rows(&self) -> Vec<Row> {
        let f = &self.flood;
        let cpu = f.cpu_per_1000().unwrap_or(f64::INFINITY);
        let held = self.in_flight.per_second / f.per_second.max(1e-9);
        let worker_mb = |r: &BenchReport| {
            r.process_peak_rss_kib
                .first()
                .map_or(f64::INFINITY, |k| *k as f64 * 1024.0 / 1e6)
        };
        let rss_mb = worker_mb(&self.in_flight_worker);
        let overhead_p99 = self.paced.overhead_p99.as_secs_f64() * 1000.0;
        let mut rows = self.commit_rows();
        rows.extend([
            Row {
                target: "worker CPU <= 0.25 s per 1,000 messages",
                measured: format!("{cpu:.3} s"),
                met: cpu <= 0.25,
            },
            Row {
                target: "Redis commands per message <= 12",
                measured: format!("{:.1}", f.redis_per_message()),
                met: f.redis_per_message() <= 12.0,
            },
            Row {
                target: "PostgreSQL round trips per message <= 4",
                measured: format!("{:.2}", f.db_round_trips_per_message),
                met: f.db_round_trips_per_message <= 4.0,
            },
            Row {
                target: "LLM 300 ms: throughput >= 0.85 of the 0 ms figure",
                measured: format!(
                    "{:.0} msg/s = {held:.2}, {} in flight",
                    self.in_flight.per_second, self.in_flight.peak_in_flight
                ),
                met: held >= 0.85,
            },
            Row {
                target: "RSS <= 150 MB at 4,000 in flight (worker process)",
                measured: format!(
                    "{rss_mb:.0} MB, {:.0} msg/s ({} in flight in-process)",
                    self.in_flight_worker.per_second, self.in_flight.peak_in_flight
                ),
                met: rss_mb <= 150.0 && self.in_flight.peak_in_flight >= 4000,
            },
            {
                let h1 = &self.in_flight_http1;
                let mb = worker_mb(h1);
                Row {
                    target: "  the same, HTTP/1.1 to the LLM (llm.http_version = 1.1)",
                    measured: format!(
                        "{mb:.0} MB, {:.0} msg/s = {:.2}",
                        h1.per_second,
                        h1.per_second / f.per_second.max(1e-9)
                    ),
                    met: mb <= 150.0,
                }
            },
            Row {
                target: "overhead p99 <= 15 ms at half the maximum throughput",
                measured: format!(
                    "p99 {overhead_p99:.1} ms (p50 {:.1}) at {:.0} msg/s",
                    self.paced.overhead_p50.as_secs_f64() * 1000.0,
                    self.paced.rate.unwrap_or(0.0)
                ),
                met: overhead_p99 <= 15.0,
            },
        ]);
        rows
    }

    /// Every figure as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        let targets: Vec<serde_json::Value> = self
            .rows()
            .iter()
            .map(|r| serde_json::json!({"target": r.target, "measured": r.measured, "met": r.met}))
            .collect();
        serde_json::json!({
            "targets": targets,
            "flood": self.flood.json(),
            "flood_alone": self.flood_alone.json(),
            "peer": self.peer.as_ref().map(BenchReport::json).unwrap_or_else(|e| serde_json::json!({"error": e})),
            "new_users": self.new_users.json(),
            "low_load": self.low_load.json(),
            "low_load_alone": self.low_load_alone.json(),
            "in_flight": self.in_flight.json(),
            "in_flight_worker": self.in_flight_worker.json(),
            "in_flight_http1": self.in_flight_http1.json(),
            "paced": self.paced.json(),
            "scale_out": self.scale.iter().map(BenchReport::json).collect::<Vec<_>>(),
        })
    }
}

impl std::fmt::Display for SuiteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:<62} {:<44} met", "target", "measured")?;
        for r in self.rows() {
            let met = if r.met { "yes" } else { "no" };
            writeln!(f, "{:<62} {:<44} {met}", r.target, r.measured)?;
        }
        writeln!(f)?;
        writeln!(f, "scale-out (LLM 0 ms):")?;
        for r in &self.scale {
            let each: Vec<String> = r
                .process_cpu_secs
                .iter()
                .map(|c| format!("{c:.2}"))
                .collect();
            writeln!(
                f,
                "  {} process(es): {:.0} msg/s, CPU-s each [{}]; saturation: {}",
                r.process_cpu_secs.len(),
                r.per_second,
                each.join(", "),
                r.saturation()
            )?;
        }
        writeln!(f, "json {}", self.json())
    }
}
