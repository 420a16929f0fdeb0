//! A seeded, reproducible chaos soak against real PostgreSQL and Redis processes of its own and
//! several `icmp worker` processes, with a slow and flaky mock LLM.
//!
//! A producer mixes many users, bursts of one user, repeated message ids, other spellings of the
//! business id and hostile entries (half the users write to a business that answers bursts as
//! one turn), while a fault schedule kills workers (`kill -9`), stops them
//! (SIGTERM), deletes dead consumers (`XGROUP DELCONSUMER`, as an operator would), stops
//! PostgreSQL for a few seconds and restarts Redis (AOF on); every worker has four processing
//! slots against an LLM of tens of milliseconds, so entries wait for slots all the time. At the
//! end an operator replays what the dead-letter stream holds, and the soak takes an exact account.
//!
//! `ICMP_SOAK_SEED` and `ICMP_SOAK_SECONDS` choose the run (`scripts/soak` sets them); the test
//! command runs a short one.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use icmp::config::RedactedUrl;
use icmp::llm::mock::MockOptions;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::AsyncCommands;

use crate::helpers::{self, DEMO_BUSINESS, TestApp, spawn_env};
use crate::processes::{PrivatePg, PrivateRedis, WorkerProcess};

/// What the producer put on the stream, per inbound entry id.
#[derive(Debug, Clone)]
enum Sent {
    /// A valid message (`repeat`: the same user and `message_id` were sent before).
    Valid {
        user: String,
        message_id: String,
        repeat: bool,
    },
    /// A hostile entry and the error code it must be answered with.
    Bad(&'static str),
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A copy of the demo business that answers bursts as one turn (`coalesce`).
const COALESCING: &str = "5b0e8a7c-bbbb-4c1d-8e2f-000000000013";

/// Half the users write to the demo business (one turn per message), half to the coalescing
/// copy.
fn business_of(user: &str) -> &'static str {
    if user.bytes().last().is_some_and(|b| b % 2 == 1) {
        COALESCING
    } else {
        DEMO_BUSINESS
    }
}

fn business_spelling(rng: &mut StdRng, business: &str) -> String {
    match rng.random_range(0..10) {
        0 => business.to_uppercase(),
        1 => format!("{{{business}}}"),
        2 => format!("urn:uuid:{business}"),
        3 => format!(" {business} "),
        _ => business.to_owned(),
    }
}

fn content(rng: &mut StdRng, n: usize) -> String {
    match rng.random_range(0..4) {
        0 => format!("Hello, is anyone there? ({n})"),
        1 => format!("I'd like to book a cleaning, my name is Soak User{n}"),
        2 => format!("On 2026-12-0{} please ({n})", 1 + n % 9),
        _ => format!("Thanks! ({n})"),
    }
}

fn hostile(rng: &mut StdRng, n: usize) -> (icmp::stream::Fields, &'static str) {
    let base = |user: &str| {
        vec![
            (b"business_id".to_vec(), DEMO_BUSINESS.as_bytes().to_vec()),
            (b"user_id".to_vec(), user.as_bytes().to_vec()),
            (b"message_id".to_vec(), format!("bad-{n}").into_bytes()),
            (b"content".to_vec(), b"hello".to_vec()),
        ]
    };
    let user = format!("hostile-{}", n % 5);
    match rng.random_range(0..8) {
        0 => {
            let mut f = base(&user);
            f.push((vec![0xff, 0xfe], b"x".to_vec()));
            (f, "validation.unreadable_field_name")
        }
        // Bytes PostgreSQL refuses: NUL in an identifier, `\u0000` in JSON.
        6 => {
            let mut f = base(&user);
            f[2].1.extend_from_slice(b"\0nul");
            (f, "validation.invalid_field")
        }
        7 => {
            let mut f = base(&user);
            f.push((b"metadata".to_vec(), br#"{"a":["\u0000"]}"#.to_vec()));
            (f, "validation.invalid_metadata")
        }
        1 => {
            let mut f = base(&user);
            f[3].1 = vec![0xc3, 0x28, 0xff];
            (f, "validation.invalid_utf8")
        }
        2 => {
            let mut f = base(&user);
            f.remove(3);
            (f, "validation.missing_field")
        }
        3 => {
            let mut f = base(&user);
            f.push((b"padding".to_vec(), vec![b'p'; 100_000]));
            (f, "validation.entry_too_large")
        }
        4 => {
            let mut f = base(&user);
            f.push((b"user_id".to_vec(), b"twice".to_vec()));
            (f, "validation.duplicate_field")
        }
        _ => (
            vec![(b"content".to_vec(), b"nobody".to_vec())],
            "validation.missing_field",
        ),
    }
}

struct Soak {
    app: TestApp,
    pg: PrivatePg,
    redis: PrivateRedis,
    workers: Vec<(String, WorkerProcess)>,
    dead_consumers: Vec<String>,
    spawned: usize,
    sent: BTreeMap<String, Sent>,
    faults: BTreeMap<&'static str, usize>,
}

impl Soak {
    fn extra_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("ICMP__STREAMS__INBOUND_RETAIN_MS", "0"),
            ("ICMP__STREAMS__RETENTION_INTERVAL_MS", "1000"),
            ("ICMP__STREAMS__CONSUMER_IDLE_MS", "20000"),
            ("ICMP__WORKER__QUEUE_POLL_MS", "500"),
        ]
    }

    fn spawn_worker(&mut self) {
        self.spawned += 1;
        let name = format!("s{}", self.spawned);
        let process = WorkerProcess::spawn(&self.app.config, &name, &Self::extra_env());
        self.workers.push((name, process));
    }

    fn consumer(&self, name: &str) -> String {
        format!("{}-{name}", self.app.config.streams.consumer)
    }

    async fn xadd(&mut self, fields: &[(Vec<u8>, Vec<u8>)], sent: Sent) {
        // The first command after a Redis restart may meet the old, broken connection, or a
        // server still loading its AOF: neither applied it, so sending it again is safe.
        let mut attempts = 0;
        let id: String = loop {
            match self
                .app
                .redis
                .clone()
                .xadd(&self.app.config.streams.inbound, "*", fields)
                .await
            {
                Ok(id) => break id,
                Err(e)
                    if attempts < 300
                        && (e.is_io_error()
                            || e.is_connection_dropped()
                            || e.kind()
                                == redis::ErrorKind::Server(
                                    redis::ServerErrorKind::BusyLoading,
                                )) =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("xadd: {e}"),
            }
        };
        self.sent.insert(id, sent);
    }

    async fn fault(&mut self, rng: &mut StdRng) {
        match rng.random_range(0..7) {
            6 => {
                // An operator destroys the consumer group (or restores Redis without it): the
                // workers recreate it at its delivery mark; what it held is orphaned.
                let s = &self.app.config.streams;
                let _: Result<i64, _> = redis::cmd("XGROUP")
                    .arg("DESTROY")
                    .arg(&s.inbound)
                    .arg(&s.group)
                    .query_async(&mut self.app.redis.clone())
                    .await;
                *self.faults.entry("XGROUP DESTROY").or_default() += 1;
            }
            0 | 1 => {
                let i = rng.random_range(0..self.workers.len());
                let (name, mut victim) = self.workers.remove(i);
                victim.kill9();
                self.dead_consumers.push(self.consumer(&name));
                self.spawn_worker();
                *self.faults.entry("kill -9").or_default() += 1;
                if rng.random_bool(0.5) {
                    // A hasty operator removes the dead consumer before its entries moved on.
                    self.delete_dead_consumers().await;
                    *self
                        .faults
                        .entry("XGROUP DELCONSUMER right after kill -9")
                        .or_default() += 1;
                }
            }
            2 => {
                let i = rng.random_range(0..self.workers.len());
                let (name, mut stopped) = self.workers.remove(i);
                let status = stopped.terminate().await;
                assert_eq!(status.code(), Some(0), "graceful stop of {name}");
                self.dead_consumers.push(self.consumer(&name));
                self.spawn_worker();
                *self.faults.entry("SIGTERM").or_default() += 1;
            }
            3 => {
                // An operator tidies up consumers of workers that are gone, pending or not.
                self.delete_dead_consumers().await;
                *self.faults.entry("XGROUP DELCONSUMER").or_default() += 1;
            }
            4 => {
                self.pg.stop();
                tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
                self.pg.start_again();
                *self.faults.entry("PostgreSQL stopped").or_default() += 1;
            }
            _ => {
                self.redis.stop().await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
                self.redis.start_again().await;
                *self.faults.entry("Redis restarted").or_default() += 1;
            }
        }
    }

    async fn delete_dead_consumers(&mut self) {
        let s = &self.app.config.streams;
        for consumer in self.dead_consumers.drain(..) {
            let _: Result<i64, _> = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&s.inbound)
                .arg(&s.group)
                .arg(&consumer)
                .query_async(&mut self.app.redis.clone())
                .await;
        }
    }

    /// One round of traffic: mostly single messages of many users, with bursts, repeats,
    /// other spellings and hostile entries mixed in.
    async fn produce(&mut self, rng: &mut StdRng, history: &mut Vec<(String, String, String)>) {
        let n = self.sent.len();
        let roll = rng.random_range(0..100);
        if roll < 8 && !history.is_empty() {
            let (user, message_id, text) = history[rng.random_range(0..history.len())].clone();
            let fields = message_fields(business_of(&user), &user, &message_id, &text);
            self.xadd(
                &fields,
                Sent::Valid {
                    user,
                    message_id,
                    repeat: true,
                },
            )
            .await;
        } else if roll < 15 {
            let (fields, code) = hostile(rng, n);
            self.xadd(&fields, Sent::Bad(code)).await;
        } else {
            let burst = if roll < 25 { rng.random_range(3..8) } else { 1 };
            let user = format!("soak-u{}", rng.random_range(0..30));
            for i in 0..burst {
                let message_id = format!("{user}-{n}-{i}");
                let text = content(rng, n + i);
                let business = business_spelling(rng, business_of(&user));
                let fields = message_fields(&business, &user, &message_id, &text);
                history.push((user.clone(), message_id.clone(), text));
                self.xadd(
                    &fields,
                    Sent::Valid {
                        user: user.clone(),
                        message_id,
                        repeat: false,
                    },
                )
                .await;
            }
        }
    }
}

fn message_fields(business: &str, user: &str, id: &str, text: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (b"business_id".to_vec(), business.as_bytes().to_vec()),
        (b"user_id".to_vec(), user.as_bytes().to_vec()),
        (b"message_id".to_vec(), id.as_bytes().to_vec()),
        (b"content".to_vec(), text.as_bytes().to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_answers_every_message_exactly_once_and_in_order() {
    let _machine = helpers::MACHINE.lock().await;
    let seed = env_u64("ICMP_SOAK_SEED", 7);
    let seconds = env_u64("ICMP_SOAK_SECONDS", 40);
    let mut rng = StdRng::seed_from_u64(seed);
    let pg = PrivatePg::start();
    let redis = PrivateRedis::start().await;
    let mut app = spawn_env(
        MockOptions {
            latency_ms: 20,
            jitter_ms: 40,
            error_rate: 0.05,
            timeout_rate: 0.02,
            hang_ms: 1_500,
            rate_limit_rate: 0.02,
            retry_after_secs: 1,
            seed,
            ..Default::default()
        },
        |c| {
            c.streams.claim_idle_ms = 1_500;
            c.streams.max_deliveries = 1_000;
            c.retry.max_elapsed_ms = 1_000;
            c.llm.request_timeout_ms = 1_000;
            c.worker.concurrency = 4;
            c.worker.shutdown_grace_ms = 5_000;
            c.database.pool_size = 8;
        },
    )
    .await;
    let mut config = app.config.clone();
    pg.migrated(&mut config).await;
    helpers::import(&config, &[&helpers::demo_file()]).await;
    helpers::import_demo_copy(
        &config,
        COALESCING,
        &[(
            "initial_stage = \"welcome\"\n",
            "initial_stage = \"welcome\"\n\n[business.burst]\npolicy = \"coalesce\"\nwindow_ms = 150\n",
        )],
    )
    .await;
    config.redis.url = RedactedUrl::new(redis.url());
    app.store = icmp::store::Store::connect(&config.database).expect("store");
    app.redis = icmp::cache::connect(&config.redis).await.expect("redis");
    app.config = config;

    let mut soak = Soak {
        app,
        pg,
        redis,
        workers: Vec::new(),
        dead_consumers: Vec::new(),
        spawned: 0,
        sent: BTreeMap::new(),
        faults: BTreeMap::new(),
    };
    for _ in 0..3 {
        soak.spawn_worker();
    }
    let started = Instant::now();
    let mut next_fault = Duration::from_secs(rng.random_range(3..6));
    let mut history = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        if started.elapsed() >= next_fault {
            soak.fault(&mut rng).await;
            next_fault = started.elapsed() + Duration::from_secs(rng.random_range(3..7));
        }
        soak.produce(&mut rng, &mut history).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
    }
    let produced = soak.sent.len();

    // Let the workers drain, then replay what was dead-lettered (orphans of deleted
    // consumers), as an operator would, and drain again.
    let app = &soak.app;
    let s = app.config.streams.clone();
    let mut replayed = HashMap::new();
    // Drained when nothing is pending or undelivered. A long run can end with a backlog (the
    // faults cost throughput), so the only failure is no progress: the outbound stream must
    // grow at least once every two minutes while anything waits.
    let drain_started = Instant::now();
    let mut last_progress = Instant::now();
    let mut answered = 0;
    loop {
        let pending = app.pending().await;
        let lag = lag(app).await;
        let now_answered: i64 = app
            .redis
            .clone()
            .xlen(&s.outbound)
            .await
            .unwrap_or(answered);
        if now_answered > answered {
            answered = now_answered;
            last_progress = Instant::now();
        }
        let dead = app.entries(&s.dead_letter).await;
        if !dead.is_empty() && pending == 0 && lag == 0 {
            let ids: Vec<String> = dead.iter().map(|d| d["__id"].clone()).collect();
            for d in &dead {
                replayed.insert(d["inbound_id"].clone(), d["error_code"].clone());
            }
            icmp::stream::dead_letter::replay(&app.redis, &s, &ids)
                .await
                .expect("replay");
            continue;
        }
        if pending == 0 && lag == 0 && dead.is_empty() {
            break;
        }
        assert!(
            last_progress.elapsed() < Duration::from_secs(120),
            "no progress for two minutes: {pending} pending, lag {lag}, {} dead letters",
            dead.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The account.
    let replies = app.entries(&s.outbound).await;
    let mut by_inbound: HashMap<&str, Vec<&HashMap<String, String>>> = HashMap::new();
    let mut by_message: HashMap<(String, String), Vec<&HashMap<String, String>>> = HashMap::new();
    for r in &replies {
        by_inbound
            .entry(r["inbound_id"].as_str())
            .or_default()
            .push(r);
        if r["status"] != "error" {
            by_message
                .entry((r["user_id"].clone(), r["message_id"].clone()))
                .or_default()
                .push(r);
        }
    }
    let mut valid = 0;
    let mut bad = 0;
    for (id, sent) in &soak.sent {
        let got = by_inbound.get(id.as_str()).map_or(0, Vec::len);
        if let Some(code) = replayed.get(id) {
            assert_eq!(code, "stream.orphaned", "{id} dead-lettered for {code}");
            assert_eq!(got, 0, "{id} was orphaned, not answered");
            continue;
        }
        assert_eq!(got, 1, "{id} ({sent:?}) answered {got} times");
        let reply = &by_inbound[id.as_str()][0];
        match sent {
            Sent::Valid { .. } => {
                valid += 1;
                assert_ne!(reply["status"], "error", "{id}: {reply:?}");
            }
            Sent::Bad(code) => {
                bad += 1;
                assert_eq!(reply["error_code"], *code, "{id}");
            }
        }
    }
    // Every valid message, replayed orphans included, answered with one stored answer.
    for sent in soak.sent.values() {
        if let Sent::Valid {
            user, message_id, ..
        } = sent
        {
            let answers = &by_message[&(user.clone(), message_id.clone())];
            let first = &answers[0]["reply_id"];
            assert!(
                answers.iter().all(|a| &a["reply_id"] == first),
                "{message_id}: one stored answer"
            );
        }
    }
    let keys = app
        .count("SELECT count(DISTINCT idempotency_key) FROM messages", &[])
        .await;
    assert_eq!(
        keys as usize,
        by_message.len(),
        "one stored message per message id"
    );
    let wrong = app
        .count(
            "SELECT count(*) FROM (SELECT 1 FROM messages GROUP BY user_id, idempotency_key \
             HAVING count(*) FILTER (WHERE role = 'user') <> 1 \
             OR count(*) FILTER (WHERE role = 'assistant' OR answered_by IS NOT NULL) <> 1) k",
            &[],
        )
        .await;
    assert_eq!(
        wrong, 0,
        "exactly one user row per message, and one assistant row or one answering reply"
    );
    let coalesced = replies
        .iter()
        .filter(|r| r["status"] == "coalesced")
        .count();
    // Per user, stored order is stream order (orphans replayed later excepted).
    let orphans: std::collections::HashSet<String> = soak
        .sent
        .iter()
        .filter(|(id, _)| replayed.contains_key(*id))
        .filter_map(|(_, s)| match s {
            Sent::Valid { message_id, .. } => Some(message_id.clone()),
            Sent::Bad(_) => None,
        })
        .collect();
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for sent in soak.sent.values() {
        if let Sent::Valid {
            user,
            message_id,
            repeat: false,
        } = sent
            && !orphans.contains(message_id)
        {
            expected
                .entry(user.clone())
                .or_default()
                .push(message_id.clone());
        }
    }
    let rows = app
        .db()
        .await
        .query(
            "SELECT u.external_id, m.idempotency_key FROM messages m \
             JOIN users u ON u.id = m.user_id WHERE m.role = 'user' ORDER BY m.seq",
            &[],
        )
        .await
        .expect("rows");
    let mut stored: HashMap<String, Vec<String>> = HashMap::new();
    for r in rows {
        let key: String = r.get(1);
        if !orphans.contains(&key) {
            stored.entry(r.get(0)).or_default().push(key);
        }
    }
    assert_eq!(stored, expected, "per-user order");
    assert_eq!(app.pending().await, 0);
    let queues: Vec<String> = app
        .redis
        .clone()
        .keys(format!("{}order*", app.config.redis.key_prefix))
        .await
        .expect("keys");
    assert!(queues.is_empty(), "order keys left: {queues:?}");
    for (name, w) in &mut soak.workers {
        assert!(w.is_running(), "{name} died; see {:?}", w.log);
    }
    println!(
        "soak seed {seed}, {seconds} s: {produced} entries ({valid} valid answered, {bad} hostile \
         rejected, {} orphaned by DELCONSUMER and replayed), {} replies ({coalesced} coalesced), \
         faults {:?}, drained {:.0} s after the producer stopped",
        replayed.len(),
        replies.len(),
        soak.faults,
        drain_started.elapsed().as_secs_f64()
    );
    for (_, w) in &mut soak.workers {
        w.terminate().await;
    }
}

/// Entries not yet delivered to the group: 0 when its last delivered id is the stream's last
/// id (the `lag` field itself is unknown once entries were trimmed).
async fn lag(app: &TestApp) -> i64 {
    let s = &app.config.streams;
    let mut conn = app.redis.clone();
    let groups: Result<Vec<Vec<redis::Value>>, _> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&s.inbound)
        .query_async(&mut conn)
        .await;
    let stream: Result<Vec<redis::Value>, _> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(&s.inbound)
        .query_async(&mut conn)
        .await;
    let (Ok(groups), Ok(stream)) = (groups, stream) else {
        return i64::MAX;
    };
    let field = |flat: &[redis::Value], name: &str| -> Option<String> {
        flat.chunks(2).find_map(|kv| match kv {
            [redis::Value::BulkString(k), v] if k == name.as_bytes() => match v {
                redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                redis::Value::Int(n) => Some(n.to_string()),
                _ => None,
            },
            _ => None,
        })
    };
    let last = field(&stream, "last-generated-id");
    let ours = groups
        .iter()
        .find(|g| field(g, "name").as_deref() == Some(s.group.as_str()));
    match (ours.and_then(|g| field(g, "last-delivered-id")), last) {
        (Some(delivered), Some(last)) if delivered == last => 0,
        _ => 1,
    }
}
