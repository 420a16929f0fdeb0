//! The same-run ceiling: `pgbench` runs a transaction equivalent to one message's write set
//! (the same statements on the same tables, rows of the same sizes, the same indexes and foreign
//! keys) against the same database, so the pipeline's throughput can be read as a share of what
//! PostgreSQL on this machine can commit at that moment.

use std::path::{Path, PathBuf};
use std::process::Command;

use uuid::Uuid;

use crate::config::DatabaseConfig;

/// The ids the write set refers to (the benchmark's business).
#[derive(Debug, Clone, Copy)]
pub struct Refs {
    pub business_id: Uuid,
    pub stage_id: Uuid,
    pub template_id: Uuid,
}

/// One message's write set as a pgbench script (variables go in as parameters: pgbench's
/// prepared mode binds them, so they are cast, never quoted): the user upsert, a new conversation, both
/// messages, two LLM call rows (selection and response; extraction adds a third on a third of
/// the messages) with prompts of the demo's size, in one transaction.
pub fn script(r: &Refs) -> String {
    let prompt =
        "You route messages for a dental clinic. Stages: welcome, booking, farewell. ".repeat(12);
    let (b, s, t) = (r.business_id, r.stage_id, r.template_id);
    let call = |purpose: &str| {
        format!(
            "INSERT INTO llm_calls (id, business_id, conversation_id, message_id, purpose, \
             template_id, template_version, model, prompt, output, prompt_tokens, \
             completion_tokens, latency_ms, outcome, log_id) VALUES (gen_random_uuid(), '{b}', \
             CAST(:cid AS uuid), CAST(:mid AS uuid), '{purpose}', '{t}', 1, 'mock-1', '{prompt}', \
             'Thanks for your message, how else can I help?', 180, 12, 50, 'ok', \
             gen_random_uuid());\n"
        )
    };
    let message = |role: &str, content: &str, status: &str, returning: &str| {
        format!(
            "INSERT INTO messages (id, business_id, conversation_id, role, content, \
             idempotency_key, stage_id, status, metadata, inbound_id, log_id, user_id) VALUES \
             (gen_random_uuid(), '{b}', CAST(:cid AS uuid), '{role}', '{content}', \
             'pgbench-' || :n, '{s}', {status}, NULL, '1795000000000-0', gen_random_uuid(), \
             CAST(:uid AS uuid)){returning}\n"
        )
    };
    let mut out = String::from("\\set n random(1, 2000000000)\nBEGIN;\n");
    out.push_str(&format!(
        "INSERT INTO users (business_id, external_id) VALUES ('{b}', 'pgbench-' || :n) \
         ON CONFLICT (business_id, external_id) DO UPDATE SET last_seen_at = now() \
         RETURNING id AS uid \\gset\n"
    ));
    out.push_str(&format!(
        "INSERT INTO conversations (id, business_id, user_id, current_stage_id) VALUES \
         (gen_random_uuid(), '{b}', CAST(:uid AS uuid), '{s}') RETURNING id AS cid \\gset\n"
    ));
    out.push_str(&message(
        "user",
        "I would like to book an appointment, my name is Ada Lovelace",
        "NULL",
        " RETURNING id AS mid \\gset",
    ));
    out.push_str(&message(
        "assistant",
        "Thanks for your message: how else can I help you with your booking today?",
        "'ok'",
        ";",
    ));
    out.push_str(&call("selection"));
    out.push_str(&call("response"));
    out.push_str("END;\n");
    out
}

/// Runs `pgbench` with `clients` connections for `seconds` and returns its transactions per
/// second, or why it could not.
pub fn run(
    database: &DatabaseConfig,
    refs: &Refs,
    clients: usize,
    seconds: u64,
) -> Result<f64, String> {
    let path = std::env::temp_dir().join(format!("icmp-bench-{}.sql", Uuid::new_v4().simple()));
    std::fs::write(&path, script(refs)).map_err(|e| format!("script: {e}"))?;
    let mut cmd = Command::new(pgbench().ok_or("pgbench not found")?);
    cmd.args(["-n", "-M", "prepared", "-j", "2"])
        .arg("-c")
        .arg(clients.to_string())
        .arg("-T")
        .arg(seconds.to_string())
        .arg("-f")
        .arg(&path)
        .arg(database.url.expose());
    if let Some(password) = &database.password {
        cmd.env("PGPASSWORD", secrecy::ExposeSecret::expose_secret(password));
    }
    let out = cmd.output().map_err(|e| format!("pgbench: {e}"));
    let _ = std::fs::remove_file(&path);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    tps(&text).ok_or_else(|| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first_error = stderr
            .lines()
            .find(|l| l.contains("ERROR") || l.contains("error"))
            .unwrap_or_default();
        format!("pgbench printed no tps: {first_error}")
    })
}

fn tps(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `pgbench` from `PATH` or PostgreSQL's own directory.
fn pgbench() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("pgbench"))
            .find(|p| p.exists())
    });
    on_path.or_else(|| {
        std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin/pgbench"))
            .find(|p| Path::new(p).exists())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tps_is_read_from_pgbench_output() {
        let out = "latency average = 1.2 ms\ntps = 1605.321 (without initial connection time)\n";
        assert_eq!(tps(out), Some(1605.321));
        assert_eq!(tps("nothing"), None);
    }
}
