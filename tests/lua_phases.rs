//! Whole-server tests of how `*_by_lua*` handlers run inside nginx's phases: order, `ngx.ctx`,
//! `ngx.exit`/`ngx.exec`/`ngx.redirect` in each phase, Lua errors, body filters and streaming,
//! interleaving of many sleeping requests on one worker, set/init/init_worker, `*_by_lua_file`
//! and `require`. Expected values follow lua-nginx-module's documented behaviour.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{server_conf, wait_log, Server};

fn start(http_extra: &str, locations: &str) -> Server {
    Server::start(&server_conf(http_extra, locations))
}

#[test]
fn phases_run_in_nginx_order_sharing_ctx_per_request() {
    let s = start(
        "",
        r#"
        location /t {
            rewrite_by_lua_block {
                ngx.ctx.trace = (ngx.ctx.trace or "") .. ngx.get_phase() .. ","
                ngx.ctx.n = (ngx.ctx.n or 0) + 1
            }
            access_by_lua_block { ngx.ctx.trace = ngx.ctx.trace .. ngx.get_phase() .. "," }
            content_by_lua_block {
                ngx.ctx.trace = ngx.ctx.trace .. ngx.get_phase() .. ","
                ngx.say("n=", ngx.ctx.n)
            }
            header_filter_by_lua_block {
                ngx.ctx.trace = ngx.ctx.trace .. ngx.get_phase() .. ","
                ngx.header["X-Trace"] = ngx.ctx.trace
            }
            body_filter_by_lua_block {
                if not ngx.ctx.seen_body then
                    ngx.ctx.seen_body = true
                    ngx.ctx.trace = ngx.ctx.trace .. ngx.get_phase() .. ","
                end
            }
            log_by_lua_block {
                ngx.log(ngx.WARN, "TRACE[", ngx.var.arg_r, "]=", ngx.ctx.trace .. ngx.get_phase())
            }
        }
"#,
    );
    for r in 1..=2 {
        let resp = s.get(&format!("/t?r={r}"));
        assert_eq!(resp.status, 200, "{:?}", resp);
        // ngx.ctx is fresh per request: the counter starts again from nil.
        assert_eq!(resp.text(), "n=1\n");
        assert_eq!(
            resp.header("X-Trace"),
            Some("rewrite,access,content,header_filter,")
        );
        let needle = format!("TRACE[{r}]=rewrite,access,content,header_filter,body_filter,log");
        let log = wait_log(&s, &needle);
        assert!(
            log.contains(&needle),
            "missing {needle:?} in error.log:\n{log}"
        );
        assert!(log.contains("[warn]"), "{log}");
    }
}

#[test]
fn set_by_lua_runs_in_set_phase_before_rewrite_by_lua() {
    let s = start(
        "",
        r#"
        location /t {
            set_by_lua_block $p { return ngx.get_phase() }
            rewrite_by_lua_block { ngx.ctx.seen = ngx.var.p }
            content_by_lua_block { ngx.say(ngx.var.p, " ", ngx.ctx.seen) }
        }
"#,
    );
    let r = s.get("/t");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "set set\n");
}

// ---------------------------------------------------------------------------------------------
// ngx.exit / ngx.exec / ngx.redirect

fn exit_server() -> Server {
    start(
        "",
        r#"
        location /rewrite403 {
            rewrite_by_lua_block { ngx.exit(403) }
            access_by_lua_block { ngx.log(ngx.ERR, "ACCESS-RAN-AFTER-EXIT") }
            content_by_lua_block { ngx.log(ngx.ERR, "CONTENT-RAN-AFTER-EXIT") ngx.say("content") }
        }
        location /access_ok {
            access_by_lua_block { ngx.ctx.a = "access"; ngx.exit(ngx.OK); ngx.ctx.a = "not-reached" }
            content_by_lua_block { ngx.say("content after ", ngx.ctx.a) }
        }
        location /content201 {
            content_by_lua_block { ngx.exit(201) }
        }
        location /status201 {
            content_by_lua_block { ngx.status = 201; ngx.say("made"); ngx.exit(ngx.HTTP_OK) }
        }
        location /say_then_exit {
            content_by_lua_block { ngx.say("partial"); ngx.exit(503); ngx.say("not reached") }
        }
        location /notfound {
            content_by_lua_block { ngx.exit(ngx.HTTP_NOT_FOUND) }
        }
        location /pcall_exit {
            content_by_lua_block {
                local ok, err = pcall(ngx.exit, 403)
                ngx.log(ngx.ERR, "PCALL-RETURNED ", tostring(ok), " ", tostring(err))
                ngx.say("swallowed")
            }
        }
        location /pcall_exit_access {
            access_by_lua_block {
                pcall(function() ngx.exit(401) end)
                ngx.log(ngx.ERR, "PCALL-ACCESS-RETURNED")
            }
            content_by_lua_block { ngx.say("content ran") }
        }
        location /redirect {
            rewrite_by_lua_block { ngx.redirect("/x", 301) }
            content_by_lua_block { ngx.say("not reached") }
        }
        location /redirect_default {
            content_by_lua_block { ngx.redirect("http://example.com/y?a=1"); ngx.say("not reached") }
        }
        location /exec {
            rewrite_by_lua_block { ngx.exec("/other", "k=v") }
        }
        location /exec_named {
            access_by_lua_block { ngx.exec("@named") }
            content_by_lua_block { ngx.say("not reached") }
        }
        location /other {
            content_by_lua_block { ngx.say("other uri=", ngx.var.uri, " k=", ngx.var.arg_k) }
        }
        location @named {
            content_by_lua_block { ngx.say("named from ", ngx.var.request_uri) }
        }
        location /hf {
            content_by_lua_block { ngx.header["X-Drop"] = "1"; ngx.say("body") }
            header_filter_by_lua_block {
                ngx.status = 202
                ngx.header["X-Drop"] = nil
                ngx.header["X-Added"] = "by-filter"
            }
        }
"#,
    )
}

#[test]
fn exit_in_rewrite_skips_access_and_content() {
    let s = exit_server();
    let r = s.get("/rewrite403");
    assert_eq!(r.status, 403);
    assert!(r.text().contains("403 Forbidden"), "{}", r.text());
    let log = s.error_log();
    assert!(!log.contains("ACCESS-RAN-AFTER-EXIT"), "{log}");
    assert!(!log.contains("CONTENT-RAN-AFTER-EXIT"), "{log}");
}

#[test]
fn exit_ok_in_access_continues_to_content() {
    let s = exit_server();
    let r = s.get("/access_ok");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "content after access\n");
}

#[test]
fn exit_with_2xx_in_content() {
    let s = exit_server();
    let r = s.get("/content201");
    assert_eq!(r.status, 201);
    assert_eq!(r.text(), "");
    let r = s.get("/status201");
    assert_eq!(r.status, 201);
    assert_eq!(r.text(), "made\n");
}

#[test]
fn exit_after_output_keeps_status_and_stops_handler() {
    // ngx.say sends the header (200) right away, so a later ngx.exit(503) only ends the request.
    let s = exit_server();
    let r = s.get("/say_then_exit");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "partial\n");
}

#[test]
fn exit_404_gives_nginx_page() {
    let s = exit_server();
    let r = s.get("/notfound");
    assert_eq!(r.status, 404);
    let body = r.text();
    assert!(body.contains("<title>404 Not Found</title>"), "{body}");
    assert_eq!(r.header("Content-Type"), Some("text/html"));
}

#[test]
fn exit_cannot_be_swallowed_by_pcall() {
    let s = exit_server();
    let r = s.get("/pcall_exit");
    assert_eq!(r.status, 403);
    assert!(!r.text().contains("swallowed"));
    let r = s.get("/pcall_exit_access");
    assert_eq!(r.status, 401);
    assert!(!r.text().contains("content ran"));
    let log = s.error_log();
    assert!(!log.contains("PCALL-RETURNED"), "{log}");
    assert!(!log.contains("PCALL-ACCESS-RETURNED"), "{log}");
}

#[test]
fn redirect_sets_status_and_location() {
    let s = exit_server();
    let r = s.get("/redirect");
    assert_eq!(r.status, 301);
    assert_eq!(r.header("Location"), Some("/x"));
    assert!(r.text().contains("301 Moved Permanently"), "{}", r.text());
    let r = s.get("/redirect_default");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("Location"), Some("http://example.com/y?a=1"));
    assert!(!r.text().contains("not reached"));
}

#[test]
fn exec_runs_other_location() {
    let s = exit_server();
    let r = s.get("/exec");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "other uri=/other k=v\n");
    let r = s.get("/exec_named");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "named from /exec_named\n");
}

#[test]
fn header_filter_changes_status_and_headers() {
    let s = exit_server();
    let r = s.get("/hf");
    assert_eq!(r.status, 202);
    assert_eq!(r.header("X-Drop"), None);
    assert_eq!(r.header("X-Added"), Some("by-filter"));
    assert_eq!(r.text(), "body\n");
}

#[test]
fn internal_location_reachable_only_by_exec() {
    let s = start(
        "",
        r#"
        location /in { internal; content_by_lua_block { ngx.say("internal ok") } }
        location /go { content_by_lua_block { ngx.exec("/in") } }
"#,
    );
    assert_eq!(s.get("/in").status, 404);
    let r = s.get("/go");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "internal ok\n");
}

// ---------------------------------------------------------------------------------------------
// Lua errors

#[test]
fn lua_error_in_access_gives_500_and_logs_and_worker_survives() {
    let s = start(
        "",
        r#"
        location /boom { access_by_lua_block { error("boom-in-access-42") } content_by_lua_block { ngx.say("no") } }
        location /index { access_by_lua_block { local t = nil; return t.field } }
        location /ok { content_by_lua_block { ngx.say("alive") } }
"#,
    );
    let r = s.get("/boom");
    assert_eq!(r.status, 500);
    assert!(
        r.text().contains("500 Internal Server Error"),
        "{}",
        r.text()
    );
    let log = wait_log(&s, "boom-in-access-42");
    let line = log
        .lines()
        .find(|l| l.contains("boom-in-access-42"))
        .unwrap_or_else(|| panic!("no error line in:\n{log}"));
    assert!(line.contains("[error]"), "{line}");
    assert!(line.contains("failed to run access_by_lua*:"), "{line}");
    let r = s.get("/index");
    assert_eq!(r.status, 500);
    let log = wait_log(&s, "attempt to index");
    assert!(log.contains("attempt to index"), "{log}");
    // Same worker (worker_processes 1) still serves.
    for _ in 0..3 {
        let r = s.get("/ok");
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "alive\n");
    }
}

#[test]
fn lua_error_in_content_gives_500_and_logs_and_worker_survives() {
    let s = start(
        "",
        r#"
        location /boom { content_by_lua_block { local x = 1 + {} } }
        location /ok { content_by_lua_block { ngx.say("alive") } }
"#,
    );
    let r = s.get("/boom");
    assert_eq!(r.status, 500);
    let log = wait_log(&s, "failed to run content_by_lua*:");
    let line = log
        .lines()
        .find(|l| l.contains("failed to run content_by_lua*:"))
        .unwrap_or_else(|| panic!("no error line in:\n{log}"));
    assert!(line.contains("[error]"), "{line}");
    assert!(line.contains("attempt to perform arithmetic"), "{line}");
    let r = s.get("/ok");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "alive\n");
}

// ---------------------------------------------------------------------------------------------
// Body filter and streaming

#[test]
fn body_filter_rewrites_chunks_with_consistent_framing() {
    // README: a filter that changes the length must run with Content-Length cleared in a header
    // filter; the response is then framed by what is really sent (chunked in nginx). Either way
    // a declared Content-Length must equal the bytes on the wire.
    let s = start(
        "",
        r#"
        location /up {
            content_by_lua_block { ngx.header.content_length = 11; ngx.print("hello world") }
            body_filter_by_lua_block { ngx.arg[1] = string.upper(ngx.arg[1]) }
        }
        location /longer {
            content_by_lua_block { ngx.header.content_length = 11; ngx.print("hello world") }
            header_filter_by_lua_block { ngx.header.content_length = nil }
            body_filter_by_lua_block { ngx.arg[1] = "<" .. ngx.arg[1] .. ">" }
        }
        location /plain {
            content_by_lua_block { ngx.header.content_length = 11; ngx.print("hello world") }
        }
"#,
    );
    for (path, want) in [("/up", "HELLO WORLD"), ("/longer", "<hello world><>")] {
        let r = s.get(path);
        assert_eq!(r.status, 200);
        let body = r.text();
        // The empty last chunk is filtered too: `<>` appears once at eof.
        assert!(
            body == want || (path == "/longer" && body == "<hello world>"),
            "{path}: {body:?}"
        );
        match r.header("Content-Length") {
            Some(cl) => assert_eq!(cl, body.len().to_string(), "{path}: {:?}", r.headers),
            None => assert_eq!(r.header("Transfer-Encoding"), Some("chunked"), "{path}"),
        }
    }
    let r = s.get("/plain");
    assert_eq!(r.text(), "hello world");
    assert_eq!(r.header("Content-Length"), Some("11"));
}

#[test]
fn body_filter_output_after_flush_is_chunked() {
    // Once output streams (flush before the end), the body filter's changes of length can only
    // be framed by chunked encoding: Content-Length must be gone.
    let s = start(
        "",
        r#"
        location /t {
            content_by_lua_block { ngx.header.content_length = 4; ngx.print("ab"); ngx.flush(true); ngx.print("cd") }
            body_filter_by_lua_block { ngx.arg[1] = ngx.arg[1] .. ngx.arg[1] }
        }
"#,
    );
    let r = s.get("/t");
    assert_eq!(r.text(), "ababcdcd");
    assert_eq!(r.header("Content-Length"), None, "{:?}", r.headers);
    assert_eq!(r.header("Transfer-Encoding"), Some("chunked"));
}

#[test]
fn body_filter_sees_eof_flag_on_last_call_only() {
    let s = start(
        "",
        r#"
        location /t {
            content_by_lua_block { ngx.say("one"); ngx.flush(true); ngx.say("two") }
            body_filter_by_lua_block {
                ngx.ctx.calls = (ngx.ctx.calls or 0) + 1
                if ngx.arg[2] then
                    ngx.arg[1] = ngx.arg[1] .. "[eof after " .. ngx.ctx.calls .. " calls]"
                end
            }
        }
"#,
    );
    let r = s.get("/t");
    assert_eq!(r.status, 200);
    let body = r.text();
    assert!(body.starts_with("one\ntwo\n[eof after "), "{body}");
    assert!(body.ends_with(" calls]"), "{body}");
    assert_eq!(body.matches("[eof").count(), 1, "{body}");
    let calls: u32 = body
        .trim_start_matches("one\ntwo\n[eof after ")
        .trim_end_matches(" calls]")
        .parse()
        .unwrap_or(0);
    assert!(
        calls >= 2,
        "flush(true) then more output needs at least two calls: {body}"
    );
}

#[test]
fn body_filter_can_drop_chunk_and_end_early() {
    let s = start(
        "",
        r#"
        location /t {
            content_by_lua_block { ngx.say("keep"); ngx.flush(true); ngx.say("drop") }
            body_filter_by_lua_block {
                if string.find(ngx.arg[1], "drop", 1, true) then ngx.arg[1] = nil end
            }
        }
"#,
    );
    let r = s.get("/t");
    assert_eq!(r.text(), "keep\n");
}

#[test]
fn flush_streams_first_chunk_before_handler_finishes() {
    let s = start(
        "",
        r#"
        location /stream {
            content_by_lua_block {
                ngx.say("a")
                ngx.flush(true)
                ngx.sleep(0.3)
                ngx.say("b")
            }
        }
"#,
    );
    let mut sock = TcpStream::connect(s.addr()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    sock.write_all(b"GET /stream HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("write");
    // Read until the first chunk's data ("a\n") is here; at that moment "b" must not be.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_len = loop {
        let n = sock.read(&mut buf).expect("read first chunk");
        assert!(
            n > 0,
            "eof before first chunk: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if got[p + 4..].windows(2).any(|w| w == b"a\n") {
                break p + 4;
            }
        }
    };
    let first = String::from_utf8_lossy(&got).into_owned();
    assert!(
        first.contains("Transfer-Encoding: chunked")
            || first.contains("transfer-encoding: chunked"),
        "{first}"
    );
    assert!(
        !got[head_len..].contains(&b'b'),
        "second chunk arrived together with the first: the flush did not stream\n{first}"
    );
    // Then the rest arrives.
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the rest: {e}: {:?}", String::from_utf8_lossy(&got)),
        }
    }
    let all = String::from_utf8_lossy(&got[head_len..]).into_owned();
    let a = all.find("a\n").unwrap_or(usize::MAX);
    let b = all.find("b\n").unwrap_or_else(|| panic!("no b in {all:?}"));
    assert!(a < b, "{all:?}");
}

// ---------------------------------------------------------------------------------------------
// Concurrency on one worker

#[test]
fn sleeping_requests_interleave_on_one_worker() {
    let s = start(
        "",
        r#"
        location /sleep { content_by_lua_block { ngx.sleep(0.2) ngx.say("slept ", ngx.worker.id()) } }
"#,
    );
    let addr = s.addr();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..50)
        .map(|_| {
            std::thread::spawn(move || {
                let mut sock = TcpStream::connect(addr).expect("connect");
                sock.set_read_timeout(Some(Duration::from_secs(15)))
                    .expect("timeout");
                sock.write_all(
                    b"GET /sleep HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                )
                .expect("write");
                common::read_response(&mut sock).expect("response")
            })
        })
        .collect();
    for h in handles {
        let r = h.join().expect("client thread");
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "slept 0\n");
    }
    let took = t0.elapsed();
    // Sequential (blocking) sleeps would take 50 * 0.2 = 10 s.
    assert!(
        took < Duration::from_secs(5),
        "50 sleeping requests took {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// set_by_lua, init_by_lua, init_worker_by_lua

#[test]
fn set_by_lua_file_receives_arguments() {
    let conf = server_conf(
        "",
        r#"
        location /t {
            set $a "32";
            set $b "56";
            set_by_lua_file $sum conf/sum.lua $a $b;
            set_by_lua_block $bang { return ngx.var.a .. "!" }
            content_by_lua_block { ngx.say(ngx.var.sum, " ", ngx.var.bang) }
        }
"#,
    );
    let s = Server::start_with(
        &conf,
        &[(
            "conf/sum.lua",
            "return tonumber(ngx.arg[1]) + tonumber(ngx.arg[2])\n",
        )],
    );
    let r = s.get("/t");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "88 32!\n");
}

#[test]
fn set_by_lua_result_visible_to_later_set_and_headers() {
    let s = start(
        "",
        r#"
        location /t {
            set $foo 32;
            set_by_lua_block $bar { return tonumber(ngx.var.foo) + 1 }
            set $baz "bar: $bar";
            add_header X-Baz $baz;
            content_by_lua_block { ngx.say(ngx.var.baz) }
        }
"#,
    );
    let r = s.get("/t");
    assert_eq!(r.text(), "bar: 33\n");
    assert_eq!(r.header("X-Baz"), Some("bar: 33"));
}

#[test]
fn init_and_init_worker_run_before_requests() {
    let s = start(
        r#"
    init_by_lua_block {
        GREETING = "hello from init"
        INIT_PHASE = ngx.get_phase()
    }
    init_worker_by_lua_block {
        WORKER_SEEN = ngx.worker.id()
        INIT_WORKER_PHASE = ngx.get_phase()
        ngx.log(ngx.NOTICE, "init_worker ran in worker ", ngx.worker.id())
    }
"#,
        r#"
        location /t {
            content_by_lua_block {
                ngx.say(GREETING, "|", INIT_PHASE, "|", WORKER_SEEN, "|", INIT_WORKER_PHASE, "|", ngx.worker.count())
            }
        }
"#,
    );
    let r = s.get("/t");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from init|init|0|init_worker|1\n");
    let log = wait_log(&s, "init_worker ran in worker 0");
    assert!(log.contains("init_worker ran in worker 0"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// *_by_lua_file, lua_package_path, require, module state

#[test]
fn by_lua_file_handlers_run_files_under_prefix() {
    let conf = server_conf(
        "",
        r#"
        location /f {
            rewrite_by_lua_file lua/rw.lua;
            access_by_lua_file lua/acc.lua;
            content_by_lua_file lua/content.lua;
            header_filter_by_lua_file lua/hf.lua;
        }
"#,
    );
    let s = Server::start_with(
        &conf,
        &[
            ("lua/rw.lua", "ngx.ctx.t = 'rw'\n"),
            ("lua/acc.lua", "ngx.ctx.t = ngx.ctx.t .. '+acc'\n"),
            ("lua/content.lua", "ngx.say('file content ', ngx.ctx.t)\n"),
            ("lua/hf.lua", "ngx.header['X-From-File'] = 'hf'\n"),
        ],
    );
    let r = s.get("/f");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "file content rw+acc\n");
    assert_eq!(r.header("X-From-File"), Some("hf"));
}

#[test]
fn missing_lua_file_gives_500_with_log() {
    let s = start(
        "",
        "        location /f { content_by_lua_file lua/nope.lua; }\n",
    );
    let r = s.get("/f");
    assert_eq!(r.status, 500);
    let log = wait_log(&s, "nope.lua");
    assert!(log.contains("[error]") && log.contains("nope.lua"), "{log}");
}

#[test]
fn require_follows_package_path_and_module_state_persists() {
    let conf = server_conf(
        r#"    lua_package_path "$prefix/mylib/?.lua;;";"#,
        r#"
        location /count {
            content_by_lua_block {
                local counter = require "counter"
                local helper = require "helper"
                ngx.say(counter.inc(), " ", helper.name())
            }
        }
"#,
    );
    let s = Server::start_with(
        &conf,
        &[
            (
                "mylib/counter.lua",
                "local _M = {}\nlocal n = 0\nfunction _M.inc() n = n + 1 return n end\nreturn _M\n",
            ),
            // Found through the default part of the path (`;;` = $prefix/lua/?.lua ...).
            (
                "lua/helper.lua",
                "return { name = function() return 'helper' end }\n",
            ),
        ],
    );
    for i in 1..=3 {
        let r = s.get("/count");
        assert_eq!(r.status, 200, "{}", s.error_log());
        assert_eq!(r.text(), format!("{i} helper\n"));
    }
}

#[test]
fn require_of_missing_module_is_500_with_search_paths_logged() {
    let s = start(
        "",
        "        location /t { content_by_lua_block { require \"no_such_mod\" } }\n",
    );
    let r = s.get("/t");
    assert_eq!(r.status, 500);
    let log = wait_log(&s, "module 'no_such_mod' not found");
    assert!(log.contains("module 'no_such_mod' not found"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// More phase semantics

#[test]
fn ctx_is_dropped_by_internal_redirect() {
    // README (ngx.ctx): internal redirects destroy the original request's ngx.ctx data.
    let s = start(
        "",
        r#"
        location /from {
            rewrite_by_lua_block { ngx.ctx.mark = "set-before-exec"; ngx.exec("/to") }
        }
        location /to {
            content_by_lua_block { ngx.say("mark=", tostring(ngx.ctx.mark)) }
        }
"#,
    );
    let r = s.get("/from");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "mark=nil\n");
}

#[test]
fn interleaved_requests_keep_their_own_ctx_and_vars() {
    let s = start(
        "",
        r#"
        location /id {
            access_by_lua_block {
                ngx.ctx.id = ngx.var.arg_id
                ngx.sleep(tonumber(ngx.var.arg_d))
            }
            content_by_lua_block {
                ngx.sleep(tonumber(ngx.var.arg_d))
                ngx.say(ngx.ctx.id, " ", ngx.var.arg_id, " ", ngx.req.get_uri_args().id)
            }
        }
"#,
    );
    let addr = s.addr();
    let handles: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                // Different delays so that requests overtake each other on the one worker.
                let d = (20 - i) as f64 * 0.005;
                let mut sock = TcpStream::connect(addr).expect("connect");
                sock.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                sock.write_all(
                    format!("GET /id?id={i}&d={d} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .expect("write");
                (i, common::read_response(&mut sock).expect("response"))
            })
        })
        .collect();
    for h in handles {
        let (i, r) = h.join().expect("client thread");
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("{i} {i} {i}\n"));
    }
}

#[test]
fn sleep_yields_in_rewrite_and_access_too() {
    let s = start(
        "",
        r#"
        location /t {
            rewrite_by_lua_block { ngx.sleep(0.01) ngx.ctx.a = 1 }
            access_by_lua_block { ngx.sleep(0) ngx.ctx.a = ngx.ctx.a + 1 }
            content_by_lua_block { ngx.sleep(0.01) ngx.say(ngx.ctx.a) }
        }
"#,
    );
    assert_eq!(s.get("/t").text(), "2\n");
}

#[test]
fn user_coroutines_without_waits() {
    let s = start(
        "",
        r#"
        location /co {
            content_by_lua_block {
                local gen = coroutine.wrap(function() for i = 1, 3 do coroutine.yield(i) end end)
                local co = coroutine.create(function(a) local b = coroutine.yield(a * 2) return b + 1 end)
                local _, x = coroutine.resume(co, 5)
                local _, y = coroutine.resume(co, 100)
                ngx.say(gen(), gen(), gen(), " ", x, " ", y, " ", coroutine.status(co))
            }
        }
"#,
    );
    let r = s.get("/co");
    assert_eq!(r.status, 200, "{}", wait_log(&s, "[error]"));
    assert_eq!(r.text(), "123 10 101 dead\n");
}

#[test]
fn user_coroutines_may_wait() {
    // lua-nginx-module replaces the coroutine API so that a user coroutine may call yielding
    // ngx APIs (ngx.sleep, cosockets): the wait happens and the coroutine then continues.
    let s = start(
        "",
        r#"
        location /co {
            content_by_lua_block {
                local co = coroutine.wrap(function(x)
                    ngx.sleep(0.01)
                    local y = coroutine.yield(x + 1)
                    ngx.sleep(0.01)
                    return y * 2
                end)
                local first = co(1)
                local second = co(10)
                local c2 = coroutine.create(function() ngx.sleep(0.01) return "resumed" end)
                local ok, v = coroutine.resume(c2)
                ngx.say(first, " ", second, " ", tostring(ok), " ", v, " ", coroutine.status(c2))
            }
        }
"#,
    );
    let r = s.get("/co");
    assert_eq!(r.status, 200, "{}", wait_log(&s, "[error]"));
    assert_eq!(r.text(), "2 20 true resumed dead\n");
}

#[test]
fn pcall_still_catches_ordinary_errors() {
    let s = start(
        "",
        r#"
        location /p {
            content_by_lua_block {
                local ok, err = pcall(error, "plain failure")
                local ok2, err2 = pcall(function() ngx.sleep(0.001) error({ code = 7 }) end)
                ngx.say(tostring(ok), " ", err, " ", tostring(ok2), " ", err2.code)
            }
        }
"#,
    );
    let r = s.get("/p");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "false plain failure false 7\n");
}

#[test]
fn error_in_rewrite_is_500_and_error_in_log_phase_only_logs() {
    let s = start(
        "",
        r#"
        location /rw { rewrite_by_lua_block { error("rw-boom") } content_by_lua_block { ngx.say("no") } }
        location /lg {
            content_by_lua_block { ngx.say("fine") }
            log_by_lua_block { error("log-boom") }
        }
"#,
    );
    let r = s.get("/rw");
    assert_eq!(r.status, 500);
    let log = wait_log(&s, "rw-boom");
    assert!(
        log.lines()
            .any(|l| l.contains("failed to run rewrite_by_lua*:") && l.contains("rw-boom")),
        "{log}"
    );
    let r = s.get("/lg");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "fine\n");
    let log = wait_log(&s, "log-boom");
    assert!(
        log.lines()
            .any(|l| l.contains("failed to run log_by_lua*:") && l.contains("log-boom")),
        "{log}"
    );
}

#[test]
fn exit_status_goes_through_error_page() {
    let s = start(
        "",
        r#"
        error_page 403 /denied;
        location /guarded { access_by_lua_block { ngx.exit(ngx.HTTP_FORBIDDEN) } }
        location = /denied { content_by_lua_block { ngx.say("custom denied page for ", ngx.var.request_uri) } }
"#,
    );
    let r = s.get("/guarded");
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "custom denied page for /guarded\n");
}

#[test]
fn log_phase_sees_final_status_and_vars_after_eof() {
    let s = start(
        "",
        r#"
        location /t {
            content_by_lua_block {
                ngx.status = 202
                ngx.say("0123456789")
                ngx.eof()
                ngx.sleep(0.05)
                ngx.ctx.after_eof = true
            }
            log_by_lua_block {
                ngx.log(ngx.WARN, "LOGPHASE status=", ngx.status, " var_status=", ngx.var.status,
                        " sent=", ngx.var.body_bytes_sent, " after_eof=", tostring(ngx.ctx.after_eof))
            }
        }
"#,
    );
    let r = s.get("/t");
    assert_eq!(r.status, 202);
    assert_eq!(r.text(), "0123456789\n");
    let log = wait_log(&s, "LOGPHASE");
    assert!(
        log.contains("LOGPHASE status=202 var_status=202 sent=11 after_eof=true"),
        "{log}"
    );
}

#[test]
fn client_gone_mid_request_still_runs_content_and_log_phases() {
    // nginx (without lua_check_client_abort) finishes a request whose client left: the rest
    // of the content handler and the log phase still run.
    let s = start(
        "",
        r#"
        location /slow {
            content_by_lua_block {
                ngx.sleep(0.3)
                ngx.log(ngx.WARN, "content finished")
                ngx.say("late")
            }
            log_by_lua_block {
                ngx.log(ngx.WARN, "log phase ran for ", ngx.var.uri)
            }
        }
"#,
    );
    {
        let mut c = std::net::TcpStream::connect(s.addr()).expect("connect");
        std::io::Write::write_all(&mut c, b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .expect("write");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = wait_log(&s, "log phase ran for /slow");
    assert!(log.contains("content finished"), "{}", log);
    // The worker is fine afterwards.
    assert_eq!(s.get("/slow").text(), "late\n");
}

#[test]
fn a_handlers_setfenv_does_not_leak_into_later_requests() {
    // One worker: handler coroutines are pooled and the second request reuses the first's.
    let s = start(
        "",
        r#"
        location /taint {
            content_by_lua_block {
                setfenv(0, setmetatable({ marker = "tainted" }, { __index = _G }))
                ngx.say("ok")
            }
        }
        location /look {
            content_by_lua_block {
                local f = loadstring("return marker")
                ngx.say(tostring(f()))
            }
        }
        "#,
    );
    for _ in 0..3 {
        assert_eq!(s.get("/taint").text(), "ok\n");
        assert_eq!(s.get("/look").text(), "nil\n");
    }
}

#[test]
fn work_after_eof_runs_while_the_client_reads_nothing() {
    // The walk is polled by the client's connection until its head is out; what it still
    // has to do afterwards must not wait for the client to take the body (nginx runs it
    // whatever the client does).
    let s = start(
        "",
        r#"
        location /big {
            content_by_lua_block {
                ngx.print(string.rep("x", 16 * 1024 * 1024))
                ngx.flush()
                ngx.eof()
                ngx.sleep(0.1)
                ngx.log(ngx.WARN, "after eof and sleep")
            }
            log_by_lua_block { ngx.log(ngx.WARN, "log phase ran for big") }
        }
"#,
    );
    let mut c = std::net::TcpStream::connect(s.addr()).expect("connect");
    std::io::Write::write_all(&mut c, b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    // The client keeps the connection open and reads nothing.
    let log = wait_log(&s, "log phase ran for big");
    assert!(log.contains("log phase ran for big"), "{}", log);
    assert!(log.contains("after eof and sleep"), "{}", log);
    drop(c);
}
