//! The TemplateVariableProvider: the variables every template sees (DESIGN §7) —
//! `business`, `user`, `conversation`, `stage`, `stages`, `message`, `history`, `extracted`,
//! `now`. User content is placed here as data; it is never template source.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::model::{Business, Extracted, StageInfo, Turn};

/// The template context of one message.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    pub business: BusinessVars,
    pub user: UserVars,
    pub conversation: ConversationVars,
    pub stage: StageVars,
    pub stages: Vec<StageVars>,
    pub message: MessageVars,
    /// Earlier turns, oldest first.
    pub history: Vec<Turn>,
    /// Every field the business's extraction schemas declare (`null` until known), merged with
    /// what has been extracted so far.
    pub extracted: Extracted,
    /// RFC 3339 time of processing.
    pub now: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BusinessVars {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserVars {
    pub id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConversationVars {
    pub id: String,
    pub is_new: bool,
    /// Number of earlier turns in this conversation's history window.
    pub turns: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageVars {
    pub name: String,
    pub description: String,
}

impl From<&StageInfo> for StageVars {
    fn from(s: &StageInfo) -> Self {
        StageVars {
            name: s.name.clone(),
            description: s.description.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MessageVars {
    pub content: String,
    /// The inbound metadata object (empty when absent).
    pub metadata: Map<String, Value>,
}

/// Inputs of [`build`].
#[derive(Debug)]
pub struct ContextInputs<'a> {
    pub business: &'a Business,
    pub user_id: &'a str,
    pub conversation_id: Uuid,
    pub is_new: bool,
    pub stage: &'a StageInfo,
    pub content: &'a str,
    pub metadata: Option<&'a Map<String, Value>>,
    pub history: Vec<Turn>,
    pub extracted: &'a Extracted,
    pub now: DateTime<Utc>,
}

/// Builds the context of one message.
pub fn build(i: ContextInputs<'_>) -> Context {
    Context {
        business: BusinessVars {
            id: i.business.id.to_string(),
            name: i.business.name.clone(),
        },
        user: UserVars {
            id: i.user_id.to_owned(),
        },
        conversation: ConversationVars {
            id: i.conversation_id.to_string(),
            is_new: i.is_new,
            turns: i.history.len(),
        },
        stage: i.stage.into(),
        stages: i.business.stages.iter().map(StageVars::from).collect(),
        message: MessageVars {
            content: i.content.to_owned(),
            metadata: i.metadata.cloned().unwrap_or_default(),
        },
        history: i.history,
        extracted: with_declared_fields(&i.business.extraction_fields, i.extracted),
        now: i.now.to_rfc3339(),
    }
}

impl Context {
    /// Points the context at another stage (after a stage change).
    pub fn set_stage(&mut self, stage: &StageInfo) {
        self.stage = stage.into();
    }

    /// Merges newly extracted fields.
    pub fn merge_extracted(&mut self, fields: &Extracted) {
        for (k, v) in fields {
            self.extracted.insert(k.clone(), v.clone());
        }
    }

    /// A context with every variable filled with plausible values, used to check templates at
    /// import time so that unknown variables are caught before any message arrives.
    pub fn sample(
        business_name: &str,
        stages: &[StageVars],
        extraction_fields: &[String],
    ) -> Context {
        let mut extracted = Map::new();
        for f in extraction_fields {
            extracted.insert(f.clone(), Value::String(format!("sample {f}")));
        }
        let stage = stages.first().cloned().unwrap_or(StageVars {
            name: "sample".into(),
            description: "sample stage".into(),
        });
        Context {
            business: BusinessVars {
                id: Uuid::nil().to_string(),
                name: business_name.to_owned(),
            },
            user: UserVars {
                id: "sample-user".into(),
            },
            conversation: ConversationVars {
                id: Uuid::nil().to_string(),
                is_new: false,
                turns: 2,
            },
            stage,
            stages: stages.to_vec(),
            message: MessageVars {
                content: "Hello".into(),
                metadata: Map::new(),
            },
            history: vec![
                Turn {
                    role: crate::model::Role::User,
                    content: "Hi".into(),
                },
                Turn {
                    role: crate::model::Role::Assistant,
                    content: "Hello! How can I help?".into(),
                },
            ],
            extracted,
            now: Utc::now().to_rfc3339(),
        }
    }
}

fn with_declared_fields(declared: &[String], extracted: &Extracted) -> Extracted {
    let mut out = Map::new();
    for f in declared {
        out.insert(f.clone(), Value::Null);
    }
    for (k, v) in extracted {
        out.insert(k.clone(), v.clone());
    }
    out
}
