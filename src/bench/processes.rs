//! Worker processes for the scale-out runs: `icmp worker` children in the benchmark's consumer
//! group, configured through `ICMP__…` variables, killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BenchError;
use crate::config::Config;
use crate::redis_connection::RedisConnection;

/// Running `icmp worker` children.
#[derive(Debug)]
pub struct WorkerProcesses {
    children: Vec<Child>,
}

impl WorkerProcesses {
    /// Starts `n` workers on the benchmark's streams, keys and mock LLM.
    ///
    /// # Errors
    /// The executable cannot be started.
    pub fn start(config: &Config, n: usize, run_id: &str) -> Result<WorkerProcesses, BenchError> {
        let exe = std::env::current_exe().map_err(BenchError::Mock)?;
        let mut children = Vec::with_capacity(n);
        for i in 0..n {
            let child = Command::new(&exe)
                .arg("worker")
                .envs(config.child_env())
                .env("ICMP__STREAMS__CONSUMER", format!("bench-{run_id}-p{i}"))
                .env("ICMP__TELEMETRY__LISTEN", "")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(BenchError::Mock)?;
            children.push(child);
        }
        Ok(WorkerProcesses { children })
    }

    /// Starts the peer of the seed's design (`scripts/seed-peer.py`, or `ICMP_SEED_PEER`) on
    /// the benchmark's streams, database and mock LLM, in place of icmp's workers.
    ///
    /// # Errors
    /// `python3` or the script cannot be started.
    pub fn start_peer(config: &Config, run_id: &str) -> Result<WorkerProcesses, BenchError> {
        let script = std::env::var_os("ICMP_SEED_PEER")
            .map_or_else(|| "scripts/seed-peer.py".into(), std::path::PathBuf::from);
        let child = Command::new("python3")
            .arg(&script)
            .envs(config.child_env())
            .env("ICMP__STREAMS__CONSUMER", format!("bench-{run_id}-peer"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(BenchError::Mock)?;
        Ok(WorkerProcesses {
            children: vec![child],
        })
    }

    /// Waits until the workers are up: the consumer group exists (the first worker creates
    /// it) and every process has had a moment to connect (a consumer shows up in the group only
    /// at its first delivery).
    ///
    /// # Errors
    /// A worker that exits at start; no group within 30 s.
    pub async fn wait_ready(
        &mut self,
        conn: &RedisConnection,
        config: &Config,
    ) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let first = config.streams.shard(0);
            let group = crate::stream::group_info(conn, &first.inbound, &first.group).await;
            if let Some(status) = self.children.iter_mut().find_map(|c| c.try_wait().ok()?) {
                return Err(BenchError::Mock(std::io::Error::other(format!(
                    "a worker process exited at start: {status}"
                ))));
            }
            if group.is_ok_and(|g| g.is_some()) {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Mock(std::io::Error::other(
                    "the worker processes created no consumer group within 30 s",
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each worker's peak resident memory so far, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> Vec<u64> {
        self.children
            .iter()
            .map(|c| super::probe::peak_rss_kib_of(&c.id().to_string()).unwrap_or(0))
            .collect()
    }

    /// Each worker's CPU seconds so far.
    pub fn cpu_secs(&self) -> Vec<f64> {
        self.children
            .iter()
            .map(|c| super::probe::cpu_secs_of(&c.id().to_string()).unwrap_or(0.0))
            .collect()
    }
}

impl Drop for WorkerProcesses {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
