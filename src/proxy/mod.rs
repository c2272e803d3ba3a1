//! The reverse proxy: `proxy_pass` as a location's content handler.
//!
//! A request walks: resolve the target (upstream block, a name resolved at load, or a URL with
//! variables resolved now) -> decide the body (kept for retries or streamed) -> build the
//! upstream head (URI rules, proxy_set_header) -> tries (retry.rs: proxy_next_upstream,
//! backoff) each on a pooled or fresh connection (pool.rs, connect.rs) -> the accepted
//! response goes through the output filters (`http::filter::send`) as it streams (forward.rs),
//! or becomes a tunnel after a 101 (websocket.rs). Failures answer 502/504 and log in nginx's
//! words, naming the upstream.
//!
//! ```nginx
//! location /api/ {
//!     proxy_pass http://127.0.0.1:8080/v1/;   # /api/x -> /v1/x
//!     proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
//!     proxy_next_upstream error timeout http_502;
//! }
//! ```

pub mod conf;
pub mod upstream;

mod body;
mod connect;
mod forward;
mod h1;
mod headers;
mod pool;
mod retry;
mod vars;
mod websocket;

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use body::BodySrc;
use conf::{ProxyConf, ProxyPass, Target, Url};
use forward::{Dest, Got, ReqHead, Streamed, Timeouts};
use retry::{Budget, Failure, Peers, Selector};
use upstream::TryResult;

use crate::conf::model::LocMatch;
use crate::http::engine::Outcome;
use crate::http::request::{ReqBody, ReqCtx, ReqState};

pub use vars::UpstreamInfo;

/// The target of one request, evaluated.
struct Resolved<'a> {
    url: Cow<'a, Url>,
    /// The `upstream {}` block the host names, if any.
    group: Option<&'a Arc<upstream::Upstream>>,
    peers: Cow<'a, [(std::net::SocketAddr, Arc<str>)]>,
    /// Shared with `$proxy_host` (no copy per request).
    proxy_host: Arc<str>,
    dynamic: bool,
    start: usize,
}

/// Record a try in the request's `$upstream_*` facts.
fn record(
    rc: &ReqCtx,
    addr: &Arc<str>,
    status: u16,
    connect: Option<Duration>,
    header: Option<Duration>,
    response: Duration,
) {
    if let Some(u) = rc.st.borrow_mut().upstream.as_mut() {
        u.push(addr, status, connect, header, response);
    }
}

/// The content phase of a `proxy_pass` location, boxed: the proxy's state machine is large
/// and `phases` nests for subrequests, so it must not sit in the caller's frame (not even
/// as the temporary a `Box::pin(..)` there would make).
#[inline(never)]
pub fn content<'a>(
    rc: &'a Rc<ReqCtx>,
    pass: &'a Arc<ProxyPass>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + 'a>> {
    crate::pin_boxed!(handle(rc, pass))
}

/// Serve the request by proxying it (the content phase of a `proxy_pass` location).
pub async fn handle<'a>(rc: &'a Rc<ReqCtx>, pass: &'a Arc<ProxyPass>) -> Outcome {
    let pc = rc.st.borrow().conf.proxy.clone();
    // A fixed target needs no waiting; the resolver's larger future is boxed away from the
    // common case (every future here is moved as a whole when it starts).
    let target = match &pass.target {
        Target::Fixed(u) => fixed(rc, pass, u),
        Target::Dynamic(_) => Box::pin(resolve(rc, pass)).await,
    };
    let target = match target {
        Ok(t) => t,
        Err(code) => return Outcome::Status(code),
    };
    rc.st.borrow_mut().upstream = Some(Box::new(UpstreamInfo::new(
        target.proxy_host.clone(),
        target.url.port,
    )));
    let mut peers = match &target.group {
        Some(g) => {
            let mut p = g.picker_for(rc);
            p.limit_tries(pc.next_upstream_tries);
            Peers::Group(p)
        }
        None => Peers::Addrs(Selector::new(&target.peers, target.start)),
    };
    let retries = pc.next_upstream != 0 && peers.has_more(1);
    let src = match body_source(rc, &pc, retries) {
        Some(s) => s,
        None => Box::pin(read_kept(rc)).await,
    };
    let mut src = match src {
        Ok(s) => s,
        Err(code) => return Outcome::Status(code),
    };
    let (head, location) = {
        let st = rc.st.borrow();
        let location = st.location.clone();
        let prefix = location.as_deref().and_then(location_prefix);
        let uri = upstream_uri(&st, &target, prefix);
        // nginx sends a length when the client's request had a body (or a body was made).
        let declared = client_length(&st);
        let len = match &src {
            BodySrc::Kept(b) => (declared.is_some()
                || !b.is_empty()
                || st.headers.contains_key(http::header::TRANSFER_ENCODING))
            .then_some(b.len() as u64),
            BodySrc::Stream(_) => declared,
            BodySrc::Empty => declared.filter(|l| *l == 0),
        };
        let head = ReqHead {
            method: st.method.clone(),
            uri,
            headers: headers::request(rc, &st, &pc, &target.proxy_host, len),
            http11: pc.http11,
        };
        (head, location)
    };
    let tls_name = if target.url.https {
        let st = rc.st.borrow();
        Some(match &pc.ssl.name {
            Some(t) => crate::http::variables::eval_string(rc, &st, t),
            None => target.url.host.clone(),
        })
    } else {
        None
    };
    let dest = Dest {
        pc: &pc,
        https: target.url.https,
        ssl: &pc.ssl,
        tls_name: tls_name.as_deref(),
        sni: if pc.ssl.server_name {
            tls_name.as_deref()
        } else {
            None
        },
        keepalive: target.group.as_ref().and_then(|g| {
            g.keepalive.as_ref().map(|k| pool::Limits {
                max_idle: k.max_idle,
                timeout: Duration::from_millis(k.timeout_ms),
                requests: k.requests.max(1),
                time: match k.time_ms {
                    0 => Duration::MAX,
                    t => Duration::from_millis(t),
                },
            })
        }),
    };
    let scheme = if target.url.https { "https" } else { "http" };
    let mut budget = Budget::new(&head.method, &pc);
    loop {
        let peer = match peers.next(rc).await {
            Ok(p) => p,
            Err(code) => {
                if target.group.is_none() {
                    log_upstream(
                        rc,
                        "no live upstreams while connecting to upstream",
                        &target.proxy_host,
                    );
                }
                return Outcome::Status(code);
            }
        };
        let tmo = Timeouts::of(&pc, peers.timeouts());
        budget.tries += 1;
        let mut t0 = crate::clock::now();
        let upstream = |uri: &str| format!("{}://{}{}", scheme, peer.name, uri);
        let mut use_pool = true;
        let res = loop {
            // The response's (empty) map keeps its room for the upstream's headers; one that
            // Lua filled already is left as it was.
            let out = {
                let mut st = rc.st.borrow_mut();
                match st.resp_headers.is_empty() {
                    true => std::mem::take(&mut st.resp_headers),
                    false => http::HeaderMap::new(),
                }
            };
            let r = forward::attempt(&peer, &dest, &tmo, &head, &mut src, use_pool, t0, out).await;
            match r {
                // A kept-alive connection the upstream had closed: once more on a fresh one,
                // not counted as a try (nginx does the same for cached connections).
                // Its times start again: what was lost on the dead connection is no connect.
                Err(f) if f.stale && use_pool && src.replayable() => {
                    use_pool = false;
                    t0 = crate::clock::now();
                }
                r => break r,
            }
        };
        match res {
            Err(f) => {
                let elapsed = crate::clock::now().saturating_duration_since(t0);
                record(rc, &peer.name, f.status(), f.connect_time, None, elapsed);
                log_upstream(rc, &f.msg, &upstream(&head.uri));
                peers.report(&peer, TryResult::Fail { elapsed });
                let again = peers.has_more(budget.tries)
                    && budget.may_retry(&pc, f.kind, f.sent, src.replayable());
                if !again {
                    return Outcome::Status(f.status());
                }
            }
            Ok(got) => {
                let status = got.resp.status;
                // The head's arrival serves the record and the balancer's report.
                let elapsed = got.header_time;
                record(
                    rc,
                    &peer.name,
                    status,
                    got.connect_time,
                    Some(got.header_time),
                    elapsed,
                );
                let listed = pc.next_upstream & conf::next::for_status(status) != 0;
                let again = listed
                    && peers.has_more(budget.tries)
                    && budget.may_retry(&pc, Failure::Status(status), true, src.replayable());
                peers.report(
                    &peer,
                    if listed {
                        TryResult::Status {
                            elapsed,
                            status,
                            failed: status >= 500,
                        }
                    } else {
                        TryResult::Ok { elapsed }
                    },
                );
                if !again {
                    let prefix = location.as_deref().and_then(location_prefix).unwrap_or("");
                    let default_from =
                        || match (&pass.target, location.as_deref().and_then(location_prefix)) {
                            (Target::Fixed(u), Some(p)) => Some(format!(
                                "{}://{}{}",
                                scheme,
                                target.proxy_host,
                                u.uri.as_deref().unwrap_or(p)
                            )),
                            _ => None,
                        };
                    let upstream = || upstream(&head.uri);
                    let ctx = Respond {
                        pc: &pc,
                        tmo: &tmo,
                        upstream: &upstream,
                        default_from: &default_from,
                        prefix,
                        t0,
                    };
                    return respond(rc, ctx, got).await;
                }
            }
        }
        if let Some(d) = budget.backoff(&pc) {
            tokio::time::sleep(d).await;
        }
    }
}

struct Respond<'a> {
    pc: &'a ProxyConf,
    tmo: &'a Timeouts,
    /// The `upstream: "..."` text of log lines, made only when one is written.
    upstream: &'a dyn Fn() -> String,
    default_from: &'a dyn Fn() -> Option<String>,
    prefix: &'a str,
    t0: Instant,
}

/// Send the accepted response to the client.
async fn respond(rc: &Rc<ReqCtx>, c: Respond<'_>, got: Got) -> Outcome {
    // The response stays in its box: the body streams from there, unmoved.
    let mut resp = got.resp;
    let (status, relocates) = (resp.status, resp.relocates);
    if c.pc.intercept_errors && status >= 300 {
        let has_page = rc
            .st
            .borrow()
            .conf
            .error_pages
            .iter()
            .any(|p| p.codes.contains(&status));
        if has_page {
            return Outcome::Status(status);
        }
    }
    let upgrade = status == 101;
    {
        let mut guard = rc.st.borrow_mut();
        let st = &mut *guard;
        st.status = status;
        st.resp_headers = std::mem::take(&mut resp.headers);
        if let Some(u) = st.upstream.as_mut() {
            u.head = Some(std::mem::take(&mut resp.raw));
        }
        if relocates {
            headers::redirect(rc, st, c.pc, c.default_from, c.prefix);
        }
    }
    if upgrade {
        let client = rc.st.borrow_mut().on_upgrade.take();
        let Some(client) = client else {
            log_upstream(rc, "upstream sent unexpected 101 without upgrade request while reading response header from upstream", &(c.upstream)());
            let mut st = rc.st.borrow_mut();
            st.status = 0;
            st.resp_headers.clear();
            return Outcome::Status(502);
        };
        return Box::pin(switch(rc, &c, client, resp.body)).await;
    }
    let log = |msg: &str| log_upstream(rc, msg, &(c.upstream)());
    let mut len = 0;
    let r = forward::stream_body(rc, c.pc, c.tmo, &mut resp.body, &mut len, &log).await;
    if let Some(u) = rc.st.borrow_mut().upstream.as_mut() {
        u.response_length = len;
        u.set_last_response_time(crate::clock::now().saturating_duration_since(c.t0));
    }
    match r {
        Streamed::ClientGone => h1::drain(resp.body, c.tmo.read),
        Streamed::Complete | Streamed::UpstreamFailed => {}
    }
    Outcome::Done
}

/// A proxy_pass URL without variables: its upstream block or the addresses found at load.
fn fixed<'a>(rc: &'a ReqCtx, pass: &'a ProxyPass, u: &'a Url) -> Result<Resolved<'a>, u16> {
    let group = if u.addrs.is_empty() {
        // Checked at load: the host names an upstream block.
        match rc.env.upstreams.get(&u.host) {
            Some(g) => Some(g),
            None => {
                crate::log::request_error(
                    rc,
                    crate::log::Level::Error,
                    &format!("no upstream \"{}\"", u.host),
                );
                return Err(502);
            }
        }
    } else {
        None
    };
    Ok(Resolved {
        group,
        url: Cow::Borrowed(u),
        peers: Cow::Borrowed(&pass.peers),
        proxy_host: pass.proxy_host.clone(),
        dynamic: false,
        start: pass.rr.fetch_add(1, Ordering::Relaxed),
    })
}

/// After a 101: the head goes to the client, then bytes flow both ways until either side
/// ends. Boxed by the caller: rare, and its state would make every response's future larger.
async fn switch(
    rc: &Rc<ReqCtx>,
    c: &Respond<'_>,
    client: hyper::upgrade::OnUpgrade,
    body: h1::Body,
) -> Outcome {
    if crate::http::filter::send(rc, true).await.is_err() {
        return Outcome::Done;
    }
    let Some((up, early)) = body.into_upgraded() else {
        return Outcome::Done;
    };
    if let Err(e) = websocket::tunnel(client, up.io, early, c.tmo.read).await {
        log_upstream(rc, &e, &(c.upstream)());
    }
    Outcome::Done
}

/// The target URL of this request, with the addresses to try.
async fn resolve<'a>(rc: &'a Rc<ReqCtx>, pass: &'a ProxyPass) -> Result<Resolved<'a>, u16> {
    let url = match &pass.target {
        Target::Fixed(u) => return fixed(rc, pass, u),
        Target::Dynamic(t) => {
            let s = {
                let st = rc.st.borrow();
                crate::http::variables::eval_string(rc, &st, t)
            };
            match Url::parse(&s) {
                Ok(u) => u,
                Err(e) => {
                    crate::log::request_error(rc, crate::log::Level::Error, &e);
                    return Err(500);
                }
            }
        }
    };
    if !url.explicit_port {
        if let Some(g) = rc.env.upstreams.get(&url.host) {
            return Ok(Resolved {
                group: Some(g),
                peers: Cow::Owned(Vec::new()),
                proxy_host: Arc::from(url.proxy_host()),
                url: Cow::Owned(url),
                dynamic: true,
                start: 0,
            });
        }
    }
    let resolver = rc.st.borrow().conf.resolver.clone();
    let is_ip = url.host.parse::<std::net::IpAddr>().is_ok();
    if !is_ip && resolver.is_none() {
        crate::log::request_error(
            rc,
            crate::log::Level::Error,
            &format!("no resolver defined to resolve {}", url.host),
        );
        return Err(502);
    }
    let addrs = match crate::net::resolve(resolver.as_ref(), &url.host, url.port).await {
        Ok(a) => a,
        Err(e) => {
            crate::log::request_error(rc, crate::log::Level::Error, &e);
            return Err(502);
        }
    };
    Ok(Resolved {
        group: None,
        peers: Cow::Owned(conf::addr_names(&addrs)),
        proxy_host: Arc::from(url.proxy_host()),
        url: Cow::Owned(url),
        dynamic: true,
        start: pass.rr.fetch_add(1, Ordering::Relaxed),
    })
}

/// The body's Content-Length as the client sent it.
fn client_length(st: &ReqState) -> Option<u64> {
    st.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Decide how the body goes upstream: kept in memory (replayable) or streamed. `None`: it is
/// to be kept and must be read first ([`read_kept`]).
fn body_source(rc: &ReqCtx, pc: &ProxyConf, retries: bool) -> Option<Result<BodySrc, u16>> {
    if !pc.pass_request_body {
        return Some(Ok(BodySrc::Empty));
    }
    let len = {
        let st = rc.st.borrow();
        match &st.body {
            ReqBody::Read(b) => return Some(Ok(BodySrc::Kept(b.clone()))),
            ReqBody::Discarded => return Some(Ok(BodySrc::Empty)),
            // A request without a body (most) needs no header lookup.
            ReqBody::Unread(i) if http_body::Body::is_end_stream(i) => {
                return Some(Ok(BodySrc::Empty))
            }
            ReqBody::Unread(_) => client_length(&st),
        }
    };
    let keep = pc.request_buffering
        // HTTP/1.0 has no chunked encoding: the length must be known.
        || (!pc.http11 && len.is_none())
        || (retries && len.is_some_and(|l| l <= pc.client_body_buffer_size));
    if keep {
        return None;
    }
    let mut st = rc.st.borrow_mut();
    Some(match std::mem::replace(&mut st.body, ReqBody::Discarded) {
        ReqBody::Unread(i) => Ok(BodySrc::Stream(Some(i))),
        other => {
            st.body = other;
            Ok(BodySrc::Empty)
        }
    })
}

/// Read the client's body whole, to be kept for every try.
async fn read_kept(rc: &Rc<ReqCtx>) -> Result<BodySrc, u16> {
    crate::http::engine::read_body(rc).await?;
    Ok(match &rc.st.borrow().body {
        ReqBody::Read(b) => BodySrc::Kept(b.clone()),
        _ => BodySrc::Empty,
    })
}

/// The location's literal prefix (what a URI part replaces).
fn location_prefix(l: &crate::conf::model::Location) -> Option<&str> {
    match &l.matcher {
        LocMatch::Prefix(p) | LocMatch::PrefixNoRegex(p) | LocMatch::Exact(p) => Some(p),
        _ => None,
    }
}

/// nginx's URI rules: the client's own request line when the URI is unchanged and proxy_pass
/// has no URI part; the location prefix replaced by the URI part; the rewritten URI (escaped)
/// once a rewrite or redirect changed it; a URI part with variables as it is.
fn upstream_uri(st: &ReqState, t: &Resolved, prefix: Option<&str>) -> String {
    if t.dynamic {
        if let Some(u) = &t.url.uri {
            return u.clone();
        }
    }
    let raw_path = st.request_uri.split('?').next().unwrap_or("");
    let changed = st.internal
        || (raw_path != st.uri
            && crate::http::engine::normalize_uri(raw_path).as_deref() != Some(st.uri.as_str()));
    let mut out = String::with_capacity(st.request_uri.len() + 16);
    match (&t.url.uri, prefix) {
        (None, _) if !changed => return st.request_uri.clone(),
        (Some(part), Some(p)) if !changed => {
            out.push_str(part);
            let rest = st.uri.strip_prefix(p).unwrap_or(&st.uri);
            escape_into(&mut out, rest);
        }
        _ => escape_into(&mut out, &st.uri),
    }
    if let Some(a) = st.args.as_deref().filter(|a| !a.is_empty()) {
        out.push('?');
        out.push_str(a);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// nginx's `ngx_escape_uri` for a path: spaces, controls, non-ASCII and the bytes that would
/// end or change the path.
fn escape_into(out: &mut String, s: &str) {
    for &b in s.as_bytes() {
        if b <= 0x20 || b >= 0x7f || b"\"#%<>?\\^`{|}".contains(&b) {
            out.push_str(&format!("%{:02X}", b));
        } else {
            out.push(b as char);
        }
    }
}

/// An error-log line about an upstream, in nginx's shape
/// (`..., request: "GET / HTTP/1.1", upstream: "http://127.0.0.1:1234/", host: "x"`).
fn log_upstream(rc: &ReqCtx, msg: &str, upstream: &str) {
    use crate::log::Level;
    if !crate::log::enabled(Level::Error) {
        return;
    }
    let tail = match rc.st.try_borrow() {
        Ok(st) => {
            let version = match st.version {
                http::Version::HTTP_10 => "HTTP/1.0",
                http::Version::HTTP_2 => "HTTP/2.0",
                _ => "HTTP/1.1",
            };
            let mut t = format!(
                ", client: {}, server: {}, request: \"{} {} {}\", upstream: \"{}\"",
                st.remote(&rc.conn).ip(),
                st.server.primary_name,
                st.method,
                st.request_uri,
                version,
                upstream
            );
            if let Some(h) = st.headers.get("host").and_then(|h| h.to_str().ok()) {
                t.push_str(&format!(", host: \"{}\"", h));
            }
            t
        }
        Err(_) => format!(
            ", client: {}, upstream: \"{}\"",
            rc.conn.remote.ip(),
            upstream
        ),
    };
    crate::log::log(Level::Error, Some(rc.conn.id), &format!("{}{}", msg, tail));
}
