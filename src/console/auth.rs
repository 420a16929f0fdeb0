//! Who may write. The console reads for anyone who reaches it; replaying or purging a dead
//! letter needs the token from `ICMP_CONSOLE_TOKEN`, presented as `Authorization: Bearer …`
//! or exchanged once on `/login` for a session cookie (random, `HttpOnly`, `SameSite=Strict`,
//! kept in memory only). Without a configured token the console is read-only. The token is
//! compared in constant time and never logged or echoed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE};
use rand::RngCore as _;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq as _;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "icmp_console_session";

/// How long a session lasts after signing in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 60 * 60);

/// What one request may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grant {
    /// A token is configured, so writes are possible at all.
    pub writable: bool,
    /// This request may replay and purge.
    pub can_write: bool,
    /// It carries a valid session cookie.
    pub signed_in: bool,
}

/// Whether a request comes from another site: by the browser's `Sec-Fetch-Site` when it sends
/// one (`same-origin` and `none`, a typed address, are ours), else by an `Origin` whose host is
/// not the `Host` asked for. Requests without either (curl, scripts) are not cross-site.
pub fn is_cross_site(headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    match (header("origin"), header("host")) {
        (Some(origin), Some(host)) => {
            origin.split_once("://").map(|(_, authority)| authority) != Some(host)
        }
        (Some(_), None) => true,
        _ => false,
    }
}

/// The configured token and the sessions signed in with it.
pub struct Auth {
    token: Option<SecretString>,
    /// Session id → expiry.
    sessions: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// `token`: the write token; `None` (or empty) makes the console read-only.
    pub fn new(token: Option<SecretString>) -> Auth {
        Auth {
            token: token.filter(|t| !t.expose_secret().is_empty()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a token is configured.
    pub fn writable(&self) -> bool {
        self.token.is_some()
    }

    /// Whether `given` is the configured token (always false when none is configured).
    pub fn token_matches(&self, given: &str) -> bool {
        self.token
            .as_ref()
            .is_some_and(|t| bool::from(t.expose_secret().as_bytes().ct_eq(given.as_bytes())))
    }

    /// Starts a session; returns its id (for the cookie).
    pub fn sign_in(&self) -> String {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, expiry| *expiry > now);
        sessions.insert(id.clone(), now + SESSION_TTL);
        id
    }

    /// Ends the session of this request, if any.
    pub fn sign_out(&self, headers: &HeaderMap) {
        if let Some(id) = session_cookie(headers) {
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }

    fn session_valid(&self, id: &str) -> bool {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.iter().any(|(s, expiry)| {
            bool::from(s.as_bytes().ct_eq(id.as_bytes())) && *expiry > Instant::now()
        })
    }

    /// What a request with these headers may do.
    pub fn grant(&self, headers: &HeaderMap) -> Grant {
        if !self.writable() {
            return Grant::default();
        }
        let bearer = headers
            .get_all(AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer "))
            .any(|t| self.token_matches(t.trim()));
        let signed_in = session_cookie(headers).is_some_and(|id| self.session_valid(&id));
        Grant {
            writable: true,
            can_write: bearer || signed_in,
            signed_in,
        }
    }
}

/// The session id in the request's cookies.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The `Set-Cookie` value for a new session.
pub fn session_set_cookie(id: &str) -> String {
    format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn session_clear_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_from_another_site_is_told_apart() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().expect("header"));
            }
            is_cross_site(&h)
        };
        assert!(!with(&[]), "curl and scripts send neither");
        assert!(!with(&[("sec-fetch-site", "same-origin")]));
        assert!(!with(&[("sec-fetch-site", "none")]));
        assert!(with(&[("sec-fetch-site", "cross-site")]));
        assert!(
            with(&[("sec-fetch-site", "same-site")]),
            "a sibling subdomain"
        );
        assert!(!with(&[
            ("origin", "http://127.0.0.1:8090"),
            ("host", "127.0.0.1:8090")
        ]));
        assert!(with(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8090")
        ]));
        assert!(with(&[("origin", "null"), ("host", "127.0.0.1:8090")]));
    }
    use axum::http::HeaderValue;

    fn headers(pairs: &[(axum::http::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn without_a_token_nothing_may_write() {
        for token in [None, Some(SecretString::from(""))] {
            let auth = Auth::new(token);
            assert!(!auth.writable());
            assert!(!auth.token_matches(""));
            let g = auth.grant(&headers(&[(AUTHORIZATION, "Bearer ")]));
            assert_eq!(g, Grant::default());
        }
    }

    #[test]
    fn the_bearer_token_grants_writes_and_a_wrong_one_does_not() {
        let auth = Auth::new(Some(SecretString::from("tok-123")));
        assert!(
            auth.grant(&headers(&[(AUTHORIZATION, "Bearer tok-123")]))
                .can_write
        );
        let wrong = auth.grant(&headers(&[(AUTHORIZATION, "Bearer tok-124")]));
        assert!(wrong.writable && !wrong.can_write);
        assert!(
            !auth
                .grant(&headers(&[(AUTHORIZATION, "tok-123")]))
                .can_write
        );
        assert!(!auth.grant(&HeaderMap::new()).can_write);
    }

    #[test]
    fn a_session_cookie_grants_writes_until_signed_out() {
        let auth = Auth::new(Some(SecretString::from("tok-123")));
        let id = auth.sign_in();
        assert_eq!(id.len(), 64);
        let cookie = format!("other=1; {SESSION_COOKIE}={id}");
        let h = headers(&[(COOKIE, &cookie)]);
        let g = auth.grant(&h);
        assert!(g.can_write && g.signed_in);
        let forged = headers(&[(COOKIE, &format!("{SESSION_COOKIE}={}", "0".repeat(64)))]);
        assert!(!auth.grant(&forged).can_write);
        auth.sign_out(&h);
        assert!(!auth.grant(&h).can_write);
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let auth = Auth::new(Some(SecretString::from("tok-secret-123")));
        assert!(!format!("{auth:?}").contains("tok-secret-123"));
    }

    #[test]
    fn the_session_cookie_is_http_only_and_same_site_strict() {
        let c = session_set_cookie("abc");
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"));
    }
}
