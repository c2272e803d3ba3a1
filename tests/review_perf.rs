//! Review of the performance work merged on 2026-11-23: behaviour that must not have changed.

mod common;

use common::*;

fn start(locations: &str) -> Server {
    Server::start(&http_conf(&format!(
        "server {{\n listen 127.0.0.1:PORT;\n server_name localhost;\n{}\n}}",
        locations
    )))
}

/// The names of the response's `x-*` headers, in the order they came.
fn x_order(r: &Response) -> Vec<String> {
    r.headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .filter(|n| n.starts_with("x-"))
        .collect()
}

/// Re-assigning a header keeps its place whether the value is a string (the fast path) or a
/// table (the ordinary path), as nginx's ngx_http_set_header_helper overwrites the first match
/// in place. For a while the two paths ordered the response's headers two ways.
#[test]
fn header_reassignment_keeps_one_order_whatever_the_value_type() {
    let s = start(
        r#"
location /str { content_by_lua_block {
    ngx.header["X-A"] = "1"; ngx.header["X-B"] = "2"; ngx.header["X-C"] = "3"
    ngx.header["X-A"] = "4"
    ngx.say("ok")
} }
location /tbl { content_by_lua_block {
    ngx.header["X-A"] = "1"; ngx.header["X-B"] = "2"; ngx.header["X-C"] = "3"
    ngx.header["X-A"] = {"4"}
    ngx.say("ok")
} }
"#,
    );
    let a = s.get("/str");
    let b = s.get("/tbl");
    assert_eq!(a.status, 200, "{}", s.error_log());
    assert_eq!(b.status, 200, "{}", s.error_log());
    assert_eq!(a.header("x-a"), Some("4"));
    assert_eq!(b.header("x-a"), Some("4"));
    assert_eq!(
        x_order(&a),
        x_order(&b),
        "string vs table assignment give different header orders"
    );
}

#[path = "support/origin.rs"]
mod origin;

use std::io::Write;

/// The response-head claims of cf11a41/e9f18b3/e25746c: headers filtered while parsed keep
/// the old results (order, duplicates, Connection-named headers dropped, hidden headers still
/// in `$upstream_http_*`), and values no longer re-checked by `HeaderValue` are still refused
/// (httparse refuses them) or still passed (obs-text).
#[test]
fn upstream_heads_filtered_while_parsed_as_before() {
    let o = origin::Origin::start(|r, s| {
        let head: &[u8] = match r.target.as_str() {
            "/ctl" => b"HTTP/1.1 200 OK\r\nServer: a\x01b\r\nContent-Length: 2\r\n\r\nok",
            "/del" => b"HTTP/1.1 200 OK\r\nDate: a\x7fb\r\nContent-Length: 2\r\n\r\nok",
            "/conn" => b"HTTP/1.1 200 OK\r\nConnection: x\x0by\r\nContent-Length: 2\r\n\r\nok",
            "/obs" => b"HTTP/1.1 200 OK\r\nServer: \xff\r\nX-O: a\xfeb\r\nContent-Length: 2\r\n\r\nok",
            _ => b"HTTP/1.1 200 OK\r\nX-1: a\r\nX-Hop: h\r\nConnection: X-Hop, keep-alive\r\nX-2: b\r\nServer: s\r\nX-1: c\r\nKeep-Alive: timeout=5\r\nX-Accel-Expires: 5\r\nContent-Length: 2\r\n\r\nok",
        };
        let _ = s.write_all(head);
        origin::Next::Close
    });
    let s = start(&format!(
        "location / {{ proxy_pass http://127.0.0.1:{};
             add_header X-Srv $upstream_http_server;
             add_header X-Hopv $upstream_http_x_hop;
             add_header X-Ae $upstream_http_x_accel_expires; }}",
        o.port()
    ));
    for p in ["/ctl", "/del", "/conn"] {
        assert_eq!(s.get(p).status, 502, "{} {}", p, s.error_log());
    }
    let r = s.get("/obs");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert!(r.header("x-o").is_some());
    let r = s.get("/named");
    assert_eq!(r.status, 200, "{}", s.error_log());
    let names: Vec<String> = r
        .headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .filter(|n| n.starts_with("x-") && !["x-srv", "x-hopv", "x-ae"].contains(&n.as_str()))
        .collect();
    assert_eq!(names, ["x-1", "x-1", "x-2"]);
    assert_eq!(r.headers_all("x-1"), ["a", "c"]);
    assert!(r.header("keep-alive").is_none());
    assert_eq!(r.header("x-srv"), Some("s"));
    assert_eq!(r.header("x-hopv"), Some("h"));
    assert_eq!(r.header("x-ae"), Some("5"));
    assert!(r.header("server").unwrap_or("").starts_with("tidegate"));
}

/// 66df01a: the request head rendered into a buffer keeps HeaderMap's order and
/// proxy_set_header's rules (a name given twice sent together, an empty value drops the
/// header and the client's, the body's length replaces a configured Content-Length in place).
#[test]
fn request_head_rendered_as_a_header_map_did() {
    let o = origin::Origin::echo();
    let s = start(&format!(
        "location / {{ proxy_pass http://127.0.0.1:{};
             proxy_set_header X-B 1;
             proxy_set_header X-A \"\";
             proxy_set_header Content-Length 999;
             proxy_set_header X-B $request_method;
             proxy_set_header X-E $http_x_none; }}",
        o.port()
    ));
    let r = s.request(
        "POST /p HTTP/1.1\r\nHost: localhost\r\nX-A: client\r\nX-C: c\r\nX-E: e\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    );
    assert_eq!(r.status, 200, "{}", s.error_log());
    let req = o.last();
    let names: Vec<String> = req
        .headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    assert_eq!(
        names,
        ["host", "connection", "x-b", "x-b", "content-length", "x-c"]
    );
    assert_eq!(req.header("content-length"), Some("3"));
    assert_eq!(req.body, b"abc");
    let xb: Vec<&str> = req
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-b"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(xb, ["1", "POST"]);
}

/// A pooled connection found dead gets one fresh retry inside the same try; its times start
/// again, so `$upstream_connect_time` of the fresh connection leaves out the time lost on the
/// dead one (here 300 ms), as nginx gives such a retry times of its own.
#[test]
fn stale_pooled_retry_connect_time_is_the_connect_only() {
    use std::net::TcpStream;
    let o = origin::Origin::start_raw(std::sync::Arc::new(
        |mut s: TcpStream, sh: &origin::Shared| {
            let mut buf = Vec::new();
            if let Some(r) = origin::read_request(&mut s, &mut buf) {
                if let Ok(mut v) = sh.requests.lock() {
                    v.push(r);
                }
                origin::respond(&mut s, 200, &[], b"first");
            }
            if origin::read_request(&mut s, &mut buf).is_some() {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        },
    ));
    let s = Server::start(&http_conf(&format!(
        "upstream backend {{ server 127.0.0.1:{}; keepalive 4; }}
         server {{ listen 127.0.0.1:PORT; server_name localhost;
           location / {{ proxy_http_version 1.1; proxy_set_header Connection \"\";
             proxy_pass http://backend;
             add_header X-CT $upstream_connect_time;
             add_header X-HT $upstream_header_time; }} }}",
        o.port()
    )));
    assert_eq!(s.get("/1").status, 200, "{}", s.error_log());
    let r = s.get("/2");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(o.reqs().len(), 2);
    let ct: f64 = r.header("x-ct").unwrap_or("9").parse().unwrap_or(9.0);
    assert!(
        ct < 0.2,
        "connect time {:?} (header time {:?})",
        r.header("x-ct"),
        r.header("x-ht")
    );
}
