//! The typed configuration: what the server and the phase engine read at run time. Built once
//! per load by [`super::build`], immutable afterwards, shared as `Arc<Config>`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::parser::Parsed;
use super::template::Template;
use crate::lua::api::re::Regex;

/// A whole configuration snapshot.
#[derive(Debug)]
pub struct Config {
    pub prefix: PathBuf,
    pub conf_file: PathBuf,
    pub worker_processes: usize,
    /// (path, level name) of `error_log`; the path is already resolved against the prefix.
    pub error_log: (PathBuf, String),
    pub pid: PathBuf,
    pub worker_connections: usize,
    /// `env NAME[=value];` lines (kept for `os.getenv` parity; the process environment is shared).
    pub env: Vec<(String, Option<String>)>,
    pub http: Http,
    /// Notices to log once the error log is open (ignored directives and the like).
    pub notices: Vec<String>,
    pub parsed: Parsed,
}

/// The `http { }` block.
#[derive(Debug, Default)]
pub struct Http {
    pub servers: Vec<Arc<Server>>,
    pub lua: LuaMain,
    /// Every variable declared by `set` (or `set_by_lua`) anywhere: `ngx.var.x = v` needs one.
    pub declared_vars: Vec<String>,
    pub log_formats: HashMap<String, Arc<Template>>,
    /// `map` blocks, and the variable each defines -> its index in `maps`.
    pub maps: Vec<MapDef>,
    pub map_vars: crate::NameMap<String, usize>,
    /// Every `max_in_flight` scope, for metrics (`current()`, `rejected()`).
    pub in_flight: Vec<Arc<crate::http::limits::InFlight>>,
    /// The http-level settings, for Lua code that runs without a request (timers).
    pub conf: Option<Arc<LocConf>>,
    /// `upstream name { }` blocks, in file order (src/proxy/upstream builds the runtime side).
    pub upstreams: Vec<Arc<UpstreamConf>>,
}

/// http-level Lua settings.
#[derive(Debug, Default, Clone)]
pub struct LuaMain {
    pub package_path: Option<String>,
    pub package_cpath: Option<String>,
    pub code_cache: bool,
    pub init: Option<Arc<LuaChunk>>,
    pub init_worker: Option<Arc<LuaChunk>>,
    /// `lua_shared_dict name size`.
    pub shared_dicts: Vec<(String, usize)>,
    /// Every chunk of the configuration, by id, so a VM can compile them all up front.
    pub chunks: Vec<Arc<LuaChunk>>,
    // --- timers (src/lua/api/timer.rs)
    /// `lua_max_pending_timers` (1024).
    pub max_pending_timers: usize,
    /// `lua_max_running_timers` (256).
    pub max_running_timers: usize,
}

/// Where a Lua handler's code comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum LuaSource {
    Inline(String),
    File(PathBuf),
}

/// One `*_by_lua_block` / `*_by_lua_file`: compiled once per VM (cached by `id`).
#[derive(Debug, Clone)]
pub struct LuaChunk {
    pub id: usize,
    pub source: LuaSource,
    /// Chunk name for tracebacks: `=access_by_lua(nginx.conf:12)`.
    pub name: String,
    /// The directive name without `_block`/`_file`, e.g. `access_by_lua`.
    pub directive: String,
    /// `lua_code_cache off`: re-read `_file` sources on every run.
    pub reload: bool,
}

/// One `listen`.
#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub addr: SocketAddr,
    pub default_server: bool,
    pub backlog: i32,
}

/// One `server_name` entry.
#[derive(Debug)]
pub enum ServerName {
    Exact(String),
    /// `*.example.com` stored as (`.example.com`, false); `.example.com` also matches the
    /// bare name (true).
    Suffix(String, bool),
    /// `www.example.*` stored as `www.example.`.
    Prefix(String),
    Regex(Regex),
}

/// A `server { }` block.
#[derive(Debug)]
pub struct Server {
    pub listens: Vec<Listen>,
    pub names: Vec<ServerName>,
    /// The first name, for `$server_name`.
    pub primary_name: String,
    /// Rewrite-module directives at server level, run in the server rewrite phase.
    pub rewrites: Vec<RewriteOp>,
    /// Settings at server level (used when no location matches).
    pub conf: Arc<LocConf>,
    pub locations: Vec<Arc<Location>>,
    pub named: HashMap<String, Arc<Location>>,
}

/// How a location matches.
#[derive(Debug)]
pub enum LocMatch {
    Exact(String),
    Prefix(String),
    /// `^~ /prefix`: a longest-prefix hit stops the regex search.
    PrefixNoRegex(String),
    Regex(Regex),
    Named(String),
}

/// A `location { }` block.
#[derive(Debug)]
pub struct Location {
    pub matcher: LocMatch,
    /// As written, for logs.
    pub pattern: String,
    pub rewrites: Vec<RewriteOp>,
    pub conf: Arc<LocConf>,
    pub children: Vec<Arc<Location>>,
}

/// What produces the response body in a location.
#[derive(Debug, Clone, Default)]
pub enum Content {
    /// Static files under `root` (nginx's default handler).
    #[default]
    Static,
    Lua(Arc<LuaChunk>),
    /// `proxy_pass` (src/proxy).
    Proxy(Arc<crate::proxy::conf::ProxyPass>),
}

/// `add_header name value [always]`.
#[derive(Debug, Clone)]
pub struct AddHeader {
    pub name: String,
    pub value: Template,
    pub always: bool,
}

/// headers-more: `more_set_headers [-s statuses] [-t types] 'Name: value'...`.
#[derive(Debug, Clone)]
pub struct MoreHeaders {
    /// (name, value); value `None` clears the header.
    pub headers: Vec<(String, Option<Template>)>,
    pub statuses: Vec<u16>,
    pub types: Vec<String>,
}

/// `error_page codes [=[code]] uri`.
#[derive(Debug, Clone)]
pub struct ErrorPage {
    pub codes: Vec<u16>,
    /// `None`: keep the original status; `Some(None)`: `=` alone (the target's status);
    /// `Some(Some(c))`: `=c`.
    pub override_status: Option<Option<u16>>,
    pub uri: Template,
}

/// `access_log`.
#[derive(Debug, Clone)]
pub struct AccessLog {
    pub path: PathBuf,
    pub format: Arc<Template>,
}

/// Settings that nest http -> server -> location (-> if), merged at build time so that every
/// location holds its complete effective configuration.
#[derive(Debug, Clone)]
pub struct LocConf {
    pub root: String,
    pub index: Vec<String>,
    /// Kept as a ready header value: it goes on most responses.
    pub default_type: http::HeaderValue,
    pub types: Arc<HashMap<String, String>>,
    pub add_headers: Vec<AddHeader>,
    pub more_set_headers: Vec<MoreHeaders>,
    pub more_set_input_headers: Vec<MoreHeaders>,
    pub error_pages: Vec<ErrorPage>,
    pub internal: bool,
    pub content: Content,
    pub client_max_body_size: u64,
    pub client_body_timeout_ms: u64,
    /// `send_timeout`: how long a write to the client may make no progress.
    pub send_timeout_ms: u64,
    pub keepalive_timeout_ms: u64,
    pub keepalive_requests: u64,
    /// Empty with `access_log off`.
    pub access_logs: Vec<AccessLog>,
    pub rewrite_by_lua: Option<Arc<LuaChunk>>,
    pub access_by_lua: Option<Arc<LuaChunk>>,
    pub header_filter_by_lua: Option<Arc<LuaChunk>>,
    pub body_filter_by_lua: Option<Arc<LuaChunk>>,
    pub log_by_lua: Option<Arc<LuaChunk>>,
    pub server_tokens: bool,
    /// `proxy_*` settings (src/proxy/conf.rs).
    pub proxy: Arc<crate::proxy::conf::ProxyConf>,
    /// realip module (run at request start with the server's settings, again before access
    /// with the location's if it did not apply yet).
    pub realip: RealIpConf,
    /// `allow` / `deny`, first match wins.
    pub access_rules: Arc<Vec<AccessRule>>,
    /// `max_in_flight N`: the scope's shared counter (None: unlimited).
    pub max_in_flight: Option<Arc<crate::http::limits::InFlight>>,
    // --- net (owner: sock) ---
    /// `resolver` (with this level's `resolver_timeout` applied); None: the system resolver.
    pub resolver: Option<Arc<crate::net::Resolver>>,
    pub resolver_timeout_ms: u64,
    /// `lua_socket_*` and `lua_ssl_*`.
    pub lua_socket: LuaSocketConf,
    // --- timers, light threads (src/lua/api/timer.rs, thread.rs)
    /// `lua_check_client_abort`: notice the client closing the connection in Lua handlers.
    pub check_client_abort: bool,
}

/// lua-nginx-module's cosocket settings (`lua_socket_*`, `lua_ssl_*`), with its defaults.
#[derive(Debug, Clone)]
pub struct LuaSocketConf {
    pub connect_timeout_ms: u64,
    pub send_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub buffer_size: usize,
    pub pool_size: usize,
    pub keepalive_timeout_ms: u64,
    pub log_errors: bool,
    pub ssl_trusted_certificate: Option<PathBuf>,
    pub ssl_verify_depth: u32,
}

impl Default for LuaSocketConf {
    fn default() -> Self {
        LuaSocketConf {
            connect_timeout_ms: 60_000,
            send_timeout_ms: 60_000,
            read_timeout_ms: 60_000,
            buffer_size: 4096,
            pool_size: 30,
            keepalive_timeout_ms: 60_000,
            log_errors: true,
            ssl_trusted_certificate: None,
            ssl_verify_depth: 1,
        }
    }
}

/// One rewrite-module step, run in order in the (server or location) rewrite phase.
#[derive(Debug, Clone)]
pub enum RewriteOp {
    Set(String, Template),
    SetByLua {
        var: String,
        chunk: Arc<LuaChunk>,
        args: Vec<Template>,
    },
    Rewrite {
        regex: Arc<Regex>,
        replacement: Template,
        flag: RewriteFlag,
        file_line: String,
    },
    Return {
        code: u16,
        body: Option<Template>,
    },
    Break,
    If {
        cond: Arc<Cond>,
        ops: Vec<RewriteOp>,
        conf: Arc<LocConf>,
    },
}

/// `rewrite` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteFlag {
    None,
    Last,
    Break,
    Redirect,
    Permanent,
}

/// An `if (...)` condition.
#[derive(Debug)]
pub enum Cond {
    /// `($var)`: true unless empty or "0".
    Truthy(Template),
    Eq(Template, Template, bool),
    Regex(Template, Regex, bool),
    FileExists(Template, FileTest),
}

/// `-f`, `-d`, `-e`, `-x` and their negations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileTest {
    File(bool),
    Dir(bool),
    Exists(bool),
    Exec(bool),
}

// ---------------------------------------------------------------- map, realip, access, limits
// (ngx_http_map_module, ngx_http_realip_module, ngx_http_access_module, `max_in_flight`)

/// An address or network (`192.168.0.0/16`, `2001:db8::/32`, `10.0.0.1`) as nginx's
/// `ngx_cidr_t`; the address is stored masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

/// What a `set_real_ip_from` / `allow` / `deny` entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrMatch {
    Net(Cidr),
    /// `unix:`: connections over UNIX-domain sockets (tidegate listens on TCP only).
    Unix,
    /// `all` (allow/deny only).
    All,
}

/// Which request header `real_ip_header` names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RealIpHeader {
    #[default]
    XRealIp,
    XForwardedFor,
    /// Any other header, lower-case.
    Other(String),
}

/// The realip settings of a level (`set_real_ip_from`, `real_ip_header`, `real_ip_recursive`).
#[derive(Debug, Clone, Default)]
pub struct RealIpConf {
    /// Empty: realip is off at this level.
    pub from: Arc<Vec<AddrMatch>>,
    pub header: RealIpHeader,
    pub recursive: bool,
}

/// One `allow` / `deny` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessRule {
    pub allow: bool,
    pub what: AddrMatch,
}

/// `map $source $var { ... }`: evaluated lazily per request by `http::map`.
#[derive(Debug)]
pub struct MapDef {
    /// The variable it defines (lower-case, without `$`).
    pub var: String,
    pub source: Template,
    pub default: Option<Template>,
    pub hostnames: bool,
    pub volatile: bool,
    /// Exact keys, lower-case (nginx matches map keys case-insensitively).
    pub exact: HashMap<Vec<u8>, Template>,
    /// `hostnames` `*.example.com` (stored `.example.com`, false) and `.example.com` (true:
    /// also the bare name): the longest match wins.
    pub wild_head: Vec<(String, bool, Template)>,
    /// `hostnames` `mail.*` (stored `mail.`): the longest match wins.
    pub wild_tail: Vec<(String, Template)>,
    pub regexes: Vec<MapRegex>,
}

/// A `~regex value` / `~*regex value` line of a map.
#[derive(Debug)]
pub struct MapRegex {
    pub regex: Regex,
    /// Named groups, to resolve `$name` in the value (and for `$name` elsewhere afterwards).
    pub names: Vec<(String, usize)>,
    pub value: Template,
}

// ---- upstream blocks (owner: src/proxy/upstream) ----

/// An `upstream name { ... }` block.
#[derive(Debug, Clone)]
pub struct UpstreamConf {
    pub name: String,
    pub servers: Vec<UpstreamServer>,
    pub method: Balance,
    pub keepalive: Option<UpstreamKeepalive>,
    /// `zone name [size]`: accepted; peer state is always shared between workers here.
    pub zone: Option<(String, Option<u64>)>,
    pub health_check: Option<HealthCheck>,
    pub circuit_breaker: Option<CircuitBreaker>,
    /// `balancer_by_lua_block` / `balancer_by_lua_file`.
    pub balancer: Option<Arc<LuaChunk>>,
    /// `file:line` of the block, for messages.
    pub file_line: String,
}

impl UpstreamConf {
    /// Same servers, method and settings (the balancer chunk's source, not its id), so the
    /// running state (counters, health, breakers) can carry over a reload.
    pub fn same_shape(&self, o: &UpstreamConf) -> bool {
        self.name == o.name
            && self.servers == o.servers
            && self.method == o.method
            && self.keepalive == o.keepalive
            && self.health_check == o.health_check
            && self.circuit_breaker == o.circuit_breaker
            && self.balancer.as_ref().map(|c| &c.source) == o.balancer.as_ref().map(|c| &c.source)
    }
}

/// One `server` line of an upstream: each resolved address becomes a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamServer {
    /// As written (`backend.local:8080`): `$upstream_addr` uses addresses, consistent hashing
    /// uses this text, as nginx does.
    pub text: String,
    /// The host part (for `Host`/SNI when a proxy wants it).
    pub host: String,
    pub addrs: Vec<SocketAddr>,
    pub weight: u32,
    pub max_fails: u32,
    pub fail_timeout_ms: u64,
    pub backup: bool,
    pub down: bool,
    /// 0: unlimited.
    pub max_conns: u32,
}

/// The balancing method of an upstream.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Balance {
    /// nginx's smooth weighted round robin.
    #[default]
    RoundRobin,
    LeastConn,
    IpHash,
    /// `hash $key [consistent]`.
    Hash {
        key: Template,
        consistent: bool,
    },
    /// `random [two [least_conn]]`.
    Random {
        two: bool,
    },
    /// `ewma [decay=10s]`: peak EWMA of response latency (tidegate's own).
    Ewma {
        decay_ms: u64,
    },
}

/// `keepalive`, `keepalive_timeout`, `keepalive_requests`, `keepalive_time` of an upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamKeepalive {
    pub max_idle: usize,
    pub timeout_ms: u64,
    pub requests: u64,
    pub time_ms: u64,
}

/// `health_check interval=2s timeout=1s uri=/health fails=3 passes=2 expect=200-399 [type=tcp]
/// [host=name]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub uri: String,
    pub fails: u32,
    pub passes: u32,
    /// Inclusive status ranges that count as healthy.
    pub expect: Vec<(u16, u16)>,
    /// Only connect (no HTTP request).
    pub tcp: bool,
    /// `Host` header of the check request (default: the server's host).
    pub host: Option<String>,
}

/// `circuit_breaker failures=5 window=10s open=5s half_open=1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitBreaker {
    pub failures: u32,
    pub window_ms: u64,
    pub open_ms: u64,
    pub half_open: u32,
}
