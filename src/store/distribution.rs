//! Citus: on a database with the `citus` extension, the tenant tables are distributed by
//! `business_id`, co-located with `businesses` (distributed by its `id`), so that every row of a
//! business lives in one shard group and each hot-path statement is a single-shard router
//! query. On plain PostgreSQL nothing here runs. Idempotent: a table already distributed is
//! left as it is, so `icmp migrate` may run any number of times, and a database migrated before
//! the extension was added is distributed by the next `icmp migrate`.

use tokio_postgres::Client;

use super::StoreError;

/// The tenant tables in an order where each table's foreign keys point only at tables before
/// it (Citus distributes a referencing table after the tables it references).
pub const TENANT_TABLES: [&str; 11] = [
    "businesses",
    "templates",
    "stages",
    "users",
    "user_erasures",
    "conversations",
    "messages",
    "extracted_data",
    "stage_transitions",
    "llm_calls",
    "action_outbox",
];

/// Whether the database the client is connected to has the `citus` extension.
///
/// # Errors
/// Database errors.
pub async fn is_citus(client: &Client) -> Result<bool, StoreError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await?
        .get(0))
}

/// Distributes every tenant table that is not distributed yet; returns the tables it
/// distributed (none on plain PostgreSQL, or when all are).
///
/// The definitions' change triggers (migration V4) go first: Citus does not run triggers of a
/// distributed table on the coordinator, where workers `LISTEN`, and refuses to distribute a
/// table that has them. Writers notify instead ([`super::Store::save_definition`] sends the same
/// notification in its transaction), and a direct SQL edit is followed by
/// `SELECT pg_notify('icmp_definitions', '<business id>')` (docs/operations.md).
/// `icmp_scope()`, which the row-level security policies call, is made a distributed function
/// so that it exists on every node.
///
/// # Errors
/// Database errors, such as a table whose rows break a key the distribution needs.
pub async fn distribute(client: &Client) -> Result<Vec<&'static str>, StoreError> {
    if !is_citus(client).await? {
        return Ok(Vec::new());
    }
    let distributed = client
        .prepare("SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = $1::text::regclass)")
        .await?;
    let mut done = Vec::new();
    for table in TENANT_TABLES {
        if client.query_one(&distributed, &[&table]).await?.get(0) {
            continue;
        }
        if done.is_empty() {
            client
                .batch_execute(
                    "DROP TRIGGER IF EXISTS businesses_changed ON businesses; \
                     DROP TRIGGER IF EXISTS stages_changed ON stages; \
                     DROP TRIGGER IF EXISTS templates_changed ON templates; \
                     SELECT create_distributed_function('icmp_scope()') \
                      WHERE NOT EXISTS (SELECT 1 FROM pg_dist_object \
                                         WHERE objid = 'icmp_scope()'::regprocedure)",
                )
                .await?;
        }
        let (column, colocate) = if table == "businesses" {
            ("id", "default")
        } else {
            ("business_id", "businesses")
        };
        client
            .execute(
                "SELECT create_distributed_table($1::text::regclass, $2, colocate_with => $3)",
                &[&table, &column, &colocate],
            )
            .await?;
        done.push(table);
    }
    // The dispatcher's scans of every business's due actions and unpublished follow-ups, the
    // desk's of unanswered handoffs and the retention sweep's of policies read every shard by
    // design.
    client
        .batch_execute(
            "ALTER FUNCTION icmp_due_actions(integer) SET citus.multi_task_query_log_level = 'off'; \
             ALTER FUNCTION icmp_unpublished_follow_ups(integer, integer) \
               SET citus.multi_task_query_log_level = 'off'; \
             ALTER FUNCTION icmp_unanswered_handoffs(integer, bigint) \
               SET citus.multi_task_query_log_level = 'off'; \
             ALTER FUNCTION icmp_retention_policies() \
               SET citus.multi_task_query_log_level = 'off'",
        )
        .await?;
    Ok(done)
}
