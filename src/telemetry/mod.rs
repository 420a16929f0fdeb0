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
        .with(log_layer(config, sink, traces.enabled()));
    // Already installed: keep the first one (this export is shut down unused).
    if subscriber.try_init().is_err() {
        return Traces::disabled();
    }
    traces.install();
    traces
}

/// The log lines: JSON (with the OpenTelemetry trace and span ids of the line's span when
/// spans are exported) or compact text, filtered by `log_filter`.
fn log_layer<W>(
    config: &TelemetryConfig,
    sink: W,
    traced: bool,
) -> Box<dyn Layer<Traced> + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = log_filter(config);
    match config.log_format {
        LogFormat::Json => {
            // With span export a line's span is often a phase's, which has no fields: the
            // list of its spans carries the message's (`log_id`, `inbound.id` …).
            let mut layer = json_subscriber::fmt::layer()
                .with_writer(sink)
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(traced);
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
    _ctx: &tracing_subscriber::layer::Context<'_, Traced>,
    out: &mut json_subscriber::FieldWriter<'_>,
) {
    use opentelemetry::trace::TraceContextExt;
    if !traces::exporting() {
        return;
    }
    // The event's span as the whole subscriber sees it, not as the log filter does: a line
    // logged at `warn` inside an `info` span still names it.
    let Some(cx) = tracing::dispatcher::get_default(|d| {
        let id = match event.parent() {
            Some(id) => id.clone(),
            None if event.is_contextual() => d.current_span().id()?.clone(),
            None => return None,
        };
        tracing_opentelemetry::get_otel_context(&id, d)
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
