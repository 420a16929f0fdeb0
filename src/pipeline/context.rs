//! Step 5: the TemplateVariableProvider: builds the template context of one message from what
//! the read phase found.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::model::{Business, Extracted, StageInfo, Turn};
use crate::template::context::{
    BusinessVars, Context, ConversationVars, MessageVars, StageVars, UserVars,
};

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
    /// The conversation's rolling summary.
    pub summary: &'a str,
    pub extracted: &'a Extracted,
    pub now: DateTime<Utc>,
    /// The conversation's action results.
    pub actions: &'a Map<String, Value>,
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
        summary: i.summary.to_owned(),
        extracted: with_declared_fields(&i.business.extraction_fields, i.extracted),
        now: i.now.to_rfc3339(),
        actions: crate::actions::results_of(i.business, i.actions),
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
