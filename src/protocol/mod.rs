//! The wire format of the streams, in one place: inbound fields and their decoding, the reply's
//! fields, and the dead-letter entry's fields (docs/protocol.md). Neither the pipeline nor the
//! stream mechanics know a field name; they go through this module.
//!
//! - [`inbound`]: raw entry → [`InboundMessage`] or a coded validation error; canonical ids;
//! - [`reply`]: the reply published for every entry;
//! - [`dead_letter`]: what a dead-lettered entry carries, and what a replay puts back;
//! - [`shard`]: which shard of the inbound stream a user's messages go to, and its names.

pub mod dead_letter;
pub mod inbound;
pub mod reply;
pub mod shard;

pub use inbound::InboundMessage;
pub use reply::{Reply, ReplyStatus};

/// The fields of one stream entry as Redis holds them: byte strings, in entry order (names may
/// repeat and need not be UTF-8 until decoded).
pub type RawFields = [(Vec<u8>, Vec<u8>)];

/// The most fields an inbound entry may have (the protocol defines eight).
pub const MAX_FIELDS: usize = 64;

/// The first value of field `name`, if any.
pub fn raw_field<'a>(fields: &'a RawFields, name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k.as_slice() == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}
