//! The state of one request as it walks the phases. Lua API files reach it through
//! `lua::request::current`; nothing here is shared across threads.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Version};
use tokio::sync::mpsc;

use super::body::Body;
use crate::conf::model::{LocConf, Location, Server};
use crate::lua::vm::LuaVm;

/// What a worker serves with: one configuration generation and its Lua state.
pub struct Env {
    pub cfg: Arc<crate::conf::Config>,
    pub vm: Rc<LuaVm>,
    pub worker_id: usize,
    /// Declared variable names (`set $x`), for `ngx.var.x = v` checks.
    pub declared: crate::NameSet<String>,
    /// The `upstream {}` groups, shared by all workers.
    pub upstreams: Arc<crate::proxy::upstream::UpstreamSet>,
    /// Some location has `lua_check_client_abort on`: hyper must notice a client's EOF while a
    /// request runs (decided once per configuration, see `server::conn`).
    pub watch_client_abort: bool,
}

/// The nginx phase a request (or a Lua call) is in, as `ngx.get_phase()` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Init,
    InitWorker,
    Set,
    Rewrite,
    ServerRewrite,
    Access,
    Content,
    HeaderFilter,
    BodyFilter,
    Log,
    Timer,
    /// balancer_by_lua, run per try inside the content phase.
    Balancer,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Init => "init",
            Phase::InitWorker => "init_worker",
            Phase::Set => "set",
            Phase::Rewrite | Phase::ServerRewrite => "rewrite",
            Phase::Access => "access",
            Phase::Content => "content",
            Phase::HeaderFilter => "header_filter",
            Phase::BodyFilter => "body_filter",
            Phase::Log => "log",
            Phase::Timer => "timer",
            Phase::Balancer => "balancer",
        }
    }
}

/// Facts about the client connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// nginx's connection number (`*7` in the error log).
    pub id: u64,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// Requests served so far on this connection (`keepalive_requests`).
    pub requests: Cell<u64>,
    /// `send_timeout` of the location whose response is being written (ms).
    pub send_timeout_ms: Cell<u64>,
}

/// How a Lua handler asked to end its phase.
#[derive(Debug, Clone, PartialEq)]
pub enum Exit {
    /// `ngx.exit(status)`: >= 200 finalizes with that status; 0 ends only the phase.
    Status(i32),
    /// `ngx.exec(uri, args)`.
    Exec(String, Option<String>),
    /// `ngx.exec("@name")`.
    Named(String),
}

/// The request body as far as it has been read.
pub enum ReqBody {
    Unread(hyper::body::Incoming),
    Read(Bytes),
    Discarded,
}

/// The data `ngx.arg` exposes in set_by_lua (arguments) and body_filter (chunk, eof).
#[derive(Debug, Default)]
pub enum LuaArgs {
    #[default]
    None,
    Set(Vec<Bytes>),
    Body {
        chunk: Bytes,
        eof: bool,
    },
}

/// Where a request's response head goes. The client's connection takes it from here when it
/// polls the request (`engine::ResponseFuture`): no channel between the two, they share the
/// request.
pub enum HeadSlot {
    /// Nobody waits for a head: it went out already, or this is not a client's request.
    Done,
    /// The client's connection waits for the head.
    Waiting,
    /// The head is made; the connection takes it at its next poll.
    Ready(http::Response<Body>),
    /// The client left before the head went out.
    Gone,
}

/// Mutable per-request state.
pub struct ReqState {
    pub method: Method,
    /// `$uri`: the decoded, normalized path, changed by rewrites.
    pub uri: String,
    /// `$args` (no `?`).
    pub args: Option<String>,
    /// `$request_uri`: as the client sent it.
    pub request_uri: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: ReqBody,
    pub server: Arc<Server>,
    pub conf: Arc<LocConf>,
    pub location: Option<Arc<Location>>,
    /// Variables made by `set` / `ngx.var.x = v` (shared with a subrequest made with
    /// `share_all_vars`).
    pub vars: Vars,
    /// Regex captures of the last match ($1..$9).
    pub captures: Vec<Option<Bytes>>,
    pub phase: Phase,
    pub internal: bool,
    pub redirects: u32,
    pub exit: Option<Exit>,
    pub status: u16,
    pub resp_headers: HeaderMap,
    pub headers_sent: bool,
    /// Output buffered by ngx.say/print until a flush or the end of the content phase.
    pub out: BytesMut,
    pub eof_sent: bool,
    pub body_bytes_sent: u64,
    pub arg: LuaArgs,
    /// Registry key of the `ngx.ctx` table, made on first use.
    pub ctx_table: Option<mlua::RegistryKey>,
    /// The response head on its way to the client's connection (see [`HeadSlot`]).
    pub head: HeadSlot,
    pub body_tx: Option<mpsc::Sender<Bytes>>,
    /// `$upstream_*` and other late variables other rooms fill in.
    pub extra_vars: HashMap<&'static str, String>,
    pub error_page_done: bool,
    /// What the proxy learnt (`$proxy_host`, `$upstream_*`), read on demand by variables.
    pub upstream: Option<Box<crate::proxy::UpstreamInfo>>,
    /// The client side of a protocol upgrade (WebSocket), taken by the proxy on a 101.
    pub on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// `ngx.on_abort` callback (with `lua_check_client_abort on`).
    pub on_abort: Option<crate::lua::api::thread::OnAbort>,
    /// The client address realip found (`$remote_addr`); `None`: the connection's.
    pub realip: Option<SocketAddr>,
    /// Map values computed for this request (and named captures of map regexes).
    pub map_cache: RefCell<super::map::Cache>,
    /// The `max_in_flight` slot this request holds, and whether the check already ran.
    pub in_flight: Option<super::limits::InFlightGuard>,
    pub in_flight_checked: bool,
    /// What `ngx.balancer` set during a balancer_by_lua run (src/proxy/upstream).
    pub balancer: Option<Box<crate::proxy::upstream::BalancerCall>>,
}

impl ReqState {
    /// The client address as the request sees it (after realip).
    pub fn remote(&self, conn: &ConnInfo) -> SocketAddr {
        self.realip.unwrap_or(conn.remote)
    }
}

/// The variables a request sets (`set`, `ngx.var.x = v`). Usually the request's own; a
/// subrequest made with `share_all_vars` shares its parent's map, as nginx shares the variable
/// array. Made on first write: most requests set no variable.
#[derive(Default)]
pub struct Vars(Option<Rc<RefCell<crate::NameMap<String, Bytes>>>>);

impl Vars {
    pub fn get(&self, name: &str) -> Option<Bytes> {
        self.0.as_ref().and_then(|m| m.borrow().get(name).cloned())
    }
    pub fn insert(&mut self, name: String, v: Bytes) {
        self.0
            .get_or_insert_with(Default::default)
            .borrow_mut()
            .insert(name, v);
    }
    /// A copy that changes apart from this one (`copy_all_vars`).
    pub fn copy(&self) -> Vars {
        Vars(
            self.0
                .as_ref()
                .map(|m| Rc::new(RefCell::new(m.borrow().clone()))),
        )
    }
    /// The same variables (`share_all_vars`): writes through either are seen by both.
    pub fn share(&mut self) -> Vars {
        Vars(Some(self.0.get_or_insert_with(Default::default).clone()))
    }
}

/// What makes a request a subrequest (`ngx.location.capture`): its nesting depth and the sink
/// its output goes to instead of the client (see `filter::send`).
pub struct Sub {
    /// 1 for a subrequest of the main request; nginx refuses a 51st level.
    pub depth: u32,
    /// The main request's line: nginx's error log names it (with `subrequest: "/uri"`).
    pub request_line: String,
    /// The captured response body.
    pub body: RefCell<BytesMut>,
    /// The last buffer went through the body filter (`res.truncated` is false).
    pub complete: Cell<bool>,
}

/// One request.
pub struct ReqCtx {
    pub conn: Rc<ConnInfo>,
    pub env: Rc<Env>,
    /// Unix time (seconds, float) the request started: `ngx.req.start_time()`.
    pub start_time: f64,
    pub start: Instant,
    /// `$request_id`, made on first use (most requests never ask for it).
    pub id: Cell<Option<[u8; 16]>>,
    pub st: RefCell<ReqState>,
    /// `Some` for a subrequest.
    pub sub: Option<Box<Sub>>,
}

thread_local! {
    /// Cleared header maps of finished requests. A response's map goes to hyper, which parses
    /// the next request of the connection into it; taking the next response's map from here
    /// and putting the request's back when it ends makes the maps go round without allocating.
    static SPARE_MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// At most this many spare maps per worker, each of at most this capacity (a request with
/// very many headers gives its memory back instead of keeping it in the pool).
const SPARE_MAPS_MAX: usize = 256;
const SPARE_MAP_CAPACITY_MAX: usize = 64;

fn spare_map() -> HeaderMap {
    super::spare::take(&SPARE_MAPS)
}

impl Drop for ReqState {
    fn drop(&mut self) {
        // Output never taken (a proxied body goes out as the upstream's chunks): its room
        // serves the next request.
        super::body::recycle_out(std::mem::take(&mut self.out));
        let mut h = std::mem::take(&mut self.headers);
        if h.capacity() == 0 || h.capacity() > SPARE_MAP_CAPACITY_MAX {
            return;
        }
        h.clear();
        super::spare::give(&SPARE_MAPS, h, SPARE_MAPS_MAX);
    }
}

impl ReqState {
    /// A request at its start, before the server rewrite phase.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn new(
        method: Method,
        uri: String,
        args: Option<String>,
        request_uri: String,
        version: Version,
        headers: HeaderMap,
        body: ReqBody,
        server: Arc<Server>,
    ) -> ReqState {
        ReqState {
            method,
            uri,
            args,
            request_uri,
            version,
            headers,
            body,
            conf: server.conf.clone(),
            server,
            location: None,
            vars: Default::default(),
            captures: Vec::new(),
            phase: Phase::ServerRewrite,
            internal: false,
            redirects: 0,
            exit: None,
            status: 0,
            resp_headers: spare_map(),
            headers_sent: false,
            out: super::body::spare_out(),
            eof_sent: false,
            body_bytes_sent: 0,
            arg: LuaArgs::None,
            ctx_table: None,
            head: HeadSlot::Done,
            body_tx: None,
            extra_vars: Default::default(),
            error_page_done: false,
            upstream: None,
            on_upgrade: None,
            realip: None,
            map_cache: Default::default(),
            in_flight: None,
            in_flight_checked: false,
            on_abort: None,
            balancer: None,
        }
    }
}

impl ReqCtx {
    #[inline(always)]
    pub fn new(conn: Rc<ConnInfo>, env: Rc<Env>, st: ReqState, sub: Option<Box<Sub>>) -> ReqCtx {
        ReqCtx {
            conn,
            env,
            // ngx.req.start_time() and ngx.now() share nginx's cached clock.
            start_time: crate::lua::api::time::cached_now(),
            start: crate::clock::now(),
            id: Cell::new(None),
            st: RefCell::new(st),
            sub,
        }
    }

    /// [`ReqCtx::new`] in an `Rc`, with the state made by `st` after the allocation, so that
    /// the compiler can build it in place instead of copying it in.
    #[inline(always)]
    pub fn new_rc(
        conn: Rc<ConnInfo>,
        env: Rc<Env>,
        sub: Option<Box<Sub>>,
        st: impl FnOnce() -> ReqState,
    ) -> Rc<ReqCtx> {
        Rc::new_cyclic(move |_| ReqCtx::new(conn, env, st(), sub))
    }

    /// Whether this is a subrequest (`ngx.is_subrequest`).
    pub fn is_subrequest(&self) -> bool {
        self.sub.is_some()
    }

    /// `$request_id`: 32 hex digits.
    pub fn request_id(&self) -> String {
        let id = match self.id.get() {
            Some(id) => id,
            None => {
                let id: [u8; 16] = rand::random();
                self.id.set(Some(id));
                id
            }
        };
        id.iter().map(|b| format!("{:02x}", b)).collect()
    }
}
