//! The operator endpoint: `/metrics` (Prometheus text format), `/healthz` (the process runs)
//! and `/readyz` (PostgreSQL and Redis answer).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// A readiness probe: resolves to `Err(reason)` when a dependency is down.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    ready: ReadyCheck,
}

/// Serves the endpoint on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    ready: ReadyCheck,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, ready });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    match (state.ready)().await {
        Ok(()) => (StatusCode::OK, "ready".into()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}
