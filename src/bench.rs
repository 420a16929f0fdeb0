//! `icmp bench`: a throughput and latency benchmark of the whole pipeline against the
//! configured PostgreSQL and Redis, with the mock LLM (fixed latency) in-process and one or more
//! workers in-process. It uses streams and keys of its own and leaves the demo's alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use uuid::Uuid;

use crate::cache;
use crate::config::Config;
use crate::error::{Category, Classify};
use crate::llm::mock::{self, MockOptions};
use crate::pipeline::Failpoints;
use crate::store::Store;
use crate::worker::Dependencies;

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
        let mut s: Vec<_> = self.statuses.iter().collect();
        s.sort();
        writeln!(f, "statuses       {s:?}")?;
        if let Some(kib) = self.peak_rss_kib {
            writeln!(f, "peak RSS       {} MiB", kib / 1024)?;
        }
        Ok(())
    }
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark.
///
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
    Startup(#[from] crate::worker::StartupError),
    #[error(transparent)]
    Redis(#[from] crate::error::CacheError),
}

impl From<redis::RedisError> for BenchError {
    fn from(e: redis::RedisError) -> Self {
        BenchError::Redis(e.into())
    }
}

impl Classify for BenchError {
    fn code(&self) -> &'static str {
        match self {
            BenchError::Mock(_) => "bench.mock_llm",
            BenchError::Store(e) => e.code(),
            BenchError::Import(e) => e.code(),
            BenchError::NoBusiness => "bench.no_business",
            BenchError::Startup(e) => e.code(),
            BenchError::Redis(e) => e.code(),
        }
    }
    fn category(&self) -> Category {
        match self {
            BenchError::Mock(_) => Category::System,
            BenchError::Store(e) => e.category(),
            BenchError::Import(e) => e.category(),
            BenchError::NoBusiness => Category::Validation,
            BenchError::Startup(e) => e.category(),
            BenchError::Redis(e) => e.category(),
        }
    }
    fn status_code(&self) -> u16 {
        match self {
            BenchError::Mock(_) => 500,
            BenchError::Store(e) => e.status_code(),
            BenchError::Import(e) => e.status_code(),
            BenchError::NoBusiness => 422,
            BenchError::Startup(e) => e.status_code(),
            BenchError::Redis(e) => e.status_code(),
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            BenchError::Mock(_) | BenchError::NoBusiness => false,
            BenchError::Store(e) => e.is_retryable(),
            BenchError::Import(e) => e.is_retryable(),
            BenchError::Startup(e) => e.is_retryable(),
            BenchError::Redis(e) => e.is_retryable(),
        }
    }
}

/// XADDs every message at once (each user's messages interleaved, as many producers would);
/// returns when each was sent, by message id.
async fn flood(
    c: &mut redis::aio::ConnectionManager,
    config: &Config,
    options: &BenchOptions,
    run_id: &str,
    business: &str,
) -> Result<HashMap<String, Instant>, BenchError> {
    let mut sent = HashMap::with_capacity(options.messages);
    for chunk_start in (0..options.messages).step_by(500) {
        let mut pipe = redis::pipe();
        let end = (chunk_start + 500).min(options.messages);
        for i in chunk_start..end {
            let user = format!("bench-{run_id}-u{}", i % options.users.max(1));
            let id = format!("bench-{run_id}-{i}");
            let content = match (i / options.users.max(1)) % 3 {
                0 => "Hello, are you open on Saturday?",
                1 => "I'd like to book an appointment, my name is Ada Lovelace",
                _ => "On 2026-12-03 for a cleaning, please",
            };
            pipe.xadd(
                &config.streams.inbound,
                "*",
                &[
                    ("business_id", business),
                    ("user_id", &user),
                    ("message_id", &id),
                    ("content", content),
                ],
            )
            .ignore();
            sent.insert(id, Instant::now());
        }
        let _: () = pipe.query_async(c).await?;
    }
    Ok(sent)
}

/// Reads replies until every sent message has one (or ten minutes passed); returns the sorted
/// latencies and the count per status.
async fn collect(
    c: &mut redis::aio::ConnectionManager,
    config: &Config,
    expected: usize,
    sent: &mut HashMap<String, Instant>,
) -> Result<(Vec<Duration>, HashMap<String, usize>), BenchError> {
    let mut latencies = Vec::with_capacity(expected);
    let mut statuses: HashMap<String, usize> = HashMap::new();
    let mut last = "0".to_owned();
    let deadline = Instant::now() + Duration::from_secs(600);
    while latencies.len() < expected && Instant::now() < deadline {
        let opts = StreamReadOptions::default().count(1000).block(500);
        let reply: Option<StreamReadReply> = c
            .xread_options(&[&config.streams.outbound], &[&last], &opts)
            .await?;
        let now = Instant::now();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                last = entry.id.clone();
                let field = |name: &str| match entry.map.get(name) {
                    Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => String::new(),
                };
                if let Some(t) = sent.remove(&field("message_id")) {
                    latencies.push(now - t);
                    *statuses.entry(field("status")).or_default() += 1;
                }
            }
        }
    }
    latencies.sort();
    Ok((latencies, statuses))
}

/// # Errors
/// Any failure to reach the services or to import the definition.
pub async fn run(mut config: Config, options: &BenchOptions) -> Result<BenchReport, BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(BenchError::Mock)?;
    let llm_mock = mock::spawn(
        listener,
        MockOptions {
            latency_ms: options.llm_latency_ms,
            jitter_ms: options.llm_jitter_ms,
            ..MockOptions::default()
        },
    )
    .map_err(BenchError::Mock)?;
    let run_id = Uuid::new_v4().simple().to_string();
    config.llm.base_url = llm_mock.base_url();
    config.redis.key_prefix = format!("bench:{run_id}:");
    config.streams.inbound = format!("bench:{run_id}:inbound");
    config.streams.outbound = format!("bench:{run_id}:outbound");
    config.streams.dead_letter = format!("bench:{run_id}:dead");
    config.streams.group = format!("bench-{run_id}");
    config.telemetry.listen = String::new();

    let store = Store::connect(&config.database)?;
    let reports = crate::business::import_files(&store, None, &[&options.definition]).await?;
    let business = reports
        .first()
        .map(|r| r.business_id)
        .ok_or(BenchError::NoBusiness)?;
    let deps = Dependencies::connect(&config).await?;
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for w in 0..options.workers.max(1) {
        let mut c = config.clone();
        c.streams.consumer = format!("bench-{run_id}-{w}");
        let worker = deps.worker(&c, Failpoints::default()).await?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        tasks.push(tokio::spawn(worker.run(async move {
            let _ = rx.await;
        })));
    }

    let started = Instant::now();
    // A connection of its own: blocking reads would hold up the workers' commands.
    let mut c = cache::connect(&config.redis).await?;
    let mut sent = flood(&mut c, &config, options, &run_id, &business.to_string()).await?;
    let (latencies, statuses) = collect(&mut c, &config, options.messages, &mut sent).await?;
    let elapsed = started.elapsed();
    for tx in stops {
        let _ = tx.send(());
    }
    for t in tasks {
        let _ = t.await;
    }
    let _: Result<(), _> = c
        .del(&[
            &config.streams.inbound,
            &config.streams.outbound,
            &config.streams.dead_letter,
        ])
        .await;
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
    })
}
