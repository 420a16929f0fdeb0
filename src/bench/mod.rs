//! `icmp bench`: a throughput and latency benchmark of the whole pipeline against the
//! configured PostgreSQL and Redis, with the mock LLM (fixed latency) in a child process and one
//! or more workers in this process. It uses streams and keys of its own and leaves the demo's
//! alone. Besides throughput and latency it reports what the run cost: this process's CPU per
//! 1,000 messages, Redis commands per message (`INFO commandstats`, the producer's and reader's
//! own subtracted), Redis's CPU, and the same-run ceiling: `pgbench` running an equivalent
//! write-set transaction ([`ceiling`]), with the ratio of the two.

pub mod ceiling;
pub mod probe;
pub mod processes;
pub mod retention;
pub mod suite;
pub mod trace_export;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use uuid::Uuid;

use crate::config::Config;
use crate::pipeline::Failpoints;
use crate::redis_connection::RedisConnection;
use crate::startup::{Application, Operator};
use crate::store::Store;
use crate::worker::WorkerStats;

/// What to run (also the arguments of `icmp bench`).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    #[arg(long, default_value_t = 2000)]
    pub messages: usize,
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Worker instances in this process (each with `worker.concurrency` slots).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Mock LLM latency per call.
    #[arg(long, default_value_t = 50)]
    pub llm_latency_ms: u64,
    #[arg(long, default_value_t = 20)]
    pub llm_jitter_ms: u64,
    /// Business definition to import and address.
    #[arg(long, default_value = "config/businesses/demo.toml")]
    pub definition: std::path::PathBuf,
    /// How long `pgbench` runs the equivalent write set after the run (0: skip the ceiling).
    #[arg(long, default_value_t = 10)]
    pub pgbench_seconds: u64,
    /// `pgbench` connections.
    #[arg(long, default_value_t = 16)]
    pub pgbench_clients: usize,
    /// Paced mode: send this many messages per second (0: send them all at once, a flood).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Scale-out mode: run the workers as this many `icmp worker` processes instead of inside
    /// the benchmark (0: in-process, `--workers` of them).
    #[arg(long, default_value_t = 0)]
    pub processes: usize,
    /// Inbound shards (`streams.shards`; 0: as configured). Messages go to their users'
    /// shards and replies are read from every shard; on a Redis Cluster the report shows each
    /// master's share of the commands.
    #[arg(long, default_value_t = 0)]
    pub shards: u32,
    /// Run the peer of the seed's design (`scripts/seed-peer.py`: Python, one transaction
    /// held across each message's LLM calls) instead of icmp's workers, for comparison.
    #[arg(long)]
    pub peer: bool,
    /// Each user sends one message first, answered before the run starts and not measured,
    /// so that every measured message continues a conversation.
    #[arg(long)]
    pub warm_up: bool,
    /// Run every scenario of the performance targets (a flood of continuing conversations with
    /// its ceiling, with group commit and without, a flood of new users, low load with group
    /// commit and without, the seed's design's peer, 4,000 in flight at 300 ms, paced at half
    /// the flood's throughput, 1/2/4 processes) and print the targets table; the other options
    /// are ignored.
    #[arg(long)]
    pub suite: bool,
    /// Measure the retention sweep's cost: the flood once as is, then again while the sweep
    /// deletes this many old conversations of 10 messages (stored before the run), and print
    /// the two throughputs (0: off).
    #[arg(long, default_value_t = 0)]
    pub retention_backlog: usize,
    /// Measure the span export's cost: the flood with worker processes (`--processes`, at
    /// least 1) exporting no spans, exporting to an OTLP receiver that is down, and exporting
    /// to a live one (in this process), and print the three throughputs.
    #[arg(long)]
    pub trace_export: bool,
}

/// One Redis master's part of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MasterShare {
    pub node: String,
    pub commands: u64,
    pub cpu_secs: f64,
}

/// The figures of one run.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub messages: usize,
    pub elapsed: Duration,
    pub per_second: f64,
    /// End-to-end latency (XADD → reply read), flood load: includes queueing.
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub statuses: HashMap<String, usize>,
    /// Peak resident memory of this process, in KiB.
    pub peak_rss_kib: Option<u64>,
    /// CPU seconds this process (workers, producer, reader) used during the run.
    pub cpu_secs: Option<f64>,
    /// Redis commands the workers caused, by command (script-internal calls included).
    pub redis_commands: std::collections::BTreeMap<String, u64>,
    /// Redis's CPU seconds during the run (every master's).
    pub redis_cpu_secs: f64,
    /// Each master's commands (all of the workers' and the benchmark's own) and CPU seconds
    /// during the run: one entry for one server.
    pub redis_masters: Vec<MasterShare>,
    /// Inbound shards of the run.
    pub shards: u32,
    /// `pgbench` transactions per second of the equivalent write set, right after the run.
    pub ceiling_tps: Option<f64>,
    /// Why the ceiling is missing, if it is.
    pub ceiling_error: Option<String>,
    /// PostgreSQL statements (round trips) the workers sent, per message.
    pub db_round_trips_per_message: f64,
    /// The most messages processed at once (all workers together).
    pub peak_in_flight: u64,
    /// Overhead latency: end to end minus the time inside LLM calls (p50, p99).
    pub overhead_p50: Duration,
    pub overhead_p99: Duration,
    /// The send rate in paced mode.
    pub rate: Option<f64>,
    /// Scale-out mode: each worker process's CPU seconds.
    pub process_cpu_secs: Vec<f64>,
    /// Scale-out mode: each worker process's peak resident memory (KiB); the worker's own
    /// figure, without the benchmark's producer and reader.
    pub process_peak_rss_kib: Vec<u64>,
    /// CPU seconds of PostgreSQL's processes and of the mock LLM during the run.
    pub postgres_cpu_secs: f64,
    /// [`BenchReport::postgres_cpu_secs`] by server port (each node of a Citus cluster).
    pub postgres_cpu_by_server: std::collections::BTreeMap<u16, f64>,
    pub mock_cpu_secs: f64,
    /// The machine's busy share of all its cores during the run, and how many cores it has.
    pub machine_busy: Option<f64>,
    pub cores: usize,
    /// What the retention sweep removed during the run (`--retention-backlog`).
    pub retention_swept: Option<crate::personal_data::retention::Swept>,
}

impl BenchReport {
    /// CPU seconds the workers used: the worker processes', else this process's.
    pub fn worker_cpu_secs(&self) -> Option<f64> {
        if self.process_cpu_secs.is_empty() {
            self.cpu_secs
        } else {
            Some(self.process_cpu_secs.iter().sum())
        }
    }

    /// Which resource ran out: the machine's CPU (and who used most of it), else none.
    pub fn saturation(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let mut users = [
            ("workers", self.worker_cpu_secs().unwrap_or(0.0)),
            ("postgres", self.postgres_cpu_secs),
            ("redis", self.redis_cpu_secs),
            ("mock LLM", self.mock_cpu_secs),
        ];
        users.sort_by(|a, b| b.1.total_cmp(&a.1));
        let shares: Vec<String> = users
            .iter()
            .map(|(who, cpu)| format!("{who} {:.2} cores", cpu / secs))
            .collect();
        let busy = self.machine_busy.unwrap_or(0.0);
        let verdict = if busy >= 0.9 {
            format!(
                "the machine's CPU ({} cores, {:.0} % busy)",
                self.cores,
                busy * 100.0
            )
        } else {
            format!("nothing saturated ({:.0} % busy)", busy * 100.0)
        };
        format!("{verdict}; {}", shares.join(", "))
    }
}

impl BenchReport {
    /// Redis commands per message.
    pub fn redis_per_message(&self) -> f64 {
        self.redis_commands.values().sum::<u64>() as f64 / self.messages.max(1) as f64
    }

    /// Worker CPU seconds per 1,000 messages.
    pub fn cpu_per_1000(&self) -> Option<f64> {
        self.worker_cpu_secs()
            .map(|c| c * 1000.0 / self.messages.max(1) as f64)
    }

    /// Throughput as a share of the ceiling.
    pub fn ratio(&self) -> Option<f64> {
        self.ceiling_tps
            .filter(|t| *t > 0.0)
            .map(|t| self.per_second / t)
    }

    /// Every figure as one JSON object (for scripts).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "messages": self.messages,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "throughput_per_s": self.per_second,
            "latency_ms": {
                "p50": self.p50.as_millis() as u64,
                "p95": self.p95.as_millis() as u64,
                "p99": self.p99.as_millis() as u64,
                "max": self.max.as_millis() as u64,
            },
            "statuses": self.statuses,
            "peak_rss_mib": self.peak_rss_kib.map(|k| k / 1024),
            "cpu_s": self.cpu_secs,
            "cpu_s_per_1000_messages": self.cpu_per_1000(),
            "redis_commands_per_message": self.redis_per_message(),
            "redis_commands": self.redis_commands,
            "redis_cpu_s": self.redis_cpu_secs,
            "redis_masters": self.redis_masters,
            "shards": self.shards,
            "ceiling_tps": self.ceiling_tps,
            "ratio_to_ceiling": self.ratio(),
            "db_round_trips_per_message": self.db_round_trips_per_message,
            "peak_in_flight": self.peak_in_flight,
            "overhead_ms": {
                "p50": self.overhead_p50.as_secs_f64() * 1000.0,
                "p99": self.overhead_p99.as_secs_f64() * 1000.0,
            },
            "rate_per_s": self.rate,
            "process_cpu_s": self.process_cpu_secs,
            "process_peak_rss_mib": self.process_peak_rss_kib.iter().map(|k| k / 1024).collect::<Vec<_>>(),
            "postgres_cpu_s": self.postgres_cpu_secs,
            "postgres_cpu_s_by_server": self.postgres_cpu_by_server,
            "mock_cpu_s": self.mock_cpu_secs,
            "machine_busy": self.machine_busy,
            "cores": self.cores,
            "saturation": self.saturation(),
        })
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "messages       {}", self.messages)?;
        writeln!(f, "elapsed        {:.2} s", self.elapsed.as_secs_f64())?;
        writeln!(f, "throughput     {:.0} messages/s", self.per_second)?;
        writeln!(
            f,
            "latency        p50 {} ms · p95 {} ms · p99 {} ms · max {} ms",
            self.p50.as_millis(),
            self.p95.as_millis(),
            self.p99.as_millis(),
            self.max.as_millis()
        )?;
        writeln!(
            f,
            "overhead       p50 {:.1} ms · p99 {:.1} ms (end to end minus time in LLM calls)",
            self.overhead_p50.as_secs_f64() * 1000.0,
            self.overhead_p99.as_secs_f64() * 1000.0
        )?;
        if let Some(rate) = self.rate {
            writeln!(f, "paced          {rate:.0} messages/s sent")?;
        }
        writeln!(f, "in flight      {} at most", self.peak_in_flight)?;
        let mut s: Vec<_> = self.statuses.iter().collect();
        s.sort();
        writeln!(f, "statuses       {s:?}")?;
        if let Some(kib) = self.peak_rss_kib {
            writeln!(f, "peak RSS       {} MiB", kib / 1024)?;
        }
        if let Some(per) = self.cpu_per_1000() {
            writeln!(f, "worker CPU     {per:.3} s per 1,000 messages")?;
        }
        if !self.process_cpu_secs.is_empty() {
            let each: Vec<String> = self
                .process_cpu_secs
                .iter()
                .map(|c| format!("{c:.2}"))
                .collect();
            let rss: Vec<String> = self
                .process_peak_rss_kib
                .iter()
                .map(|k| format!("{} MiB", k / 1024))
                .collect();
            writeln!(
                f,
                "processes      {} (CPU-s each: {}; peak RSS each: {})",
                each.len(),
                each.join(", "),
                rss.join(", ")
            )?;
        }
        self.write_costs(f)
    }
}

impl BenchReport {
    /// The cost lines of the report: saturation, PostgreSQL and Redis work per message, the
    /// ceiling, and the whole report as JSON.
    fn write_costs(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "saturation     {}", self.saturation())?;
        let mut top: Vec<_> = self.redis_commands.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = top
            .iter()
            .take(6)
            .map(|(k, v)| format!("{k} {:.1}", **v as f64 / self.messages.max(1) as f64))
            .collect();
        if self.process_cpu_secs.is_empty() {
            writeln!(
                f,
                "postgres       {:.2} round trips per message",
                self.db_round_trips_per_message
            )?;
        }
        let servers: Vec<String> = self
            .postgres_cpu_by_server
            .iter()
            .filter(|(_, cpu)| **cpu >= 0.01)
            .map(|(port, cpu)| format!(":{port} {cpu:.2}"))
            .collect();
        writeln!(
            f,
            "postgres CPU   {:.2} CPU-s (by server: {})",
            self.postgres_cpu_secs,
            servers.join(" · ")
        )?;
        writeln!(
            f,
            "redis          {:.1} commands per message ({}), {:.2} CPU-s",
            self.redis_per_message(),
            top.join(", "),
            self.redis_cpu_secs
        )?;
        if self.redis_masters.len() > 1 {
            let all: u64 = self.redis_masters.iter().map(|m| m.commands).sum();
            let each: Vec<String> = self
                .redis_masters
                .iter()
                .map(|m| {
                    let share = m.commands as f64 / all.max(1) as f64 * 100.0;
                    format!(
                        "{} {share:.0} % of commands, {:.2} CPU-s",
                        m.node, m.cpu_secs
                    )
                })
                .collect();
            writeln!(
                f,
                "masters        {} shard(s): {}",
                self.shards,
                each.join(" · ")
            )?;
        }
        match (self.ceiling_tps, &self.ceiling_error) {
            (Some(tps), _) => writeln!(
                f,
                "ceiling        pgbench {tps:.0} write sets/s; throughput is {:.2} of it",
                self.ratio().unwrap_or(0.0)
            )?,
            (None, Some(e)) => writeln!(f, "ceiling        not measured: {e}")?,
            (None, None) => writeln!(f, "ceiling        not measured")?,
        }
        writeln!(f, "json           {}", self.json())?;
        Ok(())
    }
}

/// Resets this process's peak RSS (`VmHWM`), so that each run reports its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_kib() -> Option<u64> {
    probe::peak_rss_kib_of("self")
}

fn sorted(mut durations: Vec<Duration>) -> Vec<Duration> {
    durations.sort();
    durations
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("mock LLM: {0}")]
    Mock(std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
    #[error(transparent)]
    Import(#[from] crate::business::ImportError),
    #[error("the definition file holds no business")]
    NoBusiness,
    #[error(transparent)]
    Startup(#[from] crate::startup::StartupError),
    #[error(transparent)]
    Redis(#[from] crate::error::CacheError),
}

impl From<redis::RedisError> for BenchError {
    fn from(e: redis::RedisError) -> Self {
        BenchError::Redis(e.into())
    }
}

/// The `i`th message of a run: (user, message id, content). Each user's messages are
/// interleaved with everyone else's, as many producers would send them.
fn message(options: &BenchOptions, run_id: &str, i: usize) -> (String, String, &'static str) {
    let users = options.users.max(1);
    let content = match (i / users) % 3 {
        0 => "Hello, are you open on Saturday?",
        1 => "I'd like to book an appointment, my name is Ada Lovelace",
        _ => "On 2026-12-03 for a cleaning, please",
    };
    (
        format!("bench-{run_id}-u{}", i % users),
        format!("bench-{run_id}-{i}"),
        content,
    )
}

type SentAt = std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>>;

/// XADDs the messages: all at once (in pipelines of 500), or `options.rate` a second in
/// 10 ms ticks; records when each was sent.
async fn send(
    mut c: RedisConnection,
    config: Config,
    options: BenchOptions,
    run_id: String,
    business: String,
    sent: SentAt,
    numbers: std::ops::Range<usize>,
) -> Result<(), BenchError> {
    let per_tick = if options.rate > 0.0 {
        (options.rate / 100.0).max(0.01)
    } else {
        500.0
    };
    let started = Instant::now();
    let mut i = numbers.start;
    let mut tick = 0u64;
    while i < numbers.end {
        let due = if options.rate > 0.0 {
            numbers.start + ((tick + 1) as f64 * per_tick).floor() as usize
        } else {
            i + 500
        };
        let end = due.min(numbers.end);
        if end > i {
            // One pipeline per shard: on a cluster a pipeline serves one slot.
            let mut pipes: HashMap<u32, redis::Pipeline> = HashMap::new();
            let mut ids = Vec::with_capacity(end - i);
            for n in i..end {
                let (user, id, content) = message(&options, &run_id, n);
                let shard = config.streams.for_fields(&business, &user);
                let pipe = pipes.entry(shard.shard.unwrap_or(0)).or_default();
                pipe.xadd(
                    &shard.inbound,
                    "*",
                    &[
                        ("business_id", business.as_str()),
                        ("user_id", &user),
                        ("message_id", &id),
                        ("content", content),
                    ],
                )
                .ignore();
                ids.push(id);
            }
            let now = Instant::now();
            if let Ok(mut map) = sent.lock() {
                map.extend(ids.into_iter().map(|id| (id, now)));
            }
            for pipe in pipes.values() {
                let _: () = pipe.query_async(&mut c).await?;
            }
            i = end;
        }
        tick += 1;
        if options.rate > 0.0 {
            let next = started + Duration::from_millis(10 * tick);
            tokio::time::sleep_until(next.into()).await;
        }
    }
    Ok(())
}

/// Reads replies from every shard's outbound stream until every sent message has one (or ten
/// minutes passed); returns the sorted latencies, the count per status and how many reads it
/// made. With one shard the reads block; with several each is a non-blocking read of one
/// stream (a read on a cluster serves one slot), with a short pause after a round that found
/// nothing.
async fn collect(
    c: &mut RedisConnection,
    config: &Config,
    expected: usize,
    sent: &SentAt,
) -> Result<(Vec<(String, Duration)>, HashMap<String, usize>, u64), BenchError> {
    let outbound: Vec<String> = config
        .streams
        .all_shards()
        .into_iter()
        .map(|s| s.outbound)
        .collect();
    let mut lasts = vec!["0".to_owned(); outbound.len()];
    let mut latencies = Vec::with_capacity(expected);
    let mut statuses: HashMap<String, usize> = HashMap::new();
    let mut reads = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while latencies.len() < expected && Instant::now() < deadline {
        let mut found = 0;
        for (stream, last) in outbound.iter().zip(&mut lasts) {
            reads += 1;
            let mut opts = StreamReadOptions::default().count(1000);
            if outbound.len() == 1 {
                opts = opts.block(500);
            }
            let reply: Option<StreamReadReply> = c
                .xread_options(&[stream.as_str()], &[last.as_str()], &opts)
                .await?;
            let now = Instant::now();
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                for entry in key.ids {
                    found += 1;
                    last.clone_from(&entry.id);
                    let field = |name: &str| match entry.map.get(name) {
                        Some(redis::Value::BulkString(b)) => {
                            String::from_utf8_lossy(b).into_owned()
                        }
                        _ => String::new(),
                    };
                    let id = field("message_id");
                    let at = sent.lock().ok().and_then(|mut m| m.remove(&id));
                    if let Some(t) = at {
                        latencies.push((id, now - t));
                        *statuses.entry(field("status")).or_default() += 1;
                    }
                }
            }
        }
        if found == 0 && outbound.len() > 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok((latencies, statuses, reads))
}

/// With `--warm-up`, one message of each user, answered before the measured run; their
/// numbers come after the measured ones.
async fn warm_up(
    operator: &Operator,
    c: &mut RedisConnection,
    config: &Config,
    options: &BenchOptions,
    run_id: &str,
    business: Uuid,
) -> Result<(), BenchError> {
    if !options.warm_up {
        return Ok(());
    }
    let first = options.messages;
    let users = options.users.max(1);
    let warm = SentAt::default();
    send(
        operator.own_redis().await?,
        config.clone(),
        BenchOptions {
            rate: 0.0,
            ..options.clone()
        },
        run_id.to_owned(),
        business.to_string(),
        warm.clone(),
        first..first + users,
    )
    .await?;
    collect(c, config, users, &warm).await?;
    Ok(())
}

/// Runs the benchmark: imports the definition, starts the workers and the mock LLM, sends
/// `options.messages` messages and measures what they cost.
///
/// # Errors
/// Any failure to reach the services or to import the definition.
pub async fn run(mut config: Config, options: &BenchOptions) -> Result<BenchReport, BenchError> {
    reset_peak_rss();
    let mock = MockProcess::start(options.llm_latency_ms, options.llm_jitter_ms).await?;
    let run_id = Uuid::new_v4().simple().to_string();
    isolate(&mut config, &run_id, mock.base_url(), options.shards).await?;
    let operator = Operator::new(&config);
    let store = operator.store().await?.clone();
    let business = import_business(&store, options).await?;
    let workers = Workers::start(&config, options, &run_id, &operator).await?;

    // A connection of its own: blocking reads would hold up the workers' commands.
    let mut c = operator.own_redis().await?;
    warm_up(&operator, &mut c, &config, options, &run_id, business).await?;
    let sweep = retention::SweepLoop::start_with(&config, options, &store, business).await?;
    let before = Baseline::take(&c, &workers, &mock).await?;
    let started = Instant::now();
    let sent = SentAt::default();
    let sender = tokio::spawn(send(
        operator.own_redis().await?,
        config.clone(),
        options.clone(),
        run_id.clone(),
        business.to_string(),
        sent.clone(),
        0..options.messages,
    ));
    let (per_message, statuses, reads) = collect(&mut c, &config, options.messages, &sent).await?;
    let elapsed = started.elapsed();
    let retention_swept = retention::SweepLoop::stop_any(sweep).await;
    let db_round_trips = workers.round_trips() - before.round_trips;
    let (process_cpu_secs, process_peak_rss_kib) = workers.children_usage(&before);
    let (postgres_cpu_secs, postgres_cpu_by_server) = before.postgres_usage();
    let mock_cpu_secs = mock.cpu_secs() - before.mock;
    let machine_busy = before.machine_busy();
    sender.await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the sender task failed");
        Ok(())
    })?;
    let latencies = sorted(per_message.iter().map(|(_, d)| *d).collect());
    let overheads = sorted(overheads(&store, business, &per_message).await?);
    let cpu_secs = before.cpu_since();
    let (redis_commands, redis_cpu_secs, redis_masters) = before
        .redis_since(&c, options.messages as u64, reads)
        .await?;
    let peak_in_flight = workers.peak_in_flight();
    workers.stop().await;
    remove_streams(&mut c, &config).await;
    drop(mock);
    let (ceiling_tps, ceiling_error) = ceiling(&config, options, &store, business).await?;
    Ok(BenchReport {
        messages: latencies.len(),
        elapsed,
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p95: percentile(&latencies, 0.95),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        statuses,
        peak_rss_kib: peak_rss_kib(),
        cpu_secs,
        redis_commands,
        redis_cpu_secs,
        redis_masters,
        shards: config.streams.shards,
        ceiling_tps,
        ceiling_error,
        db_round_trips_per_message: db_round_trips as f64 / latencies.len().max(1) as f64,
        peak_in_flight,
        overhead_p50: percentile(&overheads, 0.50),
        overhead_p99: percentile(&overheads, 0.99),
        rate: (options.rate > 0.0).then_some(options.rate),
        process_cpu_secs,
        process_peak_rss_kib,
        postgres_cpu_secs,
        postgres_cpu_by_server,
        mock_cpu_secs,
        machine_busy,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        retention_swept,
    })
}

/// Imports the run's business definition; returns its id.
async fn import_business(store: &Store, options: &BenchOptions) -> Result<Uuid, BenchError> {
    crate::business::import_files(store, None, &[&options.definition])
        .await?
        .first()
        .map(|r| r.business_id)
        .ok_or(BenchError::NoBusiness)
}

/// Removes the run's streams (best effort; one shard's streams share a slot).
async fn remove_streams(conn: &mut RedisConnection, config: &Config) {
    for s in config.streams.all_shards() {
        let _: Result<(), _> = conn.del(&[&s.inbound, &s.outbound, &s.dead_letter]).await;
    }
}

/// Streams, keys and a group of the run's own, `shards` inbound shards (0: as configured), and
/// the mock LLM at `llm`. One shard on a cluster names its streams with one hash tag.
async fn isolate(
    config: &mut Config,
    run_id: &str,
    llm: String,
    shards: u32,
) -> Result<(), BenchError> {
    let cluster = crate::redis_connection::connect(&config.redis)
        .await?
        .is_cluster();
    config.llm.base_url = llm;
    config.redis.key_prefix = format!("bench:{run_id}:");
    if shards > 0 {
        config.streams.shards = shards;
    }
    let base = if cluster && config.streams.shards == 1 {
        format!("{{bench-{run_id}}}")
    } else {
        format!("bench:{run_id}")
    };
    config.streams.inbound = format!("{base}:inbound");
    config.streams.outbound = format!("{base}:outbound");
    config.streams.dead_letter = format!("{base}:dead");
    config.streams.reply_prefix = format!("{base}:reply:");
    config.streams.group = format!("bench-{run_id}");
    config.telemetry.listen = String::new();
    Ok(())
}

/// The run's workers: in this process (each built as `icmp worker` builds one), or `icmp
/// worker` children.
struct Workers {
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stats: Vec<std::sync::Arc<WorkerStats>>,
    stores: Vec<Store>,
    children: Option<processes::WorkerProcesses>,
}

impl Workers {
    async fn start(
        config: &Config,
        options: &BenchOptions,
        run_id: &str,
        operator: &Operator,
    ) -> Result<Workers, BenchError> {
        let mut workers = Workers {
            stop: tokio_util::sync::CancellationToken::new(),
            tasks: Vec::new(),
            stats: Vec::new(),
            stores: Vec::new(),
            children: None,
        };
        if options.peer || options.processes > 0 {
            let mut procs = if options.peer {
                processes::WorkerProcesses::start_peer(config, run_id)?
            } else {
                processes::WorkerProcesses::start(config, options.processes, run_id)?
            };
            procs.wait_ready(operator.redis().await?, config).await?;
            workers.children = Some(procs);
            return Ok(workers);
        }
        for w in 0..options.workers.max(1) {
            let mut c = config.clone();
            c.streams.consumer = format!("bench-{run_id}-{w}");
            let app = Application::build(&c, Failpoints::default()).await?;
            workers.stats.push(app.worker().stats().clone());
            workers.stores.push(app.store().clone());
            let stop = workers.stop.clone();
            workers
                .tasks
                .push(tokio::spawn(app.run_until_stopped(stop)));
        }
        Ok(workers)
    }

    /// PostgreSQL statements the in-process workers sent so far.
    fn round_trips(&self) -> u64 {
        self.stores.iter().map(Store::round_trips).sum()
    }

    fn peak_in_flight(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| WorkerStats::get(&s.peak_running))
            .sum()
    }

    fn children_cpu(&self) -> Vec<f64> {
        self.children
            .as_ref()
            .map(processes::WorkerProcesses::cpu_secs)
            .unwrap_or_default()
    }

    /// Each child's CPU seconds since `before`, and its peak RSS in KiB.
    fn children_usage(&self, before: &Baseline) -> (Vec<f64>, Vec<u64>) {
        let cpu = self
            .children_cpu()
            .iter()
            .zip(&before.children)
            .map(|(after, before)| after - before)
            .collect();
        let rss = self
            .children
            .as_ref()
            .map(processes::WorkerProcesses::peak_rss_kib)
            .unwrap_or_default();
        (cpu, rss)
    }

    async fn stop(mut self) {
        self.stop.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        self.children.take();
    }
}

/// A run that fails midway stops its in-process workers too (the children are killed by
/// their own drop).
impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The counters a run's figures are measured from.
struct Baseline {
    redis: probe::MasterCounters,
    cpu: Option<f64>,
    children: Vec<f64>,
    postgres: std::collections::BTreeMap<u32, f64>,
    mock: f64,
    machine: Option<(u64, u64)>,
    round_trips: u64,
}

impl Baseline {
    /// The share of the machine's CPU time that was busy since the baseline.
    fn machine_busy(&self) -> Option<f64> {
        self.machine
            .zip(probe::machine_ticks())
            .map(|((b0, t0), (b1, t1))| (b1 - b0) as f64 / (t1 - t0).max(1) as f64)
    }

    /// The workers' Redis commands since the baseline, and Redis's CPU seconds: the
    /// producer's `sent` XADDs, the reader's `reads` XREADs and the probes' INFOs are not the
    /// workers'.
    fn workers_redis(
        &self,
        after: &probe::MasterCounters,
        sent: u64,
        reads: u64,
    ) -> (std::collections::BTreeMap<String, u64>, f64) {
        let before = probe::RedisCounters::total(&self.redis);
        let (mut commands, cpu) = before.delta(&probe::RedisCounters::total(after));
        for (command, own) in [("xadd", sent), ("xread", reads)] {
            if let Some(n) = commands.get_mut(command) {
                *n = n.saturating_sub(own);
            }
        }
        commands.remove("info");
        (commands, cpu)
    }

    /// The workers' Redis commands and Redis's CPU seconds since the baseline
    /// ([`Baseline::workers_redis`]), and each master's share.
    async fn redis_since(
        &self,
        conn: &RedisConnection,
        sent: u64,
        reads: u64,
    ) -> Result<
        (
            std::collections::BTreeMap<String, u64>,
            f64,
            Vec<MasterShare>,
        ),
        BenchError,
    > {
        let after = probe::RedisCounters::read_masters(conn).await?;
        let (commands, cpu) = self.workers_redis(&after, sent, reads);
        Ok((commands, cpu, self.masters(&after)))
    }

    /// Each master's commands and CPU seconds since the baseline.
    fn masters(&self, after: &probe::MasterCounters) -> Vec<MasterShare> {
        after
            .iter()
            .map(|(node, later)| {
                let (calls, cpu_secs) = self
                    .redis
                    .get(node)
                    .cloned()
                    .unwrap_or_default()
                    .delta(later);
                MasterShare {
                    node: node.clone(),
                    commands: calls
                        .iter()
                        .filter(|(k, _)| k.as_str() != "info")
                        .map(|(_, v)| v)
                        .sum(),
                    cpu_secs,
                }
            })
            .collect()
    }

    async fn take(
        conn: &RedisConnection,
        workers: &Workers,
        mock: &MockProcess,
    ) -> Result<Baseline, BenchError> {
        Ok(Baseline {
            redis: probe::RedisCounters::read_masters(conn).await?,
            cpu: probe::process_cpu_secs(),
            children: workers.children_cpu(),
            postgres: probe::postgres_cpu(),
            mock: mock.cpu_secs(),
            machine: probe::machine_ticks(),
            round_trips: workers.round_trips(),
        })
    }

    /// This process's CPU seconds since this baseline.
    fn cpu_since(&self) -> Option<f64> {
        self.cpu.zip(probe::process_cpu_secs()).map(|(a, b)| b - a)
    }

    /// PostgreSQL's CPU seconds since this baseline: in all, and by server.
    fn postgres_usage(&self) -> (f64, std::collections::BTreeMap<u16, f64>) {
        let now = probe::postgres_cpu();
        (
            probe::postgres_delta(&self.postgres, &now),
            probe::postgres_delta_by_server(&self.postgres, &now),
        )
    }
}

/// The same-run ceiling: `pgbench` running the worker's write set (`None` when not asked
/// for, with the reason when it could not run).
async fn ceiling(
    config: &Config,
    options: &BenchOptions,
    store: &Store,
    business: Uuid,
) -> Result<(Option<f64>, Option<String>), BenchError> {
    if options.pgbench_seconds == 0 {
        return Ok((None, None));
    }
    let refs = ceiling_refs(store, business).await?;
    let (database, clients, secs) = (
        config.database.clone(),
        options.pgbench_clients,
        options.pgbench_seconds,
    );
    let result = tokio::task::spawn_blocking(move || ceiling::run(&database, &refs, clients, secs))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    Ok(match result {
        Ok(tps) => (Some(tps), None),
        Err(e) => (None, Some(e)),
    })
}

/// Each message's end-to-end latency minus the time its LLM calls took (from `llm_calls`).
async fn overheads(
    store: &Store,
    business: Uuid,
    per_message: &[(String, Duration)],
) -> Result<Vec<Duration>, BenchError> {
    let keys: Vec<&str> = per_message.iter().map(|(id, _)| id.as_str()).collect();
    let in_llm: HashMap<String, i64> = store.llm_time_by_key(business, &keys).await?;
    Ok(per_message
        .iter()
        .map(|(id, e2e)| {
            let llm = in_llm.get(id).copied().unwrap_or(0).max(0) as u64;
            e2e.saturating_sub(Duration::from_millis(llm))
        })
        .collect())
}

/// The business's initial stage and its response template, for the ceiling's rows.
async fn ceiling_refs(store: &Store, business_id: Uuid) -> Result<ceiling::Refs, BenchError> {
    let business = store
        .load_business(business_id)
        .await?
        .ok_or(BenchError::NoBusiness)?;
    let stage_id = business.initial_stage_id;
    let templates = store
        .load_stage_templates(business_id, stage_id)
        .await?
        .ok_or(BenchError::NoBusiness)?;
    Ok(ceiling::Refs {
        business_id,
        stage_id,
        template_id: templates.response,
    })
}

/// The mock LLM as a child process (`icmp mock-llm`), so that its CPU is not counted as the
/// workers'. Killed on drop.
struct MockProcess {
    child: std::process::Child,
    port: u16,
}

impl MockProcess {
    async fn start(latency_ms: u64, jitter_ms: u64) -> Result<MockProcess, BenchError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BenchError::Mock)?
            .port();
        let exe = std::env::current_exe().map_err(BenchError::Mock)?;
        let child = std::process::Command::new(exe)
            .arg("mock-llm")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--latency-ms")
            .arg(latency_ms.to_string())
            .arg("--jitter-ms")
            .arg(jitter_ms.to_string())
            .env("ICMP__TELEMETRY__LOG_FILTER", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(BenchError::Mock)?;
        let mock = MockProcess { child, port };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(mock);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(BenchError::Mock(std::io::Error::other(
            "the mock LLM did not start",
        )))
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

impl MockProcess {
    /// The mock's CPU seconds so far.
    fn cpu_secs(&self) -> f64 {
        probe::cpu_secs_of(&self.child.id().to_string()).unwrap_or(0.0)
    }
}

impl Drop for MockProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
