//! Test upstreams: raw TCP HTTP/1.1 servers on 127.0.0.1:0, each connection on a thread, with
//! a handler that writes whatever response (or misbehaviour) a test needs. They count the
//! connections they accept and record every request they parse.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request as the origin parsed it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunked: bool,
}

impl Req {
    pub fn header(&self, n: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    }
    pub fn has(&self, n: &str) -> bool {
        self.header(n).is_some()
    }
}

/// What the handler wants done with the connection afterwards.
pub enum Next {
    KeepAlive,
    Close,
}

pub type Handler = Arc<dyn Fn(&Req, &mut TcpStream) -> Next + Send + Sync>;
/// A whole-connection function.
pub type ConnFn = Arc<dyn Fn(TcpStream, &Shared) + Send + Sync>;

pub struct Origin {
    pub addr: SocketAddr,
    pub conns: Arc<AtomicUsize>,
    pub requests: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
}

impl Origin {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    pub fn reqs(&self) -> Vec<Req> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
    pub fn last(&self) -> Req {
        self.reqs().pop().expect("origin saw no request")
    }

    /// Start with a handler.
    pub fn start(h: impl Fn(&Req, &mut TcpStream) -> Next + Send + Sync + 'static) -> Origin {
        Origin::start_raw(Arc::new(move |s: TcpStream, o: &Shared| serve(s, o, &h)))
    }

    /// Start with a per-connection function (for servers that must not even parse).
    pub fn start_raw(f: ConnFn) -> Origin {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind origin");
        let addr = l.local_addr().expect("addr");
        let shared = Shared {
            conns: Arc::new(AtomicUsize::new(0)),
            requests: Arc::new(Mutex::new(Vec::new())),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let o = Origin {
            addr,
            conns: shared.conns.clone(),
            requests: shared.requests.clone(),
            stop: stop.clone(),
        };
        std::thread::spawn(move || {
            for s in l.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(s) = s else { continue };
                let _ = s.set_nodelay(true);
                shared.conns.fetch_add(1, Ordering::SeqCst);
                let f = f.clone();
                let sh = shared.clone();
                std::thread::spawn(move || f(s, &sh));
            }
        });
        o
    }

    /// Echo: 200 with a text body describing the request (method, target, headers, body).
    pub fn echo() -> Origin {
        Origin::start(|r, s| {
            let mut b = format!("{} {} {}\n", r.method, r.target, r.version);
            for (k, v) in &r.headers {
                b.push_str(&format!("{}: {}\n", k.to_ascii_lowercase(), v));
            }
            b.push('\n');
            let mut body = b.into_bytes();
            body.extend_from_slice(&r.body);
            respond(s, 200, &[("Content-Type", "text/plain")], &body);
            keep(r)
        })
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// What connection threads share.
#[derive(Clone)]
pub struct Shared {
    pub conns: Arc<AtomicUsize>,
    pub requests: Arc<Mutex<Vec<Req>>>,
}

/// Keep-alive unless the request asked to close or is HTTP/1.0 without keep-alive.
pub fn keep(r: &Req) -> Next {
    let c = r.header("connection").unwrap_or("").to_ascii_lowercase();
    if c.contains("close") || (r.version == "HTTP/1.0" && !c.contains("keep-alive")) {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

/// Write a full response with Content-Length.
pub fn respond(s: &mut TcpStream, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let mut h = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\n",
        status,
        body.len()
    );
    for (k, v) in headers {
        h.push_str(&format!("{}: {}\r\n", k, v));
    }
    h.push_str("\r\n");
    let mut all = h.into_bytes();
    all.extend_from_slice(body);
    let _ = s.write_all(&all);
}

fn serve(mut s: TcpStream, o: &Shared, h: &dyn Fn(&Req, &mut TcpStream) -> Next) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    loop {
        let Some(r) = read_request(&mut s, &mut buf) else {
            return;
        };
        if let Ok(mut v) = o.requests.lock() {
            v.push(r.clone());
        }
        match h(&r, &mut s) {
            Next::KeepAlive => continue,
            Next::Close => return,
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut tmp = [0u8; 16384];
    match s.read(&mut tmp) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
    }
}

/// Parse one request from the stream (`buf` keeps bytes of the next one).
pub fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Req> {
    let end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p;
        }
        if !fill(s, buf) {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 4);
    let mut lines = head.split("\r\n");
    let mut rl = lines.next()?.split(' ');
    let method = rl.next()?.to_string();
    let target = rl.next()?.to_string();
    let version = rl.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut r = Req {
        method,
        target,
        version,
        headers,
        body: Vec::new(),
        chunked: false,
    };
    if r.header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        r.chunked = true;
        loop {
            while find(buf, b"\r\n").is_none() {
                if !fill(s, buf) {
                    return Some(r);
                }
            }
            let le = find(buf, b"\r\n")?;
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&buf[..le])
                    .split(';')
                    .next()?
                    .trim(),
                16,
            )
            .ok()?;
            buf.drain(..le + 2);
            while buf.len() < size + 2 {
                if !fill(s, buf) {
                    return Some(r);
                }
            }
            r.body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = r
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        if r.header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        while buf.len() < n {
            if !fill(s, buf) {
                return Some(r);
            }
        }
        r.body = buf.drain(..n).collect();
    }
    Some(r)
}

/// Read until the peer closes (bounded by the stream's read timeout).
pub fn drain(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut tmp = [0u8; 8192];
    while let Ok(n) = s.read(&mut tmp) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&tmp[..n]);
    }
    out
}
