//! The composition root: every icmp process connects through here.
//!
//! - `icmp worker` builds an [`Application`] and runs it until a signal; the test harness and
//!   `icmp bench` build the same [`Application`] for each of their in-process workers, so a
//!   test's worker connects, and runs, as a production one does (under `database.worker_role`,
//!   row-level security applying).
//! - The operator commands (`import`, `status`, `trace`, `dlq`, `console`, `send` …), the
//!   benchmark's producer and the tests' own checks connect as an [`Operator`]: the configured
//!   database user, and Redis on first use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::config::{Config, StreamsConfig};
use crate::error::{CacheError, Classify, LlmError, StoreError};
use crate::llm::Endpoints;
use crate::pipeline::{Failpoints, MessageHandler};
use crate::redis_connection::{self, RedisConnection};
use crate::retry::Backoff;
use crate::store::Store;
use crate::stream::Streams;
use crate::stream::resharding::{self, Part, Switch};
use crate::telemetry::{metrics, server};
use crate::worker::slots::Slots;
use crate::worker::{Worker, WorkerStats};

/// How long a start waits for Redis to come up.
const REDIS_PATIENCE: Duration = Duration::from_secs(60);

/// Why a process could not start.
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

/// The LLM service a configured worker uses.
pub type ConfiguredLlm = Endpoints;

/// A worker process's connections: the PostgreSQL pool (as `database.worker_role`), which
/// the pipeline uses, and a Redis connection with the cache over it, which the readiness probe
/// and the tests' phases use (the worker opens Redis connections of its own).
#[derive(Clone)]
pub struct Dependencies {
    pub store: Store,
    pub redis: RedisConnection,
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

    /// The workers for `config`: one loop per inbound shard it reads (`streams.shards`,
    /// `streams.read_shards`), sharing the pipeline, the processing slots and the counters,
    /// each with a Redis connection of its own for its blocking reads; their commands go over
    /// one more connection, which nothing else in the process waits behind.
    ///
    /// # Errors
    /// Redis unreachable, a layout this Redis cannot serve, or an invalid LLM configuration.
    async fn workers(
        &self,
        config: &Config,
        failpoints: Failpoints,
        switch: Option<&Arc<Switch>>,
    ) -> Result<Vec<Arc<Worker<ConfiguredLlm>>>, StartupError> {
        let conn = connect_redis_patiently(config).await?;
        // During a move: the new layout's loops are held until the switch, the previous
        // layout's are retired by it.
        let mut shards: Vec<(StreamsConfig, Option<Part>)> = config
            .streams
            .read_shards()
            .into_iter()
            .map(|s| (s, switch.map(|w| Part::New(w.clone()))))
            .collect();
        if let (Some(old), Some(w)) = (resharding::previous_layout(&config.streams), switch) {
            let new = Box::new(config.streams.clone());
            shards.extend(
                old.all_shards()
                    .into_iter()
                    .map(|s| (s, Some(Part::Old(w.clone(), new.clone())))),
            );
        }
        let names: Vec<StreamsConfig> = shards.iter().map(|(s, _)| s.clone()).collect();
        check_redis(&conn, config, &names).await?;
        let cache = Cache::new(conn.clone(), &config.redis, &config.cache);
        let llm = llm(config).await?;
        let handler = Arc::new(MessageHandler::new(
            config.clone(),
            self.store.clone(),
            cache,
            llm,
            failpoints,
        ));
        let slots = Slots::new(config.worker.concurrency, shards.len());
        let stats = Arc::new(WorkerStats::default());
        let mut workers = Vec::with_capacity(shards.len());
        for (place, (shard, part)) in shards.into_iter().enumerate() {
            let reader = connect_redis_patiently(config).await?;
            let mut streams = Streams::new(
                reader,
                conn.clone(),
                shard.clone(),
                &config.redis.key_prefix,
            );
            if shard.wait_replicas > 0 || shard.wait_aof {
                streams = streams.with_durable_wakes(connect_redis_patiently(config).await?);
            }
            let wake_ups = config
                .redis
                .seeds()
                .into_iter()
                .map(|url| crate::tls::redis_client(url, &config.redis.ca_file))
                .collect::<Result<Vec<_>, _>>()
                .map_err(CacheError::from)?;
            let mut shard_config = config.clone();
            shard_config.streams = shard;
            let mut worker = Worker::new(shard_config, handler.clone(), streams, wake_ups).sharing(
                slots.clone(),
                place,
                stats.clone(),
            );
            if let Some(part) = part {
                worker = worker.moving(part);
            }
            workers.push(Arc::new(worker));
        }
        Ok(workers)
    }
}

/// Refuses a Redis that cannot serve the configuration: on a cluster, a shard whose keys span
/// slots; `WAITAOF` on a server without it.
async fn check_redis(
    conn: &RedisConnection,
    config: &Config,
    shards: &[StreamsConfig],
) -> Result<(), StartupError> {
    let s = &config.streams;
    if conn.is_cluster() {
        for shard in shards {
            crate::stream::check_one_slot(shard, &config.redis.key_prefix)
                .map_err(StartupError::Unsupported)?;
        }
    }
    if s.wait_aof && !has_command(conn, "WAITAOF").await? {
        return Err(StartupError::Unsupported(
            "streams.wait_aof needs WAITAOF, which this Redis server lacks (Redis 7.2 or \
             later has it)"
                .into(),
        ));
    }
    Ok(())
}

/// The LLM service a worker of `config` uses: every endpoint's client behind its own circuit
/// breaker, its HTTP version settled.
///
/// # Errors
/// An invalid LLM configuration.
pub async fn llm(config: &Config) -> Result<ConfiguredLlm, LlmError> {
    Endpoints::from_config(&config.llm).await
}

/// One worker process: its dependencies, its worker and its operator endpoint
/// (`/metrics`, `/healthz`, `/readyz` when `telemetry.listen` is set), built but not running.
pub struct Application {
    deps: Dependencies,
    /// One per inbound shard read; never empty.
    workers: Vec<Arc<Worker<ConfiguredLlm>>>,
    /// During a move between shard layouts: the switch, and the marker that flips it.
    switch: Option<(Arc<Switch>, String)>,
    telemetry: Option<TcpListener>,
    /// Delivers the stage actions' outbox.
    actions: crate::actions::dispatcher::Dispatcher,
    /// Agents' answers and handoff timeouts (while this process holds the desk's lease).
    desk: crate::handoff::desk::Desk,
    /// Each business's retention periods.
    retention: crate::personal_data::retention::Sweeper,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("telemetry", &self.telemetry_addr())
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects everything `config` names and builds its worker (`failpoints` are the fault
    /// points a fault-injection test arms; production passes [`Failpoints::from_env`]).
    ///
    /// # Errors
    /// Invalid configuration (URLs), Redis unreachable for a minute, a Redis that lacks what
    /// the configuration asks for, or a telemetry address that cannot be bound.
    pub async fn build(config: &Config, failpoints: Failpoints) -> Result<Self, StartupError> {
        metrics::install();
        let deps = Dependencies::connect(config).await?;
        let s = &config.streams;
        let switch = (s.previous_shards > 0).then(|| {
            let marker = resharding::marker_key(s, &config.redis.key_prefix, s.previous_shards);
            (Arc::new(Switch::default()), marker)
        });
        let workers = deps
            .workers(config, failpoints, switch.as_ref().map(|(w, _)| w))
            .await?;
        let telemetry = if config.telemetry.listen.is_empty() {
            None
        } else {
            Some(
                TcpListener::bind(&config.telemetry.listen)
                    .await
                    .map_err(StartupError::Telemetry)?,
            )
        };
        let actions = crate::actions::dispatcher::Dispatcher::new(
            crate::actions::dispatcher::Sinks {
                store: deps.store.clone(),
                cache: deps.cache.clone(),
                streams: config.streams.clone(),
                handoff: config.handoff.clone(),
                failpoints: workers[0].handler().failpoints().clone(),
            },
            config.actions.clone(),
            workers[0].handler().actions_wake(),
        )
        .map_err(|e| StartupError::Unsupported(format!("the actions' HTTP client: {e}")))?;
        let desk = crate::handoff::desk::Desk::new(
            deps.store.clone(),
            deps.cache.clone(),
            config,
            config.streams.consumer_name(),
        );
        let retention = crate::personal_data::retention::Sweeper::new(
            deps.store.clone(),
            deps.redis.clone(),
            config.streams.clone(),
            config.redis.key_prefix.clone(),
            config.retention.clone(),
        );
        Ok(Application {
            deps,
            workers,
            switch,
            telemetry,
            actions,
            desk,
            retention,
        })
    }

    /// The worker of the first shard read (for the process's statistics, which every shard's
    /// worker shares, and that shard's streams).
    pub fn worker(&self) -> &Arc<Worker<ConfiguredLlm>> {
        &self.workers[0]
    }

    /// The worker of each shard read.
    pub fn workers(&self) -> &[Arc<Worker<ConfiguredLlm>>] {
        &self.workers
    }

    /// The worker's database pool (for its round-trip count).
    pub fn store(&self) -> &Store {
        &self.deps.store
    }

    /// Where the operator endpoint listens, if it does.
    pub fn telemetry_addr(&self) -> Option<SocketAddr> {
        self.telemetry.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs the worker (and the operator endpoint) until `stop` is cancelled; returns once
    /// running messages are finished or their grace period is over.
    pub async fn run_until_stopped(self, stop: CancellationToken) {
        // The endpoint stops with the worker, also when this future is dropped midway.
        let endpoint_stop = stop.child_token();
        let _endpoint_stopped = endpoint_stop.clone().drop_guard();
        let endpoint = self.telemetry.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
            }
            let (s, c) = (self.deps.store.clone(), self.deps.cache.clone());
            let ready: server::ReadyCheck = Arc::new(move || {
                let (s, c) = (s.clone(), c.clone());
                Box::pin(async move {
                    s.ping().await.map_err(|e| format!("postgres: {e}"))?;
                    c.ping().await.map_err(|e| format!("redis: {e}"))?;
                    Ok(())
                })
            });
            tokio::spawn(server::serve(
                listener,
                metrics::install(),
                ready,
                endpoint_stop.clone().cancelled_owned(),
            ))
        });
        if let Some((switch, marker)) = self.switch {
            let conn = self.deps.redis.clone();
            tokio::spawn(switch.watch(conn, marker, endpoint_stop.clone()));
        }
        let actions = tokio::spawn(self.actions.run(stop.clone()));
        let desk = tokio::spawn(self.desk.run(stop.clone()));
        let retention = tokio::spawn(self.retention.run(stop.clone()));
        let runs = self.workers.into_iter().map(|w| w.run(stop.clone()));
        futures::future::join_all(runs).await;
        let _ = actions.await;
        let _ = desk.await;
        let _ = retention.await;
        if let Some(endpoint) = endpoint {
            let _ = endpoint.await;
        }
    }
}

/// What the operator commands connect to, each on first use: the database as the configured
/// user, and Redis. A command that needs only one of them works while the other is down or
/// misconfigured.
pub struct Operator {
    config: Config,
    store: tokio::sync::OnceCell<Store>,
    redis: tokio::sync::OnceCell<RedisConnection>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator").finish_non_exhaustive()
    }
}

impl Operator {
    pub fn new(config: &Config) -> Self {
        Operator {
            config: config.clone(),
            store: tokio::sync::OnceCell::new(),
            redis: tokio::sync::OnceCell::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The database pool, built on the first call (its connections open lazily).
    ///
    /// # Errors
    /// An invalid database URL or TLS setting.
    pub async fn store(&self) -> Result<&Store, StoreError> {
        self.store
            .get_or_try_init(|| async { Store::connect(&self.config.database) })
            .await
    }

    /// The Redis connection, opened on the first call (an operator command fails at once
    /// when Redis is down; it does not wait for it).
    ///
    /// # Errors
    /// An invalid URL or an unreachable server.
    pub async fn redis(&self) -> Result<&RedisConnection, CacheError> {
        self.redis
            .get_or_try_init(|| redis_connection::connect(&self.config.redis))
            .await
    }

    /// A Redis connection of its own (for blocking reads that must not hold up the shared one).
    ///
    /// # Errors
    /// An invalid URL or an unreachable server.
    pub async fn own_redis(&self) -> Result<RedisConnection, CacheError> {
        redis_connection::connect(&self.config.redis).await
    }

    /// The cache over [`Operator::redis`].
    ///
    /// # Errors
    /// As [`Operator::redis`].
    pub async fn cache(&self) -> Result<Cache, CacheError> {
        let conn = self.redis().await?.clone();
        Ok(Cache::new(conn, &self.config.redis, &self.config.cache))
    }
}

/// Whether the server knows `command` (`COMMAND INFO` answers nil for an unknown one).
async fn has_command(conn: &RedisConnection, command: &str) -> Result<bool, CacheError> {
    let info: Vec<redis::Value> = redis::cmd("COMMAND")
        .arg("INFO")
        .arg(command)
        .query_async(&mut conn.clone())
        .await?;
    Ok(info.iter().any(|v| !matches!(v, redis::Value::Nil)))
}

/// Connects to Redis, waiting up to [`REDIS_PATIENCE`] while it is not reachable yet.
async fn connect_redis_patiently(config: &Config) -> Result<RedisConnection, CacheError> {
    let started = std::time::Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
    loop {
        match redis_connection::connect(&config.redis).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_retryable() && started.elapsed() < REDIS_PATIENCE => {
                tracing::warn!(error = %e, "redis not reachable yet");
                tokio::time::sleep(backoff.next_wait()).await;
            }
            Err(e) => return Err(e),
        }
    }
}
