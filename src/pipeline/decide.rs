//! Steps 6–9, the LLM phase: the decisions the message leads to — the stage after it (selection,
//! step 6, and the new stage's templates, step 7), the fields learned from it (extraction, step
//! 8) and the reply (step 9) — each step returning its own LLM call record. No database
//! connection is held here: the write phase opens its transaction after the last call.

use std::time::Instant;

use uuid::Uuid;

use super::llm_call::LlmCaller;
use super::read::Snapshot;
use super::respond::{self, Response};
use super::{extract, select};
use crate::definitions::StageService;
use crate::definitions::TemplateService;
use crate::error::PipelineError;
use crate::llm::LlmService;
use crate::model::{Business, Extracted, StageInfo};
use crate::store::write_set::LlmCallRecord;
use crate::telemetry::metrics;
use crate::telemetry::traces::phase_span;
use tracing::Instrument;

/// What the LLM phase decided.
#[derive(Debug)]
pub struct Decisions<'b> {
    /// The stage after this message.
    pub stage: &'b StageInfo,
    /// (from, to) when selection moved the stage.
    pub transition: Option<(Uuid, Uuid)>,
    /// Fields extracted from this message.
    pub learned: Extracted,
    pub response: Response,
    /// Every LLM call made, in order (for `llm_calls`).
    pub calls: Vec<LlmCallRecord>,
    /// How long each step took, in milliseconds (`select`, `extract`, `respond`), stored
    /// with the reply for `icmp trace`.
    pub timings: Vec<(&'static str, u64)>,
    /// The requests of the stage actions the message fired (for the outbox).
    pub actions: Vec<crate::actions::OutboxRow>,
    /// The conversation's handoff after the message (`None`: no person has it).
    pub handoff: Option<crate::model::HandoffState>,
}

/// What the LLM phase uses.
#[derive(Debug)]
pub struct LlmPhase<'a, L> {
    pub caller: LlmCaller<'a, L>,
    pub templates: &'a TemplateService,
    pub stages: &'a StageService,
    /// Sent when the response call failed and the stage has no fallback template.
    pub last_resort: &'a str,
    /// The id the reply will be stored under.
    pub reply_id: Uuid,
    /// Where partial replies go, when the business streams replies.
    pub partials: Option<super::partials::Partials>,
    /// What one extraction answer may set.
    pub extraction_limits: super::extract::Limits,
}

/// Runs steps 6–9. The context in `read` follows the decisions (the new stage, the learned
/// fields), so the response sees them.
///
/// # Errors
/// A template that cannot be found or rendered (a definition problem), a database failure
/// while reading the new stage's templates. LLM failures degrade instead (keep the stage, skip
/// extraction, fall back).
pub async fn decide<'b, L: LlmService>(
    d: &LlmPhase<'_, L>,
    business: &'b Business,
    read: &mut Snapshot<'b>,
) -> Result<Decisions<'b>, PipelineError> {
    let mut calls = Vec::with_capacity(5);
    let mut timings = Vec::with_capacity(3);
    let mut stage = read.stage;
    let mut templates = read.templates;
    let mut transition = None;

    // Step 6: stage selection, when the stage has a selection template.
    if let Some(id) = templates.selection {
        let t = Instant::now();
        let template = d.templates.get(business.id, id).await?;
        let (chosen, records) = select::select(
            &d.caller,
            d.templates,
            &template,
            &read.context,
            business,
            stage,
        )
        .instrument(phase_span!("select"))
        .await?;
        calls.extend(records);
        if let Some(next) = chosen {
            transition = Some((stage.id, next.id));
            stage = next;
            // Step 7: the new stage's templates.
            templates = d.stages.templates(business.id, next.id).await?;
            read.context.set_stage(next);
        }
        metrics::step("select", t.elapsed());
        timings.push(("select", t.elapsed().as_millis() as u64));
    }

    // Step 8: data extraction, when the (new) stage has an extraction template.
    let learned = match templates.extraction {
        Some(id) => extraction(d, business, read, id, &mut calls, &mut timings).await?,
        None => Extracted::new(),
    };

    // Step 9: the response, or the fallback template's text.
    let t = Instant::now();
    let template = d.templates.get(business.id, templates.response).await?;
    let fallback = match templates.fallback {
        Some(id) => Some(d.templates.get(business.id, id).await?),
        None => None,
    };
    let (response, records) = respond::respond(
        &d.caller,
        d.templates,
        &template,
        fallback.as_deref(),
        respond::Reply {
            reply_id: d.reply_id,
            last_resort: d.last_resort,
            partials: d.partials.clone(),
        },
        &read.context,
    )
    .instrument(phase_span!("respond"))
    .await?;
    calls.extend(records);
    metrics::step("respond", t.elapsed());
    timings.push(("respond", t.elapsed().as_millis() as u64));

    Ok(Decisions {
        stage,
        transition,
        learned,
        response,
        calls,
        timings,
        actions: Vec::new(),
        handoff: None,
    })
}

/// Step 8 with extraction template `id`: what it learned, merged into the context.
async fn extraction<L: LlmService>(
    d: &LlmPhase<'_, L>,
    business: &Business,
    read: &mut Snapshot<'_>,
    id: Uuid,
    calls: &mut Vec<LlmCallRecord>,
    timings: &mut Vec<(&'static str, u64)>,
) -> Result<Extracted, PipelineError> {
    let t = Instant::now();
    let template = d.templates.get(business.id, id).await?;
    let (fields, records) = extract::extract(
        &d.caller,
        d.templates,
        &template,
        &read.context,
        &d.extraction_limits,
    )
    .instrument(phase_span!("extract"))
    .await?;
    calls.extend(records);
    read.context.merge_extracted(&fields);
    metrics::step("extract", t.elapsed());
    timings.push(("extract", t.elapsed().as_millis() as u64));
    Ok(fields)
}
