//! The API on TCP: TLS (rustls) around the same router the unix socket serves.
//!
//! droverd's certificate is either given (`--tls-cert/--tls-key`) or self-signed once and kept in
//! `STATE_DIR/tls/` (`cert.pem`, `key.pem`); clients pin that certificate (it is its own CA).
//! Connections are served by [`crate::serve::serve_tls`] (handshake timeout, per-address caps).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Certificate generation or the TLS configuration failed.
    #[error("TLS setup: {0}")]
    Setup(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The files droverd serves TLS with.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate chain (PEM); for a self-signed one, also what clients trust.
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

/// The host's name, for the certificate (falls back to `localhost`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The names a self-signed certificate for `listen` carries: the listen IP (unless it is a
/// wildcard), the host name, `localhost`.
pub fn wanted_sans(listen: IpAddr) -> Vec<String> {
    let mut sans = Vec::new();
    if !listen.is_unspecified() {
        sans.push(listen.to_string());
    }
    for n in [host_name(), "localhost".to_string()] {
        if !sans.contains(&n) {
            sans.push(n);
        }
    }
    sans
}

/// The self-signed certificate in `dir` (`cert.pem`, `key.pem`, 0600), created when missing or
/// when it does not name every one of `sans` (the listen address changed).
pub fn ensure_self_signed(dir: &Path, sans: &[String]) -> Result<(CertFiles, bool), TlsError> {
    let files = CertFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    let sans_file = dir.join("cert.sans");
    let have: Vec<String> = std::fs::read_to_string(&sans_file)
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default();
    if files.cert.exists() && files.key.exists() && sans.iter().all(|s| have.contains(s)) {
        return Ok((files, false));
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut params = rcgen::CertificateParams::new(sans.to_vec())
        .map_err(|e| TlsError::Setup(format!("certificate names {sans:?}: {e}")))?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("droverd {}", host_name()),
    );
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Setup(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    // The key first and private, so a crash in between never leaves a readable key.
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&files.cert, cert.pem()).map_err(io_err(&files.cert))?;
    std::fs::write(&sans_file, sans.join("\n")).map_err(io_err(&sans_file))?;
    Ok((files, true))
}

/// Write a file only its owner can read (created 0600, not chmod'ed afterwards).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    // An existing file keeps its old mode through open(); make sure it is private.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))
}

/// The SHA-256 fingerprint of the (first) certificate in `files.cert`, as
/// `openssl x509 -noout -fingerprint -sha256` prints it.
pub fn cert_fingerprint(files: &CertFiles) -> Result<String, TlsError> {
    let pem = std::fs::read(&files.cert).map_err(io_err(&files.cert))?;
    let der = CertificateDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: files.cert.clone(),
        why: e.to_string(),
    })?;
    Ok(drover_api::fingerprint(&der))
}

/// A rustls server configuration from PEM files.
pub fn server_config(files: &CertFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem_err = |path: &Path, why: String| TlsError::Pem {
        path: path.to_path_buf(),
        why,
    };
    let cert_pem = std::fs::read(&files.cert).map_err(io_err(&files.cert))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(&files.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err(&files.cert, "no certificate in it".into()));
    }
    let key_pem = std::fs::read(&files.key).map_err(io_err(&files.key))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_err(&files.key, format!("no usable private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Setup(format!("certificate and key do not fit: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What droverd does to call a peer: `drover_api::Client::https` with the peer's URL, token
    /// and certificate, against a TLS listener serving a router.
    #[tokio::test]
    async fn client_talks_to_a_tls_listener_with_a_pinned_cert() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) =
            ensure_self_signed(dir.path(), &wanted_sans("127.0.0.1".parse().unwrap())).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let app = axum::Router::new().route(
            "/v1/echo",
            axum::routing::get(|h: axum::http::HeaderMap| async move {
                axum::Json(
                    h.get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string(),
                )
            }),
        );
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(crate::serve::serve_tls(
            tcp,
            server_config(&files).unwrap(),
            app,
            crate::serve::ServeLimits::default(),
            stop,
        ));
        let url = format!("https://127.0.0.1:{port}");
        let pem = std::fs::read(&files.cert).unwrap();
        let c = drover_api::Client::https(&url, Some("drv_abc"), &pem).unwrap();
        let got: String = c.get("/v1/echo").await.unwrap();
        assert_eq!(got, "Bearer drv_abc");
        // The token never shows in Debug output (logs).
        assert!(!format!("{c:?}").contains("drv_abc"));
        // Another certificate is refused before any request is sent.
        let other = tempfile::tempdir().unwrap();
        let (of, _) = ensure_self_signed(other.path(), &["localhost".into()]).unwrap();
        let c = drover_api::Client::https(&url, Some("drv_abc"), &std::fs::read(&of.cert).unwrap())
            .unwrap();
        let err = c.get::<String>("/v1/echo").await.unwrap_err();
        assert!(matches!(err, drover_api::ClientError::Tls { .. }), "{err}");
        assert!(err.is_unreachable());
        // The trust-on-first-use fetch sees the same certificate droverd reports.
        let (_, fp) = drover_api::fetch_server_cert(&url).await.unwrap();
        assert_eq!(fp, cert_fingerprint(&files).unwrap());
    }

    #[test]
    fn self_signed_cert_is_made_once_and_remade_for_new_names() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sans = wanted_sans("10.77.0.11".parse().unwrap());
        assert_eq!(sans[0], "10.77.0.11");
        let (f, created) = ensure_self_signed(dir.path(), &sans).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&f.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = std::fs::read(&f.cert).unwrap();
        assert!(server_config(&f).is_ok());
        let (_, again) = ensure_self_signed(dir.path(), &sans).unwrap();
        assert!(!again);
        assert_eq!(std::fs::read(&f.cert).unwrap(), first);
        let (_, remade) =
            ensure_self_signed(dir.path(), &wanted_sans("10.77.0.12".parse().unwrap())).unwrap();
        assert!(remade);
        assert_ne!(std::fs::read(&f.cert).unwrap(), first);
        // Junk is refused with the file named.
        std::fs::write(&f.cert, "junk").unwrap();
        let err = server_config(&f).unwrap_err().to_string();
        assert!(err.contains("cert.pem"), "{err}");
    }
}
