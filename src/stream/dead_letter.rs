//! The dead-letter stream seen from the operator's side (`icmp dlq`): list what is there, and
//! replay entries onto the inbound stream once their cause is fixed. Entries are read as raw
//! bytes, so a dead letter whose original fields are not UTF-8 lists and replays like any other.

use redis::Value;
use redis::aio::ConnectionManager;

use super::range_entries;
use crate::config::StreamsConfig;
use crate::error::StreamError;
use crate::protocol::{self, dead_letter::replay_fields};

/// One dead-lettered entry.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl DeadLetter {
    /// A field as text (lossy), empty when absent.
    pub fn field(&self, name: &str) -> String {
        protocol::raw_field(&self.fields, name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }
}

async fn range(
    conn: &ConnectionManager,
    stream: &str,
    from: &str,
    to: &str,
    count: usize,
) -> Result<Vec<DeadLetter>, StreamError> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(from)
        .arg(to)
        .arg("COUNT")
        .arg(count)
        .query_async(&mut conn.clone())
        .await?;
    Ok(range_entries(reply)
        .into_iter()
        .map(|(id, fields)| DeadLetter { id, fields })
        .collect())
}

/// The oldest `count` dead letters.
pub async fn list(
    conn: &ConnectionManager,
    streams: &StreamsConfig,
    count: usize,
) -> Result<Vec<DeadLetter>, StreamError> {
    range(conn, &streams.dead_letter, "-", "+", count).await
}

/// Moves the given dead letters back onto the inbound stream (each in one `MULTI`: XADD to
/// inbound, XDEL from the dead-letter stream). Returns the ids that were found and replayed.
pub async fn replay(
    conn: &ConnectionManager,
    streams: &StreamsConfig,
    ids: &[String],
) -> Result<Vec<String>, StreamError> {
    let mut replayed = Vec::new();
    for id in ids {
        let Some(letter) = range(conn, &streams.dead_letter, id, id, 1)
            .await?
            .into_iter()
            .find(|l| &l.id == id)
        else {
            continue;
        };
        let _: () = redis::pipe()
            .atomic()
            .xadd(&streams.inbound, "*", &replay_fields(&letter.fields))
            .ignore()
            .xdel(&streams.dead_letter, &[&letter.id])
            .ignore()
            .query_async(&mut conn.clone())
            .await?;
        replayed.push(letter.id);
    }
    Ok(replayed)
}
