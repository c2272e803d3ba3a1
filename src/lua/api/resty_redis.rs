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

use super::client_core::{Busy, Client, Handle};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use mlua::{AnyUserData, Lua, MultiValue, Table, UserDataRef, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::redis_mux::{CallErr, Creds, Mux, Target};

/// `SELECT 0`, sent ahead of the next user's first command on a connection left on another
/// database.
const SELECT_0: &[u8] = b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n";

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

/// Commands that may share a connection with other objects' commands: they neither depend on
/// nor change the connection's state, and they answer at once (no blocking pops, no scripts
/// that could hold the replies of everybody else).
fn plain_command(name: &[u8]) -> bool {
    const PLAIN: &[&str] = &[
        "get",
        "set",
        "setex",
        "psetex",
        "setnx",
        "getset",
        "getdel",
        "mget",
        "mset",
        "msetnx",
        "incr",
        "incrby",
        "incrbyfloat",
        "decr",
        "decrby",
        "append",
        "strlen",
        "getrange",
        "setrange",
        "exists",
        "del",
        "unlink",
        "type",
        "expire",
        "pexpire",
        "expireat",
        "pexpireat",
        "persist",
        "ttl",
        "pttl",
        "hget",
        "hset",
        "hsetnx",
        "hmget",
        "hmset",
        "hgetall",
        "hdel",
        "hexists",
        "hincrby",
        "hincrbyfloat",
        "hlen",
        "hkeys",
        "hvals",
        "sadd",
        "srem",
        "sismember",
        "smembers",
        "scard",
        "zadd",
        "zrem",
        "zscore",
        "zincrby",
        "zcard",
        "zrank",
        "zrevrank",
        "zrange",
        "zrevrange",
        "zrangebyscore",
        "zcount",
        "lpush",
        "rpush",
        "lpop",
        "rpop",
        "llen",
        "lrange",
        "lindex",
        "lset",
        "ltrim",
        "lrem",
        "pfadd",
        "pfcount",
        "publish",
        "ping",
        "echo",
    ];
    name.len() <= 16
        && PLAIN
            .iter()
            .any(|p| name.eq_ignore_ascii_case(p.as_bytes()))
}

/// `n` in decimal, written at the end of `buf` (no allocation, no formatting machinery).
fn dec_digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Append `n` in decimal.
fn push_dec(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(dec_digits(n as u64, &mut [0u8; 20]));
}

fn push_bulk(out: &mut Vec<u8>, a: &[u8]) {
    out.push(b'$');
    push_dec(out, a.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(a);
    out.extend_from_slice(b"\r\n");
}

/// Append one command given as Lua values (what `red:cmd(...)` passed) as a RESP array, and
/// say what it does to the connection's state. No copy of the arguments in between.
fn encode_values(out: &mut Vec<u8>, args: &VecDeque<Value>) -> mlua::Result<Effect> {
    out.push(b'*');
    push_dec(out, args.len());
    out.extend_from_slice(b"\r\n");
    let start = out.len();
    let mut after_name = start;
    for (i, v) in args.iter().enumerate() {
        match v {
            Value::String(s) => push_bulk(out, &s.as_bytes()),
            Value::Integer(n) => push_bulk(out, n.to_string().as_bytes()),
            Value::Number(n) => {
                push_bulk(out, crate::lua::api::output::format_number(*n).as_bytes())
            }
            Value::Boolean(b) => push_bulk(out, if *b { b"true" } else { b"false" }),
            Value::Nil => push_bulk(out, b"nil"),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "bad argument: {} not allowed in a redis command",
                    other.type_name()
                )))
            }
        }
        if i == 0 {
            after_name = out.len();
        }
    }
    Ok(effect_of(&out[start..], after_name - start, args))
}

/// The effect of an encoded command: `enc` is its arguments (bulk strings), the first
/// `name_len` bytes of them the command's name.
fn effect_of(enc: &[u8], name_len: usize, args: &VecDeque<Value>) -> Effect {
    let Some(Value::String(name)) = args.front() else {
        return Effect::None;
    };
    let name = name.as_bytes();
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    if name.len() < 4 || name.len() > 12 {
        Effect::None
    } else if is("select") {
        let db = match args.get(1) {
            Some(Value::Integer(n)) => Some(*n),
            Some(Value::Number(n)) if n.fract() == 0.0 => Some(*n as i64),
            Some(Value::String(s)) => s.to_str().ok().and_then(|s| s.trim().parse().ok()),
            _ => None,
        };
        db.map_or(Effect::None, Effect::Select)
    } else if is("auth") {
        Effect::Auth(hash_bytes(&enc[name_len..]))
    } else if is("subscribe") || is("psubscribe") {
        Effect::Subscribe
    } else if is("unsubscribe") || is("punsubscribe") {
        Effect::Unsubscribe
    } else {
        Effect::None
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

pub(super) enum Io {
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
    pub(super) fn poll_write(
        &mut self,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use tokio::io::AsyncWrite;
        match self {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, b),
            Io::Unix(s) => std::pin::Pin::new(s).poll_write(cx, b),
        }
    }
    /// Read what is there into `buf`: `Ready(Ok(0))` is the end of the stream.
    pub(super) fn poll_read_into(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &mut BytesMut,
    ) -> std::task::Poll<io::Result<usize>> {
        use tokio::io::{AsyncRead, ReadBuf};
        buf.reserve(8192);
        let mut rb = ReadBuf::uninit(buf.spare_capacity_mut());
        let r = match self {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, &mut rb),
            Io::Unix(s) => std::pin::Pin::new(s).poll_read(cx, &mut rb),
        };
        match r {
            std::task::Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // SAFETY: the reader initialised the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
                std::task::Poll::Ready(Ok(n))
            }
            std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
    fn try_write(&self, b: &[u8]) -> io::Result<usize> {
        match self {
            Io::Tcp(s) => s.try_write(b),
            Io::Unix(s) => s.try_write(b),
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
    /// The last successful `AUTH` command, encoded (replayed for objects of a shared
    /// connection that move to a connection of their own).
    auth_cmd: Option<Rc<[u8]>>,
}

impl Conn {
    fn new(io: Io) -> Conn {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(4096),
            reused: 0,
            db: 0,
            auth: None,
            fresh_checkout: false,
            no_pool: false,
            auth_cmd: None,
        }
    }

    async fn send(&mut self, req: &[u8], timeout_ms: u64) -> Result<(), NetErr> {
        // A command almost always fits the socket's buffer: no timer for that case.
        let done = match self.io.try_write(req) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(NetErr::Io(e)),
        };
        if done == req.len() {
            return Ok(());
        }
        match with_timeout(timeout_ms, self.io.write_all(&req[done..])).await {
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

pub(super) async fn with_timeout<F: std::future::Future>(ms: u64, f: F) -> Option<F::Output> {
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

/// One keepalive pool: idle connections, most recently used at the back.
struct Pool {
    key: String,
    idle: VecDeque<Idle>,
    /// No idle connection expires before this: a check-in scans for expired ones only after it.
    earliest: Option<Instant>,
    /// The connection shared by the plain commands of this pool's objects (redis_mux.rs).
    mux: Option<Rc<Mux>>,
    /// Where this pool's connections go (the first successful `connect`).
    target: Option<Rc<Target>>,
}

/// The pools of this worker. A pool is never removed, so an object keeps its pool's index
/// from `connect` to `set_keepalive` instead of the key, and a request that uses the same pool
/// as the previous one finds it without building the key or hashing it.
#[derive(Default)]
struct Pools {
    list: Vec<Pool>,
    index: HashMap<String, usize>,
    last: usize,
}

thread_local! {
    static POOLS: RefCell<Pools> = RefCell::new(Pools::default());
}

/// Where a connection to `host`/`port` with the `pool` option belongs.
fn pool_id(host: &str, port: Option<u16>, pool: Option<&str>) -> usize {
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        if let Some(last) = p.list.get(p.last) {
            if key_matches(&last.key, host, port, pool) {
                return p.last;
            }
        }
        let key = pool_key(host, port, pool);
        let id = match p.index.get(&key) {
            Some(&id) => id,
            None => {
                let id = p.list.len();
                p.list.push(Pool {
                    key: key.clone(),
                    idle: VecDeque::new(),
                    earliest: None,
                    mux: None,
                    target: None,
                });
                p.index.insert(key, id);
                id
            }
        };
        p.last = id;
        id
    })
}

/// `pool_key(host, port, pool) == key`, without building the key.
fn key_matches(key: &str, host: &str, port: Option<u16>, pool: Option<&str>) -> bool {
    match (pool, port) {
        (Some(p), _) => key == p,
        (None, Some(port)) if !host.starts_with("unix:") => {
            let mut digits = [0u8; 20];
            let d = dec_digits(port.into(), &mut digits);
            key.len() == host.len() + 1 + d.len()
                && key.starts_with(host)
                && key.as_bytes()[host.len()] == b':'
                && key.as_bytes()[host.len() + 1..] == *d
        }
        _ => key == host,
    }
}

fn checkout(id: usize) -> Option<Conn> {
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        let q = &mut p.list.get_mut(id)?.idle;
        let mut now = None;
        while let Some(idle) = q.pop_back() {
            if let Some(e) = idle.expires {
                if e <= *now.get_or_insert_with(Instant::now) {
                    continue;
                }
            }
            if !idle.conn.io.idle_ok() {
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

/// Close the idle connections whose idle timeout has passed, if one is due.
fn prune(pool: &mut Pool, now: Instant) {
    if pool.earliest.is_some_and(|e| e <= now) {
        pool.idle.retain(|i| i.expires.is_none_or(|e| e > now));
        pool.earliest = pool.idle.iter().filter_map(|i| i.expires).min();
    }
}

fn checkin(id: usize, conn: Conn, timeout_ms: u64, size: usize) {
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        let Some(pool) = p.list.get_mut(id) else {
            return;
        };
        let now = Instant::now();
        prune(pool, now);
        // nginx closes the least recently used connection when the pool is full.
        while pool.idle.len() >= size.max(1) {
            pool.idle.pop_front();
        }
        let expires = (timeout_ms > 0).then(|| now + Duration::from_millis(timeout_ms));
        if let Some(e) = expires {
            pool.earliest = Some(pool.earliest.map_or(e, |x| x.min(e)));
        }
        pool.idle.push_back(Idle { conn, expires });
    })
}

/// The pool's shared connection, if it takes new objects. While it serves, nothing checks
/// connections in or out of the pool, so this is where idle ones are closed when they expire.
fn usable_mux(id: usize) -> Option<Rc<Mux>> {
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        let pool = p.list.get_mut(id)?;
        let m = pool.mux.as_ref()?;
        if !m.usable() {
            return None;
        }
        let m = m.clone();
        if pool.earliest.is_some() {
            prune(pool, Instant::now());
        }
        Some(m)
    })
}

/// Make `conn` the pool's shared connection if the pool has none and the connection is in a
/// state every attached object can share; otherwise give it back (`Some`).
fn promote(id: usize, conn: Conn, idle_ms: u64) -> Option<Conn> {
    if conn.db != 0 || conn.no_pool || (conn.auth.is_some() && conn.auth_cmd.is_none()) {
        return Some(conn);
    }
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        let Some(pool) = p.list.get_mut(id) else {
            return Some(conn);
        };
        if pool.mux.as_ref().is_some_and(|m| m.usable()) {
            return Some(conn);
        }
        let Some(target) = pool.target.clone() else {
            return Some(conn);
        };
        let creds = Creds {
            reused: conn.reused,
            auth: conn.auth,
            auth_cmd: conn.auth_cmd,
        };
        pool.mux = Some(Mux::start(conn.io, conn.rbuf, creds, target, idle_ms));
        None
    })
}

fn set_target(
    id: usize,
    host: String,
    port: Option<u16>,
    resolver: Option<std::sync::Arc<crate::net::Resolver>>,
) {
    POOLS.with(|p| {
        if let Some(pool) = p.borrow_mut().list.get_mut(id) {
            if pool.target.is_none() {
                pool.target = Some(Rc::new(Target {
                    host,
                    port,
                    resolver,
                }));
            }
        }
    })
}

/// Idle connections in pool `key` on this worker (tests and diagnostics).
pub fn idle_count(key: &str) -> usize {
    POOLS.with(|p| {
        let p = p.borrow();
        p.index.get(key).map_or(0, |&id| p.list[id].idle.len())
    })
}

/// A `resty.redis` object's native state.
#[derive(Default)]
struct Core {
    conn: RefCell<Option<Conn>>,
    /// Attached to the pool's shared connection instead of `conn` (plain commands only).
    mux: RefCell<Option<Rc<Mux>>>,
    /// `get_reused_times` while attached to the shared connection.
    mux_reused: Cell<u32>,
    /// connect, send, read timeouts in ms.
    timeouts: Cell<(u64, u64, u64)>,
    /// The pool of the last `connect` (an index into this worker's pools).
    pool: Cell<Option<usize>>,
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

impl Core {
    /// Let go of the connection (closing it) or of the shared one.
    fn detach(&self) {
        self.conn.borrow_mut().take();
        self.mux.borrow_mut().take();
        self.subscribed.set(false);
    }

    /// Whether the object holds a connection, its own or the shared one.
    fn connected(&self) -> bool {
        self.conn.borrow().is_some() || self.mux.borrow().is_some()
    }
}

/// Before a command: an object attached to the shared connection keeps it for a plain command
/// and gets a connection of its own for anything else.
async fn shared_or_own(core: &Core, plain: bool) -> Result<(), String> {
    if core.conn.borrow().is_some() {
        return Ok(());
    }
    let mux = core.mux.borrow().clone();
    match mux {
        Some(m) if !plain => own_conn(core, &m).await,
        _ => Ok(()),
    }
}

/// Give an object attached to the shared connection a connection of its own: the shared one
/// itself when nothing is in flight on it, else an idle one of its pool or a new one,
/// authenticated as the shared one was (the object may have skipped its `AUTH` for it).
async fn own_conn(core: &Core, mux: &Mux) -> Result<(), String> {
    core.mux.borrow_mut().take();
    if let Some((io, rbuf, creds)) = mux.take_idle() {
        let mut c = Conn::new(io);
        c.rbuf = rbuf;
        c.reused = core.mux_reused.get();
        c.auth = creds.auth;
        c.auth_cmd = creds.auth_cmd;
        *core.conn.borrow_mut() = Some(c);
        return Ok(());
    }
    let (_, send_ms, read_ms) = core.timeouts.get();
    let mut c = match core.pool.get().and_then(checkout) {
        Some(c) => c,
        None => {
            let t = &mux.target;
            Conn::new(open(&t.host, t.port, core.timeouts.get().0, t.resolver.as_ref()).await?)
        }
    };
    if let Some((h, cmd)) = mux.auth_cmd() {
        if c.auth != Some(h) {
            c.send(&cmd, send_ms).await.map_err(|e| e.text())?;
            if let Reply::Error(e) = c.read(read_ms).await.map_err(|e| e.text())? {
                return Err(String::from_utf8_lossy(&e).into_owned());
            }
            c.auth = Some(h);
            c.auth_cmd = Some(cmd);
        }
    }
    *core.conn.borrow_mut() = Some(c);
    Ok(())
}

impl Client for Core {
    fn busy(&self) -> &Cell<bool> {
        &self.busy
    }
}

fn core_of(ud: &AnyUserData) -> mlua::Result<Rc<Core>> {
    super::client_core::core_of(ud)
}

fn hash_bytes(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
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
fn pool_key(host: &str, port: Option<u16>, pool: Option<&str>) -> String {
    match (pool, port) {
        (Some(p), _) => p.to_string(),
        (None, Some(p)) if !host.starts_with("unix:") => format!("{}:{}", host, p),
        _ => host.to_string(),
    }
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
    core.detach();
    let id = pool_id(&host, port, opts.pool.as_deref());
    core.pool.set(Some(id));
    if let Some(m) = usable_mux(id) {
        core.mux_reused.set(m.attach());
        *core.mux.borrow_mut() = Some(m);
        return Ok(ok1());
    }
    if let Some(c) = checkout(id) {
        *core.conn.borrow_mut() = Some(c);
        return Ok(ok1());
    }
    match open(&host, port, core.timeouts.get().0, resolver.as_ref()).await {
        Ok(io) => {
            set_target(id, host, port, resolver);
            *core.conn.borrow_mut() = Some(Conn::new(io));
            Ok(ok1())
        }
        Err(e) => fail(&lua, &e),
    }
}

/// Send one command (or queue it in a pipeline) and read its reply.
async fn command(
    lua: Lua,
    core: Rc<Core>,
    enc: Vec<u8>,
    eff: Effect,
    plain: bool,
) -> mlua::Result<MultiValue> {
    let Some(_busy) = Busy::take(&core) else {
        return fail(&lua, "socket busy");
    };
    let mux = core.mux.borrow().clone();
    let own = core.conn.borrow().is_some();
    if let (Some(mux), false) = (mux, own) {
        if let Effect::Auth(h) = eff {
            // Already authenticated with these credentials: no round trip, as on a reused
            // pooled connection.
            if mux.has_auth(h) {
                return reply_to_lua(&lua, Reply::Status(b"OK".to_vec()));
            }
        }
        if plain {
            match mux.call(&enc, core.timeouts.get().2).await {
                Ok(reply) => return reply_to_lua(&lua, reply),
                Err(CallErr::Failed(e)) => {
                    // As with a connection of its own, a timeout or a failure closes it.
                    core.mux.borrow_mut().take();
                    return fail(&lua, &e);
                }
                Err(CallErr::Gone) => {}
            }
        }
    }
    if let Err(e) = shared_or_own(&core, false).await {
        return fail(&lua, &e);
    }
    let Some(mut conn) = core.conn.borrow_mut().take() else {
        return fail(&lua, "closed");
    };
    let (_, send_ms, read_ms) = core.timeouts.get();
    let auth_cmd = matches!(eff, Effect::Auth(_)).then(|| Rc::<[u8]>::from(&enc[..]));
    let mut req = enc;
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
            let mut full = Vec::with_capacity(req.len() + SELECT_0.len());
            full.extend_from_slice(SELECT_0);
            full.extend_from_slice(&req);
            req = full;
            extra = 1;
        }
    }
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
            if conn.auth.is_some() && auth_cmd.is_some() && !matches!(reply, Reply::Error(_)) {
                conn.auth_cmd = auth_cmd;
            }
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
    if let Err(e) = shared_or_own(&core, false).await {
        return fail(&lua, &e);
    }
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
        full.extend_from_slice(SELECT_0);
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
            |_, (ud, host, port, opts): (AnyUserData, mlua::LuaString, Value, Value)| {
                let (core, port, opts) = connect_args(&ud, port, opts)?;
                if core.busy.get() {
                    return Ok(false);
                }
                core.detach();
                let host = host.to_str()?;
                let id = pool_id(&host, port, opts.pool.as_deref());
                core.pool.set(Some(id));
                if let Some(m) = usable_mux(id) {
                    core.mux_reused.set(m.attach());
                    *core.mux.borrow_mut() = Some(m);
                    return Ok(true);
                }
                let c = checkout(id);
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
        lua.create_async_function(|lua, (ud, args): (UserDataRef<Handle<Core>>, MultiValue)| {
            let core = ud.0.clone();
            drop(ud);
            let prep = (|| {
                if args.is_empty() {
                    return Err(mlua::Error::runtime("no command"));
                }
                // Queued in a pipeline: nothing to wait for.
                if let Some((buf, effs)) = core.pipeline.borrow_mut().as_mut() {
                    // A bad argument (caught by the caller's pcall) must leave no half a
                    // command in the pipeline.
                    let len = buf.len();
                    match encode_values(buf, &args) {
                        Ok(eff) => effs.push(eff),
                        Err(e) => {
                            buf.truncate(len);
                            return Err(e);
                        }
                    }
                    return Ok(None);
                }
                let mut enc = Vec::with_capacity(64);
                let eff = encode_values(&mut enc, &args)?;
                let plain = eff == Effect::None
                    && matches!(args.front(), Some(Value::String(n)) if plain_command(&n.as_bytes()));
                Ok(Some((enc, eff, plain)))
            })();
            drop(args);
            async move {
                match prep? {
                    None => Ok(MultiValue::new()),
                    Some((enc, eff, plain)) => command(lua, core, enc, eff, plain).await,
                }
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
                let conn = core.conn.borrow_mut().take();
                let Some(conn) = conn else {
                    let Some(mux) = core.mux.borrow_mut().take() else {
                        return fail(lua, "closed");
                    };
                    if matches!(size, Some(s) if s < 1.0) {
                        return Err(mlua::Error::runtime(
                            "bad argument #2 to 'set_keepalive' (bad \"pool_size\" option value)",
                        ));
                    }
                    // The shared connection closes after this long without commands.
                    mux.idle_ms.set(match timeout {
                        Some(t) => ms(Some(t)),
                        None => core.pool_defaults.get().0,
                    });
                    return Ok(ok1());
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
                if let Some(id) = core.pool.get() {
                    // Under a request (the shared connection's driver runs on the worker's
                    // LocalSet), a pool without a shared connection gets this one.
                    let conn = match crate::lua::request::try_current(lua) {
                        Some(_) => promote(id, conn, timeout),
                        None => Some(conn),
                    };
                    if let Some(conn) = conn {
                        checkin(id, conn, timeout, size);
                    }
                }
                Ok(ok1())
            },
        )?,
    )?;
    t.set(
        "get_reused_times",
        lua.create_function(|lua, ud: AnyUserData| {
            let core = core_of(&ud)?;
            let mut n = core.conn.borrow().as_ref().map(|c| c.reused);
            if n.is_none() && core.mux.borrow().is_some() {
                n = Some(core.mux_reused.get());
            }
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
            let was = core.connected();
            // The shared connection is closed for newcomers (what is in flight completes):
            // the next `connect` opens a new connection, as after closing a pooled one.
            if let Some(m) = core.mux.borrow().as_ref() {
                m.retire();
            }
            core.detach();
            match was {
                true => Ok(ok1()),
                false => fail(lua, "closed"),
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
