//! TLS on both legs: the stream types the data plane reads and writes (plain
//! TCP or TLS, chosen per connection), the client leg's acceptor (built from
//! `[proxy] tls_cert`/`tls_key`, rebuilt on SIGHUP) and the server leg's
//! negotiation (`[backends.*] server_tls`, like libpq's `sslmode`).
//!
//! The streams are enums, not trait objects: a plain connection costs one
//! match per poll and keeps the TcpStream's own readiness API (which the
//! session loop uses to hold no buffer for idle clients); the TLS state is
//! boxed so that plain connections don't carry its size.

use std::fmt;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    ClientConfig, ConnectionCommon, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{BackendConfig, ClientTlsMode, ProxyConfig, ServerTlsMode};
use crate::protocol::framing::SSL_REQUEST_CODE;

/// The ALPN protocol PostgreSQL 17 registers and requires for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The first byte of a TLS record carrying a handshake (a ClientHello): what a
/// PostgreSQL 17 client sends first with `sslnegotiation=direct`.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: no certificate found (expected a PEM \"BEGIN CERTIFICATE\" block)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key found (expected a PEM PKCS#8, PKCS#1 or SEC1 key)")]
    NoKey { path: PathBuf },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    #[error("the server does not support TLS (server_tls = \"{0}\")")]
    NotSupportedByServer(ServerTlsMode),
    #[error("unexpected answer {0:#04x} to SSLRequest")]
    BadAnswer(u8),
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            message: format!("malformed PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            message: format!("malformed PEM: {e}"),
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_owned(),
        })
}

// ------------------------------------------------------------------ streams

/// A connection that is plain TCP or TLS over TCP.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// The client leg (pgswitch is the TLS server).
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
/// The server leg (pgswitch is the TLS client).
pub type ServerStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// What both tokio-rustls stream types offer beyond AsyncRead/AsyncWrite.
pub trait TlsLayer {
    fn tcp(&self) -> &TcpStream;
    /// Writes `last` and a close_notify without waiting: whatever the socket
    /// takes now. For drop paths that can't await.
    fn close_now(&mut self, last: &[u8]);
}

/// `io::Write` over a TcpStream's non-blocking `try_write`.
struct TryWriter<'a>(&'a TcpStream);

impl Write for TryWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn close_now<D>(tcp: &TcpStream, conn: &mut ConnectionCommon<D>, last: &[u8]) {
    if !last.is_empty() {
        let _ = conn.writer().write_all(last);
    }
    conn.send_close_notify();
    let mut out = TryWriter(tcp);
    while conn.wants_write() {
        match conn.write_tls(&mut out) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

impl TlsLayer for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
    fn close_now(&mut self, last: &[u8]) {
        let (tcp, conn) = self.get_mut();
        close_now(tcp, conn, last);
    }
}

impl TlsLayer for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
    fn close_now(&mut self, last: &[u8]) {
        let (tcp, conn) = self.get_mut();
        close_now(tcp, conn, last);
    }
}

impl<T: TlsLayer> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.tcp(),
        }
    }

    /// Best-effort goodbye without waiting: `last` (e.g. a Terminate message)
    /// and, on TLS, a close_notify; the socket closes on drop.
    pub fn close_now(&mut self, last: &[u8]) {
        match self {
            MaybeTls::Plain(s) => {
                if !last.is_empty() {
                    let _ = s.try_write(last);
                }
            }
            MaybeTls::Tls(s) => s.close_now(last),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    /// On TLS, sends the records that a write left buffered when the socket
    /// was full. Writers must flush before they wait for the peer.
    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(_) => Poll::Ready(Ok(())),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

// --------------------------------------------------------------- client leg

/// The client leg's TLS settings, rebuilt from the configuration on reload.
pub struct ClientTls {
    pub mode: ClientTlsMode,
    /// Present unless `client_tls = "disable"`.
    pub acceptor: Option<TlsAcceptor>,
}

impl ClientTls {
    /// Reads the certificate and key (if configured) and builds the acceptor.
    pub fn load(proxy: &ProxyConfig) -> Result<ClientTls, TlsError> {
        let mode = proxy.client_tls_mode();
        let (Some(cert), Some(key), false) = (
            &proxy.tls_cert,
            &proxy.tls_key,
            mode == ClientTlsMode::Disable,
        ) else {
            return Ok(ClientTls {
                mode: ClientTlsMode::Disable,
                acceptor: None,
            });
        };
        let certs = load_certs(cert)?;
        let key = load_key(key)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Invalid {
                path: cert.clone(),
                message: format!("certificate and key don't make a usable pair: {e}"),
            })?;
        // A client that offers ALPN must offer "postgresql" (rustls refuses the
        // handshake otherwise, as PostgreSQL 17 does); direct TLS additionally
        // requires it to be offered at all, which the handshake code checks.
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(ClientTls {
            mode,
            acceptor: Some(TlsAcceptor::from(Arc::new(config))),
        })
    }

    /// For the startup log line.
    pub fn describe(&self) -> &'static str {
        match self.mode {
            ClientTlsMode::Disable => "disabled",
            ClientTlsMode::Allow => "allowed",
            ClientTlsMode::Require => "required",
        }
    }
}

// --------------------------------------------------------------- server leg

/// How pgswitch reaches one backend over TLS (fixed at startup).
#[derive(Clone)]
pub struct ServerTls {
    pub mode: ServerTlsMode,
    connector: Option<TlsConnector>,
    name: ServerName<'static>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .field("name", &self.name)
            .finish()
    }
}

impl ServerTls {
    /// No TLS: what `server_tls = "disable"` gives.
    pub fn disabled() -> ServerTls {
        ServerTls {
            mode: ServerTlsMode::Disable,
            connector: None,
            name: ServerName::IpAddress(Ipv4Addr::UNSPECIFIED.into()),
        }
    }

    pub fn load(backend: &BackendConfig) -> Result<ServerTls, TlsError> {
        let mode = backend.server_tls;
        if mode == ServerTlsMode::Disable {
            return Ok(ServerTls::disabled());
        }
        let provider = provider();
        let name = ServerName::try_from(backend.host.clone());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(VERSIONS)
            .map_err(TlsError::Setup)?;
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            ServerTlsMode::Disable => unreachable!("handled above"),
            ServerTlsMode::Prefer | ServerTlsMode::Require => Arc::new(RelaxedVerifier {
                roots: None,
                algorithms: provider.signature_verification_algorithms,
            }),
            ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull => {
                let path = backend.server_tls_ca.as_deref().ok_or_else(|| {
                    TlsError::Setup(rustls::Error::General(format!(
                        "server_tls = \"{mode}\" needs server_tls_ca"
                    )))
                })?;
                let mut roots = RootCertStore::empty();
                for cert in load_certs(path)? {
                    roots.add(cert).map_err(|e| TlsError::Invalid {
                        path: path.to_owned(),
                        message: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                let roots = Arc::new(roots);
                if mode == ServerTlsMode::VerifyFull {
                    rustls::client::WebPkiServerVerifier::builder_with_provider(
                        roots,
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| TlsError::Invalid {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?
                } else {
                    Arc::new(RelaxedVerifier {
                        roots: Some(roots),
                        algorithms: provider.signature_verification_algorithms,
                    })
                }
            }
        };
        let name = match name {
            Ok(name) => name,
            Err(_) if mode == ServerTlsMode::VerifyFull => {
                return Err(TlsError::Setup(rustls::Error::General(format!(
                    "server_tls = \"verify-full\": {:?} is neither a DNS name nor an IP address",
                    backend.host
                ))))
            }
            // Not a name SNI can carry; nothing is verified against it.
            Err(_) => ServerName::IpAddress(Ipv4Addr::UNSPECIFIED.into()),
        };
        let mut config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(ServerTls {
            mode,
            connector: Some(TlsConnector::from(Arc::new(config))),
            name,
        })
    }

    /// Negotiates TLS on a fresh connection per `server_tls`: SSLRequest, then
    /// the handshake on 'S'; on 'N', plaintext for `prefer` and an error for
    /// the stricter modes.
    pub async fn negotiate(&self, mut tcp: TcpStream) -> Result<ServerStream, TlsError> {
        let Some(connector) = &self.connector else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let mut request = [0u8; 8];
        request[..4].copy_from_slice(&8i32.to_be_bytes());
        request[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        tcp.write_all(&request).await?;
        // Exactly one byte: anything after it must come encrypted.
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let tls = connector
                    .connect(self.name.clone(), tcp)
                    .await
                    .map_err(TlsError::Handshake)?;
                Ok(MaybeTls::Tls(Box::new(tls)))
            }
            b'N' if self.mode == ServerTlsMode::Prefer => Ok(MaybeTls::Plain(tcp)),
            b'N' => Err(TlsError::NotSupportedByServer(self.mode)),
            other => Err(TlsError::BadAnswer(other)),
        }
    }
}

/// The verifiers libpq's weaker modes need. Handshake signatures are always
/// verified, so the connection is bound to the certificate's key.
/// `roots: None` is `server_tls = "require"` (and `prefer`): encrypts but
/// doesn't check who the server is. `Some(roots)` is `verify-ca`: the chain
/// must lead to `server_tls_ca`; the host name is not checked.
#[derive(Debug)]
struct RelaxedVerifier {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for RelaxedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
