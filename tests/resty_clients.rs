//! The bundled `resty.redis` and `resty.http` against real servers: a `redis-server` started
//! per test on a port of its own, and hyper HTTP upstreams on 127.0.0.1:0 that count the
//! connections they accept. Expected values follow lua-resty-redis's and lua-resty-http's docs.

mod common;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, http_conf, Server};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;

// ---------------------------------------------------------------------------------------------
// helpers

struct Redis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// Connections made before the test (readiness probes, the first INFO).
    base: std::cell::Cell<usize>,
}

impl Redis {
    fn start(extra: &[&str]) -> Redis {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("redis.sock");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--bind", "127.0.0.1"])
            .arg("--unixsocket")
            .arg(&sock)
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        let r = Redis {
            child,
            port,
            dir,
            base: std::cell::Cell::new(0),
        };
        let pw = extra
            .windows(2)
            .find(|w| w[0] == "--requirepass")
            .map(|w| w[1]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() && sock.exists() {
                r.base.set(r.total(pw));
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on {}", port);
    }

    fn sock(&self) -> String {
        self.dir.path().join("redis.sock").display().to_string()
    }

    /// One command over a fresh connection; the reply's raw text.
    fn cmd(&self, args: &[&str], auth: Option<&str>) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect redis");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut req = Vec::new();
        let mut push = |args: &[&str]| {
            req.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in args {
                req.extend_from_slice(format!("${}\r\n{}\r\n", a.len(), a).as_bytes());
            }
        };
        if let Some(pw) = auth {
            push(&["AUTH", pw]);
        }
        push(args);
        push(&["QUIT"]);
        s.write_all(&req).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn total(&self, auth: Option<&str>) -> usize {
        let info = self.cmd(&["INFO", "stats"], auth);
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("total_connections_received")
    }

    /// Connections the server accepted since it started, not counting our own probes.
    fn connections(&self, auth: Option<&str>) -> usize {
        let n = self.total(auth) - self.base.get() - 1;
        // This INFO connection counts as a probe for the next call.
        self.base.set(self.base.get() + 1);
        n
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_lua(http_extra: &str, content: &str) -> Server {
    start_lua_with(http_extra, content, &[])
}

fn start_lua_with(http_extra: &str, content: &str, files: &[(&str, &str)]) -> Server {
    Server::start_with(
        &http_conf(&format!(
            "{http_extra}\n    server {{\n        listen 127.0.0.1:PORT;\n        location /t {{\n            content_by_lua_block {{\n{content}\n            }}\n        }}\n    }}\n"
        )),
        files,
    )
}

fn body(s: &Server, path: &str) -> String {
    let r = s.get(path);
    assert_eq!(
        r.status,
        200,
        "status for {}: {}\n{}",
        path,
        r.text(),
        s.error_log()
    );
    r.text()
}

type Body = BoxBody<Bytes, Infallible>;

/// A hyper HTTP/1.1 upstream on 127.0.0.1:0 counting accepted connections.
struct Upstream {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

fn upstream() -> Upstream {
    upstream_tls(None)
}

/// A CA (PEM) and a TLS acceptor whose certificate for `localhost` the CA signed.
fn tls_pki() -> (String, tokio_rustls::TlsAcceptor) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("der");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)
    .expect("cert");
    (ca.pem(), tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

fn upstream_tls(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
    let std_l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    std_l.set_nonblocking(true).expect("nonblocking");
    let port = std_l.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(std_l).expect("listener");
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(handle);
                    let b = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = b
                                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                .await;
                        }
                        Some(acc) => {
                            if let Ok(t) = acc.accept(s).await {
                                let _ = b
                                    .serve_connection(hyper_util::rt::TokioIo::new(t), svc)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
    });
    Upstream { port, accepted }
}

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let full = |s: String| Full::new(Bytes::from(s)).boxed();
    let resp = match path.as_str() {
        "/cl" => hyper::Response::builder()
            .header("X-Multi", "a")
            .header("X-Multi", "b")
            .header("Content-Type", "text/plain")
            .body(full("hello world".into())),
        "/chunked" => {
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = ["abc", "defgh", "ij"]
                .iter()
                .map(|s| Ok(Frame::data(Bytes::from_static(s.as_bytes()))))
                .collect();
            hyper::Response::builder()
                .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        }
        "/echo" => {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let h = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string()
            };
            let (x, host, ua, cl) = (h("x-test"), h("host"), h("user-agent"), h("content-length"));
            let b = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            hyper::Response::builder().status(201).body(full(format!(
                "method={method} uri={uri} x-test={x} host={host} ua={ua} cl={cl} body={}",
                String::from_utf8_lossy(&b)
            )))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            hyper::Response::builder().body(full("late".into()))
        }
        "/close" => hyper::Response::builder()
            .header("Connection", "close")
            .body(full("bye".into())),
        "/nobody" => hyper::Response::builder()
            .status(204)
            .body(full(String::new())),
        _ => hyper::Response::builder()
            .status(404)
            .body(full("nope".into())),
    };
    Ok(resp.expect("response"))
}

// ---------------------------------------------------------------------------------------------
// resty.redis

#[test]
fn redis_commands_and_reply_mapping() {
    let r = Redis::start(&[]);
    let s = start_lua(
        "",
        &r#"
        local redis = require "resty.redis"
        local red = redis:new()
        red:set_timeouts(1000, 1000, 1000)
        assert(red:connect("127.0.0.1", RPORT))
        ngx.say("set: ", red:set("k1", "v1"))
        ngx.say("get: ", red:get("k1"))
        ngx.say("missing is null: ", red:get("nope") == ngx.null)
        ngx.say("incr: ", red:incr("n"), " ", type(red:incr("n")))
        local ok, err = red:incr("k1")
        ngx.say("err: ", tostring(ok), " ", err)
        ngx.say("hmset: ", red:hmset("h", { a = "1", b = "2" }))
        ngx.say("hmset varargs: ", red:hmset("h2", "x", "9"))
        local all = red:array_to_hash(red:hgetall("h"))
        ngx.say("hash: ", all.a, all.b)
        local m = red:mget("k1", "nope")
        ngx.say("mget: ", m[1], " ", m[2] == ngx.null)
        ngx.say("nil multi-bulk: ", red:blpop("emptylist", 0.01) == ngx.null)
        ngx.say("number arg: ", red:set("num", 1.5), " ", red:get("num"))
        ngx.say("unknown: ", select(2, red:nosuchcommand()))
        ngx.say("eval: ", red:eval("return {1, 'x', redis.error_reply('boom')}", 0)[3][2])
        ngx.say("del: ", red:del("k1", "nope"))
        ngx.say("close: ", red:close())
        ngx.say("after close: ", select(2, red:get("k1")))
        "#
        .replace("RPORT", &r.port.to_string()),
    );
    let out = body(&s, "/t");
    let expect = [
        "set: OK",
        "get: v1",
        "missing is null: true",
        "incr: 1 number",
        "err: false ERR value is not an integer or out of range",
        "hmset: OK",
        "hmset varargs: OK",
        "hash: 12",
        "mget: v1 true",
        "nil multi-bulk: true",
        "number arg: OK 1.5",
        "eval: ERR boom",
        "del: 1",
        "close: 1",
        "after close: closed",
    ];
    for e in expect {
        assert!(out.contains(e), "missing {:?} in:\n{}", e, out);
    }
    assert!(out.contains("unknown: ERR unknown command"), "{}", out);
}

#[test]
fn redis_pipeline() {
    let r = Redis::start(&[]);
    let s = start_lua(
        "",
        &r#"
        local cjson = require "cjson"
        local red = require("resty.redis"):new()
        assert(red:connect("127.0.0.1", RPORT))
        ngx.say("no pipeline: ", select(2, red:commit_pipeline()))
        red:init_pipeline()
        red:set("cat", "Marry")
        red:get("cat")
        red:incr("cat")
        red:get("nokey")
        local res, err = red:commit_pipeline()
        ngx.say(cjson.encode(res))
        red:init_pipeline(2)
        red:set("dog", "x")
        red:cancel_pipeline()
        ngx.say("cancelled: ", red:get("dog") == ngx.null)
        -- A bad argument caught by pcall leaves nothing of its command in the pipeline.
        red:init_pipeline()
        red:set("p1", "a")
        ngx.say("bad arg: ", (pcall(red.set, red, "p2", "x", {})))
        red:get("p1")
        ngx.say("after bad arg: ", cjson.encode((red:commit_pipeline())))
        ngx.say("keepalive: ", red:set_keepalive(1000, 10))
        "#
        .replace("RPORT", &r.port.to_string()),
    );
    let out = body(&s, "/t");
    assert!(out.contains("no pipeline: no pipeline"), "{}", out);
    assert!(
        out.contains(
            r#"["OK","Marry",[false,"ERR value is not an integer or out of range"],null]"#
        ),
        "{}",
        out
    );
    assert!(out.contains("cancelled: true"), "{}", out);
    assert!(out.contains("bad arg: false"), "{}", out);
    assert!(out.contains(r#"after bad arg: ["OK","a"]"#), "{}", out);
    assert!(out.contains("keepalive: 1"), "{}", out);
}

#[test]
fn redis_pubsub_and_read_reply() {
    let r = Redis::start(&[]);
    let s = start_lua(
        "",
        &r#"
        local cjson = require "cjson"
        local redis = require "resty.redis"
        local red, red2 = redis:new(), redis:new()
        red:set_timeout(300)
        assert(red:connect("127.0.0.1", RPORT))
        assert(red2:connect("127.0.0.1", RPORT))
        ngx.say("not subscribed: ", select(2, red:read_reply()))
        ngx.say("1: ", cjson.encode(red:subscribe("dog")))
        ngx.say("2: ", red2:publish("dog", "Hello"))
        ngx.say("3: ", cjson.encode(red:read_reply()))
        ngx.say("keepalive: ", select(2, red:set_keepalive()))
        ngx.say("wait: ", select(2, red:read_reply()))
        ngx.say("4: ", cjson.encode(red:unsubscribe("dog")))
        ngx.say("keepalive after: ", red:set_keepalive())
        red2:close()
        "#
        .replace("RPORT", &r.port.to_string()),
    );
    let out = body(&s, "/t");
    for e in [
        "not subscribed: not subscribed",
        r#"1: ["subscribe","dog",1]"#,
        "2: 1",
        r#"3: ["message","dog","Hello"]"#,
        "keepalive: subscribed state",
        "wait: timeout",
        r#"4: ["unsubscribe","dog",0]"#,
        "keepalive after: 1",
    ] {
        assert!(out.contains(e), "missing {:?} in:\n{}", e, out);
    }
}

#[test]
fn redis_keepalive_reuses_one_connection() {
    let r = Redis::start(&[]);
    let s = start_lua(
        "",
        &r#"
        local red = require("resty.redis"):new()
        assert(red:connect("127.0.0.1", RPORT))
        local n = red:get_reused_times()
        red:incr("hits")
        if ngx.var.arg_close then
            ngx.say(n, " close ", red:close())
        else
            ngx.say(n, " ", red:set_keepalive(10000, 4))
        end
        ngx.say("after: ", select(2, red:get_reused_times()))
        "#
        .replace("RPORT", &r.port.to_string()),
    );
    for i in 0..5 {
        let out = body(&s, "/t");
        assert!(
            out.starts_with(&format!("{} 1\n", i)),
            "round {}: {}",
            i,
            out
        );
        assert!(out.contains("after: closed"), "{}", out);
    }
    assert_eq!(
        r.connections(None),
        1,
        "one connection served five requests"
    );
    assert!(body(&s, "/t?close=1").starts_with("5 close 1"));
    assert!(
        body(&s, "/t").starts_with("0 1"),
        "closed one was not pooled"
    );
    assert_eq!(r.connections(None), 2);
}

#[test]
fn redis_select_does_not_leak_and_auth_is_kept() {
    let r = Redis::start(&["--requirepass", "sekret"]);
    let s = start_lua(
        "",
        &r#"
        local red = require("resty.redis"):new()
        assert(red:connect("127.0.0.1", RPORT))
        local reused = red:get_reused_times()
        local a = ngx.var.arg_a
        if a == "bad" then
            ngx.say("bad auth: ", select(2, red:auth("wrong")))
            ngx.say("keepalive: ", red:set_keepalive())
            return
        end
        ngx.say("auth: ", red:auth("sekret"))
        if a == "db1" then
            red:select(1)
            red:set("where", "db1")
        elseif a == "explicit" then
            red:select(1)
        end
        local w = red:get("where")
        if w == ngx.null then w = "null" end
        ngx.say("reused=", reused, " where=", w)
        red:set_keepalive()
        "#
        .replace("RPORT", &r.port.to_string()),
    );
    let out = body(&s, "/t?a=db1");
    assert!(out.contains("reused=0 where=db1"), "{}", out);
    let out = body(&s, "/t");
    assert!(out.contains("auth: OK"), "{}", out);
    assert!(
        out.contains("reused=1 where=null"),
        "database 1 leaked into the next user: {}",
        out
    );
    let out = body(&s, "/t?a=explicit");
    assert!(out.contains("reused=2 where=db1"), "{}", out);
    let out = body(&s, "/t?a=bad");
    assert!(out.contains("bad auth: WRONGPASS"), "{}", out);
    assert_eq!(r.connections(Some("sekret")), 1);
    // The failed AUTH kept the connection out of the pool.
    let out = body(&s, "/t");
    assert!(out.contains("reused=0"), "{}", out);
}

#[test]
fn redis_unix_socket_and_errors() {
    let r = Redis::start(&[]);
    let dead = free_port();
    // A server that accepts and never answers: reads time out.
    let mute = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mute_port = mute.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in mute.incoming().take(4).flatten() {
            held.push(s);
        }
        std::thread::sleep(Duration::from_secs(10));
    });
    let s = start_lua(
        "",
        &r#"
        local redis = require "resty.redis"
        local red = redis:new()
        ngx.say("unix: ", red:connect("unix:SOCK"), " ", red:ping())
        red:close()
        red = redis:new()
        ngx.say("refused: ", select(2, red:connect("127.0.0.1", DEAD)))
        red = redis:new()
        red:set_timeouts(200, 200, 100)
        assert(red:connect("127.0.0.1", MUTE))
        local t0 = ngx.now()
        ngx.say("timeout: ", select(2, red:get("x")))
        ngx.say("then: ", select(2, red:get("x")))
        ngx.say("fast: ", ngx.now() - t0 < 1)
        red = redis:new()
        assert(red:connect("127.0.0.1", RPORT))
        red:set_keepalive()
        ngx.say("after keepalive: ", select(2, red:get("x")))
        ngx.say("user copy: ", package.loaded["resty.redis"]._VERSION)
        "#
        .replace("RPORT", &r.port.to_string())
        .replace("SOCK", &r.sock())
        .replace("DEAD", &dead.to_string())
        .replace("MUTE", &mute_port.to_string()),
    );
    let out = body(&s, "/t");
    for e in [
        "unix: 1 PONG",
        "refused: connection refused",
        "timeout: timeout",
        "then: closed",
        "fast: true",
        "after keepalive: closed",
    ] {
        assert!(out.contains(e), "missing {:?} in:\n{}", e, out);
    }
}

/// The handler of the shared-connection tests: `k` the key, `t` the timeout, `db` selects
/// database 1 first (connection state: the object needs a connection of its own).
const SHARED_GET: &str = r#"
        local red = require("resty.redis"):new()
        red:set_timeout(tonumber(ngx.var.arg_t) or 3000)
        assert(red:connect("127.0.0.1", RPORT))
        local k = ngx.var.arg_k
        if ngx.var.arg_db then
            assert(red:select(1))
            assert(red:set(k, "db1-" .. k))
        end
        local v, err = red:get(k)
        if not v then
            ngx.say("err ", err)
            return
        end
        ngx.say("val ", v)
        red:set_keepalive(10000, 100)
"#;

/// `n` requests at once; returns each one's body, in order.
fn concurrently(s: &Server, paths: &[String]) -> Vec<String> {
    std::thread::scope(|sc| {
        let hs: Vec<_> = paths.iter().map(|p| sc.spawn(move || body(s, p))).collect();
        hs.into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    })
}

#[test]
fn redis_concurrent_requests_share_one_connection() {
    let r = Redis::start(&[]);
    let mut mset = vec!["MSET".to_string()];
    for i in 0..30 {
        mset.push(format!("k{i}"));
        mset.push(format!("v{i}"));
    }
    let args: Vec<&str> = mset.iter().map(|a| a.as_str()).collect();
    assert!(r.cmd(&args, None).starts_with("+OK"));
    r.base.set(r.base.get() + 1);
    let s = start_lua("", &SHARED_GET.replace("RPORT", &r.port.to_string()));
    assert_eq!(body(&s, "/t?k=k0"), "val v0\n");

    // Plain GETs and objects with connection state (SELECT) mixed: every reply is the asker's.
    for round in 0..3 {
        let paths: Vec<String> = (0..30)
            .map(|i| match i % 5 {
                0 => format!("/t?k=k{i}&db=1"),
                _ => format!("/t?k=k{i}"),
            })
            .collect();
        for (i, out) in concurrently(&s, &paths).iter().enumerate() {
            let want = match i % 5 {
                0 => format!("val db1-k{i}\n"),
                _ => format!("val v{i}\n"),
            };
            assert_eq!(out, &want, "round {round}, request {i}");
        }
    }
    // The database does not leak to a plain user after a SELECT user.
    for i in 0..5 {
        assert_eq!(body(&s, &format!("/t?k=k{i}")), format!("val v{i}\n"));
    }
    // Plain GETs of concurrent requests: one shared connection, no new ones.
    let before = r.connections(None);
    for round in 0..3 {
        let paths: Vec<String> = (0..30).map(|i| format!("/t?k=k{i}")).collect();
        for (i, out) in concurrently(&s, &paths).iter().enumerate() {
            assert_eq!(
                out,
                &format!("val v{i}\n"),
                "plain round {round}, request {i}"
            );
        }
    }
    assert_eq!(
        r.connections(None),
        before,
        "90 concurrent GETs opened connections: {}",
        s.error_log()
    );
}

#[test]
fn redis_timeout_in_a_shared_batch_keeps_replies_in_order() {
    let r = Redis::start(&[]);
    let mut mset = vec!["MSET".to_string()];
    for i in 0..6 {
        for p in ["a", "b", "c"] {
            mset.push(format!("{p}{i}"));
            mset.push(format!("v{p}{i}"));
        }
    }
    let args: Vec<&str> = mset.iter().map(|a| a.as_str()).collect();
    assert!(r.cmd(&args, None).starts_with("+OK"));
    let s = start_lua("", &SHARED_GET.replace("RPORT", &r.port.to_string()));
    assert_eq!(body(&s, "/t?k=c0"), "val vc0\n");

    // Hold the server busy for ~400 ms with a script, then queue GETs behind it: the ones with
    // a 50 ms timeout give up, the others must still get their own values, and so must every
    // request after the late replies came in.
    let port = r.port;
    let blocker = std::thread::spawn(move || {
        let script = "local s = redis.call('TIME') local t0 = s[1] * 1000000 + s[2] \
            while true do local n = redis.call('TIME') \
            if n[1] * 1000000 + n[2] - t0 > 400000 then return 1 end end";
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect redis");
        c.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let req = format!(
            "*3\r\n$4\r\nEVAL\r\n${}\r\n{}\r\n$1\r\n0\r\n",
            script.len(),
            script
        );
        c.write_all(req.as_bytes()).expect("write");
        let mut b = [0u8; 64];
        let n = c.read(&mut b).unwrap_or(0);
        String::from_utf8_lossy(&b[..n]).into_owned()
    });
    std::thread::sleep(Duration::from_millis(100));
    let paths: Vec<String> = (0..12)
        .map(|i| match i % 2 {
            0 => format!("/t?k=a{}&t=50", i / 2),
            _ => format!("/t?k=b{}&t=3000", i / 2),
        })
        .collect();
    let outs = concurrently(&s, &paths);
    assert_eq!(blocker.join().expect("blocker"), ":1\r\n");
    for (i, out) in outs.iter().enumerate() {
        let want = match i % 2 {
            0 => "err timeout\n".to_string(),
            _ => format!("val vb{}\n", i / 2),
        };
        assert_eq!(out, &want, "request {i} ({})", paths[i]);
    }
    for round in 0..2 {
        let paths: Vec<String> = (0..6).map(|i| format!("/t?k=c{i}")).collect();
        for (i, out) in concurrently(&s, &paths).iter().enumerate() {
            assert_eq!(out, &format!("val vc{i}\n"), "after, round {round}");
        }
    }
    for i in 0..6 {
        assert_eq!(body(&s, &format!("/t?k=a{i}")), format!("val va{i}\n"));
    }
}

#[test]
fn redis_idle_connections_expire_while_the_shared_one_serves() {
    let r = Redis::start(&[]);
    let s = start_lua(
        "",
        &r#"
        local red = require("resty.redis"):new()
        assert(red:connect("127.0.0.1", RPORT))
        ngx.sleep(tonumber(ngx.var.arg_s) or 0)
        assert(red:get("x"))
        red:set_keepalive(300, 100)
        ngx.say("ok")
        "#
        .replace("RPORT", &r.port.to_string()),
    );
    let clients = || {
        r.cmd(&["INFO", "clients"], None)
            .lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .expect("connected_clients")
    };
    // Ten requests connect before any of them is done: ten connections; one becomes the
    // shared connection at set_keepalive, nine wait idle in the pool for 300 ms.
    let paths: Vec<String> = (0..10).map(|_| "/t?s=0.2".to_string()).collect();
    for out in concurrently(&s, &paths) {
        assert_eq!(out, "ok\n");
    }
    assert!(clients() >= 10, "{}", clients());
    // Requests keep the shared connection busy; the idle ones expire meanwhile.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut n = clients();
    while n > 2 && Instant::now() < deadline {
        assert_eq!(body(&s, "/t"), "ok\n");
        std::thread::sleep(Duration::from_millis(50));
        n = clients();
    }
    assert!(
        n <= 2,
        "idle connections outlived their timeout: {} clients",
        n
    );
}

#[test]
fn user_copy_on_package_path_wins_over_bundled() {
    let s = start_lua_with(
        "",
        r#"
        ngx.say(require("resty.redis").mine, " ", require("resty.http").mine)
        ngx.say(type(require("resty.redis").new))
        "#,
        &[
            ("lua/resty/redis.lua", "return { mine = 'redis-user-copy' }"),
            ("lua/resty/http.lua", "return { mine = 'http-user-copy' }"),
        ],
    );
    let out = body(&s, "/t");
    assert!(out.contains("redis-user-copy http-user-copy"), "{}", out);
    assert!(out.contains("nil"), "{}", out);
    // Without a user copy the bundled modules load.
    let s = start_lua(
        "",
        r#"ngx.say(type(require("resty.redis").new), " ", type(require("resty.http").new))"#,
    );
    assert_eq!(body(&s, "/t").trim(), "function function");
}

// ---------------------------------------------------------------------------------------------
// resty.http

#[test]
fn http_request_and_streaming_bodies() {
    let up = upstream();
    let s = start_lua(
        "",
        &r#"
        local http = require "resty.http"
        local httpc = http.new()
        httpc:set_timeouts(1000, 1000, 1000)
        assert(httpc:connect({ scheme = "http", host = "127.0.0.1", port = UPORT }))
        local res = assert(httpc:request({ path = "/cl" }))
        ngx.say("status: ", res.status, " ", res.reason, " has_body: ", tostring(res.has_body))
        ngx.say("ctype: ", res.headers["Content-Type"], " ", res.headers["content-type"])
        ngx.say("multi: ", table.concat(res.headers["X-Multi"], ","))
        ngx.say("body: ", res:read_body())
        res = assert(httpc:request({ path = "/chunked" }))
        local parts = {}
        repeat
            local chunk, err = res.body_reader(4)
            if chunk then parts[#parts + 1] = chunk end
        until not chunk
        ngx.say("chunks: ", table.concat(parts, "|"))
        res = assert(httpc:request({ path = "/nobody" }))
        ngx.say("204: ", tostring(res.has_body), " ", select(2, res:read_body()))
        ngx.say("reused: ", httpc:get_reused_times())
        ngx.say("keepalive: ", httpc:set_keepalive())
        -- legacy connect(host, port)
        local h2 = http.new()
        assert(h2:connect("127.0.0.1", UPORT))
        ngx.say("legacy reused: ", h2:get_reused_times())
        res = assert(h2:request({ method = "POST", path = "/echo", query = { a = "1 2" },
            headers = { ["X-Test"] = "yes" }, body = "payload" }))
        ngx.say(res.status, " ", res:read_body())
        h2:close()
        "#
        .replace("UPORT", &up.port.to_string()),
    );
    let out = body(&s, "/t");
    let p = up.port;
    for e in [
        "status: 200 OK has_body: true".to_string(),
        "ctype: text/plain text/plain".to_string(),
        "multi: a,b".to_string(),
        "body: hello world".to_string(),
        "chunks: abcd|efgh|ij".to_string(),
        "204: false no body to be read".to_string(),
        "reused: 0".to_string(),
        "keepalive: 1".to_string(),
        "legacy reused: 1".to_string(),
        format!("201 method=POST uri=/echo?a=1%202 x-test=yes host=127.0.0.1:{p} ua=lua-resty-http/0.17.2 (Lua) tidegate cl=7 body=payload"),
    ] {
        assert!(out.contains(&e), "missing {:?} in:\n{}", e, out);
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "connection reused");
}

#[test]
fn http_request_uri_keepalive_and_errors() {
    let up = upstream();
    let dead = free_port();
    let s = start_lua(
        "",
        &r#"
        local http = require "resty.http"
        local httpc = http.new()
        local base = "http://127.0.0.1:UPORT"
        local res, err = httpc:request_uri(base .. "/echo?x=1", {
            method = "PUT",
            query = { b = "2" },
            headers = { ["X-Test"] = "q" },
            body = coroutine.wrap(function() coroutine.yield("it") coroutine.yield("er") end),
            keepalive_timeout = 10000, keepalive_pool = 5,
        })
        ngx.say(res.status, " ", res.body)
        for i = 1, 3 do
            local r = assert(http.new():request_uri(base .. "/cl"))
            ngx.say(i, ": ", r.body)
        end
        res = assert(http.new():request_uri(base .. "/close"))
        ngx.say("close: ", res.body)
        local h = http.new()
        assert(h:connect({ host = "127.0.0.1", port = UPORT }))
        assert(h:request({ path = "/close" })):read_body()
        ngx.say("must close: ", h:set_keepalive())
        ngx.say("refused: ", select(2, http.new():request_uri("http://127.0.0.1:DEAD/")))
        h = http.new()
        h:set_timeouts(500, 500, 200)
        local t0 = ngx.now()
        ngx.say("timeout: ", select(2, h:request_uri(base .. "/slow")))
        ngx.say("fast: ", ngx.now() - t0 < 1.5)
        local p = http.new():parse_uri("https://example.com/a/b?c=d")
        ngx.say("parse: ", table.concat(p, " "))
        p = http.new():parse_uri("http://[::1]:8080", false)
        ngx.say("parse6: ", p[2], " ", p[3], " ", p[4])
        ngx.say("bad: ", select(2, http.new():parse_uri("ftp:x")))
        "#
        .replace("UPORT", &up.port.to_string())
        .replace("DEAD", &dead.to_string()),
    );
    let out = body(&s, "/t");
    for e in [
        "201 method=PUT uri=/echo?b=2 x-test=q",
        "cl=4 body=iter",
        "1: hello world",
        "3: hello world",
        "close: bye",
        "must close: 2connection must be closed",
        "refused: connection refused",
        "timeout: timeout",
        "fast: true",
        "parse: https example.com 443 /a/b?c=d",
        "parse6: [::1] 8080 /",
        "bad: bad uri: ftp:x",
    ] {
        assert!(out.contains(e), "missing {:?} in:\n{}", e, out);
    }
    // /echo, 3x /cl and the first /close share one connection (the server closes it after
    // /close); the second /close and /slow each need a new one.
    assert_eq!(up.accepted.load(Ordering::SeqCst), 3);
}

#[test]
fn https_with_verification_and_keepalive() {
    let (ca, acceptor) = tls_pki();
    let up = upstream_tls(Some(acceptor));
    let s = start_lua_with(
        "    lua_ssl_trusted_certificate ca.pem;",
        &r#"
        local http = require "resty.http"
        local base = "https://127.0.0.1:UPORT/cl"
        local res, err = http.new():request_uri(base, { ssl_verify = false })
        ngx.say("noverify: ", res and res.body or err)
        res, err = http.new():request_uri(base, { ssl_server_name = "localhost" })
        ngx.say("verified: ", res and res.body or err)
        res, err = http.new():request_uri(base, { ssl_server_name = "other.test" })
        ngx.say("wrong name: ", res and res.body or err)
        local h = http.new()
        assert(h:connect({ scheme = "https", host = "127.0.0.1", port = UPORT,
            ssl_server_name = "localhost" }))
        ngx.say("reused: ", h:get_reused_times())
        h:close()
        "#
        .replace("UPORT", &up.port.to_string()),
        &[("conf/ca.pem", &ca)],
    );
    let out = body(&s, "/t");
    assert!(out.contains("noverify: hello world"), "{}", out);
    assert!(out.contains("verified: hello world"), "{}", out);
    assert!(
        out.contains("wrong name: certificate host mismatch"),
        "{}",
        out
    );
    assert!(out.contains("reused: 1"), "{}", out);
    // no-verify, verified (pooled apart from no-verify), wrong name: three connections.
    assert_eq!(up.accepted.load(Ordering::SeqCst), 3);
}
