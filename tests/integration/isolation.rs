//! Tenant isolation enforced by PostgreSQL (row-level security, migration V5): the worker's
//! role sees and writes only the rows of the business its transaction is scoped to, whatever a
//! query forgets to filter, and nothing at all without a scope.

use icmp::llm::mock::MockOptions;
use icmp::store::Store;
use uuid::Uuid;

use crate::helpers::{self, DEMO_BUSINESS, spawn_app};

const OTHER: &str = "5b0e8a7c-3333-4c1d-8e2f-00000000000b";

/// Two businesses with a conversation each; returns (A's conversation, B's conversation).
async fn two_tenants(app: &helpers::TestApp) -> (Uuid, Uuid) {
    helpers::import_demo_copy(&app.config, OTHER, &[]).await;
    app.send("ann", "a1", "Hello there").await;
    let a: Uuid = app.reply("a1").await["conversation_id"]
        .parse()
        .expect("uuid");
    app.xadd(&[
        ("business_id", OTHER.as_bytes()),
        ("user_id", b"bob"),
        ("message_id", b"b1"),
        ("content", b"Hello from the other business"),
    ])
    .await;
    let b: Uuid = app.reply("b1").await["conversation_id"]
        .parse()
        .expect("uuid");
    (a, b)
}

/// A transaction of the worker's role scoped to `business`.
async fn scoped(
    w: &mut deadpool_postgres::Client,
    business: Uuid,
) -> deadpool_postgres::Transaction<'_> {
    let tx = w.transaction().await.expect("begin");
    // The scope exactly as the worker sets it (inside the transaction begun above).
    let scope = icmp::store::scope_sql(business, None);
    tx.batch_execute(&scope).await.expect("scope");
    tx
}

async fn worker_client(app: &helpers::TestApp) -> deadpool_postgres::Client {
    let client = Store::connect_worker(&app.config.database)
        .expect("store")
        .client()
        .await
        .expect("a worker connection");
    // The unscoped and unfiltered reads below span every shard on Citus, which the worker's
    // own sessions refuse (database.multi_shard): here they are the point.
    client
        .batch_execute("SET citus.multi_task_query_log_level = off")
        .await
        .expect("allow multi-shard reads");
    client
}

#[tokio::test]
async fn the_workers_role_sees_only_its_scoped_business_and_nothing_unscoped() {
    let app = spawn_app(MockOptions::default()).await;
    let (a_conv, b_conv) = two_tenants(&app).await;
    let a: Uuid = DEMO_BUSINESS.parse().expect("uuid");
    let b: Uuid = OTHER.parse().expect("uuid");
    let owner_total = app.count("SELECT count(*) FROM messages", &[]).await;
    let owner_a = app
        .count(
            "SELECT count(*) FROM messages WHERE business_id = $1",
            &[&a],
        )
        .await;
    assert!(
        owner_a > 0 && owner_total > owner_a,
        "both businesses have rows"
    );

    let mut w = worker_client(&app).await;
    let role: String = w
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("role")
        .get(0);
    assert_eq!(role, "icmp_worker");
    // No scope: nothing is visible, in any tenant table.
    for table in [
        "businesses",
        "templates",
        "stages",
        "users",
        "conversations",
        "messages",
        "llm_calls",
    ] {
        let n: i64 = w
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 0, "{table} without a scope");
    }

    // Scoped to A: a query that forgets its filter still sees A's rows only.
    let tx = scoped(&mut w, a).await;
    let seen: i64 = tx
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(seen, owner_a, "only business A's messages");
    // B's conversation, even by its exact id, does not exist for A.
    let found = tx
        .query_opt("SELECT id FROM conversations WHERE id = $1", &[&b_conv])
        .await
        .expect("select");
    assert!(found.is_none());
    let updated = tx
        .execute(
            "UPDATE conversations SET version = version + 100 WHERE id = $1",
            &[&b_conv],
        )
        .await
        .expect("update");
    assert_eq!(
        updated, 0,
        "B's conversation cannot be changed from A's scope"
    );
    // Writing a row of B from A's scope is refused by the policy.
    let err = tx
        .execute(
            "INSERT INTO users (business_id, external_id) VALUES ($1, 'mallory')",
            &[&b],
        )
        .await
        .expect_err("a row of another business");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err}"
    );
    drop(tx);
    // Definitions are read-only for workers.
    let tx = scoped(&mut w, a).await;
    let err = tx
        .execute(
            "UPDATE templates SET body = 'owned' WHERE business_id = $1",
            &[&a],
        )
        .await
        .expect_err("templates are read-only for workers");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    drop(tx);

    // Through the pipeline: A's user naming B's conversation is told it does not exist, and
    // B's conversation is untouched.
    let before = app
        .count(
            "SELECT version FROM conversations WHERE id = $1",
            &[&b_conv],
        )
        .await;
    app.xadd(&[
        ("business_id", DEMO_BUSINESS.as_bytes()),
        ("user_id", b"ann"),
        ("message_id", b"a2"),
        ("content", b"continue that one"),
        ("conversation_id", b_conv.to_string().as_bytes()),
    ])
    .await;
    let reply = app.reply("a2").await;
    assert_eq!(reply["error_code"], "validation.unknown_conversation");
    assert_eq!(
        app.count(
            "SELECT version FROM conversations WHERE id = $1",
            &[&b_conv]
        )
        .await,
        before
    );
    assert_ne!(a_conv, b_conv);
    app.stop().await;
}
