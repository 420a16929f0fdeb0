//! TLS to PostgreSQL and Redis (rustls): which certificate authorities a server's certificate
//! is checked against, and how a PostgreSQL URL's `sslmode` is read.
//!
//! - PostgreSQL: `sslmode` in `database.url` means what it means to libpq: `disable` (plain),
//!   `allow`/`prefer` (the default: TLS when the server offers it) and `require` encrypt
//!   without verifying the server's certificate, unless a root certificate is given
//!   (`database.ca_file`), which they then check the chain against (as `verify-ca`);
//!   `verify-ca` checks the chain against `database.ca_file` or the system's roots, and
//!   `verify-full` the host name too. So a server with a self-signed certificate (Citus's,
//!   Debian's "snakeoil") is reached as psql reaches it, and `verify-full` is what protects
//!   against a server that is not the one named.
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

/// How much of a PostgreSQL server's certificate is checked (libpq's `sslmode`, with its
/// root certificate rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgVerification {
    /// Encrypted, not verified (`prefer`/`require` without a root certificate).
    None,
    /// The chain, not the host name (`verify-ca`; `prefer`/`require` with a root certificate).
    Chain,
    /// The chain and the host name (`verify-full`).
    Full,
}

impl PgVerification {
    /// What `url`'s `sslmode` asks for, given whether `database.ca_file` is set.
    pub fn of(url: &str, ca_file: &str) -> PgVerification {
        let mode = url
            .split(['?', '&', ' '])
            .find_map(|part| part.trim().strip_prefix("sslmode="))
            .unwrap_or("prefer");
        match mode {
            "verify-full" => PgVerification::Full,
            "verify-ca" => PgVerification::Chain,
            _ if !ca_file.is_empty() => PgVerification::Chain,
            _ => PgVerification::None,
        }
    }
}

/// The TLS connector for PostgreSQL connections of `url` (its `sslmode`, see the module docs).
///
/// # Errors
/// A bad CA file.
pub fn postgres_connector(
    url: &str,
    ca_file: &str,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, TlsError> {
    install_provider();
    let verification = PgVerification::of(url, ca_file);
    let roots = match roots(ca_file) {
        Ok(r) => r,
        // Without system roots a plain (`sslmode=disable` or `prefer` to a server without TLS)
        // or an unverified connection still works; a verified one then fails with a clear error.
        Err(TlsError::Setup(_)) => RootCertStore::empty(),
        Err(e) => return Err(e),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let config = match verification {
        PgVerification::Full => builder.with_root_certificates(Arc::new(roots)),
        PgVerification::Chain | PgVerification::None => {
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build();
            let verifier = Lenient {
                chain: match verification {
                    PgVerification::Chain => webpki.ok(),
                    _ => None,
                },
                provider,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        }
    }
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A certificate check short of libpq's `verify-full`: the chain alone (`chain`), or nothing;
/// the handshake's signatures are always checked (the connection is encrypted to whoever holds
/// the certificate's key).
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let Some(chain) = &self.chain else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            // `verify-ca`: any name, as long as the chain holds.
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        match rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms) {
            // Nothing of the certificate is checked but its key, which webpki reads only from
            // a v3 certificate: a v1 certificate (Citus's own self-signed one, which libpq
            // accepts under `prefer` and `require`) has its key read here, and the handshake's
            // signature checked with it all the same.
            Err(e) if self.chain.is_none() => match subject_public_key(cert) {
                Some(key) => rustls::crypto::verify_tls13_signature_with_raw_key(
                    message, &key, dss, algorithms,
                ),
                None => Err(e),
            },
            other => other,
        }
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The DER of a certificate's subject public key, whatever its version (`None` when it is not
/// a certificate).
fn subject_public_key(
    cert: &CertificateDer<'_>,
) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'static>> {
    use x509_cert::der::{Decode, Encode};
    let parsed = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    let key = parsed
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .ok()?;
    Some(key.into())
}

/// `sslmode` values libpq accepts that tokio-postgres does not, mapped onto its own (what is
/// verified is the connector's part, see [`postgres_connector`]).
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
        // What each mode verifies, as libpq: a root certificate turns prefer/require into a
        // chain check; verify-full adds the host name.
        let v = PgVerification::of;
        assert_eq!(v("postgres://a@h/db", ""), PgVerification::None);
        assert_eq!(
            v("postgres://a@h/db?sslmode=require", ""),
            PgVerification::None
        );
        assert_eq!(
            v("postgres://a@h/db?sslmode=prefer&x=1", "ca.pem"),
            PgVerification::Chain
        );
        assert_eq!(
            v("postgres://a@h/db?x=1&sslmode=verify-ca", ""),
            PgVerification::Chain
        );
        assert_eq!(v("host=h sslmode=verify-full", ""), PgVerification::Full);
        assert_eq!(
            v("postgres://a@h/db?sslmode=verify-full", "ca.pem"),
            PgVerification::Full
        );
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
