//! Header rules of the proxy: what goes upstream (proxy_set_header over the client's headers,
//! hop-by-hop headers stripped) and what comes back (hop-by-hop stripped, proxy_hide_header /
//! proxy_pass_header, proxy_redirect).

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use super::conf::{ProxyConf, RedirectRule};
use crate::http::request::{ReqCtx, ReqState};
use crate::http::variables;

/// Hop-by-hop headers (RFC 9110 7.6.1) plus those nginx rebuilds itself: never copied from one
/// side to the other as they came.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
    ) || name.starts_with("proxy-")
}

/// Header names the `Connection` header values list (they are hop-by-hop too). The usual
/// `keep-alive` / `close` / `upgrade` name nothing else, so they cost no allocation. A value
/// that is not visible ASCII is skipped whole (as `HeaderValue::to_str` fails on it).
fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    let mut out = Vec::new();
    for v in values {
        let Ok(v) = std::str::from_utf8(v) else {
            continue;
        };
        if !v.bytes().all(|b| b == b'\t' || (32..127).contains(&b)) {
            continue;
        }
        for t in v.split(',') {
            let t = t.trim();
            if t.is_empty()
                || t.eq_ignore_ascii_case("keep-alive")
                || t.eq_ignore_ascii_case("close")
                || t.eq_ignore_ascii_case("upgrade")
            {
                continue;
            }
            out.push(t.to_ascii_lowercase());
        }
    }
    out
}

/// Whether a `Connection` value names a header beyond the usual tokens (the rare case where
/// [`drop_named`] has work to do).
pub fn names_others(v: &[u8]) -> bool {
    // The usual value is one usual token (httparse let only space and tab around it).
    let t = v.trim_ascii();
    if t.eq_ignore_ascii_case(b"keep-alive")
        || t.eq_ignore_ascii_case(b"close")
        || t.eq_ignore_ascii_case(b"upgrade")
    {
        return false;
    }
    !connection_tokens(std::iter::once(v)).is_empty()
}

/// The request's header lines for upstream, rendered once per request: every try sends the
/// same, and they go to the wire with no map in between.
#[derive(Default)]
pub struct ReqHeaders {
    /// `name: value\r\n` lines, in the order a `HeaderMap` built the same way would give
    /// them (values of one name together, where the name first came).
    pub lines: Vec<u8>,
    /// `Connection` asks the upstream to close.
    pub close: bool,
    pub has_len: bool,
    /// Where the `Transfer-Encoding` lines are (only proxy_set_header makes them: the client's
    /// is hop-by-hop), for a request whose framing leaves them out.
    pub te: Option<std::ops::Range<usize>>,
}

impl ReqHeaders {
    fn line(&mut self, name: &HeaderName, value: &[u8]) {
        if *name == http::header::CONNECTION {
            self.close |= value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if *name == http::header::CONTENT_LENGTH {
            self.has_len = true;
        }
        let start = self.lines.len();
        self.lines.extend_from_slice(name.as_str().as_bytes());
        self.lines.extend_from_slice(b": ");
        self.lines.extend_from_slice(value);
        self.lines.extend_from_slice(b"\r\n");
        if *name == http::header::TRANSFER_ENCODING {
            self.te.get_or_insert(start..start).end = self.lines.len();
        }
    }
}

/// What `HeaderValue` accepts.
fn valid_value(v: &[u8]) -> bool {
    v.iter().all(|&b| b >= 32 && b != 127 || b == b'\t')
}

/// The request headers for upstream. `content_length` is the body length when known.
pub fn request(
    rc: &ReqCtx,
    st: &ReqState,
    pc: &ProxyConf,
    proxy_host: &str,
    content_length: Option<u64>,
) -> ReqHeaders {
    let mut out = ReqHeaders {
        lines: Vec::with_capacity(64 + st.headers.len() * 40),
        ..Default::default()
    };
    // nginx's defaults (`Host $proxy_host`, `Connection close`) unless the configuration
    // names them.
    let set = &pc.set_headers;
    let named = |n: &HeaderName| set.iter().any(|(m, _)| m == n);
    if !named(&http::header::HOST) && valid_value(proxy_host.as_bytes()) {
        out.line(&http::header::HOST, proxy_host.as_bytes());
    }
    if !named(&http::header::CONNECTION) {
        out.line(&http::header::CONNECTION, b"close");
    }
    // The body's own length replaces a configured Content-Length (where that one would be).
    let mut length = content_length.map(|l| l.to_string());
    for (i, (n, _)) in set.iter().enumerate() {
        // A name given twice sends its values together, where it first came.
        if set[..i].iter().any(|(m, _)| m == n) {
            continue;
        }
        for (_, t) in set[i..].iter().filter(|(m, _)| m == n) {
            let v = match t.as_literal() {
                Some(l) => std::borrow::Cow::Borrowed(l),
                None => std::borrow::Cow::Owned(variables::eval(rc, st, t)),
            };
            if v.is_empty() || !valid_value(&v) {
                continue;
            }
            if *n == http::header::CONTENT_LENGTH && content_length.is_some() {
                if let Some(l) = length.take() {
                    out.line(n, l.as_bytes());
                }
                continue;
            }
            out.line(n, &v);
        }
    }
    if pc.pass_request_headers {
        let named = match st.headers.contains_key(http::header::CONNECTION) {
            true => connection_tokens(
                st.headers
                    .get_all(http::header::CONNECTION)
                    .iter()
                    .map(|v| v.as_bytes()),
            ),
            false => Vec::new(),
        };
        for (n, v) in &st.headers {
            let s = n.as_str();
            if hop_by_hop(s)
                || s == "expect"
                || s == "content-length"
                || named.iter().any(|t| t == s)
                || set.iter().any(|(m, _)| m == n)
                || s == "host"
            {
                continue;
            }
            out.line(n, v.as_bytes());
        }
    }
    if let Some(l) = length {
        out.line(&http::header::CONTENT_LENGTH, l.as_bytes());
    }
    out
}

/// nginx hides these upstream headers unless proxy_pass_header names them.
const HIDDEN: &[&str] = &[
    "date",
    "server",
    "x-pad",
    "x-accel-expires",
    "x-accel-redirect",
    "x-accel-limit-rate",
    "x-accel-buffering",
    "x-accel-charset",
];

/// Whether a header name from a parsed head is `lower` (lower-case letters and `-` only),
/// ignoring ASCII case, a word at a time. Names are tokens: OR-ing 0x20 into a byte turns
/// an upper-case letter into its lower-case one and leaves lower-case letters, digits and
/// `-` as they are; the only other byte it could map onto a letter or `-` is a control byte,
/// which httparse never lets into a name.
pub fn name_is(raw: &[u8], lower: &[u8]) -> bool {
    const M8: u64 = 0x2020_2020_2020_2020;
    const M4: u32 = 0x2020_2020;
    debug_assert!(
        lower.iter().all(|b| b.is_ascii_lowercase() || *b == b'-'),
        "name_is compares with lower-case letters and '-' only"
    );
    if raw.len() != lower.len() {
        return false;
    }
    let w8 = |b: &[u8; 8]| u64::from_ne_bytes(*b);
    let w4 = |b: &[u8; 4]| u32::from_ne_bytes(*b);
    match raw.len() {
        8..=16 => match (
            raw.first_chunk::<8>().zip(raw.last_chunk::<8>()),
            lower.first_chunk::<8>().zip(lower.last_chunk::<8>()),
        ) {
            (Some((a, b)), Some((c, d))) => w8(a) | M8 == w8(c) && w8(b) | M8 == w8(d),
            _ => false,
        },
        4..=7 => match (
            raw.first_chunk::<4>().zip(raw.last_chunk::<4>()),
            lower.first_chunk::<4>().zip(lower.last_chunk::<4>()),
        ) {
            (Some((a, b)), Some((c, d))) => w4(a) | M4 == w4(c) && w4(b) | M4 == w4(d),
            _ => false,
        },
        _ => raw.iter().zip(lower).all(|(a, b)| a | 0x20 == *b),
    }
}

/// The `HeaderName` of a response header origins commonly send, found without
/// `HeaderName::from_bytes` (which copies the name through a table and then matches it
/// against every standard name).
pub fn common_response_name(raw: &[u8]) -> Option<HeaderName> {
    use http::header as h;
    let table: &[(&[u8], HeaderName)] = match raw.len() {
        4 => &[(b"etag", h::ETAG), (b"vary", h::VARY)],
        7 => &[(b"expires", h::EXPIRES)],
        8 => &[(b"location", h::LOCATION)],
        10 => &[(b"set-cookie", h::SET_COOKIE)],
        13 => &[
            (b"last-modified", h::LAST_MODIFIED),
            (b"accept-ranges", h::ACCEPT_RANGES),
            (b"cache-control", h::CACHE_CONTROL),
        ],
        16 => &[(b"content-encoding", h::CONTENT_ENCODING)],
        17 => &[(b"transfer-encoding", h::TRANSFER_ENCODING)],
        _ => return None,
    };
    table
        .iter()
        .find(|(n, _)| name_is(raw, n))
        .map(|(_, name)| name.clone())
}

/// Whether an upstream response header goes on to the client (`upgrade`: the response is a
/// 101), decided while the head is parsed. Headers the upstream's `Connection` names are taken
/// out afterwards by [`drop_named`]; a 101 gets `Connection: upgrade` added.
pub fn passes(pc: &ProxyConf, name: &HeaderName, upgrade: bool) -> bool {
    let s = name.as_str();
    // The two every response with a body has: neither hop-by-hop nor hidden by default, so
    // known without the string comparisons below (one enum compare each).
    if *name == http::header::CONTENT_TYPE || *name == http::header::CONTENT_LENGTH {
        return !pc.hide_headers.iter().any(|h| h == s) || pc.pass_headers.iter().any(|h| h == s);
    }
    if upgrade && s == "upgrade" {
        return true;
    }
    if hop_by_hop(s) {
        return false;
    }
    let hidden = HIDDEN.contains(&s) || pc.hide_headers.iter().any(|h| h == s);
    !hidden || pc.pass_headers.iter().any(|h| h == s)
}

/// Take out of the client's headers those the upstream's `Connection` values name, keeping
/// the order of the rest (`HeaderMap::remove` would not).
pub fn drop_named<'a>(h: &mut HeaderMap, connection: impl Iterator<Item = &'a [u8]>) {
    let named = connection_tokens(connection);
    if named.is_empty() {
        return;
    }
    let all = std::mem::take(h);
    let mut out = HeaderMap::with_capacity(all.len());
    for (n, v) in &all {
        if !named.iter().any(|t| t == n.as_str()) {
            out.append(n.clone(), v.clone());
        }
    }
    *h = out;
}

/// proxy_redirect: rewrite `Location` and `Refresh`. `default_from` is the proxy_pass URL
/// (with its URI part or the location prefix) and `prefix` the location's, for `default`.
pub fn redirect(
    rc: &ReqCtx,
    st: &mut ReqState,
    pc: &ProxyConf,
    default_from: &dyn Fn() -> Option<String>,
    prefix: &str,
) {
    if pc.redirects.is_empty() {
        return;
    }
    for name in [http::header::LOCATION, http::header::REFRESH] {
        let Some(v) = st.resp_headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let v = v.to_string();
        // Refresh carries the URL after `url=`.
        let (head, url) = match name == http::header::REFRESH {
            true => match v.to_ascii_lowercase().find("url=") {
                Some(i) => (v[..i + 4].to_string(), v[i + 4..].to_string()),
                None => continue,
            },
            false => (String::new(), v.clone()),
        };
        let mut new = None;
        for rule in &pc.redirects {
            match rule {
                RedirectRule::Default => {
                    if let Some(from) = default_from() {
                        if let Some(rest) = url.strip_prefix(from.as_str()) {
                            new = Some(format!("{}{}", prefix, rest));
                        }
                    }
                }
                RedirectRule::Replace { from, regex, to } => match regex {
                    Some(re) => {
                        if let Some(caps) = re.captures(url.as_bytes()) {
                            variables::set_captures(st, url.as_bytes(), &caps);
                            new = Some(variables::eval_string(rc, st, to));
                        }
                    }
                    None => {
                        let from = variables::eval_string(rc, st, from);
                        if let Some(rest) = url.strip_prefix(from.as_str()) {
                            new = Some(format!("{}{}", variables::eval_string(rc, st, to), rest));
                        }
                    }
                },
            }
            if new.is_some() {
                break;
            }
        }
        if let Some(n) = new {
            if let Ok(hv) = HeaderValue::from_str(&format!("{}{}", head, n)) {
                st.resp_headers.insert(name, hv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{common_response_name, name_is};

    #[test]
    fn name_is_matches_exactly_what_eq_ignore_ascii_case_does_on_tokens() {
        let targets: &[&[u8]] = &[
            b"te",
            b"via",
            b"date",
            b"server",
            b"expires",
            b"connection",
            b"content-type",
            b"last-modified",
            b"content-length",
            b"content-encoding",
            b"transfer-encoding",
            b"x-a",
        ];
        let mut names: Vec<Vec<u8>> = Vec::new();
        for t in targets {
            names.push(t.to_vec());
            names.push(t.to_ascii_uppercase());
            // One byte changed at each place: case only, a neighbour letter, `_` for `-`.
            for i in 0..t.len() {
                for b in [t[i] ^ 0x20, t[i] + 1, b'_', b'~', b'^', b'0'] {
                    // Only bytes a parsed name can hold (no control bytes).
                    if b < 0x21 || b == 0x7f {
                        continue;
                    }
                    let mut n = t.to_vec();
                    n[i] = b;
                    names.push(n);
                }
            }
            names.push([*t, b"s"].concat());
            names.push(t[1..].to_vec());
        }
        for n in &names {
            for t in targets {
                assert_eq!(
                    name_is(n, t),
                    n.eq_ignore_ascii_case(t),
                    "{:?} vs {:?}",
                    String::from_utf8_lossy(n),
                    String::from_utf8_lossy(t)
                );
            }
        }
    }

    #[test]
    fn common_names_are_the_standard_ones() {
        for raw in [
            "ETag",
            "vary",
            "Expires",
            "LOCATION",
            "Set-Cookie",
            "Last-Modified",
            "accept-ranges",
            "Cache-Control",
            "Content-Encoding",
            "Transfer-Encoding",
        ] {
            let n = common_response_name(raw.as_bytes()).expect(raw);
            assert_eq!(n, http::HeaderName::from_bytes(raw.as_bytes()).expect(raw));
        }
        for raw in ["X-Tag", "etags", "Last_Modified", "Age", "date"] {
            assert!(common_response_name(raw.as_bytes()).is_none(), "{raw}");
        }
    }
}
