//! Which HTTP version carries the calls to the LLM endpoint (`llm.http_version`).
//!
//! With HTTP/1.1 every call in flight holds a connection of its own (its buffers, its task, a
//! write and a read per call); over HTTP/2 all calls share one connection, which costs less
//! memory and CPU per call (measured in `docs/performance.md`). `https://` endpoints negotiate
//! the version during the TLS handshake (ALPN). A cleartext `http://` endpoint cannot say
//! which versions it speaks, so with `auto` it is asked: a worker asks at start (waiting at
//! most `llm.connect_timeout_ms`), or else the first call does, in the background. The probe
//! is a `GET {base}/models` as HTTP/2 with prior knowledge. Any HTTP answer, whatever its
//! status, shows the endpoint speaks HTTP/2, and every call then uses it. A protocol error
//! (the endpoint speaks HTTP/1.1 only, like most self-hosted servers) settles on HTTP/1.1. An
//! endpoint that cannot be reached (or does not answer in time) settles nothing: calls use
//! HTTP/1.1 meanwhile and the question is asked again [`PROBE_AGAIN_AFTER`] later. Calls
//! never wait for a probe. A settled answer holds for the life of the process: an endpoint
//! that stops speaking HTTP/2 behind the same URL needs the workers restarted (or `1.1`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `llm.http_version`: `"auto"`, `"1.1"` or `"2"` (the numbers `1.1` and `2` too, as an
/// environment variable gives them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/2 where the endpoint speaks it (ALPN for `https://`, a probe for `http://`).
    #[default]
    Auto,
    /// HTTP/1.1 only (an endpoint whose HTTP/2 stream limit would cap the calls in flight).
    Http1,
    /// Cleartext HTTP/2 without asking (an `http://` endpoint known to speak it).
    Http2,
}

impl<'de> Deserialize<'de> for HttpVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HttpVersion;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#""auto", "1.1" or "2""#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HttpVersion, E> {
                match v {
                    "auto" => Ok(HttpVersion::Auto),
                    "1.1" => Ok(HttpVersion::Http1),
                    "2" => Ok(HttpVersion::Http2),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<HttpVersion, E> {
                if v == 1.1 {
                    Ok(HttpVersion::Http1)
                } else if v == 2.0 {
                    Ok(HttpVersion::Http2)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<HttpVersion, E> {
                match v {
                    2 => Ok(HttpVersion::Http2),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Unsigned(v), &self)),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<HttpVersion, E> {
                match v {
                    2 => Ok(HttpVersion::Http2),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl HttpVersion {
    /// The configuration value (`auto`, `1.1`, `2`).
    pub fn as_str(self) -> &'static str {
        match self {
            HttpVersion::Auto => "auto",
            HttpVersion::Http1 => "1.1",
            HttpVersion::Http2 => "2",
        }
    }
}

/// How long an unreachable endpoint leaves the version open before the next probe.
pub const PROBE_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// The HTTP client(s) calls go through.
#[derive(Clone)]
pub enum Transport {
    /// One client: HTTP/1.1, cleartext HTTP/2, or TLS negotiating the version.
    Fixed(reqwest::Client),
    /// `auto` with an `http://` endpoint: HTTP/2 once a probe showed the endpoint speaks it.
    Probing(Arc<Probe>),
}

/// The state of the cleartext HTTP/2 question for one endpoint.
pub struct Probe {
    http1: reqwest::Client,
    http2: reqwest::Client,
    /// `GET` target of the probe.
    url: String,
    /// Settled: `true` for HTTP/2.
    verdict: OnceLock<bool>,
    /// A probe is under way.
    busy: AtomicBool,
    /// No probe before this instant (the endpoint was unreachable).
    not_before: Mutex<Option<Instant>>,
    /// How long a probe waits for its answer.
    timeout: Duration,
}

/// Clears the probe's `busy` flag however the probe ends (a dropped probe included).
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Transport {
    /// The transport for `base_url` (`…/v1`) given the configured version; `builder` makes a
    /// client with the configured timeouts and pool; a probe waits `probe_timeout` at most.
    ///
    /// # Errors
    /// When a client cannot be built (the TLS backend failed to initialise).
    pub fn new(
        version: HttpVersion,
        base_url: &str,
        probe_timeout: Duration,
        builder: impl Fn() -> reqwest::ClientBuilder,
    ) -> Result<Transport, reqwest::Error> {
        let cleartext = base_url.starts_with("http://");
        Ok(match (version, cleartext) {
            (HttpVersion::Http1, _) => Transport::Fixed(builder().http1_only().build()?),
            (HttpVersion::Http2, true) => {
                Transport::Fixed(builder().http2_prior_knowledge().build()?)
            }
            // TLS negotiates the version.
            (HttpVersion::Http2 | HttpVersion::Auto, false) => Transport::Fixed(builder().build()?),
            (HttpVersion::Auto, true) => Transport::Probing(Arc::new(Probe {
                http1: builder().http1_only().build()?,
                http2: builder().http2_prior_knowledge().build()?,
                url: format!("{}/models", base_url.trim_end_matches('/')),
                verdict: OnceLock::new(),
                busy: AtomicBool::new(false),
                not_before: Mutex::new(None),
                timeout: probe_timeout,
            })),
        })
    }

    /// The client for the next call (with `auto`, the first call of an `http://` endpoint
    /// starts the probe and goes over HTTP/1.1 meanwhile).
    pub fn client(&self) -> &reqwest::Client {
        match self {
            Transport::Fixed(client) => client,
            Transport::Probing(probe) => match probe.verdict.get() {
                Some(true) => &probe.http2,
                Some(false) => &probe.http1,
                None => {
                    probe.start();
                    &probe.http1
                }
            },
        }
    }

    /// Asks now unless the answer is known, waiting for a probe under way: `Some(true)` for
    /// HTTP/2, `Some(false)` for HTTP/1.1, `None` for a fixed client or an endpoint that
    /// could not be reached.
    pub async fn settle(&self) -> Option<bool> {
        let Transport::Probing(probe) = self else {
            return None;
        };
        while probe.verdict.get().is_none() {
            if !probe.busy.swap(true, Ordering::AcqRel) {
                probe.run().await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        probe.verdict.get().copied()
    }
}

impl Probe {
    /// Starts a probe in the background unless one runs or the last found the endpoint down
    /// less than [`PROBE_AGAIN_AFTER`] ago.
    fn start(self: &Arc<Self>) {
        let due = self
            .not_before
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none_or(|at| Instant::now() >= at);
        if !due || self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        // Outside a runtime (never in the worker) the call simply stays on HTTP/1.1.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let probe = self.clone();
            runtime.spawn(async move { probe.run().await });
        } else {
            self.busy.store(false, Ordering::Release);
        }
    }

    /// Asks once (the caller has set `busy`) and records the answer.
    async fn run(&self) {
        let _busy = Busy(&self.busy);
        let http2 = match self.http2.get(&self.url).timeout(self.timeout).send().await {
            Ok(_) => true,
            // Down, or silent: nothing is known yet; ask again later.
            Err(e) if e.is_connect() || e.is_timeout() => {
                *self
                    .not_before
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    Some(Instant::now() + PROBE_AGAIN_AFTER);
                return;
            }
            // An answer that is not HTTP/2 (most often a closed connection or an HTTP/1.1
            // error response to the HTTP/2 preface).
            Err(_) => false,
        };
        if self.verdict.set(http2).is_ok() {
            tracing::info!(
                http_version = if http2 { "2" } else { "1.1" },
                "LLM endpoint version settled"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder().connect_timeout(Duration::from_millis(500))
    }

    #[test]
    fn only_auto_with_a_cleartext_endpoint_probes() {
        let probes = |v, url| {
            matches!(
                Transport::new(v, url, Duration::from_secs(1), builder),
                Ok(Transport::Probing(_))
            )
        };
        assert!(probes(HttpVersion::Auto, "http://127.0.0.1:1/v1"));
        assert!(!probes(HttpVersion::Auto, "https://api.example.com/v1"));
        assert!(!probes(HttpVersion::Http1, "http://127.0.0.1:1/v1"));
        assert!(!probes(HttpVersion::Http2, "http://127.0.0.1:1/v1"));
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_settles_nothing_and_is_not_asked_again_at_once() {
        // A port nothing listens on: the connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let url = format!("http://127.0.0.1:{port}/v1");
        let transport = Transport::new(HttpVersion::Auto, &url, Duration::from_secs(1), builder)
            .expect("transport");
        assert_eq!(transport.settle().await, None);
        let Transport::Probing(probe) = &transport else {
            panic!("auto with http:// probes");
        };
        let not_before = probe.not_before.lock().expect("lock").expect("set");
        let wait = not_before.saturating_duration_since(Instant::now());
        assert!(
            wait > PROBE_AGAIN_AFTER - Duration::from_secs(1) && wait <= PROBE_AGAIN_AFTER,
            "asked again {wait:?} from now"
        );
        assert!(!probe.busy.load(Ordering::Acquire));
        // A call meanwhile goes over HTTP/1.1 and starts no probe.
        let _ = transport.client();
        assert!(
            !probe.busy.load(Ordering::Acquire),
            "no probe before the time"
        );
        // Once the time has come, a call starts one (in the background).
        *probe.not_before.lock().expect("lock") = Some(Instant::now());
        let _ = transport.client();
        assert!(probe.busy.load(Ordering::Acquire), "a probe under way");
    }

    #[test]
    fn versions_read_as_configured() {
        #[derive(Deserialize)]
        struct C {
            v: HttpVersion,
        }
        for (text, v) in [
            ("auto", HttpVersion::Auto),
            ("1.1", HttpVersion::Http1),
            ("2", HttpVersion::Http2),
        ] {
            let c: C = toml::from_str(&format!("v = \"{text}\"")).expect("parses");
            assert_eq!(c.v, v);
            assert_eq!(v.as_str(), text);
        }
        assert!(toml::from_str::<C>("v = \"3\"").is_err());
        // Unquoted, as an environment variable's value is typed.
        let c: C = toml::from_str("v = 1.1").expect("parses");
        assert_eq!(c.v, HttpVersion::Http1);
        let c: C = toml::from_str("v = 2").expect("parses");
        assert_eq!(c.v, HttpVersion::Http2);
        assert!(toml::from_str::<C>("v = 1").is_err());
    }
}
