//! The dead-letter stream seen from the operator's side (`icmp dlq`): list what is there, and
//! replay entries onto the inbound stream once their cause is fixed.

use std::collections::HashMap;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use redis::streams::StreamRangeReply;

use crate::config::StreamsConfig;
use crate::error::CacheError;

/// Fields the worker adds when it dead-letters an entry; everything else is the original.
const ADDED_FIELDS: [&str; 6] = [
    "inbound_id",
    "error_code",
    "error_detail",
    "deliveries",
    "failed_at",
    "log_id",
];

/// One dead-lettered entry.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: String,
    pub fields: HashMap<String, Vec<u8>>,
}

impl DeadLetter {
    pub fn field(&self, name: &str) -> String {
        self.fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }

    /// The fields to XADD again: the original ones, with `message_id` set to the original
    /// idempotency key so that the replay is still deduplicated against the first attempt.
    pub fn replay_fields(&self) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = self
            .fields
            .iter()
            .filter(|(k, _)| !ADDED_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !self.fields.contains_key("message_id")
            && let Some(inbound) = self.fields.get("inbound_id")
        {
            out.push(("message_id".into(), inbound.clone()));
        }
        out.sort();
        out
    }
}

fn bytes(v: redis::Value) -> Vec<u8> {
    match v {
        redis::Value::BulkString(b) => b,
        redis::Value::SimpleString(s) => s.into_bytes(),
        _ => Vec::new(),
    }
}

/// The oldest `count` dead letters.
pub async fn list(
    conn: &ConnectionManager,
    streams: &StreamsConfig,
    count: usize,
) -> Result<Vec<DeadLetter>, CacheError> {
    let reply: StreamRangeReply = conn
        .clone()
        .xrange_count(&streams.dead_letter, "-", "+", count)
        .await?;
    Ok(reply
        .ids
        .into_iter()
        .map(|e| DeadLetter {
            id: e.id,
            fields: e.map.into_iter().map(|(k, v)| (k, bytes(v))).collect(),
        })
        .collect())
}

/// Moves the given dead letters back onto the inbound stream (each in one `MULTI`: XADD to
/// inbound, XDEL from the dead-letter stream). Returns the ids that were found and replayed.
pub async fn replay(
    conn: &ConnectionManager,
    streams: &StreamsConfig,
    ids: &[String],
) -> Result<Vec<String>, CacheError> {
    let mut replayed = Vec::new();
    for id in ids {
        let reply: StreamRangeReply = conn
            .clone()
            .xrange_count(&streams.dead_letter, id, id, 1)
            .await?;
        let Some(entry) = reply.ids.into_iter().next() else {
            continue;
        };
        let letter = DeadLetter {
            id: entry.id,
            fields: entry.map.into_iter().map(|(k, v)| (k, bytes(v))).collect(),
        };
        let _: () = redis::pipe()
            .atomic()
            .xadd(&streams.inbound, "*", &letter.replay_fields())
            .ignore()
            .xdel(&streams.dead_letter, &[&letter.id])
            .ignore()
            .query_async(&mut conn.clone())
            .await?;
        replayed.push(letter.id);
    }
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_the_original_fields_and_idempotency_key() {
        let fields: HashMap<String, Vec<u8>> = [
            ("business_id", "b"),
            ("user_id", "u"),
            ("content", "hi"),
            ("inbound_id", "5-0"),
            ("error_code", "template.render"),
            ("error_detail", "x"),
            ("deliveries", "1"),
            ("failed_at", "t"),
            ("log_id", "l"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
        .collect();
        let letter = DeadLetter {
            id: "9-0".into(),
            fields,
        };
        let replay: Vec<(String, String)> = letter
            .replay_fields()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v).expect("utf8")))
            .collect();
        let expected: Vec<(String, String)> = [
            ("business_id", "b"),
            ("content", "hi"),
            ("message_id", "5-0"),
            ("user_id", "u"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(replay, expected);
    }
}
