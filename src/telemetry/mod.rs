//! Logs (tracing, JSON or pretty), traces (OpenTelemetry over OTLP, [`traces`]), the trace
//! context that travels on the streams ([`trace_context`]), metrics (Prometheus) and the HTTP
//! endpoint that serves `/metrics`, `/healthz` and `/readyz`.

pub mod metrics;
pub mod server;
pub mod trace_context;
pub mod traces;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, TelemetryConfig};

pub use traces::Traces;

/// Crates whose debug output carries data (SQL parameters, HTTP headers and bodies).
const QUIET_CRATES: [&str; 9] = [
    "tokio_postgres",
    "postgres_protocol",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "rustls",
    "tonic",
    "opentelemetry",
];

/// The span export's layer (innermost).
type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// What the log layer is stacked on.
type Traced = tracing_subscriber::layer::Layered<Option<BoxedLayer>, Registry>;

/// Installs the global tracing subscriber writing logs to `sink` (`RUST_LOG` overrides the
/// configured filter) and, when `telemetry.otlp_endpoint` is set, exporting spans over OTLP.
/// A second call is a no-op (tests start many workers in one process). Keep the returned
/// [`Traces`] until the process ends: dropping it flushes the spans still queued.
pub fn init_logging<W>(config: &TelemetryConfig, sink: W) -> Traces
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let traces = Traces::start(config);
    // The log layer outermost and not in a `Vec` or an `Option`, which do not pass the
    // dispatcher on to it (it needs it to read the OpenTelemetry ids).
    let subscriber = tracing_subscriber::registry()
        .with(traces.layer())
        .with(log_layer(config, sink));
    // Already installed: keep the first one.
    if subscriber.try_init().is_err() {
        return Traces::disabled();
    }
    traces
}

/// The log lines: JSON (with the OpenTelemetry trace and span ids of the line's span when
/// spans are exported) or compact text, filtered by `log_filter`.
fn log_layer<W>(config: &TelemetryConfig, sink: W) -> Box<dyn Layer<Traced> + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = log_filter(config);
    match config.log_format {
        LogFormat::Json => {
            let mut layer = json_subscriber::fmt::layer()
                .with_writer(sink)
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false);
            layer
                .inner_layer_mut()
                .add_multiple_dynamic_fields(trace_ids);
            layer.with_filter(filter).boxed()
        }
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_writer(sink)
            .with_filter(filter)
            .boxed(),
    }
}

/// The `trace_id` and `span_id` of a log line's span, when spans are exported.
fn trace_ids(
    event: &tracing::Event<'_>,
    ctx: &tracing_subscriber::layer::Context<'_, Traced>,
    out: &mut json_subscriber::FieldWriter<'_>,
) {
    use opentelemetry::trace::TraceContextExt;
    if !traces::exporting() {
        return;
    }
    let Some(span) = ctx.event_span(event) else {
        return;
    };
    let Some(cx) = tracing::dispatcher::get_default(|d| {
        tracing_opentelemetry::get_otel_context(&span.id(), d)
    }) else {
        return;
    };
    let otel = cx.span();
    let ids = otel.span_context();
    if ids.is_valid() {
        let _ = out.write_field("trace_id", ids.trace_id().to_string());
        let _ = out.write_field("span_id", ids.span_id().to_string());
    }
}

fn log_filter(config: &TelemetryConfig) -> EnvFilter {
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
    filter
}
