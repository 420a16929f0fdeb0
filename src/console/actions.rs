//! The console's writes: replaying and purging one dead letter (the same functions as
//! `icmp dlq replay` and `icmp dlq purge`), retrying and cancelling one stage action's request
//! (as `icmp actions retry` and `cancel`), and signing in and out. Every write attempt, refused
//! or not, is logged (action, dead letter id, outcome, client address; never the token); the
//! ones by a signed-in writer are remembered too, so the dead-letter page can say what was
//! done. A write from another site (`Sec-Fetch-Site`, else `Origin` against `Host`) is refused.

use axum::Form;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::{session_clear_cookie, session_set_cookie};
use super::{ConsoleError, Ctx, see_other};
use crate::stream::{dlq, is_entry_id};

/// A write on one dead letter or one stage action's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Replay,
    Purge,
    /// An ended request sent again (`icmp actions retry`).
    Retry,
    /// A pending request cancelled (`icmp actions cancel`).
    Cancel,
    /// A conversation handed to a person (`icmp handoff start`).
    HandOver,
    /// A conversation given back to the bot (`icmp handoff end`).
    GiveBack,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Replay => "replay",
            Action::Purge => "purge",
            Action::Retry => "retry",
            Action::Cancel => "cancel",
            Action::HandOver => "hand_over",
            Action::GiveBack => "give_back",
        }
    }

    /// Whether `id` can name what the write acts on (a dead letter's entry id, a request's
    /// UUID).
    fn valid_id(self, id: &str) -> bool {
        match self {
            Action::Replay | Action::Purge => is_entry_id(id),
            Action::Retry | Action::Cancel | Action::HandOver | Action::GiveBack => {
                uuid::Uuid::parse_str(id).is_ok()
            }
        }
    }

    /// Where the browser goes after the write.
    fn done_page(self, id: &str, seq: u64) -> String {
        match self {
            Action::Replay | Action::Purge => format!("/dlq?done={seq}"),
            Action::Retry | Action::Cancel => format!("/actions/{id}"),
            Action::HandOver | Action::GiveBack => format!("/conversations/{id}"),
        }
    }
}

/// `POST /dlq/{id}/replay`: puts the dead letter back on the inbound stream.
pub(crate) async fn replay(ctx: Ctx, Path(id): Path<String>) -> Response {
    write(&ctx, Action::Replay, &id).await
}

/// `POST /dlq/{id}/purge`: deletes the dead letter.
pub(crate) async fn purge(ctx: Ctx, Path(id): Path<String>) -> Response {
    write(&ctx, Action::Purge, &id).await
}

/// `POST /conversations/{id}/handoff`: hands the conversation to a person.
pub(crate) async fn hand_over(ctx: Ctx, Path(id): Path<String>) -> Response {
    write(&ctx, Action::HandOver, &id).await
}

/// `POST /conversations/{id}/give-back`: gives the conversation back to the bot.
pub(crate) async fn give_back(ctx: Ctx, Path(id): Path<String>) -> Response {
    write(&ctx, Action::GiveBack, &id).await
}

/// `POST /actions/{id}/retry`: sends an ended request again.
pub(crate) async fn retry_request(ctx: Ctx, Path(id): Path<String>) -> Response {
    write(&ctx, Action::Retry, &id).await
}

/// `POST /actions/{id}/cancel`: cancels a pending request.
pub(crate) async fn cancel_request(ctx: Ctx, Path(id): Path<String>) -> Response {
    write(&ctx, Action::Cancel, &id).await
}

async fn write(ctx: &Ctx, action: Action, id: &str) -> Response {
    // Refused before anything of the request is logged or remembered: a malformed id (it could
    // forge log lines), and requests that may not write (so that nobody can push the real
    // actions off the list).
    if !action.valid_id(id) {
        tracing::info!(action = action.as_str(), outcome = %"not_found", remote.addr = %ctx.remote, "console write: not an id");
        return ctx.respond(Err(ConsoleError::NotFound(format!(
            "nothing to {} by that id",
            action.as_str()
        ))));
    }
    if let Err(e) = may_write(ctx) {
        tracing::info!(action = action.as_str(), target.id = %id, outcome = %"forbidden", remote.addr = %ctx.remote, "console write");
        return ctx.respond(Err(e));
    }
    let (outcome, result) = match perform(ctx, action, id).await {
        Ok(outcome) => (outcome.to_owned(), Ok(())),
        Err(e) => {
            let outcome = match &e {
                ConsoleError::NotFound(_) => "not_found".to_owned(),
                other => format!("failed: {}", other.code().unwrap_or("console.error")),
            };
            (outcome, Err(e))
        }
    };
    tracing::info!(
        action = action.as_str(),
        target.id = %id,
        outcome = %outcome,
        remote.addr = %ctx.remote,
        "console write"
    );
    let result = match (result, audit(ctx, action, id, &outcome).await) {
        (Ok(()), Err(e)) => Err(e),
        (result, _) => result,
    };
    let seq = ctx
        .console
        .record(action.as_str(), id, &outcome, &ctx.remote);
    match result {
        Ok(()) => see_other(&action.done_page(id, seq)),
        Err(e) => ctx.respond(Err(e)),
    }
}

/// Appends the write to the audit trail (docs/security.md, "Audit"); a write that cannot be
/// audited is reported as failed, though it took effect.
async fn audit(ctx: &Ctx, action: Action, id: &str, outcome: &str) -> Result<(), ConsoleError> {
    let name = match action {
        Action::Replay => "dlq.replay",
        Action::Purge => "dlq.purge",
        Action::Retry => "actions.retry",
        Action::Cancel => "actions.cancel",
        Action::HandOver => "handoff.start",
        Action::GiveBack => "handoff.end",
    };
    let mut record =
        crate::personal_data::audit::record(&format!("console:{}", ctx.remote), name).target(id);
    if outcome.starts_with("failed") || outcome == "not_found" {
        record = record.failed(outcome);
    }
    ctx.console.store.audit(&record).await?;
    Ok(())
}

/// Why this request may not write, if it may not: no token configured, not signed in, or sent
/// from another site.
fn may_write(ctx: &Ctx) -> Result<(), ConsoleError> {
    if !ctx.grant.writable {
        return Err(read_only());
    }
    if !ctx.grant.can_write {
        return Err(ConsoleError::Forbidden(
            "Sign in (or send the token) to replay or purge dead letters, or to retry or cancel \
             action requests."
                .to_owned(),
        ));
    }
    if ctx.cross_site {
        return Err(ConsoleError::Forbidden(
            "A request from another site may not change anything.".to_owned(),
        ));
    }
    Ok(())
}

fn read_only() -> ConsoleError {
    ConsoleError::Forbidden(
        "The console is read-only: no ICMP_CONSOLE_TOKEN is configured.".to_owned(),
    )
}

/// Does the write; returns the outcome (`replayed`, `purged`, `retried`, `cancelled`).
async fn perform(ctx: &Ctx, action: Action, id: &str) -> Result<&'static str, ConsoleError> {
    let c = &ctx.console;
    let ids = [id.to_owned()];
    let request = || uuid::Uuid::parse_str(id).map(|u| [u]).unwrap_or_default();
    let done = match action {
        Action::Replay => dlq::replay(&c.conn, &c.streams, &ids).await?.len(),
        Action::Purge => dlq::purge(&c.conn, &c.streams, &ids).await?.len(),
        Action::Retry => c.store.retry_actions(&request()).await?.len(),
        Action::Cancel => c.store.cancel_actions(&request()).await?.len(),
        Action::HandOver | Action::GiveBack => {
            let conversation = request().first().copied().unwrap_or_default();
            let done = if action == Action::HandOver {
                crate::handoff::start_by_operator(&c.store, &c.cache(), &c.handoff, conversation)
                    .await
            } else {
                crate::handoff::end_by_operator(&c.store, &c.cache(), conversation).await
            };
            usize::from(done.map_err(|e| match e {
                crate::error::PipelineError::Store(e) => ConsoleError::Store(e),
                other => ConsoleError::Stream(crate::error::StreamError::UnexpectedReply(
                    other.to_string(),
                )),
            })?)
        }
    };
    if done == 0 {
        return Err(ConsoleError::NotFound(match action {
            Action::Replay | Action::Purge => format!("no dead letter {id}"),
            Action::Retry => format!("no ended action request {id}"),
            Action::Cancel => format!("no pending action request {id}"),
            Action::HandOver => format!("no conversation {id} without a person"),
            Action::GiveBack => format!("no conversation {id} with a person"),
        }));
    }
    Ok(match action {
        Action::Replay => "replayed",
        Action::Purge => "purged",
        Action::Retry => "retried",
        Action::Cancel => "cancelled",
        Action::HandOver => "handed_over",
        Action::GiveBack => "given_back",
    })
}

/// `GET /login`: the sign-in form.
pub(crate) async fn login_form(ctx: Ctx) -> Response {
    let r = if ctx.grant.writable {
        ctx.page("login", "Sign in", serde_json::json!({ "failed": false }))
    } else {
        Err(read_only())
    };
    ctx.respond(r)
}

/// The sign-in form's fields.
#[derive(Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    token: String,
}

/// `POST /login`: exchanges the token for a session cookie.
pub(crate) async fn login(ctx: Ctx, Form(form): Form<LoginForm>) -> Response {
    if !ctx.grant.writable {
        return ctx.respond(Err(read_only()));
    }
    if ctx.cross_site {
        return ctx.respond(Err(ConsoleError::Forbidden(
            "A request from another site may not sign in.".to_owned(),
        )));
    }
    if !ctx.console.auth.token_matches(form.token.trim()) {
        tracing::info!(remote.addr = %ctx.remote, outcome = "rejected", "console sign-in");
        let page = ctx.page("login", "Sign in", serde_json::json!({ "failed": true }));
        return match page {
            Ok(page) => (StatusCode::UNAUTHORIZED, page).into_response(),
            Err(e) => ctx.respond(Err(e)),
        };
    }
    tracing::info!(remote.addr = %ctx.remote, outcome = "signed_in", "console sign-in");
    let session = ctx.console.auth.sign_in();
    let mut response = see_other("/");
    if let Ok(v) = session_set_cookie(&session).parse() {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `POST /logout`: ends the session.
pub(crate) async fn logout(ctx: Ctx, headers: HeaderMap) -> Response {
    ctx.console.auth.sign_out(&headers);
    let mut response = see_other("/");
    if let Ok(v) = session_clear_cookie().parse() {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}
