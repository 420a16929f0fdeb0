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

    // TLS, but a certificate from an authority we were not told to trust (the system roots).
    config.database.url = RedactedUrl::new(format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
        pg.port
    ));
    let err = Store::connect(&config.database)
        .expect("store")
        .ping()
        .await
        .expect_err("an unknown issuer must fail");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "names the certificate: {err}"
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
