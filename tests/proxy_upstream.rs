//! proxy_pass to `upstream {}` blocks: the keep-alive pool (reuse ratio, keepalive_requests,
//! keepalive_timeout, no keepalive -> a connection per request), retries across servers, and
//! a variable target naming an upstream block.

mod common;
#[path = "support/origin.rs"]
mod origin;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use origin::*;

fn server(upstreams: &str, locations: &str) -> Server {
    Server::start(&http_conf(&format!(
        "{upstreams}
        server {{
            listen 127.0.0.1:PORT;
            server_name localhost;
            keepalive_requests 100000;
            {locations}
        }}"
    )))
}

/// `n` keep-alive GETs on one client connection; every status must be 200.
fn run(s: &Server, path: &str, n: usize) {
    let mut c = TcpStream::connect(s.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..n {
        c.write_all(format!("GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n", path).as_bytes())
            .unwrap();
        let r = read_response(&mut c).unwrap();
        assert_eq!(r.status, 200, "request {}: {}", i, s.error_log());
    }
}

#[test]
fn keepalive_pool_reuses_upstream_connections() {
    let o = Origin::echo();
    let s = server(
        &format!(
            "upstream backend {{ server 127.0.0.1:{}; keepalive 16; keepalive_requests 100000; }}",
            o.port()
        ),
        "location / { proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://backend; }",
    );
    let n = 3000;
    run(&s, "/", n);
    let conns = o.conns.load(Ordering::SeqCst);
    let reuse = 1.0 - conns as f64 / n as f64;
    assert!(reuse >= 0.999, "{} connections for {} requests", conns, n);
    assert_eq!(o.reqs().len(), n);
    assert!(o.last().header("connection").is_none());
}

#[test]
fn without_keepalive_every_request_has_its_own_connection() {
    let o = Origin::echo();
    let s = server(
        &format!("upstream backend {{ server 127.0.0.1:{}; }}", o.port()),
        "location / { proxy_http_version 1.1; proxy_pass http://backend; }",
    );
    run(&s, "/", 20);
    assert_eq!(o.conns.load(Ordering::SeqCst), 20);
    assert_eq!(o.last().header("connection"), Some("close"));
}

#[test]
fn keepalive_requests_and_timeout_bound_a_connection() {
    let o = Origin::echo();
    let s = server(
        &format!(
            "upstream backend {{ server 127.0.0.1:{}; keepalive 4; keepalive_requests 10; keepalive_timeout 1s; }}",
            o.port()
        ),
        "location / { proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://backend; }",
    );
    run(&s, "/", 100);
    let conns = o.conns.load(Ordering::SeqCst);
    assert!((10..=12).contains(&conns), "{} connections", conns);
    // Idle past keepalive_timeout: the next request needs a new connection.
    std::thread::sleep(Duration::from_millis(1600));
    run(&s, "/", 1);
    assert_eq!(o.conns.load(Ordering::SeqCst), conns + 1);
}

#[test]
fn retries_across_servers_and_variable_upstream_names() {
    let o = Origin::echo();
    let dead = free_port();
    let s = server(
        &format!(
            "upstream backend {{ server 127.0.0.1:{dead}; server 127.0.0.1:{}; }}",
            o.port()
        ),
        "location / {
            add_header X-Up \"$upstream_addr $upstream_status\" always;
            proxy_pass http://backend;
        }
        location /dyn {
            set $t backend;
            proxy_pass http://$t;
        }",
    );
    let mut two = 0;
    for _ in 0..4 {
        let r = s.get("/");
        assert_eq!(r.status, 200, "{}", s.error_log());
        let up = r.header("x-up").unwrap_or("");
        if up.contains(", ") {
            two += 1;
            assert_eq!(
                up,
                format!("127.0.0.1:{dead}, 127.0.0.1:{} 502, 200", o.port())
            );
        }
    }
    // The first failure marks the dead server down for fail_timeout (max_fails=1): at most
    // one request pays for it.
    assert!(two <= 1, "{}", two);
    assert_eq!(s.get("/dyn/x").status, 200);
    assert_eq!(o.last().target, "/dyn/x");
    assert_eq!(o.last().header("host"), Some("backend"));
}

#[test]
fn no_live_upstreams_is_502() {
    let s = server(
        &format!(
            "upstream backend {{ server 127.0.0.1:{}; server 127.0.0.1:{} down; }}",
            free_port(),
            free_port()
        ),
        "location / { proxy_pass http://backend; }",
    );
    assert_eq!(s.get("/").status, 502);
    assert_eq!(s.get("/").status, 502);
    assert!(
        s.error_log().contains("no live upstreams"),
        "{}",
        s.error_log()
    );
}

#[test]
fn balancer_by_lua_picks_the_peer_and_sees_failures() {
    let o = Origin::echo();
    let dead = free_port();
    let s = server(
        &format!(
            "upstream dyn {{
                server 0.0.0.1;
                balancer_by_lua_block {{
                    local b = require 'ngx.balancer'
                    local state = b.get_last_failure()
                    if not state then
                        b.set_more_tries(1)
                        assert(b.set_current_peer('127.0.0.1', {dead}))
                    else
                        ngx.ctx.failed = state
                        assert(b.set_current_peer('127.0.0.1', {}))
                    end
                }}
            }}",
            o.port()
        ),
        "location / {
            header_filter_by_lua_block { ngx.header['X-Failed'] = ngx.ctx.failed }
            proxy_pass http://dyn;
        }",
    );
    let r = s.get("/lua");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.header("x-failed"), Some("failed"));
    assert_eq!(o.last().target, "/lua");
}

#[test]
fn a_pooled_connection_closed_by_the_upstream_is_retried_fresh() {
    // Every connection answers its first request and drops the second without a word, as an
    // upstream whose idle timeout fires just as a request arrives.
    let o = Origin::start_raw(std::sync::Arc::new(|mut s: TcpStream, sh: &Shared| {
        let mut buf = Vec::new();
        if let Some(r) = read_request(&mut s, &mut buf) {
            if let Ok(mut v) = sh.requests.lock() {
                v.push(r);
            }
            respond(&mut s, 200, &[], b"first");
        }
        let _ = read_request(&mut s, &mut buf);
    }));
    let s = server(
        &format!(
            "upstream backend {{ server 127.0.0.1:{}; keepalive 4; }}",
            o.port()
        ),
        "location / { proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://backend; }",
    );
    run(&s, "/", 6);
    // Not one 502: each dropped request went again on a new connection.
    assert_eq!(o.reqs().len(), 6);
    assert!(!s.error_log().contains("[error]"), "{}", s.error_log());
}

/// A kept-alive connection is reusable the moment its response was read to the end: a request
/// arriving before the old connection's bookkeeping ran must not open another one. Sequential
/// requests ride one connection; concurrent clients need no more connections than requests in
/// flight, with small bodies and with bodies that take many reads; a client leaving
/// mid-response does not cost the connection.
#[test]
fn keepalive_connections_survive_quick_reuse_and_client_aborts() {
    let big = vec![b'x'; 200 * 1024];
    let o = Origin::start(move |r, s| {
        if r.target == "/slow" {
            // Half the body, a pause in which the client gives up, then the rest.
            let _ = s.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", big.len()).as_bytes(),
            );
            let _ = s.write_all(&big[..big.len() / 2]);
            std::thread::sleep(Duration::from_millis(300));
            let _ = s.write_all(&big[big.len() / 2..]);
            return keep(r);
        }
        let body: &[u8] = if r.target == "/big" { &big } else { b"small" };
        respond(s, 200, &[("Content-Type", "text/plain")], body);
        keep(r)
    });
    let s = server(
        &format!(
            "upstream backend {{ server 127.0.0.1:{}; keepalive 16; keepalive_requests 100000; }}",
            o.port()
        ),
        "location / { proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://backend; }
        location /twice {
            content_by_lua_block {
                for _, p in ipairs({ \"/\", \"/\", \"/big\", \"/big\", \"/\" }) do
                    local r = ngx.location.capture(p)
                    if r.status ~= 200 then ngx.exit(502) end
                end
                ngx.say(\"ok\")
            }
        }",
    );
    run(&s, "/", 200);
    run(&s, "/big", 50);
    // Back-to-back subrequests: the next one starts before anything else ran on the worker.
    run(&s, "/twice", 20);
    assert_eq!(o.conns.load(Ordering::SeqCst), 1, "sequential requests");
    // Clients that leave mid-response: the rest of the body is read and the connection kept,
    // as nginx has the whole response in its buffers by then.
    for _ in 0..3 {
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 100];
        c.read_exact(&mut first).unwrap();
        drop(c);
        std::thread::sleep(Duration::from_millis(500));
        run(&s, "/", 1);
    }
    assert_eq!(o.conns.load(Ordering::SeqCst), 1, "after clients went away");
    let clients = 8;
    for (burst, path) in ["/", "/big", "/", "/big"].iter().enumerate() {
        std::thread::scope(|sc| {
            for _ in 0..clients {
                sc.spawn(|| run(&s, path, 60));
            }
        });
        let conns = o.conns.load(Ordering::SeqCst);
        assert!(
            conns <= clients,
            "burst {} ({}): {} upstream connections for {} concurrent clients",
            burst,
            path,
            conns,
            clients
        );
    }
    assert_eq!(o.reqs().len(), 356 + 4 * clients * 60);
}

/// The upstream HTTP/1 codec: chunked bodies (trailers dropped) keep the connection, a
/// `Connection: close` answer or a body until close does not, and a head past the limit is a
/// 502 with nginx's log line.
#[test]
fn response_framing_decides_reuse() {
    let o = Origin::start(|r, s| {
        let raw: &[u8] = match r.target.as_str() {
            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
            "/close" => b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            "/eof" => b"HTTP/1.0 200 OK\r\n\r\nuntil-close",
            // Keep-alive by its framing, then closed while idle in the pool.
            "/dropped" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            _ => {
                let big = "x".repeat(70 * 1024);
                let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n", big).as_bytes());
                return Next::Close;
            }
        };
        let _ = s.write_all(raw);
        if r.target == "/chunked" {
            keep(r)
        } else {
            Next::Close
        }
    });
    let s = server(
        &format!(
            "upstream backend {{ server 127.0.0.1:{}; keepalive 4; }}",
            o.port()
        ),
        "location / { proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://backend; }",
    );
    let conns = || o.conns.load(Ordering::SeqCst);
    for _ in 0..5 {
        let r = s.get("/chunked");
        assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
    }
    assert_eq!(conns(), 1);
    for _ in 0..2 {
        let r = s.get("/close");
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    }
    assert_eq!(
        conns(),
        2,
        "the first reused the idle one, the second opened one"
    );
    let r = s.get("/eof");
    assert_eq!((r.status, r.text().as_str()), (200, "until-close"));
    assert_eq!(s.get("/chunked").status, 200);
    assert_eq!(conns(), 4);
    assert_eq!(s.get("/dropped").status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let r = s.get("/chunked");
    assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
    assert_eq!(
        conns(),
        5,
        "the pooled connection the upstream closed is not used"
    );
    assert_eq!(s.get("/huge").status, 502);
    let log = wait_log(&s, "upstream sent too big header");
    assert!(
        log.contains("upstream sent too big header while reading response header from upstream"),
        "{}",
        log
    );
}

#[test]
fn a_status_below_100_is_an_invalid_upstream_response() {
    let o = Origin::start(|_r, s| {
        let _ = s.write_all(b"HTTP/1.1 042 Odd\r\nContent-Length: 2\r\n\r\nok");
        Next::Close
    });
    let s = server(
        &format!("upstream backend {{ server 127.0.0.1:{}; }}", o.port()),
        "location / { proxy_pass http://backend; }",
    );
    assert_eq!(s.get("/").status, 502);
    assert!(s
        .error_log()
        .contains("upstream sent invalid header while reading response header from upstream"));
}

#[test]
fn a_chunked_body_to_an_http10_upstream_is_buffered_and_sent_with_its_length() {
    // nginx buffers such a body whatever proxy_request_buffering says: HTTP/1.0 has no
    // chunked encoding, so the length must be known first.
    let o = Origin::echo();
    let s = server(
        &format!("upstream backend {{ server 127.0.0.1:{}; }}", o.port()),
        "location / { proxy_http_version 1.0; proxy_request_buffering off; proxy_pass http://backend; }",
    );
    let r = s.request_bytes(
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", s.error_log());
    let req = o.last();
    assert_eq!(req.body, b"hello world");
    assert_eq!(req.header("content-length"), Some("11"));
    assert!(!req.has("transfer-encoding"));
}

#[test]
fn content_length_with_transfer_encoding_from_upstream_is_a_502() {
    let o = Origin::start(|_r, s| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        );
        Next::Close
    });
    let s = server(
        &format!("upstream backend {{ server 127.0.0.1:{}; }}", o.port()),
        "location / { proxy_pass http://backend; }",
    );
    assert_eq!(s.get("/").status, 502);
    assert!(s.error_log().contains(
        "upstream sent \"Content-Length\" and \"Transfer-Encoding\" headers at the same time"
    ));
}
