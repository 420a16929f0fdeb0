//! The read-only pages: overview (`icmp status`), dead letters (`icmp dlq list` / `show`),
//! conversations (`icmp conversation show`), stage actions' requests (`icmp actions list` /
//! `show`) and trace (`icmp trace`). Each reads through the
//! same function as its command and only shapes the result for its template.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, Query};
use axum::response::Response;
use serde::Deserialize;
use uuid::Uuid;

use super::html::{RenderError, url_component};
use super::{ConsoleError, Ctx, see_other};
use crate::personal_data::Subject;
use crate::store::conversations::ConversationRef;
use crate::stream::{dlq, is_entry_id};

/// How many dead letters and conversations a list shows at most.
const LIST_LIMIT: usize = 100;

/// A percentage with one decimal, as text.
fn percent(ratio: f64) -> String {
    format!("{:.1}", ratio * 100.0)
}

#[derive(Debug, Deserialize)]
pub(crate) struct OverviewQuery {
    /// The window of the per-business figures (default 15).
    minutes: Option<u64>,
}

/// `/`: the group, its consumers, and each business's replies, fallbacks and errors.
pub(crate) async fn overview(ctx: Ctx, Query(q): Query<OverviewQuery>) -> Response {
    ctx.respond(overview_page(&ctx, q.minutes.unwrap_or(15).clamp(1, 24 * 60)).await)
}

async fn overview_page(ctx: &Ctx, minutes: u64) -> Result<Response, ConsoleError> {
    let c = &ctx.console;
    let status = crate::status::read(&c.conn, &c.redis, &c.streams, &c.store, minutes).await?;
    let businesses: Vec<serde_json::Value> = status
        .businesses
        .iter()
        .map(|b| {
            serde_json::json!({
                "business_id": b.business_id,
                "name": b.name,
                "replies": b.replies,
                "per_minute": format!("{:.2}", b.replies as f64 / minutes as f64),
                "fallbacks": b.fallbacks,
                "fallback_percent": percent(b.fallback_ratio),
                "errors": b.errors,
                "error_percent": percent(b.error_ratio),
            })
        })
        .collect();
    let consumers: Vec<serde_json::Value> = status
        .totals
        .consumers
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "pending": c.pending,
                "idle": format!("{:.1}", c.idle_ms as f64 / 1000.0),
            })
        })
        .collect();
    let lag = status
        .totals
        .lag
        .map_or("unknown".to_owned(), |l| l.to_string());
    // Each inbound shard, when there are several.
    let shards: Vec<serde_json::Value> = status
        .shards
        .iter()
        .filter(|_| status.shards.len() > 1)
        .map(|s| {
            serde_json::json!({
                "shard": s.shard,
                "stream": s.figures.stream,
                "lag": s.figures.lag.map_or("unknown".to_owned(), |l| l.to_string()),
                "pending": s.figures.pending,
                "queues_in_use": s.figures.queues_in_use,
                "dead_letters": s.figures.dead_letters,
                "group_exists": s.figures.group_exists,
            })
        })
        .collect();
    ctx.page(
        "overview",
        "Overview",
        serde_json::json!({
            "status": {
                "stream": status.totals.stream,
                "group": status.group,
                "group_exists": status.totals.group_exists,
                "pending": status.totals.pending,
                "queues_in_use": status.totals.queues_in_use,
                "dead_letters": status.totals.dead_letters,
                "window_minutes": status.window_minutes,
                "consumers": consumers,
            },
            "lag": lag,
            "shards": shards,
            "businesses": businesses,
        }),
    )
}

/// The filters of `/dlq`, as the form sends them (empty fields are no filter).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct DlqQuery {
    #[serde(default)]
    business: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    older_than_secs: String,
}

impl DlqQuery {
    fn filter(&self) -> Result<dlq::Filter, ConsoleError> {
        let some = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        let older_than = match some(&self.older_than_secs) {
            None => None,
            Some(s) => Some(Duration::from_secs(s.parse().map_err(|_| {
                ConsoleError::BadRequest(format!("older_than_secs is not a number: {s}"))
            })?)),
        };
        Ok(dlq::Filter {
            business: some(&self.business),
            code: some(&self.code),
            older_than,
        })
    }
}

/// `/dlq`: the oldest dead letters that match the filters, counts by code, recent actions.
pub(crate) async fn dead_letters(ctx: Ctx, Query(q): Query<DlqQuery>) -> Response {
    ctx.respond(dead_letters_page(&ctx, &q).await)
}

async fn dead_letters_page(ctx: &Ctx, q: &DlqQuery) -> Result<Response, ConsoleError> {
    let c = &ctx.console;
    let found = dlq::find(&c.conn, &c.streams, &q.filter()?, LIST_LIMIT).await?;
    // Who did what is for writers' eyes.
    let mut actions = c.writes();
    if !ctx.grant.can_write {
        actions.iter_mut().for_each(|a| a.remote.clear());
    }
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let letters: Vec<serde_json::Value> = found
        .iter()
        .map(|d| {
            *by_code.entry(d.field("error_code")).or_default() += 1;
            let mut row = serde_json::Map::new();
            row.insert("id".into(), d.id.clone().into());
            for name in [
                "error_code",
                "business_id",
                "user_id",
                "message_id",
                "deliveries",
                "failed_at",
                "error_detail",
            ] {
                row.insert(name.into(), d.field(name).into());
            }
            serde_json::Value::Object(row)
        })
        .collect();
    let by_code: Vec<serde_json::Value> = by_code
        .into_iter()
        .map(|(code, count)| serde_json::json!({ "code": code, "count": count }))
        .collect();
    ctx.page(
        "dlq_list",
        "Dead letters",
        serde_json::json!({
            "filter": {
                "business": q.business,
                "code": q.code,
                "older_than_secs": q.older_than_secs,
            },
            "shown": letters.len(),
            "by_code": by_code,
            "letters": letters,
            "actions": actions,
        }),
    )
}

/// `/dlq/{id}`: every field of one dead letter, with Replay and Purge for writers.
pub(crate) async fn dead_letter(ctx: Ctx, Path(id): Path<String>) -> Response {
    ctx.respond(dead_letter_page(&ctx, &id).await)
}

async fn dead_letter_page(ctx: &Ctx, id: &str) -> Result<Response, ConsoleError> {
    let c = &ctx.console;
    let missing = || ConsoleError::NotFound(format!("no dead letter {id}"));
    if !is_entry_id(id) {
        return Err(missing());
    }
    let d = dlq::show(&c.conn, &c.streams, id)
        .await?
        .ok_or_else(missing)?;
    let subject = Subject::new(&d.field("business_id"), &d.field("user_id"));
    audited_read(ctx, "dlq.read", id, subject.as_ref()).await?;
    let fields: Vec<serde_json::Value> = d
        .fields
        .iter()
        .map(|(k, v)| {
            serde_json::json!({
                "name": String::from_utf8_lossy(k),
                "value": String::from_utf8_lossy(v),
            })
        })
        .collect();
    ctx.page(
        "dlq_show",
        &format!("Dead letter {}", d.id),
        serde_json::json!({
            "id": d.id,
            "message_id": d.field("message_id"),
            "fields": fields,
        }),
    )
}

#[derive(Debug, Deserialize)]
pub(crate) struct ConversationsQuery {
    #[serde(default)]
    business: String,
}

/// `/conversations`: the businesses; `?business=ID`: its most recently active conversations.
pub(crate) async fn conversations(ctx: Ctx, Query(q): Query<ConversationsQuery>) -> Response {
    ctx.respond(conversations_page(&ctx, q.business.trim()).await)
}

async fn conversations_page(ctx: &Ctx, business: &str) -> Result<Response, ConsoleError> {
    let store = &ctx.console.store;
    if business.is_empty() {
        let businesses: Vec<serde_json::Value> = store
            .businesses()
            .await?
            .into_iter()
            .map(|(id, name)| serde_json::json!({ "id": id, "name": name }))
            .collect();
        return ctx.page(
            "businesses",
            "Conversations",
            serde_json::json!({ "businesses": businesses }),
        );
    }
    let id = Uuid::parse_str(business).map_err(|_| {
        ConsoleError::BadRequest(format!("the business id is not a UUID: {business}"))
    })?;
    let b = store
        .load_business(id)
        .await?
        .ok_or_else(|| ConsoleError::NotFound(format!("no business {id}")))?;
    let list = store
        .recent_conversations(id, i64::try_from(LIST_LIMIT).unwrap_or(100))
        .await?;
    ctx.page(
        "conversations",
        &format!("Conversations of {}", b.name),
        serde_json::json!({
            "business_id": id,
            "count": list.len(),
            "conversations": list,
        }),
    )
}

/// `/conversations/{id}`: the transcript with stages, template versions and extracted data.
pub(crate) async fn conversation(ctx: Ctx, Path(id): Path<String>) -> Response {
    ctx.respond(conversation_page(&ctx, &id).await)
}

async fn conversation_page(ctx: &Ctx, id: &str) -> Result<Response, ConsoleError> {
    let missing = || ConsoleError::NotFound(format!("no conversation {id}"));
    let uuid = Uuid::parse_str(id).map_err(|_| missing())?;
    let record = ctx
        .console
        .store
        .conversation_record(ConversationRef::Id(uuid))
        .await?
        .ok_or_else(missing)?;
    let subject = Subject {
        business: record.business_id,
        user: record.user_id.clone(),
    };
    audited_read(ctx, "conversation.read", id, Some(&subject)).await?;
    let mut c = serde_json::to_value(&record).map_err(RenderError::from)?;
    // Times as the CLI prints them.
    if let Some(messages) = c.get_mut("messages").and_then(|m| m.as_array_mut()) {
        for (m, r) in messages.iter_mut().zip(&record.messages) {
            m["created_at"] = r.created_at.format("%Y-%m-%d %H:%M:%S").to_string().into();
        }
    }
    ctx.page(
        "conversation",
        &format!("Conversation {}", record.id),
        serde_json::json!({ "c": c }),
    )
}

#[derive(Debug, Deserialize)]
pub(crate) struct ActionsQuery {
    #[serde(default)]
    business: String,
    #[serde(default)]
    status: String,
}

/// The outbox statuses an operator filters on.
const ACTION_STATUSES: [&str; 5] = ["pending", "delivered", "rejected", "dead", "cancelled"];

/// `/actions`: stage actions' requests, the newest first (`icmp actions list`), with counts
/// per status; `?business=ID&status=S` filter.
pub(crate) async fn outbox(ctx: Ctx, Query(q): Query<ActionsQuery>) -> Response {
    ctx.respond(outbox_page(&ctx, &q).await)
}

async fn outbox_page(ctx: &Ctx, q: &ActionsQuery) -> Result<Response, ConsoleError> {
    let business = match q.business.trim() {
        "" => None,
        b => Some(Uuid::parse_str(b).map_err(|_| {
            ConsoleError::BadRequest(format!("the business id is not a UUID: {b}"))
        })?),
    };
    let status = match q.status.trim() {
        "" => None,
        s if ACTION_STATUSES.contains(&s) => Some(s),
        s => {
            return Err(ConsoleError::BadRequest(format!(
                "no status {s}: one of {}",
                ACTION_STATUSES.join(", ")
            )));
        }
    };
    let rows = ctx
        .console
        .store
        .list_actions(business, status, i64::try_from(LIST_LIMIT).unwrap_or(100))
        .await?;
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    let shown: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            *by_status.entry(r.status.as_str()).or_default() += 1;
            serde_json::json!({
                "id": r.id,
                "business_id": r.business_id,
                "conversation_id": r.conversation_id,
                "action": r.action,
                "status": r.status,
                "attempts": format!("{}/{}", r.attempts, r.max_attempts),
                "last_status": r.last_status.map(|s| s.to_string()).unwrap_or_default(),
                "last_error": r.last_error.clone().unwrap_or_default(),
                "updated_at": r.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            })
        })
        .collect();
    let by_status: Vec<serde_json::Value> = by_status
        .into_iter()
        .map(|(status, count)| serde_json::json!({ "status": status, "count": count }))
        .collect();
    ctx.page(
        "actions_list",
        "Actions",
        serde_json::json!({
            "filter": { "business": q.business.trim(), "status": q.status.trim() },
            "statuses": ACTION_STATUSES.map(|s| serde_json::json!({
                "name": s,
                "selected": Some(s) == status,
            })),
            "shown": shown.len(),
            "by_status": by_status,
            "rows": shown,
        }),
    )
}

/// `/actions/{id}`: one request (`icmp actions show`), with Retry or Cancel for writers.
pub(crate) async fn outbox_row(ctx: Ctx, Path(id): Path<String>) -> Response {
    ctx.respond(outbox_row_page(&ctx, &id).await)
}

async fn outbox_row_page(ctx: &Ctx, id: &str) -> Result<Response, ConsoleError> {
    let missing = || ConsoleError::NotFound(format!("no action request {id}"));
    let uuid = Uuid::parse_str(id).map_err(|_| missing())?;
    let row = ctx.console.store.action(uuid).await?.ok_or_else(missing)?;
    let text = |v: Option<String>| v.unwrap_or_default();
    let fields = [
        ("action", row.action.clone()),
        ("status", row.status.clone()),
        (
            "attempts",
            format!("{} of {}", row.attempts, row.max_attempts),
        ),
        ("business", row.business_id.to_string()),
        ("conversation", row.conversation_id.to_string()),
        ("idempotency key", row.idempotency_key.clone()),
        (
            "last HTTP status",
            text(row.last_status.map(|s| s.to_string())),
        ),
        ("last error", text(row.last_error.clone())),
        ("latency (ms)", text(row.latency_ms.map(|s| s.to_string()))),
        (
            "body",
            serde_json::to_string_pretty(&row.body).unwrap_or_default(),
        ),
        ("answer", text(row.response.clone())),
        ("follow-up", text(row.follow_up_text.clone())),
        (
            "follow-up published",
            text(row.follow_up_published_at.map(|t| t.to_rfc3339())),
        ),
        ("created", row.created_at.to_rfc3339()),
        ("updated", row.updated_at.to_rfc3339()),
    ]
    .map(|(name, value)| serde_json::json!({ "name": name, "value": value }));
    ctx.page(
        "action_show",
        &format!("Action request {}", row.id),
        serde_json::json!({
            "id": row.id,
            "conversation_id": row.conversation_id,
            "fields": fields,
            "retryable": matches!(row.status.as_str(), "dead" | "rejected" | "cancelled"),
            "cancellable": row.status == "pending",
        }),
    )
}

/// `/handoffs`: the conversations with a person (`icmp handoff list`), the oldest first.
pub(crate) async fn handoffs(ctx: Ctx) -> Response {
    ctx.respond(handoffs_page(&ctx).await)
}

async fn handoffs_page(ctx: &Ctx) -> Result<Response, ConsoleError> {
    let rows = ctx.console.store.list_handoffs(None).await?;
    let shown: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "conversation_id": r.conversation_id,
                "business_id": r.business_id,
                "user_id": r.user_id,
                "stage": r.stage,
                "since": r.handoff.since,
                "by": r.handoff.by,
                "answered": r.handoff.answered == Some(true),
                "timed_out": r.handoff.timed_out == Some(true),
            })
        })
        .collect();
    ctx.page(
        "handoffs",
        "With a person",
        serde_json::json!({ "count": shown.len(), "rows": shown }),
    )
}

/// `/audit`: the newest records of the operators' audit trail (`icmp audit`).
pub(crate) async fn audit(ctx: Ctx) -> Response {
    ctx.respond(audit_page(&ctx).await)
}

async fn audit_page(ctx: &Ctx) -> Result<Response, ConsoleError> {
    let filter = crate::store::audit::AuditFilter {
        limit: 200,
        ..Default::default()
    };
    let rows = ctx.console.store.audit_log(&filter).await?;
    let shown: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "at": r.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                "actor": r.actor,
                "action": r.action,
                "business_id": r.business_id.map(|b| b.to_string()).unwrap_or_default(),
                "user_key": r.user_key.as_deref().map(|k| &k[..k.len().min(16)]).unwrap_or_default(),
                "target": r.target.clone().unwrap_or_default(),
                "counts": if r.counts.as_object().is_some_and(|m| !m.is_empty()) {
                    r.counts.to_string()
                } else {
                    String::new()
                },
                "outcome": r.outcome,
            })
        })
        .collect();
    ctx.page(
        "audit",
        "Audit trail",
        serde_json::json!({ "count": shown.len(), "rows": shown }),
    )
}

#[derive(Debug, Deserialize)]
pub(crate) struct TraceQuery {
    #[serde(default)]
    id: String,
}

/// `/trace?id=…` (the search box): redirects to `/trace/{id}`.
pub(crate) async fn trace_search(Query(q): Query<TraceQuery>) -> Response {
    let id = q.id.trim();
    if id.is_empty() {
        return see_other("/");
    }
    see_other(&format!("/trace/{}", url_component(id)))
}

/// `/trace/{id}`: everything known about one message, by message_id, log_id or inbound id.
pub(crate) async fn trace(ctx: Ctx, Path(id): Path<String>) -> Response {
    ctx.respond(trace_page(&ctx, &id).await)
}

async fn trace_page(ctx: &Ctx, id: &str) -> Result<Response, ConsoleError> {
    let c = &ctx.console;
    let t = crate::trace::trace(&c.conn, &c.streams, &c.store, id).await?;
    if !t.found() {
        return Err(ConsoleError::NotFound(format!("nothing found for {id}")));
    }
    let subject = t.business_id().map(|business| Subject {
        business,
        user: String::new(),
    });
    audited_read(ctx, "trace.read", &t.reference(), subject.as_ref()).await?;
    let t = serde_json::to_value(&t).map_err(RenderError::from)?;
    ctx.page(
        "trace",
        &format!("Trace of {id}"),
        serde_json::json!({ "t": t }),
    )
}

/// Records that this request read user data of `subject` (docs/security.md, "Audit"); a page
/// that cannot be audited is not shown.
async fn audited_read(
    ctx: &Ctx,
    action: &str,
    target: &str,
    subject: Option<&Subject>,
) -> Result<(), ConsoleError> {
    let mut record =
        crate::personal_data::audit::record(&format!("console:{}", ctx.remote), action)
            .target(target);
    if let Some(s) = subject {
        record = record.business(s.business);
        if !s.user.is_empty() {
            record = record.user(s.key());
        }
    }
    ctx.console.store.audit(&record).await?;
    Ok(())
}

/// Any other path.
pub(crate) async fn not_found(ctx: Ctx) -> Response {
    ctx.respond(Err(ConsoleError::NotFound("no such page".to_owned())))
}
