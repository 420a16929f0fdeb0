//! TLS to PostgreSQL and Redis: servers of this test that accept TLS only, with certificates
//! the test makes; a message goes through a worker over TLS, and plain connections fail with a
//! clear error.

use std::time::Duration;

use icmp::config::{Config, RedactedUrl};
use icmp::error::Classify;
use icmp::llm::mock::MockOptions;
use icmp::store::Store;

use crate::helpers::{self, spawn_env};
use crate::processes::{PrivatePg, PrivateRedis, TestCerts};

fn ca(certs: &TestCerts) -> String {
    certs.ca_cert.to_string_lossy().into_owned()
}

/// Creates and migrates database `icmp` on the TLS-only server; returns its URL.
async fn migrated_over_tls(pg: &PrivatePg, certs: &TestCerts, config: &mut Config) {
    config.database.ca_file = ca(certs);
    config.database.url = RedactedUrl::new(format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full",
        pg.port
    ));
    let admin = Store::connect(&config.database).expect("store");
    admin
        .client()
        .await
        .expect("a TLS connection to the admin database")
        .batch_execute("CREATE DATABASE icmp")
        .await
        .expect("create database");
    config.database.url = RedactedUrl::new(format!(
        "postgres://postgres@127.0.0.1:{}/icmp?sslmode=verify-full",
        pg.port
    ));
    icmp::store::migrate(&config.database)
        .await
        .expect("migrate over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_goes_through_over_tls_to_postgres_and_redis() {
    let certs = TestCerts::generate();
    let pg = PrivatePg::start_tls(&certs);
    let redis = PrivateRedis::start_tls(&certs).await;
    let mut app = spawn_env(MockOptions::default(), |_| {}).await;
    let mut config = app.config.clone();
    migrated_over_tls(&pg, &certs, &mut config).await;
    helpers::import(&config, &[&helpers::demo_file()]).await;
    config.redis.url = RedactedUrl::new(redis.url());
    config.redis.ca_file = ca(&certs);
    app.store = Store::connect(&config.database).expect("store");
    app.redis = icmp::redis_connection::connect(&config.redis)
        .await
        .expect("a TLS connection to Redis");
    app.cache = icmp::cache::Cache::new(app.redis.clone(), &config.redis, &config.cache);
    app.config = config;

    app.start_worker("tls").await;
    app.send("tess", "t1", "Hello there").await;
    let reply = app.reply("t1").await;
    assert_eq!(reply["status"], "ok", "{reply:?}");
    // A second message continues the conversation: the cached state went over TLS too.
    app.send("tess", "t2", "And on Saturday?").await;
    let second = app.reply("t2").await;
    assert_eq!(second["conversation_id"], reply["conversation_id"]);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE idempotency_key IN ('t1', 't2')",
            &[]
        )
        .await,
        4
    );
    app.stop().await;
}

/// Whether a connection of `config` is encrypted (`pg_stat_ssl`).
async fn encrypted(config: &Config) -> bool {
    Store::connect(&config.database)
        .expect("store")
        .client()
        .await
        .expect("a connection")
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

/// `verify-ca` checks the chain and not the name, `verify-full` both: a certificate for
/// `localhost` alone, reached at 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let certs = TestCerts::generate_for(&["localhost"]);
    let pg = PrivatePg::start_tls(&certs);
    let mut config = helpers::base_config();
    config.database.connect_timeout_ms = 3000;
    config.database.pool_wait_timeout_ms = 3000;
    config.database.ca_file = ca(&certs);
    let url = |mode: &str| {
        RedactedUrl::new(format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={mode}",
            pg.port
        ))
    };
    for mode in ["prefer", "require", "verify-ca"] {
        config.database.url = url(mode);
        assert!(encrypted(&config).await, "sslmode={mode}");
    }
    config.database.url = url("verify-full");
    let err = Store::connect(&config.database)
        .expect("store")
        .ping()
        .await
        .expect_err("127.0.0.1 is not a name of the certificate");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_or_unverified_connections_to_tls_only_servers_fail_clearly() {
    let certs = TestCerts::generate();
    let pg = PrivatePg::start_tls(&certs);
    let redis = PrivateRedis::start_tls(&certs).await;
    let mut config = helpers::base_config();
    config.database.connect_timeout_ms = 3000;
    config.database.pool_wait_timeout_ms = 3000;

    // PostgreSQL without TLS: the server refuses the unencrypted connection.
    config.database.url = RedactedUrl::new(format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port
    ));
    let err = Store::connect(&config.database)
        .expect("store")
        .ping()
        .await
        .expect_err("a plain connection must fail");
    assert_eq!(err.code(), "db.auth_rejected");
    assert!(
        err.to_string().contains("no encryption"),
        "the server's reason is kept: {err}"
    );

    // As libpq: without a root certificate `prefer` and `require` encrypt without verifying
    // (a self-signed server is reached as psql reaches it); `verify-ca` and `verify-full` check
    // against the system's roots, which do not know this server's authority.
    let url = |mode: &str| {
        RedactedUrl::new(format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={mode}",
            pg.port
        ))
    };
    for mode in ["prefer", "require"] {
        config.database.url = url(mode);
        assert!(
            encrypted(&config).await,
            "sslmode={mode} connects, encrypted"
        );
    }
    for mode in ["verify-ca", "verify-full"] {
        config.database.url = url(mode);
        let err = Store::connect(&config.database)
            .expect("store")
            .ping()
            .await
            .expect_err("an unknown issuer must fail");
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "sslmode={mode} names the certificate: {err}"
        );
    }
    // A root certificate given: even `require` checks the chain (another authority: refused).
    let others = TestCerts::generate();
    config.database.ca_file = ca(&others);
    config.database.url = url("require");
    let err = Store::connect(&config.database)
        .expect("store")
        .ping()
        .await
        .expect_err("another authority must fail");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    // With the CA it works, in every TLS mode.
    config.database.ca_file = ca(&certs);
    for mode in ["prefer", "require", "verify-ca", "verify-full"] {
        config.database.url = RedactedUrl::new(format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={mode}",
            pg.port
        ));
        Store::connect(&config.database)
            .expect("store")
            .ping()
            .await
            .unwrap_or_else(|e| panic!("sslmode={mode}: {e}"));
    }
    // A CA file that is not one is refused with its path.
    config.database.ca_file = certs.server_key.to_string_lossy().into_owned();
    let err = Store::connect(&config.database).expect_err("a key is no CA file");
    assert!(err.to_string().contains("server.key"), "{err}");

    // Redis: a plain `redis://` to the TLS port gets no answer it understands.
    config.redis.response_timeout_ms = 2000;
    config.redis.url = RedactedUrl::new(format!("redis://127.0.0.1:{}/", redis.port));
    let plain = tokio::time::timeout(
        Duration::from_secs(20),
        icmp::redis_connection::connect(&config.redis),
    )
    .await
    .expect("fails within the timeouts");
    assert!(plain.is_err(), "a plain connection must fail");
    // TLS without the CA: the certificate is not trusted.
    config.redis.url = RedactedUrl::new(redis.url());
    let Err(err) = icmp::redis_connection::connect(&config.redis).await else {
        panic!("an unknown issuer must fail");
    };
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "names the certificate: {err}"
    );
    config.redis.ca_file = ca(&certs);
    let cache = icmp::cache::Cache::new(
        icmp::redis_connection::connect(&config.redis)
            .await
            .expect("TLS with the CA"),
        &config.redis,
        &config.cache,
    );
    cache.ping().await.expect("PING over TLS");
}
