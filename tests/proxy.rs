//! proxy_pass end to end: the real binary in front of test origins on 127.0.0.1:0 (echoing,
//! refusing, resetting, stalling, sending garbage, streaming slowly).

mod common;
#[path = "support/origin.rs"]
mod origin;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use origin::*;

fn server(body: &str) -> Server {
    Server::start(&http_conf(&format!(
        "server {{\n listen 127.0.0.1:PORT;\n server_name localhost;\n{}\n}}",
        body
    )))
}

fn connect(s: &Server) -> TcpStream {
    let c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c
}

#[test]
fn passes_request_with_nginx_defaults() {
    let o = Origin::echo();
    let s = server(&format!(
        "location / {{ proxy_pass http://127.0.0.1:{}; }}",
        o.port()
    ));
    let r = s.request(
        "GET /a/b?x=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", s.error_log());
    let req = o.last();
    assert_eq!(req.target, "/a/b?x=1");
    // nginx's defaults: HTTP/1.0, Host $proxy_host, Connection close.
    assert_eq!(req.version, "HTTP/1.0");
    assert_eq!(
        req.header("host"),
        Some(&*format!("127.0.0.1:{}", o.port()))
    );
    assert_eq!(req.header("connection"), Some("close"));
    assert_eq!(req.header("user-agent"), Some("t"));
    assert!(r.text().starts_with("GET /a/b?x=1 HTTP/1.0"));
    // The upstream's Server and Date are replaced by ours.
    assert!(r.header("server").unwrap_or("").starts_with("tidegate"));
}

#[test]
fn uri_rules() {
    let o = Origin::echo();
    let p = o.port();
    let s = server(&format!(
        "location /app/ {{ proxy_pass http://127.0.0.1:{p}/x/; }}
         location /raw/ {{ proxy_pass http://127.0.0.1:{p}; }}
         location /rw/ {{ rewrite ^/rw/(.*)$ /new/$1 break; proxy_pass http://127.0.0.1:{p}/ignored/; }}
         location ~ ^/re/ {{ proxy_pass http://127.0.0.1:{p}; }}
         location = /exact {{ proxy_pass http://127.0.0.1:{p}/other; }}"
    ));
    let cases = [
        ("/app/foo?a=1", "/x/foo?a=1"),
        ("/app/a%20b", "/x/a%20b"),
        ("/raw/a%2Fb//c?z", "/raw/a%2Fb//c?z"),
        ("/rw/thing?q=2", "/new/thing?q=2"),
        ("/re/x", "/re/x"),
        ("/exact?k", "/other?k"),
    ];
    for (from, to) in cases {
        let r = s.get(from);
        assert_eq!(r.status, 200, "{}: {}", from, s.error_log());
        assert_eq!(o.last().target, to, "for {}", from);
    }
}

#[test]
fn uri_part_in_regex_location_is_a_config_error() {
    for loc in [
        "location ~ ^/x { proxy_pass http://127.0.0.1:9/y; }",
        "location @n { proxy_pass http://127.0.0.1:9/y; }",
        "location /a { if ($arg_x) { proxy_pass http://127.0.0.1:9/y; } }",
    ] {
        let conf = http_conf(&format!("server {{ listen 127.0.0.1:PORT; {} }}", loc));
        let dir = prefix_with(&[("conf/nginx.conf", &conf)], free_port());
        let (code, _, err) = run_cli(dir.path(), &["-t"]);
        assert_ne!(code, 0, "{}", loc);
        assert!(
            err.contains("\"proxy_pass\" cannot have URI part in location given by regular expression, or inside named location, or inside \"if\" statement, or inside \"limit_except\" block in"),
            "{}",
            err
        );
    }
    // An unknown host is refused at load, as nginx does.
    let conf = http_conf(
        "server { listen 127.0.0.1:PORT; location / { proxy_pass http://no-such-host.invalid; } }",
    );
    let dir = prefix_with(&[("conf/nginx.conf", &conf)], free_port());
    let (code, _, err) = run_cli(dir.path(), &["-t"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("host not found in upstream \"no-such-host.invalid\""),
        "{}",
        err
    );
}

#[test]
fn set_header_rules_and_hop_by_hop() {
    let o = Origin::echo();
    let p = o.port();
    let s = server(&format!(
        "proxy_set_header X-Server-Level yes;
         location /inherit/ {{ proxy_pass http://127.0.0.1:{p}; }}
         location /own/ {{
            proxy_set_header Host backend.example;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Empty \"\";
            proxy_set_header User-Agent \"\";
            proxy_set_header X-Proxy $proxy_host:$proxy_port;
            proxy_pass http://127.0.0.1:{p};
         }}"
    ));
    let hostile = "Connection: keep-alive, X-Named\r\nX-Named: secret\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: Basic x\r\nX-Keep: 1\r\nUser-Agent: ua\r\nX-Empty: client\r\n";
    let r = s.request(&format!(
        "GET /inherit/ HTTP/1.1\r\nHost: localhost\r\n{}\r\n",
        hostile
    ));
    assert_eq!(r.status, 200);
    let q = o.last();
    assert_eq!(q.header("x-server-level"), Some("yes"));
    for h in [
        "x-named",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(!q.has(h), "{} leaked upstream: {:?}", h, q.headers);
    }
    assert_eq!(q.header("x-keep"), Some("1"));
    assert_eq!(q.header("connection"), Some("close"));

    let r = s.request(&format!(
        "GET /own/ HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 10.0.0.1\r\n{}Connection: close\r\n\r\n",
        hostile
    ));
    assert_eq!(r.status, 200);
    let q = o.last();
    // A level with its own proxy_set_header does not inherit the server's.
    assert!(!q.has("x-server-level"));
    assert_eq!(q.header("host"), Some("backend.example"));
    assert_eq!(q.header("x-forwarded-for"), Some("10.0.0.1, 127.0.0.1"));
    // Set to "": not sent, and the client's own value does not come through either.
    assert!(!q.has("x-empty"), "{:?}", q.headers);
    assert!(!q.has("user-agent"), "{:?}", q.headers);
    assert_eq!(q.header("x-proxy"), Some(&*format!("127.0.0.1:{p}:{p}")));
}

#[test]
fn response_headers_filters_and_variables() {
    let o = Origin::start(|r, s| {
        let h = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Secret: s\r\nX-App: a\r\nServer: origin\r\nX-Accel-Buffering: no\r\n\r\nok";
        let _ = s.write_all(h.as_bytes());
        keep(r)
    });
    let s = server(&format!(
        "location / {{
            proxy_hide_header X-Secret;
            proxy_pass_header Server;
            add_header X-Added yes;
            add_header X-Up $upstream_addr|$upstream_status|$upstream_http_x_app;
            header_filter_by_lua_block {{ ngx.header['X-Lua'] = ngx.var.upstream_http_x_secret }}
            proxy_pass http://127.0.0.1:{};
        }}",
        o.port()
    ));
    let r = s.get("/");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "ok");
    for h in ["x-hop", "keep-alive", "x-secret", "x-accel-buffering"] {
        assert!(r.header(h).is_none(), "{} leaked to the client", h);
    }
    assert_eq!(r.header("x-app"), Some("a"));
    assert_eq!(r.header("server"), Some("origin"));
    assert_eq!(r.header("x-added"), Some("yes"));
    assert_eq!(
        r.header("x-up"),
        Some(&*format!("127.0.0.1:{}|200|a", o.port()))
    );
    assert_eq!(r.header("x-lua"), Some("s"));
}

#[test]
fn request_bodies_stream_both_ways() {
    let o = Origin::echo();
    let p = o.port();
    let s = server(&format!(
        "client_max_body_size 10m;
         location /buf/ {{ proxy_pass http://127.0.0.1:{p}; }}
         location /stream/ {{ proxy_request_buffering off; proxy_http_version 1.1; proxy_pass http://127.0.0.1:{p}; }}"
    ));
    let body = "x".repeat(300_000);
    let r = s.request(&format!(
        "POST /buf/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        body
    ));
    assert_eq!(r.status, 200);
    let q = o.last();
    assert_eq!(q.body.len(), body.len());
    assert_eq!(q.header("content-length"), Some("300000"));
    // A chunked client body is streamed upstream chunked (HTTP/1.1).
    let mut c = connect(&s);
    c.write_all(b"POST /stream/ HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    c.write_all(b"6\r\n world\r\n0\r\n\r\n").unwrap();
    let r = read_response(&mut c).unwrap();
    assert_eq!(r.status, 200);
    let q = o.last();
    assert!(q.chunked, "{:?}", q.headers);
    assert_eq!(q.body, b"hello world");
}

#[test]
fn expect_100_continue() {
    let o = Origin::echo();
    let s = server(&format!(
        "location / {{ proxy_pass http://127.0.0.1:{}; }}",
        o.port()
    ));
    let mut c = connect(&s);
    c.write_all(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    c.write_all(b"ping").unwrap();
    let r = read_response(&mut c).unwrap();
    assert_eq!(r.status, 200);
    let q = o.last();
    assert_eq!(q.body, b"ping");
    assert!(!q.has("expect"));
}

#[test]
fn large_and_chunked_responses_stream() {
    let big = Origin::start(|r, s| {
        let body = vec![b'z'; 2 * 1024 * 1024];
        respond(s, 200, &[], &body);
        keep(r)
    });
    // Chunked, slow: the first chunk must reach the client before the last is written.
    let slow = Origin::start(|_r, s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n");
        std::thread::sleep(Duration::from_millis(1500));
        let _ = s.write_all(b"4\r\nlast\r\n0\r\n\r\n");
        Next::Close
    });
    let s = server(&format!(
        "location /big {{ proxy_pass http://127.0.0.1:{}; }}
         location /slow {{ proxy_buffering off; proxy_pass http://127.0.0.1:{}; }}
         location /slowbuf {{ proxy_pass http://127.0.0.1:{}; }}",
        big.port(),
        slow.port(),
        slow.port()
    ));
    let r = s.get("/big");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 2 * 1024 * 1024);
    assert_eq!(r.header("content-length"), Some("2097152"));
    for path in ["/slow", "/slowbuf"] {
        let mut c = connect(&s);
        let t0 = Instant::now();
        c.write_all(
            format!(
                "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                path
            )
            .as_bytes(),
        )
        .unwrap();
        let mut got = Vec::new();
        let mut tmp = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("first") {
            let n = c.read(&mut tmp).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&tmp[..n]);
        }
        assert!(
            t0.elapsed() < Duration::from_millis(1200),
            "{}: first chunk held back",
            path
        );
        let rest = drain(&mut c);
        got.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.contains("last") && text.ends_with("0\r\n\r\n"),
            "{}",
            text
        );
    }
}

#[test]
fn head_204_304_and_1xx() {
    let o = Origin::start(|r, s| {
        match r.target.as_str() {
            "/head" => {
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/x\r\n\r\n",
                );
            }
            "/204" => {
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n");
            }
            "/304" => {
                let _ = s.write_all(b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n");
            }
            _ => {
                let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter");
            }
        }
        keep(r)
    });
    let s = server(&format!(
        "location / {{ proxy_pass http://127.0.0.1:{}; }}",
        o.port()
    ));
    let mut c = connect(&s);
    c.write_all(b"HEAD /head HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let r = read_response_for(&mut c, true).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1234"));
    // The connection is still in sync: a next request works.
    c.write_all(b"GET /204 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let r = read_response(&mut c).unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(r.header("x-a"), Some("1"));
    c.write_all(b"GET /304 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let r = read_response(&mut c).unwrap();
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some("\"e\""));
    c.write_all(b"GET /1xx HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_response(&mut c).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "after");
}

#[test]
fn websocket_upgrade_is_tunnelled() {
    let o = Origin::start(|r, s| {
        assert_eq!(r.header("upgrade"), Some("websocket"));
        let _ = s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Up: 1\r\n\r\n",
        );
        // Echo raw bytes, upper-cased, until the client closes.
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let up: Vec<u8> = buf[..n].to_ascii_uppercase();
                    if s.write_all(&up).is_err() {
                        break;
                    }
                }
            }
        }
        Next::Close
    });
    // The canonical nginx WebSocket configuration.
    let s = Server::start(&http_conf(&format!(
        "map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
        server {{
            listen 127.0.0.1:PORT;
            server_name localhost;
            location /ws {{
                proxy_http_version 1.1;
                proxy_set_header Upgrade $http_upgrade;
                proxy_set_header Connection $connection_upgrade;
                proxy_pass http://127.0.0.1:{};
            }}
        }}",
        o.port()
    )));
    let mut c = connect(&s);
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(c.read(&mut b).unwrap(), 1);
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{}", head);
    assert!(head.contains("upgrade: websocket"), "{}", head);
    assert!(head.contains("connection: upgrade"), "{}", head);
    for msg in ["hello", "again"] {
        c.write_all(msg.as_bytes()).unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, msg.to_ascii_uppercase().as_bytes());
    }
}

#[test]
fn refused_upstream_is_502_with_nginx_log_line() {
    let port = free_port();
    let s = server(&format!(
        "location / {{ proxy_pass http://127.0.0.1:{}; }}",
        port
    ));
    let mut c = connect(&s);
    c.write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let r = read_response(&mut c).unwrap();
    assert_eq!(r.status, 502);
    assert!(r.text().contains("502 Bad Gateway"));
    let log = s.error_log();
    let want = format!(
        "connect() failed (111: Connection refused) while connecting to upstream, client: 127.0.0.1, server: localhost, request: \"GET /x HTTP/1.1\", upstream: \"http://127.0.0.1:{}/x\", host: \"localhost\"",
        port
    );
    assert!(log.contains(&want), "{}", log);
    // The client connection survives an upstream failure.
    c.write_all(b"GET /y HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut c).unwrap().status, 502);
}

#[test]
fn reset_garbage_and_silent_upstreams() {
    let reset = Origin::start_raw(std::sync::Arc::new(|mut s: TcpStream, _o: &Shared| {
        let mut buf = Vec::new();
        let _ = read_request(&mut s, &mut buf);
        socket_linger0(&s);
        drop(s);
    }));
    let garbage = Origin::start(|_r, s| {
        let _ = s.write_all(b"HELLO WORLD\r\n\r\n");
        Next::Close
    });
    let silent = Origin::start(|_r, _s| {
        std::thread::sleep(Duration::from_secs(5));
        Next::Close
    });
    let s = server(&format!(
        "proxy_read_timeout 1s;
         location /reset {{ proxy_pass http://127.0.0.1:{}; }}
         location /garbage {{ proxy_pass http://127.0.0.1:{}; }}
         location /silent {{ proxy_pass http://127.0.0.1:{}; }}",
        reset.port(),
        garbage.port(),
        silent.port()
    ));
    assert_eq!(s.get("/reset").status, 502);
    assert_eq!(s.get("/garbage").status, 502);
    let t0 = Instant::now();
    let r = s.get("/silent");
    assert_eq!(r.status, 504);
    assert!(r.text().contains("504 Gateway Time-out"), "{}", r.text());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{:?}",
        took
    );
    let log = s.error_log();
    assert!(
        log.contains("upstream sent invalid header while reading response header from upstream"),
        "{}",
        log
    );
    assert!(
        log.contains("upstream timed out (110: Connection timed out) while reading response header from upstream"),
        "{}",
        log
    );
    assert!(
        log.contains("(104: Connection reset by peer)")
            || log.contains("upstream prematurely closed connection"),
        "{}",
        log
    );
}

#[test]
fn read_timeout_counts_per_request_on_a_kept_alive_connection() {
    // Each upstream connection keeps one head timer from request to request (its deadline is
    // moved, not re-made): a second slow-but-in-time answer on the same connection must not
    // trip the first request's deadline, and a late one still times out at its own.
    let slow = Origin::start(|r, s| {
        let ms: u64 = r.target.trim_start_matches("/sleep/").parse().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        respond(s, 200, &[], b"ok");
        keep(r)
    });
    let s = Server::start(&http_conf(&format!(
        "upstream slow {{ server 127.0.0.1:{}; keepalive 4; }}
         server {{
             listen 127.0.0.1:PORT;
             proxy_read_timeout 1s;
             location / {{ proxy_pass http://slow; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}
         }}",
        slow.port()
    )));
    let mut c = connect(&s);
    for _ in 0..2 {
        let t0 = Instant::now();
        write!(c, "GET /sleep/700 HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
        let r = read_response(&mut c).expect("response");
        assert_eq!(
            (r.status, r.text()),
            (200, "ok".to_string()),
            "{:?}",
            t0.elapsed()
        );
    }
    assert_eq!(slow.conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    let t0 = Instant::now();
    write!(c, "GET /sleep/2500 HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
    let r = read_response(&mut c).expect("response");
    let took = t0.elapsed();
    assert_eq!(r.status, 504);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2000),
        "{:?}",
        took
    );
    write!(c, "GET /sleep/0 HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
    assert_eq!(read_response(&mut c).expect("response").status, 200);
}

/// SO_LINGER 0 so that close() sends a RST.
fn socket_linger0(s: &TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    }
}

#[test]
fn upstream_failing_mid_body_cuts_the_client_response() {
    let o = Origin::start(|_r, s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nstart\r\n");
        std::thread::sleep(Duration::from_millis(200));
        Next::Close
    });
    let s = server(&format!(
        "location / {{ proxy_pass http://127.0.0.1:{}; }}",
        o.port()
    ));
    let mut c = connect(&s);
    c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let got = String::from_utf8_lossy(&drain(&mut c)).into_owned();
    assert!(got.contains("start"), "{}", got);
    // No terminating chunk: the client can tell the response is incomplete.
    assert!(!got.ends_with("0\r\n\r\n"), "{}", got);
    assert!(
        s.error_log()
            .contains("upstream prematurely closed connection while reading upstream"),
        "{}",
        s.error_log()
    );
}

#[test]
fn variable_target_from_lua_and_missing_resolver() {
    let o = Origin::echo();
    let s = server(&format!(
        "location / {{
            set $upstream_target \"\";
            access_by_lua_block {{
                if ngx.var.arg_name then
                    ngx.var.upstream_target = ngx.var.arg_name .. ':{}'
                else
                    ngx.var.upstream_target = '127.0.0.1:{}'
                end
            }}
            proxy_pass http://$upstream_target;
        }}",
        o.port(),
        o.port()
    ));
    let r = s.get("/dyn?x=1");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(o.last().target, "/dyn?x=1");
    let r = s.get("/dyn?name=example.internal");
    assert_eq!(r.status, 502);
    assert!(
        s.error_log()
            .contains("no resolver defined to resolve example.internal"),
        "{}",
        s.error_log()
    );
}

#[test]
fn intercept_errors_and_redirect_default() {
    let o = Origin::start(|r, s| {
        if r.target.starts_with("/back/missing") {
            respond(s, 404, &[], b"origin 404 page");
        } else {
            let loc = format!("http://{}/back/elsewhere", r.header("host").unwrap_or(""));
            respond(s, 302, &[("Location", &loc)], b"");
        }
        keep(r)
    });
    let s = server(&format!(
        "location /front/ {{
            proxy_intercept_errors on;
            error_page 404 /err404;
            proxy_pass http://127.0.0.1:{}/back/;
        }}
        location /plain/ {{ proxy_pass http://127.0.0.1:{}/back/; }}
        location = /err404 {{ return 200 \"our page\"; }}",
        o.port(),
        o.port()
    ));
    let r = s.get("/front/missing");
    assert_eq!(r.status, 404, "{}", s.error_log());
    assert_eq!(r.text(), "our page");
    let r = s.get("/plain/missing");
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "origin 404 page");
    let r = s.get("/front/moved");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("/front/elsewhere"));
}

#[test]
fn smuggling_attempts_never_reach_upstream_as_requests() {
    let o = Origin::echo();
    let s = server(&format!(
        "location / {{ proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://127.0.0.1:{}; }}",
        o.port()
    ));
    let attacks: [&[u8]; 5] = [
        // Conflicting Content-Length.
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        // CL + TE.
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        // Bad chunked framing.
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcGET /smuggled HTTP/1.1\r\n\r\n0\r\n\r\n",
        // obs-fold.
        b"POST / HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        // TE with a non-chunked final coding.
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for a in attacks {
        let mut c = connect(&s);
        c.write_all(a).unwrap();
        let _ = drain(&mut c);
    }
    for r in o.reqs() {
        assert!(
            !r.target.contains("smuggled")
                && !String::from_utf8_lossy(&r.body).contains("GET /smuggled"),
            "smuggled through: {:?}",
            r
        );
    }
}

#[test]
fn connect_timeout_is_504() {
    use socket2::{Domain, Socket, Type};
    // A listener that never accepts: once its queue is full the kernel drops new SYNs, so a
    // connect() hangs as it would towards a dead host.
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    l.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(c) => held.push(c),
            Err(_) => break,
        }
    }
    let s = server(&format!(
        "location / {{ proxy_connect_timeout 500ms; proxy_pass http://{}; }}",
        addr
    ));
    let t0 = Instant::now();
    let r = s.get("/");
    assert_eq!(r.status, 504, "{}", s.error_log());
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(
        s.error_log().contains(
            "upstream timed out (110: Connection timed out) while connecting to upstream"
        ),
        "{}",
        s.error_log()
    );
}

#[test]
fn variable_target_resolved_through_location_resolver() {
    // A DNS server that knows one name: origin.test -> 127.0.0.1.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = udp.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..100 {
            let Ok((n, from)) = udp.recv_from(&mut buf) else {
                return;
            };
            let q = &buf[..n];
            let known = String::from_utf8_lossy(q).contains("origin");
            let ips: Vec<std::net::Ipv4Addr> = if known {
                vec![std::net::Ipv4Addr::LOCALHOST]
            } else {
                vec![]
            };
            if let Some(r) = tidegate::net::resolver::testing::answer(q, &ips, 30) {
                let _ = udp.send_to(&r, from);
            }
        }
    });
    let o = Origin::echo();
    let s = server(&format!(
        "resolver {dns} valid=30s;
         location / {{
            set $target \"\";
            access_by_lua_block {{ ngx.var.target = (ngx.var.arg_h or 'origin.test') .. ':{}' }}
            proxy_pass http://$target;
        }}",
        o.port()
    ));
    let r = s.get("/via-dns");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(o.last().target, "/via-dns");
    assert_eq!(
        o.last().header("host"),
        Some(&*format!("origin.test:{}", o.port()))
    );
    let r = s.get("/x?h=unknown.test");
    assert_eq!(r.status, 502);
    assert!(
        s.error_log()
            .contains("unknown.test could not be resolved (3: Host not found)"),
        "{}",
        s.error_log()
    );
}

#[test]
fn lua_filters_and_subrequests_see_proxied_responses() {
    let o = Origin::start(|r, s| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-O: 1\r\n\r\n6\r\nhello \r\n",
        );
        std::thread::sleep(Duration::from_millis(50));
        let _ = s.write_all(b"5\r\nworld\r\n0\r\n\r\n");
        keep(r)
    });
    let s = server(&format!(
        "location /p/ {{
            body_filter_by_lua_block {{ ngx.arg[1] = string.upper(ngx.arg[1]) }}
            proxy_pass http://127.0.0.1:{p}/;
        }}
        location /raw/ {{ proxy_pass http://127.0.0.1:{p}/; }}
        location = /sub {{
            content_by_lua_block {{
                local r = ngx.location.capture('/raw/x')
                ngx.say(r.status, ' ', r.header['X-O'], ' ', r.body)
            }}
        }}",
        p = o.port()
    ));
    let r = s.get("/p/a");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "HELLO WORLD");
    let r = s.get("/sub");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "200 1 hello world\n");
}

#[test]
fn pass_request_body_and_headers_off() {
    let o = Origin::echo();
    let s = server(&format!(
        "location / {{
            proxy_pass_request_body off;
            proxy_pass_request_headers off;
            proxy_set_header X-Kept yes;
            proxy_pass http://127.0.0.1:{};
        }}",
        o.port()
    ));
    let r = s.request("POST /p HTTP/1.1\r\nHost: localhost\r\nX-Client: 1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    assert_eq!(r.status, 200, "{}", s.error_log());
    let q = o.last();
    assert!(q.body.is_empty());
    assert!(!q.has("content-length"), "{:?}", q.headers);
    assert!(!q.has("x-client"));
    assert_eq!(q.header("x-kept"), Some("yes"));
    assert!(q.has("host"));
}

#[test]
fn proxy_redirect_rules() {
    let o = Origin::start(|r, s| {
        let loc = match r.target.as_str() {
            "/a" => "http://internal.example/app/page",
            "/b" => "http://other.example/x/y",
            _ => "http://untouched.example/",
        };
        respond(
            s,
            301,
            &[
                ("Location", loc),
                ("Refresh", "5; url=http://internal.example/app/r"),
            ],
            b"",
        );
        keep(r)
    });
    let s = server(&format!(
        "location / {{
            proxy_redirect http://internal.example/app/ /public/;
            proxy_redirect ~^http://other\\.example/(\\w+)/(.*)$ /$1-$2;
            proxy_pass http://127.0.0.1:{};
        }}
        location /off/ {{ proxy_redirect off; proxy_pass http://127.0.0.1:{}/; }}",
        o.port(),
        o.port()
    ));
    let r = s.get("/a");
    assert_eq!(r.header("location"), Some("/public/page"));
    assert_eq!(r.header("refresh"), Some("5; url=/public/r"));
    assert_eq!(s.get("/b").header("location"), Some("/x-y"));
    assert_eq!(
        s.get("/c").header("location"),
        Some("http://untouched.example/")
    );
    assert_eq!(
        s.get("/off/a").header("location"),
        Some("http://internal.example/app/page")
    );
}

#[test]
fn send_timeout_when_the_upstream_stops_reading() {
    // Reads nothing at all: the proxy's writes stall once the socket buffers are full.
    let o = Origin::start_raw(std::sync::Arc::new(|s: TcpStream, _sh: &Shared| {
        std::thread::sleep(Duration::from_secs(6));
        drop(s);
    }));
    let s = server(&format!(
        "client_max_body_size 64m;
         location / {{ proxy_send_timeout 500ms; proxy_read_timeout 3s; proxy_pass http://127.0.0.1:{}; }}",
        o.port()
    ));
    let body = vec![b'x'; 32 * 1024 * 1024];
    let mut c = connect(&s);
    c.write_all(
        format!(
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    c.write_all(&body).unwrap();
    let t0 = Instant::now();
    let r = read_response(&mut c).unwrap();
    assert_eq!(r.status, 504, "{}", s.error_log());
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        s.error_log().contains(
            "upstream timed out (110: Connection timed out) while sending request to upstream"
        ),
        "{}",
        s.error_log()
    );
}

#[test]
fn proxy_buffer_size_limits_the_upstream_response_head() {
    // A 6 KB header: over 4k, within the default (64 KB) and within 8k.
    let o = Origin::start(|r, s| {
        let h = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Big: {}\r\n\r\nok",
            "v".repeat(6 * 1024)
        );
        let _ = s.write_all(h.as_bytes());
        keep(r)
    });
    let s = server(&format!(
        "location /small {{ proxy_buffer_size 4k; proxy_pass http://127.0.0.1:{p}; }}
         location /eight {{ proxy_buffer_size 8k; proxy_pass http://127.0.0.1:{p}; }}
         location / {{ proxy_pass http://127.0.0.1:{p}; }}",
        p = o.port()
    ));
    let r = s.get("/small");
    assert_eq!(r.status, 502, "{}", s.error_log());
    let log = wait_log(&s, "too big header");
    assert!(
        log.contains("upstream sent too big header while reading response header from upstream"),
        "{}",
        log
    );
    for path in ["/eight", "/"] {
        let r = s.get(path);
        assert_eq!(r.status, 200, "{} {}", path, s.error_log());
        assert_eq!(r.header("x-big").map(str::len), Some(6 * 1024), "{}", path);
        assert_eq!(r.text(), "ok");
    }
}

#[test]
fn proxy_buffer_size_takes_a_head_that_fills_it_exactly() {
    // Heads of exactly 4096 and 4097 bytes (padding in one header) under proxy_buffer_size 4k.
    let o = Origin::start(|r, s| {
        let total: usize = if r.target.ends_with("4097") {
            4097
        } else {
            4096
        };
        let pre = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: ";
        let pad = "p".repeat(total - pre.len() - 4);
        let h = format!("{pre}{pad}\r\n\r\nok");
        assert_eq!(h.len() - 2, total);
        let _ = s.write_all(h.as_bytes());
        keep(r)
    });
    let s = server(&format!(
        "location / {{ proxy_buffer_size 4k; proxy_pass http://127.0.0.1:{}; }}",
        o.port()
    ));
    let r = s.get("/4096");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "ok"),
        "{}",
        s.error_log()
    );
    assert_eq!(s.get("/4097").status, 502);
}

#[test]
fn buffer_tuning_directives_load() {
    let o = Origin::echo();
    let s = server(&format!(
        "proxy_buffers 8 16k; proxy_buffer_size 16k; proxy_busy_buffers_size 32k;
         location / {{ proxy_max_temp_file_size 0; proxy_pass http://127.0.0.1:{}; }}",
        o.port()
    ));
    assert_eq!(s.get("/").status, 200);
    assert!(s
        .error_log()
        .contains("the \"proxy_buffers\" directive is ignored"));
}
