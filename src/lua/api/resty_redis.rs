//! The Rust half of the bundled `resty.redis`: connections, the per-worker keepalive pool and
//! the RESP protocol. The Lua half (`lua/bundled/resty/redis.lua`) keeps lua-resty-redis's object
//! model (`redis:new()`, commands generated through `__index`, `hmset` with a table,
//! `array_to_hash`) and calls the natives registered here.
//!
//! Why not the redis crate's connections or bb8: lua-resty-redis exposes a *connection* (one
//! request at a time, RESP2 pub/sub on it, `read_reply`, a timeout closes it) and nginx's
//! cosocket pool (it caps *idle* connections per worker, evicts the least recently used one when
//! full, each connection remembers how often it was reused and its own idle timeout). A
//! multiplexed connection cannot do RESP2 pub/sub, bb8 caps *total* connections (a checkout
//! waits) and has no per-connection reuse count. So the pool here is a plain per-thread
//! (= per-worker) map of idle connections, no locks, and the protocol reader is a small RESP2
//! parser that keeps status, bulk, error and nil replies apart exactly as lua-resty-redis does.
//!
//! State that must not leak between users of a pooled connection: a connection left on a
//! database other than 0 is switched back (`SELECT 0` sent in the same write as the next user's
//! first command, unless that command is itself `SELECT`); an `AUTH` that fails leaves the
//! connection unpooled. Authentication itself is kept, as with OpenResty's pool: use the `pool`
//! connect option to keep connections of different credentials apart.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use mlua::{AnyUserData, Lua, MultiValue, Table, UserData, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// What a timeout of 0 means for I/O (nginx's `lua_socket_*_timeout` default).
const DEFAULT_TIMEOUT_MS: u64 = 60_000;

/// A parsed RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Status(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Parse one reply from the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(line_end) = find_crlf(buf) else {
        return Ok(None);
    };
    let line = &buf[1..line_end];
    let after = line_end + 2;
    let int = |l: &[u8]| -> Result<i64, String> {
        std::str::from_utf8(l)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| "bad reply".to_string())
    };
    match buf.first() {
        Some(b'+') => Ok(Some((Reply::Status(line.to_vec()), after))),
        Some(b'-') => Ok(Some((Reply::Error(line.to_vec()), after))),
        Some(b':') => Ok(Some((Reply::Int(int(line)?), after))),
        Some(b'$') => {
            let n = int(line)?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            let n = n as usize;
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            Ok(Some((
                Reply::Bulk(Some(buf[after..after + n].to_vec())),
                after + n + 2,
            )))
        }
        Some(b'*') => {
            let n = int(line)?;
            if n < 0 {
                return Ok(Some((Reply::Array(None), after)));
            }
            let mut items = Vec::with_capacity((n as usize).min(1024));
            let mut pos = after;
            for _ in 0..n {
                match parse(&buf[pos..])? {
                    Some((r, used)) => {
                        items.push(r);
                        pos += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), pos)))
        }
        Some(p) => Err(format!("unknown prefix: \"{}\"", p)),
        None => Ok(None),
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Append one command as a RESP array of bulk strings.
pub fn encode(out: &mut Vec<u8>, args: &[Vec<u8>]) {
    use std::io::Write;
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// A failure of the connection itself, in the cosocket API's words.
#[derive(Debug)]
enum NetErr {
    Timeout,
    Closed,
    Io(io::Error),
    Proto(String),
}

impl NetErr {
    fn text(&self) -> String {
        match self {
            NetErr::Timeout => "timeout".into(),
            NetErr::Closed => "closed".into(),
            NetErr::Io(e) => io_text(e),
            NetErr::Proto(s) => s.clone(),
        }
    }
}

/// The cosocket wording for an I/O error.
pub fn io_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".into(),
        io::ErrorKind::BrokenPipe => "broken pipe".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        io::ErrorKind::UnexpectedEof => "closed".into(),
        io::ErrorKind::NotFound => "no such file or directory".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Io {
    async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Io::Tcp(s) => s.write_all(b).await,
            Io::Unix(s) => s.write_all(b).await,
        }
    }
    async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Io::Tcp(s) => s.read_buf(buf).await,
            Io::Unix(s) => s.read_buf(buf).await,
        }
    }
    /// Whether an idle connection is still usable: nothing to read and not closed by the peer.
    fn idle_ok(&self) -> bool {
        let mut b = [0u8; 1];
        let r = match self {
            Io::Tcp(s) => s.try_read(&mut b),
            Io::Unix(s) => s.try_read(&mut b),
        };
        matches!(r, Err(ref e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// One connection to a Redis server.
struct Conn {
    io: Io,
    rbuf: BytesMut,
    reused: u32,
    /// The database this connection is on (`SELECT`).
    db: i64,
    /// Hash of the arguments of the last successful `AUTH`.
    auth: Option<u64>,
    /// Set when taken from the pool: the next command decides whether to reset the database.
    fresh_checkout: bool,
    /// Never return this connection to the pool (a failed AUTH).
    no_pool: bool,
}

impl Conn {
    async fn send(&mut self, req: &[u8], timeout_ms: u64) -> Result<(), NetErr> {
        match with_timeout(timeout_ms, self.io.write_all(req)).await {
            None => Err(NetErr::Timeout),
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(NetErr::Io(e)),
        }
    }

    async fn read(&mut self, timeout_ms: u64) -> Result<Reply, NetErr> {
        loop {
            if !self.rbuf.is_empty() {
                match parse(&self.rbuf) {
                    Ok(Some((r, used))) => {
                        self.rbuf.advance(used);
                        return Ok(r);
                    }
                    Ok(None) => {}
                    Err(e) => return Err(NetErr::Proto(e)),
                }
            }
            self.rbuf.reserve(16 * 1024);
            match with_timeout(timeout_ms, self.io.read_buf(&mut self.rbuf)).await {
                None => return Err(NetErr::Timeout),
                Some(Ok(0)) => return Err(NetErr::Closed),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(NetErr::Io(e)),
            }
        }
    }
}

async fn with_timeout<F: std::future::Future>(ms: u64, f: F) -> Option<F::Output> {
    if ms == 0 {
        // 0 means "no timeout" only for keepalive; for I/O nginx treats it as the default.
        return tokio::time::timeout(Duration::from_millis(DEFAULT_TIMEOUT_MS), f)
            .await
            .ok();
    }
    tokio::time::timeout(Duration::from_millis(ms), f)
        .await
        .ok()
}

struct Idle {
    conn: Conn,
    expires: Option<Instant>,
}

thread_local! {
    /// Idle connections of this worker, by pool name; most recently used at the back.
    static POOLS: RefCell<HashMap<String, VecDeque<Idle>>> = RefCell::new(HashMap::new());
}

fn checkout(key: &str) -> Option<Conn> {
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        let q = p.get_mut(key)?;
        let now = Instant::now();
        while let Some(idle) = q.pop_back() {
            if idle.expires.is_some_and(|e| e <= now) || !idle.conn.io.idle_ok() {
                continue;
            }
            let mut c = idle.conn;
            c.reused += 1;
            c.fresh_checkout = true;
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
        q.retain(|i| i.expires.is_none_or(|e| e > now));
        // nginx closes the least recently used connection when the pool is full.
        while q.len() >= size.max(1) {
            q.pop_front();
        }
        q.push_back(Idle {
            conn,
            expires: (timeout_ms > 0).then(|| now + Duration::from_millis(timeout_ms)),
        });
    })
}

/// Idle connections in pool `key` on this worker (tests and diagnostics).
pub fn idle_count(key: &str) -> usize {
    POOLS.with(|p| p.borrow().get(key).map_or(0, |q| q.len()))
}

/// A `resty.redis` object's native state.
#[derive(Default)]
struct Core {
    conn: RefCell<Option<Conn>>,
    /// connect, send, read timeouts in ms.
    timeouts: Cell<(u64, u64, u64)>,
    pool: RefCell<String>,
    subscribed: Cell<bool>,
    /// Queued commands of `init_pipeline`: the encoded bytes and each command's effect.
    pipeline: RefCell<Option<(Vec<u8>, Vec<Effect>)>>,
    busy: Cell<bool>,
    /// `lua_socket_keepalive_timeout` and `lua_socket_pool_size` where the object was made.
    pool_defaults: Cell<(u64, usize)>,
}

/// What a command changes in the connection's state once it succeeds.
#[derive(Clone, Copy, PartialEq)]
enum Effect {
    None,
    Select(i64),
    Auth(u64),
    Subscribe,
    Unsubscribe,
}

struct Handle(Rc<Core>);
impl UserData for Handle {}

fn core_of(ud: &AnyUserData) -> mlua::Result<Rc<Core>> {
    Ok(ud.borrow::<Handle>()?.0.clone())
}

/// Marks the object busy for the duration of an operation (one operation at a time, as a
/// cosocket allows one reader and one writer).
struct Busy(Rc<Core>);
impl Busy {
    fn take(core: &Rc<Core>) -> Option<Busy> {
        if core.busy.replace(true) {
            return None;
        }
        Some(Busy(core.clone()))
    }
}
impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.set(false);
    }
}

fn arg_bytes(v: &Value) -> mlua::Result<Vec<u8>> {
    Ok(match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Integer(i) => i.to_string().into_bytes(),
        Value::Number(n) => crate::lua::api::output::format_number(*n).into_bytes(),
        Value::Boolean(b) => b.to_string().into_bytes(),
        Value::Nil => b"nil".to_vec(),
        other => {
            return Err(mlua::Error::runtime(format!(
                "bad argument: {} not allowed in a redis command",
                other.type_name()
            )))
        }
    })
}

fn hash_args(args: &[Vec<u8>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    args.hash(&mut h);
    h.finish()
}

fn effect_of(args: &[Vec<u8>]) -> Effect {
    let name = args[0].to_ascii_lowercase();
    match name.as_slice() {
        b"select" => std::str::from_utf8(args.get(1).map_or(&b""[..], |a| a))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map_or(Effect::None, Effect::Select),
        b"auth" => Effect::Auth(hash_args(&args[1..])),
        b"subscribe" | b"psubscribe" => Effect::Subscribe,
        b"unsubscribe" | b"punsubscribe" => Effect::Unsubscribe,
        _ => Effect::None,
    }
}

/// Apply a successful reply's effect to the connection and the object.
fn apply(core: &Core, conn: &mut Conn, eff: Effect, reply: &Reply) {
    let ok = !matches!(reply, Reply::Error(_));
    match eff {
        Effect::Select(db) if ok => conn.db = db,
        Effect::Auth(h) if ok => conn.auth = Some(h),
        Effect::Auth(_) => conn.no_pool = true,
        Effect::Unsubscribe => {
            if let Reply::Array(Some(items)) = reply {
                if matches!(items.get(2), Some(Reply::Int(0))) {
                    core.subscribed.set(false);
                }
            }
        }
        _ => {}
    }
}

/// A reply as lua-resty-redis returns it (top level: an error reply is `false, msg`).
fn reply_to_lua(lua: &Lua, r: Reply) -> mlua::Result<MultiValue> {
    match r {
        Reply::Error(m) => Ok(MultiValue::from_vec(vec![
            Value::Boolean(false),
            Value::String(lua.create_string(&m)?),
        ])),
        other => Ok(MultiValue::from_vec(vec![value_to_lua(lua, other)?])),
    }
}

fn value_to_lua(lua: &Lua, r: Reply) -> mlua::Result<Value> {
    let null = Value::LightUserData(crate::lua::api::cjson::null());
    Ok(match r {
        Reply::Status(s) => Value::String(lua.create_string(&s)?),
        Reply::Int(i) => Value::Integer(i),
        Reply::Bulk(Some(b)) => Value::String(lua.create_string(&b)?),
        Reply::Bulk(None) | Reply::Array(None) => null,
        Reply::Error(m) => {
            let t = lua.create_table_with_capacity(2, 0)?;
            t.raw_set(1, false)?;
            t.raw_set(2, lua.create_string(&m)?)?;
            Value::Table(t)
        }
        Reply::Array(Some(items)) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, it) in items.into_iter().enumerate() {
                t.raw_set(i + 1, value_to_lua(lua, it)?)?;
            }
            Value::Table(t)
        }
    })
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

/// Resolve and connect, in the cosocket API's error words.
async fn open(
    host: &str,
    port: Option<u16>,
    connect_ms: u64,
    resolver: Option<&std::sync::Arc<crate::net::Resolver>>,
) -> Result<Io, String> {
    if let Some(path) = host.strip_prefix("unix:") {
        return match with_timeout(connect_ms, UnixStream::connect(path)).await {
            None => Err("timeout".into()),
            Some(Ok(s)) => Ok(Io::Unix(s)),
            Some(Err(e)) => Err(io_text(&e)),
        };
    }
    let port = port.ok_or_else(|| "no port specified".to_string())?;
    let addrs = crate::net::resolve(resolver, host, port).await?;
    let mut last = "no address".to_string();
    for a in addrs {
        match with_timeout(connect_ms, TcpStream::connect(a)).await {
            None => last = "timeout".into(),
            Some(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(Io::Tcp(s));
            }
            Some(Err(e)) => last = io_text(&e),
        }
    }
    Err(last)
}

/// The pool of a connection: the `pool` option, `host:port` or `unix:/path`.
fn pool_key(host: &str, port: Option<u16>, pool: Option<String>) -> String {
    pool.unwrap_or_else(|| match port {
        Some(p) if !host.starts_with("unix:") => format!("{}:{}", host, p),
        _ => host.to_string(),
    })
}

/// `connect`'s arguments after the host: `port, opts?` or just `opts?` for a unix socket.
fn connect_args(
    ud: &AnyUserData,
    port: Value,
    opts: Value,
) -> mlua::Result<(Rc<Core>, Option<u16>, ConnectOpts)> {
    let core = core_of(ud)?;
    let (port, opts) = match (port, opts) {
        (Value::Table(o), _) => (None, Some(o)),
        (Value::Integer(p), Value::Table(o)) => (Some(p), Some(o)),
        (Value::Integer(p), _) => (Some(p), None),
        (Value::Number(p), Value::Table(o)) => (Some(p as i64), Some(o)),
        (Value::Number(p), _) => (Some(p as i64), None),
        (Value::String(s), o) => (
            s.to_str().ok().and_then(|s| s.parse::<i64>().ok()),
            match o {
                Value::Table(t) => Some(t),
                _ => None,
            },
        ),
        (_, Value::Table(o)) => (None, Some(o)),
        _ => (None, None),
    };
    let port = match port {
        Some(p) if (1..=65535).contains(&p) => Some(p as u16),
        Some(p) => return Err(mlua::Error::runtime(format!("bad port number: {}", p))),
        None => None,
    };
    Ok((core, port, connect_opts(opts.as_ref())?))
}

/// Options of `connect` we honour.
struct ConnectOpts {
    pool: Option<String>,
}

fn connect_opts(t: Option<&Table>) -> mlua::Result<ConnectOpts> {
    let Some(t) = t else {
        return Ok(ConnectOpts { pool: None });
    };
    if t.get::<Option<bool>>("ssl")?.unwrap_or(false) {
        return Err(mlua::Error::runtime(
            "resty.redis: the ssl connect option is not supported by the bundled client",
        ));
    }
    Ok(ConnectOpts {
        pool: t.get("pool")?,
    })
}

async fn connect(
    lua: Lua,
    core: Rc<Core>,
    host: String,
    port: Option<u16>,
    opts: ConnectOpts,
    resolver: Option<std::sync::Arc<crate::net::Resolver>>,
) -> mlua::Result<MultiValue> {
    let Some(_busy) = Busy::take(&core) else {
        return fail(&lua, "socket busy");
    };
    // A connect on an object that still holds a connection closes the old one, as cosockets do.
    core.conn.borrow_mut().take();
    core.subscribed.set(false);
    let key = pool_key(&host, port, opts.pool);
    *core.pool.borrow_mut() = key.clone();
    if let Some(c) = checkout(&key) {
        *core.conn.borrow_mut() = Some(c);
        return Ok(ok1());
    }
    match open(&host, port, core.timeouts.get().0, resolver.as_ref()).await {
        Ok(io) => {
            *core.conn.borrow_mut() = Some(Conn {
                io,
                rbuf: BytesMut::with_capacity(4096),
                reused: 0,
                db: 0,
                auth: None,
                fresh_checkout: false,
                no_pool: false,
            });
            Ok(ok1())
        }
        Err(e) => fail(&lua, &e),
    }
}

/// Send one command (or queue it in a pipeline) and read its reply.
async fn command(lua: Lua, core: Rc<Core>, args: Vec<Vec<u8>>) -> mlua::Result<MultiValue> {
    let eff = effect_of(&args);
    if let Some((buf, effs)) = core.pipeline.borrow_mut().as_mut() {
        encode(buf, &args);
        effs.push(eff);
        return Ok(MultiValue::new());
    }
    let Some(_busy) = Busy::take(&core) else {
        return fail(&lua, "socket busy");
    };
    let Some(mut conn) = core.conn.borrow_mut().take() else {
        return fail(&lua, "closed");
    };
    let (_, send_ms, read_ms) = core.timeouts.get();
    let mut req = Vec::with_capacity(64);
    let mut extra = 0;
    if std::mem::take(&mut conn.fresh_checkout) {
        // The previous user's state: same credentials need no round trip; another database is
        // switched back in the same write unless this command selects one itself.
        if let Effect::Auth(h) = eff {
            if conn.auth == Some(h) {
                // The database check still belongs to the next command.
                conn.fresh_checkout = true;
                *core.conn.borrow_mut() = Some(conn);
                return reply_to_lua(&lua, Reply::Status(b"OK".to_vec()));
            }
        }
        if conn.db != 0 && !matches!(eff, Effect::Select(_)) {
            encode(&mut req, &[b"SELECT".to_vec(), b"0".to_vec()]);
            extra = 1;
        }
    }
    encode(&mut req, &args);
    if eff == Effect::Subscribe {
        core.subscribed.set(true);
    }
    let res = async {
        conn.send(&req, send_ms).await?;
        for _ in 0..extra {
            if let Reply::Error(e) = conn.read(read_ms).await? {
                return Err(NetErr::Proto(String::from_utf8_lossy(&e).into_owned()));
            }
            conn.db = 0;
        }
        conn.read(read_ms).await
    }
    .await;
    match res {
        Ok(reply) => {
            apply(&core, &mut conn, eff, &reply);
            *core.conn.borrow_mut() = Some(conn);
            reply_to_lua(&lua, reply)
        }
        Err(e) => {
            // A timeout leaves a reply in flight: the connection is closed, as lua-resty-redis
            // does, except while subscribed (waiting for messages may time out harmlessly).
            if !(matches!(e, NetErr::Timeout) && core.subscribed.get()) {
                drop(conn);
            } else {
                *core.conn.borrow_mut() = Some(conn);
            }
            fail(&lua, &e.text())
        }
    }
}

async fn commit_pipeline(lua: Lua, core: Rc<Core>) -> mlua::Result<MultiValue> {
    let Some((req, effs)) = core.pipeline.borrow_mut().take() else {
        return fail(&lua, "no pipeline");
    };
    let Some(_busy) = Busy::take(&core) else {
        return fail(&lua, "socket busy");
    };
    let Some(mut conn) = core.conn.borrow_mut().take() else {
        return fail(&lua, "closed");
    };
    let (_, send_ms, read_ms) = core.timeouts.get();
    let mut full = Vec::with_capacity(req.len() + 32);
    let mut extra = 0;
    if std::mem::take(&mut conn.fresh_checkout)
        && conn.db != 0
        && !matches!(effs.first(), Some(Effect::Select(_)))
    {
        encode(&mut full, &[b"SELECT".to_vec(), b"0".to_vec()]);
        extra = 1;
    }
    full.extend_from_slice(&req);
    let res = async {
        conn.send(&full, send_ms).await?;
        for _ in 0..extra {
            conn.read(read_ms).await?;
            conn.db = 0;
        }
        let mut replies = Vec::with_capacity(effs.len());
        for eff in &effs {
            let r = conn.read(read_ms).await?;
            apply(&core, &mut conn, *eff, &r);
            replies.push(r);
        }
        Ok::<_, NetErr>(replies)
    }
    .await;
    match res {
        Ok(replies) => {
            *core.conn.borrow_mut() = Some(conn);
            let t = lua.create_table_with_capacity(replies.len(), 0)?;
            for (i, r) in replies.into_iter().enumerate() {
                t.raw_set(i + 1, value_to_lua(&lua, r)?)?;
            }
            Ok(MultiValue::from_vec(vec![Value::Table(t)]))
        }
        Err(e) => fail(&lua, &e.text()),
    }
}

async fn read_reply(lua: Lua, core: Rc<Core>) -> mlua::Result<MultiValue> {
    if !core.subscribed.get() {
        return fail(&lua, "not subscribed");
    }
    let Some(_busy) = Busy::take(&core) else {
        return fail(&lua, "socket busy");
    };
    let Some(mut conn) = core.conn.borrow_mut().take() else {
        return fail(&lua, "closed");
    };
    match conn.read(core.timeouts.get().2).await {
        Ok(r) => {
            apply(&core, &mut conn, Effect::Unsubscribe, &r);
            *core.conn.borrow_mut() = Some(conn);
            reply_to_lua(&lua, r)
        }
        Err(NetErr::Timeout) => {
            *core.conn.borrow_mut() = Some(conn);
            fail(&lua, "timeout")
        }
        Err(e) => fail(&lua, &e.text()),
    }
}

fn ms(v: Option<f64>) -> u64 {
    match v {
        Some(x) if x.is_finite() && x > 0.0 => x as u64,
        _ => 0,
    }
}

/// The natives the Lua half calls, as a table (passed to the bundled chunk as its argument).
pub fn natives(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "new",
        lua.create_function(|lua, ()| {
            let core = Core::default();
            let (sc, _) = super::resty_http::socket_conf(lua);
            core.timeouts.set((
                sc.connect_timeout_ms,
                sc.send_timeout_ms,
                sc.read_timeout_ms,
            ));
            core.pool_defaults
                .set((sc.keepalive_timeout_ms, sc.pool_size));
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
                Ok(1)
            },
        )?,
    )?;
    // The pooled case needs no wait: a plain call, cheaper than an async one per request.
    t.set(
        "connect_pooled",
        lua.create_function(
            |_, (ud, host, port, opts): (AnyUserData, String, Value, Value)| {
                let (core, port, opts) = connect_args(&ud, port, opts)?;
                if core.busy.get() {
                    return Ok(false);
                }
                core.conn.borrow_mut().take();
                core.subscribed.set(false);
                let key = pool_key(&host, port, opts.pool);
                let c = checkout(&key);
                *core.pool.borrow_mut() = key;
                match c {
                    Some(c) => {
                        *core.conn.borrow_mut() = Some(c);
                        Ok(true)
                    }
                    None => Ok(false),
                }
            },
        )?,
    )?;
    t.set(
        "connect",
        lua.create_async_function(
            |lua, (ud, host, port, opts): (AnyUserData, String, Value, Value)| {
                let prep = connect_args(&ud, port, opts);
                let (_, resolver) = super::resty_http::socket_conf(&lua);
                async move {
                    let (core, port, opts) = prep?;
                    connect(lua, core, host, port, opts, resolver).await
                }
            },
        )?,
    )?;
    t.set(
        "cmd",
        lua.create_async_function(|lua, (ud, args): (AnyUserData, MultiValue)| {
            let prep = (|| {
                let core = core_of(&ud)?;
                let args = args
                    .iter()
                    .map(arg_bytes)
                    .collect::<mlua::Result<Vec<_>>>()?;
                if args.is_empty() {
                    return Err(mlua::Error::runtime("no command"));
                }
                Ok((core, args))
            })();
            async move {
                let (core, args) = prep?;
                command(lua, core, args).await
            }
        })?,
    )?;
    t.set(
        "init_pipeline",
        lua.create_function(|_, (ud, n): (AnyUserData, Option<usize>)| {
            let core = core_of(&ud)?;
            let cap = n.unwrap_or(4).min(4096);
            *core.pipeline.borrow_mut() =
                Some((Vec::with_capacity(cap * 32), Vec::with_capacity(cap)));
            Ok(())
        })?,
    )?;
    t.set(
        "cancel_pipeline",
        lua.create_function(|_, ud: AnyUserData| {
            core_of(&ud)?.pipeline.borrow_mut().take();
            Ok(())
        })?,
    )?;
    t.set(
        "commit_pipeline",
        lua.create_async_function(|lua, ud: AnyUserData| {
            let core = core_of(&ud);
            async move { commit_pipeline(lua, core?).await }
        })?,
    )?;
    t.set(
        "read_reply",
        lua.create_async_function(|lua, ud: AnyUserData| {
            let core = core_of(&ud);
            async move { read_reply(lua, core?).await }
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
                if core.subscribed.get() {
                    return fail(lua, "subscribed state");
                }
                let Some(conn) = core.conn.borrow_mut().take() else {
                    return fail(lua, "closed");
                };
                if !conn.rbuf.is_empty() {
                    return fail(lua, "unread data in buffer");
                }
                if conn.no_pool {
                    return Ok(ok1());
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
            core.subscribed.set(false);
            let taken = core.conn.borrow_mut().take();
            match taken {
                Some(_) => Ok(ok1()),
                None => fail(lua, "closed"),
            }
        })?,
    )?;
    t.set(
        "idle_count",
        lua.create_function(|_, key: String| Ok(idle_count(&key)))?,
    )?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_reply_kind() {
        assert_eq!(
            parse(b"+OK\r\n").unwrap(),
            Some((Reply::Status(b"OK".to_vec()), 5))
        );
        assert_eq!(parse(b":42\r\n").unwrap(), Some((Reply::Int(42), 5)));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Reply::Bulk(None), 5)));
        assert_eq!(parse(b"*-1\r\n").unwrap(), Some((Reply::Array(None), 5)));
        assert_eq!(parse(b"$3\r\nab").unwrap(), None);
        assert_eq!(
            parse(b"$3\r\nabc\r\n").unwrap(),
            Some((Reply::Bulk(Some(b"abc".to_vec())), 9))
        );
        assert_eq!(
            parse(b"*2\r\n-ERR x\r\n$0\r\n\r\n").unwrap(),
            Some((
                Reply::Array(Some(vec![
                    Reply::Error(b"ERR x".to_vec()),
                    Reply::Bulk(Some(vec![]))
                ])),
                18
            ))
        );
        assert_eq!(parse(b"*2\r\n:1\r\n").unwrap(), None);
        assert!(parse(b"?x\r\n").is_err());
    }

    #[test]
    fn encodes_resp_arrays() {
        let mut out = Vec::new();
        encode(&mut out, &[b"GET".to_vec(), b"k".to_vec()]);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }
}
