//! PostgreSQL access: the connection pool, migrations, and one module of typed queries per
//! concern. No SQL lives outside this folder and `sql/`.
//!
//! Every query filters by `business_id`: a row of one business is never reachable from another.

pub mod audit;
pub mod conversations;
pub mod definitions;
pub mod distribution;
pub mod group_commit;
pub mod handoffs;
pub mod import;
pub mod listen;
pub mod outbox;
pub mod personal_data;
pub mod retention;
pub mod summaries;
pub mod write_set;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::ExposeSecret;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;
use uuid::Uuid;

/// Scopes the open transaction to `business` (row-level security, migration V5), ending it by
/// `deadline_ms` when given (a transaction-local `statement_timeout`). `SET LOCAL`, not
/// `set_config()`: Citus carries a transaction's `SET LOCAL` commands to the worker nodes that
/// run its statements, where the shards' policies read the scope (with
/// `citus.propagate_set_commands = 'local'`, a mere placeholder setting on plain PostgreSQL).
/// One simple-protocol message, sent after `BEGIN` (in the same message as `BEGIN`, Citus has
/// the worker nodes warn of a transaction already in progress, once per transaction); the values
/// are a UUID and a number, never text of a user.
pub fn scope_sql(business: Uuid, deadline_ms: Option<u64>) -> String {
    let mut sql = format!(
        "SET LOCAL citus.propagate_set_commands = 'local'; \
         SET LOCAL icmp.business_id = '{business}'"
    );
    if let Some(ms) = deadline_ms {
        sql.push_str(&format!("; SET LOCAL statement_timeout = {ms}"));
    }
    sql
}

/// What the server is told to leave of a message's deadline, so that its cancellation comes
/// before the worker gives the message up: nothing of a message commits after its deadline.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

tokio::task_local! {
    /// When the message being processed must be done (`worker.message_deadline_ms`): write
    /// transactions started in this scope end there, on the server's clock (a
    /// transaction-local `statement_timeout`), so that a write the worker gave up on cannot
    /// commit later (dropping a pipelined transaction's future does not stop its COMMIT).
    pub static DEADLINE: std::time::Instant;
}

use crate::config::DatabaseConfig;
pub use crate::error::StoreError;

/// Statement preparation from the heap. A message's task is one allocation sized by the
/// largest future it ever awaits, and it is held by every message in flight; the database
/// futures (a pooled connection's checkout, a statement's preparation, a transaction's
/// queries) are kilobytes each but short-lived, so they are boxed where they are awaited and
/// take memory only while they run (see docs/performance.md).
pub(crate) trait Prepared {
    /// `prepare_cached`, boxed.
    fn prepared<'a>(
        &'a self,
        sql: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Statement, tokio_postgres::Error>> + Send + 'a>>;
}

impl Prepared for deadpool_postgres::Client {
    fn prepared<'a>(
        &'a self,
        sql: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Statement, tokio_postgres::Error>> + Send + 'a>>
    {
        Box::pin(self.prepare_cached(sql))
    }
}

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
    /// The sessions' own `statement_timeout` (0: none), which a deadline only ever shortens.
    statement_timeout_ms: u64,
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
        Store::build(config, pg_config(config)?)
    }

    /// Like [`Store::connect`], for workers: every connection switches to
    /// `database.worker_role`, so row-level security applies (see migration V5).
    /// Their sessions also get `database.lock_timeout_ms` and `statement_timeout_ms`, so that a
    /// lock held by another session cannot stall a message forever.
    ///
    /// # Errors
    /// An invalid URL or role name.
    pub fn connect_worker(config: &DatabaseConfig) -> Result<Store, StoreError> {
        let mut pg = pg_config(config)?;
        let mut options = Vec::new();
        let role = &config.worker_role;
        if !role.is_empty() {
            if !role
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(StoreError::Pool(format!(
                    "database.worker_role {role:?} is not a plain role name"
                )));
            }
            options.push(format!("-c role={role}"));
        }
        let multi_shard = &config.multi_shard;
        if !multi_shard.is_empty() && multi_shard != "off" {
            if !multi_shard
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            {
                return Err(StoreError::Pool(format!(
                    "database.multi_shard {multi_shard:?} is not a log level"
                )));
            }
            // A placeholder setting on plain PostgreSQL, which nothing reads.
            options.push(format!("-c citus.multi_task_query_log_level={multi_shard}"));
        }
        if config.lock_timeout_ms > 0 {
            options.push(format!("-c lock_timeout={}", config.lock_timeout_ms));
        }
        if config.statement_timeout_ms > 0 {
            options.push(format!(
                "-c statement_timeout={}",
                config.statement_timeout_ms
            ));
            options.push(format!(
                "-c idle_in_transaction_session_timeout={}",
                config.statement_timeout_ms
            ));
        }
        if !options.is_empty() {
            pg.options(options.join(" "));
        }
        let mut store = Store::build(config, pg)?;
        store.statement_timeout_ms = config.statement_timeout_ms;
        Ok(store)
    }

    fn build(config: &DatabaseConfig, pg: tokio_postgres::Config) -> Result<Store, StoreError> {
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
            statement_timeout_ms: 0,
        })
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        Ok(Box::pin(self.pool.get()).await?)
    }

    /// Statements sent so far by this store and its clones (preparing a statement, once per
    /// connection, is not counted).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    pub(crate) fn count_round_trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    /// The `statement_timeout` that ends a transaction's statements before `deadline` (less a
    /// margin), when that is sooner than the sessions' own.
    pub(crate) fn timeout_until(&self, deadline: Option<std::time::Instant>) -> Option<u64> {
        deadline
            .map(|d| d.saturating_duration_since(std::time::Instant::now()))
            .map(|left| left.saturating_sub(DEADLINE_MARGIN).as_millis().max(1) as u64)
            .filter(|ms| self.statement_timeout_ms == 0 || *ms < self.statement_timeout_ms)
    }

    /// The sessions' own `statement_timeout` (0: none).
    pub(crate) fn statement_timeout_ms(&self) -> u64 {
        self.statement_timeout_ms
    }

    /// Runs one prepared statement in a transaction scoped to `business`: row-level security
    /// (migration V5) lets the worker's role see and write that business's rows only. `BEGIN`,
    /// the scope, the statement and `end` (`COMMIT`, or `ROLLBACK`) are pipelined: one round
    /// trip. A statement that fails turns the `COMMIT` into a rollback.
    pub(crate) async fn scoped_with_end(
        &self,
        client: &deadpool_postgres::Client,
        business_id: Uuid,
        stmt: &Statement,
        params: &[&(dyn ToSql + Sync)],
        end: &str,
    ) -> Result<Vec<Row>, StoreError> {
        let mut rows = self
            .scoped_steps(client, business_id, &[(stmt, params)], end)
            .await?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// Like [`Store::scoped_with_end`], for several statements run in order in one transaction
    /// (still one round trip); returns each one's rows. The first that fails fails them all.
    pub(crate) async fn scoped_steps(
        &self,
        client: &deadpool_postgres::Client,
        business_id: Uuid,
        steps: &[(&Statement, &[&(dyn ToSql + Sync)])],
        end: &str,
    ) -> Result<Vec<Vec<Row>>, StoreError> {
        let scope = scope_sql(
            business_id,
            self.timeout_until(DEADLINE.try_with(|d| *d).ok()),
        );
        self.count_round_trip();
        // Each request is sent when its future is first polled: in this order.
        let (begin, scope, rows, end) = Box::pin(async {
            tokio::join!(
                client.batch_execute("BEGIN"),
                client.batch_execute(&scope),
                futures::future::join_all(
                    steps
                        .iter()
                        .map(|(stmt, params)| client.query(*stmt, params))
                ),
                client.batch_execute(end),
            )
        })
        .await;
        begin?;
        scope?;
        let rows = rows.into_iter().collect::<Result<Vec<_>, _>>()?;
        end?;
        Ok(rows)
    }

    /// [`Store::scoped_with_end`], committing.
    pub(crate) async fn scoped(
        &self,
        client: &deadpool_postgres::Client,
        business_id: Uuid,
        stmt: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.scoped_with_end(client, business_id, stmt, params, "COMMIT")
            .await
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
    migrate_to(config, None).await
}

/// [`migrate`], up to migration `target` only (`None`: all of them; the tables are distributed
/// on Citus only then). For tests of upgrades: a database as an earlier release left it.
///
/// # Errors
/// Connection failures and migration errors.
pub async fn migrate_to(
    config: &DatabaseConfig,
    target: Option<i32>,
) -> Result<Vec<i32>, StoreError> {
    let (mut client, connection) = pg_config(config)?.connect(connector(config)?).await?;
    let driver = tokio::spawn(connection);
    ensure_worker_role(&client).await;
    let mut runner = embedded::migrations::runner();
    if let Some(version) = target {
        runner = runner.set_target(refinery::Target::Version(version));
    }
    let report = runner
        .run_async(&mut client)
        .await
        .map_err(|e| StoreError::Migration(e.to_string()))?;
    if target.is_none() {
        let distributed = distribution::distribute(&client).await?;
        if !distributed.is_empty() {
            tracing::info!(tables = ?distributed, "distributed on citus by business_id");
        }
    }
    drop(client);
    let _ = driver.await;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// Creates the role `icmp_worker` (NOLOGIN) if it is missing and grants it to the migrating
/// user, so that migration V5 can grant it the tables and workers can switch to it. Without the
/// privilege to do so it only warns: an operator then creates the role by hand (see
/// docs/operations.md). Concurrent migrations (tests) may race on it, so it is retried.
async fn ensure_worker_role(client: &tokio_postgres::Client) {
    const SQL: &str = "DO $$ BEGIN \
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'icmp_worker') THEN \
          CREATE ROLE icmp_worker NOLOGIN; \
        END IF; \
        IF NOT pg_has_role(current_user, 'icmp_worker', 'MEMBER') THEN \
          EXECUTE format('GRANT icmp_worker TO %I', current_user); \
        END IF; \
      END $$";
    let mut last = None;
    let mut backoff =
        crate::retry::Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    for _ in 0..5 {
        match client.batch_execute(SQL).await {
            Ok(()) => return,
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
    if let Some(e) = last {
        tracing::warn!(
            error = %StoreError::from(e),
            "could not create or grant the role icmp_worker; create it by hand or set database.worker_role to empty"
        );
    }
}

fn connector(config: &DatabaseConfig) -> Result<MakeRustlsConnect, StoreError> {
    crate::tls::postgres_connector(config.url.expose(), &config.ca_file)
        .map_err(|e| StoreError::Pool(e.to_string()))
}

/// True when `e` is a unique-constraint violation.
pub(crate) fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}
