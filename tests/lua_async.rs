//! Whole-server tests of the waiting side of the Lua API: `ngx.timer.*` (firing, repeating,
//! counts, limits, premature runs on SIGQUIT and on reload), light threads
//! (`ngx.thread.spawn/wait/kill`), `ngx.semaphore` across concurrent requests, `ngx.on_abort`
//! with a client that goes away, user coroutines that wait, and `ngx.sleep` in every phase.
//! Expected values follow lua-nginx-module's documented behaviour.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{server_conf, wait_log, Server};

fn start(http_extra: &str, locations: &str) -> Server {
    Server::start(&server_conf(http_extra, locations))
}

/// Poll GET `path` until its body is `want` (bounded); returns the last body.
fn wait_body(s: &Server, path: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = s.get(path).text();
        if body == want || Instant::now() > deadline {
            return body;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const DICT: &str = "lua_shared_dict d 1m;";

/// GET /get?k=key answers the shared dict value.
const GET_LOC: &str = r#"
        location /get {
            content_by_lua_block { ngx.say(tostring(ngx.shared.d:get(ngx.var.arg_k))) }
        }
"#;

#[test]
fn timer_at_fires_with_args_in_timer_phase_and_writes_shared_dict() {
    let s = start(
        DICT,
        &format!(
            r#"
        location /t {{
            content_by_lua_block {{
                local ok, err = ngx.timer.at(0.05, function(premature, a, b)
                    ngx.ctx.x = a
                    ngx.sleep(0.01)
                    ngx.shared.d:set("fired", table.concat({{tostring(premature), ngx.ctx.x, b, ngx.get_phase()}}, ","))
                end, "x", "y")
                ngx.say(ok, " ", err, " ", ngx.timer.pending_count())
            }}
        }}
{GET_LOC}"#
        ),
    );
    let r = s.get("/t");
    assert_eq!(r.text(), "1 nil 1\n", "{}", s.error_log());
    assert_eq!(
        wait_body(&s, "/get?k=fired", "false,x,y,timer\n"),
        "false,x,y,timer\n"
    );
}

#[test]
fn timer_every_repeats_and_counts_are_reported() {
    let s = start(
        DICT,
        &format!(
            r#"
        location /t {{
            content_by_lua_block {{
                ngx.timer.every(0.02, function()
                    local n = ngx.shared.d:incr("n", 1, 0)
                    ngx.shared.d:set("running", ngx.timer.running_count())
                    if n >= 3 then ngx.shared.d:set("done", "yes") end
                end)
                ngx.say(ngx.timer.pending_count(), " ", ngx.timer.running_count())
            }}
        }}
        location /zero {{
            content_by_lua_block {{
                local ok, err = pcall(ngx.timer.every, 0, function() end)
                ngx.say(ok, " ", tostring(err))
            }}
        }}
{GET_LOC}"#
        ),
    );
    assert_eq!(s.get("/t").text(), "1 0\n");
    assert_eq!(wait_body(&s, "/get?k=done", "yes\n"), "yes\n");
    assert_eq!(s.get("/get?k=running").text(), "1\n");
    let z = s.get("/zero").text();
    assert!(
        z.starts_with("false ") && z.contains("delay cannot be zero"),
        "{z}"
    );
}

#[test]
fn too_many_pending_timers_is_refused() {
    let s = start(
        "lua_max_pending_timers 2;",
        r#"
        location /t {
            content_by_lua_block {
                local f = function() end
                local a = ngx.timer.at(10, f)
                local b = ngx.timer.at(10, f)
                local c, err = ngx.timer.at(10, f)
                ngx.say(a, " ", b, " ", c, " ", err, " ", ngx.timer.pending_count())
            }
        }
"#,
    );
    assert_eq!(s.get("/t").text(), "1 1 nil too many pending timers 2\n");
}

#[test]
fn running_timer_limit_drops_with_an_alert() {
    let s = start(
        &format!("{DICT}\n    lua_max_running_timers 1;"),
        &format!(
            r#"
        location /t {{
            content_by_lua_block {{
                local f = function() ngx.shared.d:incr("ran", 1, 0) ngx.sleep(0.3) end
                ngx.timer.at(0, f)
                ngx.timer.at(0.05, f)
                ngx.say("ok")
            }}
        }}
{GET_LOC}"#
        ),
    );
    assert_eq!(s.get("/t").text(), "ok\n");
    let log = wait_log(&s, "lua_max_running_timers are not enough");
    assert!(
        log.contains("[alert]") && log.contains("1 lua_max_running_timers are not enough"),
        "{log}"
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(s.get("/get?k=ran").text(), "1\n");
}

#[test]
fn timer_errors_and_exit_are_contained() {
    let s = start(
        DICT,
        &format!(
            r#"
        location /t {{
            content_by_lua_block {{
                ngx.timer.at(0, function() error("boom in timer") end)
                ngx.timer.at(0, function()
                    ngx.shared.d:set("before_exit", 1)
                    ngx.exit(0)
                    ngx.shared.d:set("after_exit", 1)
                end)
                ngx.timer.at(0.05, function() ngx.shared.d:set("still", "alive") end)
                ngx.say("ok")
            }}
        }}
{GET_LOC}"#
        ),
    );
    assert_eq!(s.get("/t").text(), "ok\n");
    let log = wait_log(&s, "boom in timer");
    assert!(
        log.contains("lua entry thread aborted: runtime error: ")
            && log.contains("boom in timer")
            && log.contains("context: ngx.timer"),
        "{log}"
    );
    assert_eq!(wait_body(&s, "/get?k=still", "alive\n"), "alive\n");
    assert_eq!(s.get("/get?k=before_exit").text(), "1\n");
    assert_eq!(s.get("/get?k=after_exit").text(), "nil\n");
}

#[test]
fn init_worker_timer_runs_background_work() {
    let s = start(
        &format!(
            r#"{DICT}
    init_worker_by_lua_block {{
        local function tick(premature)
            if premature then return end
            ngx.shared.d:incr("ticks", 1, 0)
        end
        assert(ngx.timer.every(0.02, tick))
        assert(ngx.timer.at(0, function()
            -- light threads work in timers too
            local a = ngx.thread.spawn(function() ngx.sleep(0.01) return "a" end)
            local b = ngx.thread.spawn(function() return "b" end)
            local _, ra = ngx.thread.wait(a)
            local _, rb = ngx.thread.wait(b)
            local co = coroutine.create(function() return ngx.thread.wait(b) end)
            local _, ok, err = pcall(coroutine.resume, co)
            ngx.shared.d:set("threads", ra .. rb .. " " .. tostring(err))
            ngx.shared.d:set("phase", ngx.get_phase())
        end))
    }}"#
        ),
        GET_LOC,
    );
    assert_eq!(
        wait_body(&s, "/get?k=phase", "timer\n"),
        "timer\n",
        "{}",
        s.error_log()
    );
    let threads = s.get("/get?k=threads").text();
    assert!(
        threads.starts_with("ab ")
            && threads.contains("only the parent coroutine can wait on the thread"),
        "{threads}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n: i64 = s.get("/get?k=ticks").text().trim().parse().unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "ticks stuck at {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigquit_fires_pending_timers_premature() {
    let mut s = start(
        "",
        r#"
        location /t {
            content_by_lua_block {
                ngx.timer.at(60, function(premature)
                    ngx.log(ngx.ERR, "timer ran premature=", tostring(premature),
                            " exiting=", tostring(ngx.worker.exiting()))
                end)
                ngx.say("armed")
            }
        }
"#,
    );
    assert_eq!(s.get("/t").text(), "armed\n");
    let t0 = Instant::now();
    s.signal(libc::SIGQUIT);
    let status = s.wait_exit(Duration::from_secs(10));
    assert!(status.is_some(), "did not exit after SIGQUIT");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let log = s.error_log();
    assert!(
        log.contains("timer ran premature=true exiting=true"),
        "{log}"
    );
}

#[test]
fn reload_fires_old_generation_timers_premature() {
    let conf = server_conf(
        r#"
    init_worker_by_lua_block {
        ngx.timer.at(60, function(premature)
            ngx.log(ngx.ERR, "old timer premature=", tostring(premature),
                    " exiting=", tostring(ngx.worker.exiting()))
        end)
    }"#,
        r#"
        location /t { content_by_lua_block { ngx.say("exiting=", tostring(ngx.worker.exiting())) } }
"#,
    );
    let s = Server::start(&conf);
    assert_eq!(s.get("/t").text(), "exiting=false\n");
    s.signal(libc::SIGHUP);
    let log = wait_log(&s, "old timer premature=");
    assert!(
        log.contains("old timer premature=true exiting=true"),
        "{log}"
    );
    // Exactly the old generation's one timer fired; the new generation serves normally.
    assert_eq!(log.matches("old timer premature=").count(), 1, "{log}");
    assert_eq!(s.get("/t").text(), "exiting=false\n");
}

#[test]
fn light_threads_spawn_wait_kill_in_order() {
    let s = start(
        "",
        r#"
        location /t {
            content_by_lua_block {
                local out = {}
                local function log(s) out[#out + 1] = s end
                local t1 = ngx.thread.spawn(function(a)
                    log("t1 start " .. a)
                    ngx.sleep(0.02)
                    log("t1 end")
                    return "r1", a
                end, "A")
                log("after spawn " .. coroutine.status(t1))
                local t2 = ngx.thread.spawn(function() log("t2 quick") return "r2" end)
                log("t2 " .. coroutine.status(t2))
                local ok, r, a = ngx.thread.wait(t1)
                log("wait1 " .. tostring(ok) .. " " .. r .. " " .. a)
                ok, r = ngx.thread.wait(t2)
                log("wait2 " .. tostring(ok) .. " " .. r)
                local ok2, err = ngx.thread.wait(t2)
                log("again " .. tostring(ok2) .. " " .. err)
                local t3 = ngx.thread.spawn(function() ngx.sleep(1) log("t3 never") end)
                log("kill " .. tostring(ngx.thread.kill(t3)) .. " " .. coroutine.status(t3))
                local _, kerr = ngx.thread.kill(t3)
                log("kill again " .. kerr)
                local t4 = ngx.thread.spawn(function() error("thread oops") end)
                local okf, ferr = ngx.thread.wait(t4)
                log("failed " .. tostring(okf) .. " " .. tostring(ferr:find("thread oops") ~= nil))
                -- wait any: the first to end wins
                local slow = ngx.thread.spawn(function() ngx.sleep(0.5) return "slow" end)
                local fast = ngx.thread.spawn(function() ngx.sleep(0.01) return "fast" end)
                local _, first = ngx.thread.wait(slow, fast)
                log("any " .. first)
                ngx.thread.kill(slow)
                ngx.say(table.concat(out, "\n"))
            }
        }
"#,
    );
    let r = s.get("/t");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(
        r.text(),
        "t1 start A\nafter spawn running\nt2 quick\nt2 zombie\nt1 end\nwait1 true r1 A\n\
         wait2 true r2\nagain nil already waited or killed\nkill 1 dead\n\
         kill again already waited or killed\nfailed false true\nany fast\n"
    );
    let log = wait_log(&s, "lua user thread aborted");
    assert!(
        log.contains("lua user thread aborted: runtime error: ") && log.contains("thread oops"),
        "{log}"
    );
    assert!(!log.contains("t3 never"));
}

#[test]
fn light_threads_share_the_request_and_phase_waits_for_them() {
    let s = start(
        "",
        r#"
        location /t {
            rewrite_by_lua_block {
                ngx.ctx.seen = {}
                ngx.thread.spawn(function()
                    ngx.sleep(0.03)
                    -- the rewrite phase is not over until this thread ends
                    ngx.ctx.seen[#ngx.ctx.seen + 1] = "rewrite thread " .. ngx.var.arg_x
                end)
            }
            content_by_lua_block {
                local a = ngx.thread.spawn(function()
                    for i = 1, 3 do ngx.say("a", i) ngx.sleep(0.01) end
                end)
                local b = ngx.thread.spawn(function()
                    for i = 1, 3 do ngx.say("b", i) ngx.sleep(0.01) end
                end)
                ngx.say(ngx.ctx.seen[1])
                -- the entry thread ends here; the request waits for a and b
            }
        }
        location /exit {
            content_by_lua_block {
                ngx.thread.spawn(function()
                    ngx.sleep(0.02)
                    ngx.say("thread exits")
                    ngx.exit(200)
                end)
                ngx.thread.spawn(function() ngx.sleep(1) ngx.say("never") end)
                ngx.say("entry done")
            }
        }
"#,
    );
    let r = s.get("/t?x=1");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "a1\nb1\nrewrite thread 1\na2\nb2\na3\nb3\n");
    let t0 = Instant::now();
    let r = s.get("/exit");
    assert_eq!(r.text(), "entry done\nthread exits\n");
    assert!(t0.elapsed() < Duration::from_millis(900));
}

#[test]
fn light_threads_run_subrequests_concurrently() {
    // lua-nginx-module's README example: capture_multi built from spawn + wait.
    let s = start(
        "",
        r#"
        location /sub {
            content_by_lua_block {
                ngx.sleep(tonumber(ngx.var.arg_d))
                ngx.print("sub", ngx.var.arg_n)
            }
        }
        location /t {
            content_by_lua_block {
                local function fetch(uri) return ngx.location.capture(uri) end
                local threads = {
                    ngx.thread.spawn(fetch, "/sub?n=1&d=0.2"),
                    ngx.thread.spawn(fetch, "/sub?n=2&d=0.2"),
                    ngx.thread.spawn(fetch, "/sub?n=3&d=0.2"),
                }
                for i = 1, #threads do
                    local ok, res = ngx.thread.wait(threads[i])
                    ngx.say(i, ": ", tostring(ok), " ", res.status, " ", res.body)
                end
            }
        }
"#,
    );
    let t0 = Instant::now();
    let r = s.get("/t");
    assert_eq!(
        r.text(),
        "1: true 200 sub1\n2: true 200 sub2\n3: true 200 sub3\n",
        "{}",
        s.error_log()
    );
    // Three 0.2 s subrequests in parallel, not 0.6 s in a row.
    assert!(
        t0.elapsed() < Duration::from_millis(550),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn semaphore_producer_consumer_across_requests() {
    let s = Server::start_with(
        &server_conf(
            "",
            r#"
        location /consume {
            content_by_lua_block {
                local sema = require("shared_sema")
                local t0 = ngx.now()
                local ok, err = sema:wait(5)
                ngx.update_time()
                ngx.say(tostring(ok), " ", tostring(err), " waited=", ngx.now() - t0 >= 0.1)
            }
        }
        location /produce {
            content_by_lua_block {
                local sema = require("shared_sema")
                ngx.say("count before ", sema:count())
                sema:post(1)
                ngx.say("count after ", sema:count())
            }
        }
        location /timeout {
            content_by_lua_block {
                local sema = require("ngx.semaphore").new(0)
                local ok, err = sema:wait(0.05)
                local ok0, err0 = sema:wait(0)
                sema:post(2)
                local a = sema:wait(0)
                ngx.say(tostring(ok), " ", err, " ", tostring(ok0), " ", err0, " ", tostring(a), " ", sema:count())
            }
        }
        location /kill {
            content_by_lua_block {
                local sema = require("ngx.semaphore").new()
                local t = ngx.thread.spawn(function() return sema:wait(10) end)
                local before = sema:count()
                ngx.thread.kill(t)
                -- the killed waiter left the queue at once
                ngx.say(before, " ", sema:count())
            }
        }
"#,
        ),
        &[(
            "lua/shared_sema.lua",
            "return require('ngx.semaphore').new(0)\n",
        )],
    );
    let addr = s.addr();
    let consumer = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).ok();
        c.write_all(b"GET /consume HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .expect("write");
        common::read_response(&mut c).expect("response")
    });
    std::thread::sleep(Duration::from_millis(150));
    let p = s.get("/produce");
    assert_eq!(
        p.text(),
        "count before -1\ncount after 0\n",
        "{}",
        s.error_log()
    );
    let c = consumer.join().expect("consumer");
    assert_eq!(c.text(), "true nil waited=true\n");
    assert_eq!(s.get("/timeout").text(), "nil timeout nil timeout true 1\n");
    assert_eq!(s.get("/kill").text(), "-1 0\n");
}

#[test]
fn on_abort_runs_callback_when_client_leaves() {
    let s = start(
        &format!("{DICT}\n    lua_check_client_abort on;"),
        &format!(
            r#"
        location /watch {{
            content_by_lua_block {{
                local ok, err = ngx.on_abort(function()
                    ngx.shared.d:set("aborted", "callback " .. ngx.var.uri)
                    ngx.exit(499)
                end)
                ngx.shared.d:set("registered", tostring(ok))
                local again, e2 = ngx.on_abort(function() end)
                ngx.shared.d:set("dup", tostring(e2))
                ngx.sleep(3)
                ngx.shared.d:set("finished", "yes")
            }}
        }}
        location /plain {{
            content_by_lua_block {{
                ngx.sleep(3)
                ngx.shared.d:set("plain_finished", "yes")
            }}
        }}
        location /ignore {{
            rewrite_by_lua_block {{
                ngx.on_abort(function() ngx.shared.d:set("ignore_cb", ngx.get_phase()) end)
                ngx.sleep(0.5)
            }}
            content_by_lua_block {{
                ngx.sleep(0.2)
                ngx.shared.d:set("ignore_finished", "yes")
            }}
        }}
        location /flushed {{
            content_by_lua_block {{
                ngx.on_abort(function() ngx.shared.d:set("flushed_abort", ngx.get_phase()) end)
                ngx.say("head and some body")
                ngx.flush(true)
                ngx.sleep(3)
            }}
        }}
{GET_LOC}"#
        ),
    );
    for path in ["/watch", "/plain", "/flushed", "/ignore"] {
        let mut c = TcpStream::connect(s.addr()).expect("connect");
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .expect("write");
        std::thread::sleep(Duration::from_millis(200));
        drop(c);
    }
    assert_eq!(
        wait_body(&s, "/get?k=aborted", "callback /watch\n"),
        "callback /watch\n"
    );
    assert_eq!(s.get("/get?k=registered").text(), "1\n");
    // A callback that does nothing lets the request go on, in later phases too.
    assert_eq!(wait_body(&s, "/get?k=ignore_finished", "yes\n"), "yes\n");
    assert_eq!(s.get("/get?k=ignore_cb").text(), "rewrite\n");
    // After the head went out the body stream closing is the signal.
    assert_eq!(
        wait_body(&s, "/get?k=flushed_abort", "content\n"),
        "content\n"
    );
    assert_eq!(s.get("/get?k=dup").text(), "duplicate call\n");
    // Without a callback the request is aborted with 499 (and never finishes its sleep).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut access = String::new();
    while Instant::now() < deadline {
        access = std::fs::read_to_string(s.path("logs/access.log")).unwrap_or_default();
        if access.matches(" 499 ").count() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(access.contains("\"GET /plain HTTP/1.1\" 499 "), "{access}");
    assert!(access.contains("\"GET /watch HTTP/1.1\" 499 "), "{access}");
    std::thread::sleep(Duration::from_millis(3200));
    assert_eq!(s.get("/get?k=finished").text(), "nil\n");
    assert_eq!(s.get("/get?k=plain_finished").text(), "nil\n");
}

#[test]
fn on_abort_is_refused_without_the_directive() {
    let s = start(
        "",
        r#"
        location /t {
            content_by_lua_block {
                local ok, err = ngx.on_abort(function() end)
                ngx.say(tostring(ok), " ", err)
            }
        }
"#,
    );
    assert_eq!(s.get("/t").text(), "nil lua_check_client_abort is off\n");
}

#[test]
fn user_coroutines_generators_and_waits_mix() {
    let s = start(
        "",
        r#"
        location /co {
            content_by_lua_block {
                local gen = coroutine.wrap(function()
                    for i = 1, 3 do
                        ngx.sleep(0.005)
                        coroutine.yield(i)
                    end
                end)
                local got = {}
                for v in gen do got[#got + 1] = v end
                -- a coroutine nested in a coroutine, waiting at the bottom
                local outer = coroutine.create(function()
                    local inner = coroutine.wrap(function() ngx.sleep(0.01) coroutine.yield("deep") return "end" end)
                    local a = inner()
                    coroutine.yield(a)
                    return inner()
                end)
                local _, x = coroutine.resume(outer)
                local _, y = coroutine.resume(outer)
                local okerr, err = coroutine.resume(coroutine.create(function() ngx.sleep(0) error("co fails", 0) end))
                ngx.say(table.concat(got, ","), " ", x, " ", y, " ", coroutine.status(outer), " ",
                        tostring(okerr), " ", err, " ", tostring(coroutine.isyieldable()))
            }
        }
"#,
    );
    let r = s.get("/co");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "1,2,3 deep end dead false co fails true\n");
}

#[test]
fn sleep_works_in_every_phase() {
    let s = start(
        &format!(
            r#"{DICT}
    init_worker_by_lua_block {{
        ngx.sleep(0.01)
        ngx.shared.d:set("init_worker", "slept")
    }}"#
        ),
        &format!(
            r#"
        location /t {{
            set_by_lua_block $v {{ ngx.sleep(0.01) return "set" }}
            content_by_lua_block {{ ngx.say(ngx.var.v) }}
            header_filter_by_lua_block {{ ngx.sleep(0.01) ngx.header["X-Slept"] = "header" }}
            body_filter_by_lua_block {{
                if ngx.arg[1] ~= "" then
                    ngx.sleep(0.01)
                    ngx.arg[1] = ngx.arg[1]:upper()
                end
            }}
            log_by_lua_block {{
                ngx.sleep(0.01)
                ngx.shared.d:set("log", "slept " .. ngx.get_phase())
            }}
        }}
{GET_LOC}"#
        ),
    );
    let r = s.get("/t");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.header("x-slept"), Some("header"));
    assert_eq!(r.text(), "SET\n");
    assert_eq!(wait_body(&s, "/get?k=log", "slept log\n"), "slept log\n");
    assert_eq!(s.get("/get?k=init_worker").text(), "slept\n");
}

#[test]
fn killed_request_drops_waits_of_its_coroutines() {
    // ngx.exit while a user coroutine of a light thread waits on a semaphore: the waiter
    // leaves the queue at once (the semaphore count comes back to 0).
    let s = start(
        "",
        r#"
        location /t {
            content_by_lua_block {
                local sema = require("ngx.semaphore").new()
                package.loaded.test_sema = sema
                ngx.thread.spawn(function()
                    local co = coroutine.wrap(function() sema:wait(10) end)
                    co()
                end)
                ngx.say(sema:count())
                ngx.exit(200)
            }
        }
        location /count {
            content_by_lua_block { ngx.say(package.loaded.test_sema:count()) }
        }
"#,
    );
    assert_eq!(s.get("/t").text(), "-1\n");
    assert_eq!(s.get("/count").text(), "0\n");
}

#[test]
fn resty_waits_for_the_timers_it_started() {
    let out = std::process::Command::new(common::bin())
        .args([
            "resty",
            "-e",
            "ngx.timer.at(0.05, function(p) ngx.say('timer ', tostring(p), ' ', ngx.get_phase()) end) ngx.say('main')",
        ])
        .output()
        .expect("run tidegate resty");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "main\ntimer false timer\n",
        "{err}"
    );
}

#[test]
fn light_threads_stay_apart_when_handler_coroutines_are_reused() {
    // Handler coroutines are pooled per VM (src/lua/vm.rs): a later handler, in this request or
    // the next, runs on a coroutine an earlier one returned from. Light threads and their
    // "already waited" bookkeeping must not mix them up.
    let s = start(
        "",
        r#"
        location /t {
            rewrite_by_lua_block {
                local t = ngx.thread.spawn(function() return "r" end)
                local ok, v = ngx.thread.wait(t)
                ngx.ctx.r = v
            }
            content_by_lua_block {
                local out = { ngx.ctx.r }
                for i = 1, 3 do
                    local t = ngx.thread.spawn(function() ngx.sleep(0) return i end)
                    local ok, v = ngx.thread.wait(t)
                    out[#out + 1] = tostring(ok) .. ":" .. tostring(v)
                end
                ngx.say(table.concat(out, ","))
            }
        }
        "#,
    );
    for _ in 0..20 {
        assert_eq!(s.get("/t").text(), "r,true:1,true:2,true:3\n");
    }
}
