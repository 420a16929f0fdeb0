//! Connections to Redis: one server (`redis.mode = "standalone"`: a connection manager that
//! reconnects) or a Redis Cluster (`"cluster"`: redis-rs's cluster connection, which learns the
//! topology from `redis.url` as its seed node, routes every command and script by its first
//! key, follows `MOVED`/`ASK` and refreshes its slot map after a failover). Everything that
//! talks to Redis holds a [`RedisConnection`]; scripts, pipelines and commands work alike on
//! both. What a cluster asks of the key layout (every key of a script in one slot) is the
//! streams' and the cache's business (docs/design-notes.md).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::{RedisConfig, RedisMode};
use crate::error::CacheError;

/// A connection to Redis, standalone or cluster; cheap to clone (clones share it).
#[derive(Clone)]
pub enum RedisConnection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisConnection::Standalone(_) => "RedisConnection::Standalone",
            RedisConnection::Cluster(_) => "RedisConnection::Cluster",
        })
    }
}

impl RedisConnection {
    /// Whether this is a connection to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }

    /// Runs `cmd` on the master that serves `key`'s slot: a command without keys (`WAIT`,
    /// `WAITAOF`) that must reach the node of an earlier write, where a cluster client would
    /// otherwise send it to every master.
    ///
    /// # Errors
    /// Redis failures.
    pub async fn query_on_master_of(&mut self, key: &str, cmd: &Cmd) -> redis::RedisResult<Value> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        match self {
            RedisConnection::Standalone(c) => cmd.query_async(c).await,
            RedisConnection::Cluster(c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                c.route_command(cmd.clone(), to).await
            }
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Standalone(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Standalone(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// Connects to what `config` names, in its mode. A standalone connection reconnects by itself
/// after a restart; a cluster connection reconnects to each node and follows the topology.
///
/// # Errors
/// An invalid URL or CA file, or a server (a seed node) that cannot be reached.
pub async fn connect(config: &RedisConfig) -> Result<RedisConnection, CacheError> {
    let timeout = Duration::from_millis(config.response_timeout_ms);
    match config.mode {
        RedisMode::Standalone => {
            let client = crate::tls::redis_client(config.url.expose(), &config.ca_file)?;
            let mgr_config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(timeout))
                .set_number_of_retries(3)
                .set_max_delay(Duration::from_millis(500));
            Ok(RedisConnection::Standalone(
                ConnectionManager::new_with_config(client, mgr_config).await?,
            ))
        }
        RedisMode::Cluster => {
            let url = config.url.expose();
            let mut builder = ClusterClientBuilder::new(config.seeds())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .overall_response_timeout(Some(timeout))
                .retries(3)
                .min_retry_wait(50)
                .max_retry_wait(500);
            if let Some(certs) = crate::tls::redis_certificates(url, &config.ca_file)? {
                builder = builder.certs(certs);
            }
            let client = builder.build()?;
            Ok(RedisConnection::Cluster(
                client.get_async_connection().await?,
            ))
        }
    }
}
