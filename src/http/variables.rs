//! nginx variables: the built-ins (`$uri`, `$arg_x`, `$http_x`, ...), those made by `set`, and
//! template evaluation for every directive that takes variables.

use std::borrow::Cow;

use bytes::Bytes;

use super::request::{ReqCtx, ReqState};
use crate::conf::template::{Part, Template};

/// Look a variable up (name lower-case, without `$`). `None` is nginx's "not found".
pub fn get(rc: &ReqCtx, st: &ReqState, name: &str) -> Option<Vec<u8>> {
    if let Some(v) = st.vars.get(name) {
        return Some(v.to_vec());
    }
    if let Some(v) = st.extra_vars.get(name) {
        return Some(v.as_bytes().to_vec());
    }
    if let Some(v) = super::map::get(rc, st, name) {
        return v;
    }
    if let Some(h) = name.strip_prefix("http_") {
        return header(st, &h.replace('_', "-"));
    }
    if let Some(h) = name.strip_prefix("sent_http_") {
        let h = h.replace('_', "-");
        let vals: Vec<&[u8]> = st
            .resp_headers
            .get_all(h.as_str())
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        return if vals.is_empty() {
            None
        } else {
            Some(vals.join(&b", "[..]))
        };
    }
    if name.starts_with("upstream_") || name.starts_with("proxy_") {
        if let Some(u) = &st.upstream {
            if let Some(v) = u.variable(name) {
                return Some(v);
            }
        }
    }
    if let Some(a) = name.strip_prefix("arg_") {
        return arg(st.args.as_deref().unwrap_or(""), a).map(|v| v.into_owned());
    }
    if let Some(c) = name.strip_prefix("cookie_") {
        return cookie(st, c);
    }
    let s: String = match name {
        "uri" | "document_uri" => st.uri.clone(),
        "request_uri" => st.request_uri.clone(),
        "args" | "query_string" => return st.args.as_ref().map(|a| a.as_bytes().to_vec()),
        "is_args" => if st.args.as_deref().is_some_and(|a| !a.is_empty()) {
            "?"
        } else {
            ""
        }
        .to_string(),
        "host" => host(st).unwrap_or_else(|| st.server.primary_name.clone()),
        "http_host" => return header(st, "host"),
        "remote_addr" => st.remote(&rc.conn).ip().to_string(),
        // realip takes the port from the header when it has one, else there is none.
        "remote_port" => match st.remote(&rc.conn).port() {
            0 => String::new(),
            p => p.to_string(),
        },
        "realip_remote_addr" => rc.conn.remote.ip().to_string(),
        "realip_remote_port" => rc.conn.remote.port().to_string(),
        "binary_remote_addr" => {
            return Some(match st.remote(&rc.conn).ip() {
                std::net::IpAddr::V4(v) => v.octets().to_vec(),
                std::net::IpAddr::V6(v) => v.octets().to_vec(),
            })
        }
        "server_addr" => rc.conn.local.ip().to_string(),
        "server_port" => rc.conn.local.port().to_string(),
        "server_name" => st.server.primary_name.clone(),
        "server_protocol" => version(st).to_string(),
        "scheme" => "http".to_string(),
        "https" => String::new(),
        "request_method" => st.method.as_str().to_string(),
        "request" => format!("{} {} {}", st.method, st.request_uri, version(st)),
        "request_time" => format!(
            "{:.3}",
            crate::clock::now()
                .saturating_duration_since(rc.start)
                .as_secs_f64()
        ),
        "status" => st.status.to_string(),
        "body_bytes_sent" => st.body_bytes_sent.to_string(),
        "bytes_sent" => st.body_bytes_sent.to_string(),
        "content_type" => return header(st, "content-type"),
        "content_length" => return header(st, "content-length"),
        "hostname" => hostname(),
        "msec" => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("{}.{:03}", now.as_secs(), now.subsec_millis())
        }
        "time_local" => chrono::Local::now()
            .format("%d/%b/%Y:%H:%M:%S %z")
            .to_string(),
        "time_iso8601" => chrono::Local::now()
            .format("%Y-%m-%dT%H:%M:%S%:z")
            .to_string(),
        "request_id" => rc.request_id(),
        "connection" => rc.conn.id.to_string(),
        "connection_requests" => rc.conn.requests.get().to_string(),
        "nginx_version" => "1.25.3".to_string(),
        "pid" => std::process::id().to_string(),
        "document_root" | "realpath_root" => {
            rc.env.cfg.prefix.join(&st.conf.root).display().to_string()
        }
        "request_filename" => rc
            .env
            .cfg
            .prefix
            .join(&st.conf.root)
            .join(st.uri.trim_start_matches('/'))
            .display()
            .to_string(),
        "remote_user" => return None,
        "proxy_add_x_forwarded_for" => match header(st, "x-forwarded-for") {
            Some(xff) => format!(
                "{}, {}",
                String::from_utf8_lossy(&xff),
                st.remote(&rc.conn).ip()
            ),
            None => st.remote(&rc.conn).ip().to_string(),
        },
        "request_length" => "0".to_string(),
        "request_body" => {
            return match &st.body {
                super::request::ReqBody::Read(b) => Some(b.to_vec()),
                _ => None,
            }
        }
        _ => return None,
    };
    Some(s.into_bytes())
}

/// Whether `name` is a built-in that cannot be assigned (nginx's "not changeable").
pub fn is_builtin(name: &str) -> bool {
    name.starts_with("http_")
        || name.starts_with("arg_")
        || name.starts_with("cookie_")
        || name.starts_with("sent_http_")
}

fn version(st: &ReqState) -> &'static str {
    match st.version {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    }
}

fn header(st: &ReqState, name: &str) -> Option<Vec<u8>> {
    let mut it = st.headers.get_all(name).iter();
    let first = it.next()?;
    let mut v = first.as_bytes().to_vec();
    for more in it {
        // nginx joins repeated Cookie headers with "; " and others with ", ".
        v.extend_from_slice(if name == "cookie" { b"; " } else { b", " });
        v.extend_from_slice(more.as_bytes());
    }
    Some(v)
}

/// `$host`: Host header without port, lower-case.
pub fn host(st: &ReqState) -> Option<String> {
    let h = st.headers.get(http::header::HOST)?.to_str().ok()?;
    let h = if h.starts_with('[') {
        h.split(']')
            .next()
            .map(|s| format!("{}]", s))
            .unwrap_or_default()
    } else {
        h.split(':').next().unwrap_or("").to_string()
    };
    if h.is_empty() {
        None
    } else {
        Some(h.to_ascii_lowercase())
    }
}

/// The raw value of query argument `name` (case-insensitive, as nginx matches `$arg_x`).
pub fn arg<'a>(args: &'a str, name: &str) -> Option<Cow<'a, [u8]>> {
    for pair in args.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k.eq_ignore_ascii_case(name) {
            return Some(Cow::Borrowed(v.as_bytes()));
        }
    }
    None
}

fn cookie(st: &ReqState, name: &str) -> Option<Vec<u8>> {
    for h in st.headers.get_all(http::header::COOKIE) {
        for c in h.as_bytes().split(|b| *b == b';') {
            let c = trim(c);
            if let Some(eq) = c.iter().position(|b| *b == b'=') {
                if c[..eq].eq_ignore_ascii_case(name.as_bytes()) {
                    return Some(c[eq + 1..].to_vec());
                }
            }
        }
    }
    None
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' '] = b {
        b = rest;
    }
    b
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Evaluate a template for this request. Unknown variables expand to nothing.
pub fn eval(rc: &ReqCtx, st: &ReqState, t: &Template) -> Vec<u8> {
    eval_with(rc, st, t, b"")
}

/// Evaluate for the access log: a variable that is not found prints `-`, as nginx logs it.
pub fn eval_log(rc: &ReqCtx, st: &ReqState, t: &Template) -> Vec<u8> {
    eval_with(rc, st, t, b"-")
}

fn eval_with(rc: &ReqCtx, st: &ReqState, t: &Template, missing: &[u8]) -> Vec<u8> {
    if let Some(l) = t.as_literal() {
        return l.to_vec();
    }
    let mut out = Vec::new();
    for p in &t.parts {
        match p {
            Part::Lit(l) => out.extend_from_slice(l),
            Part::Var(n) => match get(rc, st, n) {
                Some(v) => out.extend_from_slice(&v),
                None => out.extend_from_slice(missing),
            },
            Part::Capture(i) => {
                if let Some(Some(c)) = st.captures.get(*i) {
                    out.extend_from_slice(c);
                }
            }
        }
    }
    out
}

/// Evaluate to a String (lossy for non-UTF-8 bytes).
pub fn eval_string(rc: &ReqCtx, st: &ReqState, t: &Template) -> String {
    String::from_utf8_lossy(&eval(rc, st, t)).into_owned()
}

/// Store captures of a regex match for `$1..$9`.
pub fn set_captures(st: &mut ReqState, subject: &[u8], caps: &[Option<(usize, usize)>]) {
    st.captures = caps
        .iter()
        .map(|c| c.map(|(s, e)| Bytes::copy_from_slice(&subject[s..e])))
        .collect();
}

/// Built-in variable names (besides the `http_`, `arg_`, `cookie_`, `sent_http_` families).
const KNOWN: &[&str] = &[
    "uri",
    "document_uri",
    "request_uri",
    "args",
    "query_string",
    "is_args",
    "host",
    "http_host",
    "remote_addr",
    "realip_remote_addr",
    "remote_port",
    "realip_remote_port",
    "binary_remote_addr",
    "server_addr",
    "server_port",
    "server_name",
    "server_protocol",
    "scheme",
    "https",
    "request_method",
    "request",
    "request_time",
    "status",
    "body_bytes_sent",
    "bytes_sent",
    "content_type",
    "content_length",
    "hostname",
    "msec",
    "time_local",
    "time_iso8601",
    "request_id",
    "connection",
    "connection_requests",
    "nginx_version",
    "pid",
    "document_root",
    "realpath_root",
    "remote_user",
    "request_length",
    "request_body",
    "request_filename",
    "limit_rate",
    "proxy_host",
    "proxy_port",
    "proxy_add_x_forwarded_for",
    "upstream_addr",
    "upstream_status",
    "upstream_response_time",
    "upstream_connect_time",
    "upstream_header_time",
    "upstream_response_length",
    "upstream_bytes_received",
    "upstream_bytes_sent",
    "upstream_cache_status",
    "ssl_protocol",
    "ssl_cipher",
    "ssl_server_name",
    "http2",
    "gzip_ratio",
    "pipe",
    "server_tokens",
];

/// Whether nginx would know `$name` without a `set` (checked at load, like nginx).
pub fn is_known(name: &str) -> bool {
    KNOWN.contains(&name)
        || [
            "http_",
            "arg_",
            "cookie_",
            "sent_http_",
            "upstream_http_",
            "sent_trailer_",
            "upstream_cookie_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Whether `name` is one of the built-ins by exact name (not a `$http_x`-style family):
/// another module may not define it again (nginx's `the duplicate "x" variable`).
pub fn is_named_builtin(name: &str) -> bool {
    KNOWN.contains(&name)
}
