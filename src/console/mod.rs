//! `icmp console`: a small web console over the same reads as the operator commands. It shows
//! the overview of `icmp status`, the dead letters of `icmp dlq` (with Replay and Purge), the
//! conversations of `icmp conversation show` and the trace of `icmp trace`, as server-rendered
//! HTML with plain forms.
//!
//! # Layout
//!
//! - this module: the shared state ([`Console`]), the router, per-request context ([`Ctx`]),
//!   the error pages and the log of write actions.
//! - [`auth`]: the write token, sessions, and what a request may do.
//! - [`html`]: the templates (escaping every value by default) and their rendering.
//! - [`pages`]: the read-only pages.
//! - [`actions`]: replay and purge, and signing in and out.

pub mod actions;
pub mod auth;
pub mod html;
pub mod pages;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use secrecy::SecretString;

use crate::config::{HandoffConfig, RedisConfig, StreamsConfig};
use crate::error::{Classify, StoreError, StreamError};
use crate::redis_connection::RedisConnection;
use crate::status::StatusError;
use crate::store::Store;
use auth::{Auth, Grant};
use html::{Chrome, Pages, RenderError};

/// How many write actions the console remembers (shown on the dead-letter page).
const WRITE_LOG_LEN: usize = 50;

/// Everything the console's handlers share.
#[derive(Debug)]
pub struct Console {
    pub(crate) conn: RedisConnection,
    pub(crate) store: Store,
    pub(crate) redis: RedisConfig,
    pub(crate) streams: StreamsConfig,
    /// Where an operator's handoff tells the agents.
    pub(crate) handoff: HandoffConfig,
    pub(crate) auth: Auth,
    pub(crate) pages: Pages,
    writes: Mutex<WriteLog>,
    /// Every page needs the token too (the console listens beyond loopback).
    private: bool,
}

/// One replay or purge, as the console remembers it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WriteRecord {
    /// Sequence number (the `done` parameter of the redirect after the action).
    pub seq: u64,
    /// When (UTC).
    pub at: String,
    /// `replay` or `purge`.
    pub action: &'static str,
    /// The dead letter's stream id.
    pub id: String,
    /// `replayed`, `purged`, `not_found`, `forbidden`, or `failed: <code>`.
    pub outcome: String,
    /// The client's address, when known.
    pub remote: String,
}

#[derive(Debug, Default)]
struct WriteLog {
    next: u64,
    records: VecDeque<WriteRecord>,
}

impl Console {
    /// The console over these connections; `token` enables writes (`None`: read-only).
    ///
    /// # Errors
    /// A page template that does not compile.
    pub fn new(
        conn: RedisConnection,
        store: Store,
        redis: RedisConfig,
        streams: StreamsConfig,
        handoff: HandoffConfig,
        token: Option<SecretString>,
    ) -> Result<Arc<Console>, RenderError> {
        Console::build(conn, store, redis, (streams, handoff), token, false)
    }

    /// The console for a listener at `listen`: on a loopback address as [`Console::new`];
    /// beyond loopback every page needs the token too (conversations are personal data), so a
    /// token is required.
    ///
    /// # Errors
    /// A non-loopback address without a token, a page template that does not compile.
    pub fn for_listener(
        listen: SocketAddr,
        conn: RedisConnection,
        store: Store,
        redis: RedisConfig,
        streams: StreamsConfig,
        handoff: HandoffConfig,
        token: Option<SecretString>,
    ) -> Result<Arc<Console>, ConsoleError> {
        let private = !listen.ip().is_loopback();
        if private && token.is_none() {
            return Err(ConsoleError::Forbidden(format!(
                "listening on {listen} (beyond loopback) needs ICMP_CONSOLE_TOKEN: every page \
                 then asks for it"
            )));
        }
        Ok(Console::build(
            conn,
            store,
            redis,
            (streams, handoff),
            token,
            private,
        )?)
    }

    fn build(
        conn: RedisConnection,
        store: Store,
        redis: RedisConfig,
        (streams, handoff): (StreamsConfig, HandoffConfig),
        token: Option<SecretString>,
        private: bool,
    ) -> Result<Arc<Console>, RenderError> {
        Ok(Arc::new(Console {
            conn,
            store,
            redis,
            streams,
            handoff,
            auth: Auth::new(token),
            pages: Pages::new()?,
            writes: Mutex::new(WriteLog::default()),
            private,
        }))
    }

    /// The cache, for the console's writes to drop what they change (nothing is written
    /// through it, so its lifetimes do not matter).
    pub(crate) fn cache(&self) -> crate::cache::Cache {
        crate::cache::Cache::new(
            self.conn.clone(),
            &self.redis,
            &crate::config::CacheConfig {
                definition_ttl_secs: 1,
                conversation_ttl_secs: 1,
            },
        )
    }

    /// Remembers a write action; returns its sequence number.
    pub(crate) fn record(
        &self,
        action: &'static str,
        id: &str,
        outcome: &str,
        remote: &str,
    ) -> u64 {
        let mut log = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        log.next += 1;
        let seq = log.next;
        log.records.push_front(WriteRecord {
            seq,
            at: chrono::Utc::now()
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string(),
            action,
            id: id.to_owned(),
            outcome: outcome.to_owned(),
            remote: remote.to_owned(),
        });
        log.records.truncate(WRITE_LOG_LEN);
        seq
    }

    /// The remembered write actions, newest first.
    pub fn writes(&self) -> Vec<WriteRecord> {
        let log = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        log.records.iter().cloned().collect()
    }

    fn write(&self, seq: u64) -> Option<WriteRecord> {
        let log = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        log.records.iter().find(|r| r.seq == seq).cloned()
    }
}

/// The console's routes.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/dlq", get(pages::dead_letters))
        .route("/dlq/{id}", get(pages::dead_letter))
        .route("/dlq/{id}/replay", post(actions::replay))
        .route("/dlq/{id}/purge", post(actions::purge))
        .route("/conversations", get(pages::conversations))
        .route("/conversations/{id}", get(pages::conversation))
        .route("/handoffs", get(pages::handoffs))
        .route("/audit", get(pages::audit))
        .route("/conversations/{id}/handoff", post(actions::hand_over))
        .route("/conversations/{id}/give-back", post(actions::give_back))
        .route("/actions", get(pages::outbox))
        .route("/actions/{id}", get(pages::outbox_row))
        .route("/actions/{id}/retry", post(actions::retry_request))
        .route("/actions/{id}/cancel", post(actions::cancel_request))
        .route("/trace", get(pages::trace_search))
        .route("/trace/{id}", get(pages::trace))
        .route("/login", get(actions::login_form).post(actions::login))
        .route("/logout", post(actions::logout))
        .fallback(pages::not_found)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console)
}

/// Headers on every response: no scripts, no framing, no content sniffing, no caching.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Serves the console on `listener` until `shutdown` resolves.
///
/// # Errors
/// The listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    console: Arc<Console>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(console).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Why a page could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Nothing with that id (or a malformed id).
    #[error("{0}")]
    NotFound(String),
    /// A parameter that cannot be used.
    #[error("{0}")]
    BadRequest(String),
    /// A write without the token.
    #[error("{0}")]
    Forbidden(String),
    /// Redis failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A page could not be rendered.
    #[error(transparent)]
    Render(#[from] RenderError),
}

impl From<StatusError> for ConsoleError {
    fn from(e: StatusError) -> Self {
        match e {
            StatusError::Stream(e) => ConsoleError::Stream(e),
            StatusError::Store(e) => ConsoleError::Store(e),
        }
    }
}

impl ConsoleError {
    /// The HTTP status of the error page.
    pub fn status(&self) -> StatusCode {
        match self {
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Forbidden(_) => StatusCode::FORBIDDEN,
            // A dependency the console reads from is down or failing: try again later.
            ConsoleError::Stream(_) | ConsoleError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            ConsoleError::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable error code shown on the page, for dependency failures.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            ConsoleError::Stream(e) => Some(e.code()),
            ConsoleError::Store(e) => Some(e.code()),
            ConsoleError::NotFound(_)
            | ConsoleError::BadRequest(_)
            | ConsoleError::Forbidden(_)
            | ConsoleError::Render(_) => None,
        }
    }
}

/// Per request: the console, what the request may do, and the client's address.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// What every handler shares.
    pub console: Arc<Console>,
    /// What this request may do.
    pub grant: Grant,
    /// The client's address (`unknown` when the server runs without connect info).
    pub remote: String,
    /// The write action named by `?done=N`, shown as a note.
    flash: Option<String>,
    /// The request comes from another site (by `Sec-Fetch-Site` or `Origin`): no writes.
    pub cross_site: bool,
}

impl FromRequestParts<Arc<Console>> for Ctx {
    /// The sign-in request page, before any work, when the console is private.
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        let grant = console.auth.grant(&parts.headers);
        let remote = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or_else(|| "unknown".to_owned(), |c| c.0.to_string());
        let flash = parts
            .uri
            .query()
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("done="))
            .and_then(|n| n.parse::<u64>().ok())
            .and_then(|seq| console.write(seq))
            .map(|w| format!("{} of dead letter {}: {}", w.action, w.id, w.outcome));
        let ctx = Ctx {
            console: console.clone(),
            grant,
            remote,
            flash,
            cross_site: auth::is_cross_site(&parts.headers),
        };
        if console.private && !ctx.grant.can_write && parts.uri.path() != "/login" {
            return Err(ctx.respond(Err(ConsoleError::Forbidden(
                "Sign in to use the console: it listens beyond loopback.".to_owned(),
            ))));
        }
        Ok(ctx)
    }
}

impl Ctx {
    fn chrome(&self) -> Chrome {
        Chrome {
            writable: self.grant.writable,
            can_write: self.grant.can_write,
            signed_in: self.grant.signed_in,
            flash: self.flash.clone(),
        }
    }

    /// Renders page `name` with status 200.
    pub(crate) fn page(
        &self,
        name: &str,
        title: &str,
        body: serde_json::Value,
    ) -> Result<Response, ConsoleError> {
        Ok(Html(
            self.console
                .pages
                .render(name, title, &self.chrome(), body)?,
        )
        .into_response())
    }

    /// The page, or the error page for `result`'s error.
    pub(crate) fn respond(&self, result: Result<Response, ConsoleError>) -> Response {
        let e = match result {
            Ok(r) => return r,
            Err(e) => e,
        };
        let status = e.status();
        if status.is_server_error() {
            tracing::warn!(error = %e, code = e.code().unwrap_or("console.render"), "console page failed");
        }
        let title = match status {
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::BAD_REQUEST => "Bad request",
            StatusCode::SERVICE_UNAVAILABLE => "Unavailable",
            _ => "Error",
        };
        let body = serde_json::json!({ "message": e.to_string(), "code": e.code() });
        match self
            .console
            .pages
            .render("error", title, &self.chrome(), body)
        {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, e.to_string()).into_response(),
        }
    }
}

/// A `303 See Other` to `to` (after a form post).
pub(crate) fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}
