//! The variables every template sees (DESIGN §7): `business`, `user`, `conversation`, `stage`,
//! `stages`, `message`, `history`, `extracted`, `now`, `actions`. User content is placed here as data; it
//! is never template source. The pipeline fills it per message (`pipeline::context`); import
//! checks templates against [`Context::sample`].

use chrono::Utc;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::model::{Extracted, StageInfo, Turn};

/// The template context of one message.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    pub business: BusinessVars,
    pub user: UserVars,
    pub conversation: ConversationVars,
    pub stage: StageVars,
    pub stages: Vec<StageVars>,
    pub message: MessageVars,
    /// Earlier turns, oldest first (those after the summary; bounded by the template's
    /// `context_tokens`).
    pub history: Vec<Turn>,
    /// The rolling summary of the turns before `history` (empty: none yet).
    pub summary: String,
    /// Every field the business's extraction schemas declare (`null` until known), merged with
    /// what has been extracted so far.
    pub extracted: Extracted,
    /// RFC 3339 time of processing.
    pub now: String,
    /// Every stage action of the business by name: its latest result
    /// ([`crate::actions::result`]), `status = "none"` until it has one.
    pub actions: Map<String, Value>,
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

/// The template value of the variable `path` names (`history` without its `older` first
/// turns), with upon's own lookup rules: a missing key or index is an error, or nothing after
/// `?.`.
///
/// # Errors
/// An unknown variable, a missing member, a member of a value that has none.
pub fn lookup(
    ctx: &Context,
    path: &[upon::ValueMember<'_>],
    older: usize,
) -> Result<upon::Value, String> {
    let Some((first, rest)) = path.split_first() else {
        return Err("not found in this scope".to_owned());
    };
    let upon::ValueAccess::Key(name) = first.access else {
        return Err("not found in this scope".to_owned());
    };
    let top = match name {
        "business" => upon::to_value(&ctx.business),
        "user" => upon::to_value(&ctx.user),
        "conversation" => upon::to_value(&ctx.conversation),
        "stage" => upon::to_value(&ctx.stage),
        "stages" => upon::to_value(&ctx.stages),
        "message" => upon::to_value(&ctx.message),
        "history" => upon::to_value(ctx.history.get(older..).unwrap_or_default()),
        "summary" => Ok(upon::Value::String(ctx.summary.clone())),
        "extracted" => upon::to_value(&ctx.extracted),
        "now" => Ok(upon::Value::String(ctx.now.clone())),
        "actions" => upon::to_value(&ctx.actions),
        _ => return Err("not found in this scope".to_owned()),
    };
    let mut value = top.map_err(|e| e.to_string())?;
    for member in rest {
        let optional = member.op == upon::ValueAccessOp::Optional;
        let found = match (value, member.access) {
            (upon::Value::List(list), upon::ValueAccess::Index(i)) => {
                let len = list.len();
                match list.into_iter().nth(i) {
                    Some(v) => v,
                    None if optional => return Ok(upon::Value::None),
                    None => return Err(format!("index out of bounds, the length is {len}")),
                }
            }
            (upon::Value::Map(mut map), upon::ValueAccess::Key(key)) => match map.remove(key) {
                Some(v) => v,
                None if optional => return Ok(upon::Value::None),
                None => return Err("not found in map".to_owned()),
            },
            (v, upon::ValueAccess::Index(_)) => {
                return Err(format!(
                    "{} does not support integer-based access",
                    human(&v)
                ));
            }
            (v, upon::ValueAccess::Key(_)) => {
                return Err(format!("{} does not support key-based access", human(&v)));
            }
        };
        value = found;
    }
    Ok(value)
}

/// A value's kind as upon names it in its errors.
fn human(v: &upon::Value) -> &'static str {
    match v {
        upon::Value::None => "none",
        upon::Value::Bool(_) => "bool",
        upon::Value::Integer(_) => "integer",
        upon::Value::Float(_) => "float",
        upon::Value::String(_) => "string",
        upon::Value::List(_) => "list",
        upon::Value::Map(_) => "map",
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
            summary: "The user asked about opening hours earlier.".into(),
            extracted,
            now: Utc::now().to_rfc3339(),
            actions: Map::new(),
        }
    }
}
