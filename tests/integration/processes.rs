//! Child processes for fault-injection tests: `icmp worker` processes, and private PostgreSQL
//! and Redis servers that a test may stop and start without touching the shared ones.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use icmp::config::{Config, RedactedUrl};
use uuid::Uuid;

use crate::helpers::root;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false)
}

/// The `icmp` binary with the test profile and the environment that points it at `config`'s
/// services, streams and mock LLM.
pub fn icmp(config: &Config) -> Command {
    let s = &config.streams;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_icmp"));
    cmd.arg("--config")
        .arg(root().join("config/default.toml"))
        .arg("--profile")
        .arg("test")
        .envs(config.child_env())
        .env(
            "ICMP__DATABASE__POOL_SIZE",
            config.database.pool_size.to_string(),
        )
        .env(
            "ICMP__LLM__REQUEST_TIMEOUT_MS",
            config.llm.request_timeout_ms.to_string(),
        )
        .env("ICMP__STREAMS__CLAIM_IDLE_MS", s.claim_idle_ms.to_string())
        .env(
            "ICMP__STREAMS__MAX_DELIVERIES",
            s.max_deliveries.to_string(),
        )
        .env(
            "ICMP__RETRY__MAX_ELAPSED_MS",
            config.retry.max_elapsed_ms.to_string(),
        )
        .env(
            "ICMP__WORKER__CONCURRENCY",
            config.worker.concurrency.to_string(),
        )
        .env(
            "ICMP__WORKER__SHUTDOWN_GRACE_MS",
            config.worker.shutdown_grace_ms.to_string(),
        );
    cmd
}

/// An `icmp worker` process configured like `config`.
pub struct WorkerProcess {
    child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn spawn(config: &Config, name: &str, extra_env: &[(&str, &str)]) -> WorkerProcess {
        let log = std::env::temp_dir().join(format!("icmp-worker-{name}-{}.log", Uuid::new_v4()));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = icmp(config);
        cmd.arg("worker")
            .env(
                "ICMP__STREAMS__CONSUMER",
                format!("{}-{name}", config.streams.consumer),
            )
            .env("ICMP__TELEMETRY__LISTEN", "")
            .env("ICMP__TELEMETRY__LOG_FILTER", "info")
            .env_remove("ICMP_FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        WorkerProcess {
            child: cmd.spawn().expect("spawn icmp worker"),
            log,
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.wait(Duration::from_secs(30))
            .await
            .expect("worker did not stop after SIGTERM")
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pg_bin() -> PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .find(|p| p.join("initdb").exists())
        })
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL server of this test alone, on its own port and data directory.
pub struct PrivatePg {
    dir: PathBuf,
    pub port: u16,
    /// Extra server options (TLS).
    opts: String,
}

impl PrivatePg {
    pub fn start() -> PrivatePg {
        let pg = PrivatePg::init();
        pg.start_again();
        pg
    }

    /// A server that accepts TLS connections only, with `certs`' server certificate.
    pub fn start_tls(certs: &TestCerts) -> PrivatePg {
        let mut pg = PrivatePg::init();
        for (from, to) in [
            (&certs.server_cert, "server.pem"),
            (&certs.server_key, "server.key"),
        ] {
            let dest = pg.dir.join(to);
            std::fs::copy(from, &dest).expect("copy certificate");
            chmod_600_for_postgres(&dest);
        }
        std::fs::write(
            pg.dir.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("pg_hba.conf");
        pg.opts = "-c ssl=on -c ssl_cert_file=server.pem -c ssl_key_file=server.key".into();
        pg.start_again();
        pg
    }

    fn init() -> PrivatePg {
        let dir = std::env::temp_dir().join(format!("icmp-pg-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("pg dir");
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres")
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(ok.success());
        }
        let out = as_pg_user(&pg_bin().join("initdb"))
            .args(["-D"])
            .arg(&dir)
            .args(["-U", "postgres", "--auth=trust", "-N", "-E", "UTF8"])
            .stdout(Stdio::null())
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PrivatePg {
            dir,
            port: free_port(),
            opts: String::new(),
        }
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k /tmp -c fsync=off -c max_connections=200 {}",
            self.port, self.opts
        );
        let out = as_pg_user(&pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .args(["-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "-o", &opts, "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("pg_ctl start");
        assert!(out.success(), "pg_ctl start failed");
    }

    /// Fast shutdown: connections are dropped.
    pub fn stop(&self) {
        let _ = as_pg_user(&pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates and migrates database `icmp`; returns its URL.
    pub async fn migrated(&self, config: &mut Config) -> String {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
            .batch_execute("CREATE DATABASE icmp")
            .await
            .expect("create db");
        config.database.url = RedactedUrl::new(self.url("icmp"));
        icmp::store::migrate(&config.database)
            .await
            .expect("migrate");
        self.url("icmp")
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis server of this test alone, with AOF (fsync always) on its own port.
pub struct PrivateRedis {
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
    /// TLS only, with these certificates.
    tls: Option<TestCerts>,
    /// A replica of the server on this port.
    replica_of: Option<u16>,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        PrivateRedis::start_with(None).await
    }

    /// A server that accepts TLS connections only, with `certs`' server certificate.
    pub async fn start_tls(certs: &TestCerts) -> PrivateRedis {
        PrivateRedis::start_with(Some(certs.clone())).await
    }

    /// A replica of `master` (`--replicaof`).
    pub async fn start_replica_of(master: &PrivateRedis) -> PrivateRedis {
        let mut r = PrivateRedis::empty(None);
        r.replica_of = Some(master.port);
        r.start_again().await;
        r
    }

    async fn start_with(tls: Option<TestCerts>) -> PrivateRedis {
        let mut r = PrivateRedis::empty(tls);
        r.start_again().await;
        r
    }

    fn empty(tls: Option<TestCerts>) -> PrivateRedis {
        let dir = std::env::temp_dir().join(format!("icmp-redis-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        PrivateRedis {
            dir,
            port: free_port(),
            child: None,
            tls,
            replica_of: None,
        }
    }

    pub async fn start_again(&mut self) {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => {
                cmd.args(["--port", &port]);
            }
            Some(certs) => {
                cmd.args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(&certs.server_cert)
                .arg("--tls-key-file")
                .arg(&certs.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&certs.ca_cert);
            }
        }
        if let Some(master) = self.replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--maxmemory-policy",
                "noeviction",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("private redis did not start");
    }

    /// SIGTERM: Redis flushes its AOF and exits.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = tokio::task::spawn_blocking(move || c.wait()).await;
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A certificate authority and a server certificate for `localhost` and `127.0.0.1` (P-256
/// keys), made with rcgen for one test.
#[derive(Debug, Clone)]
pub struct TestCerts {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        TestCerts::generate_for(&["localhost", "127.0.0.1"])
    }

    /// A CA and a server certificate for `names` (an IP address becomes an IP name).
    pub fn generate_for(names: &[&str]) -> TestCerts {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = std::env::temp_dir().join(format!("icmp-certs-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("certs dir");

        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "icmp test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");

        // "127.0.0.1" becomes an IP address name.
        let mut server =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("server parameters");
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.is_ca = IsCa::ExplicitNoCa;
        server.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        // Client authentication too: the nodes of a TLS cluster present it to each other.
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("server key");
        let cert = server.signed_by(&key, &ca).expect("server certificate");

        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", cert.pem()),
            ("server.key", key.serialize_pem()),
        ] {
            std::fs::write(dir.join(name), pem).expect("write a certificate file");
            make_readable(&dir.join(name));
        }
        make_readable(&dir);
        TestCerts {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
}

/// Other users (the `postgres` user that runs private servers as root) may read it.
fn make_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// PostgreSQL refuses a key file others can read, or one it does not own.
fn chmod_600_for_postgres(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    if is_root() {
        let ok = Command::new("chown")
            .arg("postgres")
            .arg(path)
            .status()
            .expect("chown");
        assert!(ok.success());
    }
}
