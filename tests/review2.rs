//! Second review of the server-side performance work (8aaa717..wt-server): the spare output
//! buffer pool, the header filter's entry(), client_max_body_size from the size hint, the
//! client socket's write tracking.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn start(locations: &str) -> Server {
    Server::start(&conf(locations))
}

fn conf(locations: &str) -> String {
    http_conf(&format!(
        "server {{\n listen 127.0.0.1:PORT;\n server_name localhost;\n{}\n}}",
        locations
    ))
}

/// A server whose allocator gives freed memory back at once, so that RSS shows what is
/// still referenced.
fn start_eager_purge(locations: &str) -> Server {
    let port = free_port();
    let c = conf(locations).replace("PORT", &port.to_string());
    let prefix = prefix_with(&[("conf/nginx.conf", c.as_str())], port);
    Server::start_prefix(
        prefix,
        port,
        &[
            ("MIMALLOC_PURGE_DELAY", "0"),
            ("MIMALLOC_ARENA_PURGE_MULT", "0"),
        ],
    )
}

fn rss_kb(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/status", pid)).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `n` clients at once, each reading its whole response.
fn burst(s: &Server, path: &str, n: usize) {
    let addr = s.addr();
    let path = path.to_string();
    let hs: Vec<_> = (0..n)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                write!(
                    c,
                    "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                    path
                )
                .unwrap();
                let mut v = Vec::new();
                let _ = c.read_to_end(&mut v);
                v.len()
            })
        })
        .collect();
    for h in hs {
        let n = h.join().unwrap();
        assert!(
            n > 1_960_000,
            "short response: {} bytes\n{}",
            n,
            s.error_log()
        );
    }
}

/// The RSS after the burst has settled (small requests in between, bounded wait).
fn settled_rss(s: &Server) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut r = rss_kb(s.pid());
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(s.get("/small").status, 200);
        r = rss_kb(s.pid());
    }
    r
}

/// A flushed output buffer must not leave a rest that shares its allocation in the
/// spare-output pool: such a rest (`BytesMut::capacity()` = the room left, not the
/// allocation) under the 16 KB cap would keep the whole ~2 MB alive for good. 40 requests that
/// buffered ~2 MB and flushed with 10,000 bytes of room left must give their memory back like
/// the same requests with 30,000 bytes left (over the cap).
#[test]
fn a_flushed_buffer_leaves_nothing_pinned_in_the_spare_pool() {
    let s = start_eager_purge(
        r#"
location /big { content_by_lua_block {
    local room = tonumber(ngx.var.arg_room)
    ngx.print(string.rep("x", 1000000))     -- capacity 1,000,000 exactly
    ngx.print("x")                          -- doubles to 2,000,000
    ngx.print(string.rep("y", 1000000 - 1 - room))
    ngx.flush(true)
    ngx.sleep(0.3)                          -- all requests alive at once: one buffer each
} }
location /small { content_by_lua_block { ngx.say("ok") } }
"#,
    );
    assert_eq!(s.get("/small").status, 200);
    burst(&s, "/big?room=30000", 4);
    let base = settled_rss(&s);
    // Control: room over the 16 KB cap, nothing pooled.
    burst(&s, "/big?room=30000", 40);
    let control = settled_rss(&s);
    // Room under the cap: each request's remainder goes to the pool with its 2 MB.
    burst(&s, "/big?room=10000", 40);
    let pooled = settled_rss(&s);
    eprintln!(
        "rss kB: base {} control {} (+{}) pooled {} (+{})",
        base,
        control,
        control.saturating_sub(base),
        pooled,
        pooled.saturating_sub(base)
    );
    assert!(
        control.saturating_sub(base) < 40_000,
        "inconclusive: the allocator kept the control burst's memory (base {} control {})",
        base,
        control
    );
    assert!(
        pooled.saturating_sub(base) < 40_000,
        "spare output pool keeps ~2 MB allocations behind 10 KB buffers: rss base {} kB, \
         after the burst {} kB",
        base,
        pooled
    );
}

/// A streamed response (ngx.flush per MB) read slowly for about three keepalive timeouts
/// arrives whole: the socket wrapper reads the clock only after a stalled write, which must
/// still move the keepalive deadline for every bit of progress after the last frame.
#[test]
fn a_slow_streamed_download_outlives_keepalive_timeout() {
    let s = Server::start(&http_conf(
        "keepalive_timeout 1s;\nserver {\n listen 127.0.0.1:PORT;\n server_name localhost;\n\
         location = /big { content_by_lua_block {\n\
           local mb = string.rep('a', 1024 * 1024)\n\
           for i = 1, 8 do ngx.print(mb) ngx.flush(true) end\n\
         } }\n}",
    ));
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Two pipelined requests: the second answer must follow the first on the same socket.
    c.write_all(
        b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\nGET /big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let t0 = Instant::now();
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while t0.elapsed() < Duration::from_secs(30) {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
        // ~2.5 MB/s for the first response: about three timeouts.
        if all.len() < 8 * 1024 * 1024 {
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    let payload = all.iter().filter(|&&b| b == b'a').count();
    assert!(
        payload >= 16 * 1024 * 1024,
        "cut after {:?}: {} body bytes of 16 MB",
        t0.elapsed(),
        payload
    );
    assert!(
        t0.elapsed() > Duration::from_millis(1500),
        "read too fast to test"
    );
}

/// Content-Type and Server set by Lua are kept; defaults fill only what is missing; 204
/// and 304 get no Content-Type; HEAD gets the GET's length without a body.
#[test]
fn header_defaults_only_fill_gaps() {
    let s = start(
        r#"
location /ct { content_by_lua_block { ngx.header["Content-Type"] = "text/x-lua"; ngx.header["Server"] = "mine"; ngx.say("hi") } }
location /dflt { content_by_lua_block { ngx.say("hi") } }
location /204 { content_by_lua_block { ngx.status = 204 } }
location /304 { content_by_lua_block { ngx.status = 304 } }
"#,
    );
    let r = s.get("/ct");
    assert_eq!(r.header("content-type"), Some("text/x-lua"));
    assert_eq!(r.header("server"), Some("mine"));
    assert_eq!(r.headers_all("server").len(), 1);
    let r = s.get("/dflt");
    assert!(r.header("content-type").is_some());
    assert!(r.header("server").unwrap_or("").starts_with("tidegate"));
    for p in ["/204", "/304"] {
        let r = s.get(p);
        assert_eq!(r.header("content-type"), None, "{}: {:?}", p, r.headers);
        assert_eq!(r.body.len(), 0, "{}", p);
    }
    let h = s.request("HEAD /dflt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some("3"), "{:?}", h.headers);
    assert_eq!(h.body.len(), 0);
}
