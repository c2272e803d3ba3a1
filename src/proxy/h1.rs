//! The HTTP/1 exchange on an upstream connection, ours rather than hyper's client: hyper's
//! connection task, dispatch channel and wakeups cost about a quarter of a proxied request,
//! and it could only mark a connection reusable once its task ran again.
//!
//! A request head (and a kept body) goes out in one write; a streamed body follows as it
//! arrives, chunked when its length is unknown. The response head is parsed with `httparse`
//! within `proxy_buffer_size` (default [`HEAD_LIMIT`]); the body is framed by Content-Length,
//! chunked (trailers dropped) or the connection's close, and none for HEAD, 204, 304. The
//! connection goes back to the pool the moment the body's last byte was read, when both sides
//! allow keep-alive.

use std::io;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::body::UpBody;
use super::conf::ProxyConf;
use super::connect::errno_text;
use super::forward::ReqHead;
use super::headers;
use super::pool::{self, Conn, Key, Limits};
use super::retry::Failure;

/// The largest response head accepted unless `proxy_buffer_size` says otherwise (nginx's
/// default is one memory page, 4k; we allow more, as the hyper client we replaced did, so
/// that a head nginx would take with a raised proxy_buffer_size is not refused here).
pub const HEAD_LIMIT: usize = 64 * 1024;
/// The most header lines in a response head.
pub const MAX_HEADERS: usize = 100;
/// Kept bodies up to this size share the head's write.
const COALESCE: usize = 64 * 1024;
/// How much a body read asks for at least.
const READ_SIZE: usize = 16 * 1024;

/// Why an exchange failed before a usable response head, in nginx's words.
pub struct ExchangeError {
    pub kind: Failure,
    pub msg: String,
    /// Writing to the upstream failed: it may have answered early (and closed), so its
    /// response is worth reading still.
    write: bool,
}

impl ExchangeError {
    fn invalid() -> ExchangeError {
        ExchangeError {
            kind: Failure::InvalidHeader,
            msg: "upstream sent invalid header while reading response header from upstream".into(),
            write: false,
        }
    }

    fn too_big() -> ExchangeError {
        ExchangeError {
            kind: Failure::InvalidHeader,
            msg: "upstream sent too big header while reading response header from upstream".into(),
            write: false,
        }
    }

    fn closed() -> ExchangeError {
        ExchangeError {
            kind: Failure::Error,
            msg:
                "upstream prematurely closed connection while reading response header from upstream"
                    .into(),
            write: false,
        }
    }

    /// An I/O error on the connection.
    fn io(e: &io::Error) -> ExchangeError {
        if e.kind() == io::ErrorKind::TimedOut {
            return ExchangeError {
                kind: Failure::Timeout,
                msg: "upstream timed out (110: Connection timed out) while sending request to upstream"
                    .into(),
                write: false,
            };
        }
        let (what, phase) = match e.raw_os_error() {
            Some(libc::EPIPE) => ("writev() failed", "while sending request to upstream"),
            _ => (
                "recv() failed",
                "while reading response header from upstream",
            ),
        };
        ExchangeError {
            kind: Failure::Error,
            msg: format!("{} {} {}", what, errno_text(e), phase),
            write: false,
        }
    }

    /// A failed write to the upstream.
    fn wrote(e: io::Error) -> ExchangeError {
        ExchangeError {
            write: e.kind() != io::ErrorKind::TimedOut,
            ..ExchangeError::io(&e)
        }
    }

    /// The client's body failed while it was streamed upstream.
    fn client_body(e: &hyper::Error) -> ExchangeError {
        let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        while let Some(s) = src {
            if let Some(io) = s.downcast_ref::<io::Error>() {
                return ExchangeError::io(io);
            }
            src = s.source();
        }
        ExchangeError::closed()
    }
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, PartialEq)]
enum Out {
    /// No body bytes (whatever the headers say, as hyper did for an empty body).
    None,
    Raw,
    Chunked,
}

thread_local! {
    static SPARE_HEAD_BUFS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The buffer a request head (and a small body) is written from: its room comes from a
/// per-worker pool and goes back when the write is over, instead of an allocation per try.
struct HeadBuf(Vec<u8>);

impl HeadBuf {
    fn take(want: usize) -> HeadBuf {
        let mut v = crate::http::spare::take(&SPARE_HEAD_BUFS);
        v.reserve(want);
        HeadBuf(v)
    }
}

impl std::ops::Deref for HeadBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for HeadBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for HeadBuf {
    fn drop(&mut self) {
        // A buffer that carried a large body gives its memory back instead.
        if self.0.capacity() <= 16 * 1024 {
            let mut v = std::mem::take(&mut self.0);
            v.clear();
            crate::http::spare::give(&SPARE_HEAD_BUFS, v, 64);
        }
    }
}

/// Write the request: head, then the body as its framing says. Returns whether the request
/// lets the connection live on (it did not ask the upstream to close).
async fn write_request(
    conn: &mut Conn,
    head: &ReqHead,
    body: UpBody,
) -> Result<bool, ExchangeError> {
    let headers = &head.headers;
    let uri = head.uri.as_bytes();
    if uri.is_empty() || uri.iter().any(|&b| b <= b' ' || b >= 0x7f) {
        return Err(ExchangeError {
            kind: Failure::Error,
            msg: format!("invalid URI \"{}\" for upstream", head.uri),
            write: false,
        });
    }
    let (keep, has_len, has_te) = (!headers.close, headers.has_len, headers.te.is_some());
    // hyper's rules, which the tests and users saw so far: an empty body sends nothing; a
    // known length is declared when the headers do not; HTTP/1.0 never chunks; a body of
    // unknown length is chunked unless the method hardly ever has one.
    // nginx buffers a body of unknown length for an HTTP/1.0 upstream (it cannot be chunked
    // and has no length to declare) whatever proxy_request_buffering says.
    let body = match body {
        UpBody::Stream(inc)
            if !head.http11
                && !has_len
                && !inc.is_end_stream()
                && inc.size_hint().exact().is_none() =>
        {
            // Boxed: rare (HTTP/1.0 upstreams), and its state would sit in every exchange.
            UpBody::Full(Some(Box::pin(collect(inc)).await?))
        }
        other => other,
    };
    let known = match &body {
        UpBody::Empty | UpBody::Full(None) => None,
        UpBody::Full(Some(b)) => Some(b.len() as u64),
        UpBody::Stream(i) => i.size_hint().exact(),
    };
    let ended = body.is_end_stream() && !matches!(body, UpBody::Full(Some(_)));
    let mut extra: Option<String> = None;
    let mut skip_te = false;
    let out = if ended {
        skip_te = true;
        Out::None
    } else if !head.http11 {
        skip_te = true;
        match (has_len, known) {
            (true, _) => Out::Raw,
            (false, Some(n)) => {
                extra = Some(format!("content-length: {}\r\n", n));
                Out::Raw
            }
            (false, None) => Out::None,
        }
    } else if has_te {
        Out::Chunked
    } else if has_len {
        Out::Raw
    } else if let Some(n) = known {
        extra = Some(format!("content-length: {}\r\n", n));
        Out::Raw
    } else if matches!(head.method, Method::GET | Method::HEAD | Method::CONNECT) {
        Out::None
    } else {
        extra = Some("transfer-encoding: chunked\r\n".into());
        Out::Chunked
    };
    let mut buf = HeadBuf::take(64 + uri.len() + headers.lines.len());
    buf.extend_from_slice(head.method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(uri);
    buf.extend_from_slice(if head.http11 {
        b" HTTP/1.1\r\n"
    } else {
        b" HTTP/1.0\r\n"
    });
    match headers.te.clone().filter(|_| skip_te) {
        Some(te) => {
            buf.extend_from_slice(&headers.lines[..te.start]);
            buf.extend_from_slice(&headers.lines[te.end..]);
        }
        None => buf.extend_from_slice(&headers.lines),
    }
    if let Some(e) = &extra {
        buf.extend_from_slice(e.as_bytes());
    }
    buf.extend_from_slice(b"\r\n");
    let io = &mut conn.io;
    let w = ExchangeError::wrote;
    match (out, body) {
        (Out::None, _) => io.write_all(&buf).await.map_err(w)?,
        (_, UpBody::Full(Some(b))) => {
            let chunked = out == Out::Chunked && !b.is_empty();
            if chunked {
                buf.extend_from_slice(format!("{:x}\r\n", b.len()).as_bytes());
            }
            if b.len() <= COALESCE {
                buf.extend_from_slice(&b);
            } else {
                io.write_all(&buf).await.map_err(w)?;
                buf.clear();
                io.write_all(&b).await.map_err(w)?;
            }
            if chunked {
                buf.extend_from_slice(b"\r\n");
            }
            if out == Out::Chunked {
                buf.extend_from_slice(b"0\r\n\r\n");
            }
            io.write_all(&buf).await.map_err(w)?;
        }
        (_, UpBody::Stream(mut inc)) => {
            io.write_all(&buf).await.map_err(w)?;
            // Trailers are not forwarded (nginx drops request trailers too).
            while let Some(f) = inc.frame().await {
                let f = f.map_err(|e| ExchangeError::client_body(&e))?;
                let Ok(d) = f.into_data() else { continue };
                if d.is_empty() {
                    continue;
                }
                if out == Out::Chunked {
                    buf.clear();
                    buf.extend_from_slice(format!("{:x}\r\n", d.len()).as_bytes());
                    buf.extend_from_slice(&d);
                    buf.extend_from_slice(b"\r\n");
                    io.write_all(&buf).await.map_err(w)?;
                } else {
                    io.write_all(&d).await.map_err(w)?;
                }
                // Before waiting for the client's next piece: on TLS the bytes may still sit
                // in the TLS buffer, and the upstream would wait for them.
                io.flush().await.map_err(w)?;
            }
            if out == Out::Chunked {
                io.write_all(b"0\r\n\r\n").await.map_err(w)?;
            }
        }
        (_, _) => io.write_all(&buf).await.map_err(w)?,
    }
    // A TLS stream may keep what it could not write yet in its buffer (write_all returns
    // once the bytes are accepted); the response is read only after all of it went out.
    io.flush().await.map_err(w)?;
    Ok(keep)
}

/// An accepted response head and its body.
pub struct Response {
    pub status: u16,
    /// The headers the client gets: those [`headers::passes`] lets through, in the upstream's
    /// order (a 101 with `Connection: upgrade` added).
    pub headers: HeaderMap,
    /// The head as the upstream sent it, for `$upstream_http_*` (parsed again only if read).
    pub raw: Bytes,
    /// A `Location` or `Refresh` header passed (what proxy_redirect may rewrite).
    pub relocates: bool,
    pub body: Body,
}

/// Send the request and read the response head (1xx other than 101 skipped). The client's
/// headers are parsed into `out` (an empty map whose room is reused). Boxed: the response is
/// handed through several futures and results before its body streams, and each hand-over
/// would copy its ~440 bytes (callgrind: ~5 copies a request).
pub async fn exchange(
    mut conn: Conn,
    pc: &ProxyConf,
    head: &ReqHead,
    body: UpBody,
    pool: Option<(Key, Limits)>,
    mut out: HeaderMap,
) -> Result<Box<Response>, ExchangeError> {
    // An upstream that answers before taking the whole body (a 413, say) and closes: its
    // answer is what the client gets, as hyper's client gave it.
    let (keep, failed) = match write_request(&mut conn, head, body).await {
        Ok(keep) => (keep, None),
        Err(e) if e.write => (false, Some(e)),
        Err(e) => return Err(e),
    };
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    loop {
        let parsed = parse_head(&mut buf, head.method == Method::HEAD, keep, pc, &mut out)?;
        let Some(h) = parsed else {
            let limit = pc.buffer_size;
            if buf.len() >= limit {
                return Err(ExchangeError::too_big());
            }
            buf.reserve(READ_SIZE.min(limit - buf.len()));
            let n = match conn.io.read_buf(&mut buf).await {
                Ok(n) => n,
                Err(e) => return Err(failed.unwrap_or_else(|| ExchangeError::io(&e))),
            };
            if n == 0 {
                return Err(failed.unwrap_or_else(ExchangeError::closed));
            }
            continue;
        };
        if (100..200).contains(&h.status) && h.status != 101 {
            buf = BytesMut::from(h.rest);
            continue;
        }
        let Head {
            status,
            headers,
            raw,
            relocates,
            framing,
            reusable,
            rest,
        } = h;
        // A known length takes its bytes from what came with the head as they are; the other
        // decoders scan a buffer of their own.
        let (first, buf) = match framing {
            Framing::Length(_) => (rest, buf),
            _ => (Bytes::new(), BytesMut::from(rest)),
        };
        let mut body = Body {
            conn: Some(conn),
            first,
            buf,
            framing,
            reusable,
            pool,
        };
        if status == 101 {
            body.framing = Framing::Upgrade;
        } else if body.framing == Framing::Done {
            body.release();
        }
        return Ok(Box::new(Response {
            status,
            headers,
            raw,
            relocates,
            body,
        }));
    }
}

/// A parsed response head.
struct Head {
    status: u16,
    headers: HeaderMap,
    raw: Bytes,
    relocates: bool,
    framing: Framing,
    /// Keep-alive holds on both sides.
    reusable: bool,
    /// What was read past the head.
    rest: Bytes,
}

/// Header lines tried on the stack first; a head with more is parsed again with the limit.
const FEW_HEADERS: usize = 24;

/// Parse a response head at the start of `buf`: `None` (with `buf` as it was) when more bytes
/// are needed. Header values share the bytes read (no copy per header).
/// The whole client body, for an upstream that needs its length first.
async fn collect(mut inc: hyper::body::Incoming) -> Result<Bytes, ExchangeError> {
    let mut all = BytesMut::new();
    while let Some(f) = inc.frame().await {
        let f = f.map_err(|e| ExchangeError::client_body(&e))?;
        if let Ok(d) = f.into_data() {
            all.extend_from_slice(&d);
        }
    }
    Ok(all.freeze())
}

fn parse_head(
    buf: &mut BytesMut,
    head_req: bool,
    keep: bool,
    pc: &ProxyConf,
    out: &mut HeaderMap,
) -> Result<Option<Head>, ExchangeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let whole = std::mem::take(buf).freeze();
    // Slots left uninitialised: httparse writes those it fills.
    let mut few = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; FEW_HEADERS];
    let mut many;
    let mut r = httparse::Response::new(&mut []);
    let mut parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut r, &whole, &mut few);
    if let Err(httparse::Error::TooManyHeaders) = parsed {
        many = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
        r = httparse::Response::new(&mut many);
        parsed = r.parse(&whole);
    }
    let len = match parsed {
        // A head that came whole in one read may still be over the limit.
        Ok(httparse::Status::Complete(n)) if n > pc.buffer_size => {
            return Err(ExchangeError::too_big())
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            *buf = BytesMut::from(whole);
            return Ok(None);
        }
        Err(_) => return Err(ExchangeError::invalid()),
    };
    let status = r.code.unwrap_or(0);
    if status < 100 {
        return Err(ExchangeError::invalid());
    }
    let http11 = r.version == Some(1);
    let upgrade = status == 101;
    // Only what the client gets goes into the map (one pass, no second map to filter into);
    // `$upstream_http_*` reads `raw`.
    let mut headers = std::mem::take(out);
    if !headers.is_empty() {
        headers.clear();
    }
    headers.reserve(r.headers.len());
    let mut relocates = false;
    let mut named = false;
    // What framing and keep-alive depend on, noted on the way.
    let (mut close, mut keep_alive) = (false, false);
    let mut te_chunked = None;
    let mut length: Option<u64> = None;
    for h in r.headers.iter() {
        // What every nginx origin sends and no client gets as it came (Connection is hop by
        // hop; Date and Server are hidden unless proxy_pass_header names one), known from the
        // raw name without making a HeaderName.
        let raw = h.name.as_bytes();
        if headers::name_is(raw, b"connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                close |= t.eq_ignore_ascii_case(b"close");
                keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
            named = named || headers::names_others(h.value);
            continue;
        }
        if pc.pass_headers.is_empty()
            && (headers::name_is(raw, b"date") || headers::name_is(raw, b"server"))
        {
            continue;
        }
        // The two every response of a body has, without the lookup from_bytes would make.
        let name = if headers::name_is(raw, b"content-length") {
            header::CONTENT_LENGTH
        } else if headers::name_is(raw, b"content-type") {
            header::CONTENT_TYPE
        } else if let Some(n) = headers::common_response_name(raw) {
            n
        } else {
            HeaderName::from_bytes(raw).map_err(|_| ExchangeError::invalid())?
        };
        if name == header::TRANSFER_ENCODING {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            te_chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONTENT_LENGTH {
            for part in h.value.split(|&b| b == b',') {
                let part = part.trim_ascii();
                if part.is_empty() || part.len() > 19 || !part.iter().all(|b| b.is_ascii_digit()) {
                    return Err(ExchangeError::invalid());
                }
                let n = part.iter().fold(0u64, |n, &b| n * 10 + (b - b'0') as u64);
                if length.is_some_and(|l| l != n) {
                    return Err(ExchangeError::invalid());
                }
                length = Some(n);
            }
        }
        if headers::passes(pc, &name, upgrade) {
            let value = HeaderValue::from_maybe_shared(whole.slice_ref(h.value))
                .map_err(|_| ExchangeError::invalid())?;
            relocates |= name == header::LOCATION || name == header::REFRESH;
            headers.append(name, value);
        }
        // A header left out needs no check of its value: httparse accepts exactly the bytes
        // `HeaderValue` does (tab, 0x20-0x7e, 0x80-0xff).
    }
    if named {
        let connection = r
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"));
        headers::drop_named(&mut headers, connection.map(|h| h.value));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let mut reusable = keep && if http11 { !close } else { keep_alive };
    let framing = if head_req || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Done
    } else if let Some(chunked) = te_chunked {
        // With a Content-Length too, the two ends may disagree on where the body ends
        // (RFC 9112 6.3, a smuggling vector): nginx refuses such a response with a 502.
        if length.is_some() {
            return Err(ExchangeError {
                kind: Failure::InvalidHeader,
                msg: "upstream sent \"Content-Length\" and \"Transfer-Encoding\" headers at the same time while reading response header from upstream".into(),
                write: false,
            });
        }
        if chunked && http11 {
            Framing::Chunked(Chunk::Size)
        } else {
            reusable = false;
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
            None => {
                reusable = false;
                Framing::Close
            }
        }
    };
    Ok(Some(Head {
        status,
        headers,
        raw: whole.slice(..len),
        relocates,
        framing,
        reusable,
        rest: whole.slice(len..),
    }))
}

/// Where the chunked decoder is.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Chunk {
    /// Expecting a size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// How the response body ends.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes (the connection is not reused).
    Close,
    /// A 101: the connection now belongs to the tunnel.
    Upgrade,
    Done,
}

/// A response body being read; it owns the connection until the body ends.
pub struct Body {
    conn: Option<Conn>,
    /// Body bytes that came with the head (Content-Length bodies), handed out before `buf`.
    first: Bytes,
    /// Bytes read past what was handed out.
    buf: BytesMut,
    framing: Framing,
    /// Keep-alive holds on both sides.
    reusable: bool,
    /// Where the connection goes when the body ends (keep-alive configured).
    pool: Option<(Key, Limits)>,
}

/// A body read failure (the connection is dropped).
pub struct BodyError;

impl Body {
    /// Keep the request's head timer with the connection for its next request (see
    /// `pool::Conn::timer`); a connection already back in the pool goes without it.
    pub fn keep_timer(&mut self, t: std::pin::Pin<Box<tokio::time::Sleep>>) {
        if let Some(c) = self.conn.as_mut() {
            c.timer = Some(t);
        }
    }

    /// Whether the whole body was read.
    pub fn is_end(&self) -> bool {
        self.framing == Framing::Done
    }

    /// The exact length still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Done => Some(0),
            _ => None,
        }
    }

    /// The upgraded connection after a 101, with bytes already read past the head.
    pub fn into_upgraded(mut self) -> Option<(Conn, Bytes)> {
        if self.framing != Framing::Upgrade {
            return None;
        }
        let conn = self.conn.take()?;
        Some((conn, std::mem::take(&mut self.buf).freeze()))
    }

    /// The body ended: the connection goes back to the pool at once if it can.
    fn release(&mut self) {
        self.framing = Framing::Done;
        let Some(conn) = self.conn.take() else { return };
        // Bytes beyond the response mean the two sides disagree on framing: not reusable.
        if !self.reusable || !self.buf.is_empty() || !self.first.is_empty() {
            return;
        }
        if let Some((key, limits)) = self.pool.take() {
            pool::release(key, conn, limits);
        }
    }

    /// Take the next piece of body out of the buffer, if one is there.
    fn decode(&mut self) -> Result<Option<Bytes>, BodyError> {
        loop {
            match self.framing {
                Framing::Done | Framing::Upgrade => return Ok(None),
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(self.buf.split().freeze()));
                }
                Framing::Length(n) => {
                    let d = if !self.first.is_empty() {
                        let take = (self.first.len() as u64).min(n) as usize;
                        self.first.split_to(take)
                    } else if !self.buf.is_empty() {
                        let take = (self.buf.len() as u64).min(n) as usize;
                        self.buf.split_to(take).freeze()
                    } else {
                        return Ok(None);
                    };
                    let take = d.len();
                    if take as u64 == n {
                        self.release();
                    } else {
                        self.framing = Framing::Length(n - take as u64);
                    }
                    return Ok(Some(d));
                }
                Framing::Chunked(Chunk::Data(n)) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let take = (self.buf.len() as u64).min(n) as usize;
                    let d = self.buf.split_to(take).freeze();
                    self.framing = Framing::Chunked(if take as u64 == n {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(n - take as u64)
                    });
                    return Ok(Some(d));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if self.buf.starts_with(b"\r\n") {
                        self.buf.advance(2);
                    } else if self.buf.starts_with(b"\n") {
                        self.buf.advance(1);
                    } else if self.buf.len() < 2 {
                        return Ok(None);
                    } else {
                        return Err(BodyError);
                    }
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(state) => {
                    let Some(eol) = self.buf.iter().position(|&b| b == b'\n') else {
                        if self.buf.len() > 4096 {
                            return Err(BodyError);
                        }
                        return Ok(None);
                    };
                    let line = &self.buf[..eol];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if state == Chunk::Trailers {
                        let last = line.is_empty();
                        self.buf.advance(eol + 1);
                        if last {
                            self.release();
                            return Ok(None);
                        }
                        continue;
                    }
                    let size = chunk_size(line).ok_or(BodyError)?;
                    self.buf.advance(eol + 1);
                    self.framing = Framing::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
            }
        }
    }

    /// The next piece of body, `None` at its end. Cancel-safe: state lives in `self`.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        loop {
            if let Some(d) = self.decode()? {
                return Ok(Some(d));
            }
            if matches!(self.framing, Framing::Done | Framing::Upgrade) {
                return Ok(None);
            }
            let Some(conn) = self.conn.as_mut() else {
                return Err(BodyError);
            };
            let want = match self.framing {
                Framing::Length(n) => (n as usize).clamp(1, 64 * 1024),
                _ => READ_SIZE,
            };
            self.buf.reserve(want);
            match conn.io.read_buf(&mut self.buf).await {
                Ok(0) if self.framing == Framing::Close => {
                    self.framing = Framing::Done;
                    self.conn = None;
                    return Ok(None);
                }
                Ok(0) | Err(_) => {
                    self.conn = None;
                    return Err(BodyError);
                }
                Ok(_) => {}
            }
        }
    }
}

/// A chunk-size line: hex digits, then optional extensions after `;`.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?;
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    let mut n = 0u64;
    for &b in digits {
        n = n * 16 + (b as char).to_digit(16)? as u64;
    }
    Some(n)
}

/// The most of an upstream body read on after the client went away, so that the connection
/// survives for the next request. nginx (proxy_buffering on) has usually read a response of
/// this size into its buffers before a client aborts, and keeps the connection then.
const DRAIN_LIMIT: u64 = 1024 * 1024;

/// After the client went away mid-response: read the rest of a not too large body of known
/// length in the background (each read within proxy_read_timeout); its end pools the
/// connection. Anything else closes it.
pub fn drain(mut body: Body, read: Duration) {
    if body.pool.is_none() || !body.reusable || body.remaining().is_none_or(|n| n > DRAIN_LIMIT) {
        return;
    }
    tokio::task::spawn_local(async move {
        while !body.is_end() {
            match tokio::time::timeout(read, body.chunk()).await {
                Ok(Ok(Some(_))) => {}
                _ => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(framing: Framing, bytes: &[u8]) -> Body {
        Body {
            conn: None,
            first: Bytes::new(),
            buf: BytesMut::from(bytes),
            framing,
            reusable: true,
            pool: None,
        }
    }

    fn decode_all(b: &mut Body) -> Result<Vec<u8>, ()> {
        let mut out = Vec::new();
        while let Some(d) = b.decode().map_err(|_| ())? {
            out.extend_from_slice(&d);
        }
        Ok(out)
    }

    #[test]
    fn chunked_bodies_decode_and_end_after_trailers() {
        let mut b = body(
            Framing::Chunked(Chunk::Size),
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
        );
        assert_eq!(decode_all(&mut b).unwrap(), b"hello world");
        assert!(b.is_end());
        let mut b = body(Framing::Chunked(Chunk::Size), b"zz\r\nhello\r\n");
        assert!(decode_all(&mut b).is_err());
        let mut b = body(Framing::Chunked(Chunk::Size), b"5\r\nhel");
        assert_eq!(decode_all(&mut b).unwrap(), b"hel");
        assert!(!b.is_end());
    }

    #[test]
    fn heads_keep_only_what_the_client_gets_in_order() {
        let raw = b"HTTP/1.1 200 OK\r\nServer: o\r\nX-B: 1\r\nDate: d\r\nX-A: 2\r\nConnection: keep-alive\r\nX-B: 3\r\nKeep-Alive: timeout=5\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n";
        let pc = ProxyConf {
            hide_headers: vec!["x-a".into()],
            pass_headers: vec!["server".into()],
            ..Default::default()
        };
        let parse = |raw: &[u8], pc: &ProxyConf| {
            parse_head(
                &mut BytesMut::from(raw),
                false,
                true,
                pc,
                &mut HeaderMap::new(),
            )
            .ok()
            .flatten()
            .unwrap()
        };
        let h = parse(&raw[..], &pc);
        let got: Vec<(String, String)> = h
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let want = [
            ("server", "o"),
            ("x-b", "1"),
            ("x-b", "3"),
            ("location", "/x"),
            ("content-length", "0"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
        assert!(h.relocates);
        assert_eq!(&h.raw[..], &raw[..]);
        // Headers the Connection header names go too; the rest keep their order.
        let raw = b"HTTP/1.1 200 OK\r\nX-C: 1\r\nSERVER: s\r\nX-Hop: 2\r\nConnection: X-Hop, keep-alive\r\ndate: d\r\nX-D: 3\r\nContent-Length: 0\r\n\r\n";
        let h = parse(&raw[..], &ProxyConf::default());
        let names: Vec<&str> = h.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-c", "x-d", "content-length"]);
        assert!(!h.relocates);
        // A 101 keeps Upgrade and says Connection: upgrade.
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let h = parse(&raw[..], &ProxyConf::default());
        assert_eq!(h.headers.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.headers.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn heads_frame_bodies_as_hyper_did() {
        let parse = |raw: &[u8], head: bool| {
            let mut buf = BytesMut::from(raw);
            parse_head(
                &mut buf,
                head,
                true,
                &ProxyConf::default(),
                &mut HeaderMap::new(),
            )
            .map(|r| r.map(|h| (h.status, h.framing, h.reusable, h.rest.len())))
        };
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false);
        assert_eq!(r.ok().flatten(), Some((200, Framing::Length(3), true, 3)));
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true);
        assert_eq!(r.ok().flatten(), Some((200, Framing::Done, true, 0)));
        let r = parse(b"HTTP/1.0 200 OK\r\n\r\nabc", false);
        assert_eq!(r.ok().flatten(), Some((200, Framing::Close, false, 3)));
        let r = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n",
            false,
        );
        assert_eq!(
            r.ok().flatten(),
            Some((200, Framing::Chunked(Chunk::Size), false, 0))
        );
        let r = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert!(r.is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false).is_err());
        assert!(parse(b"HTTX/1.1 200 OK\r\n\r\n", false).is_err());
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\nA: b", false), Ok(None)));
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..60 {
            many.push_str(&format!("X-{}: {}\r\n", i, i));
        }
        many.push_str("Content-Length: 1\r\n\r\nx");
        let r = parse(many.as_bytes(), false);
        assert_eq!(r.ok().flatten(), Some((200, Framing::Length(1), true, 1)));
    }
}
