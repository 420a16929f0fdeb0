//! The same-run ceiling: `pgbench` runs one message's write set (the worker's own statement on
//! the same tables, rows of the same sizes, the same indexes and foreign keys) against the same
//! database, so the pipeline's throughput can be read as a share of what
//! PostgreSQL on this machine can commit at that moment.

use std::path::{Path, PathBuf};
use std::process::Command;

use uuid::Uuid;

use crate::config::DatabaseConfig;
use crate::store::write_set;

/// The ids the write set refers to (the benchmark's business).
#[derive(Debug, Clone, Copy)]
pub struct Refs {
    pub business_id: Uuid,
    pub stage_id: Uuid,
    pub template_id: Uuid,
}

/// One message's write set as a pgbench script: the worker's own statements for a new
/// conversation ([`write_set::statements`]) in one transaction, their parameters bound to SQL
/// expressions: a random user and conversation, both messages (ids derived from the random
/// number, so the LLM call rows can refer to the user message), and two LLM call rows
/// (selection and response) with prompts of the demo's size. Pipelined, as the worker sends
/// them: one round trip.
pub fn script(r: &Refs) -> String {
    let prompt =
        "You route messages for a dental clinic. Stages: welcome, booking, farewell. ".repeat(12);
    let (b, s, t) = (r.business_id, r.stage_id, r.template_id);
    let call = |purpose: &str| {
        format!(
            "json_build_object('id', gen_random_uuid(), 'purpose', '{purpose}', \
             'template_id', '{t}', 'template_version', 1, 'model', 'mock-1', 'prompt', '{prompt}', \
             'output', 'Thanks for your message, how else can I help?', 'prompt_tokens', 180, \
             'completion_tokens', 12, 'latency_ms', 50, 'outcome', 'ok')"
        )
    };
    let calls = format!(
        "json_build_array({}, {})",
        call("selection"),
        call("response")
    );
    let rows = format!(
        "json_build_array(json_build_object('pos', 1, 'id', md5('u' || :n)::uuid, \
         'role', 'user', 'content', 'I would like to book an appointment, my name is Ada Lovelace', \
         'key', 'pgbench-' || :n, 'inbound', '1795000000000-0', 'stage', '{s}'), \
         json_build_object('pos', 2, 'id', md5('a' || :n)::uuid, 'role', 'assistant', \
         'content', 'Thanks for your message: how else can I help you with your booking today?', \
         'key', 'pgbench-' || :n, 'inbound', '1795000000000-0', 'stage', '{s}', 'status', 'ok', \
         't_id', '{t}', 't_version', 1, 'timings', json_build_object('read', 1, 'respond', 50)))"
    );
    let mut script = String::from("\\set n random(1, 9000000000000000)\n\\startpipeline\nBEGIN;\n");
    for sql in write_set::statements(true, false, false, true, false, false) {
        let statement = write_set::bind(sql, |n| match n {
            1 => format!("'{b}'::uuid"),
            2 => "md5('c' || :n)::uuid".into(),
            3 => format!("'{s}'::uuid"),
            4 => "('pgbench-' || :n)".into(),
            5 => "NULL::bigint".into(),
            6 => rows.clone(),
            7 => "2".into(),
            8 | 9 => "NULL::uuid".into(),
            10 => "md5('u' || :n)::uuid".into(),
            11 => "md5('l' || :n)::uuid".into(),
            12 => "'{}'::jsonb".into(),
            13 => calls.clone(),
            16 => "md5('k' || :n)".into(),
            17 => "1795000000000::bigint".into(),
            18 => "0::bigint".into(),
            n => unreachable!("the write set has no parameter ${n}"),
        });
        // pgbench reads one statement per line.
        let one_line: Vec<&str> = statement.split_whitespace().collect();
        script.push_str(&one_line.join(" "));
        script.push_str(";\n");
    }
    script.push_str("COMMIT;\n\\endpipeline\n");
    script
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
    fn the_script_is_the_workers_statements_with_every_parameter_bound() {
        let refs = Refs {
            business_id: Uuid::from_u128(1),
            stage_id: Uuid::from_u128(2),
            template_id: Uuid::from_u128(3),
        };
        let script = script(&refs);
        let lines: Vec<&str> = script.lines().collect();
        let statements = write_set::statements(true, false, false, true, false, false);
        // The variable, the pipeline's start, BEGIN, the statements, COMMIT, its end.
        assert_eq!(lines.len(), statements.len() + 5, "{script}");
        assert_eq!(lines[2], "BEGIN;");
        for line in &lines[3..3 + statements.len()] {
            assert!(!line.contains('$'), "{line}");
        }
        assert!(lines[3].starts_with("INSERT INTO users"), "{}", lines[3]);
        assert!(lines[3 + statements.len() - 1].starts_with("INSERT INTO llm_calls"));
        assert_eq!(lines[lines.len() - 2], "COMMIT;");
    }

    #[test]
    fn tps_is_read_from_pgbench_output() {
        let out = "latency average = 1.2 ms\ntps = 1605.321 (without initial connection time)\n";
        assert_eq!(tps(out), Some(1605.321));
        assert_eq!(tps("nothing"), None);
    }
}
