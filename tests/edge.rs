//! The edge of the request walk, over real sockets: `map` (exact, hostnames, regexes with
//! captures, default, volatile, from add_header / return / log_format / Lua), realip (trusted
//! proxies, `X-Forwarded-For` walks, spoofing, IPv6), `allow`/`deny`, `max_in_flight`
//! backpressure and `worker_connections`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

fn conf(workers: usize, worker_connections: usize, http_body: &str) -> String {
    format!(
        "worker_processes {workers};\nerror_log logs/error.log info;\npid logs/nginx.pid;\nevents {{ worker_connections {worker_connections}; }}\nhttp {{\n    access_log logs/access.log;\n{http_body}\n}}\n"
    )
}

/// An http block with one server on 127.0.0.1:PORT holding `server_body`.
fn start(http_extra: &str, server_body: &str) -> Server {
    Server::start(&http_conf(&format!(
        "{http_extra}\n    server {{\n        listen 127.0.0.1:PORT;\n        server_name localhost;\n{server_body}\n    }}\n"
    )))
}

/// GET `path` with extra header lines (each without CRLF).
fn get_h(s: &Server, path: &str, extra: &[&str]) -> Response {
    s.request(&raw_get(path, "localhost", extra))
}

fn raw_get(path: &str, host: &str, extra: &[&str]) -> String {
    let mut raw = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in extra {
        raw.push_str(h);
        raw.push_str("\r\n");
    }
    raw.push_str("\r\n");
    raw
}

fn request_to(addr: SocketAddr, raw: &str) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(raw.as_bytes()).expect("write");
    read_response(&mut s).expect("response")
}

fn wait_for(what: impl Fn() -> String, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = what();
        if t.contains(needle) || Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tidegate -t` on a config: (exit code, stderr).
fn test_conf(text: &str) -> (i32, String) {
    let dir = prefix_with(&[("conf/nginx.conf", text)], 1);
    let (code, _, err) = run_cli(dir.path(), &["-c", "conf/nginx.conf", "-t"]);
    (code, err)
}

// ---------------------------------------------------------------- map

#[test]
fn map_exact_keys_default_and_case() {
    let s = start(
        r#"
    map $arg_k $picked {
        default  dflt;
        foo      F;
        Bar      B;
        ''       empty;
        \default literal-default;
        "a b"    spaced;
    }
    map $arg_k $nodefault {
        x 1;
    }"#,
        r#"
        location / { return 200 "[$picked][$nodefault]"; }"#,
    );
    assert_eq!(s.get("/?k=foo").text(), "[F][]");
    // nginx matches map keys case-insensitively.
    assert_eq!(s.get("/?k=bAR").text(), "[B][]");
    assert_eq!(s.get("/?k=zzz").text(), "[dflt][]");
    // A missing source is the empty string.
    assert_eq!(s.get("/").text(), "[empty][]");
    assert_eq!(s.get("/?k=default").text(), "[literal-default][]");
    assert_eq!(s.get("/?k=a%20b").text(), "[dflt][]");
    assert_eq!(s.get("/?k=x").text(), "[dflt][1]");
}

#[test]
fn map_regex_captures_and_precedence() {
    let s = start(
        r#"
    map $uri $route {
        default                          none;
        /api/v1/exact                    exact-wins;
        ~^/api/(?<ver>v\d+)/(.+)$        "$ver:$2";
        ~*^/STATIC/(.*)\.(png|jpg)$      "img:$1.$2";
        ~^/api/                          never-reached-for-versioned;
        ~^/x/(.*)$                       "x=$1 host=$host";
    }"#,
        r#"
        location / { return 200 "$route"; }
        location ~ ^/x/(..) { return 200 "$route|$1"; }"#,
    );
    assert_eq!(s.get("/api/v1/exact").text(), "exact-wins");
    assert_eq!(s.get("/api/v2/users/7").text(), "v2:users/7");
    assert_eq!(s.get("/static/a/b.png").text(), "img:a/b.png");
    assert_eq!(s.get("/api/other").text(), "never-reached-for-versioned");
    // Values mix captures and request variables; the map's own regex does not change the
    // location's $1.
    assert_eq!(s.get("/x/yzw").text(), "x=yzw host=localhost|yz");
    assert_eq!(s.get("/nothing").text(), "none");
}

#[test]
fn map_named_captures_become_variables() {
    let s = start(
        r#"
    map $uri $section {
        ~^/(?<first>[a-z]+)/ "$first";
    }"#,
        r#"
        location / { return 200 "$section|$first"; }"#,
    );
    // Once the map matched, $first is a variable of the request, as nginx makes it.
    assert_eq!(s.get("/abc/def").text(), "abc|abc");
}

#[test]
fn map_hostnames_wildcards() {
    let s = start(
        r#"
    map $http_host $site {
        hostnames;
        default            other;
        example.com        exact;
        *.example.com      star;
        *.api.example.com  api-star;
        .example.org       dot;
        mail.*             mail;
        ~^r(\d+)\.test$    "regex-$1";
    }
    map $http_host $plain {
        *.example.com      star-literal;
        default            no;
    }"#,
        r#"
        location / { return 200 "$site/$plain"; }"#,
    );
    let host = |h: &str| {
        s.request(&raw_get("/", h, &[]))
            .text()
            .split('/')
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(host("example.com"), "exact");
    assert_eq!(host("EXAMPLE.com."), "exact");
    assert_eq!(host("www.example.com"), "star");
    // The longest wildcard wins.
    assert_eq!(host("v1.api.example.com"), "api-star");
    assert_eq!(host("example.org"), "dot");
    assert_eq!(host("a.b.example.org"), "dot");
    assert_eq!(host("mail.corp.net"), "mail");
    assert_eq!(host("r42.test"), "regex-42");
    assert_eq!(host("nope.net"), "other");
    // Without `hostnames`, a `*.` key is an ordinary string.
    let r = s.request(&raw_get("/", "www.example.com", &[]));
    assert_eq!(r.text(), "star/no");
}

#[test]
fn map_connection_upgrade_idiom_from_add_header() {
    let s = start(
        r#"
    map $http_upgrade $connection_upgrade {
        default upgrade;
        ''      close;
    }"#,
        r#"
        location / {
            add_header X-Conn $connection_upgrade;
            return 200 "ok";
        }"#,
    );
    let r = get_h(&s, "/", &["Upgrade: websocket"]);
    assert_eq!(r.header("x-conn"), Some("upgrade"));
    let r = get_h(&s, "/", &[]);
    assert_eq!(r.header("x-conn"), Some("close"));
}

#[test]
fn map_from_lua_log_format_and_chained_maps() {
    let s = start(
        r#"
    map $arg_tier $limit {
        default 10;
        gold    $gold_limit;
    }
    map $arg_region $gold_limit {
        default 100;
        eu      200;
    }
    log_format edge '$remote_addr tier=$limit';"#,
        r#"
        access_log logs/edge.log edge;
        location /lua {
            content_by_lua_block {
                ngx.say(ngx.var.limit, " ", tostring(ngx.var.gold_limit))
            }
        }"#,
    );
    assert_eq!(s.get("/lua?tier=gold&region=eu").text(), "200 200\n");
    assert_eq!(s.get("/lua?tier=x").text(), "10 100\n");
    let log = wait_for(
        || std::fs::read_to_string(s.path("logs/edge.log")).unwrap_or_default(),
        "tier=10",
    );
    assert!(log.contains("127.0.0.1 tier=200"), "{log}");
    assert!(log.contains("127.0.0.1 tier=10"), "{log}");
}

#[test]
fn map_values_are_cached_per_request_unless_volatile() {
    let s = start(
        r#"
    map $args $cached {
        default "args=$args";
    }
    map $args $fresh {
        volatile;
        default "args=$args";
    }"#,
        r#"
        location / {
            content_by_lua_block {
                local a1, b1 = ngx.var.cached, ngx.var.fresh
                ngx.var.args = "changed=1"
                ngx.say(a1, " ", ngx.var.cached, " | ", b1, " ", ngx.var.fresh)
            }
        }"#,
    );
    assert_eq!(
        s.get("/?first=1").text(),
        "args=first=1 args=first=1 | args=first=1 args=changed=1\n"
    );
    // A new request computes afresh.
    assert_eq!(
        s.get("/?second=2").text(),
        "args=second=2 args=second=2 | args=second=2 args=changed=1\n"
    );
}

#[test]
fn map_cycle_is_an_error_not_a_crash() {
    let s = start(
        r#"
    map $a_var $b_var { default $a_var; }
    map $b_var $a_var { default $b_var; }"#,
        r#"
        location / { return 200 "[$a_var]"; }"#,
    );
    let r = s.get("/");
    assert_eq!(r.status, 200);
    let log = wait_for(|| s.error_log(), "cycle while evaluating variable");
    assert!(log.contains("cycle while evaluating variable"), "{log}");
    assert_eq!(s.get("/").status, 200);
}

#[test]
fn map_config_errors_in_nginx_words() {
    let cases: &[(&str, &str)] = &[
        (
            "map $uri b { }",
            "invalid variable name \"b\" in conf/nginx.conf:6",
        ),
        (
            "map $uri $b { default x; default y; }",
            "duplicate default map parameter in conf/nginx.conf:6",
        ),
        (
            "map $uri $b {\n foo 1 2;\n }",
            "invalid number of the map parameters in conf/nginx.conf:7",
        ),
        (
            "map $uri $b {\n foo 1;\n FOO 2;\n }",
            "conflicting parameter \"foo\" in conf/nginx.conf:8",
        ),
        ("map $uri $b { ~(unclosed x; }", "pcre2_compile() failed"),
        (
            "map $uri $host { default x; }",
            "the duplicate \"host\" variable",
        ),
        (
            "map $uri $b {\n hostnames;\n a*b x;\n }",
            "invalid hostname or wildcard \"a*b\"",
        ),
        (
            "map $uri $b { default $nosuch; }",
            "unknown \"nosuch\" variable",
        ),
        (
            "map $uri { }",
            "invalid number of arguments in \"map\" directive",
        ),
    ];
    for (body, want) in cases {
        let text = format!(
            "events {{ }}\nerror_log logs/error.log;\npid logs/nginx.pid;\nhttp {{\n    server {{ listen 127.0.0.1:1; }}\n{body}\n}}\n"
        );
        let (code, err) = test_conf(&text);
        assert_eq!(code, 1, "{body}: {err}");
        assert!(err.contains(want), "{body}: want {want:?} in {err}");
    }
    // map_hash_* are accepted (and ignored); `include` works inside a map block.
    let dir = prefix_with(
        &[
            (
                "conf/nginx.conf",
                "events { }\nerror_log logs/error.log;\nhttp {\n map_hash_max_size 4096;\n map_hash_bucket_size 128;\n map $uri $b { include map.inc; }\n server { listen 127.0.0.1:1; location / { return 200 $b; } }\n}\n",
            ),
            ("conf/map.inc", "x 1;\ny 2;\n"),
        ],
        1,
    );
    let (code, _, err) = run_cli(dir.path(), &["-c", "conf/nginx.conf", "-t"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn map_include_values_are_used() {
    let s = Server::start_with(
        &http_conf(
            "    map $arg_k $v { include map.inc; default d; }\n    server {\n        listen 127.0.0.1:PORT;\n        location / { return 200 $v; }\n    }\n",
        ),
        &[("conf/map.inc", "x one;\ny two;\n")],
    );
    assert_eq!(s.get("/?k=y").text(), "two");
    assert_eq!(s.get("/?k=q").text(), "d");
}

// ---------------------------------------------------------------- realip

const SHOW: &str = r#"return 200 "$remote_addr|$remote_port|$realip_remote_addr";"#;

fn show_conf(realip: &str) -> String {
    http_conf(&format!(
        r#"
    server {{
        listen 127.0.0.1:PORT;
        server_name localhost;
        {realip}
        location / {{ {SHOW} }}
        location /lua {{ content_by_lua_block {{ ngx.say(ngx.var.remote_addr, " ", ngx.var.realip_remote_addr) }} }}
    }}"#
    ))
}

fn parts(r: &Response) -> Vec<String> {
    r.text().split('|').map(str::to_string).collect()
}

#[test]
fn realip_x_forwarded_for_recursive_walk() {
    let s = Server::start(&show_conf(
        "set_real_ip_from 127.0.0.1; set_real_ip_from 10.0.0.0/8; real_ip_header X-Forwarded-For; real_ip_recursive on;",
    ));
    // The client (6.6.6.6 at the left) is not believed: the first untrusted address from the
    // right is.
    let r = get_h(
        &s,
        "/",
        &["X-Forwarded-For: 6.6.6.6, 203.0.113.9, 10.0.0.5"],
    );
    let p = parts(&r);
    assert_eq!(p[0], "203.0.113.9");
    assert_eq!(p[1], "", "no port in the header: none");
    assert_eq!(p[2], "127.0.0.1");
    // Several headers are one list.
    let r = get_h(
        &s,
        "/",
        &["X-Forwarded-For: 198.51.100.1", "X-Forwarded-For: 10.1.1.1"],
    );
    assert_eq!(parts(&r)[0], "198.51.100.1");
    // All trusted: the leftmost.
    let r = get_h(&s, "/", &["X-Forwarded-For: 10.9.9.9, 10.0.0.5"]);
    assert_eq!(parts(&r)[0], "10.9.9.9");
    // Garbage at the right end: the connection's address stays.
    let r = get_h(&s, "/", &["X-Forwarded-For: 1.2.3.4, unknown"]);
    assert_eq!(parts(&r)[0], "127.0.0.1");
    // No header: the connection's address.
    assert_eq!(parts(&s.get("/"))[0], "127.0.0.1");
    // Lua sees the same.
    let r = get_h(&s, "/lua", &["X-Forwarded-For: 192.0.2.7"]);
    assert_eq!(r.text(), "192.0.2.7 127.0.0.1\n");
}

#[test]
fn realip_not_recursive_takes_the_last_address() {
    let s = Server::start(&show_conf(
        "set_real_ip_from 127.0.0.0/8; set_real_ip_from 10.0.0.0/8; real_ip_header X-Forwarded-For; real_ip_recursive off;",
    ));
    let r = get_h(&s, "/", &["X-Forwarded-For: 203.0.113.9, 10.0.0.5"]);
    assert_eq!(parts(&r)[0], "10.0.0.5");
}

#[test]
fn realip_untrusted_client_cannot_spoof() {
    let s = Server::start(&show_conf(
        "set_real_ip_from 10.0.0.0/8; real_ip_header X-Forwarded-For; real_ip_recursive on;",
    ));
    let r = get_h(&s, "/", &["X-Forwarded-For: 1.2.3.4", "X-Real-IP: 5.6.7.8"]);
    let p = parts(&r);
    assert_eq!(p[0], "127.0.0.1");
    assert_ne!(p[1], "", "the connection's port");
    assert_eq!(p[2], "127.0.0.1");
}

#[test]
fn realip_x_real_ip_default_with_port_and_logs() {
    let s = Server::start(&http_conf(
        r#"
    log_format real '$remote_addr:$remote_port via $realip_remote_addr';
    server {
        listen 127.0.0.1:PORT;
        server_name localhost;
        set_real_ip_from 127.0.0.1;
        access_log logs/real.log real;
        location / { return 200 "$remote_addr|$remote_port"; }
        location /deny { deny 192.0.2.0/24; content_by_lua_block { ngx.print("allowed") } }
    }"#,
    ));
    let r = get_h(&s, "/", &["X-Real-IP: 192.0.2.10:4711"]);
    assert_eq!(r.text(), "192.0.2.10|4711");
    let r = get_h(&s, "/", &["X-Real-IP: [2001:db8::5]:8080"]);
    assert_eq!(r.text(), "2001:db8::5|8080");
    // X-Forwarded-For is not read unless configured.
    let r = get_h(&s, "/", &["X-Forwarded-For: 192.0.2.11"]);
    assert!(r.text().starts_with("127.0.0.1|"), "{}", r.text());
    // allow/deny and the error log see the real client.
    let r = get_h(&s, "/deny", &["X-Real-IP: 192.0.2.10"]);
    assert_eq!(r.status, 403);
    let log = wait_for(|| s.error_log(), "access forbidden by rule");
    assert!(
        log.contains("access forbidden by rule, client: 192.0.2.10"),
        "{log}"
    );
    let access = wait_for(
        || std::fs::read_to_string(s.path("logs/real.log")).unwrap_or_default(),
        "192.0.2.10:4711",
    );
    assert!(access.contains("192.0.2.10:4711 via 127.0.0.1"), "{access}");
}

#[test]
fn realip_custom_header_and_location_level() {
    let s = Server::start(&http_conf(
        r#"
    server {
        listen 127.0.0.1:PORT;
        server_name localhost;
        location / { return 200 "$remote_addr"; }
        location /cdn {
            set_real_ip_from 127.0.0.1;
            real_ip_header CF-Connecting-IP;
            content_by_lua_block { ngx.print(ngx.var.remote_addr) }
        }
    }"#,
    ));
    // Location-level settings apply before access (nginx's preaccess run), not in the
    // server's rewrite phase.
    let r = get_h(&s, "/cdn", &["CF-Connecting-IP: 198.51.100.77"]);
    assert_eq!(r.text(), "198.51.100.77");
    let r = get_h(&s, "/", &["CF-Connecting-IP: 198.51.100.77"]);
    assert_eq!(r.text(), "127.0.0.1");
}

#[test]
fn realip_ipv6_trusted_network_on_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback on this machine");
        return;
    }
    let s = Server::start(&http_conf(
        r#"
    server {
        listen 127.0.0.1:PORT;
        listen [::1]:PORT;
        server_name localhost;
        set_real_ip_from ::1/128;
        set_real_ip_from 2001:db8::/32;
        real_ip_header X-Forwarded-For;
        real_ip_recursive on;
        location / { return 200 "$remote_addr|$realip_remote_addr"; }
        location /v6only { deny ::1; content_by_lua_block { ngx.print("in") } }
    }"#,
    ));
    let v6: SocketAddr = format!("[::1]:{}", s.port).parse().expect("addr");
    let r = request_to(
        v6,
        &raw_get(
            "/",
            "localhost",
            &["X-Forwarded-For: 192.0.2.1, 2001:db8::9"],
        ),
    );
    assert_eq!(r.text(), "192.0.2.1|::1");
    // Over IPv4 the same header is not believed (127.0.0.1 is not trusted here).
    let r = get_h(&s, "/", &["X-Forwarded-For: 192.0.2.1"]);
    assert_eq!(r.text(), "127.0.0.1|127.0.0.1");
    let r = request_to(v6, &raw_get("/v6only", "localhost", &[]));
    assert_eq!(r.status, 403);
}

#[test]
fn realip_config_errors() {
    let cases: &[(&str, &str)] = &[
        (
            "real_ip_header proxy_protocol;",
            "the \"proxy_protocol\" parameter of \"real_ip_header\" is not supported yet",
        ),
        (
            "set_real_ip_from 10.0.0.0/40;",
            "invalid parameter \"10.0.0.0/40\"",
        ),
        (
            "set_real_ip_from no-such-host.invalid;",
            "host not found in set_real_ip_from \"no-such-host.invalid\"",
        ),
        ("real_ip_recursive maybe;", "it must be \"on\" or \"off\""),
        ("allow 1.2.3.x;", "invalid parameter \"1.2.3.x\""),
        (
            "max_in_flight lots;",
            "invalid value \"lots\" in \"max_in_flight\" directive",
        ),
    ];
    for (line, want) in cases {
        let text = format!(
            "events {{ }}\nerror_log logs/error.log;\nhttp {{\n    server {{\n listen 127.0.0.1:1;\n {line}\n }}\n}}\n"
        );
        let (code, err) = test_conf(&text);
        assert_eq!(code, 1, "{line}: {err}");
        assert!(err.contains(want), "{line}: want {want:?} in {err}");
        assert!(err.contains("conf/nginx.conf:6"), "{line}: {err}");
    }
}

// ---------------------------------------------------------------- allow / deny

#[test]
fn allow_deny_first_match_wins() {
    let s = start(
        "",
        r#"
        location /admin { allow 10.0.0.0/8; deny all; content_by_lua_block { ngx.print("admin") } }
        location /ok { deny 10.0.0.1; allow 127.0.0.1; deny all; content_by_lua_block { ngx.print("ok") } }
        location /net { deny 127.0.0.0/8; allow all; content_by_lua_block { ngx.print("net") } }
        location /inherit { content_by_lua_block { ngx.print("inherit") } }
        location /lua {
            allow 127.0.0.1;
            deny all;
            access_by_lua_block { ngx.header["X-Access-Lua"] = "ran" }
            content_by_lua_block { ngx.say("lua") }
        }"#,
    );
    let r = s.get("/admin");
    assert_eq!(r.status, 403);
    assert_eq!(s.get("/ok").text(), "ok");
    assert_eq!(s.get("/net").status, 403);
    assert_eq!(s.get("/inherit").text(), "inherit");
    let r = s.get("/lua");
    assert_eq!(r.text(), "lua\n");
    assert_eq!(r.header("x-access-lua"), Some("ran"));
    let log = wait_for(|| s.error_log(), "access forbidden by rule");
    assert!(log.contains("[error]"), "{log}");
    assert!(
        log.contains("access forbidden by rule, client: 127.0.0.1"),
        "{log}"
    );
}

#[test]
fn allow_deny_inherit_from_server_and_error_page() {
    let s = start(
        "",
        r#"
        deny 127.0.0.1;
        error_page 403 /denied.html;
        location / { content_by_lua_block { ngx.print("in") } }
        location = /denied.html { allow all; return 200 "custom denied page"; }
        location /open { allow all; content_by_lua_block { ngx.print("open") } }"#,
    );
    let r = s.get("/");
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "custom denied page");
    assert_eq!(s.get("/open").text(), "open");
}

// ---------------------------------------------------------------- max_in_flight

const SLOW: &str = r#"
        location /slow {
            max_in_flight 2;
            content_by_lua_block {
                ngx.shared.edge:incr("started", 1, 0)
                ngx.sleep(tonumber(ngx.var.arg_t) or 0.8)
                ngx.say("done")
            }
        }
        location /started {
            content_by_lua_block { ngx.print(ngx.shared.edge:get("started") or 0) }
        }"#;

fn spawn_get(addr: SocketAddr, path: &str) -> std::thread::JoinHandle<Option<Response>> {
    let raw = raw_get(path, "localhost", &[]);
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(raw.as_bytes()).ok()?;
        read_response(&mut s).ok()
    })
}

fn wait_started(s: &Server, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if s.get("/started").text().parse::<usize>().unwrap_or(0) >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{n} slow requests did not start");
}

#[test]
fn max_in_flight_rejects_at_once_and_frees_slots() {
    let s = start("    lua_shared_dict edge 1m;", SLOW);
    let a = spawn_get(s.addr(), "/slow");
    let b = spawn_get(s.addr(), "/slow");
    wait_started(&s, 2);
    let t = Instant::now();
    let r = s.get("/slow");
    assert_eq!(r.status, 503);
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "503 must come at once, took {:?}",
        t.elapsed()
    );
    // Other locations are not limited.
    assert_eq!(s.get("/started").status, 200);
    for h in [a, b] {
        let r = h.join().expect("thread").expect("response");
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "done\n");
    }
    // The slots are free again.
    assert_eq!(s.get("/slow?t=0").status, 200);
    let log = wait_for(|| s.error_log(), "max_in_flight limit 2 reached");
    assert!(log.contains("[warn]"), "{log}");
    assert!(
        log.contains("max_in_flight limit 2 reached, client: 127.0.0.1"),
        "{log}"
    );
}

#[test]
fn max_in_flight_slots_freed_on_lua_error_exit_and_client_abort() {
    let s = start(
        "    lua_shared_dict edge 1m;",
        r#"
        max_in_flight 1;
        location /err { content_by_lua_block { error("boom") } }
        location /exit { access_by_lua_block { ngx.exit(451) } }
        location /abort {
            content_by_lua_block {
                ngx.shared.edge:incr("started", 1, 0)
                ngx.sleep(0.3)
                ngx.shared.edge:incr("finished", 1, 0)
                ngx.say("late")
            }
        }
        location /started { max_in_flight off; content_by_lua_block { ngx.print(ngx.shared.edge:get("started") or 0) } }
        location /finished { max_in_flight off; content_by_lua_block { ngx.print(ngx.shared.edge:get("finished") or 0) } }
        location / { content_by_lua_block { ngx.print("ok") } }"#,
    );
    for _ in 0..3 {
        assert_eq!(s.get("/err").status, 500);
        assert_eq!(s.get("/exit").status, 451);
    }
    // A client that goes away mid-request: its request holds the slot until it ends.
    {
        let mut c = TcpStream::connect(s.addr()).expect("connect");
        c.write_all(raw_get("/abort", "localhost", &[]).as_bytes())
            .expect("write");
        wait_started(&s, 1);
    }
    assert_eq!(s.get("/").status, 503);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.get("/finished").text() != "1" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Give the log phase a moment after the handler's last line.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = 0;
    while Instant::now() < deadline {
        last = s.get("/").status;
        if last == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(last, 200);
}

#[test]
fn max_in_flight_is_shared_by_all_workers() {
    let s = Server::start(&conf(
        2,
        1024,
        &format!(
            "    lua_shared_dict edge 1m;\n    server {{\n        listen 127.0.0.1:PORT;\n        server_name localhost;\n{SLOW}\n    }}\n"
        ),
    ));
    // Many connections spread over both workers by SO_REUSEPORT: the cap is still 2.
    let handles: Vec<_> = (0..6).map(|_| spawn_get(s.addr(), "/slow?t=1")).collect();
    let statuses: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().expect("thread").map(|r| r.status).unwrap_or(0))
        .collect();
    let ok = statuses.iter().filter(|c| **c == 200).count();
    let busy = statuses.iter().filter(|c| **c == 503).count();
    assert_eq!((ok, busy), (2, 4), "{statuses:?}");
}

#[test]
fn max_in_flight_inherits_and_location_overrides() {
    let s = start(
        "    lua_shared_dict edge 1m;\n    max_in_flight 1;",
        r#"
        location /slow {
            max_in_flight 5;
            content_by_lua_block {
                ngx.shared.edge:incr("started", 1, 0)
                ngx.sleep(0.6)
                ngx.say("done")
            }
        }
        location /started { max_in_flight 0; content_by_lua_block { ngx.print(ngx.shared.edge:get("started") or 0) } }
        location /one {
            content_by_lua_block { ngx.sleep(0.6) ngx.say("one") }
        }"#,
    );
    let hs: Vec<_> = (0..3).map(|_| spawn_get(s.addr(), "/slow")).collect();
    wait_started(&s, 3);
    // /slow has its own scope of 5; /one inherits the http-level 1.
    let one = spawn_get(s.addr(), "/one");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(s.get("/one").status, 503);
    for h in hs {
        assert_eq!(h.join().expect("thread").map(|r| r.status), Some(200));
    }
    assert_eq!(one.join().expect("thread").map(|r| r.status), Some(200));
}

// ---------------------------------------------------------------- worker_connections

#[test]
fn worker_connections_excess_connections_are_closed() {
    let s = Server::start(&conf(
        1,
        3,
        "    server {\n        listen 127.0.0.1:PORT;\n        location / { return 200 \"ok\"; }\n    }\n",
    ));
    // The harness's readiness probe connected and left: wait until it is gone.
    std::thread::sleep(Duration::from_millis(200));
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(s.addr()).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(s.addr()).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let _ = extra.write_all(raw_get("/", "localhost", &[]).as_bytes());
    let mut buf = [0u8; 64];
    let closed = matches!(extra.read(&mut buf), Ok(0) | Err(_));
    assert!(
        closed,
        "the connection past worker_connections must be closed"
    );
    let log = wait_for(|| s.error_log(), "worker_connections are not enough");
    assert!(
        log.contains("[alert]") && log.contains("3 worker_connections are not enough"),
        "{log}"
    );
    // Once a held connection is served and closed, new ones are accepted again.
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(s.get("/").text(), "ok");
}
