//! Wiring a worker process from its configuration: connections, the telemetry endpoint, the
//! pipeline and the loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Worker, WorkerError};
use crate::cache::{self, Cache};
use crate::config::Config;
use crate::error::{CacheError, Classify};
use crate::llm::{CircuitBreaker, OpenAiClient};
use crate::pipeline::{Failpoints, MessageHandler};
use crate::store::Store;
use crate::stream::Streams;
use crate::telemetry::metrics;
use crate::telemetry::server;

/// Connects everything the configuration names and runs one worker until `shutdown`.
///
/// # Errors
/// Invalid configuration (URLs), or a telemetry address that cannot be bound.
pub async fn run_until_stopped(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let handle = metrics::install();
    let store = Store::connect(&config.database)?;
    let conn = connect_redis_patiently(&config).await?;
    let reader = connect_redis_patiently(&config).await?;
    let cache = Cache::new(conn.clone(), &config.redis, &config.cache);
    let llm = CircuitBreaker::new(OpenAiClient::new(&config.llm)?, &config.llm);
    let handler = Arc::new(MessageHandler::new(
        config.clone(),
        store.clone(),
        cache.clone(),
        llm,
        Failpoints::from_env(),
    ));
    let streams = Streams::new(
        reader,
        conn,
        config.streams.clone(),
        &config.redis.key_prefix,
    )
    .with_wake_ups(redis::Client::open(config.redis.url.expose()).map_err(CacheError::from)?);
    let worker = Arc::new(Worker::new(config.clone(), handler, streams));

    let (stop_tx, stop_rx) = watch::channel(false);
    let telemetry = if config.telemetry.listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&config.telemetry.listen)
            .await
            .map_err(WorkerError::Telemetry)?;
        tracing::info!(addr = %config.telemetry.listen, "serving /metrics, /healthz, /readyz");
        let (s, c) = (store.clone(), cache.clone());
        let ready: server::ReadyCheck = Arc::new(move || {
            let (s, c) = (s.clone(), c.clone());
            Box::pin(async move {
                s.ping().await.map_err(|e| format!("postgres: {e}"))?;
                c.ping().await.map_err(|e| format!("redis: {e}"))?;
                Ok(())
            })
        });
        let mut rx = stop_rx.clone();
        Some(tokio::spawn(server::serve(
            listener,
            handle,
            ready,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )))
    };
    worker
        .run(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    if let Some(t) = telemetry {
        let _ = t.await;
    }
    drop(stop_rx);
    Ok(())
}

async fn connect_redis_patiently(
    config: &Config,
) -> Result<redis::aio::ConnectionManager, CacheError> {
    let mut attempt = 0u32;
    loop {
        match cache::connect(&config.redis).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_retryable() && attempt < 60 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "redis not reachable yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
