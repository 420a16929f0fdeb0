//! Inbound entries: decoding from raw bytes and validation against the protocol (DESIGN §5,
//! docs/protocol.md), and the canonical form of business and user ids.
//!
//! Every entry is decoded on its own from the bytes Redis holds, so one that cannot be read
//! (a field name that is not UTF-8, a field given twice, an oversized entry) is reported with
//! its own error code and never fails anything else. Content is kept byte for byte (no trimming,
//! no normalisation): only emptiness is judged on its trimmed form.

use std::collections::HashMap;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::RawFields;
use crate::config::LimitsConfig;
use crate::error::ValidationError;

/// A validated inbound message, with canonical ids.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundMessage {
    /// Stream entry id.
    pub inbound_id: String,
    pub message_id: Option<String>,
    pub business_id: Uuid,
    /// The canonical user id ([`canonical_user`]).
    pub user_id: String,
    pub content: String,
    pub conversation_id: Option<Uuid>,
    pub metadata: Option<Map<String, Value>>,
    pub reply_to: Option<String>,
    /// Set by `icmp dlq replay`: the `reply_id` of the error reply this message's answer
    /// replaces.
    pub supersedes: Option<Uuid>,
}

impl InboundMessage {
    /// The idempotency key within (business, user): the producer's `message_id`, else the
    /// stream entry id.
    pub fn idempotency_key(&self) -> &str {
        self.message_id.as_deref().unwrap_or(&self.inbound_id)
    }
}

/// The canonical business id: any spelling `uuid` accepts (hyphenated, simple, braced,
/// `urn:uuid:`, any case), surrounded by ASCII whitespace or not, is one business. The order
/// queues' claim script (`stream::delivery`) computes the same form.
pub fn canonical_business(raw: &str) -> Option<Uuid> {
    Uuid::parse_str(raw.trim_ascii()).ok()
}

/// The canonical user id: the producer's id without surrounding ASCII whitespace. The claim
/// script trims the same characters.
pub fn canonical_user(raw: &str) -> &str {
    raw.trim_ascii()
}

/// An entry's fields by name.
type Fields<'a> = HashMap<&'a str, &'a [u8]>;

/// The fields of an entry by name, once each, as UTF-8 names.
fn by_name(fields: &RawFields) -> Result<Fields<'_>, ValidationError> {
    let mut map = HashMap::with_capacity(fields.len());
    for (k, v) in fields {
        let name = std::str::from_utf8(k).map_err(|_| ValidationError::UnreadableFieldName)?;
        if map.insert(name, v.as_slice()).is_some() {
            return Err(ValidationError::DuplicateField(
                name.chars().take(64).collect(),
            ));
        }
    }
    Ok(map)
}

fn text(
    fields: &HashMap<&str, &[u8]>,
    name: &'static str,
) -> Result<Option<String>, ValidationError> {
    match fields.get(name) {
        None => Ok(None),
        Some(bytes) => String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| ValidationError::InvalidUtf8(name)),
    }
}

fn required(fields: &HashMap<&str, &[u8]>, name: &'static str) -> Result<String, ValidationError> {
    match text(fields, name)? {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(ValidationError::MissingField(name)),
    }
}

fn uuid_field(value: &str, field: &'static str) -> Result<Uuid, ValidationError> {
    canonical_business(value).ok_or_else(|| ValidationError::InvalidField {
        field,
        reason: "not a UUID".into(),
    })
}

/// The most bytes of a `message_id` or `user_id`, whatever the character limits say: the three
/// parts of a message's unique key together must fit one PostgreSQL index entry (2,704 bytes).
pub const MAX_KEY_BYTES: usize = 1024;

/// Text PostgreSQL cannot store: `text` and `jsonb` refuse the NUL character.
fn nul(field: &'static str) -> ValidationError {
    ValidationError::InvalidField {
        field,
        reason: "contains a NUL character, which cannot be stored".into(),
    }
}

/// Whether a JSON value holds a NUL character in any string or key, at any depth.
fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Checks `reply_to` against the allowed prefix.
pub fn check_reply_to(reply_to: &str, prefix: &str) -> Result<(), ValidationError> {
    let tail = reply_to.strip_prefix(prefix).unwrap_or("");
    if prefix.is_empty()
        || tail.is_empty()
        || reply_to.len() > 256
        || tail.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ValidationError::ReplyToNotAllowed(prefix.to_owned()));
    }
    Ok(())
}

/// Decodes and validates the raw fields of one inbound entry.
///
/// # Errors
/// The first problem found, as a [`ValidationError`] with a stable code.
pub fn decode(
    inbound_id: &str,
    raw: &RawFields,
    limits: &LimitsConfig,
    reply_prefix: &str,
) -> Result<InboundMessage, ValidationError> {
    let size: usize = raw.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > limits.max_entry_bytes {
        return Err(ValidationError::EntryTooLarge {
            size,
            limit: limits.max_entry_bytes,
        });
    }
    if raw.len() > super::MAX_FIELDS {
        return Err(ValidationError::TooManyFields {
            count: raw.len(),
            limit: super::MAX_FIELDS,
        });
    }
    let fields = by_name(raw)?;
    let fields = &fields;
    let reply_to = text(fields, "reply_to")?.filter(|s| !s.is_empty());
    if let Some(r) = &reply_to {
        check_reply_to(r, reply_prefix)?;
    }
    Ok(InboundMessage {
        inbound_id: inbound_id.to_owned(),
        message_id: message_id(fields, limits)?,
        business_id: uuid_field(&required(fields, "business_id")?, "business_id")?,
        user_id: user_id(fields, limits)?,
        content: content(fields, limits)?,
        conversation_id: optional_uuid(fields, "conversation_id")?,
        metadata: metadata(fields, limits)?,
        reply_to,
        supersedes: optional_uuid(fields, "supersedes")?,
    })
}

fn message_id(
    fields: &Fields<'_>,
    limits: &LimitsConfig,
) -> Result<Option<String>, ValidationError> {
    let message_id = text(fields, "message_id")?.filter(|s| !s.is_empty());
    if let Some(id) = &message_id {
        if id.chars().count() > limits.max_message_id_chars || id.len() > MAX_KEY_BYTES {
            return Err(ValidationError::InvalidField {
                field: "message_id",
                reason: format!("longer than {} characters", limits.max_message_id_chars),
            });
        }
        if id.contains('\0') {
            return Err(nul("message_id"));
        }
    }
    Ok(message_id)
}

fn user_id(fields: &Fields<'_>, limits: &LimitsConfig) -> Result<String, ValidationError> {
    let user_id = canonical_user(&required(fields, "user_id")?).to_owned();
    if user_id.chars().count() > limits.max_user_id_chars || user_id.len() > MAX_KEY_BYTES {
        return Err(ValidationError::InvalidField {
            field: "user_id",
            reason: format!("longer than {} characters", limits.max_user_id_chars),
        });
    }
    if user_id.chars().any(char::is_control) {
        return Err(ValidationError::InvalidField {
            field: "user_id",
            reason: "contains control characters".into(),
        });
    }
    Ok(user_id)
}

fn content(fields: &Fields<'_>, limits: &LimitsConfig) -> Result<String, ValidationError> {
    let bytes = fields
        .get("content")
        .ok_or(ValidationError::MissingField("content"))?;
    if bytes.len() > limits.max_content_bytes {
        return Err(ValidationError::ContentTooLarge {
            size: bytes.len(),
            limit: limits.max_content_bytes,
        });
    }
    let content =
        String::from_utf8(bytes.to_vec()).map_err(|_| ValidationError::InvalidUtf8("content"))?;
    if content.trim().is_empty() {
        return Err(ValidationError::EmptyContent);
    }
    if content.contains('\0') {
        return Err(nul("content"));
    }
    Ok(content)
}

fn optional_uuid(fields: &Fields<'_>, name: &'static str) -> Result<Option<Uuid>, ValidationError> {
    match text(fields, name)?.filter(|s| !s.is_empty()) {
        Some(s) => Ok(Some(uuid_field(&s, name)?)),
        None => Ok(None),
    }
}

fn metadata(
    fields: &Fields<'_>,
    limits: &LimitsConfig,
) -> Result<Option<Map<String, Value>>, ValidationError> {
    let Some(bytes) = fields.get("metadata").filter(|b| !b.is_empty()) else {
        return Ok(None);
    };
    if bytes.len() > limits.max_metadata_bytes {
        return Err(ValidationError::MetadataTooLarge {
            size: bytes.len(),
            limit: limits.max_metadata_bytes,
        });
    }
    // serde_json refuses what PostgreSQL's jsonb refuses in syntax (invalid surrogate
    // escapes, numbers out of range); `\u0000` it accepts and jsonb does not.
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) if map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)) => {
            Err(ValidationError::InvalidMetadata(
                "contains a NUL character (\\u0000), which cannot be stored".into(),
            ))
        }
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(ValidationError::InvalidMetadata("not an object".into())),
        Err(e) => Err(ValidationError::InvalidMetadata(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Classify;

    fn limits() -> LimitsConfig {
        LimitsConfig {
            max_content_bytes: 16,
            max_metadata_bytes: 32,
            max_message_id_chars: 8,
            max_user_id_chars: 8,
            max_entry_bytes: 200,
            max_extracted_fields: 32,
            max_extracted_value_bytes: 4096,
        }
    }

    fn fields(pairs: &[(&str, &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    const BIZ: &[u8] = b"7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001";

    fn code(f: &[(&str, &[u8])]) -> &'static str {
        decode("1-0", &fields(f), &limits(), "r:")
            .expect_err("invalid")
            .code()
    }

    #[test]
    fn a_valid_entry_keeps_content_verbatim() {
        let m = decode(
            "1-0",
            &fields(&[
                ("business_id", BIZ),
                ("user_id", b"al"),
                ("content", b" {{x}} "),
            ]),
            &limits(),
            "r:",
        )
        .expect("valid");
        assert_eq!(m.content, " {{x}} ");
        assert_eq!(m.idempotency_key(), "1-0");
    }

    #[test]
    fn what_postgresql_refuses_is_a_validation_error_at_decode_time() {
        let base = |extra: (&'static str, &'static [u8])| {
            code(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", b"x"),
                extra,
            ])
        };
        assert_eq!(base(("message_id", b"m\0")), "validation.invalid_field");
        assert_eq!(
            base(("reply_to", b"r:a\0b")),
            "validation.reply_to_not_allowed"
        );
        for meta in [
            br#"{"a":"x\u0000"}"#.as_slice(),
            br#"{"a\u0000":1}"#,
            br#"{"a":[{"b":["\u0000"]}]}"#,
            // Lone and reversed surrogates, and a number jsonb could not hold.
            br#"{"a":"\ud800"}"#,
            br#"{"a":"\udc00\ud800"}"#,
            br#"{"a":1e999}"#,
        ] {
            let raw = fields(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", b"x"),
                ("metadata", meta),
            ]);
            let e = decode("1-0", &raw, &limits_wide(), "r:").expect_err("refused");
            assert_eq!(
                e.code(),
                "validation.invalid_metadata",
                "{}",
                String::from_utf8_lossy(meta)
            );
        }
        assert_eq!(
            code(&[("business_id", BIZ), ("user_id", b"a\0"), ("content", b"x")]),
            "validation.invalid_field"
        );
        assert_eq!(
            code(&[("business_id", BIZ), ("user_id", b"a"), ("content", b"x\0")]),
            "validation.invalid_field"
        );
        // Many multi-byte characters within the character limit but over the bytes one
        // index entry holds.
        let mut l = limits();
        l.max_message_id_chars = 10_000;
        l.max_entry_bytes = 100_000;
        let long = "\u{1F600}".repeat(300);
        let raw = fields(&[
            ("business_id", BIZ),
            ("user_id", b"a"),
            ("content", b"x"),
            ("message_id", long.as_bytes()),
        ]);
        let e = decode("1-0", &raw, &l, "r:").expect_err("too long");
        assert_eq!(e.code(), "validation.invalid_field");
        // What PostgreSQL stores is fine: an escaped backslash-u in text, other control
        // characters, a surrogate pair.
        let ok = decode(
            "1-0",
            &fields(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", b"tab\tnewline\n"),
                ("message_id", b"m\t1"),
                ("metadata", br#"{"a":"\\u0000 is text","b":"\ud83d\ude00"}"#),
            ]),
            &limits_wide(),
            "r:",
        )
        .expect("valid");
        assert_eq!(
            ok.metadata.and_then(|m| m.get("b").cloned()),
            Some(serde_json::json!("\u{1F600}"))
        );
    }

    fn limits_wide() -> LimitsConfig {
        LimitsConfig {
            max_content_bytes: 64,
            max_metadata_bytes: 64,
            max_entry_bytes: 400,
            ..limits()
        }
    }

    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "one table of bad inputs and their codes"
    )]
    fn each_bad_field_has_its_code() {
        assert_eq!(
            code(&[("user_id", b"a"), ("content", b"x")]),
            "validation.missing_field"
        );
        assert_eq!(
            code(&[
                ("business_id", b"nope"),
                ("user_id", b"a"),
                ("content", b"x")
            ]),
            "validation.invalid_field"
        );
        assert_eq!(
            code(&[("business_id", BIZ), ("user_id", b"a"), ("content", b"  ")]),
            "validation.empty_content"
        );
        assert_eq!(
            code(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", &[0xff, 0xfe])
            ]),
            "validation.invalid_utf8"
        );
        assert_eq!(
            code(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", &[b'x'; 17])
            ]),
            "validation.content_too_large"
        );
        assert_eq!(
            code(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", b"x"),
                ("metadata", b"[1]")
            ]),
            "validation.invalid_metadata"
        );
        assert_eq!(
            code(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", b"x"),
                ("metadata", b"{\"a\":")
            ]),
            "validation.invalid_metadata"
        );
        assert_eq!(
            code(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", b"x"),
                ("metadata", &[b' '; 33])
            ]),
            "validation.metadata_too_large"
        );
        assert_eq!(
            code(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", b"x"),
                ("reply_to", b"other:1")
            ]),
            "validation.reply_to_not_allowed"
        );
        assert_eq!(
            code(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", b"x"),
                ("conversation_id", b"12")
            ]),
            "validation.invalid_field"
        );
        assert_eq!(
            code(&[
                ("business_id", BIZ),
                ("user_id", b"a"),
                ("content", b"x"),
                ("message_id", b"123456789")
            ]),
            "validation.invalid_field"
        );
    }

    #[test]
    fn unreadable_names_repeated_fields_and_huge_entries_have_their_codes() {
        let mut f = fields(&[("business_id", BIZ), ("user_id", b"a"), ("content", b"x")]);
        f.push((vec![0xff, 0xfe], b"v".to_vec()));
        let e = decode("1-0", &f, &limits(), "r:").expect_err("invalid");
        assert_eq!(e.code(), "validation.unreadable_field_name");
        let f = fields(&[
            ("business_id", BIZ),
            ("user_id", b"a"),
            ("user_id", b"b"),
            ("content", b"x"),
        ]);
        let e = decode("1-0", &f, &limits(), "r:").expect_err("invalid");
        assert_eq!(e.code(), "validation.duplicate_field");
        let f = fields(&[
            ("business_id", BIZ),
            ("user_id", b"a"),
            ("content", b"x"),
            ("padding", &[b'p'; 300]),
        ]);
        let e = decode("1-0", &f, &limits(), "r:").expect_err("invalid");
        assert_eq!(e.code(), "validation.entry_too_large");
    }

    #[test]
    fn every_spelling_of_a_business_and_a_padded_user_are_one_canonical_pair() {
        let canonical = "7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001";
        for spelling in [
            canonical,
            "7D1F4C9E-2B1A-4E55-9A7C-0C0FFEE00001",
            "{7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001}",
            "urn:uuid:7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001",
            "7d1f4c9e2b1a4e559a7c0c0ffee00001",
            "  7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001\t",
        ] {
            let m = decode(
                "1-0",
                &fields(&[
                    ("business_id", spelling.as_bytes()),
                    ("user_id", b" al\n"),
                    ("content", b"x"),
                ]),
                &limits(),
                "r:",
            )
            .expect(spelling);
            assert_eq!(m.business_id.to_string(), canonical, "{spelling}");
            assert_eq!(m.user_id, "al");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const NAMES: [&str; 9] = [
            "business_id",
            "user_id",
            "content",
            "message_id",
            "conversation_id",
            "metadata",
            "reply_to",
            "extra",
            "",
        ];

        /// Entries as a careless or hostile producer writes them: known and unknown names
        /// (repeated, empty), any bytes as values, sometimes valid ones.
        fn entry() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
            let name = prop_oneof![
                proptest::sample::select(NAMES.to_vec()).prop_map(|n| n.as_bytes().to_vec()),
                proptest::collection::vec(any::<u8>(), 0..12),
            ];
            let value = prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                Just(BIZ.to_vec()),
                Just(b" ann ".to_vec()),
                Just(b"{\"a\": [1, {\"b\": null}]}".to_vec()),
                any::<String>().prop_map(String::into_bytes),
            ];
            proptest::collection::vec((name, value), 0..12)
        }

        proptest! {
            /// Any entry decodes to a valid message or to a coded error; never a panic, and a
            /// decoded message keeps the invariants the pipeline relies on.
            #[test]
            fn any_entry_is_a_valid_message_or_a_coded_error(raw in entry()) {
                let mut l = limits();
                l.max_content_bytes = 64;
                l.max_user_id_chars = 64;
                l.max_message_id_chars = 64;
                l.max_metadata_bytes = 64;
                l.max_entry_bytes = 4096;
                match decode("1-0", &raw, &l, "icmp:reply:") {
                    Ok(m) => {
                        prop_assert!(!m.user_id.is_empty());
                        prop_assert_eq!(m.user_id.trim(), m.user_id.as_str());
                        prop_assert!(m.content.len() <= l.max_content_bytes);
                        prop_assert!(!m.content.trim().is_empty());
                        if let Some(r) = &m.reply_to {
                            prop_assert!(r.starts_with("icmp:reply:"));
                        }
                        // Nothing PostgreSQL would refuse gets past decoding.
                        prop_assert!(!m.content.contains('\0') && !m.user_id.contains('\0'));
                        prop_assert!(!m.idempotency_key().contains('\0'));
                        if let Some(meta) = &m.metadata {
                            prop_assert!(!holds_nul(&Value::Object(meta.clone())));
                        }
                    }
                    Err(e) => {
                        prop_assert!(e.code().starts_with("validation."), "{}", e.code());
                        prop_assert!(!e.to_string().is_empty());
                    }
                }
            }
        }
    }
}
