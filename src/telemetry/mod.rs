//! Logs (tracing, JSON or pretty), metrics (Prometheus) and the HTTP endpoint that serves
//! `/metrics`, `/healthz` and `/readyz`.

pub mod metrics;
pub mod server;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogFormat, TelemetryConfig};

/// Crates whose debug output carries data (SQL parameters, HTTP headers and bodies).
const QUIET_CRATES: [&str; 7] = [
    "tokio_postgres",
    "postgres_protocol",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "rustls",
];

/// Installs the global tracing subscriber writing to `sink`; `RUST_LOG` overrides the
/// configured filter. A second call is a no-op (tests start many workers in one process).
pub fn init_logging<W>(config: &TelemetryConfig, sink: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log_filter.clone());
    let mut filter = EnvFilter::new(&spec);
    // Dependencies that log query parameters, bodies or headers at debug level would put
    // message content, prompts or keys in the logs; they stay at info unless named explicitly.
    for chatty in QUIET_CRATES {
        if !spec.contains(chatty)
            && let Ok(directive) = format!("{chatty}=info").parse()
        {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink);
    let result = match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    // Already installed: keep the first one.
    drop(result);
}
