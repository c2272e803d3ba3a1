//! Hostile clients: malformed request lines and headers, traversal attempts, bad framing,
//! oversized bodies, stalled and idle connections, pipelining floods. Each test checks the
//! status nginx would answer and that the server keeps serving a normal request afterwards.
//! Everything runs on loopback and every loop and read is bounded.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "TOP-SECRET-CONTENTS";

/// A server with a static root, Lua handlers that read the request, and a small body limit.
fn hostile_server(extra_server: &str) -> Server {
    let conf = http_conf(&format!(
        r#"
    server {{
        listen 127.0.0.1:PORT;
        server_name localhost;
        client_max_body_size 1k;
        {extra_server}
        location / {{
            root html;
        }}
        location = /lua {{
            content_by_lua_block {{
                local h = ngx.req.get_headers()
                ngx.say("host=", ngx.var.host, " http_host=", ngx.var.http_host or "nil")
                ngx.say("hdr=", h["host"] or "nil", " bin=", h["x-bin"] or "nil")
                ngx.say("var_bin=", ngx.var.http_x_bin or "nil", " uri=", ngx.var.uri)
                ngx.say("raw=", #ngx.req.raw_header())
            }}
        }}
        location = /body {{
            content_by_lua_block {{
                ngx.req.read_body()
                local d = ngx.req.get_body_data()
                ngx.say("len=", d and #d or 0)
            }}
        }}
    }}
"#
    ));
    Server::start_with(
        &conf,
        &[
            ("html/index.html", "hello\n"),
            ("html/sub/page.html", "page\n"),
            ("secret.txt", SECRET),
        ],
    )
}

/// Send raw bytes on a fresh connection and read one response. `None` when the server closed
/// the connection without answering (or the read timed out).
fn send_raw(s: &Server, raw: &[u8]) -> Option<Response> {
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    c.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("write timeout");
    // The server may answer and close before reading everything: a failed write is fine.
    let _ = c.write_all(raw);
    read_response(&mut c).ok()
}

/// The status of the answer to `raw` (0 when the connection closed without one).
fn status_of(s: &Server, raw: &[u8]) -> u16 {
    send_raw(s, raw).map(|r| r.status).unwrap_or(0)
}

/// A well-formed GET still works.
fn assert_alive(s: &Server) {
    let r = s.get("/");
    assert_eq!(r.status, 200, "server stopped serving: {}", s.error_log());
    assert_eq!(r.text(), "hello\n");
}

fn assert_never_leaks(r: &Option<Response>) {
    if let Some(r) = r {
        assert!(
            !r.text().contains(SECRET),
            "traversal served a file outside the root"
        );
    }
}

// ---------------------------------------------------------------- request line

#[test]
fn request_line_garbage_is_400() {
    let s = hostile_server("");
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET  HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"\x01\x02\x03 / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET / FOO/1.1\r\nHost: localhost\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: localhost\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"\r\n\r\n\r\n\r\nxx\r\n\r\n",
    ] {
        assert_eq!(
            status_of(&s, raw),
            400,
            "for {:?}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_alive(&s);
}

#[test]
fn lower_case_method_is_400() {
    let s = hostile_server("");
    // nginx's parser takes only A-Z, `_` and `-` in a method name.
    for m in ["get", "Get", "G.T", "GET1"] {
        let raw = format!(
            "{} / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            m
        );
        assert_eq!(status_of(&s, raw.as_bytes()), 400, "method {}", m);
    }
    // Unknown but well-formed methods are not the parser's business.
    let st = status_of(
        &s,
        b"FOO_BAR / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(st, 405);
    assert_alive(&s);
}

#[test]
fn unsupported_http_version_is_rejected() {
    let s = hostile_server("");
    // nginx answers 505 for a major version above 1; a 400 is an acceptable refusal too.
    let st = status_of(&s, b"GET / HTTP/9.9\r\nHost: localhost\r\n\r\n");
    assert!(matches!(st, 400 | 505), "status {}", st);
    assert_alive(&s);
}

#[test]
fn nul_bytes_in_path_are_400() {
    let s = hostile_server("");
    assert_eq!(
        status_of(&s, b"GET /ind\0ex.html HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        400
    );
    // nginx refuses a %00 that decodes to NUL ("client sent invalid request").
    assert_eq!(
        status_of(
            &s,
            b"GET /index.html%00.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ),
        400
    );
    assert_alive(&s);
}

// ---------------------------------------------------------------- traversal and escapes

#[test]
fn dot_dot_traversal_is_400() {
    let s = hostile_server("");
    for path in [
        "/../../etc/passwd",
        "/../secret.txt",
        "/sub/../../secret.txt",
    ] {
        let raw = format!(
            "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            path
        );
        let r = send_raw(&s, raw.as_bytes());
        assert_never_leaks(&r);
        assert_eq!(r.map(|r| r.status), Some(400), "for {}", path);
    }
    // Inside the root `..` resolves like nginx does.
    let r = s.get("/sub/../index.html");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello\n");
    assert_alive(&s);
}

#[test]
fn percent_encoded_traversal_never_serves_the_file() {
    let s = hostile_server("");
    for path in [
        "/%2e%2e/secret.txt",
        "/%2E%2E/%2e%2e/etc/passwd",
        "/sub/%2e%2e/%2e%2e/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/sub%2f..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/.%2e/secret.txt",
    ] {
        let raw = format!(
            "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            path
        );
        let r = send_raw(&s, raw.as_bytes());
        assert_never_leaks(&r);
        let st = r.map(|r| r.status).unwrap_or(0);
        assert!(matches!(st, 400 | 404), "{} gave {}", path, st);
    }
    assert_alive(&s);
}

#[test]
fn invalid_percent_encoding_is_400() {
    let s = hostile_server("");
    // nginx's URI parser refuses a `%` not followed by two hex digits.
    for path in ["/%zz", "/index.html%", "/index.html%4", "/%g1/x", "/a%%20"] {
        let raw = format!(
            "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            path
        );
        assert_eq!(status_of(&s, raw.as_bytes()), 400, "for {}", path);
    }
    // Bad escapes in the query string are the application's business, not the parser's.
    let r = s.get("/?a=%zz");
    assert_eq!(r.status, 200);
    assert_alive(&s);
}

#[test]
fn non_utf8_bytes_in_uri_do_not_crash() {
    let s = hostile_server("");
    for raw in [
        &b"GET /\xff\xfe HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"[..],
        b"GET /lua?x=\xc3\x28 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /\xc0\xae\xc0\xae/secret.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ] {
        let r = send_raw(&s, raw);
        assert_never_leaks(&r);
        let st = r.map(|r| r.status).unwrap_or(0);
        // Not valid UTF-8, so not a URI hyper accepts: refused, never a 500.
        assert_eq!(st, 400, "for {:?}", String::from_utf8_lossy(raw));
    }
    // Percent-encoded invalid UTF-8 decodes to bytes that are not a file: 404, not 500.
    let r = s.get("/%ff%fe");
    assert_eq!(r.status, 404);
    let r = s.get("/lua?x=%ff");
    assert_eq!(r.status, 200);
    assert_alive(&s);
}

// ---------------------------------------------------------------- headers

#[test]
fn non_utf8_header_values_reach_lua_without_500() {
    let s = hostile_server("");
    let r = send_raw(
        &s,
        b"GET /lua HTTP/1.1\r\nHost: localhost\r\nX-Bin: a\xff\xfeb\x80\r\nConnection: close\r\n\r\n",
    )
    .expect("response");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert!(
        r.body.windows(5).any(|w| w == b"a\xff\xfeb\x80"),
        "{:?}",
        r.text()
    );
    assert_alive(&s);
}

#[test]
fn non_utf8_host_header_does_not_crash() {
    let s = hostile_server("");
    let r = send_raw(
        &s,
        b"GET /lua HTTP/1.1\r\nHost: ex\xffample.com\r\nConnection: close\r\n\r\n",
    )
    .expect("response");
    // nginx accepts bytes above 0x7f in Host; what matters is no 500 and no crash.
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert!(r.text().contains("host="), "{}", r.text());
    let r = send_raw(
        &s,
        "GET /lua HTTP/1.1\r\nHost: пример.рф:8080\r\nConnection: close\r\n\r\n".as_bytes(),
    )
    .expect("response");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_alive(&s);
}

#[test]
fn invalid_host_header_is_400() {
    let s = hostile_server("");
    // nginx's ngx_http_validate_host: no `/`, no `..`, no control bytes, not empty.
    for host in [
        &b"../../etc"[..],
        b"a/b",
        b"foo..bar",
        b"",
        b"a\x01b",
        b"a b",
        b":80",
        b".",
    ] {
        let mut raw = b"GET /lua HTTP/1.1\r\nHost: ".to_vec();
        raw.extend_from_slice(host);
        raw.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let st = status_of(&s, &raw);
        assert_eq!(st, 400, "Host {:?}", String::from_utf8_lossy(host));
    }
    // Two Host headers: nginx's "client sent duplicate host header".
    assert_eq!(
        status_of(
            &s,
            b"GET /lua HTTP/1.1\r\nHost: localhost\r\nHost: evil\r\nConnection: close\r\n\r\n"
        ),
        400
    );
    // A trailing dot and a port are fine.
    let r = send_raw(
        &s,
        b"GET /lua HTTP/1.1\r\nHost: LocalHost.:80\r\nConnection: close\r\n\r\n",
    )
    .expect("response");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("host=localhost"), "{}", r.text());
    assert_alive(&s);
}

#[test]
fn invalid_header_names_are_400() {
    let s = hostile_server("");
    for line in [
        &b"Bad Header: x"[..],
        b"X(y): z",
        b"X\x01Y: z",
        b": empty-name",
        b"X-A\xff: v",
        b"NoColonHere",
        b"X-Nul: a\0b",
    ] {
        let mut raw = b"GET / HTTP/1.1\r\nHost: localhost\r\n".to_vec();
        raw.extend_from_slice(line);
        raw.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        assert_eq!(
            status_of(&s, &raw),
            400,
            "for header {:?}",
            String::from_utf8_lossy(line)
        );
    }
    assert_alive(&s);
}

#[test]
fn obs_fold_continuation_is_400() {
    let s = hostile_server("");
    for raw in [
        &b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: one\r\n two\r\nConnection: close\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: one\r\n\ttwo\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: localhost\r\nConnection: close\r\n\r\n",
    ] {
        assert_eq!(
            status_of(&s, raw),
            400,
            "for {:?}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_alive(&s);
}

#[test]
fn absurdly_long_uri_is_refused() {
    let s = hostile_server("");
    for len in [70_000usize, 200_000] {
        let raw = format!(
            "GET /{} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            "a".repeat(len)
        );
        let st = status_of(&s, raw.as_bytes());
        // nginx: 414 above its 8k line buffer. hyper cannot tell a long request line from a
        // large head once its buffer is full and answers 431; both refuse without reading on.
        assert!(matches!(st, 414 | 400 | 431), "len {} gave {}", len, st);
    }
    assert_alive(&s);
}

#[test]
fn a_thousand_headers_are_refused() {
    let s = hostile_server("");
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..1000 {
        raw.push_str(&format!("X-H-{}: v\r\n", i));
    }
    raw.push_str("Connection: close\r\n\r\n");
    let st = status_of(&s, raw.as_bytes());
    assert!(matches!(st, 400 | 431 | 494), "status {}", st);
    // A single huge header value too.
    let raw = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(100_000)
    );
    let st = status_of(&s, raw.as_bytes());
    assert!(matches!(st, 400 | 431 | 494), "status {}", st);
    assert_alive(&s);
}

// ---------------------------------------------------------------- body framing

#[test]
fn conflicting_content_length_is_400() {
    let s = hostile_server("");
    for raw in [
        &b"POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..],
        b"POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, 6\r\n\r\nhello!",
        b"POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\nhello",
        b"POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\nhello",
        b"POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999999\r\n\r\nhello",
    ] {
        assert_eq!(
            status_of(&s, raw),
            400,
            "for {:?}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_alive(&s);
}

/// Content-Length with chunked: whatever the status, the body must not be read by length
/// and a request smuggled after it must not be served on that connection.
#[test]
fn content_length_with_chunked_cannot_smuggle() {
    let s = hostile_server("");
    let raw = b"POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /lua HTTP/1.1\r\nHost: smuggled\r\n\r\n";
    let all = exchange(&s, raw, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&all);
    assert!(
        !text.contains("host=smuggled"),
        "a smuggled request was served: {}",
        text
    );
    assert!(
        text.starts_with("HTTP/1.1 400") || text.matches("HTTP/1.1 ").count() == 1,
        "{}",
        text
    );
    assert_alive(&s);
}

#[test]
#[ignore = "differs: hyper drops Content-Length when Transfer-Encoding is chunked (reads chunked, then closes the connection) and leaves no trace of it in the request, so the nginx 400 cannot be given; smuggling is still impossible (test above)"]
fn content_length_with_chunked_is_400() {
    let s = hostile_server("");
    let raw = b"POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    assert_eq!(status_of(&s, raw), 400);
    let raw = b"POST /body HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    assert_eq!(status_of(&s, raw), 400);
    assert_alive(&s);
}

#[test]
fn unknown_transfer_encoding_is_refused() {
    let s = hostile_server("");
    // nginx: 501 for an unknown coding; 400 is hyper's answer and refuses as well.
    let raw = b"POST /body HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nxxxx";
    let st = status_of(&s, raw);
    assert!(matches!(st, 400 | 501), "status {}", st);
    // Transfer-Encoding is not HTTP/1.0.
    let raw =
        b"POST /body HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(status_of(&s, raw), 400);
    assert_alive(&s);
}

#[test]
fn bad_chunked_framing_is_400() {
    let s = hostile_server("");
    for body in [
        &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        b"5\r\nhelloXX0\r\n\r\n",
        b"ffffffffffffffffffff\r\nx\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"5 5\r\nhello\r\n0\r\n\r\n",
    ] {
        let mut raw = b"POST /body HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        raw.extend_from_slice(body);
        assert_eq!(
            status_of(&s, &raw),
            400,
            "for {:?}",
            String::from_utf8_lossy(body)
        );
    }
    // Well-formed chunked body is read.
    let r = send_raw(&s, b"POST /body HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n").expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "len=8\n");
    assert_alive(&s);
}

#[test]
fn chunked_body_over_client_max_body_size_is_413() {
    let s = hostile_server("");
    let mut raw = b"POST /body HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    // 4 KiB in 512-byte chunks against a 1k limit.
    for _ in 0..8 {
        raw.extend_from_slice(b"200\r\n");
        raw.extend_from_slice(&[b'x'; 512]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(status_of(&s, &raw), 413, "{}", s.error_log());
    // Content-Length over the limit: refused before the body is read.
    let raw = b"POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\nConnection: close\r\n\r\nxx";
    assert_eq!(status_of(&s, raw), 413);
    // Under the limit is fine.
    let mut raw = b"POST /body HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n200\r\n".to_vec();
    raw.extend_from_slice(&[b'y'; 512]);
    raw.extend_from_slice(b"\r\n0\r\n\r\n");
    let r = send_raw(&s, &raw).expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "len=512\n");
    assert_alive(&s);
}

#[test]
fn stalled_body_times_out_with_408_and_does_not_block_others() {
    let s = hostile_server("client_body_timeout 1s;");
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.write_all(b"POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nhalf")
        .expect("write");
    // Others are served while the body read waits.
    assert_alive(&s);
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let r = read_response(&mut c).expect("a response after the body timeout");
    assert_eq!(r.status, 408);
    assert_alive(&s);
}

// ---------------------------------------------------------------- slow and idle clients

#[test]
fn half_request_stall_does_not_block_other_clients() {
    let s = hostile_server("");
    let mut stalled = TcpStream::connect(s.addr()).expect("connect");
    stalled
        .write_all(b"GET / HTTP/1.1\r\nHost: local")
        .expect("write half");
    let t0 = Instant::now();
    for _ in 0..5 {
        assert_alive(&s);
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "others were slowed");
    // The stalled client can still finish its request.
    stalled
        .write_all(b"host\r\nConnection: close\r\n\r\n")
        .expect("write rest");
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let r = read_response(&mut stalled).expect("response");
    assert_eq!(r.status, 200);
}

#[test]
fn many_idle_connections_do_not_starve_others_and_are_closed() {
    let s = hostile_server("keepalive_timeout 2s;");
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(s.addr()).expect("connect idle"));
    }
    let t0 = Instant::now();
    for _ in 0..5 {
        assert_alive(&s);
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "others were slowed");
    // Idle connections do not live forever: the header timeout closes them.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut closed = 0;
    for c in idle.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        c.set_read_timeout(Some(left)).expect("timeout");
        let mut b = [0u8; 256];
        match c.read(&mut b) {
            Ok(0) => closed += 1,
            // hyper may write a 408 before closing.
            Ok(_) => {
                let mut rest = [0u8; 256];
                if matches!(c.read(&mut rest), Ok(0) | Err(_)) {
                    closed += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(_) => {}
        }
    }
    assert_eq!(closed, 200, "idle connections were not closed in time");
    assert_alive(&s);
}

#[test]
fn hundred_pipelined_requests_get_hundred_responses() {
    let s = hostile_server("");
    let mut raw = Vec::new();
    for i in 0..100 {
        let close = if i == 99 { "Connection: close\r\n" } else { "" };
        raw.extend_from_slice(
            format!("GET /?n={} HTTP/1.1\r\nHost: localhost\r\n{}\r\n", i, close).as_bytes(),
        );
    }
    let all = exchange(&s, &raw, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 100);
    assert_eq!(text.matches("hello\n").count(), 100);
    assert_alive(&s);
}

#[test]
fn pipelined_bad_request_stops_the_pipeline() {
    let s = hostile_server("");
    let raw = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\nBROKEN LINE\r\n\r\nGET /lua HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let all = exchange(&s, raw, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{}", text);
    assert!(text.contains("HTTP/1.1 400"), "{}", text);
    assert!(
        !text.contains("host="),
        "served after a bad request: {}",
        text
    );
    assert_alive(&s);
}

/// Everything the server sends on one connection until it closes, bounded by `timeout`.
fn exchange(s: &Server, raw: &[u8], timeout: Duration) -> Vec<u8> {
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_write_timeout(Some(timeout)).expect("timeout");
    let _ = c.write_all(raw);
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        c.set_read_timeout(Some(left)).expect("timeout");
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

#[test]
fn keepalive_timeout_runs_only_while_idle() {
    // The keepalive (header) timer starts when a response is finished and stops while a
    // request is served: a handler slower than the timeout keeps its connection, and the
    // connection is closed one timeout after its last response, not before.
    let s = hostile_server(
        "keepalive_timeout 1s;\n        location = /slow { content_by_lua_block { ngx.sleep(1.6) ngx.say(\"slow\") } }",
    );
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let r = read_response(&mut c).expect("slow response");
    assert_eq!(r.text(), "slow\n");
    // Idle for less than the timeout, then a second request on the same connection.
    std::thread::sleep(Duration::from_millis(600));
    c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let r = read_response(&mut c).expect("second response on the kept connection");
    assert_eq!(r.text(), "hello\n");
    let t0 = Instant::now();
    let mut b = [0u8; 64];
    let n = c.read(&mut b).unwrap_or(0);
    let waited = t0.elapsed();
    assert_eq!(n, 0, "the idle connection was not closed");
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "closed after {:?}, expected about 1s",
        waited
    );
    assert_alive(&s);
}

#[test]
fn a_slow_download_outlives_keepalive_timeout() {
    // The keepalive clock starts when the last byte of a response was written, not when
    // hyper took the body: a client reading an 8 MB body slowly for ~3 s (three timeouts)
    // gets all of it. (Once the rest fits in the kernel's buffers the clock runs, as in
    // nginx, so the connection may close before the client drained them.) send_timeout
    // counts from each write's progress, so it does not cut the slow reader either.
    let s = hostile_server(
        "keepalive_timeout 1s; send_timeout 1s;\n        location = /big { content_by_lua_block { ngx.print(string.rep('a', 8 * 1024 * 1024)) } }",
    );
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let want = 8 * 1024 * 1024;
    let t0 = Instant::now();
    let body = read_body(
        &mut c,
        want,
        Duration::from_millis(25),
        Duration::from_secs(20),
    );
    assert!(
        body >= want,
        "connection cut after {:?} with {} body bytes read",
        t0.elapsed(),
        body
    );
    assert!(
        t0.elapsed() > Duration::from_millis(1500),
        "the client read too fast to test"
    );
    assert_alive(&s);
}

/// Request `path`, read a little, stop reading for 3 s, then read on: the bytes that came
/// before the server closed the connection, and whether it did (EOF or reset within the
/// read timeout; a read that times out means it is still open).
fn stop_reading(s: &Server, path: &str) -> (usize, bool) {
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(format!("GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n", path).as_bytes())
        .expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = c.read(&mut buf).expect("first read");
    std::thread::sleep(Duration::from_secs(3));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        match c.read(&mut buf) {
            Ok(0) => return (got, true),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
            Ok(n) => got += n,
        }
    }
    (got, false)
}

#[test]
fn send_timeout_closes_a_connection_whose_client_stopped_reading() {
    // 64 MB is more than the loopback socket buffers hold, so the server's writes block once
    // the client stops reading; a second after that (send_timeout) the connection is closed
    // and the client reads what was buffered, then the end. keepalive_timeout is long: it is
    // not what cuts it. /huge hands hyper its whole body at once (the request is done, hyper
    // is flushing); /stream is still being served (each chunk waits for ngx.flush).
    let s = hostile_server(
        "keepalive_timeout 60s; send_timeout 1s;
        location = /huge { content_by_lua_block { ngx.print(string.rep('a', 64 * 1024 * 1024)) } }
        location = /stream { content_by_lua_block {
            local chunk = string.rep('b', 1024 * 1024)
            for _ = 1, 64 do
                ngx.print(chunk)
                if not ngx.flush(true) then return end
            end
        } }",
    );
    let want = 64 * 1024 * 1024;
    for path in ["/huge", "/stream"] {
        let (got, ended) = stop_reading(&s, path);
        assert!(ended, "{}: still open after {} bytes", path, got);
        assert!(
            got < want,
            "{}: the whole body arrived ({} bytes): nothing was cut",
            path,
            got
        );
    }
    let log = wait_log(&s, "while sending response to client");
    assert!(
        log.contains(
            "client timed out (110: Connection timed out) while sending response to client, client: 127.0.0.1"
        ),
        "{}",
        log
    );
    assert_alive(&s);
}

#[test]
fn an_idle_connection_after_a_stalled_write_closes_on_keepalive_timeout() {
    // One stall (the client reads a 32 MB body, more than the loopback buffers hold, after a
    // pause), then the connection is idle:
    // keepalive_timeout (1s), not the longer send_timeout, closes it.
    let s = hostile_server(
        "keepalive_timeout 1s; send_timeout 30s;
        location = /big { content_by_lua_block { ngx.print(string.rep('a', 32 * 1024 * 1024)) } }",
    );
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    std::thread::sleep(Duration::from_millis(300));
    let want = 32 * 1024 * 1024;
    let body = read_body(&mut c, want, Duration::ZERO, Duration::from_secs(10));
    assert_eq!(body, want, "body cut short");
    let idle = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = match c.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(closed, "still open after {:?} idle", idle.elapsed());
    assert!(
        idle.elapsed() < Duration::from_secs(5),
        "closed after {:?} idle: the send deadline, not keepalive_timeout",
        idle.elapsed()
    );
    assert_alive(&s);
}

/// Read a response until `want` body bytes came, the connection ended or `limit` passed,
/// pausing after each read; the body bytes read.
fn read_body(c: &mut TcpStream, want: usize, pause: Duration, limit: Duration) -> usize {
    let (t0, mut got, mut buf) = (Instant::now(), 0usize, vec![0u8; 64 * 1024]);
    let mut head = Vec::new();
    while t0.elapsed() < limit {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if head.len() < 4096 {
                    head.extend_from_slice(&buf[..n.min(4096)]);
                }
                got += n;
            }
        }
        if got.saturating_sub(head_len(&head)) >= want {
            break;
        }
        std::thread::sleep(pause);
    }
    got.saturating_sub(head_len(&head))
}

fn head_len(b: &[u8]) -> usize {
    b.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(usize::MAX, |p| p + 4)
}
