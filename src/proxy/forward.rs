//! One try (a pooled or fresh connection, the request, the response head) and, once a try is
//! accepted, streaming its body to the client through the output filters.

use std::future::Future;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, Method};

use super::body::{BodySrc, UpBody};
use super::conf::ProxyConf;
use super::connect::{self, TlsParams};
use super::h1;
use super::pool::{self, Conn, Key, Limits};
use super::retry::{Failure, Peer};
use crate::http::filter;
use crate::http::request::ReqCtx;

/// What every try of a request shares.
pub struct ReqHead {
    pub method: Method,
    /// The request target sent upstream (`/path?args`).
    pub uri: String,
    pub headers: super::headers::ReqHeaders,
    pub http11: bool,
}

/// Where a try goes beyond its address.
pub struct Dest<'a> {
    /// The location's proxy configuration (which response headers pass).
    pub pc: &'a ProxyConf,
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
    pub resp: Box<h1::Response>,
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

/// Run one try against `peer`; `t0` is when the try started (one clock reading serves the
/// pool's idle check and the `$upstream_*` times). `out`: the map the client's headers go into.
#[allow(clippy::too_many_arguments)]
pub async fn attempt(
    peer: &Peer,
    dest: &Dest<'_>,
    tmo: &Timeouts,
    head: &ReqHead,
    src: &mut BodySrc,
    use_pool: bool,
    t0: Instant,
    out: HeaderMap,
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
        pool::take(&key, t0)
    } else {
        None
    };
    // When the request goes out: the head must come within proxy_read_timeout of it.
    let mut sent = t0;
    let mut conn = match pooled {
        Some(c) => c,
        None => {
            let tls = dest.https.then(|| TlsParams {
                ssl: dest.ssl,
                sni: dest.sni,
                verify_name: dest.tls_name.unwrap_or(""),
            });
            // Boxed: a TLS handshake's state is large and most requests find a pooled
            // connection; unboxed it would make every try's future bigger to move.
            let io = Box::pin(connect::open(peer.addr, tls, tmo.connect, tmo.send))
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
            sent = crate::clock::now();
            connect_time = Some(sent.saturating_duration_since(t0));
            Conn {
                io,
                timer: None,
                requests: 1,
                reused: false,
                opened: t0,
            }
        }
    };
    conn.io.limit = tmo.send;
    let reused = conn.reused;
    // Taken only now: a connect failure leaves a streamed body unread for the next try.
    let body = src.take();
    let streamed = matches!(body, UpBody::Stream(_));
    let pool = dest.keepalive.map(|l| (key, l));
    // The head must come within proxy_read_timeout of the request being sent; a streamed
    // body's upload gets proxy_send_timeout on top.
    let mut wait = tmo.read;
    if streamed {
        wait += tmo.send;
    }
    let deadline = tokio::time::Instant::from_std(sent) + wait;
    let mut timer = match conn.timer.take() {
        Some(mut t) => {
            t.as_mut().reset(deadline);
            t
        }
        None => Box::pin(tokio::time::sleep_until(deadline)),
    };
    let mut exchange = std::pin::pin!(h1::exchange(conn, dest.pc, head, body, pool, out));
    let r = std::future::poll_fn(|cx| match exchange.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
    })
    .await;
    let resp = match r {
        None => {
            return Err(Failed {
                kind: Failure::Timeout,
                msg: "upstream timed out (110: Connection timed out) while reading response header from upstream".into(),
                sent: true,
                stale: false,
                connect_time,
            })
        }
        Some(Err(e)) => {
            return Err(Failed {
                kind: e.kind,
                stale: reused && e.kind == Failure::Error,
                msg: e.msg,
                sent: true,
                connect_time,
            });
        }
        Some(Ok(mut r)) => {
            r.body.keep_timer(timer);
            r
        }
    };
    Ok(Got {
        resp,
        connect_time,
        // From the try's start, connecting included, as nginx counts $upstream_header_time.
        header_time: crate::clock::now().saturating_duration_since(t0),
    })
}

/// How much a `proxy_buffering on` read gathers before it hands data on.
const READ_AHEAD: usize = 64 * 1024;

/// How streaming the body ended.
pub enum Streamed {
    /// The upstream body was read to its end (whether or not the client took all of it): the
    /// connection may be reused.
    Complete,
    /// The client went away before the upstream body ended; what is left of it may go to
    /// [`h1::drain`].
    ClientGone,
    /// The upstream failed mid-body (logged); the client response was cut off.
    UpstreamFailed,
}

/// Stream the upstream body to the client. The head is already in `rc.st`. The body is
/// borrowed: it stays in the boxed response instead of being copied into this future.
pub async fn stream_body(
    rc: &Rc<ReqCtx>,
    pc: &ProxyConf,
    tmo: &Timeouts,
    body: &mut h1::Body,
    bytes: &mut u64,
    log: &dyn Fn(&str),
) -> Streamed {
    let read_timeout = tmo.read;
    if body.is_end() {
        let _ = filter::send(rc, true).await;
        return Streamed::Complete;
    }
    // A chunk read but not yet sent: kept as it came while it is alone, so that a response
    // read in one piece goes to the client without a copy.
    let mut pending: Option<Bytes> = None;
    loop {
        let frame = match body.chunk().now_or_never() {
            Some(f) => Ok(f),
            None => tokio::time::timeout(read_timeout, body.chunk()).await,
        };
        let failure = match frame {
            Err(_) => Some("upstream timed out (110: Connection timed out) while reading upstream"),
            Ok(Err(_)) => Some("upstream prematurely closed connection while reading upstream"),
            Ok(Ok(None)) => {
                let _ = filter::send(rc, true).await;
                return Streamed::Complete;
            }
            Ok(Ok(Some(d))) => {
                push(rc, &mut pending, d, bytes);
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
                if held >= READ_AHEAD || body.is_end() {
                    break;
                }
                match body.chunk().now_or_never() {
                    Some(Ok(Some(d))) => push(rc, &mut pending, d, bytes),
                    _ => break,
                }
            }
        }
        let eof = body.is_end();
        let sent = match pending.take() {
            Some(d) => filter::send_chunk(rc, d, eof).await,
            None => filter::send(rc, eof).await,
        };
        if eof {
            return Streamed::Complete;
        }
        if sent.is_err() {
            return Streamed::ClientGone;
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
