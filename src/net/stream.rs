//! One outbound byte stream (TCP, unix socket, or TLS over either) behind one type, so pools
//! and cosockets need not care which.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

/// A connected outbound stream.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    TlsTcp(Box<TlsStream<TcpStream>>),
    TlsUnix(Box<TlsStream<UnixStream>>),
}

impl Stream {
    /// The socket's descriptor (for socket options and liveness checks).
    pub fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::TlsTcp(s) => s.get_ref().0.as_raw_fd(),
            Stream::TlsUnix(s) => s.get_ref().0.as_raw_fd(),
        }
    }

    pub fn borrowed_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
            Stream::TlsTcp(s) => s.get_ref().0.as_fd(),
            Stream::TlsUnix(s) => s.get_ref().0.as_fd(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::TlsTcp(_) | Stream::TlsUnix(_))
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self, Stream::Tcp(_) | Stream::TlsTcp(_))
    }

    /// Run the TLS client handshake over this (plain) stream.
    pub async fn into_tls(
        self,
        cfg: std::sync::Arc<rustls::ClientConfig>,
        sni: Option<&str>,
        verify_name: &str,
    ) -> Result<Stream, String> {
        match self {
            Stream::Tcp(s) => Ok(Stream::TlsTcp(Box::new(
                super::tls::connect(s, cfg, sni, verify_name).await?,
            ))),
            Stream::Unix(s) => Ok(Stream::TlsUnix(Box::new(
                super::tls::connect(s, cfg, sni, verify_name).await?,
            ))),
            _ => Err("ssl handshake already done".to_string()),
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
            Stream::TlsTcp($s) => $e,
            Stream::TlsUnix($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, b))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, b))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::TlsTcp(s) => s.is_write_vectored(),
            Stream::TlsUnix(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// OpenResty's words for an I/O error: `strerror()` in lower case ("connection refused",
/// "connection reset by peer", "broken pipe"), "timeout" for timeouts.
pub fn error_text(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::TimedOut {
        return "timeout".to_string();
    }
    if let Some(n) = e.raw_os_error() {
        let s = io::Error::from_raw_os_error(n).to_string();
        let s = s.split(" (os error").next().unwrap_or(&s);
        return s.to_ascii_lowercase();
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".into(),
        io::ErrorKind::BrokenPipe => "broken pipe".into(),
        io::ErrorKind::UnexpectedEof => "closed".into(),
        _ => e.to_string().to_ascii_lowercase(),
    }
}

/// nginx's `(111: Connection refused)` for log lines.
pub fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let s = io::Error::from_raw_os_error(n).to_string();
            format!("{}: {}", n, s.split(" (os error").next().unwrap_or(&s))
        }
        None => e.to_string(),
    }
}
