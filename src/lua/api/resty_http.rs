//! The Rust half of the bundled `resty.http`: HTTP/1.1 connections made with hyper's
//! `client::conn::http1` (TLS with rustls), a per-worker keepalive pool of them, request
//! sending and streaming response bodies. The Lua half (`src/lua/bundled/resty_http.lua`) keeps
//! lua-resty-http's API: `new`, `connect` (both forms), `request`, `request_uri`, `parse_uri`,
//! `res.body_reader`, `res:read_body()`, `set_keepalive`, ...
//!
//! The pool works like nginx's cosocket pool (what lua-resty-http runs on): idle connections
//! per pool name (`host:port`, plus the TLS server name and verification for https, or the
//! `pool` option), at most `pool_size` idle per worker (least recently used closed first), each
//! with its own idle timeout and reuse count. A plain per-thread map: no locks.

use super::client_core::{Busy, Client, Handle};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use mlua::{AnyUserData, Lua, MultiValue, Table, Value};
use tokio::net::{TcpStream, UnixStream};

use super::resty_redis::io_text;

/// What a timeout of 0 means for I/O (nginx's `lua_socket_*_timeout` default).
const DEFAULT_TIMEOUT_MS: u64 = 60_000;

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    reused: u32,
}

struct Idle {
    conn: Conn,
    expires: Option<Instant>,
}

thread_local! {
    /// Idle connections of this worker by pool name; most recently used at the back.
    static POOLS: RefCell<HashMap<String, VecDeque<Idle>>> = RefCell::new(HashMap::new());
}

fn checkout(key: &str) -> Option<Conn> {
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        let q = p.get_mut(key)?;
        let now = Instant::now();
        while let Some(idle) = q.pop_back() {
            if idle.expires.is_some_and(|e| e <= now) || idle.conn.sender.is_closed() {
                continue;
            }
            let mut c = idle.conn;
            c.reused += 1;
            return Some(c);
        }
        None
    })
}

fn checkin(key: String, conn: Conn, timeout_ms: u64, size: usize) {
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        let q = p.entry(key).or_default();
        let now = Instant::now();
        q.retain(|i| i.expires.is_none_or(|e| e > now) && !i.conn.sender.is_closed());
        while q.len() >= size.max(1) {
            q.pop_front();
        }
        q.push_back(Idle {
            conn,
            expires: (timeout_ms > 0).then(|| now + Duration::from_millis(timeout_ms)),
        });
    })
}

/// The response body being read.
struct BodyState {
    incoming: Incoming,
    leftover: Bytes,
    trailers: Option<http::HeaderMap>,
}

/// A `resty.http` object's native state.
#[derive(Default)]
struct Core {
    conn: RefCell<Option<Conn>>,
    timeouts: Cell<(u64, u64, u64)>,
    pool: RefCell<String>,
    /// What the server (or the request) said about reusing the connection.
    keepalive: Cell<bool>,
    body: RefCell<Option<BodyState>>,
    /// A response body was started and not read to its end.
    body_pending: Cell<bool>,
    busy: Cell<bool>,
    /// `lua_socket_keepalive_timeout` and `lua_socket_pool_size` where the object was made.
    pool_defaults: Cell<(u64, usize)>,
}

impl Client for Core {
    fn busy(&self) -> &Cell<bool> {
        &self.busy
    }
}

fn core_of(ud: &AnyUserData) -> mlua::Result<Rc<Core>> {
    super::client_core::core_of(ud)
}

fn fail(lua: &Lua, msg: &str) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Nil,
        Value::String(lua.create_string(msg)?),
    ]))
}

fn ok1() -> MultiValue {
    MultiValue::from_vec(vec![Value::Integer(1)])
}

async fn with_timeout<F: std::future::Future>(ms: u64, f: F) -> Option<F::Output> {
    let ms = if ms == 0 { DEFAULT_TIMEOUT_MS } else { ms };
    tokio::time::timeout(Duration::from_millis(ms), f)
        .await
        .ok()
}

fn ms(v: Option<f64>) -> u64 {
    match v {
        Some(x) if x.is_finite() && x > 0.0 => x as u64,
        _ => 0,
    }
}

/// The cosocket settings of the running code: the request's location (`lua_socket_*`,
/// `lua_ssl_*`, `resolver`), or the defaults outside a request (timers, init_worker).
pub(crate) fn socket_conf(
    lua: &Lua,
) -> (
    crate::conf::model::LuaSocketConf,
    Option<Arc<crate::net::Resolver>>,
) {
    match crate::lua::request::try_current(lua) {
        Some(rc) => {
            let conf = rc.st.borrow().conf.clone();
            (conf.lua_socket.clone(), conf.resolver.clone())
        }
        None => (Default::default(), None),
    }
}

/// Where and how to connect (the options table form of `connect`).
struct Target {
    scheme_https: bool,
    host: String,
    port: u16,
    pool: Option<String>,
    ssl_verify: bool,
    ssl_server_name: Option<String>,
}

fn target(t: &Table) -> mlua::Result<Target> {
    let scheme: Option<String> = t.get("scheme")?;
    let https = match scheme.as_deref() {
        None | Some("http") => false,
        Some("https") => true,
        Some(other) => {
            return Err(mlua::Error::runtime(format!("unknown scheme: {}", other)));
        }
    };
    let host: String = t
        .get::<Option<String>>("host")?
        .ok_or_else(|| mlua::Error::runtime("no host"))?;
    let port: Option<i64> = t.get("port")?;
    let port = match port {
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => return Err(mlua::Error::runtime(format!("bad port number: {}", p))),
        None if https => 443,
        None => 80,
    };
    Ok(Target {
        scheme_https: https,
        host,
        port,
        pool: t.get("pool")?,
        ssl_verify: t.get::<Option<bool>>("ssl_verify")?.unwrap_or(true),
        ssl_server_name: t.get("ssl_server_name")?,
    })
}

async fn handshake<T>(io: T) -> Result<Conn, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    // The connection task ends when the sender is dropped (connection closed or evicted).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { sender, reused: 0 })
}

type SockConf = (
    crate::conf::model::LuaSocketConf,
    Option<Arc<crate::net::Resolver>>,
);

async fn open(t: &Target, connect_ms: u64, sock: &SockConf) -> Result<Conn, String> {
    if let Some(path) = t.host.strip_prefix("unix:") {
        let s = match with_timeout(connect_ms, UnixStream::connect(path)).await {
            None => return Err("timeout".into()),
            Some(r) => r.map_err(|e| io_text(&e))?,
        };
        return handshake(s).await;
    }
    let addrs = crate::net::resolve(sock.1.as_ref(), &t.host, t.port).await?;
    let mut last = "no address".to_string();
    let mut tcp = None;
    for a in addrs {
        match with_timeout(connect_ms, TcpStream::connect(a)).await {
            None => last = "timeout".into(),
            Some(Ok(s)) => {
                let _ = s.set_nodelay(true);
                tcp = Some(s);
                break;
            }
            Some(Err(e)) => last = io_text(&e),
        }
    }
    let tcp = tcp.ok_or(last)?;
    if !t.scheme_https {
        return handshake(tcp).await;
    }
    // OpenResty's rules: verification against lua_ssl_trusted_certificate only.
    let cfg = crate::net::tls::client_config(&crate::net::ClientTls {
        verify: t.ssl_verify,
        trusted: sock.0.ssl_trusted_certificate.clone(),
        verify_depth: sock.0.ssl_verify_depth,
        cert: None,
    })?;
    let name = t.ssl_server_name.clone().unwrap_or_else(|| t.host.clone());
    let stream = match with_timeout(
        connect_ms,
        crate::net::tls::connect(tcp, cfg, Some(&name), &name),
    )
    .await
    {
        None => return Err("timeout".into()),
        Some(r) => r?,
    };
    handshake(stream).await
}

/// Reset the object for a new connection and take one from the pool when there is one.
fn take_pooled(core: &Core, t: &Target) -> bool {
    core.conn.borrow_mut().take();
    core.body.borrow_mut().take();
    core.body_pending.set(false);
    core.keepalive.set(true);
    let key = t.pool.clone().unwrap_or_else(|| {
        if t.scheme_https {
            format!(
                "{}:{}:{}:{}",
                t.host,
                t.port,
                t.ssl_server_name.as_deref().unwrap_or(""),
                t.ssl_verify
            )
        } else if t.host.starts_with("unix:") {
            t.host.clone()
        } else {
            format!("{}:{}", t.host, t.port)
        }
    });
    let c = checkout(&key);
    *core.pool.borrow_mut() = key;
    match c {
        Some(c) => {
            *core.conn.borrow_mut() = Some(c);
            true
        }
        None => false,
    }
}

async fn connect(lua: Lua, core: Rc<Core>, t: Target, sock: SockConf) -> mlua::Result<MultiValue> {
    let Some(_busy) = Busy::take(&core) else {
        return fail(&lua, "socket busy");
    };
    if take_pooled(&core, &t) {
        return Ok(ok1());
    }
    match open(&t, core.timeouts.get().0, &sock).await {
        Ok(c) => {
            *core.conn.borrow_mut() = Some(c);
            Ok(ok1())
        }
        Err(e) => fail(&lua, &e),
    }
}

/// A request prepared from the Lua params (all Lua values copied out before any await).
struct Prepared {
    req: http::Request<Full<Bytes>>,
    head: bool,
    close: bool,
}

fn prepare(params: &Table) -> mlua::Result<Prepared> {
    let method: String = params
        .get::<Option<String>>("method")?
        .unwrap_or_else(|| "GET".into());
    let target: String = params.get("target")?;
    let version: Option<f64> = params.get("version")?;
    let mut b = http::Request::builder()
        .method(method.as_str())
        .uri(target.as_str())
        .version(if version == Some(1.0) {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        });
    let mut close = false;
    if let Some(h) = params.get::<Option<Table>>("headers")? {
        for pair in h.pairs::<mlua::LuaString, Value>() {
            let (k, v) = pair?;
            let name = http::HeaderName::from_bytes(&k.as_bytes())
                .map_err(|e| mlua::Error::runtime(format!("bad header name: {}", e)))?;
            let mut add = |v: &[u8]| -> mlua::Result<()> {
                if name == http::header::CONNECTION && v.eq_ignore_ascii_case(b"close") {
                    close = true;
                }
                let hv = http::HeaderValue::from_bytes(v)
                    .map_err(|e| mlua::Error::runtime(format!("bad header value: {}", e)))?;
                b = std::mem::take(&mut b).header(name.clone(), hv);
                Ok(())
            };
            match v {
                Value::Table(list) => {
                    for item in list.sequence_values::<mlua::LuaString>() {
                        add(&item?.as_bytes())?;
                    }
                }
                Value::String(s) => add(&s.as_bytes())?,
                Value::Integer(i) => add(i.to_string().as_bytes())?,
                Value::Number(n) => add(crate::lua::api::output::format_number(n).as_bytes())?,
                _ => {}
            }
        }
    }
    let body = match params.get::<Option<mlua::LuaString>>("body")? {
        Some(s) => Bytes::copy_from_slice(&s.as_bytes()),
        None => Bytes::new(),
    };
    let req = b
        .body(Full::new(body))
        .map_err(|e| mlua::Error::runtime(format!("bad request: {}", e)))?;
    Ok(Prepared {
        head: method.eq_ignore_ascii_case("HEAD"),
        close: close || version == Some(1.0),
        req,
    })
}

fn hyper_err(e: &hyper::Error) -> String {
    if e.is_canceled() || e.is_incomplete_message() {
        return "closed".into();
    }
    if e.is_timeout() {
        return "timeout".into();
    }
    e.to_string()
}

async fn request(lua: Lua, core: Rc<Core>, p: Prepared) -> mlua::Result<MultiValue> {
    let Some(_busy) = Busy::take(&core) else {
        return fail(&lua, "socket busy");
    };
    if core.body_pending.get() {
        return fail(&lua, "unread data in buffer");
    }
    let Some(mut conn) = core.conn.borrow_mut().take() else {
        return fail(&lua, "closed");
    };
    let (_, send_ms, read_ms) = core.timeouts.get();
    let send = async {
        conn.sender.ready().await.map_err(|e| hyper_err(&e))?;
        conn.sender
            .send_request(p.req)
            .await
            .map_err(|e| hyper_err(&e))
    };
    let res = match with_timeout(send_ms.max(1).saturating_add(read_ms), send).await {
        None => return fail(&lua, "timeout"),
        Some(Err(e)) => return fail(&lua, &e),
        Some(Ok(r)) => r,
    };
    let (parts, incoming) = res.into_parts();
    let conn_hdr = parts
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(",");
    let keepalive = !p.close
        && if parts.version == http::Version::HTTP_10 {
            conn_hdr.contains("keep-alive")
        } else {
            !conn_hdr.contains("close")
        };
    core.keepalive.set(keepalive);
    let status = parts.status.as_u16();
    let has_body = !(p.head || status == 204 || status == 304 || (100..200).contains(&status));
    *core.conn.borrow_mut() = Some(conn);
    if has_body {
        *core.body.borrow_mut() = Some(BodyState {
            incoming,
            leftover: Bytes::new(),
            trailers: None,
        });
        core.body_pending.set(true);
    }
    let reason = match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(r) => String::from_utf8_lossy(r.as_bytes()).into_owned(),
        None => parts.status.canonical_reason().unwrap_or("").to_string(),
    };
    let headers = headers_table(&lua, &parts.headers)?;
    Ok(MultiValue::from_vec(vec![
        Value::Integer(status as i64),
        Value::String(lua.create_string(&reason)?),
        Value::Table(headers),
        Value::Boolean(has_body),
    ]))
}

/// Response headers as lua-resty-http gives them: a repeated header becomes a list.
fn headers_table(lua: &Lua, h: &http::HeaderMap) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, h.keys_len())?;
    for name in h.keys() {
        let mut vals = h.get_all(name).iter();
        let first = vals.next().map(|v| v.as_bytes()).unwrap_or(b"");
        match vals.next() {
            None => t.raw_set(name.as_str(), lua.create_string(first)?)?,
            Some(second) => {
                let list = lua.create_table()?;
                list.raw_push(lua.create_string(first)?)?;
                list.raw_push(lua.create_string(second.as_bytes())?)?;
                for v in vals {
                    list.raw_push(lua.create_string(v.as_bytes())?)?;
                }
                t.raw_set(name.as_str(), list)?;
            }
        }
    }
    Ok(t)
}

/// Read up to `max` bytes of the body (`None`: whatever the next piece is; `Some(0)` with
/// `all`: the whole rest). `Ok(None)` at the end of the body.
async fn read_body(core: &Core, max: Option<usize>, all: bool) -> Result<Option<Bytes>, String> {
    let Some(mut st) = core.body.borrow_mut().take() else {
        return Ok(None);
    };
    let read_ms = core.timeouts.get().2;
    let mut acc = BytesMut::new();
    let want = if all { usize::MAX } else { max.unwrap_or(0) };
    loop {
        if !st.leftover.is_empty() {
            if !all && max.is_none() {
                let b = std::mem::take(&mut st.leftover);
                *core.body.borrow_mut() = Some(st);
                return Ok(Some(b));
            }
            let take = (want - acc.len()).min(st.leftover.len());
            acc.extend_from_slice(&st.leftover.split_to(take));
            if acc.len() >= want {
                *core.body.borrow_mut() = Some(st);
                return Ok(Some(acc.freeze()));
            }
        }
        match with_timeout(read_ms, st.incoming.frame()).await {
            None => {
                // A body cut by a timeout leaves the connection unusable.
                core.conn.borrow_mut().take();
                core.body_pending.set(false);
                return Err("timeout".into());
            }
            Some(None) => {
                core.body_pending.set(false);
                if let Some(tr) = st.trailers.take() {
                    *core.body.borrow_mut() = Some(BodyState {
                        incoming: st.incoming,
                        leftover: Bytes::new(),
                        trailers: Some(tr),
                    });
                }
                return Ok(if acc.is_empty() && !all {
                    None
                } else {
                    Some(acc.freeze())
                });
            }
            Some(Some(Err(e))) => {
                core.conn.borrow_mut().take();
                core.body_pending.set(false);
                return Err(hyper_err(&e));
            }
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => st.leftover = d,
                Err(f) => {
                    if let Ok(tr) = f.into_trailers() {
                        st.trailers = Some(tr);
                    }
                }
            },
        }
    }
}

/// The natives the Lua half calls.
pub fn natives(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "new",
        lua.create_function(|lua, ()| {
            let core = Core::default();
            let (sc, _) = socket_conf(lua);
            core.timeouts.set((
                sc.connect_timeout_ms,
                sc.send_timeout_ms,
                sc.read_timeout_ms,
            ));
            core.pool_defaults
                .set((sc.keepalive_timeout_ms, sc.pool_size));
            core.keepalive.set(true);
            lua.create_userdata(Handle(Rc::new(core)))
        })?,
    )?;
    t.set(
        "set_timeouts",
        lua.create_function(
            |_, (ud, c, s, r): (AnyUserData, Option<f64>, Option<f64>, Option<f64>)| {
                let core = core_of(&ud)?;
                let old = core.timeouts.get();
                let pick = |v: Option<f64>, o: u64| if v.is_some() { ms(v) } else { o };
                core.timeouts
                    .set((pick(c, old.0), pick(s, old.1), pick(r, old.2)));
                Ok(())
            },
        )?,
    )?;
    // The pooled case needs no wait: a plain call, cheaper than an async one per request.
    t.set(
        "connect_pooled",
        lua.create_function(|_, (ud, opts): (AnyUserData, Table)| {
            let core = core_of(&ud)?;
            if core.busy.get() {
                return Ok(false);
            }
            Ok(take_pooled(&core, &target(&opts)?))
        })?,
    )?;
    t.set(
        "connect",
        lua.create_async_function(|lua, (ud, opts): (AnyUserData, Table)| {
            let prep = core_of(&ud).and_then(|c| Ok((c, target(&opts)?)));
            let sock = socket_conf(&lua);
            async move {
                let (core, t) = prep?;
                connect(lua, core, t, sock).await
            }
        })?,
    )?;
    t.set(
        "request",
        lua.create_async_function(|lua, (ud, params): (AnyUserData, Table)| {
            let prep = core_of(&ud).and_then(|c| Ok((c, prepare(&params)?)));
            async move {
                let (core, p) = prep?;
                request(lua, core, p).await
            }
        })?,
    )?;
    t.set(
        "read",
        lua.create_async_function(|lua, (ud, max): (AnyUserData, Option<f64>)| {
            let core = core_of(&ud);
            async move {
                let core = core?;
                let Some(_busy) = Busy::take(&core) else {
                    return fail(&lua, "socket busy");
                };
                let max = max.filter(|m| *m >= 1.0).map(|m| m as usize);
                match read_body(&core, max, false).await {
                    Ok(Some(b)) => Ok(MultiValue::from_vec(vec![Value::String(
                        lua.create_string(&b)?,
                    )])),
                    Ok(None) => Ok(MultiValue::new()),
                    Err(e) => fail(&lua, &e),
                }
            }
        })?,
    )?;
    t.set(
        "read_all",
        lua.create_async_function(|lua, ud: AnyUserData| {
            let core = core_of(&ud);
            async move {
                let core = core?;
                let Some(_busy) = Busy::take(&core) else {
                    return fail(&lua, "socket busy");
                };
                match read_body(&core, None, true).await {
                    Ok(b) => Ok(MultiValue::from_vec(vec![Value::String(
                        lua.create_string(b.unwrap_or_default())?,
                    )])),
                    Err(e) => fail(&lua, &e),
                }
            }
        })?,
    )?;
    t.set(
        "trailers",
        lua.create_function(|lua, ud: AnyUserData| {
            let core = core_of(&ud)?;
            let tr = core
                .body
                .borrow_mut()
                .as_mut()
                .and_then(|b| b.trailers.take());
            match tr {
                Some(h) => Ok(Some(headers_table(lua, &h)?)),
                None => Ok(None),
            }
        })?,
    )?;
    t.set(
        "set_keepalive",
        lua.create_function(
            |lua, (ud, timeout, size): (AnyUserData, Option<f64>, Option<f64>)| {
                let core = core_of(&ud)?;
                if core.busy.get() {
                    return fail(lua, "socket busy");
                }
                let Some(conn) = core.conn.borrow_mut().take() else {
                    return fail(lua, "closed");
                };
                core.body.borrow_mut().take();
                if !core.keepalive.get() {
                    // lua-resty-http: 2 = the server asked to close, and we did.
                    return Ok(MultiValue::from_vec(vec![
                        Value::Integer(2),
                        Value::String(lua.create_string("connection must be closed")?),
                    ]));
                }
                if core.body_pending.replace(false) {
                    return fail(lua, "unread data in buffer");
                }
                let timeout = match timeout {
                    Some(t) => ms(Some(t)),
                    None => core.pool_defaults.get().0,
                };
                let size =
                    match size {
                        Some(s) if s >= 1.0 => s as usize,
                        Some(_) => return Err(mlua::Error::runtime(
                            "bad argument #2 to 'set_keepalive' (bad \"pool_size\" option value)",
                        )),
                        None => core.pool_defaults.get().1,
                    };
                if conn.sender.is_closed() {
                    return Ok(ok1());
                }
                let key = core.pool.borrow().clone();
                checkin(key, conn, timeout, size);
                Ok(ok1())
            },
        )?,
    )?;
    t.set(
        "get_reused_times",
        lua.create_function(|lua, ud: AnyUserData| {
            let core = core_of(&ud)?;
            let n = core.conn.borrow().as_ref().map(|c| c.reused);
            match n {
                Some(n) => Ok(MultiValue::from_vec(vec![Value::Integer(n as i64)])),
                None => fail(lua, "closed"),
            }
        })?,
    )?;
    t.set(
        "close",
        lua.create_function(|lua, ud: AnyUserData| {
            let core = core_of(&ud)?;
            core.body.borrow_mut().take();
            core.body_pending.set(false);
            let taken = core.conn.borrow_mut().take();
            match taken {
                Some(_) => Ok(ok1()),
                None => fail(lua, "closed"),
            }
        })?,
    )?;
    Ok(t)
}
