//! `upstream {}` blocks over the real binary: configuration errors as `nginx -t` words them,
//! the shared peer state seen from Lua (`ngx.upstream`), active health checks against real
//! HTTP servers, state kept across a reload, and `ngx.balancer` outside its phase.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A tiny HTTP backend on 127.0.0.1:0 answering every request with `status` and a body naming
/// itself; the status can change while it runs. Stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub status: Arc<AtomicU16>,
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
        let (st, h, sp, name) = (status.clone(), hits.clone(), stop.clone(), name.to_string());
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (st, h, name) = (st.clone(), h.clone(), name.clone());
                        std::thread::spawn(move || serve(s, &st, &h, &name));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Backend {
            addr,
            status,
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

fn serve(mut s: TcpStream, status: &AtomicU16, hits: &AtomicUsize, name: &str) {
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
