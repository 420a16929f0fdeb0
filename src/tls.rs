//! TLS to PostgreSQL and Redis (rustls): which certificate authorities a server's certificate
//! is checked against, and how a PostgreSQL URL's `sslmode` is read.
//!
//! - PostgreSQL: `sslmode` in `database.url` is honoured: `disable` (plain), `prefer` (the
//!   default: TLS when the server offers it), `require`, and libpq's `verify-ca` and
//!   `verify-full` (read as `require`). Whenever TLS is used the server's certificate is
//!   verified, host name included, against `database.ca_file` (a PEM bundle) or, without one,
//!   the system's roots: icmp never accepts an unverified certificate, which makes `require`
//!   as strict as libpq's `verify-full`.
//! - Redis: a `rediss://` URL uses TLS, verified against `redis.ca_file` or the system's roots.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// Makes the process's rustls crypto provider explicit (once), so that every library building
/// a rustls configuration agrees on it.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The PEM certificates of a CA file.
///
/// # Errors
/// An unreadable file or one without certificates.
pub fn read_ca_file(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |reason: String| TlsError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The roots a server certificate is checked against: the CA file's, else the system's.
///
/// # Errors
/// A bad CA file; no usable system roots.
pub fn roots(ca_file: &str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    if ca_file.is_empty() {
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = store.add_parsable_certificates(native.certs);
        if added == 0 {
            return Err(TlsError::Setup(
                "no system root certificates found; set a CA file".into(),
            ));
        }
    } else {
        for cert in read_ca_file(ca_file)? {
            store.add(cert).map_err(|e| TlsError::CaFile {
                path: ca_file.to_owned(),
                reason: e.to_string(),
            })?;
        }
    }
    Ok(store)
}

/// The TLS connector for PostgreSQL connections.
///
/// # Errors
/// A bad CA file.
pub fn postgres_connector(
    ca_file: &str,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, TlsError> {
    install_provider();
    let roots = match roots(ca_file) {
        Ok(r) => r,
        // Without system roots a plain (`sslmode=disable` or `prefer` to a server without TLS)
        // connection still works; a TLS one then fails verification with a clear error.
        Err(TlsError::Setup(_)) => RootCertStore::empty(),
        Err(e) => return Err(e),
    };
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `sslmode` values libpq accepts that tokio-postgres does not, mapped onto its own (the
/// certificate is verified in every TLS mode, see the module docs).
pub fn postgres_url(url: &str) -> String {
    url.replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require")
        .replace("sslmode=allow", "sslmode=prefer")
}

/// The Redis client for a URL: `rediss://` with the CA file's roots when one is set.
///
/// # Errors
/// An invalid URL or CA file.
pub fn redis_client(url: &str, ca_file: &str) -> Result<redis::Client, redis::RedisError> {
    match redis_certificates(url, ca_file)? {
        None => redis::Client::open(url),
        Some(certs) => redis::Client::build_with_tls(url, certs),
    }
}

/// The roots a `rediss://` URL is checked against when `ca_file` is set (`None`: a plain URL,
/// or the system's roots).
///
/// # Errors
/// A CA file that cannot be read.
pub fn redis_certificates(
    url: &str,
    ca_file: &str,
) -> Result<Option<redis::TlsCertificates>, redis::RedisError> {
    install_provider();
    if ca_file.is_empty() || !url.starts_with("rediss://") {
        return Ok(None);
    }
    let root_cert = std::fs::read(ca_file).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "redis.ca_file cannot be read",
            e.to_string(),
        ))
    })?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_ssl_modes_are_read() {
        let u = |m: &str| postgres_url(&format!("postgres://a@h/db?sslmode={m}"));
        assert_eq!(u("verify-full"), "postgres://a@h/db?sslmode=require");
        assert_eq!(u("verify-ca"), "postgres://a@h/db?sslmode=require");
        assert_eq!(u("allow"), "postgres://a@h/db?sslmode=prefer");
        assert_eq!(u("disable"), "postgres://a@h/db?sslmode=disable");
        for m in [
            "verify-full",
            "verify-ca",
            "allow",
            "require",
            "prefer",
            "disable",
        ] {
            assert!(
                <tokio_postgres::Config as std::str::FromStr>::from_str(&u(m)).is_ok(),
                "{m} must parse"
            );
        }
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_path() {
        let path = std::env::temp_dir().join(format!("icmp-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&path, "not a certificate").expect("write");
        let err = read_ca_file(path.to_str().expect("utf-8")).expect_err("refused");
        assert!(err.to_string().contains("icmp-ca-"), "{err}");
        let _ = std::fs::remove_file(&path);
        assert!(read_ca_file("/nonexistent/ca.pem").is_err());
    }
}
