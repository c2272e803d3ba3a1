//! Regression tests from the review of the day's work: hostile or extreme arguments to the
//! waiting APIs must neither spin nor kill a worker; the worker answers the next request.

mod common;

use std::time::{Duration, Instant};

use common::{server_conf, Server};

fn start(locations: &str) -> Server {
    Server::start(&server_conf("", locations))
}

const PING: &str = r#"
        location /ping { content_by_lua_block { ngx.say("pong") } }
"#;

#[test]
fn semaphore_post_of_a_huge_count_neither_spins_nor_overflows() {
    let s = start(&format!(
        r#"{PING}
        location /post {{
            content_by_lua_block {{
                local sema = require("ngx.semaphore").new(0)
                sema:post(1e12)
                ngx.say(sema:count())
                local full = require("ngx.semaphore").new(1e300)
                full:post(1e300)
                ngx.say(full:count() > 0)
            }}
        }}
"#
    ));
    let t0 = Instant::now();
    let r = s.get("/post");
    assert_eq!(r.text(), "1000000000000\ntrue\n", "{}", s.error_log());
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(s.get("/ping").text(), "pong\n");
}

#[test]
fn huge_durations_are_errors_or_waits_never_panics() {
    let s = start(&format!(
        r#"{PING}
        location /timer {{
            content_by_lua_block {{
                ngx.say(tostring(ngx.timer.at(1e300, function() end)))
            }}
        }}
        location /sock {{
            content_by_lua_block {{
                local sock = ngx.socket.tcp()
                sock:settimeout(1e300)
                local ok, err = sock:connect("127.0.0.1", 1)
                ngx.say(tostring(ok), " ", tostring(err))
            }}
        }}
"#
    ));
    for path in ["/timer", "/sock"] {
        let r = s.get(path);
        assert_eq!(r.status, 200, "{path}: {}\n{}", r.text(), s.error_log());
        assert_eq!(s.get("/ping").text(), "pong\n", "after {path}");
    }
    assert!(!s.stderr().contains("panicked"), "{}", s.stderr());
}

/// `Duration::from_secs_f64(1e300)` used to panic inside the worker (a Rust panic on a request
/// path); OpenResty sleeps (effectively forever), and so do we now.
#[test]
fn sleep_of_a_huge_duration_does_not_panic() {
    let s = start(&format!(
        r#"{PING}
        location /sleep {{
            content_by_lua_block {{
                local t = ngx.thread.spawn(function() ngx.sleep(1e300) end)
                ngx.say(tostring(ngx.thread.kill(t)))
            }}
        }}
"#
    ));
    assert_eq!(s.get("/sleep").text(), "1\n", "{}", s.error_log());
    assert_eq!(s.get("/ping").text(), "pong\n");
    assert!(!s.stderr().contains("panicked"), "{}", s.stderr());
}

/// A peer that accepts connections and neither reads nor writes, for `within`.
fn silent_peer(within: Duration) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    l.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let deadline = Instant::now() + within;
        let mut held = Vec::new();
        while Instant::now() < deadline {
            if let Ok((c, _)) = l.accept() {
                held.push(c);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    port
}

#[test]
fn killed_reader_or_writer_thread_leaves_the_cosocket_usable() {
    let port = silent_peer(Duration::from_secs(20));
    let s = start(&format!(
        r#"{PING}
        location /read {{
            content_by_lua_block {{
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", {port}))
                local t = ngx.thread.spawn(function() return sock:receive() end)
                ngx.sleep(0.05)
                ngx.say(tostring(ngx.thread.kill(t)))
                sock:settimeout(50)
                ngx.say(tostring(select(2, sock:receive())))
                local u = ngx.thread.spawn(function() return sock:receiveuntil("--")() end)
                ngx.sleep(0.05)
                ngx.thread.kill(u)
                ngx.say(tostring(select(2, sock:receive(3))))
                sock:close()
            }}
        }}
        location /write {{
            content_by_lua_block {{
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", {port}))
                local big = string.rep("x", 32 * 1024 * 1024)
                local t = ngx.thread.spawn(function() return sock:send(big) end)
                ngx.sleep(0.05)
                ngx.say(tostring(ngx.thread.kill(t)))
                sock:settimeout(50)
                ngx.say(tostring(select(2, sock:send(big))))
                sock:close()
            }}
        }}
"#
    ));
    assert_eq!(
        s.get("/read").text(),
        "1\ntimeout\ntimeout\n",
        "{}",
        s.error_log()
    );
    assert_eq!(s.get("/write").text(), "1\ntimeout\n", "{}", s.error_log());
}
