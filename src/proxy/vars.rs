//! `$proxy_host`, `$proxy_port` and the `$upstream_*` variables. The proxy records facts as
//! it goes; the text is only made when a variable is read (most requests read none).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// One try.
struct Try {
    addr: Arc<str>,
    status: u16,
    connect: Option<Duration>,
    header: Option<Duration>,
    response: Duration,
}

/// What the proxy learnt about one request, kept in `ReqState::upstream`.
#[derive(Default)]
pub struct UpstreamInfo {
    pub proxy_host: Arc<str>,
    pub proxy_port: u16,
    /// The first try inline (most requests make one: no allocation), the others after it.
    first: Option<Try>,
    more: Vec<Try>,
    pub response_length: u64,
    /// The accepted response's head as the upstream sent it (`$upstream_http_*`), parsed
    /// again when such a variable is read: most requests read none.
    pub head: Option<Bytes>,
}

/// Seconds with milliseconds, whole milliseconds as nginx prints them ("%T.%03M" of a
/// millisecond difference: truncated, not rounded); integer digits, no float formatting.
fn secs(d: Option<Duration>) -> String {
    let Some(d) = d else {
        return "-".to_string();
    };
    let ms = d.as_millis();
    let mut s = (ms / 1000).to_string();
    let frac = (ms % 1000) as u16;
    s.push('.');
    for digit in [frac / 100, frac / 10 % 10, frac % 10] {
        s.push(char::from(b'0' + digit as u8));
    }
    s
}

impl UpstreamInfo {
    pub fn new(proxy_host: Arc<str>, proxy_port: u16) -> UpstreamInfo {
        UpstreamInfo {
            proxy_host,
            proxy_port,
            ..Default::default()
        }
    }

    /// Record one try. `status` is the upstream's, or the 502/504 nginx records for a failure.
    pub fn push(
        &mut self,
        addr: &Arc<str>,
        status: u16,
        connect: Option<Duration>,
        header: Option<Duration>,
        response: Duration,
    ) {
        let t = Try {
            addr: addr.clone(),
            status,
            connect,
            header,
            response,
        };
        match self.first {
            None => self.first = Some(t),
            Some(_) => self.more.push(t),
        }
    }

    /// The last try's full time, once its body has been read.
    pub fn set_last_response_time(&mut self, d: Duration) {
        if let Some(t) = self.more.last_mut().or(self.first.as_mut()) {
            t.response = d;
        }
    }

    fn join(&self, f: impl Fn(&Try) -> String) -> Vec<u8> {
        self.first
            .iter()
            .chain(self.more.iter())
            .map(f)
            .collect::<Vec<_>>()
            .join(", ")
            .into_bytes()
    }

    /// A variable's value, `None` when it is not one of ours (or not known yet).
    pub fn variable(&self, name: &str) -> Option<Vec<u8>> {
        if let Some(h) = name.strip_prefix("upstream_http_") {
            return upstream_http(self.head.as_ref()?, h);
        }
        let has_tries = self.first.is_some();
        Some(match name {
            "proxy_host" => self.proxy_host.as_bytes().to_vec(),
            "proxy_port" => self.proxy_port.to_string().into_bytes(),
            "upstream_addr" if has_tries => self.join(|t| t.addr.to_string()),
            "upstream_status" if has_tries => self.join(|t| t.status.to_string()),
            "upstream_connect_time" if has_tries => self.join(|t| secs(t.connect)),
            "upstream_header_time" if has_tries => self.join(|t| secs(t.header)),
            "upstream_response_time" if has_tries => self.join(|t| secs(Some(t.response))),
            "upstream_response_length" if has_tries => {
                self.response_length.to_string().into_bytes()
            }
            _ => return None,
        })
    }
}

/// `$upstream_http_NAME` (name with `_` for `-`, lower-case): every header of that name in
/// the head, joined by ", ". The head was parsed and checked before it was accepted.
fn upstream_http(head: &[u8], name: &str) -> Option<Vec<u8>> {
    let name = name.replace('_', "-");
    let mut lines = vec![httparse::EMPTY_HEADER; super::h1::MAX_HEADERS];
    let mut r = httparse::Response::new(&mut lines);
    r.parse(head).ok()?;
    let vals: Vec<&[u8]> = r
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(&name))
        .map(|h| h.value)
        .collect();
    if vals.is_empty() {
        None
    } else {
        Some(vals.join(&b", "[..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_http_reads_the_raw_head() {
        let head = Bytes::from_static(
            b"HTTP/1.1 200 OK\r\nX-App: a\r\nServer: o\r\nx-app: b\r\nContent-Length: 0\r\n\r\n",
        );
        let u = UpstreamInfo {
            head: Some(head),
            ..Default::default()
        };
        assert_eq!(
            u.variable("upstream_http_x_app").as_deref(),
            Some(&b"a, b"[..])
        );
        assert_eq!(
            u.variable("upstream_http_server").as_deref(),
            Some(&b"o"[..])
        );
        assert_eq!(
            u.variable("upstream_http_X_App").as_deref(),
            Some(&b"a, b"[..])
        );
        assert_eq!(u.variable("upstream_http_none"), None);
    }

    #[test]
    fn times_are_whole_milliseconds() {
        assert_eq!(secs(None), "-");
        assert_eq!(secs(Some(Duration::ZERO)), "0.000");
        assert_eq!(secs(Some(Duration::from_micros(1_999))), "0.001");
        assert_eq!(secs(Some(Duration::from_millis(12_345))), "12.345");
        assert_eq!(secs(Some(Duration::from_millis(1_050))), "1.050");
    }
}
