//! One try (a pooled or fresh connection, the request, the response head) and, once a try is
//! accepted, streaming its body to the client through the output filters.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{BodySrc, UpBody};
use super::conf::ProxyConf;
use super::connect::{self, errno_text, TlsParams};
use super::pool::{self, Conn, Key, Limits};
use super::retry::{Failure, Peer};
use crate::http::filter;
use crate::http::request::ReqCtx;

/// What every try of a request shares.
pub struct ReqHead {
    pub method: Method,
    /// The request target sent upstream (`/path?args`).
    pub uri: String,
    pub headers: HeaderMap,
    pub http11: bool,
}

/// Where a try goes beyond its address.
pub struct Dest<'a> {
    pub https: bool,
    pub ssl: &'a std::sync::Arc<super::conf::ProxySsl>,
    pub tls_name: Option<&'a str>,
    pub sni: Option<&'a str>,
    pub keepalive: Option<Limits>,
}

/// The timeouts of one try: the location's, or what `ngx.balancer.set_timeouts` set.
pub struct Timeouts {
    pub connect: Duration,
    pub send: Duration,
    pub read: Duration,
}

impl Timeouts {
    pub fn of(pc: &ProxyConf, lua: Option<(u64, u64, u64)>) -> Timeouts {
        let (c, s, r) = lua.unwrap_or((0, 0, 0));
        let pick =
            |lua: u64, conf: u64| Duration::from_millis(if lua > 0 { lua } else { conf }.max(1));
        Timeouts {
            connect: pick(c, pc.connect_timeout_ms),
            send: pick(s, pc.send_timeout_ms),
            read: pick(r, pc.read_timeout_ms),
        }
    }
}

/// A try that got a response head.
pub struct Got {
    pub resp: Response<Incoming>,
    pub conn: Conn,
    pub key: Key,
    pub connect_time: Option<Duration>,
    pub header_time: Duration,
}

/// A try that failed.
pub struct Failed {
    pub kind: Failure,
    /// nginx's words, e.g. `connect() failed (111: Connection refused) while connecting to upstream`.
    pub msg: String,
    /// Whether the request may have reached the upstream.
    pub sent: bool,
    /// The failure happened on a connection from the pool before any response byte.
    pub stale: bool,
    pub connect_time: Option<Duration>,
}

impl Failed {
    /// The status nginx answers (and records in $upstream_status) for this failure.
    pub fn status(&self) -> u16 {
        match self.kind {
            Failure::Timeout => 504,
            _ => 502,
        }
    }
}

fn io_error(e: &hyper::Error) -> Option<&std::io::Error> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        src = s.source();
    }
    None
}

/// nginx's text and retry class for a hyper client error before the response head.
fn classify(e: &hyper::Error) -> (Failure, String) {
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        return (
            Failure::InvalidHeader,
            "upstream sent invalid header while reading response header from upstream".into(),
        );
    }
    if let Some(io) = io_error(e) {
        if io.kind() == std::io::ErrorKind::TimedOut {
            return (
                Failure::Timeout,
                "upstream timed out (110: Connection timed out) while sending request to upstream"
                    .into(),
            );
        }
        let what = match io.raw_os_error() {
            Some(libc::EPIPE) => "writev() failed",
            _ => "recv() failed",
        };
        let phase = match io.raw_os_error() {
            Some(libc::EPIPE) => "while sending request to upstream",
            _ => "while reading response header from upstream",
        };
        return (
            Failure::Error,
            format!("{} {} {}", what, errno_text(io), phase),
        );
    }
    (
        Failure::Error,
        "upstream prematurely closed connection while reading response header from upstream".into(),
    )
}

/// Run one try against `peer`.
pub async fn attempt(
    peer: &Peer,
    dest: &Dest<'_>,
    tmo: &Timeouts,
    head: &mut ReqHead,
    keep_head: bool,
    src: &mut BodySrc,
    use_pool: bool,
) -> Result<Got, Failed> {
    let key = Key {
        addr: peer.addr,
        tls: dest.tls_name.filter(|_| dest.https).map(|n| {
            (
                std::sync::Arc::from(n),
                dest.sni.is_some(),
                std::sync::Arc::as_ptr(dest.ssl) as usize,
            )
        }),
    };
    let mut connect_time = None;
    let pooled = if use_pool && dest.keepalive.is_some() {
        pool::take_ready(&key).await
    } else {
        None
    };
    let mut conn = match pooled {
        Some(c) => c,
        None => {
            let t0 = Instant::now();
            let tls = dest.https.then(|| TlsParams {
                ssl: dest.ssl,
                sni: dest.sni,
                verify_name: dest.tls_name.unwrap_or(""),
            });
            let (tx, send_limit) = connect::open(peer.addr, tls, tmo.connect, tmo.send)
                .await
                .map_err(|e| Failed {
                    kind: if e.timeout {
                        Failure::Timeout
                    } else {
                        Failure::Error
                    },
                    msg: e.msg,
                    sent: false,
                    stale: false,
                    connect_time: None,
                })?;
            connect_time = Some(t0.elapsed());
            Conn {
                tx,
                requests: 1,
                reused: false,
                opened: t0,
                send_limit,
            }
        }
    };
    conn.send_limit.store(
        tmo.send.as_millis() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    // Taken only now: a connect failure leaves a streamed body unread for the next try.
    let body = src.take();
    let streamed = matches!(body, UpBody::Stream(_));
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.parse().map_err(|_| Failed {
        kind: Failure::Error,
        msg: format!("invalid URI \"{}\" for upstream", head.uri),
        sent: false,
        stale: false,
        connect_time,
    })?;
    *req.version_mut() = if head.http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    *req.headers_mut() = if keep_head {
        head.headers.clone()
    } else {
        std::mem::take(&mut head.headers)
    };
    let t0 = Instant::now();
    // The head must come within proxy_read_timeout of the request being sent; a streamed
    // body's upload gets proxy_send_timeout on top.
    let mut wait = tmo.read;
    if streamed {
        wait += tmo.send;
    }
    let resp = match tokio::time::timeout(wait, conn.tx.send_request(req)).await {
        Err(_) => {
            return Err(Failed {
                kind: Failure::Timeout,
                msg: "upstream timed out (110: Connection timed out) while reading response header from upstream".into(),
                sent: true,
                stale: false,
                connect_time,
            })
        }
        Ok(Err(e)) => {
            let (kind, msg) = classify(&e);
            return Err(Failed {
                kind,
                msg,
                sent: true,
                stale: conn.reused && kind == Failure::Error,
                connect_time,
            });
        }
        Ok(Ok(r)) => r,
    };
    Ok(Got {
        resp,
        conn,
        key,
        connect_time,
        header_time: t0.elapsed(),
    })
}

/// How much a `proxy_buffering on` read gathers before it hands data on.
const READ_AHEAD: usize = 64 * 1024;

/// How streaming the body ended.
pub enum Streamed {
    /// The upstream body was read to its end (whether or not the client took all of it): the
    /// connection may be reused.
    Complete,
    /// The client went away before the upstream body ended; what is left of it comes back for
    /// [`drain`].
    ClientGone(Incoming),
    /// The upstream failed mid-body (logged); the client response was cut off.
    UpstreamFailed,
}

/// Stream the upstream body to the client. The head is already in `rc.st`.
pub async fn stream_body(
    rc: &Rc<ReqCtx>,
    pc: &ProxyConf,
    tmo: &Timeouts,
    mut body: Incoming,
    bytes: &mut u64,
    log: &dyn Fn(&str),
) -> Streamed {
    let read_timeout = tmo.read;
    if body.is_end_stream() {
        let _ = filter::send(rc, true).await;
        return Streamed::Complete;
    }
    // A chunk read but not yet sent: kept as it came while it is alone, so that a response
    // read in one piece goes to the client without a copy.
    let mut pending: Option<Bytes> = None;
    loop {
        let frame = match body.frame().now_or_never() {
            Some(f) => Ok(f),
            None => tokio::time::timeout(read_timeout, body.frame()).await,
        };
        let failure = match frame {
            Err(_) => Some("upstream timed out (110: Connection timed out) while reading upstream"),
            Ok(Some(Err(_))) => {
                Some("upstream prematurely closed connection while reading upstream")
            }
            Ok(None) => {
                let _ = filter::send(rc, true).await;
                return Streamed::Complete;
            }
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    push(rc, &mut pending, d, bytes);
                }
                None
            }
        };
        if let Some(msg) = failure {
            log(msg);
            if !rc.st.borrow().headers_sent {
                let _ = filter::send(rc, false).await;
            }
            filter::abort(rc).await;
            return Streamed::UpstreamFailed;
        }
        // proxy_buffering on: take what is already there before waking the client side.
        if pc.buffering {
            loop {
                let held = rc.st.borrow().out.len() + pending.as_ref().map_or(0, |p| p.len());
                if held >= READ_AHEAD || body.is_end_stream() {
                    break;
                }
                match body.frame().now_or_never() {
                    Some(Some(Ok(f))) => {
                        if let Ok(d) = f.into_data() {
                            push(rc, &mut pending, d, bytes);
                        }
                    }
                    _ => break,
                }
            }
        }
        let eof = body.is_end_stream();
        let sent = match pending.take() {
            Some(d) => filter::send_chunk(rc, d, eof).await,
            None => filter::send(rc, eof).await,
        };
        if eof {
            return Streamed::Complete;
        }
        if sent.is_err() {
            return Streamed::ClientGone(body);
        }
    }
}

fn push(rc: &ReqCtx, pending: &mut Option<Bytes>, d: Bytes, bytes: &mut u64) {
    *bytes += d.len() as u64;
    if d.is_empty() {
        return;
    }
    let mut st = rc.st.borrow_mut();
    if pending.is_none() && st.out.is_empty() {
        *pending = Some(d);
        return;
    }
    if let Some(p) = pending.take() {
        st.out.extend_from_slice(&p);
    }
    st.out.extend_from_slice(&d);
}

/// The most of an upstream body read on after the client went away, so that the connection
/// survives for the next request. nginx (proxy_buffering on) has usually read a response of
/// this size into its buffers before a client aborts, and keeps the connection then.
const DRAIN_LIMIT: u64 = 1024 * 1024;

/// After the client went away mid-response: read the rest of a not too large upstream body in
/// the background (each read within proxy_read_timeout) and pool the connection when it ends;
/// anything else closes it.
pub fn drain(mut body: Incoming, conn: Conn, key: Key, limits: Option<Limits>, read: Duration) {
    let Some(limits) = limits else { return };
    if body.size_hint().upper().is_none_or(|n| n > DRAIN_LIMIT) {
        return;
    }
    tokio::task::spawn_local(async move {
        let mut left = DRAIN_LIMIT;
        while !body.is_end_stream() {
            match tokio::time::timeout(read, body.frame()).await {
                Ok(Some(Ok(f))) => {
                    let n = f.data_ref().map_or(0, |d| d.len() as u64);
                    if n > left {
                        return;
                    }
                    left -= n;
                }
                Ok(None) => break,
                _ => return,
            }
        }
        pool::release(key, conn, limits);
    });
}

/// Hand the connection back to the pool when keep-alive is configured for it.
pub fn finish(got_conn: Conn, key: Key, dest: &Dest<'_>) {
    if let Some(l) = dest.keepalive {
        pool::release(key, got_conn, l);
    }
}
