//! The W3C trace context that travels on the streams, and the message's own span.
//!
//! An inbound entry may carry `traceparent` and `tracestate` fields (docs/protocol.md). The
//! worker continues that trace (or starts one) with a span for the message that begins at the
//! entry's XADD time (its id's milliseconds) and ends when the entry is finished
//! ([`MessageSpan`]); its phases are `tracing` spans under it, bridged by the layer of
//! [`super::traces`]. What the worker writes for a consumer (the reply, the dead letter, the
//! agents' entries) carries a `traceparent` of the current span ([`outgoing`]), so the trace
//! goes on. Without span export, the producer's own context is passed on unchanged.
//!
//! A malformed `traceparent` is ignored, as W3C Trace Context says: the message is answered
//! and starts a trace of its own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::protocol::{RawFields, raw_field};

/// The entry field with the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// The entry field with the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// An entry's fields as a propagation carrier.
struct Carrier<'a>(&'a RawFields);

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = raw_field(self.0, key).and_then(|v| std::str::from_utf8(v).ok())?;
        // The propagator's own parsing is lenient (short fields, a leading `+`): a value that
        // is not a W3C traceparent is ignored here, as the standard says.
        (key != TRACEPARENT || well_formed(value)).then_some(value)
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter_map(|(k, _)| std::str::from_utf8(k).ok())
            .collect()
    }
}

/// Whether `v` is a W3C `traceparent`: `version-trace_id-parent_id-flags` in lower-case hex of 2,
/// 32, 16 and 2 digits; exactly that for version `00`, more fields after a later version's
/// flags; version `ff` is invalid.
fn well_formed(v: &str) -> bool {
    let b = v.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b.get(r)
            .is_some_and(|s| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
    };
    let dash = |i: usize| b.get(i) == Some(&b'-');
    let fields = hex(0..2) && dash(2) && hex(3..35) && dash(35) && hex(36..52) && dash(52);
    let flags = hex(53..55);
    let version = b.get(..2);
    fields
        && flags
        && version != Some(b"ff")
        && if version == Some(b"00") {
            b.len() == 55
        } else {
            b.len() == 55 || dash(55)
        }
}

/// What a propagator writes: at most `traceparent` and `tracestate`.
#[derive(Default)]
struct Written(Vec<(&'static str, String)>);

impl Injector for Written {
    fn set(&mut self, key: &str, value: String) {
        let key = match key {
            TRACEPARENT => TRACEPARENT,
            TRACESTATE => TRACESTATE,
            _ => return,
        };
        if !value.is_empty() {
            self.0.push((key, value));
        }
    }
}

/// The producer's context carried by an entry (empty when it carries none, or a malformed one).
#[must_use]
pub fn incoming(raw: &RawFields) -> Context {
    TraceContextPropagator::new().extract_with_context(&Context::new(), &Carrier(raw))
}

/// The context a stored `traceparent` and `tracestate` name (empty when there is none).
#[must_use]
pub fn stored(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let fields: Vec<(Vec<u8>, Vec<u8>)> = [(TRACEPARENT, traceparent), (TRACESTATE, tracestate)]
        .into_iter()
        .filter_map(|(k, v)| Some((k.as_bytes().to_vec(), v?.as_bytes().to_vec())))
        .collect();
    incoming(&fields)
}

/// The XADD time of entry `id` (`<ms>-<seq>`).
fn added_at(id: &str) -> Option<SystemTime> {
    let ms: u64 = id.split('-').next()?.parse().ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// The span of one delivery of a message: from its XADD to its finish, a child of the
/// producer's span. The worker's `tracing` span for the message is made its child; waits that
/// happened before processing began are added as children with their own times.
#[derive(Debug)]
pub struct MessageSpan {
    cx: Context,
}

/// Where the message came from.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub stream: &'a str,
    pub group: &'a str,
    pub entry_id: &'a str,
    pub deliveries: u64,
}

impl MessageSpan {
    /// Starts the span of a delivery of the entry with fields `raw`.
    #[must_use]
    pub fn start(raw: &RawFields, d: Delivery<'_>) -> MessageSpan {
        let Some(tracer) = super::traces::tracer() else {
            return MessageSpan { cx: Context::new() };
        };
        let parent = incoming(raw);
        let mut builder = tracer
            .span_builder(format!("process {}", d.stream))
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("messaging.system", "redis"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.operation.name", "process"),
                KeyValue::new("messaging.destination.name", d.stream.to_owned()),
                KeyValue::new("messaging.consumer.group.name", d.group.to_owned()),
                KeyValue::new("messaging.message.id", d.entry_id.to_owned()),
                KeyValue::new(
                    "messaging.redis.delivery_count",
                    i64::try_from(d.deliveries).unwrap_or(i64::MAX),
                ),
            ]);
        if let Some(at) = added_at(d.entry_id) {
            builder = builder.with_start_time(at);
        }
        let span = builder.start_with_context(tracer, &parent);
        MessageSpan {
            cx: parent.with_span(span),
        }
    }

    /// Makes the message span the parent of `span` (the worker's `tracing` span). Without
    /// span export there is nothing to link.
    pub fn adopt(&self, span: &tracing::Span) {
        let _ = span.set_parent(self.cx.clone());
    }

    /// Adds a finished wait (for the user's turn, for a slot) as a child span.
    pub fn waited(&self, name: &'static str, from: SystemTime, to: SystemTime) {
        let Some(tracer) = super::traces::tracer() else {
            return;
        };
        if !self.cx.span().is_recording() || to < from {
            return;
        }
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(from)
            .start_with_context(tracer, &self.cx);
        span.end_with_timestamp(to);
    }

    /// Ends the span with the delivery's outcome.
    pub fn end(self, outcome: &'static str) {
        let span = self.cx.span();
        if !span.is_recording() {
            return;
        }
        span.set_attribute(KeyValue::new("icmp.outcome", outcome));
        span.end();
    }
}

/// The trace context fields to put on an entry written for the message being processed: the
/// current span's, else (no span export) the inbound entry's own, else none.
#[must_use]
pub fn outgoing(inbound: &RawFields) -> Vec<(&'static str, String)> {
    let propagator = TraceContextPropagator::new();
    let current = tracing::Span::current().context();
    let mut written = Written::default();
    if current.span().span_context().is_valid() {
        propagator.inject_context(&current, &mut written);
    } else {
        propagator.inject_context(&incoming(inbound), &mut written);
    }
    written.0
}

/// [`outgoing`] for an entry that has no inbound one (an agent's answer, an action's
/// follow-up): the current span's context, if any.
#[must_use]
pub fn current() -> Vec<(&'static str, String)> {
    outgoing(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn a_valid_traceparent_is_the_parent_and_a_malformed_one_is_ignored() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = incoming(&raw(&[("traceparent", tp), ("tracestate", "k=v")]));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.trace_state().header(), "k=v");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-1-2-01",
            "00-+abc-+1-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let cx = incoming(&raw(&[("traceparent", bad)]));
            assert!(!cx.span().span_context().is_valid(), "{bad}");
        }
    }

    #[test]
    fn a_later_version_may_carry_more_fields() {
        let tp = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        assert!(well_formed(tp));
        assert!(!well_formed(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"
        ));
        assert!(!well_formed("€€"));
    }

    #[test]
    fn without_span_export_the_producers_context_passes_on_unchanged() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let out = outgoing(&raw(&[("traceparent", tp), ("tracestate", "k=v")]));
        assert_eq!(
            out,
            vec![
                ("traceparent", tp.to_owned()),
                ("tracestate", "k=v".to_owned())
            ]
        );
        assert!(outgoing(&raw(&[("content", "hi")])).is_empty());
    }

    #[test]
    fn the_xadd_time_is_the_entry_ids_milliseconds() {
        assert_eq!(
            added_at("1700000000123-4"),
            UNIX_EPOCH.checked_add(Duration::from_millis(1_700_000_000_123))
        );
        assert_eq!(added_at("garbage"), None);
    }
}
