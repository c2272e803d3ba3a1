//! The http core as nginx behaves: location precedence, server_name choice, `return` and
//! `rewrite`, `set`/`if`/`break`, variables, response headers (add_header, headers-more),
//! static files and error pages, the access log, and HTTP/1.x protocol details (keep-alive,
//! pipelining, limits, malformed requests, HEAD).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// GET with a given Host and extra header lines (each without CRLF).
fn get_host(s: &Server, path: &str, host: &str, extra: &[&str]) -> Response {
    let mut raw = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        path, host
    );
    for h in extra {
        raw.push_str(h);
        raw.push_str("\r\n");
    }
    raw.push_str("\r\n");
    s.request(&raw)
}

fn get_h(s: &Server, path: &str, extra: &[&str]) -> Response {
    get_host(s, path, "localhost", extra)
}

/// Everything the server sends on one connection until it closes (bounded by a timeout).
fn raw_exchange(s: &Server, raw: &[u8], timeout: Duration) -> Vec<u8> {
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(timeout)).expect("timeout");
    c.write_all(raw).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    out
}

/// Whether the server closes `c` within `within` (reads EOF or a reset).
fn closes_within(c: &mut TcpStream, within: Duration) -> bool {
    c.set_read_timeout(Some(within)).expect("timeout");
    let mut b = [0u8; 64];
    match c.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        ),
    }
}

fn server(body: &str) -> Server {
    Server::start(&http_conf(body))
}

fn wait_file_contains(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = std::fs::read_to_string(path).unwrap_or_default();
        if t.contains(needle) || Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- locations

const LOCATIONS: &str = r#"
server {
    listen 127.0.0.1:PORT;
    location = /exact { return 200 "exact"; }
    location ^~ /static/ { return 200 "static"; }
    location / { return 200 "root"; }
    location /docs/ {
        location ~ \.md$ { return 200 "docs-md"; }
        return 200 "docs";
    }
    location ~ \.php$ { return 200 "php"; }
    location ~* \.(png|JPG)$ { return 200 "img"; }
    location /fb/ { error_page 404 = @fallback; return 404; }
    location @fallback { return 200 "fallback"; }
}
"#;

#[test]
fn location_precedence_table() {
    let s = server(LOCATIONS);
    let table = [
        ("/", "root"),
        ("/exact", "exact"),
        ("/exact/", "root"),
        ("/exactly", "root"),
        ("/exact?x=1", "exact"),
        ("/static/x.php", "static"),
        ("/static/a.png", "static"),
        ("/docs/", "docs"),
        ("/docs/a.txt", "docs"),
        ("/docs/a.md", "docs-md"),
        ("/docs/a.php", "php"),
        ("/a.md", "root"),
        ("/a.php", "php"),
        ("/x/index.PHP", "root"),
        ("/A.png", "img"),
        ("/a.PNG", "img"),
        ("/a.jpg", "img"),
        ("/@fallback", "root"),
        ("/fb/x", "fallback"),
        ("/docs", "root"),
    ];
    let mut bad = Vec::new();
    for (uri, want) in table {
        let r = s.get(uri);
        if r.status != 200 || r.text() != want {
            bad.push(format!(
                "{} -> {} {:?} (want {:?})",
                uri,
                r.status,
                r.text(),
                want
            ));
        }
    }
    assert!(bad.is_empty(), "mismatches:\n{}", bad.join("\n"));
}

#[test]
fn location_rules_longest_prefix_first_regex_and_exact_root() {
    let s = server(
        r#"
        server {
            listen 127.0.0.1:PORT;
            location = / { return 200 "exact-root"; }
            location / { return 200 "root"; }
            location /p/ { return 200 "p"; }
            location /p/q/ { return 200 "pq"; }
            location ~ ^/r/ { return 200 "r1"; }
            location ~ ^/r/x { return 200 "r2"; }
            location /r/x/ { return 200 "rx-prefix"; }
            location ^~ /r/y/ { return 200 "ry-stop"; }
            location /m/ { location /m/n/ { return 200 "m-n"; } return 200 "m"; }
        }
        "#,
    );
    let table = [
        ("/", "exact-root"),
        ("/index.html", "root"),
        ("/p/z", "p"),
        ("/p/q/z", "pq"),
        ("/p/q", "p"),
        ("/r/x/1", "r1"),
        ("/r/y/1", "ry-stop"),
        ("/m/a", "m"),
        ("/m/n/a", "m-n"),
    ];
    let mut bad = Vec::new();
    for (uri, want) in table {
        let r = s.get(uri);
        if r.status != 200 || r.text() != want {
            bad.push(format!(
                "{} -> {} {:?} (want {:?})",
                uri,
                r.status,
                r.text(),
                want
            ));
        }
    }
    assert!(bad.is_empty(), "mismatches:\n{}", bad.join("\n"));
}

#[test]
fn location_matches_the_decoded_normalized_uri() {
    let s = server(LOCATIONS);
    for (uri, want) in [
        ("/%65xact", "exact"),
        ("/docs/../exact", "exact"),
        ("//static//a", "static"),
        ("/docs/a%2Emd", "docs-md"),
    ] {
        let r = s.get(uri);
        assert_eq!((r.status, r.text()), (200, want.to_string()), "uri {}", uri);
    }
}

#[test]
fn uri_above_root_is_400() {
    let s = server(LOCATIONS);
    assert_eq!(s.get("/../etc/passwd").status, 400);
}

// ---------------------------------------------------------------- server_name

const SERVERS: &str = r#"
server { listen 127.0.0.1:PORT; server_name first.test; return 200 "first"; }
server { listen 127.0.0.1:PORT; server_name exact.test alias.test; return 200 "exact"; }
server { listen 127.0.0.1:PORT; server_name *.example.com; return 200 "wild-suffix"; }
server { listen 127.0.0.1:PORT; server_name www.example.*; return 200 "wild-prefix"; }
server { listen 127.0.0.1:PORT; server_name ~^api\d+\.test$; return 200 "regex"; }
server { listen 127.0.0.1:PORT; server_name .dot.test; return 200 "dot"; }
server { listen 127.0.0.1:PORT default_server; server_name _; return 200 "default"; }
"#;

#[test]
fn server_name_selection() {
    let s = server(SERVERS);
    let table = [
        ("exact.test", "exact"),
        ("EXACT.Test", "exact"),
        ("alias.test", "exact"),
        ("exact.test:8080", "exact"),
        ("exact.test.", "exact"),
        ("first.test", "first"),
        ("a.example.com", "wild-suffix"),
        ("a.b.example.com", "wild-suffix"),
        ("www.example.com", "wild-suffix"),
        ("www.example.org", "wild-prefix"),
        ("api12.test", "regex"),
        ("api.test", "default"),
        ("dot.test", "dot"),
        ("x.dot.test", "dot"),
        ("unknown.test", "default"),
    ];
    let mut bad = Vec::new();
    for (host, want) in table {
        let r = get_host(&s, "/", host, &[]);
        if r.status != 200 || r.text() != want {
            bad.push(format!(
                "Host {} -> {} {:?} (want {:?})",
                host,
                r.status,
                r.text(),
                want
            ));
        }
    }
    assert!(bad.is_empty(), "mismatches:\n{}", bad.join("\n"));
}

#[test]
fn star_suffix_does_not_match_bare_domain() {
    let s = server(SERVERS);
    let r = get_host(&s, "/", "example.com", &[]);
    assert_eq!(r.text(), "default");
}

#[test]
fn http10_without_host_goes_to_default_server() {
    let s = server(SERVERS);
    let r = s.request("GET / HTTP/1.0\r\n\r\n");
    assert_eq!((r.status, r.text().as_str()), (200, "default"));
}

#[test]
fn http11_without_host_is_400() {
    let s = server(SERVERS);
    let r = s.request("GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 400);
}

#[test]
fn first_server_is_default_without_default_server() {
    let s = server(
        "server { listen 127.0.0.1:PORT; server_name one.test; return 200 \"one\"; }\nserver { listen 127.0.0.1:PORT; server_name two.test; return 200 \"two\"; }",
    );
    let r = get_host(&s, "/", "nobody.test", &[]);
    assert_eq!(r.text(), "one");
}

// ---------------------------------------------------------------- return

const RETURNS: &str = r#"
server {
    listen 127.0.0.1:PORT;
    location /code { return 404; }
    location /forbid { return 403; }
    location /text { return 200 "hello $uri"; }
    location /teapot { return 418 "short and stout"; }
    location /r301 { return 301 /new; }
    location /r302abs { return 302 http://x.test/y; }
    location /rurl { return https://x/; }
    location /r307 { return 307 /t?a=1; }
    location /empty204 { return 204; }
}
"#;

#[test]
fn return_code_only_sends_nginx_error_page() {
    let s = server(RETURNS);
    let r = s.get("/code");
    assert_eq!(r.status, 404);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/html"),
        "{:?}",
        r.headers
    );
    let t = r.text();
    assert!(t.contains("<title>404 Not Found</title>"), "{}", t);
    assert!(
        t.contains("<center><h1>404 Not Found</h1></center>"),
        "{}",
        t
    );
    let r = s.get("/forbid");
    assert_eq!(r.status, 403);
    assert!(r.text().contains("403 Forbidden"), "{}", r.text());
}

#[test]
fn return_code_and_text() {
    let s = server(RETURNS);
    let r = s.get("/text");
    assert_eq!((r.status, r.text().as_str()), (200, "hello /text"));
    assert_eq!(
        r.header("content-type"),
        Some("text/plain"),
        "default_type is text/plain without mime.types"
    );
    let r = s.get("/teapot");
    assert_eq!((r.status, r.text().as_str()), (418, "short and stout"));
}

#[test]
fn return_204_has_no_body() {
    let s = server(RETURNS);
    let r = s.get("/empty204");
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
}

#[test]
fn return_redirects_set_location() {
    let s = server(RETURNS);
    let r = s.get("/r301");
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location").map(String::from),
        Some(format!("http://localhost:{}/new", s.port))
    );
    assert!(r.text().contains("301 Moved Permanently"), "{}", r.text());
    let r = s.get("/r302abs");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("http://x.test/y"));
    let r = s.get("/rurl");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("https://x/"));
    let r = s.get("/r307");
    assert_eq!(r.status, 307);
    assert_eq!(
        r.header("location").map(String::from),
        Some(format!("http://localhost:{}/t?a=1", s.port))
    );
}

#[test]
fn server_level_return_wins_over_locations() {
    let s = server(
        "server { listen 127.0.0.1:PORT; return 200 \"srv\"; location / { return 200 \"loc\"; } }",
    );
    assert_eq!(s.get("/x").text(), "srv");
}

// ---------------------------------------------------------------- rewrite

const REWRITES: &str = r#"
server {
    listen 127.0.0.1:PORT;
    root html;
    location /old/ { rewrite ^/old/(.*)$ /new/$1 last; return 200 "not reached"; }
    location /new/ { return 200 "new:$uri:$args"; }
    location /brk/ { rewrite ^/brk/(.*)$ /files/$1 break; return 200 "not reached"; }
    location /files/ { return 200 "files location must not be searched"; }
    location /red/ { rewrite ^/red/(.*)$ /dest/$1 redirect; }
    location /perm/ { rewrite ^/perm/(.*)$ /dest/$1 permanent; }
    location /ext { rewrite ^ http://other.test/path permanent; }
    location = /keep { rewrite ^ /show?y=2 last; }
    location = /drop { rewrite ^ /show? last; }
    location = /plain { rewrite ^ /show last; }
    location = /show { return 200 "uri=$uri args=$args"; }
    location /a { rewrite ^ /b last; }
    location /b { rewrite ^ /a last; }
    location /multi { rewrite ^/multi/(\w+)/(\d+)$ /new/$2/$1 last; }
    location /nomatch { rewrite ^/zzz /new/z last; return 200 "fell through"; }
}
"#;

#[test]
fn rewrite_last_researches_location_with_captures() {
    let s = server(REWRITES);
    let r = s.get("/old/abc?x=1");
    assert_eq!((r.status, r.text().as_str()), (200, "new:/new/abc:x=1"));
    let r = s.get("/multi/name/42");
    assert_eq!((r.status, r.text().as_str()), (200, "new:/new/42/name:"));
    let r = s.get("/nomatch");
    assert_eq!((r.status, r.text().as_str()), (200, "fell through"));
}

#[test]
fn rewrite_break_stays_in_location_and_serves_file() {
    let s = Server::start_with(&http_conf(REWRITES), &[("html/files/x.txt", "file-x\n")]);
    let r = s.get("/brk/x.txt");
    assert_eq!((r.status, r.text().as_str()), (200, "file-x\n"));
}

#[test]
fn rewrite_redirect_and_permanent() {
    let s = server(REWRITES);
    let r = s.get("/red/x?a=1");
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location").map(String::from),
        Some(format!("http://localhost:{}/dest/x?a=1", s.port))
    );
    let r = s.get("/perm/y");
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location").map(String::from),
        Some(format!("http://localhost:{}/dest/y", s.port))
    );
    let r = s.get("/ext?q=1");
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("http://other.test/path?q=1"));
}

#[test]
fn rewrite_args_appended_or_dropped() {
    let s = server(REWRITES);
    let r = s.get("/keep?x=1");
    assert_eq!(r.text(), "uri=/show args=y=2&x=1");
    let r = s.get("/drop?x=1");
    assert_eq!(r.text(), "uri=/show args=");
    let r = s.get("/plain?x=1");
    assert_eq!(r.text(), "uri=/show args=x=1");
}

#[test]
fn rewrite_cycle_is_500_and_logged() {
    let s = server(REWRITES);
    let r = s.get("/a");
    assert_eq!(r.status, 500);
    assert!(
        r.text().contains("500 Internal Server Error"),
        "{}",
        r.text()
    );
    let log = wait_file_contains(
        &s.path("logs/error.log"),
        "rewrite or internal redirection cycle",
    );
    assert!(
        log.contains("rewrite or internal redirection cycle"),
        "error.log:\n{}",
        log
    );
}

// ---------------------------------------------------------------- set / if / break

const IFS: &str = r#"
server {
    listen 127.0.0.1:PORT;
    root html;
    location /eq { set $want "yes"; if ($arg_v = $want) { return 200 "eq"; } return 200 "no"; }
    location /ne { if ($arg_v != "a b") { return 200 "differs"; } return 200 "same"; }
    location /re { if ($uri ~ ^/re/(\d+)$) { return 200 "num=$1"; } return 200 "nonum"; }
    location /rei { if ($http_x_tok ~* ^abc(.*)$) { return 200 "tok=$1"; } return 200 "notok"; }
    location /nre { if ($uri !~ ^/nre/ok) { return 200 "not-ok"; } return 200 "ok"; }
    location /truthy { if ($arg_flag) { return 200 "truthy"; } return 200 "falsy"; }
    location /file { if (-f $document_root/exists.txt) { return 200 "has-file"; } return 200 "no-file"; }
    location /nofile { if (!-f $document_root/missing.txt) { return 200 "missing"; } return 200 "present"; }
    location /fileabs { if (-f $arg_p) { return 200 "f"; } if (-d $arg_p) { return 200 "d"; } if (-e $arg_p) { return 200 "e"; } return 200 "none"; }
    location /dir { if (-d $document_root/sub) { return 200 "is-dir"; } return 200 "not-dir"; }
    location /setvar { set $a "x"; set $b "${a}y$arg_z"; return 200 "b=$b"; }
    location /brk {
        set $y "a";
        if ($arg_stop) { break; }
        set $y "b";
        content_by_lua_block { ngx.print("y=", ngx.var.y) }
    }
    location /locbreak { set $y "a"; break; set $y "b"; return 200 "not reached"; }
}
"#;

#[test]
fn if_conditions() {
    let s = Server::start_with(
        &http_conf(IFS),
        &[("html/exists.txt", "e"), ("html/sub/f", "f")],
    );
    let table = [
        ("/eq?v=yes", "eq"),
        ("/eq?v=no", "no"),
        ("/eq", "no"),
        ("/ne?v=c", "differs"),
        ("/re/123", "num=123"),
        ("/re/abc", "nonum"),
        ("/nre/ok", "ok"),
        ("/nre/x", "not-ok"),
        ("/truthy?flag=1", "truthy"),
        ("/truthy?flag=yes", "truthy"),
        ("/truthy?flag=0", "falsy"),
        ("/truthy?flag=", "falsy"),
        ("/truthy", "falsy"),
        ("/setvar?z=9", "b=xy9"),
    ];
    let mut bad = Vec::new();
    for (uri, want) in table {
        let r = s.get(uri);
        if r.status != 200 || r.text() != want {
            bad.push(format!(
                "{} -> {} {:?} (want {:?})",
                uri,
                r.status,
                r.text(),
                want
            ));
        }
    }
    assert!(bad.is_empty(), "mismatches:\n{}", bad.join("\n"));
}

#[test]
fn if_file_tests_on_absolute_paths() {
    let s = Server::start_with(
        &http_conf(IFS),
        &[("html/exists.txt", "e"), ("html/sub/f", "f")],
    );
    let root = s.path("html");
    let root = root.to_str().expect("utf-8 path");
    assert_eq!(
        s.get(&format!("/fileabs?p={}/exists.txt", root)).text(),
        "f"
    );
    assert_eq!(s.get(&format!("/fileabs?p={}/sub", root)).text(), "d");
    assert_eq!(
        s.get(&format!("/fileabs?p={}/nothing", root)).text(),
        "none"
    );
    assert_eq!(s.get("/nofile").text(), "missing");
}

#[test]
fn if_file_tests_with_document_root() {
    let s = Server::start_with(
        &http_conf(IFS),
        &[("html/exists.txt", "e"), ("html/sub/f", "f")],
    );
    assert_eq!(s.get("/file").text(), "has-file");
    assert_eq!(s.get("/dir").text(), "is-dir");
}

#[test]
fn document_root_is_absolute() {
    let s = server(r#"server { listen 127.0.0.1:PORT; root html; return 200 "$document_root"; }"#);
    let want = s.path("html");
    assert_eq!(s.get("/").text(), want.to_str().unwrap_or(""));
}

#[test]
fn arg_variables_are_not_url_decoded() {
    // $arg_v is NOT decoded in nginx: "a%20b" != "a b", so /ne?v=a%20b answers "differs".
    let s = server(IFS);
    let r = s.get("/ne?v=a%20b");
    assert_eq!(r.text(), "differs");
}

#[test]
fn if_case_insensitive_regex_capture() {
    let s = server(IFS);
    let r = get_h(&s, "/rei", &["X-Tok: ABCdef"]);
    assert_eq!(r.text(), "tok=def");
    let r = get_h(&s, "/rei", &["X-Tok: xyz"]);
    assert_eq!(r.text(), "notok");
}

#[test]
fn break_stops_rewrite_directives() {
    let s = server(IFS);
    assert_eq!(s.get("/brk?stop=1").text(), "y=a");
    assert_eq!(s.get("/brk").text(), "y=b");
}

#[test]
fn break_at_location_level_skips_return() {
    let s = Server::start_with(&http_conf(IFS), &[("html/locbreak", "static-after-break")]);
    let r = s.get("/locbreak");
    assert_eq!((r.status, r.text().as_str()), (200, "static-after-break"));
}

// ---------------------------------------------------------------- variables

#[test]
fn core_variables() {
    let s = server(
        r#"server { listen 127.0.0.1:PORT; location / { return 200 "$uri|$args|$arg_x|$http_user_agent|$host|$request_method|$is_args|$request_uri|$scheme|$server_port|$remote_addr|$server_protocol"; } }"#,
    );
    let r = s.request(
        "GET /vars/p?x=1&y=2 HTTP/1.1\r\nHost: Example.COM:8080\r\nUser-Agent: tester/1.0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.text(), format!("/vars/p|x=1&y=2|1|tester/1.0|example.com|GET|?|/vars/p?x=1&y=2|http|{}|127.0.0.1|HTTP/1.1", s.port));
    let r = s.get("/a/../b%20c");
    assert_eq!(
        r.text(),
        format!(
            "/b c||||localhost|GET||/a/../b%20c|http|{}|127.0.0.1|HTTP/1.1",
            s.port
        )
    );
}

#[test]
fn host_falls_back_to_server_name() {
    let s = server(
        r#"server { listen 127.0.0.1:PORT; server_name main.test other.test; return 200 "host=$host name=$server_name"; }"#,
    );
    let r = s.request("GET / HTTP/1.0\r\n\r\n");
    assert_eq!(r.text(), "host=main.test name=main.test");
}

#[test]
fn multi_headers_and_cookies_variables() {
    let s = server(
        r#"server { listen 127.0.0.1:PORT; return 200 "$cookie_b|$http_x_dash_name|$arg_missing."; }"#,
    );
    let r = get_h(&s, "/", &["Cookie: a=1; b=two", "X-Dash-Name: dn"]);
    assert_eq!(r.text(), "two|dn|.");
}

// ---------------------------------------------------------------- headers

const HEADERS: &str = r#"
server {
    listen 127.0.0.1:PORT;
    add_header X-A 1;
    add_header X-B 2 always;
    more_set_headers 'X-M: v';
    more_set_headers -s 404 'X-Only404: y';
    more_clear_headers Server;
    location /ok { return 200 "ok"; }
    location /missing { return 404; }
    location /err { return 500; }
    location /own { add_header X-Own 1; return 200 "own"; }
    location /in { more_set_input_headers 'X-In: 1'; content_by_lua_block { ngx.print("in=", ngx.var.http_x_in) } }
    location /clr { more_clear_input_headers X-Gone; content_by_lua_block { ngx.print("gone=", ngx.var.http_x_gone, ".") } }
    location /species { set $value dog; more_set_input_headers "X-Species: $value"; set $value cat; content_by_lua_block { ngx.print(ngx.var.http_x_species) } }
    location /inret { more_set_input_headers 'X-In: 1'; return 200 "in=$http_x_in"; }
}
"#;

#[test]
fn add_header_only_on_success_unless_always() {
    let s = server(HEADERS);
    let r = s.get("/ok");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-a"), Some("1"));
    assert_eq!(r.header("x-b"), Some("2"));
    let r = s.get("/missing");
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("x-a"),
        None,
        "add_header without always must skip 404"
    );
    assert_eq!(r.header("x-b"), Some("2"));
}

#[test]
fn add_header_in_location_replaces_inherited_ones() {
    let s = server(HEADERS);
    let r = s.get("/own");
    assert_eq!(r.header("x-own"), Some("1"));
    assert_eq!(
        r.header("x-a"),
        None,
        "nginx does not inherit add_header into a level with its own"
    );
    assert_eq!(r.header("x-b"), None);
}

#[test]
fn more_set_headers_on_all_statuses_and_status_filter() {
    let s = server(HEADERS);
    for (p, code) in [("/ok", 200), ("/missing", 404), ("/err", 500)] {
        let r = s.get(p);
        assert_eq!(r.status, code);
        assert_eq!(r.header("x-m"), Some("v"), "{} {:?}", p, r.headers);
        assert_eq!(
            r.header("x-only404").is_some(),
            code == 404,
            "{} {:?}",
            p,
            r.headers
        );
    }
}

#[test]
fn more_clear_headers_removes_server() {
    let s = server(HEADERS);
    let r = s.get("/ok");
    assert_eq!(r.header("server"), None, "{:?}", r.headers);
    let plain = server("server { listen 127.0.0.1:PORT; return 200 \"x\"; }");
    assert!(
        plain.get("/").header("server").is_some(),
        "Server header expected by default"
    );
}

#[test]
fn more_set_input_headers_visible_as_variable() {
    let s = server(HEADERS);
    assert_eq!(s.get("/in").text(), "in=1");
    assert_eq!(get_h(&s, "/in", &["X-In: 0"]).text(), "in=1");
    assert_eq!(get_h(&s, "/clr", &["X-Gone: here"]).text(), "gone=nil.");
}

#[test]
fn more_set_input_headers_sees_variables_after_all_set_directives() {
    let s = server(HEADERS);
    let r = s.get("/species");
    assert_eq!((r.status, r.text().as_str()), (200, "cat"));
}

#[test]
fn more_set_input_headers_runs_after_rewrite_directives() {
    // headers-more's input filters run at the tail of the rewrite phase: a `return` in the
    // same location has already answered and sees the client's original header.
    let s = server(HEADERS);
    assert_eq!(s.get("/inret").text(), "in=");
}

// ---------------------------------------------------------------- static files

const STATIC: &str = r#"
include mime.types;
default_type application/octet-stream;
server {
    listen 127.0.0.1:PORT;
    root html;
    index index.html;
    error_page 404 /custom404.html;
    location /plain404/ { error_page 404 /nonexistent_page_xyz.html; }
    location /swap/ { error_page 404 =200 /ok.txt; }
    location = /secret.html { internal; }
    location /viasecret/ { error_page 404 /secret.html; }
}
"#;

fn static_server() -> Server {
    Server::start_with(
        &http_conf(STATIC),
        &[
            ("conf/mime.types", "types { text/html html; text/css css; application/json json; text/plain txt; image/png png; }\n"),
            ("html/index.html", "<h1>index</h1>\n"),
            ("html/style.css", "body{}\n"),
            ("html/data.json", "{\"a\":1}\n"),
            ("html/ok.txt", "ok-text\n"),
            ("html/blob.unknownext", "blob"),
            ("html/dir/index.html", "dir-index\n"),
            ("html/emptydir/.keep", ""),
            ("html/custom404.html", "custom not found\n"),
            ("html/secret.html", "secret page\n"),
        ],
    )
}

#[test]
fn static_index_and_content_types() {
    let s = static_server();
    let r = s.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "<h1>index</h1>\n"));
    assert_eq!(r.header("content-type"), Some("text/html"));
    for (p, ct, body) in [
        ("/style.css", "text/css", "body{}\n"),
        ("/data.json", "application/json", "{\"a\":1}\n"),
        ("/ok.txt", "text/plain", "ok-text\n"),
        ("/blob.unknownext", "application/octet-stream", "blob"),
        ("/dir/", "text/html", "dir-index\n"),
    ] {
        let r = s.get(p);
        assert_eq!(r.status, 200, "{}", p);
        assert_eq!(r.header("content-type"), Some(ct), "{}", p);
        assert_eq!(r.text(), body, "{}", p);
        assert_eq!(
            r.header("content-length").map(String::from),
            Some(body.len().to_string()),
            "{}",
            p
        );
    }
}

#[test]
fn static_file_has_last_modified_and_etag() {
    let s = static_server();
    let r = s.get("/ok.txt");
    assert!(r.header("last-modified").is_some(), "{:?}", r.headers);
    assert!(r.header("etag").is_some(), "{:?}", r.headers);
}

#[test]
fn if_modified_since_gives_304() {
    let s = static_server();
    let r = s.get("/ok.txt");
    let lm = r
        .header("last-modified")
        .expect("last-modified")
        .to_string();
    let r = get_h(&s, "/ok.txt", &[&format!("If-Modified-Since: {}", lm)]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
}

#[test]
fn directory_without_slash_redirects() {
    let s = static_server();
    let r = s.get("/dir");
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location").map(String::from),
        Some(format!("http://localhost:{}/dir/", s.port))
    );
    let r = s.get("/dir?q=1");
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location").map(String::from),
        Some(format!("http://localhost:{}/dir/?q=1", s.port))
    );
}

#[test]
fn directory_without_index_is_403() {
    let s = static_server();
    let r = s.get("/emptydir/");
    assert_eq!(r.status, 403);
    assert!(r.text().contains("403 Forbidden"), "{}", r.text());
}

#[test]
fn error_page_serves_custom_page_with_original_status() {
    let s = static_server();
    let r = s.get("/nope.html");
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "custom not found\n");
    assert_eq!(r.header("content-type"), Some("text/html"));
}

#[test]
fn missing_file_gives_nginx_404_page() {
    let s = Server::start_with(
        &http_conf("server { listen 127.0.0.1:PORT; root html; }"),
        &[("html/a.txt", "a")],
    );
    let r = s.get("/nope.txt");
    assert_eq!(r.status, 404);
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/html"));
    assert!(
        r.text().contains("<title>404 Not Found</title>"),
        "{}",
        r.text()
    );
    let log = wait_file_contains(&s.path("logs/error.log"), "No such file or directory");
    assert!(
        log.contains("open()")
            && log.contains("nope.txt")
            && log.contains("No such file or directory"),
        "error.log:\n{}",
        log
    );
}

#[test]
fn error_page_to_missing_page_falls_back_to_nginx_page() {
    let s = static_server();
    let r = s.get("/plain404/x");
    assert_eq!(r.status, 404);
    assert!(
        r.text().contains("<title>404 Not Found</title>"),
        "{}",
        r.text()
    );
}

#[test]
fn error_page_with_status_override() {
    let s = static_server();
    let r = s.get("/swap/missing");
    assert_eq!((r.status, r.text().as_str()), (200, "ok-text\n"));
}

#[test]
fn internal_location_is_404_directly_but_reachable_by_error_page() {
    let s = static_server();
    let r = s.get("/secret.html");
    assert_eq!(r.status, 404);
    assert_ne!(r.text(), "secret page\n");
    let r = s.get("/viasecret/nothing");
    assert_eq!((r.status, r.text().as_str()), (404, "secret page\n"));
}

#[test]
fn head_on_static_file_has_length_and_no_body() {
    let s = static_server();
    let raw = raw_exchange(
        &s,
        b"HEAD /ok.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 200"), "{}", head);
    assert!(
        head.to_ascii_lowercase().contains("content-length: 8"),
        "{}",
        head
    );
    assert_eq!(body, "", "HEAD response carried a body");
}

#[test]
fn post_to_static_file_is_405() {
    let s = static_server();
    let r = s.request("POST /ok.txt HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx");
    assert_eq!(r.status, 405);
}

// ---------------------------------------------------------------- access log

#[test]
fn access_log_with_format_and_off() {
    let s = server(
        r#"
        log_format t '$request_method $uri $status $body_bytes_sent "$http_user_agent" $arg_q';
        server {
            listen 127.0.0.1:PORT;
            access_log logs/t.log t;
            location /logged { return 200 "12345"; }
            location /quiet { access_log off; return 200 "q"; }
        }
        "#,
    );
    get_h(&s, "/quiet", &["User-Agent: ua-quiet"]);
    get_h(&s, "/logged?q=v", &["User-Agent: ua/1"]);
    let t = wait_file_contains(&s.path("logs/t.log"), "/logged");
    assert!(
        t.lines().any(|l| l == "GET /logged 200 5 \"ua/1\" v"),
        "t.log:\n{}",
        t
    );
    let all = format!(
        "{}{}",
        t,
        std::fs::read_to_string(s.path("logs/access.log")).unwrap_or_default()
    );
    assert!(
        !all.contains("quiet"),
        "access_log off still wrote:\n{}",
        all
    );
    // the http-level access.log is replaced by the server-level one
    let main = std::fs::read_to_string(s.path("logs/access.log")).unwrap_or_default();
    assert!(!main.contains("/logged"), "access.log:\n{}", main);
}

#[test]
fn access_log_default_combined_format() {
    let s = server(r#"server { listen 127.0.0.1:PORT; return 200 "abc"; }"#);
    get_h(
        &s,
        "/c?x=1",
        &["User-Agent: comb/1", "Referer: http://ref.test/"],
    );
    let t = wait_file_contains(&s.path("logs/access.log"), "/c?x=1");
    let line = t
        .lines()
        .find(|l| l.contains("/c?x=1"))
        .unwrap_or("")
        .to_string();
    assert!(line.starts_with("127.0.0.1 - - ["), "{}", line);
    assert!(
        line.contains("] \"GET /c?x=1 HTTP/1.1\" 200 3 \"http://ref.test/\" \"comb/1\""),
        "{}",
        line
    );
}

// ---------------------------------------------------------------- protocol

const PROTO: &str = r#"
server {
    listen 127.0.0.1:PORT;
    keepalive_requests 2;
    client_max_body_size 10;
    location / { return 200 "p:$uri"; }
    location /body { content_by_lua_block { ngx.req.read_body() ngx.print(ngx.req.get_body_data() or "") } }
}
"#;

#[test]
fn http10_gets_response_and_close() {
    let s = server(PROTO);
    let raw = raw_exchange(
        &s,
        b"GET /x HTTP/1.0\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(5),
    );
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
        "{}",
        text
    );
    assert!(text.ends_with("p:/x"), "{}", text);
    // raw_exchange returned because the server closed (not the 5 s timeout): check the header
    assert!(
        !text
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{}",
        text
    );
}

#[test]
fn http10_response_closes_connection() {
    let s = server(PROTO);
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(b"GET /x HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let r = read_response(&mut c).expect("response");
    assert_eq!(r.text(), "p:/x");
    assert!(
        closes_within(&mut c, Duration::from_secs(3)),
        "HTTP/1.0 connection left open"
    );
}

#[test]
fn keepalive_two_requests_on_one_connection() {
    let s = server(PROTO);
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let r1 = read_response(&mut c).expect("first");
    assert_eq!(r1.text(), "p:/one");
    assert_ne!(
        r1.header("connection").map(|v| v.to_ascii_lowercase()),
        Some("close".into())
    );
    c.write_all(b"GET /two HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let r2 = read_response(&mut c).expect("second");
    assert_eq!(r2.text(), "p:/two");
}

#[test]
fn pipelined_requests_in_one_write_all_answered() {
    // Exact check without relying on the harness reader's buffering: read everything until
    // the server closes after the last request (Connection: close).
    let s = server(
        PROTO
            .replace("keepalive_requests 2;", "keepalive_requests 100;")
            .as_str(),
    );
    let raw = raw_exchange(
        &s,
        b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\nGET /second HTTP/1.1\r\nHost: localhost\r\n\r\nGET /third HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 3, "{}", text);
    let (p1, p2, p3) = (
        text.find("p:/first"),
        text.find("p:/second"),
        text.find("p:/third"),
    );
    assert!(
        p1.is_some() && p2.is_some() && p3.is_some() && p1 < p2 && p2 < p3,
        "{}",
        text
    );
}

#[test]
fn keepalive_requests_limit_closes_after_nth() {
    let s = server(PROTO);
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let r1 = read_response(&mut c).expect("first");
    assert_ne!(
        r1.header("connection").map(|v| v.to_ascii_lowercase()),
        Some("close".into())
    );
    c.write_all(b"GET /2 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let r2 = read_response(&mut c).expect("second");
    assert_eq!(r2.text(), "p:/2");
    assert_eq!(
        r2.header("connection").map(|v| v.to_ascii_lowercase()),
        Some("close".into()),
        "{:?}",
        r2.headers
    );
    assert!(
        closes_within(&mut c, Duration::from_secs(3)),
        "connection not closed after keepalive_requests"
    );
}

#[test]
fn connection_close_request_is_honoured() {
    let s = server(PROTO);
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(b"GET /c HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("write");
    let r = read_response(&mut c).expect("response");
    assert_eq!(
        r.header("connection").map(|v| v.to_ascii_lowercase()),
        Some("close".into())
    );
    assert!(closes_within(&mut c, Duration::from_secs(3)));
}

#[test]
fn malformed_request_line_is_400() {
    let s = server(PROTO);
    let raw = raw_exchange(&s, b"THIS IS NOT HTTP\r\n\r\n", Duration::from_secs(5));
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 400"), "{:?}", text);
}

#[test]
fn garbage_in_header_line_is_400() {
    let s = server(PROTO);
    let raw = raw_exchange(
        &s,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n",
        Duration::from_secs(5),
    );
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 400"), "{:?}", text);
}

#[test]
fn huge_header_is_rejected() {
    let s = server(PROTO);
    let big = "a".repeat(70 * 1024);
    let raw = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        big
    );
    let out = raw_exchange(&s, raw.as_bytes(), Duration::from_secs(5));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 400")
            || text.starts_with("HTTP/1.1 431")
            || text.starts_with("HTTP/1.1 494"),
        "{:?}",
        &text[..text.len().min(300)]
    );
}

#[test]
fn body_over_client_max_body_size_is_413() {
    let s = server(PROTO);
    let body = "x".repeat(100);
    let r = s.request(&format!("POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}", body));
    assert_eq!(r.status, 413);
    assert!(
        r.text().contains("413 Request Entity Too Large"),
        "{}",
        r.text()
    );
    let r = s.request("POST /body HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
}

#[test]
fn chunked_body_over_limit_is_413() {
    let s = server(PROTO);
    let chunk = "x".repeat(50);
    let r = s.request(&format!(
        "POST /body HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n32\r\n{}\r\n32\r\n{}\r\n0\r\n\r\n",
        chunk, chunk
    ));
    assert_eq!(r.status, 413);
}

#[test]
fn head_has_headers_and_no_body() {
    let s = server(PROTO);
    let raw = raw_exchange(
        &s,
        b"HEAD / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("no header end");
    assert!(head.starts_with("HTTP/1.1 200"), "{}", head);
    assert!(
        head.to_ascii_lowercase().contains("content-type:"),
        "{}",
        head
    );
    assert_eq!(body, "", "HEAD response carried a body");
}

#[test]
fn date_and_server_headers_present() {
    let s = server(PROTO);
    let r = s.get("/");
    assert!(r.header("date").is_some(), "{:?}", r.headers);
    let server = r.header("server").unwrap_or("");
    assert!(!server.is_empty(), "{:?}", r.headers);
}

#[test]
fn server_tokens_off_hides_version() {
    let s =
        server("server_tokens off;\nserver { listen 127.0.0.1:PORT; location / { return 404; } }");
    let r = s.get("/");
    let server = r.header("server").unwrap_or("").to_string();
    assert!(!server.contains('/'), "Server: {}", server);
    assert!(
        !r.text()
            .contains(&format!("/{}", env!("CARGO_PKG_VERSION"))),
        "{}",
        r.text()
    );
}

#[test]
fn unsupported_http_version_is_rejected() {
    let s = server(PROTO);
    let raw = raw_exchange(
        &s,
        b"GET / HTTP/3.7\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(5),
    );
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.starts_with("HTTP/1.1 505") || text.starts_with("HTTP/1.1 400"),
        "{:?}",
        text
    );
}
