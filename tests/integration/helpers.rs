//! Test harness: services, a fresh database per test, and `spawn_app()` with a worker, its
//! streams and a mock LLM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use icmp::cache::Cache;
use icmp::config::{Config, RedactedUrl};
use icmp::llm::mock::{self, MockOptions, MockServer};
use icmp::pipeline::Failpoints;
use icmp::redis_connection::RedisConnection;
use icmp::startup::{Application, ConfiguredLlm, Operator};
use icmp::store::{self, Store};
use icmp::stream::Streams;
use icmp::worker::Worker;
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio_postgres::NoTls;
use uuid::Uuid;

pub const DEMO_BUSINESS: &str = "7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001";

/// Addresses of the shared services.
#[derive(Debug, Clone)]
pub struct Services {
    /// A superuser URL of the `postgres` database.
    pub admin_url: String,
    pub redis_url: String,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The services, started by `scripts/services.sh up` unless `ICMP_TEST_DATABASE_URL` and
/// `ICMP_TEST_REDIS_URL` are set.
pub fn services() -> &'static Services {
    static SERVICES: OnceLock<Services> = OnceLock::new();
    SERVICES.get_or_init(|| {
        if let (Ok(admin_url), Ok(redis_url)) = (
            std::env::var("ICMP_TEST_DATABASE_URL"),
            std::env::var("ICMP_TEST_REDIS_URL"),
        ) {
            return Services {
                admin_url,
                redis_url,
            };
        }
        let env = services_sh("up");
        Services {
            admin_url: env["ICMP_TEST_DATABASE_URL"].clone(),
            redis_url: env["ICMP_TEST_REDIS_URL"].clone(),
        }
    })
}

/// Runs `scripts/services.sh COMMAND`; returns the variables it exports.
pub fn services_sh(command: &str) -> HashMap<String, String> {
    services_sh_with(command, &[])
}

/// [`services_sh`] with environment variables (a private server's port).
pub fn services_sh_with(command: &str, env: &[(&str, &str)]) -> HashMap<String, String> {
    let out = std::process::Command::new(root().join("scripts/services.sh"))
        .arg(command)
        .envs(env.iter().copied())
        .output()
        .expect("run scripts/services.sh");
    assert!(
        out.status.success(),
        "services.sh {command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exports(&String::from_utf8_lossy(&out.stdout))
}

/// The variables of `export NAME=value` lines.
pub fn exports(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("url has a database");
    format!("{base}/{db}")
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&services().admin_url, NoTls)
        .await
        .expect("connect admin");
    tokio::spawn(conn);
    client
}

fn migrations_fingerprint() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut files: Vec<_> = std::fs::read_dir(root().join("sql"))
        .expect("sql/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        std::fs::read(&f).expect("read migration").hash(&mut h);
    }
    h.finish()
}

/// A new, empty database (not migrated).
pub async fn empty_database() -> String {
    let name = format!("icmp_test_{}", Uuid::new_v4().simple());
    admin()
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create db");
    with_db(&services().admin_url, &name)
}

/// A new database with the schema applied (cloned from a migrated template database).
pub async fn migrated_database() -> String {
    if on_test_citus() {
        return crate::citus::citus_database().await;
    }
    let template = format!("icmp_tpl_{:016x}", migrations_fingerprint());
    let client = admin().await;
    client
        .execute("SELECT pg_advisory_lock(7401)", &[])
        .await
        .expect("lock");
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await
        .expect("query")
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE DATABASE {template}"))
            .await
            .expect("create template");
        let mut cfg = base_config();
        cfg.database.url = RedactedUrl::new(with_db(&services().admin_url, &template));
        store::migrate(&cfg.database)
            .await
            .expect("migrate template");
    }
    let name = format!("icmp_test_{}", Uuid::new_v4().simple());
    let created = client
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
        .await;
    client
        .execute("SELECT pg_advisory_unlock(7401)", &[])
        .await
        .expect("unlock");
    created.expect("create from template");
    with_db(&services().admin_url, &name)
}

/// `config/default.toml` + `config/test.toml`, pointing at the shared services.
pub fn base_config() -> Config {
    let mut c = Config::load(&root().join("config/default.toml"), Some("test")).expect("config");
    c.database.url = RedactedUrl::new(services().admin_url.clone());
    c.database.pool_size = 8;
    c.redis.url = RedactedUrl::new(services().redis_url.clone());
    c.telemetry.listen = String::new();
    c
}

/// A configuration with its own database, key prefix, streams and group.
pub async fn isolated_config() -> Config {
    let mut c = base_config();
    let id = Uuid::new_v4().simple().to_string();
    c.database.url = RedactedUrl::new(migrated_database().await);
    c.redis.key_prefix = format!("t:{id}:");
    c.streams.inbound = format!("t:{id}:inbound");
    c.streams.outbound = format!("t:{id}:outbound");
    c.streams.dead_letter = format!("t:{id}:dead");
    c.streams.group = format!("g-{id}");
    c.streams.consumer = format!("c-{id}");
    c.streams.reply_prefix = format!("t:{id}:reply:");
    c.handoff.agents = format!("t:{id}:agents");
    c.handoff.agent_replies = format!("t:{id}:agent_replies");
    c.handoff.group = format!("d-{id}");
    if on_test_cluster() {
        let urls = crate::cluster::cluster_urls();
        c.redis.mode = icmp::config::RedisMode::Cluster;
        c.redis.url = RedactedUrl::new(urls[0].clone());
        c.redis.urls = urls[1..].iter().cloned().map(RedactedUrl::new).collect();
        c.streams.inbound = format!("{{t-{id}}}:inbound");
        c.streams.outbound = format!("{{t-{id}}}:outbound");
        c.streams.dead_letter = format!("{{t-{id}}}:dead");
        c.streams.reply_prefix = format!("{{t-{id}}}:reply:");
    }
    c
}

/// Whether the tests' Redis is the 3 + 3 cluster of `scripts/services.sh cluster`
/// (`ICMP_TEST_REDIS=cluster`, which the test command sets for a second run of the stream
/// guarantees): isolated configurations are then in cluster mode, every node a seed, their
/// streams named with one hash tag.
pub fn on_test_cluster() -> bool {
    std::env::var("ICMP_TEST_REDIS").as_deref() == Ok("cluster")
}

/// Whether the tests' database is the Citus cluster of `scripts/services.sh citus`
/// (`ICMP_TEST_PG=citus`, which the test command sets for a run of the pipeline, stream
/// guarantees and isolation tests): every migrated database is then a Citus database.
pub fn on_test_citus() -> bool {
    std::env::var("ICMP_TEST_PG").as_deref() == Ok("citus")
}

/// After a direct SQL edit of `business`'s definitions: on Citus, which has no change trigger,
/// the notification docs/operations.md tells an operator to send (on plain PostgreSQL the
/// trigger sent it already).
pub async fn announce_sql_edit(app: &TestApp, business: Uuid) {
    if on_test_citus() {
        app.db()
            .await
            .execute(
                "SELECT pg_notify('icmp_definitions', $1)",
                &[&business.to_string()],
            )
            .await
            .expect("notify");
    }
}

/// Imports a definition file into the database of `config` (as `icmp import` does).
pub async fn import(config: &Config, files: &[&Path]) {
    let operator = Operator::new(config);
    let store = operator.store().await.expect("store");
    icmp::business::import_files(store, None, files)
        .await
        .expect("import");
}

pub fn demo_file() -> PathBuf {
    root().join("config/businesses/demo.toml")
}

/// Imports a copy of the demo business under `business_id`, with `(from, to)` text
/// replacements; returns the file written.
/// The demo's booking lines turned on, as `scripts/demo` does (their `#booking# ` prefix
/// removed), with the receiver at `receiver` (the mock server's address).
pub fn demo_booking_edits(receiver: &str) -> Vec<(&'static str, String)> {
    vec![
        ("#booking# ", String::new()),
        ("127.0.0.1:8089", receiver.to_owned()),
    ]
}

pub async fn import_demo_copy(
    config: &Config,
    business_id: &str,
    edits: &[(&str, &str)],
) -> PathBuf {
    let mut text = std::fs::read_to_string(demo_file())
        .expect("demo")
        .replace(DEMO_BUSINESS, business_id);
    for (from, to) in edits {
        text = text.replace(from, to);
    }
    let path = std::env::temp_dir().join(format!("icmp-{business_id}-{}.toml", Uuid::new_v4()));
    std::fs::write(&path, text).expect("write");
    import(config, &[&path]).await;
    path
}

/// Imports a copy of the demo as `business_id` whose `welcome_reply` cannot render (it names a
/// metadata field no message has): its messages are dead-lettered. Returns the file imported.
pub async fn import_poisoned_demo(app: &TestApp, business_id: &str) -> PathBuf {
    let path = import_demo_copy(&app.config, business_id, &[]).await;
    let id: Uuid = business_id.parse().expect("uuid");
    app.db()
        .await
        .execute(
            "UPDATE templates SET body = '{{ message.metadata.missing }}' \
             WHERE business_id = $1 AND name = 'welcome_reply'",
            &[&id],
        )
        .await
        .expect("corrupt");
    path
}

/// Held by the tests whose figures the rest of the suite would distort (the fairness test's
/// latencies) or that load the whole machine (the chaos soak), so that no two of them overlap.
pub static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A test environment (database, streams, mock LLM) with in-process workers. Its `store`,
/// `redis` and `cache` are an operator's (the configured user, as `icmp` commands connect);
/// its workers are built by [`Application::build`], as `icmp worker` builds one, and run
/// under the worker role.
pub struct TestApp {
    pub config: Config,
    pub store: Store,
    pub redis: RedisConnection,
    pub cache: Cache,
    pub mock: MockServer,
    pub failpoints: Failpoints,
    workers: Vec<(
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    )>,
}

/// Starts a worker for the demo business with a mock LLM configured by `options`.
pub async fn spawn_app(options: MockOptions) -> TestApp {
    spawn_app_with(options, |_| {}).await
}

/// Like [`spawn_app`], with a configuration tweak.
pub async fn spawn_app_with(options: MockOptions, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let mut app = spawn_env(options, tweak).await;
    app.start_worker("w0").await;
    app
}

/// The environment without any worker.
pub async fn spawn_env(options: MockOptions, tweak: impl FnOnce(&mut Config)) -> TestApp {
    icmp::telemetry::metrics::install();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mock = mock::spawn(listener, options).expect("mock");
    let mut config = isolated_config().await;
    config.llm.base_url = mock.base_url();
    tweak(&mut config);
    import(&config, &[&demo_file()]).await;
    let operator = Operator::new(&config);
    let store = operator.store().await.expect("store").clone();
    let redis = operator.redis().await.expect("redis").clone();
    let cache = operator.cache().await.expect("redis");
    TestApp {
        config,
        store,
        redis,
        cache,
        mock,
        failpoints: Failpoints::default(),
        workers: Vec::new(),
    }
}

impl TestApp {
    /// Starts one more in-process worker (consumer `name`), sharing this app's failpoints;
    /// returns it (for its stats). It is built and run as `icmp worker` builds and runs one.
    pub async fn start_worker(&mut self, name: &str) -> Arc<Worker<ConfiguredLlm>> {
        let app = Application::build(&self.consumer_config(name), self.failpoints.clone())
            .await
            .expect("worker");
        let worker = app.worker().clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone()));
        self.workers.push((stop, task));
        worker
    }

    /// This app's configuration for consumer `name`.
    pub fn consumer_config(&self, name: &str) -> Config {
        let mut config = self.config.clone();
        config.streams.consumer = format!("{}-{name}", self.config.streams.consumer);
        config
    }

    /// The stream mechanics alone, as consumer `name` (to play a consumer by hand).
    pub async fn streams(&self, name: &str) -> Streams {
        let config = self.consumer_config(name);
        let reader = icmp::redis_connection::connect(&config.redis)
            .await
            .expect("redis");
        let conn = icmp::redis_connection::connect(&config.redis)
            .await
            .expect("redis");
        Streams::new(
            reader,
            conn,
            config.streams.clone(),
            &config.redis.key_prefix,
        )
    }

    /// XADDs raw fields to the inbound stream (the first shard's); returns the entry id.
    pub async fn xadd(&self, fields: &[(&str, &[u8])]) -> String {
        let inbound = self.config.streams.shard(0).inbound;
        self.xadd_on(&inbound, fields).await
    }

    /// XADDs raw fields to `stream`; returns the entry id.
    pub async fn xadd_on(&self, stream: &str, fields: &[(&str, &[u8])]) -> String {
        self.redis
            .clone()
            .xadd(stream, "*", fields)
            .await
            .expect("xadd")
    }

    /// Sends a text message to the demo business; returns the entry id.
    pub async fn send(&self, user: &str, message_id: &str, content: &str) -> String {
        self.send_to(DEMO_BUSINESS, user, message_id, content).await
    }

    /// Sends a text message to `business`; returns the entry id.
    pub async fn send_to(
        &self,
        business: &str,
        user: &str,
        message_id: &str,
        content: &str,
    ) -> String {
        let inbound = self.config.streams.for_fields(business, user).inbound;
        self.xadd_on(
            &inbound,
            &[
                ("business_id", business.as_bytes()),
                ("user_id", user.as_bytes()),
                ("message_id", message_id.as_bytes()),
                ("content", content.as_bytes()),
            ],
        )
        .await
    }

    /// The prompt of the `purpose` call (`selection`, `extraction`, `response`) made for the
    /// message stored under `key`.
    pub async fn prompt_of(&self, key: &str, purpose: &str) -> String {
        self.db()
            .await
            .query_one(
                "SELECT c.prompt FROM llm_calls c JOIN messages m \
                 ON m.business_id = c.business_id AND m.id = c.message_id \
                 WHERE m.idempotency_key = $1 AND c.purpose = $2",
                &[&key, &purpose],
            )
            .await
            .unwrap_or_else(|e| panic!("the {purpose} prompt of {key}: {e}"))
            .get(0)
    }

    /// Waits for the reply whose `message_id` is `id` on `stream` (the outbound stream when
    /// `None`).
    pub async fn reply_on(&self, stream: &str, id: &str) -> HashMap<String, String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut conn = self.redis.clone();
        let mut last = "0".to_owned();
        loop {
            let opts = StreamReadOptions::default().count(100).block(200);
            let reply: Option<StreamReadReply> = conn
                .xread_options(&[stream], &[&last], &opts)
                .await
                .expect("xread");
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                for entry in key.ids {
                    last = entry.id.clone();
                    let fields = strings(entry.map);
                    // The final reply; partial replies of a streamed one are skipped.
                    if fields.get("message_id").map(String::as_str) == Some(id)
                        && fields.get("status").map(String::as_str) != Some("partial")
                    {
                        return fields;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no reply for {id} on {stream}"
            );
        }
    }

    pub async fn reply(&self, id: &str) -> HashMap<String, String> {
        let stream = self.config.streams.outbound.clone();
        self.reply_on(&stream, id).await
    }

    /// All entries of a stream.
    /// Names and values are read as bytes and shown lossily (a dead letter may carry a
    /// producer's non-UTF-8 field names).
    pub async fn entries(&self, stream: &str) -> Vec<HashMap<String, String>> {
        let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut self.redis.clone())
            .await
            .expect("xrange");
        reply
            .into_iter()
            .map(|(id, flat)| {
                let mut fields: HashMap<String, String> = flat
                    .chunks(2)
                    .filter_map(|kv| match kv {
                        [k, v] => Some((
                            String::from_utf8_lossy(k).into_owned(),
                            String::from_utf8_lossy(v).into_owned(),
                        )),
                        _ => None,
                    })
                    .collect();
                fields.insert("__id".into(), id);
                fields
            })
            .collect()
    }

    /// A database connection for assertions.
    pub async fn db(&self) -> deadpool_postgres::Client {
        self.store.client().await.expect("db")
    }

    pub async fn count(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> i64 {
        self.db()
            .await
            .query_one(sql, params)
            .await
            .expect("count")
            .get(0)
    }

    pub async fn key_exists(&self, key: &str) -> bool {
        self.redis.clone().exists(key).await.expect("exists")
    }

    /// Stops the in-process workers gracefully.
    pub async fn stop(mut self) {
        self.stop_workers().await;
    }

    /// Stops the in-process workers gracefully, keeping the app.
    pub async fn stop_workers(&mut self) {
        for (stop, task) in self.workers.drain(..) {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }

    /// XADDs many messages to the demo business in one pipeline: (user, message_id, content).
    pub async fn send_many(&self, messages: &[(String, String, String)]) {
        self.send_many_to(DEMO_BUSINESS, messages).await;
    }

    /// XADDs many messages to `business` in one pipeline (per 500): (user, message_id, content).
    pub async fn send_many_to(&self, business: &str, messages: &[(String, String, String)]) {
        self.try_send_many_to(business, messages)
            .await
            .expect("xadd");
    }

    /// Like [`TestApp::send_many_to`] to the demo business, returning Redis's error (a
    /// producer during a failover).
    pub async fn try_send_many(
        &self,
        messages: &[(String, String, String)],
    ) -> redis::RedisResult<()> {
        self.try_send_many_to(DEMO_BUSINESS, messages).await
    }

    /// Each user's messages go to the user's shard: one pipeline per shard and 500 messages
    /// (a pipeline on a cluster stays in one slot).
    async fn try_send_many_to(
        &self,
        business: &str,
        messages: &[(String, String, String)],
    ) -> redis::RedisResult<()> {
        let mut by_shard: std::collections::BTreeMap<String, Vec<_>> = Default::default();
        for m in messages {
            let inbound = self.config.streams.for_fields(business, &m.0).inbound;
            by_shard.entry(inbound).or_default().push(m.clone());
        }
        for (inbound, messages) in by_shard {
            self.send_all_on(&inbound, business, &messages).await?;
        }
        Ok(())
    }

    async fn send_all_on(
        &self,
        inbound: &str,
        business: &str,
        messages: &[(String, String, String)],
    ) -> redis::RedisResult<()> {
        for chunk in messages.chunks(500) {
            let mut pipe = redis::pipe();
            for (user, id, content) in chunk {
                pipe.xadd(
                    inbound,
                    "*",
                    &[
                        ("business_id", business),
                        ("user_id", user.as_str()),
                        ("message_id", id.as_str()),
                        ("content", content.as_str()),
                    ],
                )
                .ignore();
            }
            let () = pipe.query_async(&mut self.redis.clone()).await?;
        }
        Ok(())
    }

    /// Entries delivered to the group and not acknowledged (`i64::MAX` while Redis cannot
    /// tell, e.g. during a restart).
    /// Every shard of the layout, and of the previous one during a move.
    pub fn every_shard(&self) -> Vec<icmp::config::StreamsConfig> {
        let mut all = self.config.streams.all_shards();
        if let Some(old) = icmp::stream::resharding::previous_layout(&self.config.streams) {
            all.extend(old.all_shards());
        }
        all
    }

    /// Over every shard.
    pub async fn pending(&self) -> i64 {
        let mut total = 0i64;
        for s in self.every_shard() {
            let summary: Result<redis::Value, _> = redis::cmd("XPENDING")
                .arg(&s.inbound)
                .arg(&s.group)
                .query_async(&mut self.redis.clone())
                .await;
            match summary {
                Ok(redis::Value::Array(items)) => match items.first() {
                    Some(redis::Value::Int(n)) => total = total.saturating_add(*n),
                    _ => return i64::MAX,
                },
                _ => return i64::MAX,
            }
        }
        total
    }

    /// Every entry of every shard's outbound stream, shard by shard, each in stream order.
    pub async fn outbound_entries(&self) -> Vec<HashMap<String, String>> {
        let mut all = Vec::new();
        for s in self.every_shard() {
            all.extend(self.entries(&s.outbound).await);
        }
        all
    }

    /// The replies on the outbound streams whose `message_id` is `id`, in stream order
    /// (partial replies left out).
    pub async fn replies_of(&self, id: &str) -> Vec<HashMap<String, String>> {
        self.outbound_entries()
            .await
            .into_iter()
            .filter(|e| {
                e["message_id"] == id
                    && !matches!(
                        e.get("status").map(String::as_str),
                        Some("partial" | "follow_up")
                    )
            })
            .collect()
    }

    /// The follow-ups on the outbound streams of actions fired by message `id`, in stream order.
    pub async fn follow_ups_of(&self, id: &str) -> Vec<HashMap<String, String>> {
        self.outbound_entries()
            .await
            .into_iter()
            .filter(|e| {
                e["message_id"] == id && e.get("status").map(String::as_str) == Some("follow_up")
            })
            .collect()
    }

    /// Waits until the outbound stream holds `n` replies whose `message_id` is `id` (a
    /// repeated message's later publications included); returns them in stream order.
    pub async fn wait_replies(&self, id: &str, n: usize) -> Vec<HashMap<String, String>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let replies = self.replies_of(id).await;
            if replies.len() >= n || tokio::time::Instant::now() > deadline {
                return replies;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until nothing is pending in the group. A reply is published only by the script
    /// that acknowledges its entry, so once nothing is pending, no further reply can appear:
    /// counts taken afterwards are final.
    pub async fn settle(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pending = self.pending().await;
            if pending == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{pending} entries still pending"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads the outbound stream until every id in `ids` has a reply and nothing is pending;
    /// returns every reply per id (a duplicate publication shows as a second element).
    pub async fn wait_all(
        &self,
        ids: &std::collections::HashSet<String>,
        timeout: Duration,
    ) -> HashMap<String, Vec<HashMap<String, String>>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut conn = self.redis.clone();
        let outbound: Vec<String> = self.every_shard().into_iter().map(|s| s.outbound).collect();
        // One read per shard (a cluster serves one slot per command), blocking only with one.
        let block = if outbound.len() == 1 { 200 } else { 0 };
        let mut lasts = vec!["0".to_owned(); outbound.len()];
        let mut got: HashMap<String, Vec<HashMap<String, String>>> = HashMap::new();
        let mut turn = 0;
        while ids.iter().any(|id| !got.contains_key(id)) {
            turn += 1;
            let (stream, last) = (
                &outbound[turn % outbound.len()],
                &mut lasts[turn % outbound.len()],
            );
            if block == 0 && turn % outbound.len() == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if tokio::time::Instant::now() > deadline {
                let missing = ids.iter().filter(|id| !got.contains_key(*id)).count();
                panic!(
                    "{missing} of {} messages got no reply in {timeout:?}",
                    ids.len()
                );
            }
            let mut opts = StreamReadOptions::default().count(1000);
            if block > 0 {
                opts = opts.block(block);
            }
            let reply: Result<Option<StreamReadReply>, _> = conn
                .xread_options(&[stream.as_str()], &[last.as_str()], &opts)
                .await;
            let Ok(reply) = reply else {
                // Redis may be restarting in some tests.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                for entry in key.ids {
                    last.clone_from(&entry.id);
                    let fields = strings(entry.map);
                    got.entry(fields["message_id"].clone())
                        .or_default()
                        .push(fields);
                }
            }
        }
        self.settle(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await;
        let mut all: HashMap<String, Vec<HashMap<String, String>>> = HashMap::new();
        for mut e in self.outbound_entries().await {
            e.remove("__id");
            all.entry(e["message_id"].clone()).or_default().push(e);
        }
        all
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        for (_, task) in &self.workers {
            task.abort();
        }
    }
}

pub use icmp::producer::fields_to_strings as strings;
