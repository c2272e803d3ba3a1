//! Opening a connection to a peer: TCP (bounded by proxy_connect_timeout), TLS when the URL is
//! https, then hyper's HTTP/1 client handshake; the connection task runs on the worker's
//! LocalSet. Errors come back in nginx's error-log words.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::body::UpBody;
use super::conf::ProxySsl;

/// A plain or TLS upstream stream.
pub enum Io {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, b),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why a connection could not be made.
pub struct ConnectError {
    pub timeout: bool,
    /// nginx's words, e.g. `connect() failed (111: Connection refused)`.
    pub msg: String,
}

/// TLS parameters of one connection.
pub struct TlsParams<'a> {
    pub ssl: &'a ProxySsl,
    /// SNI to send (`proxy_ssl_server_name on`).
    pub sni: Option<&'a str>,
    /// The name the certificate must match when verifying.
    pub verify_name: &'a str,
}

/// nginx's `(errno: text)` for an OS error.
pub fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let s = e.to_string();
            let text = s.split(" (os error").next().unwrap_or(&s).to_string();
            format!("({}: {})", n, text)
        }
        None => format!("({})", e),
    }
}

/// Connect and handshake. The returned sender is ready for a first request.
pub async fn open(
    addr: SocketAddr,
    tls: Option<TlsParams<'_>>,
    connect_timeout: Duration,
) -> Result<SendRequest<UpBody>, ConnectError> {
    let work = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| ConnectError {
            timeout: e.raw_os_error() == Some(libc::ETIMEDOUT),
            msg: format!("connect() failed {}", errno_text(&e)),
        })?;
        let _ = tcp.set_nodelay(true);
        let io = match tls {
            None => Io::Tcp(tcp),
            Some(t) => {
                let s = tls_connect(tcp, &t).await.map_err(|e| ConnectError {
                    timeout: false,
                    msg: e,
                })?;
                Io::Tls(Box::new(s))
            }
        };
        Ok(io)
    };
    let io = match tokio::time::timeout(connect_timeout, work).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ConnectError {
                timeout: true,
                msg: "upstream timed out (110: Connection timed out)".to_string(),
            })
        }
    };
    let (tx, conn) = http1::Builder::new()
        .handshake::<_, UpBody>(TokioIo::new(io))
        .await
        .map_err(|e| ConnectError {
            timeout: false,
            msg: format!("handshake failed ({})", e),
        })?;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("upstream connection: {}", e);
        }
    });
    Ok(tx)
}

/// TLS handshake with the location's settings (rustls; configs are kept per settings block so
/// sessions resume across pooled connections).
async fn tls_connect(
    tcp: TcpStream,
    t: &TlsParams<'_>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let cfg = t
        .ssl
        .client_config
        .get_or_init(|| client_config(t.ssl))
        .clone()?;
    let name = rustls::pki_types::ServerName::try_from(t.verify_name.to_string())
        .map_err(|_| format!("invalid upstream SSL name \"{}\"", t.verify_name))?;
    let cfg = if t.sni.is_none() && cfg.enable_sni {
        let mut c = (*cfg).clone();
        c.enable_sni = false;
        Arc::new(c)
    } else {
        cfg
    };
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| {
            if e.to_string().contains("certificate") {
                format!("upstream SSL certificate verify error: ({})", e)
            } else {
                format!("SSL_do_handshake() failed ({})", e)
            }
        })
}

fn client_config(ssl: &ProxySsl) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if ssl.verify {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(p) = &ssl.trusted {
            let certs = CertificateDer::pem_file_iter(p)
                .map_err(|e| format!("cannot load \"{}\": {}", p.display(), e))?;
            for c in certs {
                let c = c.map_err(|e| format!("cannot load \"{}\": {}", p.display(), e))?;
                roots.add(c).map_err(|e| e.to_string())?;
            }
        }
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    };
    let mut cfg = match (&ssl.certificate, &ssl.certificate_key) {
        (Some(c), Some(k)) => {
            let chain = CertificateDer::pem_file_iter(c)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot load certificate \"{}\": {}", c.display(), e))?;
            let key = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| format!("cannot load certificate key \"{}\": {}", k.display(), e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.enable_sni = ssl.server_name;
    Ok(Arc::new(cfg))
}

/// `proxy_ssl_verify off` (nginx's default): any certificate is accepted, signatures still
/// checked so the handshake is sound.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
