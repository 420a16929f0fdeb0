//! The dead-letter entry: the original fields, byte for byte, followed by what the worker adds.

use uuid::Uuid;

use crate::telemetry::trace_context::{TRACEPARENT, TRACESTATE};

use super::RawFields;

/// Fields the worker adds when it dead-letters an entry; everything else is the original.
pub const ADDED_FIELDS: [&str; 7] = [
    "inbound_id",
    "error_code",
    "error_detail",
    "deliveries",
    "failed_at",
    "log_id",
    "error_reply_id",
];

/// Why an entry is dead-lettered.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub code: &'a str,
    pub detail: String,
    pub deliveries: u64,
    pub log_id: Uuid,
    /// The `reply_id` of the error reply the user got for it.
    pub error_reply_id: Option<Uuid>,
}

/// The dead-letter entry of inbound entry `inbound_id`, carrying the trace context `trace` of
/// the span that wrote it in place of the producer's (a replay continues that trace); with no
/// `trace`, the producer's fields stay as they came.
pub fn fields(
    inbound_id: &str,
    raw: &RawFields,
    failure: &Failure<'_>,
    trace: &[(&'static str, String)],
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = raw
        .iter()
        .filter(|(k, _)| !ADDED_FIELDS.iter().any(|a| a.as_bytes() == k.as_slice()))
        .filter(|(k, _)| {
            trace.is_empty() || (k != TRACEPARENT.as_bytes() && k != TRACESTATE.as_bytes())
        })
        .take(super::MAX_FIELDS)
        .cloned()
        .collect();
    let added = [
        ("inbound_id", inbound_id.to_owned()),
        ("error_code", failure.code.to_owned()),
        ("error_detail", failure.detail.clone()),
        ("deliveries", failure.deliveries.to_string()),
        ("failed_at", chrono::Utc::now().to_rfc3339()),
        ("log_id", failure.log_id.to_string()),
        (
            "error_reply_id",
            failure
                .error_reply_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
        ),
    ];
    out.extend(
        added
            .into_iter()
            .chain(trace.iter().cloned())
            .map(|(k, v)| (k.as_bytes().to_vec(), v.into_bytes())),
    );
    out
}

/// The fields to XADD again when replaying a dead letter: the original ones, with
/// `message_id` set to the original idempotency key (the first inbound entry id when the
/// producer gave none), so that the replay is deduplicated against an earlier success, and
/// `supersedes` set to the error reply's `reply_id`, so that the new reply says which earlier
/// one it replaces.
pub fn replay_fields(dead: &RawFields) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = dead
        .iter()
        .filter(|(k, _)| !ADDED_FIELDS.iter().any(|a| a.as_bytes() == k.as_slice()))
        .filter(|(k, _)| k != b"supersedes")
        .cloned()
        .collect();
    if let Some(reply) = super::raw_field(dead, "error_reply_id").filter(|r| !r.is_empty()) {
        out.push((b"supersedes".to_vec(), reply.to_vec()));
    }
    let has_message_id = out.iter().any(|(k, v)| k == b"message_id" && !v.is_empty());
    if !has_message_id && let Some(inbound) = super::raw_field(dead, "inbound_id") {
        out.retain(|(k, _)| k != b"message_id");
        out.push((b"message_id".to_vec(), inbound.to_vec()));
    }
    out
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
    fn a_dead_letter_keeps_the_original_bytes_and_a_replay_its_idempotency_key() {
        let mut original = raw(&[("business_id", "b"), ("user_id", "u"), ("content", "hi")]);
        original.push((vec![0xff], vec![0xfe]));
        let failure = Failure {
            code: "template.render",
            detail: "x".into(),
            deliveries: 3,
            log_id: Uuid::nil(),
            error_reply_id: Some(Uuid::from_u128(7)),
        };
        let dead = fields("5-0", &original, &failure, &[]);
        assert_eq!(&dead[..4], &original[..]);
        assert_eq!(
            super::super::raw_field(&dead, "deliveries"),
            Some(&b"3"[..])
        );
        let replay = replay_fields(&dead);
        let mut expected = original.clone();
        expected.push((
            b"supersedes".to_vec(),
            Uuid::from_u128(7).to_string().into_bytes(),
        ));
        expected.push((b"message_id".to_vec(), b"5-0".to_vec()));
        assert_eq!(replay, expected);
    }
}
