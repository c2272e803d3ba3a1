//! The phase engine: the whole lifecycle of a request in one readable file, in nginx's order.
//!
//! ```text
//! find server -> server rewrite -> find location -> rewrite (set/rewrite/if/return,
//! rewrite_by_lua) -> access (access_by_lua) -> content (return | content_by_lua | static)
//! -> header filter -> body filter -> log
//! ```
//! Every phase may end the request (`ngx.exit`, `return`, an error): the engine then skips to
//! the special response (or `error_page`), the filters and the log phase, as nginx does.
//! A subrequest (`ngx.location.capture`, see `subrequest.rs`) walks the same phases through
//! [`run_subrequest`]; its filtered output lands in a capture sink instead of the client.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::body::Body;
use super::filter;
use super::location;
use super::request::{ConnInfo, Env, Exit, HeadSlot, Phase, ReqBody, ReqCtx, ReqState};
use super::rewrite::{self, RwResult};
use super::special;
use crate::conf::model::{Content, Location, Server, ServerName};
use crate::lua::phase::{self as lua_phase, Outcome as LuaOutcome};

/// How the main phases ended.
#[derive(Debug)]
pub enum Outcome {
    /// The content handler produced the response (it may still have buffered output).
    Done,
    /// Finalize with this status: a special response unless headers were already sent.
    Status(u16),
}

/// A request's phase walk, boxed: it is large (phases, error_page, finalize and log are all
/// in it) and hyper moves the futures it holds.
pub type Walk = Pin<Box<dyn Future<Output = ()>>>;

thread_local! {
    /// Whether a walk that loses its connection may become a task of its own (set while
    /// the worker's `LocalSet` runs).
    static ADOPT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Let walks that lose their connection go on as tasks on this thread (see [`orphan`]);
/// the worker turns this on while its `LocalSet` runs, and off before it drops.
pub fn adopt_orphans(on: bool) {
    ADOPT.with(|a| a.set(on));
}

/// A walk whose connection dropped it (the client left, or hyper finished the response
/// while the walk still had work after it): it goes on as its own task, as an nginx request
/// goes on after its client left (the log phase runs, the upstream connection is released).
pub fn orphan(walk: Walk) {
    if ADOPT.with(|a| a.get()) {
        tokio::task::spawn_local(walk);
    }
}

/// Serve one request on a worker: builds the request; hyper's connection task then polls its
/// phase walk ([`ResponseFuture`]) until the head is ready. A walk that waits for a response
/// (a proxy, a cosocket) is woken as the connection task itself, without a task of its own
/// and a hop back to the connection; only one with work left after its head (streaming, waits
/// after `ngx.eof`) becomes a task then. The returned future stays small: hyper moves it.
pub fn serve(env: Rc<Env>, conn: Rc<ConnInfo>, req: Request<Incoming>) -> ResponseFuture {
    match new_request(env, conn, req) {
        Ok(rc) => ResponseFuture::Walk(Some((crate::pin_boxed!(run(rc.clone())), rc))),
        Err(code) => ResponseFuture::Error(code),
    }
}

/// The response head of a request being served (see [`serve`]), with the walk when it is
/// not finished yet.
pub enum ResponseFuture {
    Walk(Option<(Walk, Rc<ReqCtx>)>),
    /// Refused before the phases ran (a bad request line or Host).
    Error(u16),
}

impl Future for ResponseFuture {
    type Output = Response<Body>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let slot = match self.get_mut() {
            ResponseFuture::Walk(slot) => slot,
            ResponseFuture::Error(code) => return Poll::Ready(plain_error(*code)),
        };
        let Some((walk, rc)) = slot.as_mut() else {
            return Poll::Ready(plain_error(500));
        };
        let done = walk.as_mut().poll(cx).is_ready();
        let resp = {
            let mut st = rc.st.borrow_mut();
            match std::mem::replace(&mut st.head, HeadSlot::Done) {
                HeadSlot::Ready(r) => r,
                HeadSlot::Waiting if !done => {
                    st.head = HeadSlot::Waiting;
                    return Poll::Pending;
                }
                // The walk ended without a response: nothing to send.
                _ => plain_error(500),
            }
        };
        // A walk with work left after its head (a streamed body, waits after ngx.eof, the
        // log phase after those) goes on as its own task: it must not wait for hyper to ask
        // for the next frame (a slow client would hold the log phase and the upstream).
        if let Some((walk, _)) = slot.take() {
            if !done {
                orphan(walk);
            }
        }
        Poll::Ready(resp)
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        if let Some((walk, rc)) = match self {
            ResponseFuture::Walk(slot) => slot.take(),
            ResponseFuture::Error(_) => None,
        } {
            // The client went before the head: the walk learns it from the slot.
            // Never borrowed here: hyper drops this future between polls of the walk.
            let st = rc.st.try_borrow_mut();
            debug_assert!(
                st.is_ok(),
                "request state borrowed while its connection drops it"
            );
            if let Ok(mut st) = st {
                st.head = match st.head {
                    HeadSlot::Waiting => HeadSlot::Gone,
                    _ => HeadSlot::Done,
                };
            }
            orphan(walk);
        }
    }
}

fn plain_error(code: u16) -> Response<Body> {
    let mut r = Response::new(Body::full(special::page(code, true)));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html"),
    );
    r
}

fn new_request(
    env: Rc<Env>,
    conn: Rc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Rc<ReqCtx>, u16> {
    let (mut parts, body) = req.into_parts();
    let request_uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    // The path is only read by normalize_uri (which copies it): borrow, do not copy it twice.
    // A byte scan: request paths are short, and memchr's setup costs more than it saves here.
    let (raw_path, args) = match request_uri.bytes().position(|b| b == b'?') {
        Some(i) => (&request_uri[..i], Some(request_uri[i + 1..].to_string())),
        None => (request_uri.as_str(), None),
    };
    let uri = normalize_uri(raw_path).ok_or(400u16)?;
    let mut hosts = parts.headers.get_all(http::header::HOST).iter();
    match hosts.next() {
        // nginx: "client sent HTTP/1.1 request without "Host" header".
        None if parts.version == http::Version::HTTP_11 => return Err(400),
        // nginx: "client sent invalid host header" / "client sent duplicate host header".
        Some(h) if !valid_host(h.as_bytes()) || hosts.next().is_some() => return Err(400),
        _ => {}
    }
    if !parts
        .method
        .as_str()
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'_' || b == b'-')
    {
        // nginx's request-line parser only knows upper-case method names.
        return Err(400);
    }
    let server = find_server(&env.cfg.http.servers, conn.local, &parts.headers).ok_or(400u16)?;
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    conn.requests.set(conn.requests.get() + 1);
    // Built inside the Rc's allocation: the state is close to a kilobyte, and building it on
    // the stack first costs a copy per move (state -> context -> Rc).
    Ok(ReqCtx::new_rc(conn, env, None, move || {
        let mut st = ReqState::new(
            parts.method,
            uri,
            args,
            request_uri,
            parts.version,
            parts.headers,
            ReqBody::Unread(body),
            server,
        );
        st.head = HeadSlot::Waiting;
        st.on_upgrade = on_upgrade;
        st
    }))
}

/// Decode `%XX`, merge slashes and resolve `.`/`..` as nginx does; `None` when the path
/// climbs above the root or is not a path (nginx answers 400).
pub fn normalize_uri(raw: &str) -> Option<String> {
    // Most paths need no work: no escapes, no empty or dot segments.
    if plain_path(raw.as_bytes()) {
        return Some(raw.to_string());
    }
    if !raw.starts_with('/') {
        return if raw == "*" { Some("*".into()) } else { None };
    }
    let decoded = decode_path(raw)?;
    let decoded = String::from_utf8_lossy(&decoded).into_owned();
    let mut segs: Vec<&str> = Vec::new();
    for seg in decoded.split('/').skip(1) {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop()?;
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty()
        || decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
    {
        out.push('/');
    }
    Some(out)
}

/// Whether a path starts with `/` and has no `%`, `//` or `/.`: one pass where three
/// substring searches took three.
fn plain_path(raw: &[u8]) -> bool {
    if raw.first() != Some(&b'/') {
        return false;
    }
    let mut after_slash = false;
    for &c in raw {
        match c {
            b'%' => return false,
            b'/' | b'.' if after_slash => return false,
            _ => {}
        }
        after_slash = c == b'/';
    }
    true
}

/// `%XX` decoding as nginx's URI parser does it: a `%` without two hex digits, or an
/// encoded NUL, makes the request invalid (`None`, a 400) instead of passing through.
fn decode_path(raw: &str) -> Option<Vec<u8>> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
            let v = (hex(i + 1)? * 16 + hex(i + 2)?) as u8;
            if v == 0 {
                return None;
            }
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// nginx's `ngx_http_validate_host`: no `/`, `..` or control bytes, and not empty once
/// the port and a trailing dot are cut. Guards `$host` users (paths, cache keys) from the
/// client.
fn valid_host(h: &[u8]) -> bool {
    let mut host_len = h.len();
    let mut dot_pos: Option<usize> = None;
    let mut in_literal = false;
    let mut in_rest = false;
    for (i, &c) in h.iter().enumerate() {
        match c {
            b'.' => {
                if i > 0 && dot_pos == Some(i - 1) {
                    return false;
                }
                dot_pos = Some(i);
            }
            b':' if !in_rest && !in_literal => {
                host_len = i;
                in_rest = true;
            }
            b'[' if i == 0 => in_literal = true,
            b']' if in_literal && !in_rest => {
                host_len = i + 1;
                in_rest = true;
                in_literal = false;
            }
            b'/' | 0..=0x20 | 0x7f => return false,
            _ => {}
        }
    }
    if host_len > 0 && dot_pos == Some(host_len - 1) {
        host_len -= 1;
    }
    host_len > 0
}

/// nginx's virtual server choice: among the servers listening on this address, exact name,
/// longest `*.` suffix, longest `.*` prefix, first matching regex, else the default server.
fn find_server(
    servers: &[Arc<Server>],
    local: std::net::SocketAddr,
    headers: &HeaderMap,
) -> Option<Arc<Server>> {
    if let [only] = servers {
        return Some(only.clone());
    }
    let on_addr: Vec<&Arc<Server>> = servers
        .iter()
        .filter(|s| {
            s.listens.iter().any(|l| {
                l.addr.port() == local.port()
                    && (l.addr.ip().is_unspecified() || l.addr.ip() == local.ip())
            })
        })
        .collect();
    let candidates = if on_addr.is_empty() {
        servers.iter().collect()
    } else {
        on_addr
    };
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            h.rsplit_once(':')
                .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                .map(|(h, _)| h)
                .unwrap_or(h)
        })
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase());
    if let Some(host) = host {
        for s in &candidates {
            if s.names
                .iter()
                .any(|n| matches!(n, ServerName::Exact(e) if *e == host))
            {
                return Some((*s).clone());
            }
        }
        let mut best: Option<(&Arc<Server>, usize)> = None;
        for s in &candidates {
            for n in &s.names {
                if let ServerName::Suffix(suf, bare) = n {
                    if (host.ends_with(suf.as_str()) || (*bare && host == suf[1..]))
                        && best.is_none_or(|(_, l)| suf.len() > l)
                    {
                        best = Some((s, suf.len()));
                    }
                }
            }
        }
        if best.is_none() {
            for s in &candidates {
                for n in &s.names {
                    if let ServerName::Prefix(p) = n {
                        if host.starts_with(p.as_str()) && best.is_none_or(|(_, l)| p.len() > l) {
                            best = Some((s, p.len()));
                        }
                    }
                }
            }
        }
        if let Some((s, _)) = best {
            return Some(s.clone());
        }
        for s in &candidates {
            if s.names
                .iter()
                .any(|n| matches!(n, ServerName::Regex(r) if r.captures(host.as_bytes()).is_some()))
            {
                return Some((*s).clone());
            }
        }
    }
    candidates
        .iter()
        .find(|s| {
            s.listens
                .iter()
                .any(|l| l.default_server && l.addr.port() == local.port())
        })
        .or_else(|| candidates.first())
        .map(|s| (*s).clone())
}

/// The whole request after parsing: phases, finalization, log.
async fn run(rc: Rc<ReqCtx>) {
    // post-read: realip with the server's settings, before anything reads the address.
    super::realip::run(&rc);
    let mut outcome = phases(&rc, None).await;
    // error_page: an internal redirect for a status, once.
    if let Outcome::Status(code) = outcome {
        if let Some(o) = error_page(&rc, code).await {
            outcome = o;
        }
    }
    finalize(&rc, outcome).await;
    log_phase(&rc).await;
    super::limits::leave(&rc);
}

async fn error_page(rc: &Rc<ReqCtx>, code: u16) -> Option<Outcome> {
    let (page, target) = {
        let st = rc.st.borrow();
        if st.headers_sent || st.error_page_done {
            return None;
        }
        let page = st
            .conf
            .error_pages
            .iter()
            .find(|p| p.codes.contains(&code))?
            .clone();
        let target = super::variables::eval_string(rc, &st, &page.uri);
        (page, target)
    };
    {
        let mut st = rc.st.borrow_mut();
        st.error_page_done = true;
        st.status = match page.override_status {
            None => code,
            Some(Some(c)) => c,
            Some(None) => 0,
        };
        if target.starts_with("http://") || target.starts_with("https://") {
            st.status = if matches!(st.status, 301 | 302 | 303 | 307 | 308) {
                st.status
            } else {
                302
            };
            if let Ok(v) = HeaderValue::from_str(&target) {
                st.resp_headers.insert(http::header::LOCATION, v);
            }
            return Some(Outcome::Status(st.status));
        }
        if st.method != http::Method::HEAD {
            st.method = http::Method::GET;
        }
        st.internal = true;
        st.resp_headers.clear();
        st.out.clear();
    }
    let named = target.strip_prefix('@').map(str::to_string);
    let forced = match &named {
        Some(n) => Some(rc.st.borrow().server.named.get(n).cloned()?),
        None => {
            let mut st = rc.st.borrow_mut();
            let (p, a) = match target.split_once('?') {
                Some((p, a)) => (p.to_string(), Some(a.to_string())),
                None => (target.clone(), None),
            };
            st.uri = p;
            if a.is_some() {
                st.args = a;
            }
            None
        }
    };
    let saved = rc.st.borrow().status;
    let o = phases(rc, forced).await;
    // The page keeps the original status unless `=code` asked otherwise.
    let mut st = rc.st.borrow_mut();
    if saved != 0 {
        st.status = saved;
    }
    Some(match o {
        Outcome::Status(c) if saved != 0 && c >= 400 => Outcome::Status(c),
        Outcome::Status(c) => Outcome::Status(c),
        Outcome::Done => Outcome::Done,
    })
}

/// The main phases (server rewrite to content). `forced` starts at a named location.
async fn phases(rc: &Rc<ReqCtx>, mut forced: Option<Arc<Location>>) -> Outcome {
    let mut server_rewrite = forced.is_none();
    loop {
        if rc.st.borrow().redirects > 10 {
            crate::log::request_error(
                rc,
                crate::log::Level::Error,
                &format!(
                    "rewrite or internal redirection cycle while processing \"{}\"",
                    rc.st.borrow().uri
                ),
            );
            return Outcome::Status(500);
        }
        if server_rewrite {
            let server = rc.st.borrow().server.clone();
            match rewrite::run(rc, &server.rewrites).await {
                RwResult::Continue | RwResult::Break | RwResult::Last => {}
                RwResult::Finish(o) => return o,
            }
        }
        server_rewrite = false;
        // find config
        let found = match forced.take() {
            Some(l) => Some(location::Found {
                loc: l,
                captures: None,
            }),
            None => {
                let st = rc.st.borrow();
                location::find(&st.server.locations, &st.uri)
            }
        };
        {
            let mut st = rc.st.borrow_mut();
            match found {
                Some(f) => {
                    if let Some(c) = &f.captures {
                        let uri = st.uri.clone();
                        super::variables::set_captures(&mut st, uri.as_bytes(), c);
                    }
                    st.conf = f.loc.conf.clone();
                    st.location = Some(f.loc);
                }
                None => {
                    st.conf = st.server.conf.clone();
                    st.location = None;
                }
            }
            if st.conf.internal && !st.internal {
                return Outcome::Status(404);
            }
            let limit = st.conf.client_max_body_size;
            if limit > 0 {
                let len = match &st.body {
                    // On the first pass the headers are still hyper's, and hyper framed the
                    // body by that Content-Length (or by chunks, with no exact length): its
                    // size hint is the header's value without a lookup. Later passes may
                    // follow a handler that changed the header.
                    ReqBody::Unread(b) if !st.internal && st.redirects == 0 => {
                        http_body::Body::size_hint(b).exact()
                    }
                    _ => st
                        .headers
                        .get(http::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok()),
                };
                if len.is_some_and(|l| l > limit) {
                    drop(st);
                    crate::log::request_error(
                        rc,
                        crate::log::Level::Error,
                        &format!(
                            "client intended to send too large body: {} bytes",
                            len.unwrap_or(0)
                        ),
                    );
                    return Outcome::Status(413);
                }
            }
        }
        // rewrite
        let loc = rc.st.borrow().location.clone();
        let ops: &[crate::conf::model::RewriteOp] =
            loc.as_ref().map(|l| l.rewrites.as_slice()).unwrap_or(&[]);
        match rewrite::run(rc, ops).await {
            RwResult::Continue | RwResult::Break => {}
            RwResult::Last => {
                rc.st.borrow_mut().redirects += 1;
                continue;
            }
            RwResult::Finish(o) => return o,
        }
        {
            // headers-more input headers run after the rewrite module's directives.
            let mut st = rc.st.borrow_mut();
            let conf = st.conf.clone();
            for m in &conf.more_set_input_headers {
                filter::apply_more(rc, &mut st, m, false);
            }
        }
        // rewrite_by_lua, access_by_lua, content_by_lua, in nginx's order.
        let conf = rc.st.borrow().conf.clone();
        let content_lua = match &conf.content {
            Content::Lua(chunk) => Some(chunk),
            Content::Static | Content::Proxy(_) => None,
        };
        // nginx skips the whole access phase for subrequests (ngx_http_core_access_phase), so
        // an access_by_lua that captures its own location does not recurse.
        let access_lua = conf.access_by_lua.as_ref().filter(|_| !rc.is_subrequest());
        let steps = [
            (conf.rewrite_by_lua.as_ref(), Phase::Rewrite),
            (access_lua, Phase::Access),
            (content_lua, Phase::Content),
        ];
        let mut redirect = None;
        for (chunk, phase) in steps {
            if phase == Phase::Access && !rc.is_subrequest() {
                // preaccess + access modules: realip, max_in_flight, allow/deny (the main
                // request already passed them; nginx counts and checks it alone).
                if let Some(o) = super::access::check(rc) {
                    return o;
                }
            }
            let Some(chunk) = chunk else { continue };
            match lua_step(rc, chunk, phase).await {
                Step::Next => {}
                Step::Again(l) => {
                    redirect = Some(l);
                    break;
                }
                Step::Finish(o) => return o,
            }
        }
        if let Some(l) = redirect {
            forced = l;
            server_rewrite = forced.is_none();
            continue;
        }
        return match (&conf.content, content_lua) {
            (Content::Proxy(p), _) => crate::proxy::content(rc, p).await,
            (_, Some(_)) => Outcome::Done,
            _ => super::static_files::serve(rc).await,
        };
    }
}

enum Step {
    Next,
    /// Internal redirect: run the phases again (at a named location when `Some`).
    Again(Option<Arc<Location>>),
    Finish(Outcome),
}

async fn lua_step(rc: &Rc<ReqCtx>, chunk: &crate::conf::model::LuaChunk, phase: Phase) -> Step {
    match lua_phase::run(rc, chunk, phase).await {
        LuaOutcome::Ok(_) => Step::Next,
        LuaOutcome::Error(_) => Step::Finish(Outcome::Status(500)),
        LuaOutcome::Exit(Exit::Status(code)) => {
            let sent = output_started(&rc.st.borrow());
            if code == 0 {
                // ngx.OK ends this phase only; in content it ends the request.
                return if phase == Phase::Content {
                    Step::Finish(Outcome::Done)
                } else {
                    Step::Next
                };
            }
            if sent {
                return Step::Finish(Outcome::Done);
            }
            if code < 0 {
                return Step::Finish(Outcome::Status(500));
            }
            if (200..300).contains(&code) && phase == Phase::Content {
                let mut st = rc.st.borrow_mut();
                if st.status == 0 {
                    st.status = code as u16;
                }
                return Step::Finish(Outcome::Done);
            }
            Step::Finish(Outcome::Status(code.clamp(0, 999) as u16))
        }
        LuaOutcome::Exit(Exit::Exec(uri, args)) => {
            let mut st = rc.st.borrow_mut();
            // An internal redirect starts a fresh ngx.ctx, as in OpenResty.
            st.ctx_table = None;
            st.uri = uri;
            st.args = args;
            st.internal = true;
            st.redirects += 1;
            Step::Again(None)
        }
        LuaOutcome::Exit(Exit::Named(name)) => {
            let mut st = rc.st.borrow_mut();
            st.ctx_table = None;
            st.internal = true;
            st.redirects += 1;
            match st.server.named.get(&name).cloned() {
                Some(l) => Step::Again(Some(l)),
                None => {
                    drop(st);
                    crate::log::request_error(
                        rc,
                        crate::log::Level::Error,
                        &format!("named location \"@{}\" not found", name),
                    );
                    Step::Finish(Outcome::Status(500))
                }
            }
        }
    }
}

/// Whether the response has begun (headers sent or output buffered): after that a status
/// can no longer change.
pub fn output_started(st: &ReqState) -> bool {
    st.headers_sent || !st.out.is_empty()
}

/// Finish the response: a special page for a bare status, else flush what is buffered.
async fn finalize(rc: &Rc<ReqCtx>, outcome: Outcome) {
    if let Outcome::Status(code) = outcome {
        let started = output_started(&rc.st.borrow());
        if !started {
            let mut st = rc.st.borrow_mut();
            st.status = code;
            if code == 444 {
                st.resp_headers
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            } else if special::has_page(code) {
                let tokens = st.conf.server_tokens;
                st.resp_headers.remove(http::header::CONTENT_LENGTH);
                st.resp_headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html"),
                );
                st.out
                    .extend_from_slice(special::page(code, tokens).as_bytes());
            }
        }
    }
    if let Err(e) = filter::send(rc, true).await {
        tracing::debug!(conn = rc.conn.id, "response not completed: {}", e);
    }
}

/// Run a subrequest (`ngx.location.capture`): the same phases as a main request, then the
/// response goes through the header and body filters into the capture sink (`filter::send`
/// routes it there). No error_page and no log phase: lua-nginx-module captures a bare status
/// before nginx's special response would run, and nginx does not log subrequests
/// (`log_subrequest off`).
pub async fn run_subrequest(rc: &Rc<ReqCtx>) {
    if let Outcome::Status(code) = phases(rc, None).await {
        if output_started(&rc.st.borrow()) {
            // The handler failed after its output began: keep what it produced, but the last
            // buffer never comes, so the parent sees `res.truncated == true`.
            if let Err(e) = filter::send(rc, false).await {
                tracing::debug!(conn = rc.conn.id, "subrequest output: {}", e);
            }
            return;
        }
        // A bare status: headers only, an empty body (no special page), as OpenResty captures it.
        let mut st = rc.st.borrow_mut();
        st.status = code;
        st.resp_headers.remove(http::header::CONTENT_TYPE);
        st.resp_headers.remove(http::header::CONTENT_LENGTH);
        st.resp_headers.remove(http::header::LAST_MODIFIED);
    }
    if let Err(e) = filter::send(rc, true).await {
        tracing::debug!(conn = rc.conn.id, "subrequest output: {}", e);
    }
}

/// The log phase: log_by_lua, then the access log.
async fn log_phase(rc: &Rc<ReqCtx>) {
    let conf = rc.st.borrow().conf.clone();
    if let Some(chunk) = &conf.log_by_lua {
        let _ = lua_phase::run(rc, chunk, Phase::Log).await;
    }
    if !conf.access_logs.is_empty() {
        super::accesslog::write(rc, &conf.access_logs);
    }
}

/// Read the whole request body (bounded by `client_max_body_size` and `client_body_timeout`).
/// Errors carry the status nginx would answer (413, 408, 400).
pub async fn read_body(rc: &ReqCtx) -> Result<(), u16> {
    use http_body_util::BodyExt;
    let (incoming, limit, timeout) = {
        let mut st = rc.st.borrow_mut();
        match std::mem::replace(&mut st.body, ReqBody::Discarded) {
            ReqBody::Unread(b) => (
                b,
                st.conf.client_max_body_size,
                st.conf.client_body_timeout_ms,
            ),
            other => {
                st.body = other;
                return Ok(());
            }
        }
    };
    let mut body = incoming;
    let mut buf = BytesMut::new();
    loop {
        let frame = tokio::time::timeout(
            std::time::Duration::from_millis(timeout.max(1)),
            body.frame(),
        )
        .await;
        match frame {
            Err(_) => return Err(408),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(400),
            Ok(Some(Ok(f))) => {
                if let Ok(data) = f.into_data() {
                    buf.extend_from_slice(&data);
                    if limit > 0 && buf.len() as u64 > limit {
                        return Err(413);
                    }
                }
            }
        }
    }
    rc.st.borrow_mut().body = ReqBody::Read(buf.freeze());
    Ok(())
}

/// Drop the request body without reading it into memory (`ngx.req.discard_body`).
pub fn discard_body(rc: &ReqCtx) {
    let mut st = rc.st.borrow_mut();
    if let ReqBody::Unread(_) = st.body {
        st.body = ReqBody::Discarded;
    }
}

/// Bytes helper for callers that need an owned copy.
pub fn bytes_of(v: &[u8]) -> Bytes {
    Bytes::copy_from_slice(v)
}

#[cfg(test)]
mod tests {
    use super::plain_path;

    /// The one-pass check says what the three substring searches it replaced said, for every
    /// path of up to five bytes over the bytes that matter.
    #[test]
    fn plain_path_matches_the_substring_checks() {
        let alphabet = [b'/', b'.', b'%', b'a', b'?'];
        let mut paths: Vec<Vec<u8>> = vec![Vec::new()];
        let mut last = paths.clone();
        for _ in 0..5 {
            let next: Vec<Vec<u8>> = last
                .iter()
                .flat_map(|p| {
                    alphabet.iter().map(move |c| {
                        let mut q = p.clone();
                        q.push(*c);
                        q
                    })
                })
                .collect();
            paths.extend(next.iter().cloned());
            last = next;
        }
        for p in &paths {
            let s = std::str::from_utf8(p).unwrap();
            let old =
                s.starts_with('/') && !s.contains('%') && !s.contains("//") && !s.contains("/.");
            assert_eq!(plain_path(p), old, "{:?}", s);
        }
    }
}
