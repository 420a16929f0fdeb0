//! Golden transcripts: a recorded conversation (user turns, and the replies, stages and
//! extracted data they got) that `icmp replay FILE` runs again against a live worker and diffs.
//! With the mock LLM (deterministic) a transcript is an end-to-end regression test of a
//! business's definition: a template, stage or schema change that alters a conversation shows
//! up as a diff. `icmp replay --record FILE` writes one from an interactive conversation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::StreamsConfig;
use crate::producer::{self, Outgoing};
use crate::redis_connection::RedisConnection;
use crate::store::Store;

/// A recorded conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transcript {
    /// The business addressed.
    pub business: String,
    /// What the conversation shows (free text).
    #[serde(default)]
    pub description: String,
    pub turns: Vec<Turn>,
}

/// One user turn and what it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Turn {
    pub user: String,
    pub reply: String,
    /// `ok`, `fallback` or `error`.
    pub status: String,
    pub stage: String,
    /// Every field extracted so far, after this turn.
    #[serde(default)]
    pub extracted: BTreeMap<String, serde_json::Value>,
}

/// Why a transcript could not be read or run.
#[derive(Debug, thiserror::Error)]
pub enum TranscriptError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error(transparent)]
    Client(#[from] producer::SendError),
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
}

impl Transcript {
    /// Reads a transcript file.
    ///
    /// # Errors
    /// An unreadable file or one that is not a transcript.
    pub fn load(path: &std::path::Path) -> Result<Transcript, TranscriptError> {
        let fail = |reason: String| TranscriptError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        toml::from_str(&text).map_err(|e| fail(e.to_string()))
    }

    /// The transcript as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// Where one turn of a replay differed from the recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// 1-based turn number.
    pub turn: usize,
    pub what: &'static str,
    pub expected: String,
    pub got: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "turn {}: {} differs\n  expected: {}\n  got:      {}",
            self.turn, self.what, self.expected, self.got
        )
    }
}

/// What runs a turn: the worker (through Redis) and the database (for extracted data).
#[derive(Debug, Clone)]
pub struct Runner<'a> {
    pub conn: &'a RedisConnection,
    pub streams: &'a StreamsConfig,
    pub store: &'a Store,
    pub timeout: Duration,
}

impl Runner<'_> {
    /// Sends one turn as `user` in `conversation` (None: start one) and reads what it got.
    ///
    /// # Errors
    /// Redis or database failures, or no reply in time.
    pub async fn turn(
        &self,
        business: &str,
        user: &str,
        conversation: &mut Option<String>,
        text: &str,
    ) -> Result<Turn, TranscriptError> {
        let reply = producer::send_and_wait(
            self.conn,
            self.streams,
            &Outgoing {
                business_id: business.to_owned(),
                user_id: user.to_owned(),
                conversation_id: conversation.clone(),
                message_id: None,
                content: text.to_owned(),
                metadata: None,
            },
            self.timeout,
        )
        .await?;
        let field = |k: &str| reply.get(k).cloned().unwrap_or_default();
        let conv = field("conversation_id");
        let mut extracted = BTreeMap::new();
        if let (Ok(b), Ok(c)) = (Uuid::parse_str(business), Uuid::parse_str(&conv)) {
            extracted = self.store.extracted(b, c).await?.into_iter().collect();
            *conversation = Some(conv);
        }
        Ok(Turn {
            user: text.to_owned(),
            reply: field("content"),
            status: field("status"),
            stage: field("stage"),
            extracted,
        })
    }

    /// Runs a transcript as a new user (a fresh conversation) and lists every difference.
    ///
    /// # Errors
    /// As [`Runner::turn`].
    pub async fn replay(&self, t: &Transcript) -> Result<Vec<Difference>, TranscriptError> {
        let user = format!("replay-{}", Uuid::new_v4().simple());
        let mut conversation = None;
        let mut differences = Vec::new();
        for (i, expected) in t.turns.iter().enumerate() {
            let got = self
                .turn(&t.business, &user, &mut conversation, &expected.user)
                .await?;
            differences.extend(compare(i + 1, expected, &got));
        }
        Ok(differences)
    }
}

/// The differences between a recorded turn and a replayed one.
pub fn compare(turn: usize, expected: &Turn, got: &Turn) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut check = |what: &'static str, e: String, g: String| {
        if e != g {
            out.push(Difference {
                turn,
                what,
                expected: e,
                got: g,
            });
        }
    };
    check("reply", expected.reply.clone(), got.reply.clone());
    check("status", expected.status.clone(), got.status.clone());
    check("stage", expected.stage.clone(), got.stage.clone());
    check(
        "extracted data",
        serde_json::to_string(&expected.extracted).unwrap_or_default(),
        serde_json::to_string(&got.extracted).unwrap_or_default(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(reply: &str, stage: &str) -> Turn {
        Turn {
            user: "hi".into(),
            reply: reply.into(),
            status: "ok".into(),
            stage: stage.into(),
            extracted: BTreeMap::new(),
        }
    }

    #[test]
    fn a_transcript_round_trips_through_toml_and_differences_are_named() {
        let t = Transcript {
            business: "b".into(),
            description: "d".into(),
            turns: vec![turn("Hello", "welcome")],
        };
        let back: Transcript = toml::from_str(&t.to_toml()).expect("toml");
        assert_eq!(back, t);
        assert!(compare(1, &t.turns[0], &t.turns[0]).is_empty());
        let mut other = turn("Bye", "farewell");
        other
            .extracted
            .insert("name".into(), serde_json::json!("Ann"));
        let d = compare(2, &t.turns[0], &other);
        let what: Vec<&str> = d.iter().map(|d| d.what).collect();
        assert_eq!(what, ["reply", "stage", "extracted data"]);
        assert!(d[0].to_string().starts_with("turn 2: reply differs"));
    }
}
