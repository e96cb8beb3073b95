//! A client for droverd's API: over its unix socket (local, the caller is the peer's uid), or
//! over HTTPS to `https://HOST:PORT` with a bearer token (remote hosts, and droverd calling a
//! peer droverd). The server's certificate is checked against a PEM file the caller trusts: a
//! certificate equal to one in it is accepted as pinned (droverd's self-signed one), otherwise the
//! PEM's certificates act as CAs and the usual name checks apply.

use crate::{ApiError, ErrorCode, StreamItem};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// How long to wait for a remote host to accept a connection and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not listening.
    #[error("cannot reach droverd at {socket}: {source}. Is it running? Start it with `droverd` (or `droverd --socket {socket}`), or point the CLI elsewhere with --socket / DROVER_SOCKET")]
    Unreachable {
        /// Socket path.
        socket: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A remote droverd did not accept a connection.
    #[error("cannot reach droverd at {url}: {source}. Is it running with --listen, and is the address reachable from here?")]
    RemoteUnreachable {
        /// The remote's URL.
        url: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The remote's TLS certificate is not the trusted one (or TLS failed otherwise).
    #[error("TLS with {url} failed: {message}")]
    Tls {
        /// The remote's URL.
        url: String,
        /// What went wrong and what to check.
        message: String,
    },
    /// The remote's URL or trust settings are unusable.
    #[error("{0}")]
    Config(String),
    /// The daemon answered with an error.
    #[error("{0}")]
    Api(#[from] ApiError),
    /// The answer was not understood.
    #[error("unexpected answer from droverd: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The API error code, if the daemon gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }

    /// Whether no conversation with droverd happened at all (not listening, unreachable, or its
    /// certificate was refused), as opposed to droverd answering with an error.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. }
                | ClientError::RemoteUnreachable { .. }
                | ClientError::Tls { .. }
        )
    }
}

/// Where a [`Client`] sends requests.
#[derive(Clone)]
pub enum Endpoint {
    /// droverd's unix socket.
    Unix(PathBuf),
    /// A droverd serving HTTPS (`droverd --listen`).
    Https(Arc<Remote>),
}

/// A remote droverd: its address, bearer token and TLS trust.
pub struct Remote {
    pub(crate) url: String,
    pub(crate) authority: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    pub(crate) token: Option<String>,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Endpoint {
    // By hand, so a token never lands in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Https(r) => write!(
                f,
                "{} ({})",
                r.url,
                if r.token.is_some() {
                    "with token"
                } else {
                    "no token"
                }
            ),
        }
    }
}

/// How to reach a droverd over HTTPS: what `drover remote add` stores, and what a request can
/// carry to let one droverd call another (the token is redacted from `Debug`).
#[derive(Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RemoteSpec {
    /// `https://HOST:PORT`.
    pub url: String,
    /// The bearer token, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The certificate(s) to trust, PEM: the droverd's own self-signed one, or a CA.
    pub ca: String,
}

impl RemoteSpec {
    /// A client for it.
    pub fn client(&self) -> Result<Client, ClientError> {
        Client::https(&self.url, self.token.as_deref(), self.ca.as_bytes())
    }
}

impl std::fmt::Debug for RemoteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSpec")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_sha256", &pem_fingerprint(self.ca.as_bytes()))
            .finish()
    }
}

/// A connection factory for one droverd.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
}

/// A raw answer: status, headers, body.
pub struct RawResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Headers.
    pub headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
}

impl Client {
    /// A client for the daemon at `socket`.
    pub fn new(socket: &Path) -> Self {
        Client {
            endpoint: Endpoint::Unix(socket.to_path_buf()),
        }
    }

    /// A client for a droverd serving HTTPS at `url` (`https://HOST[:PORT]`, port 7443 by
    /// default), sending `token` as `Authorization: Bearer`, and trusting the server certificate
    /// if it is one of the certificates in `ca_pem` (pinned) or is issued by one of them.
    pub fn https(url: &str, token: Option<&str>, ca_pem: &[u8]) -> Result<Self, ClientError> {
        let (host, port) = parse_url(url)?;
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| ClientError::Config(format!("{url}: bad host name {host:?}: {e}")))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| ClientError::Config(format!("the CA file for {url} is not PEM: {e}")))?;
        if certs.is_empty() {
            return Err(ClientError::Config(format!(
                "the CA file for {url} holds no certificate (droverd's own is STATE_DIR/tls/cert.pem)"
            )));
        }
        let verifier = Arc::new(PinnedOrCa::new(certs)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Config(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        if token.is_some_and(|t| t.is_empty() || t.chars().any(|c| c.is_whitespace())) {
            return Err(ClientError::Config(format!(
                "the token for {url} is empty or contains white space"
            )));
        }
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Client {
            endpoint: Endpoint::Https(Arc::new(Remote {
                url: format!("https://{authority}"),
                authority,
                host,
                port,
                server_name,
                token: token.map(str::to_string),
                tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            })),
        })
    }

    /// [`Client::https`] with the token and the trusted certificates read from files.
    pub fn https_from_files(
        url: &str,
        token_file: Option<&Path>,
        ca_file: &Path,
    ) -> Result<Self, ClientError> {
        let read = |p: &Path| {
            std::fs::read(p)
                .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", p.display())))
        };
        let token = token_file
            .map(|p| read(p).map(|b| String::from_utf8_lossy(&b).trim().to_string()))
            .transpose()?;
        Client::https(url, token.as_deref(), &read(ca_file)?)
    }

    /// Where requests go.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The socket path, for a local client.
    pub fn socket(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Unix(p) => Some(p),
            Endpoint::Https(_) => None,
        }
    }

    /// The remote's URL (`https://HOST:PORT`), for a remote client.
    pub fn url(&self) -> Option<&str> {
        match &self.endpoint {
            Endpoint::Unix(_) => None,
            Endpoint::Https(r) => Some(&r.url),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        self.send_typed(method, path, body, "application/json")
            .await
    }

    async fn send_typed(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &str,
    ) -> Result<RawResponse, ClientError> {
        let has_body = body.is_some();
        let mut req = Request::builder().method(method).uri(path);
        if has_body {
            req = req.header("content-type", content_type);
        }
        match &self.endpoint {
            Endpoint::Unix(socket) => {
                let stream = UnixStream::connect(socket).await.map_err(|source| {
                    ClientError::Unreachable {
                        socket: socket.clone(),
                        source,
                    }
                })?;
                let req = req
                    .header("host", "droverd")
                    .body(Full::new(Bytes::from(body.unwrap_or_default())))
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                exchange(stream, req).await
            }
            Endpoint::Https(r) => {
                let stream = r.connect().await?;
                req = req.header("host", &r.authority);
                if let Some(t) = &r.token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let req = req
                    .body(Full::new(Bytes::from(body.unwrap_or_default())))
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                exchange(stream, req).await
            }
        }
    }

    async fn collect(
        raw: RawResponse,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ClientError> {
        let body = raw
            .body
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(format!("reading answer: {e}")))?
            .to_bytes();
        Ok((raw.status, raw.headers, body))
    }

    pub(crate) fn error_from(status: StatusCode, body: &[u8]) -> ClientError {
        match serde_json::from_slice::<ApiError>(body) {
            Ok(e) => ClientError::Api(e),
            Err(_) => ClientError::Protocol(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(500)])
            )),
        }
    }

    /// Send a JSON request and decode a JSON answer.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let raw = self.send(method, path, body).await?;
        let (status, _, bytes) = Self::collect(raw).await?;
        if !status.is_success() {
            return Err(Self::error_from(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Protocol(format!(
                "{e} in {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))
        })
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    /// POST a JSON body and decode.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// GET raw bytes and the headers.
    pub async fn get_bytes(&self, path: &str) -> Result<(hyper::HeaderMap, Bytes), ClientError> {
        let raw = self.send(Method::GET, path, None).await?;
        let (status, headers, bytes) = Self::collect(raw).await?;
        if !status.is_success() {
            return Err(Self::error_from(status, &bytes));
        }
        Ok((headers, bytes))
    }

    /// PUT raw bytes and decode a JSON answer.
    pub async fn put_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        bytes: Vec<u8>,
    ) -> Result<T, ClientError> {
        let raw = self
            .send_typed(Method::PUT, path, Some(bytes), "application/octet-stream")
            .await?;
        let (status, _, body) = Self::collect(raw).await?;
        if !status.is_success() {
            return Err(Self::error_from(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// POST and read an NDJSON stream of [`StreamItem`]s, reporting progress as it comes.
    pub async fn post_stream<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        mut progress: impl FnMut(&str),
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let raw = self.send(Method::POST, path, Some(body)).await?;
        let mut outcome = None;
        Self::each_line(raw, |item: StreamItem<T>| match item {
            StreamItem::Progress(p) => {
                progress(&p);
                true
            }
            StreamItem::Result(t) => {
                outcome = Some(Ok(t));
                false
            }
            StreamItem::Error(e) => {
                outcome = Some(Err(ClientError::Api(e)));
                false
            }
        })
        .await?;
        outcome.unwrap_or_else(|| {
            Err(ClientError::Protocol(
                "the stream ended without a result".into(),
            ))
        })
    }

    /// GET an NDJSON stream, handing each line, decoded, to `each` as it arrives, until the
    /// stream ends or `each` returns `false`.
    pub async fn get_lines<T: DeserializeOwned>(
        &self,
        path: &str,
        each: impl FnMut(T) -> bool,
    ) -> Result<(), ClientError> {
        let raw = self.send(Method::GET, path, None).await?;
        Self::each_line(raw, each).await
    }

    /// Decode an answer's NDJSON lines one by one (an error status is the API's error); a line
    /// longer than [`MAX_STREAM_LINE`] is refused.
    async fn each_line<T: DeserializeOwned>(
        mut raw: RawResponse,
        mut each: impl FnMut(T) -> bool,
    ) -> Result<(), ClientError> {
        if !raw.status.is_success() {
            let (status, _, bytes) = Self::collect(raw).await?;
            return Err(Self::error_from(status, &bytes));
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = raw.body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(format!("reading stream: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let item: T = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Protocol(format!("bad stream line: {e}")))?;
                if !each(item) {
                    return Ok(());
                }
            }
            if buf.len() > MAX_STREAM_LINE {
                return Err(ClientError::Protocol(format!(
                    "a stream line is longer than {MAX_STREAM_LINE} bytes"
                )));
            }
        }
        Ok(())
    }
}

/// The longest line [`Client::get_lines`] takes.
pub const MAX_STREAM_LINE: usize = 1 << 20;

/// One HTTP/1 request on a fresh connection.
async fn exchange<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<RawResponse, ClientError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Protocol(format!("request failed: {e}")))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    Ok(RawResponse {
        status,
        headers,
        body: resp.into_body(),
    })
}

impl Remote {
    pub(crate) async fn connect(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
        let unreachable = |source| ClientError::RemoteUnreachable {
            url: self.url.clone(),
            source,
        };
        let timed_out = || {
            unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
            ))
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(unreachable)?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.tls.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| timed_out())?;
        tls.map_err(|e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(c)) => ClientError::Tls {
                url: self.url.clone(),
                message: format!(
                    "the server's certificate is not trusted ({c:?}): it is neither in the CA file given for this remote nor issued by one in it. Use the server's STATE_DIR/tls/cert.pem as --ca-file"
                ),
            },
            Some(other) => ClientError::Tls {
                url: self.url.clone(),
                message: other.to_string(),
            },
            None => unreachable(e),
        })
    }
}

/// The certificate a droverd at `url` presents, as PEM, and its SHA-256 fingerprint
/// (`AA:BB:...`, as `openssl x509 -noout -fingerprint -sha256` prints it).
///
/// Nothing is verified: this is for trust on first use (`drover remote add` without
/// `--ca-file`), where a person compares the fingerprint with the one on the server.
pub async fn fetch_server_cert(url: &str) -> Result<(String, String), ClientError> {
    let (host, port) = parse_url(url)?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| ClientError::Config(format!("{url}: bad host name {host:?}: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let seen = Arc::new(AcceptAndKeep {
        algs: provider.signature_verification_algorithms,
        cert: std::sync::Mutex::new(None),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(seen.clone())
        .with_no_client_auth();
    let unreachable = |source| ClientError::RemoteUnreachable {
        url: url.to_string(),
        source,
    };
    let connect = async {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(unreachable)?;
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(server_name, tcp)
            .await
            .map_err(|e| ClientError::Tls {
                url: url.to_string(),
                message: e.to_string(),
            })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
            unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
            ))
        })??;
    let der = seen
        .cert
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or_else(|| ClientError::Protocol("the server presented no certificate".into()))?;
    Ok((pem_encode(&der), fingerprint(&der)))
}

/// SHA-256 of a DER certificate as colon-separated upper-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The fingerprint ([`fingerprint`]) of the first certificate in a PEM text, if it has one.
pub fn pem_fingerprint(pem: &[u8]) -> Option<String> {
    CertificateDer::from_pem_slice(pem)
        .ok()
        .map(|c| fingerprint(c.as_ref()))
}

fn pem_encode(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

/// Accepts any certificate and keeps it (trust on first use); signatures are still checked, so
/// the peer holds the key of the certificate it showed.
#[derive(Debug)]
struct AcceptAndKeep {
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
    cert: std::sync::Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for AcceptAndKeep {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.cert.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// `https://HOST[:PORT][/]` → host and port.
fn parse_url(url: &str) -> Result<(String, u16), ClientError> {
    let bad = |why: &str| {
        ClientError::Config(format!(
            "bad remote URL {url:?}: {why} (expected https://HOST:PORT)"
        ))
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("only https:// is served"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('@') || rest.is_empty() {
        return Err(bad("give only a host and a port"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            ),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None => 7443,
        Some(p) => p.parse().map_err(|_| bad("bad port"))?,
    };
    Ok((host.to_string(), port))
}

/// Accepts a server certificate that equals a pinned one, else verifies it against the same
/// certificates as CAs (so a CA-issued droverd certificate also works).
#[derive(Debug)]
struct PinnedOrCa {
    pins: Vec<CertificateDer<'static>>,
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl PinnedOrCa {
    fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        // A self-signed leaf may not parse as a trust anchor; then it can only be pinned.
        let (_added, _skipped) = roots.add_parsable_certificates(certs.iter().cloned());
        let webpki = if roots.is_empty() {
            None
        } else {
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .ok()
        };
        Ok(PinnedOrCa {
            pins: certs,
            webpki,
            algs: provider.signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for PinnedOrCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pins.iter().any(|p| p.as_ref() == end_entity.as_ref()) {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.webpki {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_url("https://10.77.0.12:7443").unwrap(),
            ("10.77.0.12".into(), 7443)
        );
        assert_eq!(
            parse_url("https://host.example/").unwrap(),
            ("host.example".into(), 7443)
        );
        assert_eq!(parse_url("https://[::1]:99").unwrap(), ("::1".into(), 99));
        for bad in [
            "http://h:1",
            "h:1",
            "https://",
            "https://h:x",
            "https://h:1/v1",
            "https://u@h:1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn https_client_needs_a_certificate_and_a_clean_token() {
        let err = Client::https("https://h:1", Some("t"), b"not pem").unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        assert!(matches!(
            Client::https("https://h:1", Some("a b"), b""),
            Err(ClientError::Config(_))
        ));
    }
}
