//! Schema, migrations, business import and tenant isolation.

use icmp::business::{self, Definition, ImportError};
use icmp::config::RedactedUrl;
use icmp::store::import::TemplateChange;
use icmp::store::{self, Store};
use uuid::Uuid;

use crate::helpers::{self, DEMO_BUSINESS};

const OTHER_BUSINESS: &str = "5b0e8a7c-1111-4c1d-8e2f-000000000002";

fn demo_text() -> String {
    std::fs::read_to_string(helpers::demo_file()).expect("demo file")
}

/// The demo definition as another business (same template names, other texts).
fn other_business_text() -> String {
    demo_text()
        .replace(DEMO_BUSINESS, OTHER_BUSINESS)
        .replace("Sunny Smile Dental", "Northside Vet")
}

async fn write_temp(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("icmp-def-{}.toml", Uuid::new_v4()));
    tokio::fs::write(&path, text).await.expect("write");
    path
}

async fn count(store: &Store, sql: &str) -> i64 {
    store
        .client()
        .await
        .expect("db")
        .query_one(sql, &[])
        .await
        .expect("query")
        .get(0)
}

#[tokio::test]
async fn migrate_twice_is_a_no_op_the_second_time() {
    let mut config = helpers::base_config();
    config.database.url = RedactedUrl::new(helpers::empty_database().await);
    let first = store::migrate(&config.database).await.expect("first");
    assert_eq!(first, (1..=18).collect::<Vec<_>>());
    let second = store::migrate(&config.database).await.expect("second");
    assert!(second.is_empty(), "{second:?}");
    let store = Store::connect(&config.database).expect("store");
    let tables = count(
        &store,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' \
         AND table_name IN ('businesses','users','stages','templates','conversations','messages',\
         'extracted_data','stage_transitions','llm_calls')",
    )
    .await;
    assert_eq!(tables, 9);
}

#[tokio::test]
async fn a_broken_template_rejects_the_file_naming_template_and_line() {
    let config = helpers::isolated_config().await;
    let store = Store::connect(&config.database).expect("store");
    let broken = demo_text().replace(
        "User message: {{ message.content }}\"\"\"\n\n[[templates]]\nname = \"booking_reply\"",
        "User message: {{ message.content \"\"\"\n\n[[templates]]\nname = \"booking_reply\"",
    );
    assert_ne!(broken, demo_text(), "the fixture must change the file");
    let path = write_temp(&broken).await;
    let err = business::import_files(&store, None, &[&path])
        .await
        .expect_err("must fail");
    let text = err.to_string();
    assert!(matches!(err, ImportError::Definition { .. }));
    assert!(text.contains("welcome_reply"), "{text}");
    assert!(
        text.contains("welcome_reply.body:3:"),
        "line missing: {text}"
    );
    assert_eq!(count(&store, "SELECT count(*) FROM businesses").await, 0);
    assert_eq!(count(&store, "SELECT count(*) FROM templates").await, 0);
}

#[tokio::test]
async fn an_unknown_variable_rejects_the_file_and_writes_nothing() {
    let config = helpers::isolated_config().await;
    let store = Store::connect(&config.database).expect("store");
    let text = demo_text().replace(
        "You close the conversation for {{ business.name }}",
        "You close the conversation for {{ business.owner }}",
    );
    let path = write_temp(&text).await;
    let err = business::import_files(&store, None, &[&path])
        .await
        .expect_err("must fail");
    let msg = err.to_string();
    assert!(msg.contains("farewell_reply"), "{msg}");
    assert!(msg.contains("farewell_reply.system:1:"), "{msg}");
    assert_eq!(count(&store, "SELECT count(*) FROM templates").await, 0);
    assert_eq!(count(&store, "SELECT count(*) FROM stages").await, 0);
}

#[test]
fn an_unknown_variable_in_a_branch_the_sample_never_takes_is_reported_with_its_line() {
    // The sample context has every extracted field set, so rendering it never enters this
    // branch: only the static check sees the typo.
    let text = demo_text().replace(
        "We could not confirm",
        "{% if not extracted.name %}{{ user.nmae }}{% endif %}We could not confirm",
    );
    let err = Definition::parse(&text).expect_err("invalid").to_string();
    assert!(
        err.contains("body line 1: unknown variable `user.nmae`"),
        "{err}"
    );
    assert!(err.contains("`fallback_booking` body"), "{err}");
}

#[test]
fn definitions_with_bad_references_list_every_problem() {
    let text = demo_text()
        .replace(
            "response_template = \"farewell_reply\"",
            "response_template = \"nope\"",
        )
        .replace(
            "extraction_template = \"extract_booking\"",
            "extraction_template = \"welcome_reply\"",
        );
    let err = Definition::parse(&text).expect_err("invalid").to_string();
    assert!(err.contains("unknown template `nope`"), "{err}");
    assert!(
        err.contains("`welcome_reply` is a response template, expected extraction"),
        "{err}"
    );
}

#[tokio::test]
async fn reimport_bumps_only_changed_templates() {
    let config = helpers::isolated_config().await;
    let store = Store::connect(&config.database).expect("store");
    let first = business::import_files(&store, None, &[helpers::demo_file()])
        .await
        .expect("import");
    assert!(
        first[0]
            .templates
            .iter()
            .all(|(_, c, v)| *c == TemplateChange::Created && *v == 1)
    );

    let changed = demo_text().replace(
        "Answer briefly and offer",
        "Answer in two sentences and offer",
    );
    let path = write_temp(&changed).await;
    let second = business::import_files(&store, None, &[&path])
        .await
        .expect("reimport");
    for (name, change, version) in &second[0].templates {
        if name == "welcome_reply" {
            assert_eq!((change, *version), (&TemplateChange::Updated, 2));
        } else {
            assert_eq!(
                (change, *version),
                (&TemplateChange::Unchanged, 1),
                "{name}"
            );
        }
    }
    assert_eq!(count(&store, "SELECT count(*) FROM templates").await, 8);
    assert_eq!(count(&store, "SELECT count(*) FROM stages").await, 3);
    assert_eq!(
        count(&store, "SELECT count(*) FROM templates WHERE body LIKE '%two sentences%' OR system LIKE '%two sentences%'").await,
        1
    );
}

#[tokio::test]
async fn two_businesses_never_see_each_others_stages_or_templates() {
    let config = helpers::isolated_config().await;
    let store = Store::connect(&config.database).expect("store");
    let other = write_temp(&other_business_text()).await;
    let reports = business::import_files(&store, None, &[helpers::demo_file(), other])
        .await
        .expect("import");
    let (demo, vet) = (&reports[0], &reports[1]);
    let demo_id: Uuid = DEMO_BUSINESS.parse().expect("uuid");
    let vet_id: Uuid = OTHER_BUSINESS.parse().expect("uuid");

    for t in &vet.template_ids {
        assert!(
            store
                .load_template(demo_id, *t)
                .await
                .expect("query")
                .is_none()
        );
        assert!(
            store
                .load_template(vet_id, *t)
                .await
                .expect("query")
                .is_some()
        );
    }
    for s in &vet.stage_ids {
        assert!(
            store
                .load_stage_templates(demo_id, *s)
                .await
                .expect("query")
                .is_none()
        );
    }
    let b = store
        .load_business(demo_id)
        .await
        .expect("query")
        .expect("demo");
    assert!(b.stages.iter().all(|s| demo.stage_ids.contains(&s.id)));
    assert_eq!(b.name, "Sunny Smile Dental");

    // The schema itself refuses a stage pointing at another business's template.
    let err = store
        .client()
        .await
        .expect("db")
        .execute(
            "UPDATE stages SET response_template_id = $1 WHERE id = $2",
            &[&vet.template_ids[2], &demo.stage_ids[0]],
        )
        .await
        .expect_err("cross-tenant reference");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
    );
}

#[tokio::test]
async fn deadlocks_and_serialization_failures_are_retryable_and_constraint_errors_are_not() {
    use icmp::error::{Classify, StoreError};
    let config = helpers::isolated_config().await;
    let store = Store::connect(&config.database).expect("store");
    let setup = store.client().await.expect("db");
    setup
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0), (2, 0);",
        )
        .await
        .expect("setup");

    // Two transactions locking the same rows in opposite order: PostgreSQL kills one (40P01);
    // the loser's transaction is dropped (rolled back) so the other can finish.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let side = |first: i32, second: i32| {
        let (store, barrier) = (store.clone(), barrier.clone());
        tokio::spawn(async move {
            let mut client = store.client().await.expect("db");
            let tx = client.transaction().await.expect("tx");
            tx.execute("UPDATE t SET v = 1 WHERE id = $1", &[&first])
                .await
                .expect("first lock");
            barrier.wait().await;
            tx.execute("UPDATE t SET v = 2 WHERE id = $1", &[&second])
                .await?;
            tx.commit().await
        })
    };
    let (ra, rb) = tokio::join!(side(1, 2), side(2, 1));
    let (ra, rb) = (ra.expect("task"), rb.expect("task"));
    assert!(
        ra.is_ok() != rb.is_ok(),
        "exactly one side is chosen as the victim"
    );
    let err = StoreError::from(ra.err().or(rb.err()).expect("one side deadlocks"));
    assert_eq!(err.code(), "db.deadlock");
    assert!(err.is_retryable());

    // A read-write conflict between serializable transactions (40001).
    let mut c = store.client().await.expect("db");
    let mut d = store.client().await.expect("db");
    let tc = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::Serializable)
        .start()
        .await
        .expect("c");
    let td = d
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::Serializable)
        .start()
        .await
        .expect("d");
    tc.query("SELECT sum(v) FROM t", &[]).await.expect("c read");
    td.query("SELECT sum(v) FROM t", &[]).await.expect("d read");
    tc.execute("UPDATE t SET v = v + 1 WHERE id = 1", &[])
        .await
        .expect("c write");
    td.execute("UPDATE t SET v = v + 1 WHERE id = 2", &[])
        .await
        .expect("d write");
    tc.commit().await.expect("first commit wins");
    let err = StoreError::from(td.commit().await.expect_err("second commit fails"));
    assert_eq!(err.code(), "db.serialization_failure");
    assert!(err.is_retryable());

    // A constraint violation is the data's fault: never retried.
    let err = StoreError::from(
        setup
            .execute("INSERT INTO t VALUES (1, 0)", &[])
            .await
            .expect_err("duplicate"),
    );
    assert_eq!(err.code(), "db.error");
    assert!(!err.is_retryable());
}

/// The demo business's prompts, rendered for a realistic turn of each stage: a template or
/// context change shows up in review as a snapshot diff.
#[test]
fn demo_prompts_render_as_reviewed() {
    use icmp::model::{Business, Role, StageInfo, Turn};
    use icmp::pipeline::context;
    use icmp::template;

    let def = Definition::parse(&demo_text()).expect("demo");
    let stages: Vec<StageInfo> = def
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| StageInfo {
            id: Uuid::from_u128(i as u128 + 1),
            name: s.name.clone(),
            description: s.description.clone(),
            next: None,
            actions: s.actions.clone(),
            handoff: s.handoff,
        })
        .collect();
    let business = Business {
        id: def.business.id,
        name: def.business.name.clone(),
        initial_stage_id: stages[0].id,
        stages: stages.clone(),
        extraction_fields: def.extraction_fields(),
        ..Default::default()
    };
    let mut extracted = icmp::model::Extracted::new();
    extracted.insert("name".into(), serde_json::json!("Alice Smith"));
    let now = chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
        .expect("time")
        .to_utc();
    let engine = template::engine();
    let mut out = String::new();
    for (stage_def, stage) in def.stages.iter().zip(&stages) {
        let ctx = context::build(context::ContextInputs {
            business: &business,
            user_id: "alice",
            conversation_id: Uuid::from_u128(42),
            is_new: false,
            stage,
            content: "Could I come in on friday for a cleaning?",
            metadata: None,
            history: vec![
                Turn {
                    role: Role::User,
                    content: "Hi, I'm Alice Smith".into(),
                },
                Turn {
                    role: Role::Assistant,
                    content: "Hello Alice! How can I help?".into(),
                },
            ],
            summary: "",
            extracted: &extracted,
            now,
            actions: &serde_json::Map::new(),
        });
        let names = [
            &stage_def.selection_template,
            &stage_def.extraction_template,
            &Some(stage_def.response_template.clone()),
            &stage_def.fallback_template,
        ];
        for name in names.into_iter().flatten() {
            let t = def
                .templates
                .iter()
                .find(|t| &t.name == name)
                .expect("template");
            let record = t.to_record(Uuid::nil(), def.business.id);
            let compiled = template::compile(&engine, record).expect("compile");
            let r = template::render(&engine, &compiled, &ctx).expect("render");
            out.push_str(&format!(
                "=== stage {} · template {} ({})\n--- system\n{}\n--- body\n{}\n\n",
                stage.name,
                t.name,
                t.kind.as_str(),
                r.system,
                r.body
            ));
        }
    }
    insta::assert_snapshot!("demo_prompts", out);
}

/// A database an earlier release filled (migrations 1 to 9: keys on `id` alone, `seq` from
/// one sequence shared by every conversation, message references nulled on delete) and then
/// upgraded in place by `icmp migrate`: every row is kept, the keys include `business_id`, and a
/// worker continues a conversation after its last message, in order.
#[tokio::test]
async fn an_upgrade_keeps_every_row_and_continues_each_conversation_in_order() {
    let url = helpers::empty_database().await;
    let mut config = helpers::base_config();
    config.database.url = RedactedUrl::new(url.clone());
    assert_eq!(
        store::migrate_to(&config.database, Some(9))
            .await
            .expect("v9"),
        (1..=9).collect::<Vec<_>>()
    );
    let owner = Store::connect(&config.database).expect("store");
    // The previous release's rows: the demo business's initial stage (as that release's import
    // stored it), two conversations whose messages interleave in `seq`.
    owner
        .client()
        .await
        .expect("db")
        .batch_execute(&format!(
            "INSERT INTO businesses (id, name) VALUES ('{DEMO_BUSINESS}', 'demo'); \
             INSERT INTO templates (business_id, name, kind, body, model) \
               VALUES ('{DEMO_BUSINESS}', 'welcome_reply', 'response', 'hi', 'mock-1'); \
             INSERT INTO stages (business_id, name, is_initial, response_template_id) \
               SELECT '{DEMO_BUSINESS}', 'welcome', true, id FROM templates; \
             INSERT INTO users (id, business_id, external_id) VALUES \
               ('00000000-0000-0000-0000-0000000000a1', '{DEMO_BUSINESS}', 'ann'), \
               ('00000000-0000-0000-0000-0000000000b1', '{DEMO_BUSINESS}', 'bob'); \
             INSERT INTO conversations (id, business_id, user_id, current_stage_id) \
               SELECT c.id, '{DEMO_BUSINESS}', c.u, s.id FROM stages s, (VALUES \
                 ('00000000-0000-0000-0000-0000000000ca'::uuid, '00000000-0000-0000-0000-0000000000a1'::uuid), \
                 ('00000000-0000-0000-0000-0000000000cb', '00000000-0000-0000-0000-0000000000b1')) c(id, u) \
               WHERE s.business_id = '{DEMO_BUSINESS}' AND s.is_initial; \
             INSERT INTO messages (id, business_id, conversation_id, user_id, role, content, \
                                   idempotency_key, status, log_id) \
               SELECT m.id, '{DEMO_BUSINESS}', m.c, m.u, m.role, m.content, m.k, m.status, gen_random_uuid() \
               FROM (VALUES \
                 (1, '00000000-0000-0000-0000-00000000a001'::uuid, '00000000-0000-0000-0000-0000000000ca'::uuid, '00000000-0000-0000-0000-0000000000a1'::uuid, 'user', 'ann 1', 'a1', NULL), \
                 (2, '00000000-0000-0000-0000-00000000b001', '00000000-0000-0000-0000-0000000000cb', '00000000-0000-0000-0000-0000000000b1', 'user', 'bob 1', 'b1', NULL), \
                 (3, '00000000-0000-0000-0000-00000000a002', '00000000-0000-0000-0000-0000000000ca', '00000000-0000-0000-0000-0000000000a1', 'assistant', 'to ann 1', 'a1', 'ok'), \
                 (4, '00000000-0000-0000-0000-00000000b002', '00000000-0000-0000-0000-0000000000cb', '00000000-0000-0000-0000-0000000000b1', 'assistant', 'to bob 1', 'b1', 'ok'), \
                 (5, '00000000-0000-0000-0000-00000000a003', '00000000-0000-0000-0000-0000000000ca', '00000000-0000-0000-0000-0000000000a1', 'user', 'ann 2', 'a2', NULL), \
                 (6, '00000000-0000-0000-0000-00000000a004', '00000000-0000-0000-0000-0000000000ca', '00000000-0000-0000-0000-0000000000a1', 'assistant', 'to ann 2', 'a2', 'ok')) \
                 m(n, id, c, u, role, content, k, status) ORDER BY m.n; \
             INSERT INTO extracted_data (business_id, conversation_id, field, value, source_message_id) \
               VALUES ('{DEMO_BUSINESS}', '00000000-0000-0000-0000-0000000000ca', 'name', '\"Ann\"', \
                       '00000000-0000-0000-0000-00000000a003'); \
             INSERT INTO llm_calls (id, business_id, conversation_id, message_id, purpose, model, prompt, \
                                    latency_ms, outcome, log_id) \
               VALUES (gen_random_uuid(), '{DEMO_BUSINESS}', '00000000-0000-0000-0000-0000000000ca', \
                       '00000000-0000-0000-0000-00000000a003', 'response', 'm', 'p', 5, 'ok', gen_random_uuid());"
        ))
        .await
        .expect("the previous release's rows");
    let counts = "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM conversations), \
                  (SELECT count(*) FROM messages), (SELECT count(*) FROM extracted_data), \
                  (SELECT count(*) FROM llm_calls)";
    let before: Vec<i64> = {
        let row = owner
            .client()
            .await
            .expect("db")
            .query_one(counts, &[])
            .await
            .expect("counts");
        (0..5).map(|i| row.get(i)).collect()
    };
    assert_eq!(before, vec![2, 2, 6, 1, 1]);
    drop(owner);

    assert_eq!(
        store::migrate(&config.database).await.expect("upgrade"),
        vec![10, 11, 12, 13, 14, 15, 16, 17, 18]
    );
    // This release's import of the demo keeps the stage the conversations are in.
    helpers::import(&config, &[&helpers::demo_file()]).await;
    let owner = Store::connect(&config.database).expect("store");
    let db = owner.client().await.expect("db");
    let row = db.query_one(counts, &[]).await.expect("counts");
    assert_eq!(
        (0..5).map(|i| row.get::<_, i64>(i)).collect::<Vec<_>>(),
        before
    );
    let keys: Vec<String> = db
        .query(
            "SELECT conrelid::regclass::text || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE contype = 'p' AND connamespace = current_schema()::regnamespace \
             AND conrelid::regclass::text NOT IN ('businesses', 'refinery_schema_history', \
                                                  'audit_log') \
             ORDER BY 1",
            &[],
        )
        .await
        .expect("keys")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Every tenant table's (the audit trail is the operators', not a tenant's).
    assert_eq!(keys.len(), 10, "{keys:?}");
    for key in &keys {
        assert!(key.contains("PRIMARY KEY (business_id, "), "{key}");
    }

    // A worker continues ann's conversation after its last message.
    let app = helpers::spawn_app_with(Default::default(), |c| {
        c.database.url = RedactedUrl::new(url.clone());
    })
    .await;
    app.send("ann", "a3", "ann 3").await;
    let reply = app.reply("a3").await;
    assert_eq!(
        reply["conversation_id"], "00000000-0000-0000-0000-0000000000ca",
        "{reply:?}"
    );
    let order: Vec<String> = db
        .query(
            "SELECT content FROM messages WHERE conversation_id = '00000000-0000-0000-0000-0000000000ca' \
             ORDER BY seq",
            &[],
        )
        .await
        .expect("history")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order.len(), 6, "{order:?}");
    assert_eq!(
        &order[..5],
        ["ann 1", "to ann 1", "ann 2", "to ann 2", "ann 3"],
        "{order:?}"
    );
    assert_eq!(order[5], reply["content"], "{order:?}");
    // Rows of the previous release name no endpoint; the new reply names the one that answered.
    assert_eq!(reply["endpoint"], "default", "{reply:?}");
    let unnamed: i64 = db
        .query_one(
            "SELECT count(*) FROM llm_calls WHERE endpoint IS NULL AND model = 'm'",
            &[],
        )
        .await
        .expect("calls")
        .get(0);
    assert_eq!(unnamed, 1);
    let name: serde_json::Value = db
        .query_one(
            "SELECT value FROM extracted_data WHERE conversation_id = '00000000-0000-0000-0000-0000000000ca' \
             AND field = 'name'",
            &[],
        )
        .await
        .expect("extracted")
        .get(0);
    assert_eq!(name, "Ann");
}
