//! PostgreSQL access: the connection pool, migrations, and one module of typed queries per
//! concern. No SQL lives outside this folder and `sql/`.
//!
//! Every query filters by `business_id`: a row of one business is never reachable from another.

pub mod conversations;
pub mod definitions;
pub mod import;
pub mod listen;
pub mod write_set;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::ExposeSecret;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseConfig;
pub use crate::error::StoreError;

mod embedded {
    refinery::embed_migrations!("sql");
}

/// The database: a pool of connections.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Statements sent by this handle and its clones (each one round trip), for the bench.
    round_trips: Arc<AtomicU64>,
    /// For connections outside the pool (`LISTEN`).
    pg: Arc<tokio_postgres::Config>,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("status", &self.pool.status())
            .finish()
    }
}

fn pg_config(config: &DatabaseConfig) -> Result<tokio_postgres::Config, StoreError> {
    let mut pg = tokio_postgres::Config::from_str(&crate::tls::postgres_url(config.url.expose()))
        .map_err(|e| StoreError::Pool(format!("invalid database.url: {e}")))?;
    if let Some(password) = &config.password {
        pg.password(password.expose_secret());
    }
    pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
    pg.application_name("icmp");
    Ok(pg)
}

impl Store {
    /// Builds the pool; connections are opened lazily (a database that is down at start-up is
    /// retried by the first callers instead of failing the process).
    ///
    /// # Errors
    /// An invalid URL.
    pub fn connect(config: &DatabaseConfig) -> Result<Store, StoreError> {
        let pg = pg_config(config)?;
        let tls = connector(config)?;
        let manager = Manager::from_config(
            pg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_millis(config.pool_wait_timeout_ms)))
            .create_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
            .recycle_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        Ok(Store {
            pool,
            round_trips: Arc::default(),
            pg: Arc::new(pg),
            tls,
        })
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Statements sent so far by this store and its clones (preparing a statement, once per
    /// connection, is not counted).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    pub(crate) fn count_round_trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    /// Pool occupancy: (idle, busy).
    pub fn pool_usage(&self) -> (usize, usize) {
        let s = self.pool.status();
        (s.available, s.size.saturating_sub(s.available))
    }

    /// `SELECT 1`, for readiness probes.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }
}

/// Applies the migrations in `sql/` that are not applied yet; running it twice is a no-op.
/// Returns the versions it applied.
///
/// # Errors
/// Connection failures and migration errors.
pub async fn migrate(config: &DatabaseConfig) -> Result<Vec<i32>, StoreError> {
    let (mut client, connection) = pg_config(config)?.connect(connector(config)?).await?;
    let driver = tokio::spawn(connection);
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(|e| StoreError::Migration(e.to_string()))?;
    drop(client);
    let _ = driver.await;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

fn connector(config: &DatabaseConfig) -> Result<MakeRustlsConnect, StoreError> {
    crate::tls::postgres_connector(&config.ca_file).map_err(|e| StoreError::Pool(e.to_string()))
}

/// True when `e` is a unique-constraint violation.
pub(crate) fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}
