//! Build the typed [`Config`] from a checked tree. Handlers only turn arguments into values:
//! context, arity and duplicates were already checked generically by `table::check`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::directives;
use super::model::*;
use super::parser::{self, Parsed};
use super::table;
use super::template::Template;
use super::values::{parse_size, parse_time_ms};
use super::{ConfError, Directive};
use crate::lua::api::re::Regex;

pub use super::model::Config;

mod edge;

/// How to load a configuration: nginx's `-p`, `-c` and `-g`.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    pub prefix: PathBuf,
    /// The conf file, relative to the prefix unless absolute.
    pub conf: PathBuf,
    /// `-g 'directives;'`.
    pub globals: Option<String>,
}

impl LoadOptions {
    /// The conf file's full path.
    pub fn conf_path(&self) -> PathBuf {
        if self.conf.is_absolute() {
            self.conf.clone()
        } else {
            self.prefix.join(&self.conf)
        }
    }
}

/// Parse, check and build a configuration.
pub fn load(opts: &LoadOptions) -> Result<Config, ConfError> {
    let conf_path = opts.conf_path();
    let mut parsed = parser::parse_file(&conf_path, &opts.prefix)?;
    if let Some(g) = &opts.globals {
        let conf_dir = conf_path.parent().unwrap_or(Path::new("."));
        let mut extra = parser::parse_str(g, "command line", conf_dir)?;
        extra.append(&mut parsed.tree);
        parsed.tree = extra;
    }
    table::check(&parsed.tree, directives::ALL)?;
    VAR_USES.with(|v| v.borrow_mut().clear());
    let mut b = Builder {
        prefix: opts.prefix.clone(),
        conf_dir: conf_path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        chunks: Vec::new(),
        declared: Vec::new(),
        notices: Vec::new(),
        code_cache: true,
        formats: HashMap::new(),
        upstream_names: Vec::new(),
    };
    b.build(opts, conf_path, parsed)
}

/// Find a row by name in all tables.
fn command(name: &str) -> Option<&'static table::Command> {
    directives::ALL
        .iter()
        .flat_map(|t| t.iter())
        .find(|c| c.name == name)
}

struct Builder {
    prefix: PathBuf,
    /// The directory of the main conf file: certificate paths are relative to it, as in nginx.
    conf_dir: PathBuf,
    chunks: Vec<Arc<LuaChunk>>,
    declared: Vec<String>,
    notices: Vec<String>,
    code_cache: bool,
    formats: HashMap<String, Arc<Template>>,
    /// Names of the http block's `upstream {}` blocks: `proxy_pass http://name` uses them.
    upstream_names: Vec<String>,
}

fn arg(d: &Directive, i: usize) -> &str {
    d.args.get(i).map(String::as_str).unwrap_or("")
}

thread_local! {
    /// Variables used by the templates of the configuration being built, with where they were
    /// used: checked once every `set` is known, as nginx rejects unknown variables at load.
    static VAR_USES: std::cell::RefCell<Vec<(String, String, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub(crate) fn template(d: &Directive, s: &str) -> Result<Template, ConfError> {
    let t = Template::parse(s).map_err(|e| ConfError::directive(d, e))?;
    VAR_USES.with(|v| {
        let mut v = v.borrow_mut();
        for p in &t.parts {
            if let super::template::Part::Var(name) = p {
                v.push((name.clone(), d.file.to_string(), d.line));
            }
        }
    });
    Ok(t)
}

/// nginx's `unknown "x" variable` for a variable that is neither built in nor declared.
fn check_vars(declared: &[String]) -> Result<(), ConfError> {
    let uses = VAR_USES.with(|v| std::mem::take(&mut *v.borrow_mut()));
    for (name, file, line) in uses {
        if !crate::http::variables::is_known(&name) && !declared.contains(&name) {
            return Err(ConfError::at(
                format!("unknown \"{}\" variable", name),
                &file,
                line,
            ));
        }
    }
    Ok(())
}

fn time_ms(d: &Directive, s: &str) -> Result<u64, ConfError> {
    parse_time_ms(s)
        .ok_or_else(|| ConfError::directive(d, format!("\"{}\" directive invalid value", d.name)))
}

fn size(d: &Directive, s: &str) -> Result<u64, ConfError> {
    parse_size(s)
        .ok_or_else(|| ConfError::directive(d, format!("\"{}\" directive invalid value", d.name)))
}

fn default_types() -> HashMap<String, String> {
    let mut m = HashMap::new();
    for (t, exts) in [
        ("text/html", "html htm shtml"),
        ("text/css", "css"),
        ("text/plain", "txt"),
        ("text/xml", "xml"),
        ("application/javascript", "js"),
        ("application/json", "json"),
        ("image/gif", "gif"),
        ("image/jpeg", "jpeg jpg"),
        ("image/png", "png"),
        ("image/svg+xml", "svg svgz"),
        ("image/x-icon", "ico"),
    ] {
        for e in exts.split(' ') {
            m.insert(e.to_string(), t.to_string());
        }
    }
    m
}

impl Builder {
    fn build(
        &mut self,
        opts: &LoadOptions,
        conf_file: PathBuf,
        parsed: Parsed,
    ) -> Result<Config, ConfError> {
        let mut cfg = Config {
            prefix: self.prefix.clone(),
            conf_file,
            worker_processes: 1,
            error_log: (self.prefix.join("logs/error.log"), "error".to_string()),
            pid: self.prefix.join("logs/nginx.pid"),
            worker_connections: 512,
            env: Vec::new(),
            http: Http::default(),
            notices: Vec::new(),
            parsed: Parsed::default(),
        };
        let _ = opts;
        for d in &parsed.tree {
            if self.ignored(d) {
                continue;
            }
            match d.name.as_str() {
                "worker_processes" => {
                    cfg.worker_processes = match arg(d, 0) {
                        "auto" => std::thread::available_parallelism()
                            .map(|n| n.get())
                            .unwrap_or(1),
                        v => v
                            .parse()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| ConfError::invalid_value(d, v))?,
                    }
                }
                "error_log" => cfg.error_log = self.error_log(d)?,
                "pid" => cfg.pid = self.path(arg(d, 0)),
                "env" => {
                    let a = arg(d, 0);
                    match a.split_once('=') {
                        Some((k, v)) => cfg.env.push((k.to_string(), Some(v.to_string()))),
                        None => cfg.env.push((a.to_string(), None)),
                    }
                }
                "events" => {
                    for e in d.block.iter().flatten() {
                        if self.ignored(e) {
                            continue;
                        }
                        if e.name == "worker_connections" {
                            cfg.worker_connections = arg(e, 0)
                                .parse()
                                .ok()
                                .filter(|n| *n > 0)
                                .ok_or_else(|| ConfError::invalid_value(e, arg(e, 0)))?;
                        }
                    }
                }
                "http" => cfg.http = self.http(d.block.as_deref().unwrap_or(&[]))?,
                _ => {}
            }
        }
        cfg.http.lua.chunks = std::mem::take(&mut self.chunks);
        check_vars(&self.declared)?;
        cfg.http.declared_vars = std::mem::take(&mut self.declared);
        cfg.notices = std::mem::take(&mut self.notices);
        cfg.parsed = parsed;
        Ok(cfg)
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.prefix.join(p)
        }
    }

    /// An ignored directive: record a notice and skip it.
    fn ignored(&mut self, d: &Directive) -> bool {
        if command(&d.name).is_some_and(|c| c.ignored) {
            self.notices.push(format!(
                "the \"{}\" directive is ignored by tidegate in {}",
                d.name,
                d.location()
            ));
            return true;
        }
        false
    }

    fn error_log(&self, d: &Directive) -> Result<(PathBuf, String), ConfError> {
        let level = d
            .args
            .get(1)
            .cloned()
            .unwrap_or_else(|| "error".to_string());
        const LEVELS: &[&str] = &[
            "debug", "info", "notice", "warn", "error", "crit", "alert", "emerg",
        ];
        if !LEVELS.contains(&level.as_str()) {
            return Err(ConfError::directive(
                d,
                format!("invalid log level \"{}\"", level),
            ));
        }
        let p = arg(d, 0);
        let path = if p == "stderr" || p.starts_with("/dev/") {
            PathBuf::from(p)
        } else {
            self.path(p)
        };
        Ok((path, level))
    }

    fn lua_chunk(&mut self, d: &Directive, value: &str) -> Result<Arc<LuaChunk>, ConfError> {
        let is_file = d.name.ends_with("_by_lua_file");
        let directive = d
            .name
            .trim_end_matches("_block")
            .trim_end_matches("_file")
            .to_string();
        let base = d.file.rsplit('/').next().unwrap_or(&d.file).to_string();
        let name = format!("={}({}:{})", directive, base, d.line);
        let source = if is_file {
            LuaSource::File(self.path(value))
        } else {
            // Syntax errors surface at load time (`tidegate -t`), as OpenResty reports them.
            let lua = mlua::Lua::new();
            if let Err(e) = lua.load(value).set_name(&name).into_function() {
                let msg = match e {
                    mlua::Error::SyntaxError { message, .. } => message,
                    other => other.to_string(),
                };
                return Err(ConfError::directive(
                    d,
                    format!("failed to load inlined Lua code: {}", msg),
                ));
            }
            LuaSource::Inline(value.to_string())
        };
        let chunk = Arc::new(LuaChunk {
            id: self.chunks.len(),
            source,
            name,
            directive,
            reload: is_file && !self.code_cache,
        });
        self.chunks.push(chunk.clone());
        Ok(chunk)
    }

    fn http(&mut self, list: &[Directive]) -> Result<Http, ConfError> {
        let mut http = Http {
            lua: LuaMain {
                code_cache: true,
                max_pending_timers: 1024,
                max_running_timers: 256,
                ..Default::default()
            },
            ..Default::default()
        };
        // lua_code_cache must be known before chunks are made.
        for d in list {
            if d.name == "lua_code_cache" {
                self.code_cache = arg(d, 0) == "on";
                http.lua.code_cache = self.code_cache;
            }
        }
        let mut conf = LocConf {
            root: "html".to_string(),
            index: vec!["index.html".to_string()],
            default_type: http::HeaderValue::from_static("text/plain"),
            types: Arc::new(default_types()),
            add_headers: Vec::new(),
            more_set_headers: Vec::new(),
            more_set_input_headers: Vec::new(),
            error_pages: Vec::new(),
            internal: false,
            content: Content::Static,
            client_max_body_size: 1024 * 1024,
            client_body_timeout_ms: 60_000,
            send_timeout_ms: 60_000,
            keepalive_timeout_ms: 75_000,
            keepalive_requests: 1000,
            access_logs: vec![AccessLog {
                path: self.path("logs/access.log"),
                format: Arc::new(combined()),
            }],
            rewrite_by_lua: None,
            access_by_lua: None,
            header_filter_by_lua: None,
            body_filter_by_lua: None,
            log_by_lua: None,
            server_tokens: true,
            proxy: Default::default(),
            realip: RealIpConf::default(),
            access_rules: Arc::new(Vec::new()),
            max_in_flight: None,
            resolver: None,
            resolver_timeout_ms: crate::net::resolver::DEFAULT_TIMEOUT_MS,
            lua_socket: LuaSocketConf::default(),
            check_client_abort: false,
        };
        Self::level_start(&mut conf, list);
        self.upstream_names = list
            .iter()
            .filter(|d| d.name == "upstream")
            .map(|d| arg(d, 0).to_string())
            .collect();
        // log_format first: access_log may name a format defined later in the block.
        for d in list {
            if d.name == "log_format" {
                let fmt = d.args[1..].join("");
                http.log_formats
                    .insert(arg(d, 0).to_string(), Arc::new(template(d, &fmt)?));
            }
        }
        http.log_formats
            .entry("combined".to_string())
            .or_insert_with(|| Arc::new(combined()));
        self.formats = http.log_formats.clone();
        for d in list {
            if self.ignored(d) {
                continue;
            }
            match d.name.as_str() {
                "server" | "log_format" | "lua_code_cache" => {}
                "map" => self.map(d, &mut http)?,
                "upstream" => {
                    let u = self.upstream(d)?;
                    if http.upstreams.iter().any(|o| o.name == u.name) {
                        return Err(ConfError::directive(
                            d,
                            format!("duplicate upstream \"{}\"", u.name),
                        ));
                    }
                    http.upstreams.push(Arc::new(u));
                }
                "lua_package_path" => http.lua.package_path = Some(arg(d, 0).to_string()),
                "lua_package_cpath" => http.lua.package_cpath = Some(arg(d, 0).to_string()),
                "lua_shared_dict" => {
                    let sz = size(d, arg(d, 1))? as usize;
                    if sz < crate::shdict::MIN_ZONE_SIZE {
                        return Err(ConfError::directive(
                            d,
                            format!("zone \"{}\" is too small", arg(d, 0)),
                        ));
                    }
                    if http.lua.shared_dicts.iter().any(|(n, _)| n == arg(d, 0)) {
                        return Err(ConfError::directive(
                            d,
                            format!("lua_shared_dict \"{}\" is already defined", arg(d, 0)),
                        ));
                    }
                    http.lua.shared_dicts.push((arg(d, 0).to_string(), sz));
                }
                "init_by_lua_block" | "init_by_lua_file" => {
                    http.lua.init = Some(self.lua_chunk(d, arg(d, 0))?)
                }
                "init_worker_by_lua_block" | "init_worker_by_lua_file" => {
                    http.lua.init_worker = Some(self.lua_chunk(d, arg(d, 0))?)
                }
                // timers (src/lua/api/timer.rs)
                "lua_max_pending_timers" => http.lua.max_pending_timers = count(d)?,
                "lua_max_running_timers" => http.lua.max_running_timers = count(d)?,
                _ => self.setting(&mut conf, d)?,
            }
        }
        let conf = Arc::new(conf);
        http.conf = Some(conf.clone());
        for d in list {
            if d.name == "server" {
                let s = self.server(&conf, d.block.as_deref().unwrap_or(&[]))?;
                http.servers.push(Arc::new(s));
            }
        }
        http.in_flight = edge::collect_in_flight(&http);
        Ok(http)
    }
}

/// nginx's predefined `combined` format.
fn combined() -> Template {
    Template::parse(
        "$remote_addr - $remote_user [$time_local] \"$request\" $status $body_bytes_sent \"$http_referer\" \"$http_user_agent\"",
    )
    .unwrap_or_default()
}

/// Directives of the rewrite module (and set_by_lua), which run in order in the rewrite phase.
fn is_rewrite_op(name: &str) -> bool {
    matches!(
        name,
        "set" | "rewrite" | "return" | "break" | "if" | "set_by_lua_block" | "set_by_lua_file"
    )
}

impl Builder {
    /// Apply one inheritable setting to `conf`.
    /// Start a level: `access_log` at this level replaces the inherited list, as in nginx.
    /// nginx inherits these list-valued directives only when a level has none of its own.
    fn level_start(conf: &mut LocConf, list: &[Directive]) {
        let has = |n: &str| list.iter().any(|d| d.name == n);
        if has("access_log") {
            conf.access_logs.clear();
        }
        if has("add_header") {
            conf.add_headers.clear();
        }
        if has("error_page") {
            conf.error_pages.clear();
        }
        if list.iter().any(|d| d.name.starts_with("proxy_")) {
            crate::proxy::conf::level_start(Arc::make_mut(&mut conf.proxy), list);
        }
        edge::level_start(conf, list);
    }

    fn setting(&mut self, conf: &mut LocConf, d: &Directive) -> Result<(), ConfError> {
        match d.name.as_str() {
            "root" => conf.root = arg(d, 0).to_string(),
            "index" => conf.index = d.args.clone(),
            "default_type" => {
                conf.default_type = http::HeaderValue::from_str(arg(d, 0))
                    .map_err(|_| ConfError::invalid_value(d, arg(d, 0)))?
            }
            "types" => {
                let mut m = HashMap::new();
                for t in d.block.iter().flatten() {
                    for ext in &t.args {
                        m.insert(ext.to_ascii_lowercase(), t.name.clone());
                    }
                }
                conf.types = Arc::new(m);
            }
            "error_page" => conf.error_pages.push(self.error_page(d)?),
            "internal" => conf.internal = true,
            "keepalive_timeout" => conf.keepalive_timeout_ms = time_ms(d, arg(d, 0))?,
            "keepalive_requests" => {
                conf.keepalive_requests = arg(d, 0)
                    .parse()
                    .map_err(|_| ConfError::invalid_value(d, arg(d, 0)))?
            }
            "client_max_body_size" => conf.client_max_body_size = size(d, arg(d, 0))?,
            "client_body_timeout" => conf.client_body_timeout_ms = time_ms(d, arg(d, 0))?,
            "send_timeout" => conf.send_timeout_ms = time_ms(d, arg(d, 0))?,
            "client_header_timeout" => {
                time_ms(d, arg(d, 0))?;
            }
            "large_client_header_buffers" => {
                size(d, arg(d, 1))?;
            }
            "server_tokens" => conf.server_tokens = arg(d, 0) == "on",
            "lua_check_client_abort" => conf.check_client_abort = arg(d, 0) == "on",
            "error_log" => {
                self.error_log(d)?;
            }
            "add_header" => {
                let always = match d.args.get(2).map(String::as_str) {
                    None => false,
                    Some("always") => true,
                    Some(v) => return Err(ConfError::invalid_value(d, v)),
                };
                conf.add_headers.push(AddHeader {
                    name: arg(d, 0).to_string(),
                    value: template(d, arg(d, 1))?,
                    always,
                });
            }
            "more_set_headers" | "more_clear_headers" => {
                let m = self.more_headers(d, d.name == "more_clear_headers")?;
                conf.more_set_headers.push(m);
            }
            "more_set_input_headers" | "more_clear_input_headers" => {
                let m = self.more_headers(d, d.name == "more_clear_input_headers")?;
                conf.more_set_input_headers.push(m);
            }
            "access_log" => {
                if arg(d, 0) == "off" {
                    conf.access_logs.clear();
                } else {
                    let fname = d.args.get(1).map(String::as_str).unwrap_or("combined");
                    let format = self.formats.get(fname).cloned().ok_or_else(|| {
                        ConfError::directive(d, format!("unknown log format \"{}\"", fname))
                    })?;
                    conf.access_logs.push(AccessLog {
                        path: self.path(arg(d, 0)),
                        format,
                    });
                }
            }
            "lua_code_cache" => {}
            "rewrite_by_lua_block" | "rewrite_by_lua_file" => {
                conf.rewrite_by_lua = Some(self.lua_chunk(d, arg(d, 0))?)
            }
            "access_by_lua_block" | "access_by_lua_file" => {
                conf.access_by_lua = Some(self.lua_chunk(d, arg(d, 0))?)
            }
            "content_by_lua_block" | "content_by_lua_file" => {
                conf.content = Content::Lua(self.lua_chunk(d, arg(d, 0))?)
            }
            "header_filter_by_lua_block" | "header_filter_by_lua_file" => {
                conf.header_filter_by_lua = Some(self.lua_chunk(d, arg(d, 0))?)
            }
            "body_filter_by_lua_block" | "body_filter_by_lua_file" => {
                conf.body_filter_by_lua = Some(self.lua_chunk(d, arg(d, 0))?)
            }
            "log_by_lua_block" | "log_by_lua_file" => {
                conf.log_by_lua = Some(self.lua_chunk(d, arg(d, 0))?)
            }
            "proxy_pass" => {
                let p = crate::proxy::conf::proxy_pass(d, &self.upstream_names, &template)?;
                conf.content = Content::Proxy(Arc::new(p));
            }
            n if n.starts_with("proxy_") || n == "client_body_buffer_size" => {
                // nginx resolves certificate paths against the conf directory.
                crate::proxy::conf::setting(
                    Arc::make_mut(&mut conf.proxy),
                    d,
                    &self.prefix.join("conf"),
                    &template,
                )?
            }
            n if n.starts_with("resolver")
                || n.starts_with("lua_socket_")
                || n.starts_with("lua_ssl_") =>
            {
                self.net_setting(conf, d)?
            }
            other => {
                if !self.edge_setting(conf, d)? {
                    return Err(ConfError::directive(
                        d,
                        format!("\"{}\" directive is not allowed here", other),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `resolver*`, `lua_socket_*`, `lua_ssl_*` (owner: sock).
    fn net_setting(&mut self, conf: &mut LocConf, d: &Directive) -> Result<(), ConfError> {
        let s = &mut conf.lua_socket;
        match d.name.as_str() {
            "resolver" => {
                let r =
                    crate::net::Resolver::parse(&d.args).map_err(|e| ConfError::directive(d, e))?;
                conf.resolver = Some(Arc::new(r.with_timeout(conf.resolver_timeout_ms)));
            }
            "resolver_timeout" => {
                conf.resolver_timeout_ms = time_ms(d, arg(d, 0))?;
                // An inherited resolver keeps its cache and takes this level's timeout.
                if let Some(r) = &conf.resolver {
                    conf.resolver = Some(Arc::new(r.with_timeout(conf.resolver_timeout_ms)));
                }
            }
            "lua_socket_connect_timeout" => s.connect_timeout_ms = time_ms(d, arg(d, 0))?,
            "lua_socket_send_timeout" => s.send_timeout_ms = time_ms(d, arg(d, 0))?,
            "lua_socket_read_timeout" => s.read_timeout_ms = time_ms(d, arg(d, 0))?,
            "lua_socket_keepalive_timeout" => s.keepalive_timeout_ms = time_ms(d, arg(d, 0))?,
            "lua_socket_buffer_size" => {
                s.buffer_size = (size(d, arg(d, 0))? as usize).max(1);
            }
            "lua_socket_pool_size" => {
                s.pool_size = arg(d, 0)
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| ConfError::invalid_value(d, arg(d, 0)))?
            }
            "lua_socket_log_errors" => s.log_errors = arg(d, 0) == "on",
            "lua_ssl_trusted_certificate" => {
                let p = self.conf_dir.join(arg(d, 0));
                if !p.exists() {
                    return Err(ConfError::directive(
                        d,
                        format!(
                            "cannot load certificate \"{}\": No such file or directory",
                            p.display()
                        ),
                    ));
                }
                s.ssl_trusted_certificate = Some(p);
            }
            "lua_ssl_verify_depth" => {
                s.ssl_verify_depth = arg(d, 0)
                    .parse()
                    .map_err(|_| ConfError::invalid_value(d, arg(d, 0)))?
            }
            other => {
                return Err(ConfError::directive(
                    d,
                    format!("\"{}\" directive is not allowed here", other),
                ))
            }
        }
        Ok(())
    }

    fn more_headers(&self, d: &Directive, clear: bool) -> Result<MoreHeaders, ConfError> {
        let mut m = MoreHeaders {
            headers: Vec::new(),
            statuses: Vec::new(),
            types: Vec::new(),
        };
        let mut i = 0;
        while i < d.args.len() {
            let a = &d.args[i];
            if a == "-s" || a == "-t" {
                let v = d.args.get(i + 1).ok_or_else(|| {
                    ConfError::directive(d, format!("{}: option {} takes an argument", d.name, a))
                })?;
                for item in v.split_whitespace() {
                    if a == "-s" {
                        m.statuses.push(
                            item.parse()
                                .map_err(|_| ConfError::invalid_value(d, item))?,
                        );
                    } else {
                        m.types.push(item.to_ascii_lowercase());
                    }
                }
                i += 2;
                continue;
            }
            if clear {
                m.headers
                    .push((a.split(':').next().unwrap_or("").trim().to_string(), None));
            } else {
                let (name, value) = a
                    .split_once(':')
                    .ok_or_else(|| ConfError::invalid_value(d, a))?;
                let value = value.trim();
                let v = if value.is_empty() {
                    None
                } else {
                    Some(template(d, value)?)
                };
                m.headers.push((name.trim().to_string(), v));
            }
            i += 1;
        }
        Ok(m)
    }

    fn error_page(&self, d: &Directive) -> Result<ErrorPage, ConfError> {
        let n = d.args.len();
        let uri = template(d, &d.args[n - 1])?;
        let mut codes = Vec::new();
        let mut over = None;
        for a in &d.args[..n - 1] {
            if let Some(rest) = a.strip_prefix('=') {
                over = Some(if rest.is_empty() {
                    None
                } else {
                    Some(rest.parse().map_err(|_| ConfError::invalid_value(d, a))?)
                });
                continue;
            }
            let c: u16 = a.parse().map_err(|_| ConfError::invalid_value(d, a))?;
            if !(300..=599).contains(&c) {
                return Err(ConfError::directive(
                    d,
                    format!("value \"{}\" must be between 300 and 599", a),
                ));
            }
            codes.push(c);
        }
        Ok(ErrorPage {
            codes,
            override_status: over,
            uri,
        })
    }

    fn server(
        &mut self,
        http_conf: &Arc<LocConf>,
        list: &[Directive],
    ) -> Result<Server, ConfError> {
        let mut conf = (**http_conf).clone();
        Self::level_start(&mut conf, list);
        let mut listens = Vec::new();
        let mut names = Vec::new();
        let mut primary = String::new();
        for d in list {
            if self.ignored(d) {
                continue;
            }
            match d.name.as_str() {
                "location" | "server" => {}
                "listen" => listens.push(listen(d)?),
                "server_name" => {
                    for n in &d.args {
                        if primary.is_empty() {
                            primary = n.clone();
                        }
                        names.push(server_name(d, n)?);
                    }
                }
                n if is_rewrite_op(n) => {}
                _ => self.setting(&mut conf, d)?,
            }
        }
        if listens.is_empty() {
            listens.push(Listen {
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 80),
                default_server: false,
                backlog: 511,
            });
        }
        let conf = Arc::new(conf);
        let rewrites = self.rewrite_ops(&conf, list)?;
        let mut locations = Vec::new();
        let mut named = HashMap::new();
        for d in list {
            if d.name == "location" {
                let loc = Arc::new(self.location(&conf, d)?);
                if let LocMatch::Named(n) = &loc.matcher {
                    named.insert(n.clone(), loc.clone());
                } else {
                    check_duplicate_location(&locations, &loc, d)?;
                    locations.push(loc);
                }
            }
        }
        Ok(Server {
            listens,
            names,
            primary_name: primary,
            rewrites,
            conf,
            locations,
            named,
        })
    }

    fn location(&mut self, parent: &Arc<LocConf>, d: &Directive) -> Result<Location, ConfError> {
        let (modifier, pattern) = if d.args.len() == 2 {
            (arg(d, 0), arg(d, 1))
        } else {
            ("", arg(d, 0))
        };
        let matcher = match modifier {
            "=" => LocMatch::Exact(pattern.to_string()),
            "^~" => LocMatch::PrefixNoRegex(pattern.to_string()),
            "~" | "~*" => LocMatch::Regex(Regex::new(pattern, modifier == "~*").map_err(|e| {
                ConfError::directive(
                    d,
                    format!("pcre2_compile() failed: {} in \"{}\"", e, pattern),
                )
            })?),
            "" if pattern.starts_with('@') => LocMatch::Named(pattern[1..].to_string()),
            "" if pattern.starts_with('~') && d.args.len() == 1 => {
                // `location ~/x` without a space is accepted by nginx too.
                let (ci, pat) = match pattern.strip_prefix("~*") {
                    Some(p) => (true, p),
                    None => (false, &pattern[1..]),
                };
                LocMatch::Regex(Regex::new(pat, ci).map_err(|e| ConfError::directive(d, e))?)
            }
            "" if pattern.starts_with('=') && d.args.len() == 1 => {
                LocMatch::Exact(pattern[1..].to_string())
            }
            "" => LocMatch::Prefix(pattern.to_string()),
            other => {
                return Err(ConfError::directive(
                    d,
                    format!("invalid location modifier \"{}\"", other),
                ))
            }
        };
        let list = d.block.as_deref().unwrap_or(&[]);
        let mut conf = (**parent).clone();
        conf.internal = false;
        // content handlers are not inherited into nested locations.
        conf.content = Content::Static;
        Self::level_start(&mut conf, list);
        for c in list {
            if self.ignored(c) {
                continue;
            }
            match c.name.as_str() {
                "location" => {}
                n if is_rewrite_op(n) => {}
                _ => self.setting(&mut conf, c)?,
            }
        }
        if let Content::Proxy(p) = &conf.content {
            crate::proxy::conf::check_uri_part(Some(&matcher), p)?;
        }
        let conf = Arc::new(conf);
        let rewrites = self.rewrite_ops(&conf, list)?;
        let mut children = Vec::new();
        for c in list {
            if c.name == "location" {
                if matches!(matcher, LocMatch::Exact(_) | LocMatch::Named(_)) {
                    return Err(ConfError::directive(
                        c,
                        format!(
                            "location \"{}\" cannot be inside the exact location \"{}\"",
                            c.args.last().cloned().unwrap_or_default(),
                            pattern
                        ),
                    ));
                }
                let child = Arc::new(self.location(&conf, c)?);
                if matches!(child.matcher, LocMatch::Named(_)) {
                    return Err(ConfError::directive(
                        c,
                        "named location can be on the server level only",
                    ));
                }
                children.push(child);
            }
        }
        Ok(Location {
            matcher,
            pattern: d.args.join(" "),
            rewrites,
            conf,
            children,
        })
    }

    /// The rewrite-module directives of a block, in order.
    fn rewrite_ops(
        &mut self,
        conf: &Arc<LocConf>,
        list: &[Directive],
    ) -> Result<Vec<RewriteOp>, ConfError> {
        let mut ops = Vec::new();
        for d in list {
            let op = match d.name.as_str() {
                "set" => {
                    let var = var_name(d, arg(d, 0))?;
                    self.declare(&var);
                    RewriteOp::Set(var, template(d, arg(d, 1))?)
                }
                "set_by_lua_block" | "set_by_lua_file" => {
                    let var = var_name(d, arg(d, 0))?;
                    self.declare(&var);
                    let (body_idx, extra) = if d.name == "set_by_lua_block" {
                        (d.args.len() - 1, 1..d.args.len() - 1)
                    } else {
                        (1, 2..d.args.len())
                    };
                    let chunk = self.lua_chunk(d, arg(d, body_idx))?;
                    let args = d.args[extra]
                        .iter()
                        .map(|a| template(d, a))
                        .collect::<Result<Vec<_>, _>>()?;
                    RewriteOp::SetByLua { var, chunk, args }
                }
                "rewrite" => {
                    let regex = Regex::new(arg(d, 0), false).map_err(|e| {
                        ConfError::directive(
                            d,
                            format!("pcre2_compile() failed: {} in \"{}\"", e, arg(d, 0)),
                        )
                    })?;
                    let flag = match d.args.get(2).map(String::as_str) {
                        None => RewriteFlag::None,
                        Some("last") => RewriteFlag::Last,
                        Some("break") => RewriteFlag::Break,
                        Some("redirect") => RewriteFlag::Redirect,
                        Some("permanent") => RewriteFlag::Permanent,
                        Some(v) => {
                            return Err(ConfError::directive(
                                d,
                                format!("invalid parameter \"{}\"", v),
                            ))
                        }
                    };
                    RewriteOp::Rewrite {
                        regex: Arc::new(regex),
                        replacement: template(d, arg(d, 1))?,
                        flag,
                        file_line: d.location(),
                    }
                }
                "return" => {
                    let a0 = arg(d, 0);
                    match a0.parse::<u16>() {
                        Ok(code) if d.args.len() == 1 || code < 1000 => {
                            if code > 999 {
                                return Err(ConfError::invalid_value(d, a0));
                            }
                            RewriteOp::Return {
                                code,
                                body: d.args.get(1).map(|b| template(d, b)).transpose()?,
                            }
                        }
                        _ if d.args.len() == 1
                            && (a0.starts_with("http://")
                                || a0.starts_with("https://")
                                || a0.starts_with('$')) =>
                        {
                            RewriteOp::Return {
                                code: 302,
                                body: Some(template(d, a0)?),
                            }
                        }
                        _ => {
                            return Err(ConfError::directive(
                                d,
                                format!("invalid return code \"{}\"", a0),
                            ))
                        }
                    }
                }
                "break" => RewriteOp::Break,
                "if" => {
                    let cond = parse_cond(d)?;
                    let body = d.block.as_deref().unwrap_or(&[]);
                    let mut ic = (**conf).clone();
                    Self::level_start(&mut ic, body);
                    for c in body {
                        if self.ignored(c) || is_rewrite_op(&c.name) {
                            continue;
                        }
                        self.setting(&mut ic, c)?;
                    }
                    if let Content::Proxy(p) = &ic.content {
                        if !matches!(&conf.content, Content::Proxy(q) if Arc::ptr_eq(p, q)) {
                            crate::proxy::conf::check_uri_part(None, p)?;
                        }
                    }
                    let ic = Arc::new(ic);
                    let inner = self.rewrite_ops(&ic, body)?;
                    RewriteOp::If {
                        cond: Arc::new(cond),
                        ops: inner,
                        conf: ic,
                    }
                }
                _ => continue,
            };
            ops.push(op);
        }
        Ok(ops)
    }

    fn declare(&mut self, var: &str) {
        if !self.declared.iter().any(|v| v == var) {
            self.declared.push(var.to_string());
        }
    }
}

fn var_name(d: &Directive, s: &str) -> Result<String, ConfError> {
    match s.strip_prefix('$') {
        Some(n) if !n.is_empty() => Ok(n.to_ascii_lowercase()),
        _ => Err(ConfError::directive(
            d,
            format!("invalid variable name \"{}\"", s),
        )),
    }
}

fn check_duplicate_location(
    existing: &[Arc<Location>],
    loc: &Location,
    d: &Directive,
) -> Result<(), ConfError> {
    let key = |l: &LocMatch| match l {
        LocMatch::Exact(p) => Some(format!("={}", p)),
        LocMatch::Prefix(p) | LocMatch::PrefixNoRegex(p) => Some(p.clone()),
        _ => None,
    };
    if let Some(k) = key(&loc.matcher) {
        if existing
            .iter()
            .any(|e| key(&e.matcher).as_deref() == Some(k.as_str()))
        {
            return Err(ConfError::directive(
                d,
                format!("duplicate location \"{}\"", k.trim_start_matches('=')),
            ));
        }
    }
    Ok(())
}

fn listen(d: &Directive) -> Result<Listen, ConfError> {
    let a = arg(d, 0);
    let bad = || {
        ConfError::directive(
            d,
            format!("invalid port in \"{}\" of the \"listen\" directive", a),
        )
    };
    let addr = if let Ok(port) = a.parse::<u16>() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
    } else if let Some(rest) = a.strip_prefix('[') {
        let (host, port) = rest.split_once("]").ok_or_else(bad)?;
        let ip: Ipv6Addr = host
            .parse()
            .map_err(|_| ConfError::directive(d, format!("invalid IPv6 address in \"{}\"", a)))?;
        let port = match port.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => 80,
        };
        SocketAddr::new(IpAddr::V6(ip), port)
    } else {
        let (host, port) = match a.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (a, 80),
        };
        let ip = match host {
            "*" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            h => h.parse().map_err(|_| {
                ConfError::directive(
                    d,
                    format!("host not found in \"{}\" of the \"listen\" directive", a),
                )
            })?,
        };
        SocketAddr::new(ip, port)
    };
    let mut l = Listen {
        addr,
        default_server: false,
        backlog: 511,
    };
    for p in &d.args[1..] {
        if p == "default_server" || p == "default" {
            l.default_server = true;
        } else if let Some(b) = p.strip_prefix("backlog=") {
            l.backlog = b
                .parse()
                .map_err(|_| ConfError::directive(d, format!("invalid backlog \"{}\"", b)))?;
        } else if matches!(
            p.as_str(),
            "reuseport" | "deferred" | "bind" | "http2" | "so_keepalive=on" | "fastopen"
        ) {
            // Socket tuning that the worker model already covers (every worker has its own
            // SO_REUSEPORT socket).
        } else if p == "ssl" {
            return Err(ConfError::directive(
                d,
                "the \"ssl\" parameter of \"listen\" is not supported yet",
            ));
        } else {
            return Err(ConfError::directive(
                d,
                format!("invalid parameter \"{}\"", p),
            ));
        }
    }
    Ok(l)
}

fn server_name(d: &Directive, n: &str) -> Result<ServerName, ConfError> {
    Ok(if let Some(re) = n.strip_prefix('~') {
        ServerName::Regex(Regex::new(re, true).map_err(|e| ConfError::directive(d, e))?)
    } else if let Some(s) = n.strip_prefix("*.") {
        ServerName::Suffix(format!(".{}", s.to_ascii_lowercase()), false)
    } else if let Some(s) = n.strip_prefix('.') {
        // `.example.com` matches example.com itself and every subdomain.
        ServerName::Suffix(format!(".{}", s.to_ascii_lowercase()), true)
    } else if let Some(p) = n.strip_suffix(".*") {
        ServerName::Prefix(format!("{}.", p.to_ascii_lowercase()))
    } else {
        ServerName::Exact(n.to_ascii_lowercase())
    })
}

/// `if (...)`: the arguments arrive split on spaces with the parentheses attached to the first
/// and last, as nginx's lexer leaves them.
fn parse_cond(d: &Directive) -> Result<Cond, ConfError> {
    let mut args: Vec<String> = d.args.clone();
    let bad = || ConfError::directive(d, format!("invalid condition \"{}\"", d.args.join(" ")));
    let first = args.first_mut().ok_or_else(bad)?;
    *first = first.strip_prefix('(').ok_or_else(bad)?.to_string();
    let last = args.last_mut().ok_or_else(bad)?;
    *last = last.strip_suffix(')').ok_or_else(bad)?.to_string();
    args.retain(|a| !a.is_empty());
    match args.len() {
        1 => Ok(Cond::Truthy(template(d, &args[0])?)),
        2 => {
            let t = template(d, &args[1])?;
            let test = match args[0].as_str() {
                "-f" => FileTest::File(true),
                "!-f" => FileTest::File(false),
                "-d" => FileTest::Dir(true),
                "!-d" => FileTest::Dir(false),
                "-e" => FileTest::Exists(true),
                "!-e" => FileTest::Exists(false),
                "-x" => FileTest::Exec(true),
                "!-x" => FileTest::Exec(false),
                op => {
                    return Err(ConfError::directive(
                        d,
                        format!("unexpected \"{}\" in condition", op),
                    ))
                }
            };
            Ok(Cond::FileExists(t, test))
        }
        3 => {
            let lhs = template(d, &args[0])?;
            match args[1].as_str() {
                "=" => Ok(Cond::Eq(lhs, template(d, &args[2])?, true)),
                "!=" => Ok(Cond::Eq(lhs, template(d, &args[2])?, false)),
                op @ ("~" | "~*" | "!~" | "!~*") => {
                    let re = Regex::new(&args[2], op.ends_with('*')).map_err(|e| {
                        ConfError::directive(
                            d,
                            format!("pcre2_compile() failed: {} in \"{}\"", e, args[2]),
                        )
                    })?;
                    Ok(Cond::Regex(lhs, re, !op.starts_with('!')))
                }
                op => Err(ConfError::directive(
                    d,
                    format!("unexpected \"{}\" in condition", op),
                )),
            }
        }
        _ => Err(bad()),
    }
}

/// A count argument (`lua_max_pending_timers 1024`), as nginx's `ngx_conf_set_num_slot`.
fn count(d: &Directive) -> Result<usize, ConfError> {
    arg(d, 0)
        .parse::<usize>()
        .map_err(|_| ConfError::directive(d, format!("\"{}\" directive invalid number", d.name)))
}

// ---- upstream blocks (owner: src/proxy/upstream) ----

impl Builder {
    /// `upstream name { server ...; [method;] [keepalive ...;] ... }`.
    fn upstream(&mut self, d: &Directive) -> Result<UpstreamConf, ConfError> {
        let list = d.block.as_deref().unwrap_or(&[]);
        let mut u = UpstreamConf {
            name: arg(d, 0).to_string(),
            servers: Vec::new(),
            method: Balance::RoundRobin,
            keepalive: None,
            zone: None,
            health_check: None,
            circuit_breaker: None,
            balancer: None,
            file_line: d.location(),
        };
        let mut method_set = false;
        let mut ka = UpstreamKeepalive {
            max_idle: 0,
            timeout_ms: 60_000,
            requests: 1000,
            time_ms: 3_600_000,
        };
        let mut ka_on = false;
        for c in list {
            let method = match c.name.as_str() {
                "least_conn" => Some(Balance::LeastConn),
                "ip_hash" => Some(Balance::IpHash),
                "hash" => {
                    let consistent = match c.args.get(1).map(String::as_str) {
                        None => false,
                        Some("consistent") => true,
                        Some(v) => return Err(ConfError::invalid_value(c, v)),
                    };
                    Some(Balance::Hash {
                        key: template(c, arg(c, 0))?,
                        consistent,
                    })
                }
                "random" => {
                    let two = match (c.args.first(), c.args.get(1)) {
                        (None, _) => false,
                        (Some(t), None) if t == "two" => true,
                        (Some(t), Some(m)) if t == "two" && m == "least_conn" => true,
                        (Some(t), Some(m)) if t == "two" => {
                            return Err(ConfError::invalid_value(c, m))
                        }
                        (Some(t), _) => return Err(ConfError::invalid_value(c, t)),
                    };
                    Some(Balance::Random { two })
                }
                "ewma" => {
                    let mut decay_ms = 10_000;
                    if let Some(a) = c.args.first() {
                        let v = a
                            .strip_prefix("decay=")
                            .ok_or_else(|| ConfError::invalid_value(c, a))?;
                        decay_ms = time_ms(c, v)?.max(1);
                    }
                    Some(Balance::Ewma { decay_ms })
                }
                _ => None,
            };
            if let Some(m) = method {
                if method_set {
                    self.notices.push(format!(
                        "load balancing method redefined in {}",
                        c.location()
                    ));
                }
                method_set = true;
                u.method = m;
                continue;
            }
            match c.name.as_str() {
                "server" => {}
                "keepalive" => {
                    ka_on = true;
                    ka.max_idle = arg(c, 0)
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| ConfError::invalid_value(c, arg(c, 0)))?;
                }
                "keepalive_timeout" => ka.timeout_ms = time_ms(c, arg(c, 0))?,
                "keepalive_time" => ka.time_ms = time_ms(c, arg(c, 0))?,
                "keepalive_requests" => {
                    ka.requests = arg(c, 0)
                        .parse()
                        .map_err(|_| ConfError::invalid_value(c, arg(c, 0)))?
                }
                "zone" => {
                    let sz = match c.args.get(1) {
                        Some(v) => Some(size(c, v)?),
                        None => None,
                    };
                    u.zone = Some((arg(c, 0).to_string(), sz));
                }
                "health_check" => u.health_check = Some(health_check(c)?),
                "circuit_breaker" => u.circuit_breaker = Some(circuit_breaker(c)?),
                "balancer_by_lua_block" | "balancer_by_lua_file" => {
                    u.balancer = Some(self.lua_chunk(c, arg(c, 0))?)
                }
                "include" => {}
                other => {
                    return Err(ConfError::directive(
                        c,
                        format!("\"{}\" directive is not allowed here", other),
                    ))
                }
            }
        }
        if ka_on {
            u.keepalive = Some(ka);
        }
        let no_backup = matches!(
            u.method,
            Balance::IpHash | Balance::Hash { .. } | Balance::Random { .. }
        );
        for c in list.iter().filter(|c| c.name == "server") {
            u.servers.push(upstream_server(c, no_backup)?);
        }
        if u.servers.is_empty() {
            return Err(ConfError::directive(
                d,
                format!("no servers are inside upstream \"{}\"", u.name),
            ));
        }
        Ok(u)
    }
}

/// One `server address [parameters]` line; names are resolved now, as nginx resolves them
/// while reading the configuration.
fn upstream_server(d: &Directive, no_backup: bool) -> Result<UpstreamServer, ConfError> {
    let url = arg(d, 0);
    let mut s = UpstreamServer {
        text: url.to_string(),
        host: String::new(),
        addrs: Vec::new(),
        weight: 1,
        max_fails: 1,
        fail_timeout_ms: 10_000,
        backup: false,
        down: false,
        max_conns: 0,
    };
    let bad = |p: &str| ConfError::directive(d, format!("invalid parameter \"{}\"", p));
    for p in &d.args[1..] {
        let num = |v: &str| v.parse::<u32>().map_err(|_| bad(p));
        if let Some(v) = p.strip_prefix("weight=") {
            s.weight = num(v)?;
            if s.weight == 0 {
                return Err(bad(p));
            }
        } else if let Some(v) = p.strip_prefix("max_fails=") {
            s.max_fails = num(v)?;
        } else if let Some(v) = p.strip_prefix("max_conns=") {
            s.max_conns = num(v)?;
        } else if let Some(v) = p.strip_prefix("fail_timeout=") {
            s.fail_timeout_ms = parse_time_ms(v).ok_or_else(|| bad(p))?;
        } else if p == "backup" {
            if no_backup {
                return Err(ConfError::directive(
                    d,
                    "balancing method does not support parameter \"backup\"",
                ));
            }
            s.backup = true;
        } else if p == "down" {
            s.down = true;
        } else if p == "resolve" || p.starts_with("service=") || p.starts_with("slow_start=") {
            // nginx plus parameters: addresses are resolved once here.
        } else {
            return Err(bad(p));
        }
    }
    if url.starts_with("unix:") {
        return Err(ConfError::directive(
            d,
            format!("unix sockets are not supported in upstream \"{}\"", url),
        ));
    }
    let not_found = || ConfError::directive(d, format!("host not found in upstream \"{}\"", url));
    let (host, port) = split_host_port(url)
        .ok_or_else(|| ConfError::directive(d, format!("invalid port in upstream \"{}\"", url)))?;
    if host.is_empty() {
        return Err(ConfError::directive(
            d,
            format!("no host in upstream \"{}\"", url),
        ));
    }
    s.host = host.to_string();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    s.addrs = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            use std::net::ToSocketAddrs;
            let mut v: Vec<SocketAddr> = (bare, port)
                .to_socket_addrs()
                .map_err(|_| not_found())?
                .collect();
            let mut seen = Vec::new();
            v.retain(|a| {
                let new = !seen.contains(a);
                seen.push(*a);
                new
            });
            v
        }
    };
    if s.addrs.is_empty() {
        return Err(not_found());
    }
    Ok(s)
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`; the port defaults to 80.
fn split_host_port(url: &str) -> Option<(&str, u16)> {
    if url.starts_with('[') {
        let end = url.find(']')?;
        let rest = &url[end + 1..];
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if rest.is_empty() => 80,
            None => return None,
        };
        return Some((&url[..=end], port));
    }
    match url.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h, p.parse().ok().filter(|p| *p > 0)?)),
        Some(_) => Some((url, 80)),
        None => Some((url, 80)),
    }
}

/// `key=value` parameters of our own directives.
fn kv_params(d: &Directive) -> Result<Vec<(&str, &str)>, ConfError> {
    d.args
        .iter()
        .map(|a| {
            a.split_once('=')
                .ok_or_else(|| ConfError::directive(d, format!("invalid parameter \"{}\"", a)))
        })
        .collect()
}

fn health_check(d: &Directive) -> Result<HealthCheck, ConfError> {
    let mut h = HealthCheck {
        interval_ms: 5000,
        timeout_ms: 1000,
        uri: "/".to_string(),
        fails: 1,
        passes: 1,
        expect: vec![(200, 399)],
        tcp: false,
        host: None,
    };
    let bad =
        |k: &str, v: &str| ConfError::directive(d, format!("invalid parameter \"{}={}\"", k, v));
    for (k, v) in kv_params(d)? {
        let count = || {
            v.parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad(k, v))
        };
        match k {
            "interval" => {
                h.interval_ms = parse_time_ms(v)
                    .filter(|t| *t > 0)
                    .ok_or_else(|| bad(k, v))?
            }
            "timeout" => {
                h.timeout_ms = parse_time_ms(v)
                    .filter(|t| *t > 0)
                    .ok_or_else(|| bad(k, v))?
            }
            "uri" if v.starts_with('/') => h.uri = v.to_string(),
            "fails" => h.fails = count()?,
            "passes" => h.passes = count()?,
            "type" if v == "tcp" || v == "http" => h.tcp = v == "tcp",
            "host" => h.host = Some(v.to_string()),
            "expect" => {
                let mut ranges = Vec::new();
                for part in v.split(',') {
                    let (a, b) = part.split_once('-').unwrap_or((part, part));
                    let a: u16 = a.parse().map_err(|_| bad(k, v))?;
                    let b: u16 = b.parse().map_err(|_| bad(k, v))?;
                    if !(100..=599).contains(&a) || b < a || b > 599 {
                        return Err(bad(k, v));
                    }
                    ranges.push((a, b));
                }
                h.expect = ranges;
            }
            _ => return Err(bad(k, v)),
        }
    }
    Ok(h)
}

fn circuit_breaker(d: &Directive) -> Result<CircuitBreaker, ConfError> {
    let mut b = CircuitBreaker {
        failures: 5,
        window_ms: 10_000,
        open_ms: 5_000,
        half_open: 1,
    };
    let bad =
        |k: &str, v: &str| ConfError::directive(d, format!("invalid parameter \"{}={}\"", k, v));
    for (k, v) in kv_params(d)? {
        let count = || {
            v.parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad(k, v))
        };
        let time = || parse_time_ms(v).filter(|t| *t > 0).ok_or_else(|| bad(k, v));
        match k {
            "failures" => b.failures = count()?,
            "half_open" => b.half_open = count()?,
            "window" => b.window_ms = time()?,
            "open" => b.open_ms = time()?,
            _ => return Err(bad(k, v)),
        }
    }
    Ok(b)
}
