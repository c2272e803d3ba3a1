//! nginx's `resolver`: a small DNS client over UDP (A and AAAA queries) with a cache shared by
//! every worker. Entries live for `valid=` when given, else for the smallest TTL of the answer,
//! as nginx's resolver does. With no resolver configured, [`resolve`] falls back to the system
//! resolver (`getaddrinfo` on tokio's blocking pool): OpenResty would refuse with "no resolver
//! defined", tidegate does the useful thing instead.
//!
//! ```ignore
//! let addrs = net::resolve(conf.resolver.as_ref(), "db.internal", 5432).await?;
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

/// Cached answers are capped so a Lua loop over random names cannot grow the cache forever.
const CACHE_MAX: usize = 4096;
/// nginx's default `resolver_timeout`.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// How long a "host not found" answer is kept when `valid=` is not set.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How deep a CNAME chain is followed before giving up.
const MAX_CNAME: usize = 8;

/// One configured `resolver` (plus its `resolver_timeout`). Clones made by
/// [`Resolver::with_timeout`] share the cache.
#[derive(Debug)]
pub struct Resolver {
    pub servers: Vec<SocketAddr>,
    /// `valid=`: overrides the answer's TTL.
    pub valid: Option<Duration>,
    /// `ipv6=on|off` (nginx's default is on: AAAA is asked as well).
    pub ipv6: bool,
    pub timeout: Duration,
    cache: Arc<Cache>,
    next: AtomicUsize,
}

#[derive(Debug, Default)]
struct Cache {
    map: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    addrs: Vec<IpAddr>,
    expires: Instant,
}

impl Resolver {
    /// Parse the arguments of `resolver address ... [valid=time] [ipv6=on|off]`. Addresses are IP
    /// literals with an optional port (`[v6]:port`) or names resolved once at load, as nginx does.
    pub fn parse(args: &[String]) -> Result<Resolver, String> {
        let mut servers = Vec::new();
        let mut valid = None;
        let mut ipv6 = true;
        for a in args {
            if let Some(v) = a.strip_prefix("valid=") {
                let ms = crate::conf::values::parse_time_ms(v)
                    .ok_or_else(|| format!("invalid parameter \"{}\"", a))?;
                valid = Some(Duration::from_millis(ms));
            } else if let Some(v) = a.strip_prefix("ipv6=") {
                ipv6 = match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("invalid parameter \"{}\"", a)),
                };
            } else if a.starts_with("status_zone=") || a.starts_with("ipv4=") {
                // Accepted for compatibility (ipv4=off alone makes no sense here).
            } else {
                servers.extend(parse_server(a)?);
            }
        }
        if servers.is_empty() {
            return Err("no name servers defined".to_string());
        }
        Ok(Resolver {
            servers,
            valid,
            ipv6,
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS),
            cache: Arc::new(Cache::default()),
            next: AtomicUsize::new(0),
        })
    }

    /// The same resolver (and cache) with another `resolver_timeout`.
    pub fn with_timeout(&self, timeout_ms: u64) -> Resolver {
        Resolver {
            servers: self.servers.clone(),
            valid: self.valid,
            ipv6: self.ipv6,
            timeout: Duration::from_millis(timeout_ms),
            cache: self.cache.clone(),
            next: AtomicUsize::new(0),
        }
    }

    /// A cached, still valid answer.
    pub fn cached(&self, host: &str) -> Option<Vec<IpAddr>> {
        self.entry(host).filter(|a| !a.is_empty())
    }

    /// A still valid cache entry; empty means "known not to exist" (a cached NXDOMAIN).
    fn entry(&self, host: &str) -> Option<Vec<IpAddr>> {
        let key = host.to_ascii_lowercase();
        let map = self.cache.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key)
            .filter(|e| e.expires > Instant::now())
            .map(|e| e.addrs.clone())
    }

    fn store(&self, host: &str, addrs: &[IpAddr], ttl: Duration) {
        let mut map = self.cache.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if map.len() >= CACHE_MAX {
            map.retain(|_, e| e.expires > now);
            if map.len() >= CACHE_MAX {
                if let Some(k) = map.keys().next().cloned() {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            host.to_ascii_lowercase(),
            Entry {
                addrs: addrs.to_vec(),
                expires: now + ttl,
            },
        );
    }

    /// Addresses of `host` (IPv4 first), from the cache or the name servers. Errors are
    /// nginx's: `"<host> could not be resolved (3: Host not found)"`.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let not_found = || format!("{} could not be resolved (3: Host not found)", host);
        if let Some(a) = self.entry(host) {
            return if a.is_empty() {
                Err(not_found())
            } else {
                Ok(a)
            };
        }
        let deadline = Instant::now() + self.timeout;
        let mut name = host.to_string();
        for _ in 0..MAX_CNAME {
            let ans = match self.query_all(&name, deadline).await {
                Ok(a) => a,
                Err(3) => break,
                Err(code) => {
                    return Err(format!(
                        "{} could not be resolved ({})",
                        host,
                        rcode_text(code)
                    ))
                }
            };
            if !ans.addrs.is_empty() {
                let ttl = self
                    .valid
                    .unwrap_or(Duration::from_secs(ans.ttl.max(1) as u64));
                self.store(host, &ans.addrs, ttl);
                return Ok(ans.addrs);
            }
            match ans.cname {
                Some(c) => name = c,
                None => break,
            }
        }
        // Names that do not exist are remembered too (for `valid=`, else a few seconds), so a
        // typo in a hot path does not send a query per request.
        self.store(host, &[], self.valid.unwrap_or(NEGATIVE_TTL));
        Err(not_found())
    }

    /// Ask A (and AAAA) for `name`, trying the servers in turn until the deadline.
    async fn query_all(&self, name: &str, deadline: Instant) -> Result<Answer, u16> {
        let n = self.servers.len().max(1);
        let mut last = RCODE_TIMEOUT;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(last);
            }
            let remaining = deadline - now;
            // Each server gets a slice of the time, at least a second, as nginx resends.
            let slice = (self.timeout / n as u32)
                .max(Duration::from_secs(1))
                .min(remaining);
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            let server = self.servers[i];
            match tokio::time::timeout(slice, query(server, name, self.ipv6)).await {
                Ok(Ok(a)) => return Ok(a),
                // Authoritative "no such host" ends the search; a broken server does not.
                Ok(Err(3)) => return Err(3),
                Ok(Err(code)) => last = code,
                Err(_) => last = RCODE_TIMEOUT,
            }
        }
    }
}

/// What one server said about a name.
#[derive(Debug, Default)]
struct Answer {
    addrs: Vec<IpAddr>,
    ttl: u32,
    cname: Option<String>,
}

/// Stand-in rcode for "no answer in time" (nginx prints errno 110).
const RCODE_TIMEOUT: u16 = 110;
/// Stand-in rcode for a local socket error.
const RCODE_IO: u16 = 111;

fn rcode_text(code: u16) -> &'static str {
    match code {
        1 => "1: Format error",
        2 => "2: Server failure",
        3 => "3: Host not found",
        4 => "4: Unimplemented",
        5 => "5: Operation refused",
        RCODE_TIMEOUT => "110: Operation timed out",
        RCODE_IO => "111: Connection refused",
        _ => "2: Server failure",
    }
}

fn parse_server(a: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = a.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, 53)]);
    }
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return Ok(vec![sa]);
    }
    if let Some(inner) = a.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        if let Ok(ip) = inner.parse::<Ipv6Addr>() {
            return Ok(vec![SocketAddr::new(IpAddr::V6(ip), 53)]);
        }
    }
    let (host, port) = match a.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("invalid port in resolver \"{}\"", a))?,
        ),
        None => (a, 53),
    };
    let v: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|_| format!("host not found in resolver \"{}\"", a))?
        .collect();
    if v.is_empty() {
        return Err(format!("host not found in resolver \"{}\"", a));
    }
    Ok(v)
}

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;

/// One round trip to one server: A and (when asked) AAAA in parallel on one socket.
async fn query(server: SocketAddr, name: &str, ipv6: bool) -> Result<Answer, u16> {
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.map_err(|_| RCODE_IO)?;
    sock.connect(server).await.map_err(|_| RCODE_IO)?;
    let mut pending: Vec<(u16, u16)> = Vec::new();
    let types: &[u16] = if ipv6 {
        &[TYPE_A, TYPE_AAAA]
    } else {
        &[TYPE_A]
    };
    for &t in types {
        let id: u16 = rand::random();
        let q = encode_query(id, name, t).ok_or(1u16)?;
        sock.send(&q).await.map_err(|_| RCODE_IO)?;
        pending.push((id, t));
    }
    let mut ans = Answer {
        ttl: u32::MAX,
        ..Default::default()
    };
    let mut v6 = Vec::new();
    let mut worst: Option<u16> = None;
    let mut buf = vec![0u8; 4096];
    while !pending.is_empty() {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            // ICMP port unreachable shows up as ECONNREFUSED on a connected UDP socket.
            Err(_) => return Err(RCODE_IO),
        };
        let Some(resp) = parse_response(&buf[..n]) else {
            continue;
        };
        let Some(pos) = pending
            .iter()
            .position(|(id, t)| *id == resp.id && *t == resp.qtype)
        else {
            continue;
        };
        pending.swap_remove(pos);
        if resp.rcode != 0 {
            worst = Some(match worst {
                Some(3) | None => resp.rcode,
                Some(w) => w,
            });
            continue;
        }
        for (ip, ttl) in resp.addrs {
            ans.ttl = ans.ttl.min(ttl);
            match ip {
                IpAddr::V4(_) => ans.addrs.push(ip),
                IpAddr::V6(_) => v6.push(ip),
            }
        }
        if ans.cname.is_none() {
            ans.cname = resp.cname;
        }
    }
    ans.addrs.extend(v6);
    if ans.addrs.is_empty() && ans.cname.is_none() {
        if let Some(code) = worst {
            return Err(code);
        }
    }
    if ans.ttl == u32::MAX {
        ans.ttl = 0;
    }
    Ok(ans)
}

/// A standard recursive query for one name and type.
fn encode_query(id: u16, name: &str, qtype: u16) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    Some(q)
}

struct Response {
    id: u16,
    rcode: u16,
    qtype: u16,
    addrs: Vec<(IpAddr, u32)>,
    cname: Option<String>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Read a (possibly compressed) name at `at`; returns it and the offset after it.
fn read_name(b: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut end = None;
    for _ in 0..64 {
        let len = *b.get(at)? as usize;
        if len & 0xc0 == 0xc0 {
            let ptr = (be16(b, at)? & 0x3fff) as usize;
            end.get_or_insert(at + 2);
            at = ptr;
            continue;
        }
        if len == 0 {
            return Some((name, end.unwrap_or(at + 1)));
        }
        let label = b.get(at + 1..at + 1 + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(&String::from_utf8_lossy(label));
        at += 1 + len;
    }
    None
}

fn parse_response(b: &[u8]) -> Option<Response> {
    let id = be16(b, 0)?;
    let flags = be16(b, 2)?;
    if flags & 0x8000 == 0 {
        return None;
    }
    let qd = be16(b, 4)?;
    let an = be16(b, 6)?;
    let mut at = 12;
    let mut qtype = 0;
    for _ in 0..qd {
        let (_, next) = read_name(b, at)?;
        qtype = be16(b, next)?;
        at = next + 4;
    }
    let mut r = Response {
        id,
        rcode: flags & 0x000f,
        qtype,
        addrs: Vec::new(),
        cname: None,
    };
    for _ in 0..an {
        let (_, next) = read_name(b, at)?;
        let t = be16(b, next)?;
        let ttl = u32::from_be_bytes(b.get(next + 4..next + 8)?.try_into().ok()?);
        let len = be16(b, next + 8)? as usize;
        let data_at = next + 10;
        let data = b.get(data_at..data_at + len)?;
        match t {
            TYPE_A if len == 4 => {
                let ip = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
                r.addrs.push((IpAddr::V4(ip), ttl));
            }
            TYPE_AAAA if len == 16 => {
                let o: [u8; 16] = data.try_into().ok()?;
                r.addrs.push((IpAddr::V6(Ipv6Addr::from(o)), ttl));
            }
            TYPE_CNAME => {
                if let Some((c, _)) = read_name(b, data_at) {
                    r.cname.get_or_insert(c);
                }
            }
            _ => {}
        }
        at = data_at + len;
    }
    Some(r)
}

/// Addresses for `host:port`. IP literals return at once; with a resolver, its cache and name
/// servers answer; without one, the system resolver. Errors are nginx's words.
pub async fn resolve(
    r: Option<&Arc<Resolver>>,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, String> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if host.is_empty() {
        return Err(" could not be resolved (3: Host not found)".to_string());
    }
    match r {
        Some(r) => Ok(r
            .lookup(host)
            .await?
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect()),
        None => {
            let not_found = || format!("{} could not be resolved (3: Host not found)", host);
            let v: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
                .await
                .map_err(|_| not_found())?
                .collect();
            if v.is_empty() {
                return Err(not_found());
            }
            Ok(v)
        }
    }
}

/// Test helpers: a DNS responder answering A queries from a fixed table (used by the unit
/// tests here and by integration tests through the same wire format).
pub mod testing {
    use std::net::Ipv4Addr;

    /// The reply to `query` with the given A records (empty: NXDOMAIN), `ttl` seconds each.
    /// AAAA and other types get an empty NOERROR answer.
    pub fn answer(query: &[u8], records: &[Ipv4Addr], ttl: u32) -> Option<Vec<u8>> {
        let (_, qend) = super::read_name(query, 12)?;
        let qtype = super::be16(query, qend)?;
        let qlen = qend + 4;
        let mut r = query.get(..qlen)?.to_vec();
        let nx = records.is_empty();
        r[2] = 0x81;
        r[3] = if nx { 0x83 } else { 0x80 };
        let an: u16 = if qtype == super::TYPE_A {
            records.len() as u16
        } else {
            0
        };
        r[6..8].copy_from_slice(&an.to_be_bytes());
        r[8..12].copy_from_slice(&[0, 0, 0, 0]);
        if qtype == super::TYPE_A {
            for ip in records {
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
                r.extend_from_slice(&ttl.to_be_bytes());
                r.extend_from_slice(&[0, 4]);
                r.extend_from_slice(&ip.octets());
            }
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A UDP responder on 127.0.0.1:0: `a.test` -> 10.0.0.1 and 10.0.0.2 (ttl 60), else NXDOMAIN.
    async fn responder() -> (SocketAddr, Arc<AtomicUsize>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                c.fetch_add(1, Ordering::SeqCst);
                let (name, _) = read_name(&buf[..n], 12).unwrap();
                let recs: Vec<Ipv4Addr> = if name == "a.test" {
                    vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
                } else {
                    vec![]
                };
                let r = testing::answer(&buf[..n], &recs, 60).unwrap();
                let _ = sock.send_to(&r, from).await;
            }
        });
        (addr, count)
    }

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn resolves_and_caches() {
        let (addr, count) = responder().await;
        let r = Resolver::parse(&args(&[&addr.to_string(), "valid=1s", "ipv6=off"])).unwrap();
        let r = Arc::new(r.with_timeout(2000));
        let a = resolve(Some(&r), "a.test", 80).await.unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], "10.0.0.1:80".parse().unwrap());
        let before = count.load(Ordering::SeqCst);
        assert_eq!(before, 1);
        resolve(Some(&r), "A.TEST", 81).await.unwrap();
        assert_eq!(
            count.load(Ordering::SeqCst),
            before,
            "second lookup is cached"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        resolve(Some(&r), "a.test", 80).await.unwrap();
        assert_eq!(count.load(Ordering::SeqCst), before + 1, "valid= expired");
    }

    #[tokio::test]
    async fn nxdomain_and_timeout_use_nginx_words() {
        let (addr, count) = responder().await;
        let r = Arc::new(Resolver::parse(&args(&[&addr.to_string()])).unwrap());
        let e = resolve(Some(&r), "b.test", 80).await.unwrap_err();
        assert_eq!(e, "b.test could not be resolved (3: Host not found)");
        let asked = count.load(Ordering::SeqCst);
        let e = resolve(Some(&r), "b.test", 80).await.unwrap_err();
        assert_eq!(e, "b.test could not be resolved (3: Host not found)");
        assert_eq!(count.load(Ordering::SeqCst), asked, "NXDOMAIN is cached");
        // A server that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let r = Resolver::parse(&args(&[&silent.local_addr().unwrap().to_string()])).unwrap();
        let r = Arc::new(r.with_timeout(300));
        let t = Instant::now();
        let e = resolve(Some(&r), "c.test", 80).await.unwrap_err();
        assert_eq!(e, "c.test could not be resolved (110: Operation timed out)");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn literals_and_system() {
        let a = resolve(None, "127.0.0.1", 5).await.unwrap();
        assert_eq!(a, vec!["127.0.0.1:5".parse().unwrap()]);
        let a = resolve(None, "[::1]", 5).await.unwrap();
        assert_eq!(a, vec!["[::1]:5".parse().unwrap()]);
        let a = resolve(None, "localhost", 5).await.unwrap();
        assert!(a.iter().all(|s| s.ip().is_loopback()));
    }

    #[test]
    fn parse_args() {
        let r =
            Resolver::parse(&args(&["127.0.0.1:5353", "[::1]", "valid=30s", "ipv6=off"])).unwrap();
        assert_eq!(r.servers.len(), 2);
        assert_eq!(r.servers[1], "[::1]:53".parse().unwrap());
        assert_eq!(r.valid, Some(Duration::from_secs(30)));
        assert!(!r.ipv6);
        assert!(Resolver::parse(&args(&["1.2.3.4", "ipv6=maybe"])).is_err());
    }

    #[test]
    fn cname_and_compression() {
        // Hand-made answer: www.x -> CNAME x (compressed), then A 1.2.3.4.
        let q = encode_query(7, "www.x", TYPE_A).unwrap();
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2;
        r.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 9, 0, 2, 0xc0, 16]);
        r.extend_from_slice(&[0xc0, 16, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4]);
        let p = parse_response(&r).unwrap();
        assert_eq!(p.id, 7);
        assert_eq!(p.cname.as_deref(), Some("x"));
        assert_eq!(p.addrs, vec![(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)), 5)]);
    }
}
