//! The proxy module's configuration: `proxy_pass` (the content handler) and the `proxy_*`
//! settings that nest http -> server -> location like any other. Handlers here only turn
//! arguments into values; context and arity were checked by `conf::table`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::conf::model::LocMatch;
use crate::conf::template::Template;
use crate::conf::values::{parse_size, parse_time_ms};
use crate::conf::{ConfError, Directive};

/// Where `proxy_pass` sends requests.
#[derive(Debug)]
pub enum Target {
    /// A URL without variables, parsed (and its host resolved) at load.
    Fixed(Url),
    /// A URL with variables, evaluated per request (`http://$upstream_target`).
    Dynamic(Template),
}

/// A parsed `http[s]://host[:port][/uri]`.
#[derive(Debug, Clone)]
pub struct Url {
    pub https: bool,
    /// The host as written (an upstream name, a DNS name or an IP literal, no brackets).
    pub host: String,
    pub port: u16,
    /// Whether the URL named a port (`$proxy_host` shows it only then).
    pub explicit_port: bool,
    /// The URI part (`/x/` in `http://b/x/`); `None` when the URL ends after the host.
    pub uri: Option<String>,
    /// Addresses resolved at load (empty for an upstream block name).
    pub addrs: Vec<SocketAddr>,
}

/// A resolved address with its `$upstream_addr` text, made once.
pub fn addr_names(addrs: &[SocketAddr]) -> Vec<(SocketAddr, Arc<str>)> {
    addrs
        .iter()
        .map(|a| (*a, Arc::from(a.to_string())))
        .collect()
}

impl Url {
    /// `$proxy_host`: the name (and the port when given) as the directive wrote it.
    pub fn proxy_host(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.explicit_port {
            format!("{}:{}", host, self.port)
        } else {
            host
        }
    }

    /// Parse a proxy_pass URL (without variables). nginx's words for the errors.
    pub fn parse(s: &str) -> Result<Url, String> {
        let (https, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!("invalid URL prefix in \"{}\"", s));
        };
        let (hostport, uri) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(rest[i..].to_string())),
            None => (rest, None),
        };
        let default_port = if https { 443 } else { 80 };
        let (host, port, explicit_port) = if let Some(r) = hostport.strip_prefix('[') {
            let (h, p) = r
                .split_once(']')
                .ok_or_else(|| format!("invalid IPv6 address in \"{}\"", s))?;
            match p.strip_prefix(':') {
                Some(p) => (h, parse_port(p, s)?, true),
                None => (h, default_port, false),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, parse_port(p, s)?, true),
                None => (hostport, default_port, false),
            }
        };
        if host.is_empty() {
            return Err(format!("no host in \"{}\"", s));
        }
        Ok(Url {
            https,
            host: host.to_string(),
            port,
            explicit_port,
            uri,
            addrs: Vec::new(),
        })
    }
}

fn parse_port(p: &str, s: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("invalid port in \"{}\"", s))
}

/// `proxy_pass URL;` as a location's content handler.
#[derive(Debug)]
pub struct ProxyPass {
    pub target: Target,
    /// For a fixed URL: its addresses with their names, and `$proxy_host`.
    pub peers: Vec<(SocketAddr, Arc<str>)>,
    pub proxy_host: Arc<str>,
    /// `file:line` of the directive, for load-time checks made later.
    pub file: String,
    pub line: usize,
    /// The private round robin over a name's addresses (every worker shares it).
    pub rr: AtomicUsize,
}

impl ProxyPass {
    /// Whether the URL has a URI part (forbidden in regex and named locations and in `if`).
    pub fn has_uri(&self) -> bool {
        match &self.target {
            Target::Fixed(u) => u.uri.is_some(),
            // nginx cannot know before run time; it allows variables there.
            Target::Dynamic(_) => false,
        }
    }
}

/// `proxy_redirect`.
#[derive(Debug, Clone)]
pub enum RedirectRule {
    /// `default`: the proxy_pass URL is replaced by the location prefix.
    Default,
    /// `from to` (from is a literal prefix, or a case-(in)sensitive regex with `~`/`~*`).
    Replace {
        from: Template,
        regex: Option<Arc<crate::lua::api::re::Regex>>,
        to: Template,
    },
}

/// Conditions of `proxy_next_upstream` (a bit set).
pub mod next {
    pub const ERROR: u32 = 1;
    pub const TIMEOUT: u32 = 1 << 1;
    pub const INVALID_HEADER: u32 = 1 << 2;
    pub const HTTP_500: u32 = 1 << 3;
    pub const HTTP_502: u32 = 1 << 4;
    pub const HTTP_503: u32 = 1 << 5;
    pub const HTTP_504: u32 = 1 << 6;
    pub const HTTP_403: u32 = 1 << 7;
    pub const HTTP_404: u32 = 1 << 8;
    pub const HTTP_429: u32 = 1 << 9;
    pub const NON_IDEMPOTENT: u32 = 1 << 10;

    /// The flag for a response status, if `proxy_next_upstream` can name it.
    pub fn for_status(s: u16) -> u32 {
        match s {
            500 => HTTP_500,
            502 => HTTP_502,
            503 => HTTP_503,
            504 => HTTP_504,
            403 => HTTP_403,
            404 => HTTP_404,
            429 => HTTP_429,
            _ => 0,
        }
    }
}

/// Upstream TLS settings (`proxy_ssl_*`).
#[derive(Debug, Clone, Default)]
pub struct ProxySsl {
    pub server_name: bool,
    pub name: Option<Template>,
    pub verify: bool,
    pub trusted: Option<PathBuf>,
    pub verify_depth: u32,
    pub certificate: Option<PathBuf>,
    pub certificate_key: Option<PathBuf>,
    /// Built on first use and kept, so TLS sessions resume across connections.
    pub client_config: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

/// The inheritable `proxy_*` settings of one level.
#[derive(Debug, Clone)]
pub struct ProxyConf {
    /// `proxy_set_header` as (lower-case name, value), in order.
    pub set_headers: Vec<(http::HeaderName, Template)>,
    pub hide_headers: Vec<String>,
    pub pass_headers: Vec<String>,
    pub pass_request_headers: bool,
    pub pass_request_body: bool,
    pub http11: bool,
    pub connect_timeout_ms: u64,
    pub send_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub buffering: bool,
    pub request_buffering: bool,
    pub intercept_errors: bool,
    /// Empty with `proxy_redirect off`.
    pub redirects: Vec<RedirectRule>,
    pub ssl: Arc<ProxySsl>,
    pub next_upstream: u32,
    pub next_upstream_tries: u32,
    pub next_upstream_timeout_ms: u64,
    /// `proxy_next_upstream_backoff base=.. max=..` (ms); `None` when off.
    pub backoff: Option<(u64, u64)>,
    pub client_body_buffer_size: u64,
    /// `proxy_buffer_size`: the largest response head taken from an upstream.
    pub buffer_size: usize,
}

impl Default for ProxyConf {
    fn default() -> Self {
        ProxyConf {
            set_headers: Vec::new(),
            hide_headers: Vec::new(),
            pass_headers: Vec::new(),
            pass_request_headers: true,
            pass_request_body: true,
            http11: false,
            connect_timeout_ms: 60_000,
            send_timeout_ms: 60_000,
            read_timeout_ms: 60_000,
            buffering: true,
            request_buffering: true,
            intercept_errors: false,
            redirects: vec![RedirectRule::Default],
            ssl: Arc::new(ProxySsl {
                verify_depth: 1,
                ..Default::default()
            }),
            next_upstream: next::ERROR | next::TIMEOUT,
            next_upstream_tries: 0,
            next_upstream_timeout_ms: 0,
            backoff: None,
            // nginx's default on 64-bit platforms.
            client_body_buffer_size: 16 * 1024,
            buffer_size: super::h1::HEAD_LIMIT,
        }
    }
}

/// Start a level: list-valued directives given at this level replace the inherited lists.
pub fn level_start(conf: &mut ProxyConf, list: &[Directive]) {
    let has = |n: &str| list.iter().any(|d| d.name == n);
    if has("proxy_set_header") {
        conf.set_headers.clear();
    }
    if has("proxy_hide_header") {
        conf.hide_headers.clear();
    }
    if has("proxy_pass_header") {
        conf.pass_headers.clear();
    }
    if has("proxy_redirect") {
        conf.redirects.clear();
    }
}

fn flag(d: &Directive) -> bool {
    d.args.first().is_some_and(|a| a == "on")
}

fn time(d: &Directive) -> Result<u64, ConfError> {
    let a = d.args.first().map(String::as_str).unwrap_or("");
    parse_time_ms(a)
        .ok_or_else(|| ConfError::directive(d, format!("\"{}\" directive invalid value", d.name)))
}

fn path(prefix: &std::path::Path, p: &str) -> PathBuf {
    let p = std::path::Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        prefix.join(p)
    }
}

/// Apply one `proxy_*` setting (or `client_body_buffer_size`). `template` registers the
/// variables a value uses so unknown ones are refused at load, as nginx does.
pub fn setting(
    conf: &mut ProxyConf,
    d: &Directive,
    prefix: &std::path::Path,
    template: &dyn Fn(&Directive, &str) -> Result<Template, ConfError>,
) -> Result<(), ConfError> {
    let a0 = d.args.first().map(String::as_str).unwrap_or("");
    match d.name.as_str() {
        "proxy_set_header" => {
            let name = http::HeaderName::from_bytes(a0.as_bytes())
                .map_err(|_| ConfError::invalid_value(d, a0))?;
            let value = template(d, d.args.get(1).map(String::as_str).unwrap_or(""))?;
            conf.set_headers.push((name, value));
        }
        "proxy_hide_header" => conf.hide_headers.push(a0.to_ascii_lowercase()),
        "proxy_pass_header" => conf.pass_headers.push(a0.to_ascii_lowercase()),
        "proxy_pass_request_headers" => conf.pass_request_headers = flag(d),
        "proxy_pass_request_body" => conf.pass_request_body = flag(d),
        "proxy_http_version" => {
            conf.http11 = match a0 {
                "1.0" => false,
                "1.1" => true,
                _ => return Err(ConfError::invalid_value(d, a0)),
            }
        }
        "proxy_connect_timeout" => conf.connect_timeout_ms = time(d)?,
        "proxy_send_timeout" => conf.send_timeout_ms = time(d)?,
        "proxy_read_timeout" => conf.read_timeout_ms = time(d)?,
        "proxy_buffering" => conf.buffering = flag(d),
        "proxy_request_buffering" => conf.request_buffering = flag(d),
        "proxy_intercept_errors" => conf.intercept_errors = flag(d),
        "proxy_redirect" => match (a0, d.args.len()) {
            ("off", 1) => conf.redirects.clear(),
            ("default", 1) => conf.redirects.push(RedirectRule::Default),
            (_, 2) => {
                let (regex, from) = if let Some(p) = a0.strip_prefix("~*") {
                    (Some((p, true)), p)
                } else if let Some(p) = a0.strip_prefix('~') {
                    (Some((p, false)), p)
                } else {
                    (None, a0)
                };
                let regex = match regex {
                    Some((p, ci)) => Some(Arc::new(
                        crate::lua::api::re::Regex::new(p, ci)
                            .map_err(|e| ConfError::directive(d, e))?,
                    )),
                    None => None,
                };
                conf.redirects.push(RedirectRule::Replace {
                    from: template(d, from)?,
                    regex,
                    to: template(d, &d.args[1])?,
                });
            }
            _ => return Err(ConfError::invalid_value(d, a0)),
        },
        "proxy_ssl_server_name" => ssl_mut(conf).server_name = flag(d),
        "proxy_ssl_name" => ssl_mut(conf).name = Some(template(d, a0)?),
        "proxy_ssl_verify" => ssl_mut(conf).verify = flag(d),
        "proxy_ssl_trusted_certificate" => ssl_mut(conf).trusted = Some(path(prefix, a0)),
        "proxy_ssl_verify_depth" => {
            ssl_mut(conf).verify_depth = a0.parse().map_err(|_| ConfError::invalid_value(d, a0))?
        }
        "proxy_ssl_certificate" => ssl_mut(conf).certificate = Some(path(prefix, a0)),
        "proxy_ssl_certificate_key" => ssl_mut(conf).certificate_key = Some(path(prefix, a0)),
        "proxy_next_upstream" => {
            let mut bits = 0;
            for a in &d.args {
                bits |= match a.as_str() {
                    "error" => next::ERROR,
                    "timeout" => next::TIMEOUT,
                    "invalid_header" => next::INVALID_HEADER,
                    "http_500" => next::HTTP_500,
                    "http_502" => next::HTTP_502,
                    "http_503" => next::HTTP_503,
                    "http_504" => next::HTTP_504,
                    "http_403" => next::HTTP_403,
                    "http_404" => next::HTTP_404,
                    "http_429" => next::HTTP_429,
                    "non_idempotent" => next::NON_IDEMPOTENT,
                    "off" if d.args.len() == 1 => 0,
                    // nginx accepts `updating` for the cache module only.
                    _ => return Err(ConfError::invalid_value(d, a)),
                };
            }
            conf.next_upstream = bits;
        }
        "proxy_next_upstream_tries" => {
            conf.next_upstream_tries = a0.parse().map_err(|_| ConfError::invalid_value(d, a0))?
        }
        "proxy_next_upstream_timeout" => conf.next_upstream_timeout_ms = time(d)?,
        "proxy_next_upstream_backoff" => {
            if a0 == "off" && d.args.len() == 1 {
                conf.backoff = None;
            } else {
                let (mut base, mut max) = (50, 1000);
                for a in &d.args {
                    let (k, v) = a
                        .split_once('=')
                        .ok_or_else(|| ConfError::invalid_value(d, a))?;
                    let ms = parse_time_ms(v).ok_or_else(|| ConfError::invalid_value(d, a))?;
                    match k {
                        "base" => base = ms,
                        "max" => max = ms,
                        _ => return Err(ConfError::invalid_value(d, a)),
                    }
                }
                conf.backoff = Some((base.max(1), max.max(base)));
            }
        }
        "proxy_buffer_size" => {
            let n = parse_size(a0).ok_or_else(|| ConfError::invalid_value(d, a0))?;
            conf.buffer_size = usize::try_from(n).map_err(|_| ConfError::invalid_value(d, a0))?;
        }
        "client_body_buffer_size" => {
            conf.client_body_buffer_size =
                parse_size(a0).ok_or_else(|| ConfError::invalid_value(d, a0))?
        }
        _ => {
            return Err(ConfError::directive(
                d,
                format!("\"{}\" directive is not allowed here", d.name),
            ))
        }
    }
    Ok(())
}

fn ssl_mut(conf: &mut ProxyConf) -> &mut ProxySsl {
    Arc::make_mut(&mut conf.ssl)
}

/// Build `proxy_pass URL`. `upstreams` are the names of the `upstream {}` blocks of http:
/// a host naming one is not resolved; any other host must resolve now, as nginx insists.
pub fn proxy_pass(
    d: &Directive,
    upstreams: &[String],
    template: &dyn Fn(&Directive, &str) -> Result<Template, ConfError>,
) -> Result<ProxyPass, ConfError> {
    let a0 = d.args.first().map(String::as_str).unwrap_or("");
    let target = if a0.contains('$') {
        Target::Dynamic(template(d, a0)?)
    } else {
        let mut url = Url::parse(a0).map_err(|e| ConfError::directive(d, e))?;
        let is_upstream = !url.explicit_port && upstreams.contains(&url.host);
        if !is_upstream {
            url.addrs = match url.host.parse::<std::net::IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, url.port)],
                Err(_) => (url.host.as_str(), url.port)
                    .to_socket_addrs()
                    .map(|a| a.collect())
                    .unwrap_or_default(),
            };
            if url.addrs.is_empty() {
                return Err(ConfError::directive(
                    d,
                    format!("host not found in upstream \"{}\"", url.proxy_host()),
                ));
            }
        }
        Target::Fixed(url)
    };
    let (peers, proxy_host) = match &target {
        Target::Fixed(u) => (addr_names(&u.addrs), Arc::from(u.proxy_host())),
        Target::Dynamic(_) => (Vec::new(), Arc::from("")),
    };
    Ok(ProxyPass {
        peers,
        proxy_host,
        target,
        file: d.file.to_string(),
        line: d.line,
        rr: AtomicUsize::new(0),
    })
}

/// nginx refuses a URI part where the location has no prefix to replace.
pub fn check_uri_part(matcher: Option<&LocMatch>, pass: &ProxyPass) -> Result<(), ConfError> {
    let no_prefix = match matcher {
        Some(LocMatch::Regex(_)) | Some(LocMatch::Named(_)) | None => true,
        Some(_) => false,
    };
    if no_prefix && pass.has_uri() {
        return Err(ConfError::at(
            "\"proxy_pass\" cannot have URI part in location given by regular expression, \
             or inside named location, or inside \"if\" statement, or inside \"limit_except\" block",
            &pass.file,
            pass.line,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:8080/x/").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port),
            (false, "127.0.0.1", 8080)
        );
        assert_eq!(u.uri.as_deref(), Some("/x/"));
        assert_eq!(u.proxy_host(), "127.0.0.1:8080");
        let u = Url::parse("https://backend").unwrap();
        assert_eq!(
            (u.port, u.explicit_port, u.uri.is_none()),
            (443, false, true)
        );
        assert_eq!(u.proxy_host(), "backend");
        let u = Url::parse("http://[::1]:81/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 81));
        assert_eq!(u.proxy_host(), "[::1]:81");
        assert_eq!(
            Url::parse("ftp://x").unwrap_err(),
            "invalid URL prefix in \"ftp://x\""
        );
        assert_eq!(
            Url::parse("http://x:0").unwrap_err(),
            "invalid port in \"http://x:0\""
        );
        assert_eq!(
            Url::parse("http:///a").unwrap_err(),
            "no host in \"http:///a\""
        );
    }
}
