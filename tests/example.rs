//! The bundled example (conf/nginx.conf + lua/ + html/) as README's command 1 runs it: every
//! endpoint the README and the conf's header comment promise answers as described.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{free_port, Server};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

fn start_example() -> Server {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let prefix = tempfile::tempdir().expect("tempdir");
    for d in ["conf", "lua", "html"] {
        copy_dir(&root.join(d), &prefix.path().join(d));
    }
    std::fs::create_dir_all(prefix.path().join("logs")).expect("logs");
    let port = free_port();
    let origin = free_port().to_string();
    Server::start_prefix(
        prefix,
        port,
        &[
            ("TIDEGATE_PORT", &port.to_string()),
            ("TIDEGATE_ORIGIN_PORT", &origin),
        ],
    )
}

#[test]
fn bundled_example_serves_every_documented_endpoint() {
    let s = start_example();

    let r = s.get("/");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Welcome to tidegate"), "{}", r.text());

    let r = s.get("/hello");
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("hello from tidegate, worker "));

    let host = |h: &str| {
        s.request(&format!(
            "GET /api/whoami HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            h
        ))
    };
    let r = host("acme.test");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"plan\":\"gold\""), "{}", r.text());
    assert!(r.header("X-Total-Time").is_some_and(|v| v.ends_with("ms")));
    assert_eq!(host("other.test").status, 403);

    // proxy_pass to the upstream (the example's own origin server block), URI part replaced.
    let r = s.get("/app/items?x=1");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), s.error_log());
    assert!(r.text().contains("\"uri\":\"\\/items\""), "{}", r.text());
    assert!(r.text().contains("\"args\":\"x=1\""), "{}", r.text());
    assert!(
        r.text().contains("\"forwarded_for\":\"127.0.0.1\""),
        "{}",
        r.text()
    );
    assert!(r.header("X-Upstream-Time").is_some());

    let r = s.get("/fetch");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), s.error_log());
    assert!(r.text().starts_with("origin said 200: "), "{}", r.text());
    assert!(r.text().contains("from=fetch"), "{}", r.text());

    // The log phase counted the /api requests; the worker timer ticks once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = s.get("/__stats").text();
        let ticks: u64 = t
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if t.starts_with("requests 2,") && ticks >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "stats never moved: {}", t);
        std::thread::sleep(Duration::from_millis(100));
    }

    assert_eq!(s.get("/missing").status, 404);
    assert!(!s.stderr().contains("panicked"), "{}", s.stderr());
}
