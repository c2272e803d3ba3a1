//! proxy_next_upstream: retries across the addresses of a name (here a test DNS name with two
//! loopback addresses, 127.0.0.2 and 127.0.0.1), the idempotency and replay rules, tries and
//! backoff, and the `$upstream_*` variables of several tries.

mod common;
#[path = "support/dns.rs"]
mod dns;
#[path = "support/origin.rs"]
mod origin;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use origin::*;

/// `proxy_pass http://$t` with `$t` = `two.test:PORT` (127.0.0.2 first, then 127.0.0.1).
fn server(port: u16, extra: &str) -> Server {
    let dns = dns::start(vec![(
        "two.test",
        vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::LOCALHOST],
    )]);
    Server::start(&http_conf(&format!(
        "server {{
            listen 127.0.0.1:PORT;
            server_name localhost;
            resolver {dns};
            client_max_body_size 10m;
            location / {{
                set $t two.test:{port};
                {extra}
                add_header X-Up \"$upstream_addr|$upstream_status|$upstream_connect_time|$upstream_header_time|$upstream_response_time\" always;
                proxy_pass http://$t;
            }}
        }}"
    )))
}

/// Tries per request as $upstream_addr lists them.
fn tries(r: &Response) -> usize {
    r.header("x-up")
        .unwrap_or("")
        .split('|')
        .next()
        .unwrap_or("")
        .split(", ")
        .count()
}

#[test]
fn error_moves_to_the_next_address_and_variables_list_every_try() {
    // Only 127.0.0.1 listens: 127.0.0.2 refuses.
    let o = Origin::echo();
    let s = server(o.port(), "");
    let mut saw_retry = false;
    for _ in 0..4 {
        let r = s.get("/");
        assert_eq!(r.status, 200, "{}", s.error_log());
        if tries(&r) == 2 {
            saw_retry = true;
            let up = r.header("x-up").unwrap();
            let f: Vec<&str> = up.split('|').collect();
            assert_eq!(f[0], format!("127.0.0.2:{p}, 127.0.0.1:{p}", p = o.port()));
            assert_eq!(f[1], "502, 200");
            // The failed try never connected nor got a head: "-".
            assert!(f[2].starts_with("-, 0."), "{}", up);
            assert!(f[3].starts_with("-, 0."), "{}", up);
            assert!(f[4].starts_with("0.") && f[4].contains(", 0."), "{}", up);
        }
    }
    assert!(saw_retry);
    assert!(s.error_log().contains(&format!(
        "connect() failed (111: Connection refused) while connecting to upstream, client: 127.0.0.1, server: localhost, request: \"GET / HTTP/1.1\", upstream: \"http://127.0.0.2:{}/\"",
        o.port()
    )));
}

/// Two origins on the same port: 127.0.0.2 answers `status`, 127.0.0.1 answers 200.
fn pair(status: u16) -> (Origin, u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let good = Origin::echo();
    let port = good.port();
    let l = TcpListener::bind(("127.0.0.2", port)).expect("bind 127.0.0.2");
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h2 = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = Vec::new();
            while let Some(r) = read_request(&mut s, &mut buf) {
                h2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                respond(&mut s, status, &[], format!("bad {}", status).as_bytes());
                if matches!(keep(&r), Next::Close) {
                    break;
                }
            }
        }
    });
    (good, port, hits)
}

#[test]
fn status_codes_retry_only_when_listed() {
    let (_good, port, _hits) = pair(503);
    let s = server(port, "proxy_next_upstream error timeout http_503;");
    for _ in 0..4 {
        assert_eq!(s.get("/").status, 200);
    }
    let s = server(port, "");
    let statuses: Vec<u16> = (0..4).map(|_| s.get("/").status).collect();
    assert!(statuses.contains(&503), "{:?}", statuses);
}

#[test]
fn non_idempotent_requests_are_not_resent() {
    let (_good, port, hits) = pair(503);
    let s = server(port, "proxy_next_upstream error timeout http_503;");
    let post =
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
    let statuses: Vec<u16> = (0..4).map(|_| s.request(post).status).collect();
    // A POST that reached 127.0.0.2 gets its 503; it is not sent again.
    assert!(statuses.contains(&503), "{:?}", statuses);
    assert!(hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let s = server(
        port,
        "proxy_next_upstream error timeout http_503 non_idempotent;",
    );
    for _ in 0..4 {
        assert_eq!(s.request(post).status, 200);
    }
}

#[test]
fn tries_limit_and_backoff() {
    let o = Origin::echo();
    let s = server(o.port(), "proxy_next_upstream_tries 1;");
    let statuses: Vec<u16> = (0..4).map(|_| s.get("/").status).collect();
    assert!(
        statuses.contains(&502) && statuses.contains(&200),
        "{:?}",
        statuses
    );

    let s = server(
        o.port(),
        "proxy_next_upstream_backoff base=300ms max=300ms;",
    );
    let mut retried = Duration::ZERO;
    let mut n = 0;
    for _ in 0..8 {
        let t0 = Instant::now();
        let r = s.get("/");
        assert_eq!(r.status, 200);
        if tries(&r) == 2 {
            retried += t0.elapsed();
            n += 1;
        }
    }
    assert!(n > 0);
    // Full jitter over [0, 300ms]: the mean wait is ~150ms.
    let mean = retried / n;
    assert!(
        mean > Duration::from_millis(40) && mean < Duration::from_millis(900),
        "{:?}",
        mean
    );
}

#[test]
fn streamed_body_that_was_sent_is_not_replayed() {
    // 127.0.0.2 reads the head and resets; a streamed (unkept) body cannot be sent again.
    let good = Origin::echo();
    let port = good.port();
    let l = TcpListener::bind(("127.0.0.2", port)).expect("bind");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut s, &mut buf);
            drop(s);
        }
    });
    let s = server(
        port,
        "proxy_request_buffering off; proxy_http_version 1.1; client_body_buffer_size 1k;",
    );
    let body = "b".repeat(100_000);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(
            format!(
                "PUT / HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let _ = c.write_all(body.as_bytes());
        statuses.push(read_response(&mut c).map(|r| r.status).unwrap_or(0));
    }
    assert!(statuses.contains(&502), "{:?}", statuses);
    assert!(statuses.contains(&200), "{:?}", statuses);
    // The same PUT with a kept body (the default, request buffering on) is retried.
    let s = server(port, "");
    for _ in 0..4 {
        let r = s.request(&format!(
            "PUT / HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            body
        ));
        assert_eq!(r.status, 200);
    }
    assert_eq!(good.last().body.len(), body.len());
}
