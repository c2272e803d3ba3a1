//! Cosockets over real sockets: `ngx.socket.tcp` (connect, send, every receive form,
//! receiveuntil, keepalive pools with backlog, TLS), `ngx.socket.udp`, the `resolver`
//! directive against a DNS responder in the test, cosockets in every phase, and misbehaving
//! peers (refused, reset, silent, endless, garbage) without leaks or stalls. Semantics follow
//! the lua-nginx-module README.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http_conf, Server};

/// A TCP peer on 127.0.0.1:0 running `handler` for every connection (one thread each).
/// Returns the port and the number of connections accepted so far.
fn peer<F>(handler: F) -> (u16, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            let h = handler.clone();
            std::thread::spawn(move || h(s));
        }
    });
    (port, count)
}

/// Answers every line with "echo: <line>\r\n" until the client closes; "bye" closes.
fn line_echo(s: TcpStream) {
    let mut w = s.try_clone().unwrap();
    let r = BufReader::new(s);
    for line in r.lines() {
        let Ok(line) = line else { return };
        if line == "bye" {
            let _ = w.write_all(b"bye\r\n");
            return;
        }
        if w.write_all(format!("echo: {}\r\n", line).as_bytes())
            .is_err()
        {
            return;
        }
    }
}

/// A port with nothing listening.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn start(locations: &str) -> Server {
    start_with("", locations)
}

fn start_with(http_extra: &str, locations: &str) -> Server {
    Server::start(&http_conf(&format!(
        "{http_extra}\n    server {{\n        listen 127.0.0.1:PORT;\n        server_name localhost;\n{locations}\n    }}\n"
    )))
}

fn get(s: &Server, path: &str) -> (u16, String) {
    let r = s.get(path);
    (r.status, r.text())
}

#[test]
fn send_and_every_receive_form() {
    let (port, _) = peer(|s| {
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        // What the client sent (a nested table), then data for each receive form.
        w.write_all(format!("got {}", line).as_bytes()).unwrap();
        w.write_all(b"a\rb\r\n12345--END--chunk-one--END--xyz")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        w.write_all(b"rest of it").unwrap();
    });
    let s = start(
        &r#"
        location /t {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeout(2000)
                local ok, err = sock:connect("127.0.0.1", PEER)
                ngx.say("connect: ", ok, " ", err)
                ngx.say("nodelay: ", sock:getoption("tcp-nodelay"))
                ngx.say("setoption: ", sock:setoption("keepalive", true), " ", sock:getoption("keepalive"))
                local n = sock:send({"hello", " ", 42, {" nested", {"!"}}, "\n"})
                ngx.say("sent: ", n)
                ngx.say("line: ", sock:receive())
                ngx.say("cr dropped: ", sock:receive("*l"))
                ngx.say("bytes: ", sock:receive(5))
                local it = sock:receiveuntil("--END--")
                ngx.say("until: ", it())
                local it2 = sock:receiveuntil("--END--", {inclusive = true})
                ngx.say("inclusive: ", it2())
                ngx.say("prefix: ", sock:receive(3, "pre-"))
                ngx.say("any: ", #sock:receiveany(100) > 0)
                local data, err, partial = sock:receive("*a")
                ngx.say("all: [", data, "] ", err)
                local d, e, p = sock:receive()
                ngx.say("after close: ", d, " ", e, " [", p, "]")
                ngx.say("close: ", sock:close())
                ngx.say("close again: ", select(2, sock:close()))
                ngx.say("fresh: ", select(2, ngx.socket.tcp():send("x")))
            }
        }
        "#
        .replace("PEER", &port.to_string()),
    );
    let (status, body) = get(&s, "/t");
    assert_eq!(status, 200, "{}\n{}", body, s.error_log());
    let expect = "connect: 1 nil\n\
        nodelay: 1\n\
        setoption: true 1\n\
        sent: 17\n\
        line: got hello 42 nested!\n\
        cr dropped: ab\n\
        bytes: 12345\n\
        until: \n\
        inclusive: chunk-one--END--\n\
        prefix: pre-xyz\n\
        any: true\n";
    assert!(body.starts_with(expect), "{}", body);
    // receiveany took (part of) "rest of it"; *a returns the remainder without an error.
    assert!(
        body.ends_with(
            "] nil\nafter close: nil closed []\nclose: nilclosed\nclose again: closed\nfresh: closed\n"
        ),
        "{}",
        body
    );
}

#[test]
fn receiveuntil_with_size_streams_chunks() {
    let (port, _) = peer(|mut s| {
        s.write_all(b"preamble\r\n--b\r\nbody bytes\r\n--b--")
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    let s = start(
        &r#"
        location /t {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeout(1000)
                assert(sock:connect("127.0.0.1", PEER))
                local r = sock:receiveuntil("\r\n--b")
                ngx.say("pre: ", r())
                local chunks = {}
                while true do
                    local d, err = r(4)
                    if not d then
                        if err then ngx.say("err: ", err) end
                        break
                    end
                    chunks[#chunks + 1] = d
                end
                ngx.say(table.concat(chunks, "|"))
                ngx.say(sock:receive(2))
                sock:close()
            }
        }
        "#
        .replace("PEER", &port.to_string()),
    );
    let (_, body) = get(&s, "/t");
    assert_eq!(body, "pre: preamble\n\r\nbo|dy b|ytes\n--\n", "{:?}", body);
}

#[test]
fn keepalive_pool_reuses_connections() {
    let (port, accepted) = peer(line_echo);
    let s = start(
        &r#"
        location /t {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", PEER))
                local reused = sock:getreusedtimes()
                sock:send("ping\n")
                local line = sock:receive()
                ngx.say(reused, " ", line, " ", sock:setkeepalive(10000, 10))
                ngx.say("after keepalive: ", select(2, sock:send("x")))
            }
        }
        location /named {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", PEER, {pool = "mine"}))
                ngx.say(sock:getreusedtimes())
                sock:setkeepalive()
            }
        }
        location /dubious {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", PEER, {pool = "dub"}))
                sock:send("a\n")
                sock:receive()
                sock:send("b\n")
                ngx.sleep(0.1)
                local ok, err = sock:setkeepalive()
                ngx.say(ok, " ", err)
            }
        }
        "#
        .replace("PEER", &port.to_string()),
    );
    assert_eq!(get(&s, "/t").1, "0 echo: ping 1\nafter keepalive: closed\n");
    assert_eq!(get(&s, "/t").1, "1 echo: ping 1\nafter keepalive: closed\n");
    assert_eq!(get(&s, "/t").1, "2 echo: ping 1\nafter keepalive: closed\n");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Another pool name is another pool.
    assert_eq!(get(&s, "/named").1, "0\n");
    assert_eq!(get(&s, "/named").1, "1\n");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // Unread data from the peer: not pooled.
    assert_eq!(get(&s, "/dubious").1, "nil connection in dubious state\n");
}

#[test]
fn idle_connection_closed_by_peer_is_not_reused() {
    // The peer answers one line, then closes after 100 ms.
    let (port, accepted) = peer(|s| {
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        w.write_all(b"ok\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
    });
    let s = start(
        &r#"
        location /t {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", PEER))
                local reused = sock:getreusedtimes()
                sock:send("x\n")
                ngx.say(reused, " ", sock:receive())
                sock:setkeepalive()
            }
        }
        "#
        .replace("PEER", &port.to_string()),
    );
    assert_eq!(get(&s, "/t").1, "0 ok\n");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(get(&s, "/t").1, "0 ok\n");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn pool_backlog_queues_and_limits_connects() {
    let (port, accepted) = peer(line_echo);
    let s = start(
        &r#"
        location /hold {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                local ok, err = sock:connect("127.0.0.1", PEER, {pool_size = 1, backlog = 1})
                ngx.sleep(1)
                sock:setkeepalive()
                ngx.say("hold ", ok, " ", err)
            }
        }
        location /wait {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                local t = ngx.now()
                local ok, err = sock:connect("127.0.0.1", PEER, {pool_size = 1, backlog = 1})
                ngx.update_time()
                ngx.say("wait ", ok, " ", err, " reused=", sock:getreusedtimes(), " waited=", ngx.now() - t >= 0.2)
                sock:setkeepalive()
            }
        }
        location /short {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeouts(150, 1000, 1000)
                local ok, err = sock:connect("127.0.0.1", PEER, {pool_size = 1, backlog = 1})
                ngx.say("short ", ok, " ", err)
            }
        }
        "#
        .replace("PEER", &port.to_string()),
    );
    let addr = s.addr();
    let bg = |path: &'static str| {
        std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(
                c,
                "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                path
            )
            .unwrap();
            common::read_response(&mut c).unwrap().text()
        })
    };
    let hold = bg("/hold");
    std::thread::sleep(Duration::from_millis(300));
    let wait = bg("/wait");
    std::thread::sleep(Duration::from_millis(300));
    // One connection out, one connect queued: a third gets the backlog error at once (not
    // "timeout" after its 150 ms connect timeout).
    assert_eq!(
        get(&s, "/short").1,
        "short nil too many waiting connect operations\n"
    );
    assert_eq!(hold.join().unwrap(), "hold 1 nil\n");
    assert_eq!(wait.join().unwrap(), "wait 1 nil reused=1 waited=true\n");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Queued longer than the connect timeout: "timeout".
    let hold = bg("/hold");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(&s, "/short").1, "short nil timeout\n");
    // The timed-out waiter left the queue: the next one queues (and times out) too.
    assert_eq!(get(&s, "/short").1, "short nil timeout\n");
    hold.join().unwrap();
}

#[test]
fn misbehaving_peers_get_openresty_errors() {
    let refused = closed_port();
    let (silent, _) = peer(|s| {
        std::thread::sleep(Duration::from_secs(3));
        drop(s);
    });
    let (reset, _) = peer(|s| {
        let mut w = s.try_clone().unwrap();
        w.write_all(b"partial").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // SO_LINGER 0: close sends RST.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(w);
        drop(s);
    });
    let (garbage, _) = peer(|mut s| {
        let _ = s.write_all(&[0xff, 0x00, 0xfe, b'\n', 0x01]);
    });
    let s = start(
        &r#"
        location /refused {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                ngx.say(sock:connect("127.0.0.1", REFUSED))
                ngx.say(select(2, ngx.socket.connect("127.0.0.1", REFUSED)))
            }
        }
        location /silent {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeout(150)
                assert(sock:connect("127.0.0.1", SILENT))
                local t = ngx.now()
                local d, err, partial = sock:receive()
                ngx.update_time()
                ngx.say(d, " ", err, " [", partial, "] ", ngx.now() - t < 1)
                -- a timeout keeps the socket usable
                ngx.say(sock:send("x"))
            }
        }
        location /reset {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeout(2000)
                assert(sock:connect("127.0.0.1", RESET))
                local d, err, partial = sock:receive(100)
                ngx.say(d, " ", err, " [", partial, "]")
                ngx.say(select(2, sock:receive(1)))
            }
        }
        location /garbage {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", GARBAGE))
                local l = sock:receive()
                ngx.say(#l, " ", l:byte(1), " ", l:byte(3))
                local _, err, partial = sock:receive(5)
                ngx.say(err, " ", partial:byte(1))
            }
        }
        location /badname {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                ngx.say(sock:connect("no-such-host.invalid", 80))
            }
        }
        location /badarg {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:receive("*x")
            }
        }
        "#
        .replace("REFUSED", &refused.to_string())
        .replace("SILENT", &silent.to_string())
        .replace("RESET", &reset.to_string())
        .replace("GARBAGE", &garbage.to_string()),
    );
    assert_eq!(
        get(&s, "/refused").1,
        "nilconnection refused\nconnection refused\n"
    );
    assert_eq!(get(&s, "/silent").1, "nil timeout [] true\n1\n");
    assert_eq!(
        get(&s, "/reset").1,
        "nil connection reset by peer [partial]\nclosed\n"
    );
    assert_eq!(get(&s, "/garbage").1, "3 255 254\nclosed 1\n");
    assert_eq!(
        get(&s, "/badname").1,
        "nilno-such-host.invalid could not be resolved (3: Host not found)\n"
    );
    assert_eq!(get(&s, "/badarg").0, 500);
    let log = s.error_log();
    assert!(log.contains("connect() to 127.0.0.1:"), "{}", log);
    assert!(log.contains("(111: Connection refused)"), "{}", log);
    assert!(log.contains("lua tcp socket read timed out"), "{}", log);
}

fn rss_kb(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{}/status", pid))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn endless_peer_keeps_reads_bounded() {
    // Streams 'x' forever (until the client goes away).
    let (port, _) = peer(|mut s| {
        let chunk = [b'x'; 64 * 1024];
        while s.write_all(&chunk).is_ok() {}
    });
    let s = start_with(
        "lua_socket_buffer_size 4k;",
        &r#"
        location /line {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeout(2000)
                assert(sock:connect("127.0.0.1", PEER))
                local d, err, partial = sock:receive()
                ngx.say(d, " ", err, " ", #partial)
                local it = sock:receiveuntil("\n")
                local d, err, partial = it()
                ngx.say(d, " ", err, " ", #partial)
                ngx.say(#sock:receive(1000000))
                sock:close()
            }
        }
        "#
        .replace("PEER", &port.to_string()),
    );
    let first = get(&s, "/line");
    assert_eq!(
        first.1,
        "nil line too long 1048576\nnil line too long 1048576\n1000000\n"
    );
    let base = rss_kb(s.pid());
    for _ in 0..10 {
        get(&s, "/line");
    }
    let after = rss_kb(s.pid());
    assert!(
        after < base + 64 * 1024,
        "memory grew from {} kB to {} kB",
        base,
        after
    );
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", pid))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn failure_storm_leaks_no_descriptors() {
    let refused = closed_port();
    let (silent, _) = peer(|s| {
        std::thread::sleep(Duration::from_secs(5));
        drop(s);
    });
    let (closer, _) = peer(|mut s| {
        let _ = s.write_all(b"half a li");
    });
    let s = start(
        &r#"
        location /storm {
            content_by_lua_block {
                local a = ngx.socket.tcp()
                a:connect("127.0.0.1", REFUSED)
                local b = ngx.socket.tcp()
                b:settimeout(50)
                b:connect("127.0.0.1", SILENT)
                b:receive()          -- timeout, socket left open on purpose
                local c = ngx.socket.tcp()
                c:connect("127.0.0.1", CLOSER)
                c:receive()          -- closed by the peer
                local d = ngx.socket.tcp()
                d:connect("127.0.0.1", SILENT)
                d:setkeepalive(1)    -- pooled, expires at once
                local u = ngx.socket.udp()
                u:settimeout(20)
                u:setpeername("127.0.0.1", REFUSED)
                u:send("x")
                u:receive()
                ngx.say("done")
            }
        }
        "#
        .replace("REFUSED", &refused.to_string())
        .replace("SILENT", &silent.to_string())
        .replace("CLOSER", &closer.to_string()),
    );
    assert_eq!(get(&s, "/storm").1, "done\n");
    std::thread::sleep(Duration::from_millis(1500));
    let before = fd_count(s.pid());
    assert!(before > 0);
    let addr = s.addr();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..10 {
                    let mut c = TcpStream::connect(addr).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    c.write_all(b"GET /storm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .unwrap();
                    let r = common::read_response(&mut c).unwrap();
                    assert_eq!(r.text(), "done\n");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // The sweeper closes sockets of finished requests within a second or so.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = fd_count(s.pid());
    while after != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = fd_count(s.pid());
    }
    assert_eq!(before, after, "descriptors before and after the storm");
}

#[test]
fn slow_peer_does_not_stall_the_worker() {
    // Accepts and never answers: every request reading from it stays blocked.
    let (slow, accepted) = peer(|s| {
        std::thread::sleep(Duration::from_secs(8));
        drop(s);
    });
    let s = start(
        &r#"
        location /slow {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeout(6000)
                assert(sock:connect("127.0.0.1", SLOW))
                ngx.say(select(2, sock:receive()))
            }
        }
        location /fast {
            content_by_lua_block { ngx.say("fast") }
        }
        "#
        .replace("SLOW", &slow.to_string()),
    );
    let addr = s.addr();
    let mut blocked = Vec::new();
    for _ in 0..200 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        blocked.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while accepted.load(Ordering::SeqCst) < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        200,
        "all 200 connected upstream"
    );
    let t = Instant::now();
    for _ in 0..50 {
        assert_eq!(get(&s, "/fast").1, "fast\n");
    }
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "50 fast requests took {:?} next to 200 blocked ones",
        t.elapsed()
    );
    // The blocked ones are still waiting (no answer yet).
    let mut first = blocked.remove(0);
    first
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(first.read(&mut b).is_err());
}

#[test]
fn resolver_directive_resolves_and_caches() {
    let (port, _) = peer(line_echo);
    let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns_port = dns.local_addr().unwrap().port();
    let queries = Arc::new(AtomicUsize::new(0));
    let q = queries.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = dns.recv_from(&mut buf) {
            q.fetch_add(1, Ordering::SeqCst);
            let r = tidegate::net::resolver::testing::answer(
                &buf[..n],
                &["127.0.0.1".parse().unwrap()],
                300,
            )
            .unwrap();
            dns.send_to(&r, from).unwrap();
        }
    });
    let s = start_with(
        &format!(
            "resolver 127.0.0.1:{} valid=30s ipv6=off;\nresolver_timeout 2s;",
            dns_port
        ),
        &r#"
        location /t {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                local ok, err = sock:connect("backend.test", PEER)
                if not ok then ngx.say(err) return end
                sock:send("hi\n")
                ngx.say(sock:receive())
                sock:close()
            }
        }
        "#
        .replace("PEER", &port.to_string()),
    );
    assert_eq!(get(&s, "/t").1, "echo: hi\n");
    assert_eq!(get(&s, "/t").1, "echo: hi\n");
    assert_eq!(
        queries.load(Ordering::SeqCst),
        1,
        "second lookup from the cache"
    );
}

#[test]
fn cosockets_work_in_every_phase() {
    let (port, _) = peer(line_echo);
    let (rec_port, _) = {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let tx = std::sync::Mutex::new(tx);
        let p = peer(move |s| {
            let mut l = String::new();
            let _ = BufReader::new(s).read_line(&mut l);
            let _ = tx.lock().unwrap().send(l);
        });
        RECORDED.with(|r| *r.borrow_mut() = Some(rx));
        p
    };
    let s = start(
        &r#"
        location /t {
            set_by_lua_block $from_set {
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", PEER))
                sock:send("set\n")
                local l = sock:receive()
                sock:close()
                return l
            }
            content_by_lua_block { ngx.say(ngx.var.from_set) }
            header_filter_by_lua_block {
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", PEER))
                sock:send("header\n")
                ngx.header["X-From-Filter"] = sock:receive()
                sock:setkeepalive()
            }
            body_filter_by_lua_block {
                if ngx.arg[1] ~= "" then
                    local sock = ngx.socket.tcp()
                    assert(sock:connect("127.0.0.1", PEER))
                    sock:send("body\n")
                    ngx.arg[1] = ngx.arg[1] .. sock:receive() .. "\n"
                    sock:setkeepalive()
                end
            }
            log_by_lua_block {
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", RECORDER))
                sock:send("logged " .. ngx.var.status .. "\n")
                sock:close()
            }
        }
        "#
        .replace("RECORDER", &rec_port.to_string())
        .replace("PEER", &port.to_string()),
    );
    let r = s.get("/t");
    assert_eq!(r.text(), "echo: set\necho: body\n", "{}", s.error_log());
    assert_eq!(r.header("x-from-filter"), Some("echo: header"));
    let logged = RECORDED.with(|r| {
        r.borrow()
            .as_ref()
            .unwrap()
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
    });
    assert_eq!(logged, "logged 200\n");
}

thread_local! {
    static RECORDED: std::cell::RefCell<Option<std::sync::mpsc::Receiver<String>>> = const { std::cell::RefCell::new(None) };
}

#[test]
fn unix_and_udp_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { return };
                    let _ = writeln!(w, "unix {}", line);
                }
            });
        }
    });
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut b = [0u8; 9000];
        while let Ok((n, from)) = udp.recv_from(&mut b) {
            let mut r = b"udp ".to_vec();
            r.extend_from_slice(&b[..n]);
            let _ = udp.send_to(&r, from);
        }
    });
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let s = start(
        &r#"
        location /unix {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                assert(sock:connect("unix:SOCKPATH"))
                sock:send("hi\n")
                ngx.say(sock:receive())
                ngx.say(sock:setkeepalive())
                local again = ngx.socket.tcp()
                assert(again:connect("unix:SOCKPATH"))
                ngx.say("reused ", again:getreusedtimes())
                ngx.say(select(2, ngx.socket.tcp():connect("unix:SOCKPATH.missing")))
            }
        }
        location /udp {
            content_by_lua_block {
                local u = ngx.socket.udp()
                ngx.say(u:setpeername("127.0.0.1", UDPPORT))
                ngx.say(u:send({"ping", 1}))
                ngx.say(u:receive())
                local big = string.rep("z", 9000)
                u:send(big)
                ngx.say(#u:receive())
                ngx.say(u:close(), " ", select(2, u:close()))
                local q = ngx.socket.udp()
                q:settimeout(100)
                q:setpeername("127.0.0.1", SILENT)
                q:send("x")
                ngx.say(q:receive())
            }
        }
        "#
        .replace("SOCKPATH", path.to_str().unwrap())
        .replace("UDPPORT", &udp_port.to_string())
        .replace("SILENT", &silent_port.to_string()),
    );
    assert_eq!(
        get(&s, "/unix").1,
        "unix hi\n1\nreused 1\nno such file or directory\n"
    );
    assert_eq!(
        get(&s, "/udp").1,
        "1\n1\nudp ping1\n8192\n1 closed\nniltimeout\n"
    );
    drop(silent);
}

/// A CA, and a TLS echo server for `localhost` signed by it: (ca pem, port).
fn tls_peer() -> (String, u16) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
    )
    .unwrap();
    let cfg = Arc::new(cfg);
    let (port, _) = peer(move |s| {
        let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, s);
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while let Ok(1) = tls.read(&mut b) {
            line.push(b[0]);
            if b[0] == b'\n' {
                let _ = tls.write_all(b"tls ");
                let _ = tls.write_all(&line);
                let _ = tls.flush();
                line.clear();
            }
        }
    });
    (ca.pem(), port)
}

#[test]
fn sslhandshake_verifies_against_trusted_certificate() {
    let (ca, port) = tls_peer();
    let s = Server::start_with(
        &http_conf(
            &r#"
    lua_ssl_trusted_certificate ca.pem;
    lua_ssl_verify_depth 2;
    server {
        listen 127.0.0.1:PORT;
        location /ok {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeout(3000)
                assert(sock:connect("127.0.0.1", TLSPORT))
                local sess, err = sock:sslhandshake(nil, "localhost", true)
                ngx.say(type(sess), " ", err)
                sock:send("hello\n")
                ngx.say(sock:receive())
                sock:close()
            }
        }
        location /mismatch {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", TLSPORT))
                ngx.say(sock:sslhandshake(false, "other.test", true))
                ngx.say(select(2, sock:send("x")))
            }
        }
        location /pooled {
            content_by_lua_block {
                for i = 1, 2 do
                    local sock = ngx.socket.tcp()
                    assert(sock:connect("127.0.0.1", TLSPORT, {pool = "tls"}))
                    local sess, err = sock:sslhandshake(nil, "localhost", true)
                    sock:send("round " .. i .. "\n")
                    ngx.say(sock:getreusedtimes(), " ", type(sess), " ", sock:receive())
                    sock:setkeepalive()
                end
            }
        }
        location /noverify {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", TLSPORT))
                ngx.say(sock:sslhandshake(false, "other.test", false))
                sock:send("x\n")
                ngx.say(sock:receive())
            }
        }
    }
"#
            .replace("TLSPORT", &port.to_string()),
        ),
        &[("conf/ca.pem", ca.as_str())],
    );
    assert_eq!(
        get(&s, "/ok").1,
        "userdata nil\ntls hello\n",
        "{}",
        s.error_log()
    );
    assert_eq!(
        get(&s, "/mismatch").1,
        "nilcertificate host mismatch\nclosed\n"
    );
    assert_eq!(get(&s, "/noverify").1, "true\ntls x\n");
    assert_eq!(
        get(&s, "/pooled").1,
        "0 userdata tls round 1\n1 userdata tls round 2\n"
    );
}

#[test]
fn close_wakes_a_blocked_reader_and_log_errors_off_is_quiet() {
    let (silent, _) = peer(|s| {
        std::thread::sleep(Duration::from_secs(5));
        drop(s);
    });
    let s = start_with(
        "lua_socket_log_errors off;",
        &r#"
        location /read {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeout(4000)
                assert(sock:connect("127.0.0.1", SILENT))
                SHARED_SOCK = sock   -- per-worker global: another request closes it
                local t = ngx.now()
                local d, err = sock:receive()
                ngx.update_time()
                ngx.say(err, " ", ngx.now() - t < 2)
            }
        }
        location /close {
            content_by_lua_block { ngx.say(SHARED_SOCK:close()) }
        }
        location /timeout {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeout(50)
                assert(sock:connect("127.0.0.1", SILENT))
                ngx.say(select(2, sock:receive()))
            }
        }
        "#
        .replace("SILENT", &silent.to_string()),
    );
    let addr = s.addr();
    let reader = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /read HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        common::read_response(&mut c).unwrap().text()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(&s, "/close").1, "1\n");
    assert_eq!(reader.join().unwrap(), "closed true\n");
    assert_eq!(get(&s, "/timeout").1, "timeout\n");
    assert!(
        !s.error_log().contains("timed out"),
        "lua_socket_log_errors off: {}",
        s.error_log()
    );
}

#[test]
fn bad_net_directives_are_rejected_at_load() {
    for (line, msg) in [
        (
            "resolver 127.0.0.1 ipv6=maybe;",
            "invalid parameter \"ipv6=maybe\"",
        ),
        (
            "resolver 127.0.0.1 valid=soon;",
            "invalid parameter \"valid=soon\"",
        ),
        ("resolver 127.0.0.1:notaport;", "invalid port in resolver"),
        (
            "resolver_timeout forever;",
            "\"resolver_timeout\" directive invalid value",
        ),
        ("lua_socket_pool_size 0;", "invalid value \"0\""),
        (
            "lua_socket_log_errors maybe;",
            "it must be \"on\" or \"off\"",
        ),
        (
            "lua_ssl_trusted_certificate missing.pem;",
            "cannot load certificate",
        ),
        (
            "resolver 127.0.0.1; resolver 127.0.0.2;",
            "\"resolver\" directive is duplicate",
        ),
    ] {
        let conf = http_conf(line);
        let dir = common::prefix_with(&[("conf/nginx.conf", &conf)], common::free_port());
        let (code, _, err) = common::run_cli(dir.path(), &["-c", "conf/nginx.conf", "-t"]);
        assert_eq!(code, 1, "{}: {}", line, err);
        assert!(err.contains(msg), "{}: {}", line, err);
    }
    let ok = http_conf(
        "resolver 127.0.0.1:5353 [::1] valid=10s ipv6=off; resolver_timeout 5s;\n\
         lua_socket_connect_timeout 1s; lua_socket_send_timeout 2s; lua_socket_read_timeout 500ms;\n\
         lua_socket_buffer_size 8k; lua_socket_pool_size 5; lua_socket_keepalive_timeout 10s;\n\
         lua_socket_log_errors off; lua_ssl_verify_depth 3;\n\
         server { listen 127.0.0.1:PORT; location / { resolver 127.0.0.1; resolver_timeout 1s; lua_socket_read_timeout 1s; } }",
    );
    let dir = common::prefix_with(&[("conf/nginx.conf", &ok)], common::free_port());
    let (code, out, err) = common::run_cli(dir.path(), &["-c", "conf/nginx.conf", "-t"]);
    assert_eq!(code, 0, "{}{}", out, err);
}

#[test]
fn send_to_a_peer_that_never_reads_times_out() {
    let (port, _) = peer(|s| {
        std::thread::sleep(Duration::from_secs(4));
        drop(s);
    });
    let s = start(
        &r#"
        location /t {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeouts(1000, 200, 1000)
                assert(sock:connect("127.0.0.1", PEER))
                local big = string.rep("y", 1024 * 1024)
                local t = ngx.now()
                local sent, err
                for i = 1, 64 do
                    sent, err = sock:send(big)
                    if not sent then break end
                end
                ngx.update_time()
                ngx.say(sent, " ", err, " ", ngx.now() - t < 2)
            }
        }
        "#
        .replace("PEER", &port.to_string()),
    );
    assert_eq!(get(&s, "/t").1, "nil timeout true\n");
    assert!(s.error_log().contains("lua tcp socket write timed out"));
}

#[test]
fn init_worker_can_use_cosockets() {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx = std::sync::Mutex::new(tx);
    let (port, _) = peer(move |s| {
        let mut l = String::new();
        let _ = BufReader::new(s).read_line(&mut l);
        let _ = tx.lock().unwrap().send(l);
    });
    let _s = start_with(
        &r#"
    init_worker_by_lua_block {
        local sock = ngx.socket.tcp()
        assert(sock:connect("127.0.0.1", PEER))
        sock:send("hello from worker " .. ngx.worker.id() .. "\n")
        sock:close()
    }
"#
        .replace("PEER", &port.to_string()),
        "location / { return 204; }",
    );
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        "hello from worker 0\n"
    );
}

#[test]
fn udp_to_a_unix_datagram_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dgram.sock");
    let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let s = start(
        &r#"
        location /t {
            content_by_lua_block {
                local u = ngx.socket.udp()
                ngx.say(u:setpeername("unix:SOCKPATH"))
                ngx.say(u:send("syslog line"))
                ngx.say(select(2, ngx.socket.udp():setpeername("unix:SOCKPATH.missing")))
            }
        }
        "#
        .replace("SOCKPATH", path.to_str().unwrap()),
    );
    assert_eq!(get(&s, "/t").1, "1\n1\nno such file or directory\n");
    let mut b = [0u8; 64];
    let n = server.recv(&mut b).unwrap();
    assert_eq!(&b[..n], b"syslog line");
}
