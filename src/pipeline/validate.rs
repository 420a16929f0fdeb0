//! Step 1: validation of an inbound entry against the protocol (DESIGN §5, docs/protocol.md).
//!
//! Fields arrive as raw bytes so that invalid UTF-8 is reported, not replaced. Content is kept
//! byte for byte (no trimming, no normalisation): only emptiness is judged on its trimmed form.

use std::collections::HashMap;

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::LimitsConfig;
use crate::error::ValidationError;

/// A validated inbound message.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundMessage {
    /// Stream entry id.
    pub inbound_id: String,
    pub message_id: Option<String>,
    pub business_id: Uuid,
    pub user_id: String,
    pub content: String,
    pub conversation_id: Option<Uuid>,
    pub metadata: Option<Map<String, Value>>,
    pub reply_to: Option<String>,
}

impl InboundMessage {
    /// The idempotency key: the producer's `message_id`, else the stream entry id.
    pub fn idempotency_key(&self) -> &str {
        self.message_id.as_deref().unwrap_or(&self.inbound_id)
    }
}

fn text(
    fields: &HashMap<String, Vec<u8>>,
    name: &'static str,
) -> Result<Option<String>, ValidationError> {
    match fields.get(name) {
        None => Ok(None),
        Some(bytes) => String::from_utf8(bytes.clone())
            .map(Some)
            .map_err(|_| ValidationError::InvalidUtf8(name)),
    }
}

fn required(
    fields: &HashMap<String, Vec<u8>>,
    name: &'static str,
) -> Result<String, ValidationError> {
    match text(fields, name)? {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(ValidationError::MissingField(name)),
    }
}

fn uuid_field(value: &str, field: &'static str) -> Result<Uuid, ValidationError> {
    Uuid::parse_str(value.trim()).map_err(|_| ValidationError::InvalidField {
        field,
        reason: "not a UUID".into(),
    })
}

/// Checks `reply_to` against the allowed prefix.
pub fn check_reply_to(reply_to: &str, prefix: &str) -> Result<(), ValidationError> {
    let tail = reply_to.strip_prefix(prefix).unwrap_or("");
    if prefix.is_empty()
        || tail.is_empty()
        || reply_to.len() > 256
        || tail.chars().any(char::is_whitespace)
    {
        return Err(ValidationError::ReplyToNotAllowed(prefix.to_owned()));
    }
    Ok(())
}

/// Validates the fields of one inbound entry.
///
/// # Errors
/// The first problem found, as a [`ValidationError`] with a stable code.
pub fn validate(
    inbound_id: &str,
    fields: &HashMap<String, Vec<u8>>,
    limits: &LimitsConfig,
    reply_prefix: &str,
) -> Result<InboundMessage, ValidationError> {
    let reply_to = text(fields, "reply_to")?.filter(|s| !s.is_empty());
    if let Some(r) = &reply_to {
        check_reply_to(r, reply_prefix)?;
    }
    let message_id = text(fields, "message_id")?.filter(|s| !s.is_empty());
    if let Some(id) = &message_id
        && id.chars().count() > limits.max_message_id_chars
    {
        return Err(ValidationError::InvalidField {
            field: "message_id",
            reason: format!("longer than {} characters", limits.max_message_id_chars),
        });
    }
    let business_id = uuid_field(&required(fields, "business_id")?, "business_id")?;
    let user_id = required(fields, "user_id")?;
    if user_id.chars().count() > limits.max_user_id_chars {
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
    let content = match fields.get("content") {
        None => return Err(ValidationError::MissingField("content")),
        Some(bytes) => {
            if bytes.len() > limits.max_content_bytes {
                return Err(ValidationError::ContentTooLarge {
                    size: bytes.len(),
                    limit: limits.max_content_bytes,
                });
            }
            String::from_utf8(bytes.clone()).map_err(|_| ValidationError::InvalidUtf8("content"))?
        }
    };
    if content.trim().is_empty() {
        return Err(ValidationError::EmptyContent);
    }
    if content.contains('\0') {
        return Err(ValidationError::InvalidField {
            field: "content",
            reason: "contains a NUL character".into(),
        });
    }
    let conversation_id = match text(fields, "conversation_id")?.filter(|s| !s.is_empty()) {
        Some(s) => Some(uuid_field(&s, "conversation_id")?),
        None => None,
    };
    let metadata = match fields.get("metadata").filter(|b| !b.is_empty()) {
        None => None,
        Some(bytes) => {
            if bytes.len() > limits.max_metadata_bytes {
                return Err(ValidationError::MetadataTooLarge {
                    size: bytes.len(),
                    limit: limits.max_metadata_bytes,
                });
            }
            match serde_json::from_slice::<Value>(bytes) {
                Ok(Value::Object(map)) => Some(map),
                Ok(_) => return Err(ValidationError::InvalidMetadata("not an object".into())),
                Err(e) => return Err(ValidationError::InvalidMetadata(e.to_string())),
            }
        }
    };
    Ok(InboundMessage {
        inbound_id: inbound_id.to_owned(),
        message_id,
        business_id,
        user_id,
        content,
        conversation_id,
        metadata,
        reply_to,
    })
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
        }
    }

    fn fields(pairs: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect()
    }

    const BIZ: &[u8] = b"7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001";

    fn code(f: &[(&str, &[u8])]) -> &'static str {
        validate("1-0", &fields(f), &limits(), "r:")
            .expect_err("invalid")
            .code()
    }

    #[test]
    fn a_valid_entry_keeps_content_verbatim() {
        let m = validate(
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
}
