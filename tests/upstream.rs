//! `upstream {}` blocks over the real binary: configuration errors as `nginx -t` words them,
//! the shared peer state seen from Lua (`ngx.upstream`), active health checks against real
//! HTTP servers, state kept across a reload, `ngx.balancer` outside its phase, and end to end
//! through `proxy_pass`: weights, a failed peer out and back, a breaker opening, health checks,
//! consistent hashing, EWMA, and balancer_by_lua choosing from `ngx.var` / `ngx.ctx`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A tiny HTTP backend on 127.0.0.1:0 answering every request with `status` and a body naming
/// itself; the status can change while it runs. Stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub status: Arc<AtomicU16>,
    /// Milliseconds to wait before answering.
    pub delay_ms: Arc<AtomicU64>,
    pub hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(status: u16, name: &str) -> Backend {
        Backend::start_on(0, status, name)
    }

    /// On a given port (0: any), e.g. to bring back a peer that was refusing.
    pub fn start_on(port: u16, status: u16, name: &str) -> Backend {
        let l = TcpListener::bind(("127.0.0.1", port)).expect("bind backend");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("addr");
        let status = Arc::new(AtomicU16::new(status));
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (st, h, sp, name) = (status.clone(), hits.clone(), stop.clone(), name.to_string());
        let dl = delay_ms.clone();
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (st, h, name, dl) = (st.clone(), h.clone(), name.clone(), dl.clone());
                        std::thread::spawn(move || serve(s, &st, &h, &dl, &name));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Backend {
            addr,
            status,
            delay_ms,
            hits,
            stop,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(mut s: TcpStream, status: &AtomicU16, hits: &AtomicUsize, delay: &AtomicU64, name: &str) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    // Keep-alive: answer requests until the peer closes (bounded).
    for _ in 0..1000 {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        loop {
            match s.read(&mut tmp) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        hits.fetch_add(1, Ordering::Relaxed);
        let d = delay.load(Ordering::Relaxed);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d));
        }
        let code = status.load(Ordering::Relaxed);
        let body = format!("{}\n", name);
        let resp = format!(
            "HTTP/1.1 {} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{}",
            code,
            body.len(),
            body
        );
        if s.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A port nothing listens on.
fn refused_port() -> u16 {
    free_port()
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {}", what);
}

/// `-t` on a config; returns (exit code, stderr).
fn test_conf(conf: &str) -> (i32, String) {
    let dir = prefix_with(&[("conf/nginx.conf", conf)], free_port());
    let (code, _, err) = run_cli(dir.path(), &["-c", "conf/nginx.conf", "-t"]);
    (code, err)
}

#[test]
fn upstream_block_passes_test() {
    let conf = http_conf(
        "upstream backend {\n  least_conn;\n  server 127.0.0.1:8081 weight=3 max_fails=2 fail_timeout=5s max_conns=10;\n  server localhost:8082 backup;\n  server 127.0.0.1:8083 down;\n  keepalive 16;\n  keepalive_timeout 30s;\n  keepalive_requests 500;\n  zone backend 64k;\n  health_check interval=1s timeout=500ms uri=/health fails=2 passes=1 expect=200-299,304;\n  circuit_breaker failures=3 window=5s open=2s half_open=2;\n}\nupstream hashed { hash $request_uri consistent; server 127.0.0.1:1; server 127.0.0.1:2; }\nupstream lua { server 0.0.0.1; balancer_by_lua_block { local b = require \"ngx.balancer\" } }\nserver { listen PORT; location / { return 200; } }",
    );
    let (code, err) = test_conf(&conf);
    assert_eq!(code, 0, "{}", err);
}

#[test]
fn host_not_found_names_file_and_line() {
    let conf = http_conf(
        "upstream backend {\n  server no-such-host.invalid:8080;\n}\nserver { listen PORT; }",
    );
    let (code, err) = test_conf(&conf);
    assert_eq!(code, 1, "{}", err);
    // http_conf puts the http body on line 7.
    assert!(
        err.contains("host not found in upstream \"no-such-host.invalid:8080\" in ")
            && err.contains("nginx.conf:8"),
        "{}",
        err
    );
}

#[test]
fn bad_upstream_configs_are_rejected_in_nginx_words() {
    let cases = [
        (
            "upstream u { server 127.0.0.1:1 weight=0; }",
            "invalid parameter \"weight=0\"",
        ),
        (
            "upstream u { server 127.0.0.1:1 bogus; }",
            "invalid parameter \"bogus\"",
        ),
        (
            "upstream u { ip_hash; server 127.0.0.1:1 backup; }",
            "balancing method does not support parameter \"backup\"",
        ),
        (
            "upstream u { server 127.0.0.1:1; }\nupstream u { server 127.0.0.1:2; }",
            "duplicate upstream \"u\"",
        ),
        ("upstream u { }", "no servers are inside upstream \"u\""),
        (
            "upstream u { server 127.0.0.1:1; health_check interval=0s; }",
            "invalid parameter \"interval=0s\"",
        ),
        (
            "upstream u { server 127.0.0.1:1; circuit_breaker failures=x; }",
            "invalid parameter \"failures=x\"",
        ),
        (
            "upstream u { server 127.0.0.1:1; keepalive 0; }",
            "invalid value \"0\" in \"keepalive\" directive",
        ),
        (
            "server { listen PORT; location / { balancer_by_lua_block { } } }",
            "\"balancer_by_lua_block\" directive is not allowed here",
        ),
        (
            "upstream u { server 127.0.0.1:1; listen 80; }",
            "\"listen\" directive is not allowed here",
        ),
    ];
    for (body, want) in cases {
        let (code, err) = test_conf(&http_conf(body));
        assert_eq!(code, 1, "{}: {}", body, err);
        assert!(err.contains(want), "{}: want {:?} in {}", body, want, err);
    }
}

fn peers_lua(name: &str) -> String {
    format!(
        r#"local up = require "ngx.upstream"
            local peers, err = up.get_primary_peers("{name}")
            if not peers then ngx.say("err: ", err) return end
            for _, p in ipairs(peers) do
                ngx.say(p.id, " ", p.name, " w=", p.weight, " healthy=", tostring(p.healthy),
                    " down=", tostring(p.down or false), " breaker=", tostring(p.breaker))
            end"#
    )
}

#[test]
fn ngx_upstream_lists_upstreams_and_peers() {
    let conf = http_conf(&format!(
        "upstream backend {{ server 127.0.0.1:8081 weight=3; server 127.0.0.1:8082; server 127.0.0.1:8083 backup; circuit_breaker failures=2; }}\nupstream other {{ server 127.0.0.1:9; }}\nserver {{ listen PORT;\n location /peers {{ content_by_lua_block {{ {} }} }}\n location /names {{ content_by_lua_block {{ ngx.say(table.concat(require('ngx.upstream').get_upstreams(), ',')) local b = require('ngx.upstream').get_backup_peers('backend') ngx.say(#b, ' ', b[1].name) ngx.say(select(2, require('ngx.upstream').get_primary_peers('nope'))) }} }}\n}}",
        peers_lua("backend")
    ));
    let s = Server::start(&conf);
    let r = s.get("/peers");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(
        r.text(),
        "0 127.0.0.1:8081 w=3 healthy=true down=false breaker=closed\n1 127.0.0.1:8082 w=1 healthy=true down=false breaker=closed\n"
    );
    let r = s.get("/names");
    assert_eq!(
        r.text(),
        "backend,other\n1 127.0.0.1:8083\nupstream not found\n"
    );
}

#[test]
fn ngx_balancer_refuses_outside_balancer_by_lua() {
    let conf = http_conf(
        "server { listen PORT; location / { content_by_lua_block {\n local b = require 'ngx.balancer'\n ngx.say(select(2, b.set_current_peer('127.0.0.1', 80)))\n ngx.say(select(2, b.set_more_tries(1)))\n ngx.say(select(2, b.get_last_failure()))\n } } }",
    );
    let s = Server::start(&conf);
    let r = s.get("/");
    assert_eq!(
        r.text(),
        "API disabled in the current context\nAPI disabled in the current context\nAPI disabled in the current context\n",
        "{}",
        s.error_log()
    );
}

#[test]
fn health_checks_mark_peers_down_and_up() {
    let good = Backend::start(200, "good");
    let bad = Backend::start(500, "bad");
    let refused = refused_port();
    let conf = http_conf(&format!(
        "upstream backend {{\n server {};\n server {};\n server 127.0.0.1:{};\n health_check interval=100ms timeout=500ms uri=/health fails=2 passes=2;\n}}\nserver {{ listen PORT;\n location /peers {{ content_by_lua_block {{ {} }} }}\n}}",
        good.addr,
        bad.addr,
        refused,
        peers_lua("backend")
    ));
    let s = Server::start(&conf);
    wait_for("peers marked down", Duration::from_secs(10), || {
        let log = s.error_log();
        log.contains(&format!(
            "upstream \"backend\" peer {} is down (health check: status 500)",
            bad.addr
        )) && log.contains(&format!(
            "upstream \"backend\" peer 127.0.0.1:{} is down (health check: connect() failed",
            refused
        ))
    });
    let r = s.get("/peers");
    let text = r.text();
    assert!(
        text.contains(&format!("{} w=1 healthy=true", good.addr)),
        "{}",
        text
    );
    assert!(
        text.contains(&format!("{} w=1 healthy=false", bad.addr)),
        "{}",
        text
    );
    assert!(
        !s.error_log()
            .contains(&format!("peer {} is down", good.addr)),
        "{}",
        s.error_log()
    );
    assert!(good.hits.load(Ordering::Relaxed) >= 2);
    // The failing one recovers after `passes` good checks.
    bad.status.store(204, Ordering::Relaxed);
    wait_for("peer back up", Duration::from_secs(10), || {
        s.error_log().contains(&format!(
            "upstream \"backend\" peer {} is up (health check: 2 passes)",
            bad.addr
        ))
    });
    let text = s.get("/peers").text();
    assert!(
        text.contains(&format!("{} w=1 healthy=true", bad.addr)),
        "{}",
        text
    );
}

#[test]
fn peer_state_survives_reload_of_unchanged_upstream() {
    let conf = http_conf(&format!(
        "upstream backend {{ server 127.0.0.1:8081; server 127.0.0.1:8082; }}\nserver {{ listen PORT;\n location /down {{ content_by_lua_block {{ ngx.say(require('ngx.upstream').set_peer_down('backend', false, 1, true)) }} }}\n location /peers {{ content_by_lua_block {{ {} }} }}\n}}",
        peers_lua("backend")
    ));
    let s = Server::start(&conf);
    assert_eq!(s.get("/down").text(), "true\n");
    // Change something unrelated, then reload.
    let path = s.path("conf/nginx.conf");
    let text = std::fs::read_to_string(&path).expect("conf");
    std::fs::write(&path, text.replace("location /down", "location /down2")).expect("write");
    let (code, _, err) = run_cli(s.prefix.path(), &["-c", "conf/nginx.conf", "-s", "reload"]);
    assert_eq!(code, 0, "{}", err);
    wait_for("new config", Duration::from_secs(10), || {
        s.get("/down").status == 404
    });
    let text = s.get("/peers").text();
    assert!(
        text.contains("1 127.0.0.1:8082 w=1 healthy=true down=true"),
        "{}",
        text
    );
}

// ---- end to end through proxy_pass ----

/// GET `path` through the proxy; (status, body).
fn fetch(s: &Server, path: &str) -> (u16, String) {
    let r = s.get(path);
    (r.status, r.text().trim().to_string())
}

fn tally(s: &Server, path: &str, n: usize) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::new();
    for _ in 0..n {
        let (code, body) = fetch(s, path);
        assert_eq!(code, 200, "{}\n{}", body, s.error_log());
        *m.entry(body).or_default() += 1;
    }
    m
}

#[test]
fn proxy_distributes_by_weight() {
    let a = Backend::start(200, "a");
    let b = Backend::start(200, "b");
    let c = Backend::start(200, "c");
    let conf = http_conf(&format!(
        "upstream backend {{ server {} weight=3; server {} weight=2; server {}; }}\nserver {{ listen PORT; location / {{ proxy_pass http://backend; }} }}",
        a.addr, b.addr, c.addr
    ));
    let s = Server::start(&conf);
    let m = tally(&s, "/", 60);
    // Smooth weighted round robin is exact over each cycle of 6.
    assert_eq!((m["a"], m["b"], m["c"]), (30, 20, 10), "{:?}", m);
}

#[test]
fn proxy_takes_a_failed_peer_out_and_back() {
    let a = Backend::start(200, "a");
    let port_b = free_port();
    let conf = http_conf(&format!(
        "upstream backend {{ server {}; server 127.0.0.1:{} fail_timeout=3s; }}\nserver {{ listen PORT; location / {{ proxy_pass http://backend; }} }}",
        a.addr, port_b
    ));
    let s = Server::start(&conf);
    // b refuses: the first request to it fails over to a, then b sits out fail_timeout.
    let m = tally(&s, "/", 10);
    assert_eq!(m.get("a"), Some(&10), "{:?}", m);
    let log = s.error_log();
    assert_eq!(
        log.matches("upstream server temporarily disabled").count(),
        1,
        "{}",
        log
    );
    // b comes back; after fail_timeout it gets its share again.
    let b = Backend::start_on(port_b, 200, "b");
    std::thread::sleep(Duration::from_millis(3200));
    let m = tally(&s, "/", 10);
    assert!(m.get("b").copied().unwrap_or(0) >= 4, "{:?}", m);
    assert!(b.hits.load(Ordering::Relaxed) >= 4);
}

#[test]
fn proxy_opens_the_breaker_of_a_failing_peer() {
    let a = Backend::start(200, "a");
    let b = Backend::start(500, "b");
    let conf = http_conf(&format!(
        "upstream backend {{ server {}; server {} max_fails=0; circuit_breaker failures=3 window=10s open=30s; }}\nserver {{ listen PORT; location / {{ proxy_pass http://backend; proxy_next_upstream error timeout http_500; }} }}",
        a.addr, b.addr
    ));
    let s = Server::start(&conf);
    let m = tally(&s, "/", 20);
    assert_eq!(m.get("a"), Some(&20), "{:?}", m);
    assert_eq!(b.hits.load(Ordering::Relaxed), 3, "open after 3 failures");
    assert!(
        s.error_log().contains(&format!(
            "upstream \"backend\" peer {} circuit breaker closed -> open",
            b.addr
        )),
        "{}",
        s.error_log()
    );
}

#[test]
fn proxy_skips_peers_failing_health_checks() {
    let a = Backend::start(200, "a");
    let b = Backend::start(503, "b");
    let conf = http_conf(&format!(
        "upstream backend {{ server {}; server {}; health_check interval=100ms fails=1 uri=/h; }}\nserver {{ listen PORT; location / {{ proxy_pass http://backend; proxy_next_upstream off; }} }}",
        a.addr, b.addr
    ));
    let s = Server::start(&conf);
    wait_for("b down", Duration::from_secs(10), || {
        s.error_log().contains(&format!(
            "peer {} is down (health check: status 503)",
            b.addr
        ))
    });
    let m = tally(&s, "/", 10);
    assert_eq!(m.get("a"), Some(&10), "{:?}", m);
}

#[test]
fn balancer_by_lua_picks_from_var_and_ctx() {
    let a = Backend::start(200, "a");
    let b = Backend::start(200, "b");
    let dead = free_port();
    let conf = http_conf(&format!(
        r#"upstream dyn {{
    server 0.0.0.1;
    balancer_by_lua_block {{
        local bal = require "ngx.balancer"
        local state, code = bal.get_last_failure()
        if state then
            ngx.log(ngx.WARN, "last failure: ", state, " ", code, " phase ", ngx.get_phase())
            assert(bal.set_current_peer("127.0.0.1", ngx.ctx.fallback))
            return
        end
        assert(bal.set_more_tries(1))
        assert(bal.set_current_peer("127.0.0.1", tonumber(ngx.var.arg_port)))
    }}
}}
server {{ listen PORT;
    location / {{
        access_by_lua_block {{ ngx.ctx.fallback = {} }}
        proxy_pass http://dyn;
    }}
}}"#,
        b.addr.port()
    ));
    let s = Server::start(&conf);
    assert_eq!(
        fetch(&s, &format!("/?port={}", a.addr.port())),
        (200, "a".to_string())
    );
    assert_eq!(
        fetch(&s, &format!("/?port={}", b.addr.port())),
        (200, "b".to_string())
    );
    // A refused first try: the retry sees the failure and goes to ngx.ctx's fallback.
    assert_eq!(
        fetch(&s, &format!("/?port={}", dead)),
        (200, "b".to_string())
    );
    assert!(
        s.error_log()
            .contains("last failure: failed 502 phase balancer"),
        "{}",
        s.error_log()
    );
}

#[test]
fn balancer_by_lua_error_is_500_and_exit_is_its_status() {
    let conf = http_conf(
        r#"upstream boom { server 0.0.0.1; balancer_by_lua_block { error("kaboom") } }
upstream gone { server 0.0.0.1; balancer_by_lua_block { return ngx.exit(503) } }
upstream named { server 0.0.0.1; balancer_by_lua_block {
    local ok, err = require("ngx.balancer").set_current_peer("localhost", 80)
    ngx.log(ngx.WARN, "named: ", err)
    return ngx.exit(502)
} }
server { listen PORT;
    location /boom { proxy_pass http://boom; }
    location /gone { proxy_pass http://gone; }
    location /named { proxy_pass http://named; }
}"#,
    );
    let s = Server::start(&conf);
    assert_eq!(s.get("/boom").status, 500);
    assert!(
        s.error_log().contains("failed to run balancer_by_lua*:")
            && s.error_log().contains("kaboom"),
        "{}",
        s.error_log()
    );
    assert_eq!(s.get("/gone").status, 503);
    assert_eq!(s.get("/named").status, 502);
    assert!(
        s.error_log().contains("named: no host allowed"),
        "{}",
        s.error_log()
    );
}

#[test]
fn proxy_consistent_hash_sticks_per_key() {
    let bs: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|n| Backend::start(200, n))
        .collect();
    let conf = http_conf(&format!(
        "upstream backend {{ hash $arg_user consistent; server {}; server {}; server {}; }}\nserver {{ listen PORT; location / {{ proxy_pass http://backend; }} }}",
        bs[0].addr, bs[1].addr, bs[2].addr
    ));
    let s = Server::start(&conf);
    let mut used = std::collections::HashSet::new();
    for user in 0..12 {
        let path = format!("/?user=u{}", user);
        let first = fetch(&s, &path).1;
        for _ in 0..2 {
            assert_eq!(fetch(&s, &path).1, first, "user {} moved", user);
        }
        used.insert(first);
    }
    assert!(used.len() >= 2, "{:?}", used);
}

#[test]
fn proxy_ewma_prefers_the_fast_peer() {
    let slow = Backend::start(200, "slow");
    slow.delay_ms.store(80, Ordering::Relaxed);
    let fast = Backend::start(200, "fast");
    let conf = http_conf(&format!(
        "upstream backend {{ ewma; server {}; server {}; }}\nserver {{ listen PORT; location / {{ proxy_pass http://backend; }} }}",
        slow.addr, fast.addr
    ));
    let s = Server::start(&conf);
    let m = tally(&s, "/", 30);
    assert!(m.get("fast").copied().unwrap_or(0) >= 26, "{:?}", m);
}
