//! The OpenTelemetry span export: a tracer provider whose batch processor sends spans over OTLP
//! (gRPC or HTTP/protobuf) from a thread of its own, and the `tracing` layer that turns the
//! code's `tracing` spans into OpenTelemetry spans (one instrumentation, bridged).
//!
//! The pipeline never waits for the export: spans go to a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048) that drops what does not fit, and the batches leave every
//! `OTEL_BSP_SCHEDULE_DELAY` ms (5000) from the processor's own thread. With no endpoint
//! configured there is no layer at all: spans cost what they cost before.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use tracing::{Level, Metadata};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;

use super::BoxedLayer;
use crate::config::{OtlpProtocol, TelemetryConfig};

/// The instrumentation scope of icmp's spans.
pub const SCOPE: &str = "icmp";

/// The tracer of this process's export (set once, by [`Traces::install`]).
static TRACER: std::sync::OnceLock<opentelemetry_sdk::trace::SdkTracer> =
    std::sync::OnceLock::new();

/// The tracer the message spans of [`super::trace_context`] come from; `None` without export.
pub fn tracer() -> Option<&'static opentelemetry_sdk::trace::SdkTracer> {
    TRACER.get()
}

/// Whether this process exports spans: without export, no span of the OpenTelemetry API is
/// made at all.
pub fn exporting() -> bool {
    tracer().is_some()
}

/// A `tracing` span for one phase of the pipeline (`read`, `persist` …), made only when spans
/// are exported: without export nobody reads it (log lines show the message's span), and a
/// span costs a few microseconds.
macro_rules! phase_span {
    ($name:literal) => {
        if $crate::telemetry::traces::exporting() {
            ::tracing::info_span!($name)
        } else {
            ::tracing::Span::none()
        }
    };
}
pub(crate) use phase_span;

/// The process's span export (or none). Dropping it flushes the queued spans and stops the
/// export thread.
#[derive(Debug, Default)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// No export.
    #[must_use]
    pub fn disabled() -> Traces {
        Traces::default()
    }

    /// Starts the export `config` asks for ([`Traces::install`] makes it the process's). A
    /// configuration the exporter refuses is reported once and leaves the process without
    /// export: traces are not worth refusing to answer users for.
    pub fn start(config: &TelemetryConfig) -> Traces {
        if config.otlp_endpoint.is_empty() {
            return Traces::disabled();
        }
        let exporter = match config.otlp_protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(config.otlp_endpoint.clone())
                .build(),
            OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(http_traces_url(&config.otlp_endpoint))
                .build(),
        };
        let exporter = match exporter {
            Ok(e) => Counted(e),
            Err(e) => {
                // Printed, not logged: the subscriber is not installed yet. The endpoint may
                // carry a secret: only its redacted form is shown.
                let endpoint = crate::config::RedactedUrl::new(config.otlp_endpoint.clone());
                let why = e
                    .to_string()
                    .replace(endpoint.expose(), &endpoint.redacted());
                eprintln!(
                    "telemetry.otlp_endpoint: the span exporter cannot start ({why}); no traces"
                );
                return Traces::disabled();
            }
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sampling_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        Traces {
            provider: Some(provider),
        }
    }

    /// Makes this export the process's ([`tracer`], [`exporting`]). Called once its layer is
    /// installed.
    pub(super) fn install(&self) {
        if let Some(p) = &self.provider {
            let _ = TRACER.set(p.tracer(SCOPE));
        }
    }

    /// Whether spans are exported.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// The `tracing` layer that bridges icmp's spans to the exporter: icmp's spans at info
    /// level and up, and its warnings and errors as span events.
    pub(super) fn layer(&self) -> Option<BoxedLayer> {
        let tracer = self.provider.as_ref()?.tracer(SCOPE);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_location(false)
                .with_level(false)
                .with_error_events_to_status(true)
                .with_filter(filter_fn(exported))
                .boxed(),
        )
    }

    /// Sends the queued spans now (a worker that stops, a test that reads them).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown_with_timeout(std::time::Duration::from_secs(5));
        }
    }
}

/// The OTLP exporter, with each batch's outcome counted (`icmp_trace_export_spans_total`): the
/// one sign of a collector that is down or refuses the spans (the SDK's own logs stay off).
#[derive(Debug)]
struct Counted(opentelemetry_otlp::SpanExporter);

impl SpanExporter for Counted {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.0.export(batch).await;
        crate::telemetry::metrics::trace_export(result.is_ok(), n);
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// What becomes part of a trace: icmp's spans at info and up (the message, its phases, its
/// LLM calls), and its warnings and errors inside them.
fn exported(meta: &Metadata<'_>) -> bool {
    if !meta.target().starts_with(SCOPE) {
        return false;
    }
    if meta.is_span() {
        *meta.level() <= Level::INFO
    } else {
        *meta.level() <= Level::WARN
    }
}

/// The OTLP/HTTP traces URL of a base address, as `OTEL_EXPORTER_OTLP_ENDPOINT` is read:
/// `/v1/traces` appended to its path, unless it ends with it already.
fn http_traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_url_gets_the_traces_path_unless_it_has_one() {
        assert_eq!(
            http_traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("https://otlp.example/api/v1/traces"),
            "https://otlp.example/api/v1/traces"
        );
        assert_eq!(
            http_traces_url("https://otlp-gateway-prod-eu-west-2.grafana.net/otlp"),
            "https://otlp-gateway-prod-eu-west-2.grafana.net/otlp/v1/traces"
        );
    }
}
