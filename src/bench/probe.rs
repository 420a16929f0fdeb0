//! What the benchmark reads around a run: this process's CPU time, Redis's command counts
//! (`INFO commandstats`) and CPU (`INFO cpu`).

use crate::redis_connection::RedisConnection;
use std::collections::BTreeMap;

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat` (clock
/// ticks of 1/100 s, Linux's `USER_HZ`).
pub fn process_cpu_secs() -> Option<f64> {
    cpu_secs_of("self")
}

/// CPU seconds a process (by pid, or `self`) has used so far.
pub fn cpu_secs_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The peak resident memory of process `pid` (`self` for this one), in KiB (`VmHWM`).
pub fn peak_rss_kib_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds of every running PostgreSQL server process, by pid.
pub fn postgres_cpu() -> BTreeMap<u32, f64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end() == "postgres")
        })
        .filter_map(|pid| Some((pid, cpu_secs_of(&pid.to_string())?)))
        .collect()
}

/// CPU seconds PostgreSQL used between two [`postgres_cpu`] readings (a process that started
/// meanwhile counts from zero).
pub fn postgres_delta(before: &BTreeMap<u32, f64>, after: &BTreeMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, t)| t - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

/// [`postgres_delta`] by server: each process counted for the port of the server it belongs to
/// (its postmaster's data directory's `postmaster.pid`), so that the nodes of a Citus cluster
/// on one machine show apart. Processes whose server cannot be told are under port 0.
pub fn postgres_delta_by_server(
    before: &BTreeMap<u32, f64>,
    after: &BTreeMap<u32, f64>,
) -> BTreeMap<u16, f64> {
    let mut by_port: BTreeMap<u16, f64> = BTreeMap::new();
    let mut ports: BTreeMap<u32, u16> = BTreeMap::new();
    for (pid, t) in after {
        let postmaster = postmaster_of(*pid);
        let port = *ports
            .entry(postmaster)
            .or_insert_with(|| server_port(postmaster).unwrap_or(0));
        *by_port.entry(port).or_default() += t - before.get(pid).copied().unwrap_or(0.0);
    }
    by_port
}

/// The postmaster a PostgreSQL process belongs to: its parent, unless that is not `postgres`
/// (then it is the postmaster itself).
fn postmaster_of(pid: u32) -> u32 {
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = stat[stat.rfind(')')? + 2..].to_owned();
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        });
    match parent {
        Some(ppid)
            if std::fs::read_to_string(format!("/proc/{ppid}/comm"))
                .is_ok_and(|c| c.trim_end() == "postgres") =>
        {
            ppid
        }
        _ => pid,
    }
}

/// The port of the server whose postmaster is `pid`: line 4 of `postmaster.pid` in the data
/// directory its command line names (`-D`).
fn server_port(pid: u32) -> Option<u16> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let dir = args
        .iter()
        .position(|a| a == "-D")
        .and_then(|i| args.get(i + 1))?;
    let pidfile = std::fs::read_to_string(std::path::Path::new(dir).join("postmaster.pid")).ok()?;
    pidfile.lines().nth(3)?.trim().parse().ok()
}

/// The machine's busy and total CPU time so far (`/proc/stat`, all cores), in clock ticks.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are the 4th and 5th.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Calls per Redis command so far (`INFO commandstats`), and Redis's own CPU seconds.
#[derive(Debug, Clone, Default)]
pub struct RedisCounters {
    pub calls: BTreeMap<String, u64>,
    pub cpu_secs: f64,
}

/// The counters of every master: one entry (`redis`) for one server; on a Redis Cluster one
/// per master, by address (`INFO` goes to every node there; replicas, which replay their
/// master's writes, are left out).
pub type MasterCounters = BTreeMap<String, RedisCounters>;

impl RedisCounters {
    /// Reads the counters of every master now.
    pub async fn read_masters(conn: &RedisConnection) -> Result<MasterCounters, redis::RedisError> {
        let reply: redis::Value = redis::cmd("INFO")
            .arg("commandstats")
            .arg("cpu")
            .arg("replication")
            .query_async(&mut conn.clone())
            .await?;
        let texts: Vec<(String, String)> = match reply {
            redis::Value::Map(nodes) => nodes
                .into_iter()
                .filter_map(|(node, info)| {
                    let node: String = redis::from_redis_value(node).ok()?;
                    let info: String = redis::from_redis_value(info).ok()?;
                    Some((node, info))
                })
                .collect(),
            other => vec![("redis".to_owned(), redis::from_redis_value(other)?)],
        };
        Ok(texts
            .into_iter()
            .filter(|(_, info)| !info.lines().any(|l| l.trim() == "role:slave"))
            .map(|(node, info)| {
                let counters = RedisCounters {
                    calls: parse_commandstats(&info),
                    cpu_secs: parse_cpu(&info),
                };
                (node, counters)
            })
            .collect())
    }

    /// The counters of several masters added up.
    pub fn total(masters: &MasterCounters) -> RedisCounters {
        let mut out = RedisCounters::default();
        for c in masters.values() {
            for (k, v) in &c.calls {
                *out.calls.entry(k.clone()).or_insert(0) += v;
            }
            out.cpu_secs += c.cpu_secs;
        }
        out
    }

    /// What happened between `self` and `later`, per command (only those that changed).
    pub fn delta(&self, later: &RedisCounters) -> (BTreeMap<String, u64>, f64) {
        let calls = later
            .calls
            .iter()
            .filter_map(|(k, v)| {
                let d = v.saturating_sub(self.calls.get(k).copied().unwrap_or(0));
                (d > 0).then(|| (k.clone(), d))
            })
            .collect();
        (calls, later.cpu_secs - self.cpu_secs)
    }
}

fn parse_commandstats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

fn parse_cpu(info: &str) -> f64 {
    info.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k, "used_cpu_sys" | "used_cpu_user")
                .then(|| v.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_and_cpu_are_read_from_info_text() {
        let stats = "# Commandstats\r\ncmdstat_xadd:calls=12,usec=40,usec_per_call=3.33,rejected_calls=0,failed_calls=0\r\ncmdstat_evalsha:calls=7,usec=1\r\n";
        let calls = parse_commandstats(stats);
        assert_eq!(calls.get("xadd"), Some(&12));
        assert_eq!(calls.get("evalsha"), Some(&7));
        let cpu = "# CPU\r\nused_cpu_sys:1.50\r\nused_cpu_user:2.25\r\nused_cpu_sys_children:9\r\n";
        assert!((parse_cpu(cpu) - 3.75).abs() < 1e-9);
        assert!(process_cpu_secs().is_some());
        let (busy, total) = machine_ticks().expect("/proc/stat");
        assert!(busy <= total && total > 0);
        let mut before = BTreeMap::new();
        before.insert(1, 2.0);
        let mut after = before.clone();
        after.insert(1, 2.5);
        after.insert(2, 1.0);
        assert!((postgres_delta(&before, &after) - 1.5).abs() < 1e-9);
    }
}
