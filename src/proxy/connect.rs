//! Opening a connection to a peer: TCP (bounded by proxy_connect_timeout), then TLS when the
//! URL is https. The HTTP/1 exchange on it is h1.rs's. Errors come back in nginx's error-log
//! words.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::conf::ProxySsl;

/// A plain or TLS upstream stream.
pub enum Io {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// `proxy_send_timeout`: a write that makes no progress for this long fails the connection,
/// as nginx's timer between two successive writes. Each request on a kept-alive connection
/// sets its own limit.
pub struct Timed {
    io: Io,
    pub limit: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Timed {
    /// The TCP connection under it (for readiness checks that need no system call).
    pub fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::Tcp(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }

    fn wrote<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stall = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "proxy_send_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Timed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Timed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.io).poll_write(cx, b);
        me.wrote(cx, r)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.io).poll_flush(cx);
        me.wrote(cx, r)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
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

/// Connect (and TLS handshake): a stream ready for a first request.
pub async fn open(
    addr: SocketAddr,
    tls: Option<TlsParams<'_>>,
    connect_timeout: Duration,
    send_timeout: Duration,
) -> Result<Timed, ConnectError> {
    let work = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| ConnectError {
            timeout: e.raw_os_error() == Some(libc::ETIMEDOUT),
            msg: format!(
                "connect() failed {} while connecting to upstream",
                errno_text(&e)
            ),
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
    let io =
        match tokio::time::timeout(connect_timeout, work).await {
            Ok(r) => r?,
            Err(_) => return Err(ConnectError {
                timeout: true,
                msg: "upstream timed out (110: Connection timed out) while connecting to upstream"
                    .to_string(),
            }),
        };
    Ok(Timed {
        io,
        limit: send_timeout,
        stall: None,
    })
}

/// TLS handshake with the location's settings through `net::tls` (configs are cached per
/// settings block, so sessions resume across pooled connections). Errors in nginx's words.
async fn tls_connect(
    tcp: TcpStream,
    t: &TlsParams<'_>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let cfg = t
        .ssl
        .client_config
        .get_or_init(|| {
            crate::net::tls::client_config(&crate::net::ClientTls {
                verify: t.ssl.verify,
                trusted: t.ssl.trusted.clone(),
                verify_depth: t.ssl.verify_depth,
                cert: t.ssl.certificate.clone().zip(t.ssl.certificate_key.clone()),
            })
        })
        .clone()?;
    crate::net::tls::connect(tcp, cfg, t.sni, t.verify_name)
        .await
        .map_err(|e| {
            if e.contains("host mismatch") {
                format!(
                    "upstream SSL certificate does not match \"{}\" while SSL handshaking to upstream",
                    t.verify_name
                )
            } else if e.starts_with(|c: char| c.is_ascii_digit()) {
                format!(
                    "upstream SSL certificate verify error: ({}) while SSL handshaking to upstream",
                    e
                )
            } else {
                format!("SSL_do_handshake() failed ({}) while SSL handshaking to upstream", e)
            }
        })
}
