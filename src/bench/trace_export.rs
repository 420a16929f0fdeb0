//! `icmp bench --trace-export`: the span export's cost to the pipeline. The same flood runs with
//! worker processes exporting nothing, exporting over OTLP/gRPC to a port nothing listens on
//! (the receiver down), and exporting over OTLP/HTTP to a receiver in this process that takes
//! every batch (and counts what it got, so the run shows spans did go); each twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BenchError, BenchOptions, BenchReport};
use crate::config::{Config, OtlpProtocol};

/// The three runs, and what the live receiver got.
#[derive(Debug)]
pub struct TraceExportReport {
    pub off: BenchReport,
    pub receiver_down: BenchReport,
    pub exporting: BenchReport,
    /// Export requests and protobuf bytes the live receiver took.
    pub requests: u64,
    pub bytes: u64,
}

/// What the in-process receiver got.
#[derive(Debug, Default)]
struct Taken {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// An OTLP/HTTP receiver that answers every `POST /v1/traces` with 200 and counts it.
async fn receiver(taken: Arc<Taken>) -> Result<String, BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(BenchError::Mock)?;
    let addr = listener.local_addr().map_err(BenchError::Mock)?;
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let taken = taken.clone();
            async move {
                taken.requests.fetch_add(1, Ordering::Relaxed);
                taken.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}"))
}

/// A loopback port nothing listens on.
fn closed_port() -> Result<u16, BenchError> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").map_err(BenchError::Mock)?;
    Ok(socket.local_addr().map_err(BenchError::Mock)?.port())
}

/// Runs the three floods twice, in the order off, down, live, live, down, off (a database that
/// grows over the runs slows the later ones: each figure is the mean of an early and a late
/// run).
///
/// # Errors
/// What a benchmark run's errors are.
pub async fn run(config: Config, options: &BenchOptions) -> Result<TraceExportReport, BenchError> {
    let options = BenchOptions {
        processes: options.processes.max(1),
        trace_export: false,
        ..options.clone()
    };
    let taken = Arc::new(Taken::default());
    let live = receiver(taken.clone()).await?;
    let down = format!("http://127.0.0.1:{}", closed_port()?);
    let with = |endpoint: &str, protocol: OtlpProtocol| {
        let mut c = config.clone();
        c.telemetry.otlp_endpoint = endpoint.to_owned();
        c.telemetry.otlp_protocol = protocol;
        c
    };
    let setups = [
        with("", OtlpProtocol::Grpc),
        with(&down, OtlpProtocol::Grpc),
        with(&live, OtlpProtocol::Http),
    ];
    let mut runs: [Vec<BenchReport>; 3] = Default::default();
    for i in [0, 1, 2, 2, 1, 0] {
        runs[i].push(super::run(setups[i].clone(), &options).await?);
    }
    let [off, receiver_down, exporting] = runs.map(mean);
    Ok(TraceExportReport {
        off,
        receiver_down,
        exporting,
        requests: taken.requests.load(Ordering::Relaxed),
        bytes: taken.bytes.load(Ordering::Relaxed),
    })
}

/// The first of `reports` with the mean throughput, overhead p99 and worker CPU of all.
fn mean(mut reports: Vec<BenchReport>) -> BenchReport {
    let n = reports.len().max(1) as f64;
    let per_second = reports.iter().map(|r| r.per_second).sum::<f64>() / n;
    let p99 = reports
        .iter()
        .map(|r| r.overhead_p99.as_secs_f64())
        .sum::<f64>()
        / n;
    let cpu: Vec<f64> = vec![
        reports
            .iter()
            .map(|r| r.process_cpu_secs.iter().sum::<f64>() / r.messages.max(1) as f64)
            .sum::<f64>()
            / n,
    ];
    let mut first = reports.swap_remove(0);
    first.per_second = per_second;
    first.overhead_p99 = std::time::Duration::from_secs_f64(p99);
    // Per message, in the report's unit of seconds per run of `messages`.
    first.process_cpu_secs = cpu.iter().map(|c| c * first.messages as f64).collect();
    first
}

impl std::fmt::Display for TraceExportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let base = self.off.per_second.max(f64::MIN_POSITIVE);
        for (name, r) in [
            ("no export", &self.off),
            ("receiver down", &self.receiver_down),
            ("exporting", &self.exporting),
        ] {
            writeln!(
                f,
                "{name:<16} {:>6.0} messages/s ({:.2} of no export) · overhead p99 {:.1} ms · \
                 worker CPU {:.2} s per 1,000",
                r.per_second,
                r.per_second / base,
                r.overhead_p99.as_secs_f64() * 1000.0,
                r.process_cpu_secs.iter().sum::<f64>() * 1000.0 / r.messages.max(1) as f64,
            )?;
        }
        writeln!(
            f,
            "the live receiver took {} export requests, {} KiB of spans",
            self.requests,
            self.bytes / 1024
        )
    }
}
