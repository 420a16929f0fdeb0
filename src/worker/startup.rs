//! The composition root: the dependencies a configuration names, and a worker built from them.
//! `icmp worker`, `icmp bench` and the test harness all start workers through here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::watch;

use super::Worker;
use crate::cache::{self, Cache};
use crate::config::Config;
use crate::error::{CacheError, Category, Classify, LlmError, StoreError};
use crate::llm::{CircuitBreaker, OpenAiClient};
use crate::pipeline::{Failpoints, MessageHandler};
use crate::store::Store;
use crate::stream::Streams;
use crate::telemetry::metrics;
use crate::telemetry::server;

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Redis(#[from] CacheError),
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error("telemetry endpoint: {0}")]
    Telemetry(std::io::Error),
    /// The Redis server lacks a command the configuration asks for.
    #[error("{0}")]
    Unsupported(String),
}

impl Classify for StartupError {
    fn code(&self) -> &'static str {
        match self {
            StartupError::Store(e) => e.code(),
            StartupError::Redis(e) => e.code(),
            StartupError::Llm(e) => e.code(),
            StartupError::Telemetry(_) => "config.telemetry_listen",
            StartupError::Unsupported(_) => "config.redis_unsupported",
        }
    }
    fn category(&self) -> Category {
        match self {
            StartupError::Store(e) => e.category(),
            StartupError::Redis(e) => e.category(),
            StartupError::Llm(e) => e.category(),
            StartupError::Telemetry(_) | StartupError::Unsupported(_) => Category::System,
        }
    }
    fn status_code(&self) -> u16 {
        match self {
            StartupError::Store(e) => e.status_code(),
            StartupError::Redis(e) => e.status_code(),
            StartupError::Llm(e) => e.status_code(),
            StartupError::Telemetry(_) | StartupError::Unsupported(_) => 500,
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            StartupError::Store(e) => e.is_retryable(),
            StartupError::Redis(e) => e.is_retryable(),
            StartupError::Llm(e) => e.is_retryable(),
            StartupError::Telemetry(_) | StartupError::Unsupported(_) => false,
        }
    }
}

/// The LLM service a configured worker uses.
pub type ConfiguredLlm = CircuitBreaker<OpenAiClient>;

/// What every worker of a process shares: the PostgreSQL pool, a Redis connection and the
/// cache over it.
#[derive(Clone)]
pub struct Dependencies {
    pub store: Store,
    pub redis: ConnectionManager,
    pub cache: Cache,
}

impl std::fmt::Debug for Dependencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dependencies").finish_non_exhaustive()
    }
}

impl Dependencies {
    /// Connects to what `config` names, waiting up to a minute for Redis to come up.
    ///
    /// # Errors
    /// Invalid URLs, or Redis unreachable for a minute.
    pub async fn connect(config: &Config) -> Result<Self, StartupError> {
        let store = Store::connect_worker(&config.database)?;
        let redis = connect_redis_patiently(config).await?;
        let cache = Cache::new(redis.clone(), &config.redis, &config.cache);
        Ok(Dependencies {
            store,
            redis,
            cache,
        })
    }

    /// A worker for `config` (its consumer name, streams and limits) over these dependencies,
    /// with Redis connections of its own: its blocking reads and its commands must not wait
    /// behind anybody else's.
    ///
    /// # Errors
    /// Redis unreachable, or an invalid LLM configuration.
    pub async fn worker(
        &self,
        config: &Config,
        failpoints: Failpoints,
    ) -> Result<Arc<Worker<ConfiguredLlm>>, StartupError> {
        let conn = connect_redis_patiently(config).await?;
        if config.streams.wait_aof && !has_command(&conn, "WAITAOF").await? {
            return Err(StartupError::Unsupported(
                "streams.wait_aof needs WAITAOF, which this Redis server lacks (Redis 7.2 or \
                 later has it)"
                    .into(),
            ));
        }
        let reader = connect_redis_patiently(config).await?;
        let cache = Cache::new(conn.clone(), &config.redis, &config.cache);
        let client = OpenAiClient::new(&config.llm)?;
        // The first calls go over the connection the later ones use (HTTP/2 to an endpoint
        // that speaks it). An endpoint that refuses connections settles nothing at once; one
        // that does not answer delays the start by `llm.connect_timeout_ms` at most.
        client.settle_http_version().await;
        let llm = CircuitBreaker::new(client, &config.llm);
        let handler = Arc::new(MessageHandler::new(
            config.clone(),
            self.store.clone(),
            cache,
            llm,
            failpoints,
        ));
        let mut streams = Streams::new(
            reader,
            conn,
            config.streams.clone(),
            &config.redis.key_prefix,
        );
        let s = &config.streams;
        if s.wait_replicas > 0 || s.wait_aof {
            streams = streams.with_durable_wakes(connect_redis_patiently(config).await?);
        }
        let wake_ups = crate::tls::redis_client(config.redis.url.expose(), &config.redis.ca_file)
            .map_err(CacheError::from)?;
        Ok(Arc::new(Worker::new(
            config.clone(),
            handler,
            streams,
            Some(wake_ups),
        )))
    }
}

/// Connects everything the configuration names and runs one worker until `shutdown`.
///
/// # Errors
/// Invalid configuration (URLs), or a telemetry address that cannot be bound.
pub async fn run_until_stopped(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let handle = metrics::install();
    let deps = Dependencies::connect(&config).await?;
    let worker = deps.worker(&config, Failpoints::from_env()).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let telemetry = if config.telemetry.listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&config.telemetry.listen)
            .await
            .map_err(StartupError::Telemetry)?;
        tracing::info!(addr = %config.telemetry.listen, "serving /metrics, /healthz, /readyz");
        let (s, c) = (deps.store.clone(), deps.cache.clone());
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

/// Whether the server knows `command` (`COMMAND INFO` answers nil for an unknown one).
async fn has_command(conn: &ConnectionManager, command: &str) -> Result<bool, CacheError> {
    let info: Vec<redis::Value> = redis::cmd("COMMAND")
        .arg("INFO")
        .arg(command)
        .query_async(&mut conn.clone())
        .await?;
    Ok(info.iter().any(|v| !matches!(v, redis::Value::Nil)))
}

async fn connect_redis_patiently(config: &Config) -> Result<ConnectionManager, CacheError> {
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
