//! `ngx.socket.tcp()` (and `ngx.socket.stream`, `ngx.socket.connect`): lua-nginx-module's
//! cosockets. Every wait (resolve, connect, pool backlog, send, receive, TLS handshake) is a
//! tokio future behind `create_async_function`, so a blocked socket only parks its own
//! coroutine. The sockets themselves, pools, reads and TLS live in `crate::net`.
//!
//! Unlike OpenResty, cosockets work in every phase (set_by_lua, header_filter, body_filter,
//! log too). A socket left open when its request ends is closed within a second by a sweeper
//! (OpenResty closes it at once; Lua's GC would otherwise decide when).

use std::cell::{Cell, RefCell};
use std::os::fd::{BorrowedFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mlua::{
    AnyUserData, Lua, MultiValue, Table, UserData, UserDataMethods, UserDataRef, Value, Variadic,
};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

use crate::conf::model::{LocConf, LuaSocketConf};
use crate::http::request::ReqCtx;
use crate::log::Level;
use crate::lua::request::try_current;
use crate::net::pool::{self, Acquired, Slot};
use crate::net::read::{self, ReadErr};
use crate::net::stream::{self, Stream};

/// The http-level configuration, for cosockets used without a request (timers, init_worker).
/// Set by the worker when it builds its Lua state.
pub struct HttpConf(pub Arc<LocConf>);

static DEFAULTS: LazyLock<LuaSocketConf> = LazyLock::new(LuaSocketConf::default);

/// The configuration that applies to the running Lua code.
pub fn conf_of(lua: &Lua) -> Option<Arc<LocConf>> {
    if let Some(rc) = try_current(lua) {
        return Some(rc.st.borrow().conf.clone());
    }
    lua.app_data_ref::<HttpConf>().map(|c| c.0.clone())
}

fn sock_conf(c: &Option<Arc<LocConf>>) -> &LuaSocketConf {
    c.as_ref().map(|c| &c.lua_socket).unwrap_or(&DEFAULTS)
}

/// Log a cosocket failure at `[error]` (when `lua_socket_log_errors` is on).
pub fn log_error(lua: &Lua, conf: &Option<Arc<LocConf>>, msg: &str) {
    if !sock_conf(conf).log_errors {
        return;
    }
    match try_current(lua) {
        Some(rc) => crate::log::request_error(&rc, Level::Error, msg),
        None => crate::log::log(Level::Error, None, msg),
    }
}

/// State of one TCP cosocket. The stream is split so one light thread may read while
/// another writes; an operation takes its half out and puts it back (never holding a borrow
/// across an await). `gen` changes on close/connect so a half coming back late is dropped.
#[derive(Default)]
struct Sock {
    rd: Option<ReadHalf<Stream>>,
    wr: Option<WriteHalf<Stream>>,
    connected: bool,
    gen: u64,
    fd: RawFd,
    tls: bool,
    tcp: bool,
    rbuf: BytesMut,
    /// settimeout(s): connect, send, read (ms); None: the lua_socket_* directive.
    timeouts: [Option<u64>; 3],
    key: String,
    host: String,
    slot: Option<Slot>,
    reused: u32,
    conf: Option<Arc<LocConf>>,
    /// The request that connected it (closed by the sweeper once the request is gone).
    owner: Option<Weak<ReqCtx>>,
    /// Wakes operations in flight when the socket is closed under them.
    cancel: Rc<tokio::sync::Notify>,
}

impl Sock {
    fn timeout(&self, i: usize) -> Duration {
        let c = sock_conf(&self.conf);
        let d = [c.connect_timeout_ms, c.send_timeout_ms, c.read_timeout_ms][i];
        Duration::from_millis(self.timeouts[i].unwrap_or(d).max(1))
    }

    fn close(&mut self) {
        self.cancel.notify_waiters();
        self.rd = None;
        self.wr = None;
        self.slot = None;
        self.connected = false;
        self.gen += 1;
        self.rbuf = BytesMut::new();
    }

    fn install(&mut self, s: Stream) {
        self.fd = s.fd();
        self.tls = s.is_tls();
        self.tcp = s.is_tcp();
        let (r, w) = tokio::io::split(s);
        self.rd = Some(r);
        self.wr = Some(w);
        self.connected = true;
    }

    /// The whole stream, when no operation has a half out.
    fn unsplit(&mut self) -> Result<Stream, &'static str> {
        if !self.connected {
            return Err("closed");
        }
        match (self.rd.take(), self.wr.take()) {
            (Some(r), Some(w)) => Ok(r.unsplit(w)),
            (r, w) => {
                let busy = if r.is_none() {
                    "socket busy reading"
                } else {
                    "socket busy writing"
                };
                self.rd = r;
                self.wr = w;
                Err(busy)
            }
        }
    }
}

type Shared = Rc<RefCell<Sock>>;

/// The Lua object.
pub struct TcpSock(Shared);

fn nil_err(lua: &Lua, err: &str) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Nil,
        Value::String(lua.create_string(err)?),
    ]))
}

fn nil_err_partial(lua: &Lua, err: &str, partial: &[u8]) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Nil,
        Value::String(lua.create_string(err)?),
        Value::String(lua.create_string(partial)?),
    ]))
}

fn one(v: Value) -> MultiValue {
    MultiValue::from_vec(vec![v])
}

// ---- sweeper: sockets whose request has ended ----

/// A cosocket that can be closed once its request is gone.
pub trait Orphan {
    /// Close if the owning request has ended.
    fn close_orphan(&self);
}

impl Orphan for RefCell<Sock> {
    fn close_orphan(&self) {
        if let Ok(mut s) = self.try_borrow_mut() {
            if s.owner.as_ref().is_some_and(|o| o.strong_count() == 0) {
                s.close();
            }
        }
    }
}

type Tracked = (Weak<ReqCtx>, Weak<dyn Orphan>);

thread_local! {
    static LIVE: RefCell<Vec<Tracked>> = const { RefCell::new(Vec::new()) };
    static SWEEPING: Cell<bool> = const { Cell::new(false) };
}

/// Have `sock` closed within about a second after `owner` ends.
pub fn track(owner: Weak<ReqCtx>, sock: Weak<dyn Orphan>) {
    LIVE.with(|l| l.borrow_mut().push((owner, sock)));
    if SWEEPING.with(|f| f.replace(true)) {
        return;
    }
    tokio::task::spawn_local(async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut dead = Vec::new();
            let empty = LIVE.with(|l| {
                let mut l = l.borrow_mut();
                l.retain(|(req, sock)| {
                    let Some(s) = sock.upgrade() else {
                        return false;
                    };
                    if req.strong_count() == 0 {
                        dead.push(s);
                        return false;
                    }
                    true
                });
                l.is_empty()
            });
            for s in dead {
                s.close_orphan();
            }
            if empty {
                SWEEPING.with(|f| f.set(false));
                return;
            }
        }
    });
}

// ---- operations ----

/// nginx refreshes its cached clock on every event loop turn, so `ngx.now()` moves across a
/// cosocket wait.
pub fn after_wait<T>(r: T) -> T {
    crate::lua::api::time::update_cached_time();
    r
}

fn default_key(host: &str, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("{}:{}", host, p),
        None => host.to_string(),
    }
}

async fn connect(lua: Lua, s: Shared, args: MultiValue) -> mlua::Result<MultiValue> {
    let mut it = args.into_iter();
    let target = match it.next() {
        Some(Value::String(h)) => h.to_str()?.to_string(),
        _ => {
            return Err(mlua::Error::runtime(
                "bad argument #1 to 'connect' (string expected)",
            ))
        }
    };
    let (unix, port, opts) = if let Some(path) = target.strip_prefix("unix:") {
        let opts = match it.next() {
            Some(Value::Table(t)) => Some(t),
            _ => None,
        };
        (Some(path.to_string()), None, opts)
    } else {
        let port = match it.next() {
            Some(Value::Integer(p)) => p,
            Some(Value::Number(p)) => p as i64,
            Some(Value::String(p)) => p.to_str()?.parse::<i64>().map_err(|_| {
                mlua::Error::runtime("bad argument #2 to 'connect' (number expected, got string)")
            })?,
            _ => {
                return Err(mlua::Error::runtime(
                    "bad argument #2 to 'connect' (number expected)",
                ))
            }
        };
        if !(0..=65535).contains(&port) {
            return nil_err(&lua, &format!("bad port number: {}", port));
        }
        let opts = match it.next() {
            Some(Value::Table(t)) => Some(t),
            _ => None,
        };
        (None, Some(port as u16), opts)
    };
    let mut key = None;
    let mut pool_size = None;
    let mut backlog = None;
    if let Some(o) = &opts {
        if let Some(k) = o.get::<Option<mlua::LuaString>>("pool")? {
            key = Some(k.to_str()?.to_string());
        }
        if let Some(n) = o.get::<Option<i64>>("pool_size")? {
            if n <= 0 {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #{} to 'connect' (bad \"pool_size\" option value: {})",
                    if unix.is_some() { 3 } else { 4 },
                    n
                )));
            }
            pool_size = Some(n as usize);
        }
        if let Some(n) = o.get::<Option<i64>>("backlog")? {
            if n < 0 {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #{} to 'connect' (bad \"backlog\" option value: {})",
                    if unix.is_some() { 3 } else { 4 },
                    n
                )));
            }
            backlog = Some(n as usize);
        }
    }
    let conf = conf_of(&lua);
    let key = key.unwrap_or_else(|| default_key(&target, port));
    let (deadline, size) = {
        let mut st = s.borrow_mut();
        // Connecting a connected socket closes the old connection first.
        if st.connected {
            st.close();
        }
        st.gen += 1;
        st.conf = conf.clone();
        st.key = key.clone();
        st.host = unix.clone().unwrap_or_else(|| target.clone());
        st.reused = 0;
        let size = pool_size.unwrap_or(sock_conf(&conf).pool_size);
        (Instant::now() + st.timeout(0), size)
    };
    let gen = s.borrow().gen;
    let create = pool_size.is_some() || backlog.is_some();
    let p = pool::pool(&key, create, size, backlog);
    let (stream, slot, reused) = match pool::acquire(p.as_ref(), deadline).await {
        Err(e) => {
            if e == "timeout" {
                log_error(&lua, &conf, "lua tcp socket queued connect timed out");
            }
            return nil_err(&lua, e);
        }
        Ok(Acquired::Reuse(pooled)) => (pooled.stream, Some(pooled.slot), pooled.reused + 1),
        Ok(Acquired::New(slot)) => {
            let made = match &unix {
                Some(path) => connect_unix(path, deadline).await,
                None => {
                    let resolver = conf.as_ref().and_then(|c| c.resolver.clone());
                    connect_tcp(&target, port.unwrap_or(0), resolver, deadline).await
                }
            };
            match made {
                Ok(st) => (st, slot, 0),
                Err((err, log)) => {
                    if let Some(l) = log {
                        log_error(&lua, &conf, &l);
                    }
                    return nil_err(&lua, &err);
                }
            }
        }
    };
    let mut st = s.borrow_mut();
    if st.gen != gen {
        // Closed (or reconnected) by another light thread meanwhile.
        return nil_err(&lua, "closed");
    }
    st.install(stream);
    st.slot = slot;
    st.reused = reused;
    if let Some(rc) = try_current(&lua) {
        let w = Rc::downgrade(&rc);
        st.owner = Some(w.clone());
        drop(st);
        let weak: Weak<dyn Orphan> = Rc::downgrade(&s) as Weak<dyn Orphan>;
        track(w, weak);
    }
    Ok(one(Value::Integer(1)))
}

type ConnectErr = (String, Option<String>);

async fn connect_unix(path: &str, deadline: Instant) -> Result<Stream, ConnectErr> {
    match tokio::time::timeout_at(deadline.into(), tokio::net::UnixStream::connect(path)).await {
        Err(_) => Err((
            "timeout".into(),
            Some(format!(
                "lua tcp socket connect timed out, when connecting to unix:{}",
                path
            )),
        )),
        Ok(Ok(s)) => Ok(Stream::Unix(s)),
        Ok(Err(e)) => Err((
            stream::error_text(&e),
            Some(format!(
                "connect() to unix:{} failed ({})",
                path,
                stream::errno_text(&e)
            )),
        )),
    }
}

async fn connect_tcp(
    host: &str,
    port: u16,
    resolver: Option<Arc<crate::net::Resolver>>,
    deadline: Instant,
) -> Result<Stream, ConnectErr> {
    let addrs = match tokio::time::timeout_at(
        deadline.into(),
        crate::net::resolve(resolver.as_ref(), host, port),
    )
    .await
    {
        Err(_) => {
            return Err((
                "timeout".into(),
                Some(format!("lua tcp socket resolving \"{}\" timed out", host)),
            ))
        }
        Ok(Err(e)) => return Err((e.clone(), Some(e))),
        Ok(Ok(a)) => a,
    };
    // OpenResty picks one of several addresses at random.
    let addr = addrs[if addrs.len() > 1 {
        rand::random_range(0..addrs.len())
    } else {
        0
    }];
    match tokio::time::timeout_at(deadline.into(), tokio::net::TcpStream::connect(addr)).await {
        Err(_) => Err((
            "timeout".into(),
            Some(format!(
                "lua tcp socket connect timed out, when connecting to {}",
                addr
            )),
        )),
        Ok(Ok(s)) => {
            // nginx's `tcp_nodelay on` (its default) applies to cosockets: request/response
            // protocols must not wait on Nagle + delayed ACKs between two sends.
            let _ = s.set_nodelay(true);
            Ok(Stream::Tcp(s))
        }
        Ok(Err(e)) => Err((
            stream::error_text(&e),
            Some(format!(
                "connect() to {} failed ({})",
                addr,
                stream::errno_text(&e)
            )),
        )),
    }
}

/// What a receive call asked for.
enum Want {
    Line,
    All,
    Bytes(usize),
    Any(usize),
}

/// The read half and buffer for one read, or the reason there is none.
fn take_reader(
    s: &Shared,
) -> Result<(ReadHalf<Stream>, BytesMut, u64, Duration, usize), &'static str> {
    let mut st = s.borrow_mut();
    if !st.connected {
        return Err("closed");
    }
    let Some(rd) = st.rd.take() else {
        return Err("socket busy reading");
    };
    let buf = std::mem::take(&mut st.rbuf);
    let chunk = sock_conf(&st.conf).buffer_size;
    Ok((rd, buf, st.gen, st.timeout(2), chunk))
}

/// Put the read half back; after a fatal error the socket is closed instead.
fn give_back_reader(s: &Shared, rd: ReadHalf<Stream>, buf: BytesMut, gen: u64, fatal: bool) {
    let mut st = s.borrow_mut();
    if st.gen != gen {
        return;
    }
    if fatal {
        st.close();
        return;
    }
    st.rd = Some(rd);
    st.rbuf = buf;
}

/// A read half out of its socket for one read. If the read is abandoned (its light thread was
/// killed, or its request ended), the half and what was buffered so far go back to the
/// socket, as nginx's cleanup of a pending read leaves the connection usable.
struct Reading {
    s: Shared,
    gen: u64,
    rd: Option<ReadHalf<Stream>>,
    buf: BytesMut,
}

impl Reading {
    fn take(s: &Shared) -> Result<(Reading, Duration, usize), &'static str> {
        let (rd, buf, gen, timeout, chunk) = take_reader(s)?;
        let r = Reading {
            s: s.clone(),
            gen,
            rd: Some(rd),
            buf,
        };
        Ok((r, timeout, chunk))
    }

    /// The half and buffer for the read itself.
    fn parts(&mut self) -> Option<(&mut ReadHalf<Stream>, &mut BytesMut)> {
        Some((self.rd.as_mut()?, &mut self.buf))
    }

    /// Finished normally: the caller puts the half back itself.
    fn done(mut self) -> Option<(ReadHalf<Stream>, BytesMut)> {
        let rd = self.rd.take()?;
        Some((rd, std::mem::take(&mut self.buf)))
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        let Some(rd) = self.rd.take() else {
            return;
        };
        if let Ok(mut st) = self.s.try_borrow_mut() {
            if st.gen == self.gen && st.rd.is_none() {
                st.rd = Some(rd);
                st.rbuf = std::mem::take(&mut self.buf);
            }
        }
    }
}

/// Lines and delimited reads stop at this many buffers (1 MB with the default 4k).
const MAX_LINE_BUFFERS: usize = 256;

async fn receive(
    lua: Lua,
    s: Shared,
    want: Want,
    prefix: Option<Bytes>,
) -> mlua::Result<MultiValue> {
    let (mut reading, timeout, chunk) = match Reading::take(&s) {
        Ok(x) => x,
        Err(e) => return nil_err(&lua, e),
    };
    let gen = reading.gen;
    let max = chunk.saturating_mul(MAX_LINE_BUFFERS);
    let Some((rdr, b)) = reading.parts() else {
        return nil_err(&lua, "closed");
    };
    let r = unless_closed(&s, async move {
        match want {
            Want::Line => read::line(rdr, b, chunk, max, timeout).await,
            Want::All => read::all(rdr, b, chunk, timeout).await,
            Want::Bytes(n) => read::exact(rdr, b, n, chunk, timeout).await,
            Want::Any(n) => read::any(rdr, b, n, chunk, timeout).await,
        }
    })
    .await;
    let Some((rd, buf)) = reading.done() else {
        return nil_err(&lua, "closed");
    };
    finish_read(&lua, &s, rd, buf, gen, r.map(Some), prefix)
}

/// Runs a read unless another light thread closes the socket meanwhile (then "closed").
async fn unless_closed<T>(
    s: &Shared,
    op: impl std::future::Future<Output = Result<T, read::Failed>>,
) -> Result<T, read::Failed> {
    let cancel = s.borrow().cancel.clone();
    let closed = cancel.notified();
    tokio::select! {
        r = op => r,
        _ = closed => Err((ReadErr::Closed, Bytes::new())),
    }
}

fn finish_read(
    lua: &Lua,
    s: &Shared,
    rd: ReadHalf<Stream>,
    buf: BytesMut,
    gen: u64,
    r: Result<Option<Bytes>, read::Failed>,
    prefix: Option<Bytes>,
) -> mlua::Result<MultiValue> {
    match r {
        Ok(data) => {
            give_back_reader(s, rd, buf, gen, false);
            match data {
                None => Ok(one(Value::Nil)),
                Some(d) => {
                    let v = match prefix {
                        Some(p) => {
                            let mut v = p.to_vec();
                            v.extend_from_slice(&d);
                            lua.create_string(&v)?
                        }
                        None => lua.create_string(&d)?,
                    };
                    Ok(one(Value::String(v)))
                }
            }
        }
        Err((e, partial)) => {
            let fatal = !e.keeps_socket();
            give_back_reader(s, rd, buf, gen, fatal);
            let conf = s.borrow().conf.clone();
            match &e {
                ReadErr::Timeout => log_error(lua, &conf, "lua tcp socket read timed out"),
                ReadErr::Io(io) => log_error(
                    lua,
                    &conf,
                    &format!("recv() failed ({})", stream::errno_text(io)),
                ),
                _ => {}
            }
            nil_err_partial(lua, &e.text(), &partial)
        }
    }
}

fn receive_args(args: &MultiValue) -> mlua::Result<(Want, Option<Bytes>)> {
    let mut it = args.iter();
    let want = match it.next() {
        None | Some(Value::Nil) => Want::Line,
        Some(Value::Integer(n)) if *n >= 0 => Want::Bytes(*n as usize),
        Some(Value::Number(n)) if *n >= 0.0 => Want::Bytes(*n as usize),
        Some(Value::String(p)) => match &*p.as_bytes() {
            b"*l" | b"*L" => Want::Line,
            b"*a" => Want::All,
            other => {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #1 to 'receive' (bad pattern argument: {})",
                    String::from_utf8_lossy(other)
                )))
            }
        },
        Some(_) => {
            return Err(mlua::Error::runtime(
                "bad argument #1 to 'receive' (bad pattern argument)",
            ))
        }
    };
    let prefix = match it.next() {
        Some(Value::String(p)) => Some(Bytes::copy_from_slice(&p.as_bytes())),
        _ => None,
    };
    Ok((want, prefix))
}

async fn send(lua: Lua, s: Shared, data: Value) -> mlua::Result<MultiValue> {
    let mut out = Vec::new();
    crate::lua::api::output::render(&mut out, &data, 0)
        .map_err(|e| mlua::Error::runtime(e.to_string().replace("'say'", "'send'")))?;
    let (wr, gen, timeout) = {
        let mut st = s.borrow_mut();
        if !st.connected {
            return nil_err(&lua, "closed");
        }
        let Some(wr) = st.wr.take() else {
            return nil_err(&lua, "socket busy writing");
        };
        (wr, st.gen, st.timeout(1))
    };
    if out.is_empty() {
        s.borrow_mut().wr = Some(wr);
        return Ok(one(Value::Integer(0)));
    }
    let mut writing = Writing {
        s: s.clone(),
        gen,
        wr: Some(wr),
    };
    let Some(wr) = writing.wr.as_mut() else {
        return nil_err(&lua, "closed");
    };
    let cancel = s.borrow().cancel.clone();
    let closed = cancel.notified();
    // The send timeout is re-armed whenever the peer takes some bytes, as nginx's write timer.
    let write = async {
        let mut off = 0;
        while off < out.len() {
            match tokio::time::timeout(timeout, wr.write(&out[off..])).await {
                Err(_) => return Err(ReadErr::Timeout),
                Ok(Ok(0)) => return Err(ReadErr::Io(std::io::ErrorKind::WriteZero.into())),
                Ok(Ok(n)) => off += n,
                Ok(Err(e)) => return Err(ReadErr::Io(e)),
            }
        }
        match tokio::time::timeout(timeout, wr.flush()).await {
            Err(_) => Err(ReadErr::Timeout),
            Ok(r) => r.map_err(ReadErr::Io),
        }
    };
    let err = tokio::select! {
        r = write => r.err(),
        _ = closed => Some(ReadErr::Closed),
    };
    let wr = writing.wr.take();
    let conf = {
        let mut st = s.borrow_mut();
        if st.gen == gen {
            if matches!(err, None | Some(ReadErr::Timeout)) {
                st.wr = wr;
            } else {
                st.close();
            }
        }
        st.conf.clone()
    };
    match err {
        None => Ok(one(Value::Integer(out.len() as i64))),
        Some(e) => {
            match &e {
                ReadErr::Timeout => log_error(&lua, &conf, "lua tcp socket write timed out"),
                ReadErr::Io(io) => log_error(
                    &lua,
                    &conf,
                    &format!("send() failed ({})", stream::errno_text(io)),
                ),
                _ => {}
            }
            nil_err(&lua, &e.text())
        }
    }
}

/// A write half out of its socket for one send; put back if the send is abandoned (its light
/// thread killed), as nginx's cleanup of a pending write leaves the connection usable.
struct Writing {
    s: Shared,
    gen: u64,
    wr: Option<WriteHalf<Stream>>,
}

impl Drop for Writing {
    fn drop(&mut self) {
        let Some(wr) = self.wr.take() else {
            return;
        };
        if let Ok(mut st) = self.s.try_borrow_mut() {
            if st.gen == self.gen && st.wr.is_none() {
                st.wr = Some(wr);
            }
        }
    }
}

/// Whether a plain socket has something to read already (data or EOF): such a connection
/// must not go back to a pool.
fn dubious(fd: RawFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: a non-blocking peek into a local buffer on a descriptor we own.
    let n = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr() as *mut libc::c_void,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0
}

fn setkeepalive(lua: &Lua, s: &Shared, args: MultiValue) -> mlua::Result<MultiValue> {
    let mut it = args.into_iter();
    let timeout = match it.next() {
        None | Some(Value::Nil) => None,
        Some(v) => Some(lua.unpack::<f64>(v).map_err(|_| {
            mlua::Error::runtime("bad argument #1 to 'setkeepalive' (number expected)")
        })?),
    };
    let size = match it.next() {
        None | Some(Value::Nil) => None,
        Some(v) => {
            let n = lua.unpack::<f64>(v).map_err(|_| {
                mlua::Error::runtime("bad argument #2 to 'setkeepalive' (number expected)")
            })?;
            if n <= 0.0 {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #2 to 'setkeepalive' (bad \"pool_size\" option value: {})",
                    n
                )));
            }
            Some(n as usize)
        }
    };
    let mut st = s.borrow_mut();
    if !st.connected {
        return nil_err(lua, "closed");
    }
    if !st.rbuf.is_empty() {
        return nil_err(lua, "unread data in buffer");
    }
    let stream = match st.unsplit() {
        Ok(x) => x,
        Err(e) => return nil_err(lua, e),
    };
    if !stream.is_tls() && dubious(stream.fd()) {
        st.close();
        return nil_err(lua, "connection in dubious state");
    }
    let c = sock_conf(&st.conf);
    let idle = match timeout {
        // 0 keeps the connection for as long as the peer does.
        Some(t) if t <= 0.0 => None,
        Some(t) => Some(Duration::from_millis(t as u64)),
        None if c.keepalive_timeout_ms == 0 => None,
        None => Some(Duration::from_millis(c.keepalive_timeout_ms)),
    };
    let size = size.unwrap_or(c.pool_size);
    let p = match pool::pool(&st.key, true, size, None) {
        Some(p) => p,
        None => return nil_err(lua, "no pool"),
    };
    let slot = st.slot.take().unwrap_or_else(|| pool::slot(&p));
    let reused = st.reused;
    st.close();
    drop(st);
    pool::put(&p, stream, slot, reused, idle);
    Ok(one(Value::Integer(1)))
}

async fn sslhandshake(lua: Lua, s: Shared, args: MultiValue) -> mlua::Result<MultiValue> {
    let mut it = args.into_iter();
    let reused = it.next().unwrap_or(Value::Nil);
    let server_name = match it.next() {
        Some(Value::String(n)) => Some(n.to_str()?.to_string()),
        _ => None,
    };
    let verify = matches!(it.next(), Some(Value::Boolean(true)));
    let (stream, gen, conf, host, timeout) = {
        let mut st = s.borrow_mut();
        if st.tls {
            // A connection reused from a pool is already encrypted: nothing to do.
            drop(st);
            return if matches!(reused, Value::Boolean(false)) {
                Ok(one(Value::Boolean(true)))
            } else {
                Ok(one(Value::UserData(lua.create_userdata(SslSession)?)))
            };
        }
        let stream = match st.unsplit() {
            Ok(x) => x,
            Err(e) => return nil_err(&lua, e),
        };
        (
            stream,
            st.gen,
            st.conf.clone(),
            st.host.clone(),
            st.timeout(0),
        )
    };
    let c = sock_conf(&conf);
    let tls = crate::net::ClientTls {
        verify,
        trusted: c.ssl_trusted_certificate.clone(),
        verify_depth: c.ssl_verify_depth,
        cert: None,
    };
    let cfg = match crate::net::tls::client_config(&tls) {
        Ok(c) => c,
        Err(e) => {
            s.borrow_mut().close();
            log_error(&lua, &conf, &e);
            return nil_err(&lua, &e);
        }
    };
    let verify_name = server_name.clone().unwrap_or(host);
    let r = tokio::time::timeout(
        timeout,
        stream.into_tls(cfg, server_name.as_deref(), &verify_name),
    )
    .await;
    let r = match r {
        Err(_) => Err("timeout".to_string()),
        Ok(r) => r,
    };
    let mut st = s.borrow_mut();
    match r {
        Ok(tls) if st.gen == gen => {
            st.install(tls);
            drop(st);
            if matches!(reused, Value::Boolean(false)) {
                Ok(one(Value::Boolean(true)))
            } else {
                // Sessions resume inside rustls (one config per settings); the session
                // object is only a token the caller may hand back.
                Ok(one(Value::UserData(lua.create_userdata(SslSession)?)))
            }
        }
        Ok(_) => nil_err(&lua, "closed"),
        Err(e) => {
            st.close();
            drop(st);
            let msg = if e.starts_with(|c: char| c.is_ascii_digit()) || e.contains("mismatch") {
                format!("lua ssl certificate verify error: ({})", e)
            } else {
                format!("lua tcp socket SSL handshake failed: {}", e)
            };
            log_error(&lua, &conf, &msg);
            nil_err(&lua, &e)
        }
    }
}

/// What `sslhandshake` returns for a session.
pub struct SslSession;
impl UserData for SslSession {}

fn setoption(lua: &Lua, s: &Shared, opt: String, v: Value) -> mlua::Result<MultiValue> {
    let st = s.borrow();
    if !st.connected {
        return nil_err(lua, "closed");
    }
    // SAFETY: the descriptor belongs to this connected socket and outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(st.fd) };
    let sref = socket2::SockRef::from(&fd);
    let on = match &v {
        Value::Boolean(b) => *b,
        Value::Integer(i) => *i != 0,
        Value::Number(n) => *n != 0.0,
        _ => false,
    };
    let num = match &v {
        Value::Integer(i) => *i as usize,
        Value::Number(n) => *n as usize,
        _ => 0,
    };
    let r = match opt.as_str() {
        "keepalive" => sref.set_keepalive(on),
        "reuseaddr" => sref.set_reuse_address(on),
        "tcp-nodelay" if st.tcp => sref.set_tcp_nodelay(on),
        "tcp-nodelay" => Ok(()),
        "sndbuf" => sref.set_send_buffer_size(num),
        "rcvbuf" => sref.set_recv_buffer_size(num),
        _ => return nil_err(lua, &format!("unsupported option {}", opt)),
    };
    match r {
        Ok(()) => Ok(one(Value::Boolean(true))),
        Err(e) => nil_err(lua, &stream::error_text(&e)),
    }
}

fn getoption(lua: &Lua, s: &Shared, opt: String) -> mlua::Result<MultiValue> {
    let st = s.borrow();
    if !st.connected {
        return nil_err(lua, "closed");
    }
    // SAFETY: as in setoption.
    let fd = unsafe { BorrowedFd::borrow_raw(st.fd) };
    let sref = socket2::SockRef::from(&fd);
    let r = match opt.as_str() {
        "keepalive" => sref.keepalive().map(|b| b as i64),
        "reuseaddr" => sref.reuse_address().map(|b| b as i64),
        "tcp-nodelay" if st.tcp => sref.tcp_nodelay().map(|b| b as i64),
        "tcp-nodelay" => Ok(0),
        "sndbuf" => sref.send_buffer_size().map(|n| n as i64),
        "rcvbuf" => sref.recv_buffer_size().map(|n| n as i64),
        _ => return nil_err(lua, &format!("unsupported option {}", opt)),
    };
    match r {
        Ok(n) => Ok(one(Value::Integer(n))),
        Err(e) => nil_err(lua, &stream::error_text(&e)),
    }
}

fn receiveuntil(lua: &Lua, s: &Shared, args: MultiValue) -> mlua::Result<MultiValue> {
    let mut it = args.into_iter();
    let pat = match it.next() {
        Some(Value::String(p)) => p.as_bytes().to_vec(),
        _ => {
            return Err(mlua::Error::runtime(
                "bad argument #1 to 'receiveuntil' (string expected)",
            ))
        }
    };
    if pat.is_empty() {
        return nil_err(lua, "pattern is empty");
    }
    let inclusive = match it.next() {
        Some(Value::Table(o)) => o.get::<Option<bool>>("inclusive")?.unwrap_or(false),
        _ => false,
    };
    let pat: Rc<[u8]> = pat.into();
    let state = Rc::new(RefCell::new(read::Until::default()));
    let sock = s.clone();
    let f = lua.create_async_function(move |lua, size: Option<f64>| {
        let (s, pat, state) = (sock.clone(), pat.clone(), state.clone());
        async move {
            let size = match size {
                Some(n) if n >= 1.0 => Some(n as usize),
                Some(_) => {
                    return Err(mlua::Error::runtime(
                        "bad argument #1 to iterator (bad size)",
                    ))
                }
                None => None,
            };
            let (mut reading, timeout, chunk) = match Reading::take(&s) {
                Ok(x) => x,
                Err(e) => return nil_err(&lua, e),
            };
            let gen = reading.gen;
            let max = chunk.saturating_mul(MAX_LINE_BUFFERS);
            let Some((rd, buf)) = reading.parts() else {
                return nil_err(&lua, "closed");
            };
            let mut u = std::mem::take(&mut *state.borrow_mut());
            let r = unless_closed(
                &s,
                read::until(rd, buf, &mut u, &pat, inclusive, size, chunk, max, timeout),
            )
            .await;
            *state.borrow_mut() = u;
            let Some((rd, buf)) = reading.done() else {
                return nil_err(&lua, "closed");
            };
            after_wait(finish_read(&lua, &s, rd, buf, gen, r, None))
        }
    })?;
    Ok(one(Value::Function(f)))
}

fn settimeouts(s: &Shared, vals: [Option<f64>; 3], which: &[usize]) {
    let mut st = s.borrow_mut();
    for &i in which {
        st.timeouts[i] = vals[i].filter(|t| *t > 0.0).map(|t| t as u64);
    }
}

impl UserData for TcpSock {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_async_method(
            "connect",
            |lua, this: UserDataRef<TcpSock>, args: MultiValue| {
                let s = this.0.clone();
                async move { after_wait(connect(lua, s, args).await) }
            },
        );
        m.add_async_method(
            "receive",
            |lua, this: UserDataRef<TcpSock>, args: MultiValue| {
                let s = this.0.clone();
                let parsed = receive_args(&args);
                async move {
                    let (want, prefix) = parsed?;
                    after_wait(receive(lua, s, want, prefix).await)
                }
            },
        );
        m.add_async_method(
            "receiveany",
            |lua, this: UserDataRef<TcpSock>, max: Value| {
                let s = this.0.clone();
                let max = match max {
                    Value::Integer(n) if n > 0 => Ok(n as usize),
                    Value::Number(n) if n >= 1.0 => Ok(n as usize),
                    _ => Err(mlua::Error::runtime(
                        "bad argument #2 to 'receiveany' (bad max argument)",
                    )),
                };
                async move { after_wait(receive(lua, s, Want::Any(max?), None).await) }
            },
        );
        m.add_method("receiveuntil", |lua, this, args: MultiValue| {
            receiveuntil(lua, &this.0, args)
        });
        m.add_async_method("send", |lua, this: UserDataRef<TcpSock>, data: Value| {
            let s = this.0.clone();
            async move { after_wait(send(lua, s, data).await) }
        });
        m.add_async_method(
            "sslhandshake",
            |lua, this: UserDataRef<TcpSock>, args: MultiValue| {
                let s = this.0.clone();
                async move { after_wait(sslhandshake(lua, s, args).await) }
            },
        );
        m.add_method("settimeout", |_, this, t: Option<f64>| {
            settimeouts(&this.0, [t, t, t], &[0, 1, 2]);
            Ok(())
        });
        m.add_method(
            "settimeouts",
            |_, this, (c, s, r): (Option<f64>, Option<f64>, Option<f64>)| {
                settimeouts(&this.0, [c, s, r], &[0, 1, 2]);
                Ok(())
            },
        );
        m.add_method("setkeepalive", |lua, this, args: MultiValue| {
            setkeepalive(lua, &this.0, args)
        });
        m.add_method("getreusedtimes", |lua, this, ()| {
            let st = this.0.borrow();
            if !st.connected {
                return nil_err(lua, "closed");
            }
            Ok(one(Value::Integer(st.reused as i64)))
        });
        m.add_method("close", |lua, this, ()| {
            let mut st = this.0.borrow_mut();
            if !st.connected {
                return nil_err(lua, "closed");
            }
            st.close();
            Ok(one(Value::Integer(1)))
        });
        m.add_method("setoption", |lua, this, (opt, v): (String, Value)| {
            setoption(lua, &this.0, opt, v)
        });
        m.add_method("getoption", |lua, this, opt: String| {
            getoption(lua, &this.0, opt)
        });
        m.add_meta_method("__tostring", |_, this, ()| {
            Ok(format!("tcp socket: {:p}", Rc::as_ptr(&this.0)))
        });
    }
}

fn new_tcp(lua: &Lua) -> mlua::Result<AnyUserData> {
    lua.create_userdata(TcpSock(Rc::new(RefCell::new(Sock::default()))))
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let socket = match ngx.get::<Option<Table>>("socket")? {
        Some(t) => t,
        None => {
            let t = lua.create_table()?;
            ngx.set("socket", &t)?;
            t
        }
    };
    let tcp = lua.create_function(|lua, ()| new_tcp(lua))?;
    socket.set("tcp", &tcp)?;
    socket.set("stream", &tcp)?;
    socket.set(
        "connect",
        lua.create_async_function(|lua, args: Variadic<Value>| async move {
            let ud = new_tcp(&lua)?;
            let s = ud.borrow::<TcpSock>()?.0.clone();
            let r = after_wait(connect(lua.clone(), s, MultiValue::from_iter(args)).await)?;
            match r.front() {
                Some(Value::Integer(1)) => Ok(one(Value::UserData(ud))),
                _ => Ok(r),
            }
        })?,
    )?;
    Ok(())
}
