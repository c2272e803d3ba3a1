//! ngx_http_realip_module: take the client address from a header sent by a trusted proxy.
//!
//! nginx runs it twice: in post-read, with the server's settings, before anything else sees
//! the address (so rewrite-phase Lua, `if`, maps and logs get the real client), and again in
//! preaccess with the location's settings if it did not apply yet. It applies at most once per
//! request. Only a connection from a `set_real_ip_from` address is believed; with
//! `real_ip_recursive on` the header is walked from the right, skipping trusted addresses, so
//! a client cannot put its own choice at the left of `X-Forwarded-For` and be believed.
//!
//! `$realip_remote_addr` / `$realip_remote_port` keep the connection's own address.
//! `X-Forwarded-Proto` is not this module's business: the proxy sets what it forwards.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::request::{ReqCtx, ReqState};
use crate::conf::model::{AddrMatch, Cidr, RealIpConf, RealIpHeader};

impl Cidr {
    /// Parse `addr` or `addr/bits`. The second value is true when the address had bits set
    /// beyond the prefix (nginx warns "low address bits of ... are meaningless").
    pub fn parse(s: &str) -> Option<(Cidr, bool)> {
        let (a, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match bits {
            None => max,
            Some(b) if !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit()) => {
                b.parse::<u8>().ok().filter(|p| *p <= max)?
            }
            Some(_) => return None,
        };
        let masked = mask(addr, prefix);
        Some((
            Cidr {
                addr: masked,
                prefix,
            },
            masked != addr,
        ))
    }

    /// Whether `ip` is in this network. An IPv4-mapped IPv6 address matches IPv4 networks,
    /// as in nginx.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) if self.addr.is_ipv4() => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            other => other,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix as u32)
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(v) & m))
        }
        IpAddr::V6(v) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix as u32)
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(v) & m))
        }
    }
}

impl AddrMatch {
    /// Whether a TCP client address matches (`unix:` never does: tidegate listens on TCP).
    pub fn matches(&self, ip: IpAddr) -> bool {
        match self {
            AddrMatch::Net(c) => c.contains(ip),
            AddrMatch::Unix => false,
            AddrMatch::All => true,
        }
    }
}

fn trusted(from: &[AddrMatch], ip: IpAddr) -> bool {
    from.iter().any(|m| m.matches(ip))
}

/// nginx's `ngx_parse_addr_port` for a header entry: `1.2.3.4`, `1.2.3.4:80`, `::1`,
/// `[::1]`, `[::1]:80`. The port is 0 when absent.
pub fn parse_addr_port(s: &str) -> Option<SocketAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 0));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, tail) = rest.split_once(']')?;
        let ip: Ipv6Addr = host.parse().ok()?;
        let port = match tail {
            "" => 0,
            t => t.strip_prefix(':')?.parse().ok()?,
        };
        return Some(SocketAddr::new(IpAddr::V6(ip), port));
    }
    let (host, port) = s.rsplit_once(':')?;
    let ip: Ipv4Addr = host.parse().ok()?;
    Some(SocketAddr::new(IpAddr::V4(ip), port.parse().ok()?))
}

/// How a walk over one header value ended (nginx's NGX_OK / NGX_DONE / NGX_DECLINED).
#[derive(Debug, PartialEq, Eq)]
enum Walk {
    /// Took the last entry and, recursively, every trusted one before it: all were trusted.
    Ok,
    /// Stopped at an untrusted (or unparsable) entry after taking at least one.
    Done,
    /// Took nothing: the address was not trusted or the last entry was not an address.
    Declined,
}

/// Walk one header value right to left (nginx's `ngx_http_get_forwarded_addr_internal`).
fn walk(addr: &mut SocketAddr, value: &str, from: &[AddrMatch], recursive: bool) -> Walk {
    let mut rest = value;
    let mut found = false;
    loop {
        if !trusted(from, addr.ip()) {
            return if found { Walk::Done } else { Walk::Declined };
        }
        let trimmed = rest.trim_end_matches([' ', ',']);
        let start = trimmed.rfind([' ', ',']).map(|i| i + 1).unwrap_or(0);
        let Some(a) = parse_addr_port(&trimmed[start..]) else {
            return if found { Walk::Done } else { Walk::Declined };
        };
        *addr = a;
        found = true;
        rest = &trimmed[..start];
        if !recursive || rest.is_empty() {
            return Walk::Ok;
        }
    }
}

/// The address the headers name for a connection from `peer`, or `None` to keep it.
pub fn forwarded_addr(
    peer: SocketAddr,
    values: &[&str],
    from: &[AddrMatch],
    recursive: bool,
) -> Option<SocketAddr> {
    let mut addr = peer;
    let mut found = false;
    let mut rc = Walk::Declined;
    // Several headers read as one list, the last header last (nginx 1.23+).
    for v in values.iter().rev() {
        rc = walk(&mut addr, v, from, recursive);
        if !recursive {
            break;
        }
        if rc == Walk::Declined && found {
            rc = Walk::Done;
            break;
        }
        if rc != Walk::Ok {
            break;
        }
        found = true;
    }
    (rc != Walk::Declined).then_some(addr)
}

/// Run realip with the request's current settings unless it already applied.
pub fn run(rc: &ReqCtx) {
    let found = {
        let st = rc.st.borrow();
        if st.realip.is_some() || st.conf.realip.from.is_empty() {
            return;
        }
        resolve(rc, &st, &st.conf.realip)
    };
    if let Some(a) = found {
        rc.st.borrow_mut().realip = Some(a);
    }
}

fn resolve(rc: &ReqCtx, st: &ReqState, conf: &RealIpConf) -> Option<SocketAddr> {
    let name = match &conf.header {
        RealIpHeader::XRealIp => "x-real-ip",
        RealIpHeader::XForwardedFor => "x-forwarded-for",
        RealIpHeader::Other(h) => h.as_str(),
    };
    let mut all = st.headers.get_all(name).iter();
    let values: Vec<&str> = if conf.header == RealIpHeader::XForwardedFor {
        all.filter_map(|v| v.to_str().ok()).collect()
    } else {
        // nginx reads the first one of other headers.
        all.next()
            .and_then(|v| v.to_str().ok())
            .into_iter()
            .collect()
    };
    if values.is_empty() {
        return None;
    }
    forwarded_addr(rc.conn.remote, &values, &conf.from, conf.recursive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<AddrMatch> {
        list.iter()
            .map(|s| AddrMatch::Net(Cidr::parse(s).expect("cidr").0))
            .collect()
    }

    fn peer(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().expect("ip"), 5000)
    }

    fn ip(a: Option<SocketAddr>) -> Option<String> {
        a.map(|a| a.ip().to_string())
    }

    #[test]
    fn cidrs() {
        let (c, low) = Cidr::parse("192.168.1.7/24").expect("parse");
        assert!(low);
        assert!(c.contains("192.168.1.200".parse().expect("ip")));
        assert!(!c.contains("192.168.2.1".parse().expect("ip")));
        assert!(c.contains("::ffff:192.168.1.3".parse().expect("ip")));
        let (c, _) = Cidr::parse("2001:db8::/32").expect("parse");
        assert!(c.contains("2001:db8:1::5".parse().expect("ip")));
        assert!(!c.contains("10.0.0.1".parse().expect("ip")));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("10.0.0/8").is_none());
        assert!(Cidr::parse("0.0.0.0/0")
            .expect("all")
            .0
            .contains("8.8.8.8".parse().expect("ip")));
    }

    #[test]
    fn addr_port() {
        assert_eq!(
            parse_addr_port("1.2.3.4"),
            Some(peer("1.2.3.4")).map(|mut a| {
                a.set_port(0);
                a
            })
        );
        assert_eq!(
            parse_addr_port("[2001:db8::1]:8080").map(|a| a.port()),
            Some(8080)
        );
        assert_eq!(parse_addr_port("1.2.3.4:81").map(|a| a.port()), Some(81));
        assert!(parse_addr_port("unknown").is_none());
        assert!(parse_addr_port("1.2.3.4:x").is_none());
    }

    #[test]
    fn xff_walk() {
        let from = nets(&["127.0.0.1", "10.0.0.0/8"]);
        let p = peer("127.0.0.1");
        let v = ["6.6.6.6, 1.2.3.4, 10.0.0.5"];
        assert_eq!(
            ip(forwarded_addr(p, &v, &from, true)).as_deref(),
            Some("1.2.3.4")
        );
        assert_eq!(
            ip(forwarded_addr(p, &v, &from, false)).as_deref(),
            Some("10.0.0.5")
        );
        // All trusted: the leftmost.
        let v = ["10.1.1.1,10.0.0.5"];
        assert_eq!(
            ip(forwarded_addr(p, &v, &from, true)).as_deref(),
            Some("10.1.1.1")
        );
        // Untrusted peer: nothing.
        assert_eq!(forwarded_addr(peer("8.8.8.8"), &v, &from, true), None);
        // Garbage on the right: nothing; garbage further left: stop before it.
        assert_eq!(forwarded_addr(p, &["1.2.3.4, junk"], &from, true), None);
        let v = ["junk, 10.0.0.9"];
        assert_eq!(
            ip(forwarded_addr(p, &v, &from, true)).as_deref(),
            Some("10.0.0.9")
        );
        // Several headers: one list, the last header last.
        let v = ["1.1.1.1", "10.0.0.3"];
        assert_eq!(
            ip(forwarded_addr(p, &v, &from, true)).as_deref(),
            Some("1.1.1.1")
        );
        assert_eq!(
            ip(forwarded_addr(p, &v, &from, false)).as_deref(),
            Some("10.0.0.3")
        );
    }
}
