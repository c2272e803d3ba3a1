//! Whole-server tests of the `ngx.*` API as handlers see it: `ngx.var`, `ngx.req`, `ngx.header`,
//! `ngx.resp`, output functions, constants, `ngx.log` levels, shared dicts across workers,
//! cjson, `ngx.re`, string and time helpers. Expected values follow lua-nginx-module's README.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{server_conf, wait_log, Server};

fn start(locations: &str) -> Server {
    Server::start(&server_conf("", locations))
}

/// A main context with an explicit error_log level and worker count.
fn conf_with(level: &str, workers: usize, http_body: &str) -> String {
    format!(
        "worker_processes {workers};\nerror_log logs/error.log {level};\npid logs/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n{http_body}\n    server {{\n        listen 127.0.0.1:PORT;\n        server_name localhost;\n"
    )
}

fn req(s: &Server, head: &str) -> common::Response {
    s.request(head)
}

// ---------------------------------------------------------------------------------------------
// ngx.var

#[test]
fn var_reads_builtin_variables_and_captures() {
    let s = start(
        r#"
        location ~ ^/v/(\w+)/(\d+)$ {
            content_by_lua_block {
                local v = ngx.var
                ngx.say("uri=", v.uri)
                ngx.say("arg_a=", v.arg_a)
                ngx.say("arg_missing=", tostring(v.arg_missing))
                ngx.say("http_x_foo=", v.http_x_foo)
                ngx.say("host=", v.host)
                ngx.say("method=", v.request_method)
                ngx.say("remote_addr=", v.remote_addr)
                ngx.say("cookie_sid=", v.cookie_sid)
                ngx.say("cap1=", v[1], " cap2=", v[2])
                ngx.say("request_uri=", v.request_uri)
                ngx.say("args=", v.args)
                ngx.say("upper=", v.REQUEST_METHOD)
            }
        }
"#,
    );
    let r = req(
        &s,
        "GET /v/abc/42?a=1&b=two HTTP/1.1\r\nHost: Example.COM:8080\r\nX-Foo: bar\r\nCookie: x=1; sid=abc123; y=2\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "uri=/v/abc/42\narg_a=1\narg_missing=nil\nhttp_x_foo=bar\nhost=example.com\nmethod=GET\n\
remote_addr=127.0.0.1\ncookie_sid=abc123\ncap1=abc cap2=42\nrequest_uri=/v/abc/42?a=1&b=two\nargs=a=1&b=two\nupper=GET\n"
    );
}

#[test]
fn var_write_to_declared_variable_is_seen_by_nginx() {
    let s = start(
        r#"
        location /w {
            set $v "";
            set $from_rewrite "";
            add_header X-V $v;
            rewrite_by_lua_block { ngx.var.from_rewrite = "rw" }
            content_by_lua_block {
                ngx.var.v = "from-lua"
                ngx.var.args = "c=3"
                ngx.say(ngx.var.v, " ", ngx.var.from_rewrite, " ", ngx.var.arg_c)
            }
        }
"#,
    );
    let r = s.get("/w?c=1");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "from-lua rw 3\n");
    assert_eq!(r.header("X-V"), Some("from-lua"));
}

#[test]
fn var_write_to_undeclared_variable_is_an_error() {
    let s = start(
        r#"
        location /u { content_by_lua_block { ngx.var.never_declared = "x"; ngx.say("not reached") } }
        location /ro { content_by_lua_block { ngx.var.uri = "/x"; ngx.say("not reached") } }
"#,
    );
    let r = s.get("/u");
    assert_eq!(r.status, 500);
    let log = wait_log(&s, "never_declared");
    assert!(
        log.contains("variable \"never_declared\" not found for writing"),
        "{log}"
    );
    let r = s.get("/ro");
    assert_eq!(r.status, 500);
    let log = wait_log(&s, "variable \"uri\"");
    assert!(log.contains("variable \"uri\" not changeable"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// ngx.req

#[test]
fn req_method_and_uri_args() {
    let s = start(
        r#"
        location /args {
            content_by_lua_block {
                ngx.say(ngx.req.get_method())
                local args = ngx.req.get_uri_args()
                ngx.say("a=", type(args.a), ":", table.concat(args.a, ","))
                ngx.say("flag=", tostring(args.flag))
                ngx.say("b=", args.b)
                ngx.say("empty=[", args.empty, "]")
                ngx.req.set_uri_args({ c = "x y" })
                ngx.say("args=", ngx.var.args, " arg_c=", ngx.var.arg_c)
                ngx.req.set_uri_args("d=4")
                ngx.say("d=", ngx.req.get_uri_args().d)
            }
        }
"#,
    );
    let r = req(
        &s,
        "DELETE /args?a=1&a=2&flag&b=x%20y&empty= HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "DELETE\na=table:1,2\nflag=true\nb=x y\nempty=[]\nargs=c=x%20y arg_c=x%20y\nd=4\n"
    );
}

#[test]
fn req_headers_lookup_and_modification() {
    let s = start(
        r#"
        location /h {
            rewrite_by_lua_block {
                ngx.req.set_header("X-New", "n1")
                ngx.req.clear_header("X-Gone")
            }
            content_by_lua_block {
                local h = ngx.req.get_headers()
                ngx.say("my=", h["My-Header"], " ", h.my_header, " ", h["my-header"])
                local rep = h["X-Rep"]
                ngx.say("rep=", type(rep), ":", table.concat(rep, ","))
                ngx.say("new=", ngx.var.http_x_new, " gone=", tostring(ngx.var.http_x_gone))
                ngx.say("gone_in_table=", tostring(h.x_gone))
            }
        }
"#,
    );
    let r = req(
        &s,
        "GET /h HTTP/1.1\r\nHost: localhost\r\nMy-Header: v\r\nX-Rep: one\r\nx-rep: two\r\nX-Gone: bye\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "my=v v v\nrep=table:one,two\nnew=n1 gone=nil\ngone_in_table=nil\n"
    );
}

#[test]
fn req_post_body_and_form_args() {
    let s = start(
        r#"
        location /post {
            content_by_lua_block {
                ngx.req.read_body()
                ngx.say("data=", ngx.req.get_body_data())
                local args = ngx.req.get_post_args()
                ngx.say("name=", args.name, " tags=", table.concat(args.tags, "+"), " sp=", args.sp)
            }
        }
"#,
    );
    let body = "name=joe&tags=a&tags=b&sp=a%20b+c";
    let r = req(
        &s,
        &format!(
            "POST /post HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            body
        ),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        format!("data={body}\nname=joe tags=a+b sp=a b c\n")
    );
}

#[test]
fn req_http_version_and_raw_header() {
    let s = start(
        r#"
        location /rh {
            content_by_lua_block {
                ngx.say(ngx.req.http_version())
                ngx.print(ngx.req.raw_header())
            }
        }
"#,
    );
    let r = s.get("/rh?x=1");
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.starts_with("1.1\n"), "{text:?}");
    assert!(text.contains("\nGET /rh?x=1 HTTP/1.1\r\n"), "{text:?}");
    assert!(
        text.to_ascii_lowercase().contains("host: localhost\r\n"),
        "{text:?}"
    );
    assert!(text.ends_with("\r\n\r\n"), "{text:?}");

    let r = req(&s, "GET /rh HTTP/1.0\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.text().lines().next(), Some("1"), "{}", r.text());
}

#[test]
fn req_start_time_is_a_number_close_to_now() {
    let s = start(
        r#"
        location /st {
            content_by_lua_block {
                local st = ngx.req.start_time()
                ngx.say(type(st), " ", string.format("%.3f", st))
            }
        }
"#,
    );
    let text = s.get("/st").text();
    let parts: Vec<&str> = text.trim().split(' ').collect();
    assert_eq!(parts.first(), Some(&"number"), "{text}");
    let st: f64 = parts.get(1).and_then(|p| p.parse().ok()).unwrap_or(0.0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - st).abs() < 5.0, "start_time {st} vs now {now}");
}

#[test]
fn req_start_time_has_ms_resolution_and_precedes_now() {
    // OpenResty takes both from the worker's cached clock (ms resolution), so the usual latency
    // idiom `ngx.now() - ngx.req.start_time()` is never negative.
    let s = start(
        r#"
        location /st {
            content_by_lua_block {
                local st = ngx.req.start_time()
                local ms = st * 1000
                ngx.say(tostring(math.abs(ms - math.floor(ms + 0.5)) < 1e-3), " ",
                        tostring(ngx.now() - st >= 0), " ", string.format("%.6f %.6f", st, ngx.now()))
            }
        }
"#,
    );
    for _ in 0..20 {
        let text = s.get("/st").text();
        assert!(text.starts_with("true true "), "{text}");
    }
}

#[test]
#[ignore = "differs (docs/lua-api.md): hyper lower-cases header names, so raw_header() and get_headers(0, true) cannot return the names received"]
fn req_raw_header_keeps_original_header_case() {
    // README: raw_header returns the original raw header as received.
    // get_headers(0, true) likewise keeps the names as received for its keys.
    let s = start(
        "        location /rh { content_by_lua_block { ngx.print(ngx.req.raw_header(true)) ngx.print(tostring(ngx.req.get_headers(0, true)[\"X-MiXeD-Case\"])) } }\n",
    );
    let r = req(
        &s,
        "GET /rh HTTP/1.1\r\nHost: localhost\r\nX-MiXeD-Case: Val\r\nConnection: close\r\n\r\n",
    );
    assert!(r.text().contains("X-MiXeD-Case: Val\r\n"), "{:?}", r.text());
    assert!(r.text().ends_with("\r\n\r\nVal"), "{:?}", r.text());
    assert!(!r.text().starts_with("GET"), "{:?}", r.text());
}

#[test]
fn req_set_uri_with_jump_reruns_location_search() {
    let s = start(
        r#"
        location /old {
            rewrite_by_lua_block { ngx.req.set_uri("/new", true); ngx.log(ngx.ERR, "NOT-REACHED") }
            content_by_lua_block { ngx.say("old content") }
        }
        location /new { content_by_lua_block { ngx.say("new ", ngx.var.uri, " ", ngx.var.arg_k) } }
        location /nojump {
            content_by_lua_block { ngx.req.set_uri("/changed"); ngx.say("uri=", ngx.var.uri) }
        }
"#,
    );
    let r = s.get("/old?k=v");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "new /new v\n");
    assert!(!s.error_log().contains("NOT-REACHED"));
    let r = s.get("/nojump");
    assert_eq!(r.text(), "uri=/changed\n");
}

// ---------------------------------------------------------------------------------------------
// ngx.header / ngx.resp

#[test]
fn header_set_single_multi_and_content_type() {
    let s = start(
        r#"
        location /hd {
            content_by_lua_block {
                ngx.header["X-Single"] = "one"
                ngx.header["Set-Cookie"] = {"a=1", "b=2"}
                ngx.header.content_type = "text/x"
                ngx.header.X_Under_Score = "u"
                ngx.header["X-Num"] = 42
                ngx.header["X-Removed"] = "r"
                ngx.header["X-Removed"] = nil
                local sc = ngx.header["set-cookie"]
                ngx.say("read ct=", ngx.header.content_type, " single=", ngx.header.x_single,
                        " sc=", type(sc), ":", table.concat(sc, ","))
                local h = ngx.resp.get_headers()
                ngx.say("resp x-single=", h["x-single"], " ct=", h.content_type,
                        " sc#=", #h["set-cookie"], " removed=", tostring(h["x-removed"]))
            }
        }
"#,
    );
    let r = s.get("/hd");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Single"), Some("one"));
    assert_eq!(r.headers_all("Set-Cookie"), vec!["a=1", "b=2"]);
    assert_eq!(r.header("Content-Type"), Some("text/x"));
    assert_eq!(r.header("X-Under-Score"), Some("u"));
    assert_eq!(r.header("X-Num"), Some("42"));
    assert_eq!(r.header("X-Removed"), None);
    assert_eq!(
        r.text(),
        "read ct=text/x single=one sc=table:a=1,b=2\nresp x-single=one ct=text/x sc#=2 removed=nil\n"
    );
}

// ---------------------------------------------------------------------------------------------
// Output

#[test]
fn say_and_print_render_values() {
    let s = start(
        r#"
        location /o {
            content_by_lua_block {
                ngx.say(1, " ", 1.5, " ", -0.25, " ", true, " ", false, " ", nil)
                ngx.print({"a", {"b", {"c", 3}}}, "|")
                ngx.print(ngx.null)
                ngx.say()
                ngx.say(1e300, " ", 10 / 4, " ", 2^31)
            }
        }
"#,
    );
    let r = s.get("/o");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "1 1.5 -0.25 true false nil\nabc3|null\n1e+300 2.5 2147483648\n"
    );
}

#[test]
fn say_rejects_non_array_table() {
    let s = start(
        r#"
        location /bad { content_by_lua_block { ngx.say({ k = "v" }) } }
"#,
    );
    let r = s.get("/bad");
    assert_eq!(r.status, 500, "body {:?}", r.text());
    let log = wait_log(&s, "non-array table found");
    assert!(log.contains("non-array table found"), "{log}");
}

#[test]
fn say_formats_large_numbers_like_tostring() {
    let s = start(
        r#"
        location /n { content_by_lua_block { ngx.say(2^53, " ", tostring(2^53), " ", 1e15, " ", -1e16) } }
"#,
    );
    assert_eq!(
        s.get("/n").text(),
        "9.007199254741e+15 9.007199254741e+15 1e+15 -1e+16\n"
    );
}

#[test]
fn status_set_before_output() {
    let s = start(
        r#"
        location /st {
            content_by_lua_block {
                local before = ngx.status
                ngx.status = 418
                ngx.say("before=", before, " now=", ngx.status)
            }
        }
"#,
    );
    let r = s.get("/st");
    assert_eq!(r.status, 418);
    assert_eq!(r.text(), "before=0 now=418\n");
}

#[test]
fn headers_sent_false_then_true_after_flush() {
    let s = start(
        r#"
        location /hs {
            content_by_lua_block {
                local before = ngx.headers_sent
                ngx.print("x")
                ngx.flush(true)
                ngx.say(" before=", tostring(before), " after=", tostring(ngx.headers_sent))
            }
        }
"#,
    );
    let r = s.get("/hs");
    assert_eq!(r.text(), "x before=false after=true\n");
}

#[test]
fn say_sends_headers_so_later_status_change_is_refused() {
    // In lua-nginx-module ngx.say/ngx.print send the response header first: after them
    // ngx.headers_sent is true and setting ngx.status only logs an error.
    let s = start(
        r#"
        location /hs {
            content_by_lua_block {
                ngx.say("x")
                local sent = ngx.headers_sent
                ngx.status = 500
                ngx.say("sent=", tostring(sent))
            }
        }
"#,
    );
    let r = s.get("/hs");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "x\nsent=true\n");
    let log = wait_log(
        &s,
        "attempt to set ngx.status after sending out response headers",
    );
    assert!(
        log.contains("attempt to set ngx.status after sending out response headers"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Constants and logging

#[test]
fn constants_have_openresty_values() {
    let s = start(
        r#"
        location /c {
            content_by_lua_block {
                ngx.say(ngx.HTTP_OK, " ", ngx.HTTP_CREATED, " ", ngx.HTTP_NOT_FOUND, " ",
                        ngx.HTTP_INTERNAL_SERVER_ERROR, " ", ngx.HTTP_MOVED_TEMPORARILY, " ",
                        ngx.HTTP_SERVICE_UNAVAILABLE)
                ngx.say(ngx.HTTP_GET, " ", ngx.HTTP_HEAD, " ", ngx.HTTP_POST, " ", ngx.HTTP_PUT,
                        " ", ngx.HTTP_DELETE, " ", ngx.HTTP_OPTIONS)
                ngx.say(ngx.OK, " ", ngx.ERROR, " ", ngx.AGAIN, " ", ngx.DONE, " ", ngx.DECLINED)
                ngx.say(ngx.STDERR, " ", ngx.EMERG, " ", ngx.ALERT, " ", ngx.CRIT, " ", ngx.ERR,
                        " ", ngx.WARN, " ", ngx.NOTICE, " ", ngx.INFO, " ", ngx.DEBUG)
                ngx.say(tostring(ngx.null), " ", type(ngx.null))
            }
        }
"#,
    );
    let r = s.get("/c");
    assert_eq!(
        r.text(),
        "200 201 404 500 302 503\n2 4 8 16 32 512\n0 -1 -2 -4 -5\n0 1 2 3 4 5 6 7 8\nuserdata: NULL userdata\n"
    );
}

fn log_level_server(level: &str) -> Server {
    let mut conf = conf_with(level, 1, "");
    conf.push_str(
        r#"
        location /log {
            content_by_lua_block {
                ngx.log(ngx.ERR, "MARK-ERR")
                ngx.log(ngx.WARN, "MARK-WARN ", 42, " ", true)
                ngx.log(ngx.NOTICE, "MARK-NOTICE")
                ngx.log(ngx.INFO, "MARK-INFO")
                ngx.log(ngx.DEBUG, "MARK-DEBUG")
                print("MARK-PRINT")
                ngx.say("logged")
            }
        }
    }
}
"#,
    );
    Server::start(&conf)
}

#[test]
fn log_levels_honour_error_log_threshold() {
    let s = log_level_server("warn");
    assert_eq!(s.get("/log").text(), "logged\n");
    let log = wait_log(&s, "MARK-WARN");
    let line = |m: &str| log.lines().find(|l| l.contains(m)).map(str::to_string);
    let err = line("MARK-ERR").unwrap_or_else(|| panic!("{log}"));
    assert!(err.contains("[error]") && err.contains("[lua]"), "{err}");
    let warn = line("MARK-WARN 42 true").unwrap_or_else(|| panic!("{log}"));
    assert!(warn.contains("[warn]"), "{warn}");
    for m in ["MARK-NOTICE", "MARK-INFO", "MARK-DEBUG", "MARK-PRINT"] {
        assert!(line(m).is_none(), "{m} logged below the threshold:\n{log}");
    }
}

#[test]
fn print_logs_at_notice() {
    let s = log_level_server("notice");
    assert_eq!(s.get("/log").text(), "logged\n");
    let log = wait_log(&s, "MARK-PRINT");
    let print = log
        .lines()
        .find(|l| l.contains("MARK-PRINT"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        print.contains("[notice]") && print.contains("[lua]"),
        "{print}"
    );
    assert!(log.contains("MARK-NOTICE"), "{log}");
    assert!(!log.contains("MARK-INFO"), "{log}");
    assert!(!log.contains("MARK-DEBUG"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// ngx.shared across workers

#[test]
fn shared_dict_counts_exactly_across_two_workers() {
    let mut conf = conf_with("info", 2, "    lua_shared_dict counters 1m;");
    conf.push_str(
        r#"
        location /incr {
            content_by_lua_block {
                local d = ngx.shared.counters
                local n, err = d:incr("hits", 1, 0)
                ngx.say(n, " ", ngx.worker.id())
            }
        }
        location /get {
            content_by_lua_block {
                local d = ngx.shared.counters
                ngx.say(d:get("hits"))
            }
        }
        location /kv {
            content_by_lua_block {
                local d = ngx.shared.counters
                local ok = d:set("k", "v")
                local ok2, err2 = d:add("k", "w")
                local v = d:get("k")
                local miss = d:get("missing")
                d:set("num", 1.5)
                d:set("flag", true)
                ngx.say(tostring(ok), " ", tostring(ok2), " ", err2, " ", v, " ", tostring(miss),
                        " ", d:get("num"), " ", tostring(d:get("flag")), " ", type(d:get("num")))
            }
        }
    }
}
"#,
    );
    let s = Server::start(&conf);
    let r = s.get("/kv");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "true false exists v nil 1.5 true number\n");

    let threads = 8;
    let per = 25;
    let addr = s.addr();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut workers = Vec::new();
                for _ in 0..per {
                    use std::io::Write;
                    let mut sock = std::net::TcpStream::connect(addr).expect("connect");
                    sock.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    sock.write_all(
                        b"GET /incr HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                    )
                    .expect("write");
                    let r = common::read_response(&mut sock).expect("response");
                    assert_eq!(r.status, 200);
                    let text = r.text();
                    workers.push(text.trim().split(' ').nth(1).unwrap_or("?").to_string());
                }
                workers
            })
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for h in handles {
        seen.extend(h.join().expect("client thread"));
    }
    assert_eq!(s.get("/get").text(), format!("{}\n", threads * per));
    assert!(
        seen.contains("0") && seen.contains("1"),
        "expected both workers to serve: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bundled libraries and helpers

#[test]
fn cjson_encode_decode_in_content() {
    let s = start(
        r#"
        location /j {
            content_by_lua_block {
                local cjson = require "cjson"
                local t = cjson.decode('{"a":[1,2,{"b":null}],"s":"x\\u00e9","f":1.5,"t":true}')
                ngx.say(t.a[2], " ", tostring(t.a[3].b == cjson.null), " ", t.s, " ", t.f, " ", tostring(t.t))
                ngx.say(cjson.encode({1, 2, "three"}))
                ngx.say(cjson.encode({ k = "v\"q" }))
                ngx.say(cjson.encode(cjson.empty_array or {}))
                local safe = require "cjson.safe"
                local v, err = safe.decode("{bad")
                ngx.say(tostring(v), " ", type(err))
                local ok = pcall(cjson.decode, "{bad")
                ngx.say("pcall ok=", tostring(ok))
            }
        }
"#,
    );
    let r = s.get("/j");
    assert_eq!(r.status, 200, "{}", s.error_log());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "2 true xé 1.5 true");
    assert_eq!(lines[1], "[1,2,\"three\"]");
    assert_eq!(lines[2], "{\"k\":\"v\\\"q\"}");
    assert!(lines[3] == "[]" || lines[3] == "{}", "{text}");
    assert_eq!(lines[4], "nil string");
    assert_eq!(lines[5], "pcall ok=false");
}

#[test]
fn ngx_re_match_gsub_find_sub() {
    let s = start(
        r##"
        location /re {
            content_by_lua_block {
                local m = ngx.re.match("hello 1234 world", "([0-9]+)")
                ngx.say(m[0], " ", m[1])
                local m2 = ngx.re.match("key=val", [[(?<k>\w+)=(?<v>\w+)]], "jo")
                ngx.say(m2.k, " ", m2.v, " ", m2[2])
                ngx.say(tostring(ngx.re.match("abc", "\\d")))
                local out, n = ngx.re.gsub("a1b2c3", "[0-9]", "#")
                ngx.say(out, " ", n)
                local s2, n2 = ngx.re.sub("john smith", [[(\w+) (\w+)]], "$2, $1")
                ngx.say(s2, " ", n2)
                local from, to = ngx.re.find("hello world", "wor", "jo")
                ngx.say(from, " ", to)
                local caps = {}
                for mm in ngx.re.gmatch("a=1,b=2", [[(\w)=(\d)]]) do caps[#caps + 1] = mm[1] .. mm[2] end
                ngx.say(table.concat(caps, ";"))
                ngx.say(ngx.re.match("HeLLo", "hello", "i")[0])
                local fn_out = ngx.re.gsub("x1y22", "[0-9]+", function(c) return "<" .. c[0] .. ">" end)
                ngx.say(fn_out)
            }
        }
"##,
    );
    let r = s.get("/re");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(
        r.text(),
        "1234 1234\nkey val val\nnil\na#b#c# 3\nsmith, john 1\n7 9\na1;b2\nHeLLo\nx<1>y<22>\n"
    );
}

#[test]
fn string_helpers() {
    let s = start(
        r#"
        location /s {
            content_by_lua_block {
                ngx.say(ngx.md5("hello"))
                ngx.say(ngx.encode_base64("hello"), " ", ngx.decode_base64("aGVsbG8="))
                ngx.say(ngx.encode_base64(ngx.sha1_bin("abc")))
                ngx.say(#ngx.md5_bin("x"))
                ngx.say(ngx.escape_uri("a b/c"), " ", ngx.unescape_uri("a%20b%2Fc"))
                ngx.say(ngx.encode_args({ q = "a b" }))
                ngx.say(ngx.crc32_short("hello"), " ", ngx.crc32_long("hello"))
                ngx.say(tostring(ngx.decode_base64("!!!")))
            }
        }
"#,
    );
    let r = s.get("/s");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(
        r.text(),
        "5d41402abc4b2a76b9719d911017c592\naGVsbG8= hello\nqZk+NkcGgWq6PiVxeFDCbJzQ2J0=\n16\na%20b%2Fc a b/c\nq=a%20b\n907060870 907060870\nnil\n"
    );
}

#[test]
fn time_functions() {
    let s = start(
        r#"
        location /t {
            content_by_lua_block {
                ngx.say(string.format("%.3f", ngx.now()))
                ngx.say(ngx.time(), " ", math.type and math.type(ngx.time()) or (ngx.time() % 1 == 0 and "integral" or "fractional"))
                ngx.say(ngx.http_time(1290079655))
                ngx.say(ngx.cookie_time(1290079655))
                ngx.say(ngx.parse_http_time("Thu, 18 Nov 2010 11:27:35 GMT"))
                ngx.say(tostring(ngx.parse_http_time("garbage")))
                ngx.say(ngx.today())
                ngx.say(ngx.utctime())
                local t1 = ngx.now()
                ngx.sleep(0.05)
                ngx.update_time()
                ngx.say(tostring(ngx.now() > t1))
            }
        }
"#,
    );
    let r = s.get("/t");
    assert_eq!(r.status, 200, "{}", s.error_log());
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let ngx_now: f64 = lines[0].parse().unwrap_or(0.0);
    assert!((now - ngx_now).abs() < 5.0, "{text}");
    let mut t = lines[1].split(' ');
    let ngx_time: f64 = t.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    assert!((now - ngx_time).abs() < 5.0, "{text}");
    assert_eq!(t.next(), Some("integral"), "{text}");
    assert_eq!(lines[2], "Thu, 18 Nov 2010 11:27:35 GMT");
    assert_eq!(lines[3], "Thu, 18-Nov-10 11:27:35 GMT");
    assert_eq!(lines[4], "1290079655");
    assert_eq!(lines[5], "nil");
    let today = lines[6];
    assert!(
        today.len() == 10 && today.as_bytes()[4] == b'-' && today.as_bytes()[7] == b'-',
        "{text}"
    );
    let utc = lines[7];
    assert!(
        utc.len() == 19 && utc.as_bytes()[10] == b' ' && utc.as_bytes()[13] == b':',
        "{text}"
    );
    assert_eq!(lines[8], "true");
}

// ---------------------------------------------------------------------------------------------
// More API details

#[test]
fn shared_dict_semantics() {
    let s = Server::start(&server_conf(
        "    lua_shared_dict d 1m;",
        r##"
        location /sd {
            content_by_lua_block {
                local d = ngx.shared.d
                local out = {}
                local function put(n, ...) local t = {...} local parts = {} for i = 1, n do parts[i] = tostring(t[i]) end out[#out + 1] = table.concat(parts, ",") end
                put(3, d:set("k", "v", 0, 7))
                put(2, d:get("k"))
                put(3, d:replace("missing", 1))
                put(3, d:add("k", "other"))
                put(2, d:incr("k", 1))
                put(2, d:incr("n", 5))
                put(3, d:incr("n", 5, 10))
                put(2, d:incr("n", -3))
                d:set("short", 1, 0.05)
                ngx.sleep(0.1)
                put(1, d:get("short"))
                put(3, d:get_stale("short"))
                d:set("t", 1, 10)
                local ttl = d:ttl("t")
                put(1, ttl > 9 and ttl <= 10)
                d:delete("k")
                put(1, d:get("k"))
                put(6, d:lpush("l", "a"), d:rpush("l", "b"), d:llen("l"), d:lpop("l"), d:rpop("l"), d:llen("l"))
                d:set("x1", 1) d:set("x2", 2)
                put(1, #d:get_keys(0) >= 3)
                d:flush_all()
                put(2, d:get("x1"), #d:get_keys(0))
                ngx.say(table.concat(out, "|"))
            }
        }
"##,
    ));
    let r = s.get("/sd");
    assert_eq!(r.status, 200, "{}", wait_log(&s, "[error]"));
    assert_eq!(
        r.text(),
        "true,nil,false|v,7|false,not found,false|false,exists,false|nil,not a number|nil,not found|15,nil,false|12,nil|nil|1,nil,true|true|nil|1,2,2,a,b,0|true|nil,0\n"
    );
}

#[test]
fn vars_in_log_phase() {
    let s = start(
        r#"
        location /lv {
            content_by_lua_block { ngx.status = 201; ngx.print("12345") }
            log_by_lua_block {
                local rt = tonumber(ngx.var.request_time)
                ngx.log(ngx.WARN, "LV status=", ngx.var.status, " bytes=", ngx.var.body_bytes_sent,
                        " uri=", ngx.var.uri, " rt_ok=", tostring(rt ~= nil and rt >= 0 and rt < 5),
                        " phase=", ngx.get_phase())
            }
        }
"#,
    );
    let r = s.get("/lv");
    assert_eq!(r.status, 201);
    let log = wait_log(&s, "LV status");
    assert!(
        log.contains("LV status=201 bytes=5 uri=/lv rt_ok=true phase=log"),
        "{log}"
    );
}

#[test]
fn req_misc_functions() {
    let s = start(
        r#"
        location /m {
            content_by_lua_block {
                local lim, err = ngx.req.get_headers(2)
                local n = 0
                for _ in pairs(lim) do n = n + 1 end
                ngx.say("limited=", n, " err=", tostring(err))
                ngx.say("body_before_read=", tostring(ngx.req.get_body_data()))
                ngx.say("internal=", tostring(ngx.req.is_internal()))
                local args = ngx.decode_args("a=1&b=%20x&c")
                ngx.say("decode=", args.a, ",", args.b, ",", tostring(args.c))
                ngx.say("prefix_ok=", tostring(ngx.config.prefix():sub(-1) == "/"), " subsystem=", ngx.config.subsystem)
                ngx.say("pid_ok=", tostring(type(ngx.worker.pid()) == "number"))
            }
        }
"#,
    );
    let r = req(
        &s,
        "GET /m HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", wait_log(&s, "[error]"));
    assert_eq!(
        r.text(),
        "limited=2 err=truncated\nbody_before_read=nil\ninternal=false\ndecode=1, x,true\nprefix_ok=true subsystem=http\npid_ok=true\n"
    );
}

#[test]
fn is_subrequest_is_a_boolean_field() {
    let s = start(
        "        location /s { content_by_lua_block { ngx.say(type(ngx.is_subrequest), \" \", tostring(ngx.is_subrequest)) } }\n",
    );
    assert_eq!(s.get("/s").text(), "boolean false\n");
}

#[test]
fn req_body_read_in_access_and_used_in_content() {
    let s = start(
        r#"
        location /b {
            access_by_lua_block {
                ngx.req.read_body()
                ngx.ctx.len = #(ngx.req.get_body_data() or "")
            }
            content_by_lua_block {
                ngx.say(ngx.ctx.len, " ", ngx.req.get_body_data())
            }
        }
        location /nobody {
            content_by_lua_block {
                ngx.req.read_body()
                ngx.say(tostring(ngx.req.get_body_data()))
            }
        }
"#,
    );
    let r = req(
        &s,
        "PUT /b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 7\r\nConnection: close\r\n\r\npayload",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "7 payload\n");
    // Chunked request bodies are read too.
    let r = req(
        &s,
        "POST /b HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    );
    assert_eq!(r.text(), "5 abcde\n");
    let r = s.get("/nobody");
    assert_eq!(r.text(), "nil\n");
}

#[test]
fn header_filter_reads_and_rewrites_response_headers() {
    let s = start(
        r#"
        location /hf {
            default_type text/plain;
            content_by_lua_block { ngx.header["X-Up"] = "up"; ngx.say("b") }
            header_filter_by_lua_block {
                local h = ngx.resp.get_headers()
                ngx.header["X-Seen"] = ngx.header.content_type .. ";" .. h["x-up"] .. ";" .. ngx.status
                ngx.header.content_type = "application/x-changed"
            }
        }
"#,
    );
    let r = s.get("/hf");
    assert_eq!(r.header("X-Seen"), Some("text/plain;up;200"));
    assert_eq!(r.header("Content-Type"), Some("application/x-changed"));
}

#[test]
fn gc_finalizers_calling_ngx_apis_do_not_panic() {
    // Making Lua values can run a __gc finalizer that itself calls ngx APIs; no API may hold
    // the request state borrowed while it makes Lua values.
    let s = start(
        r#"
        location /gc {
            content_by_lua_block {
                local hits = 0
                local function fin()
                    local _ = ngx.ctx.x
                    local _ = ngx.var.uri
                    ngx.req.set_header("X-Gc", "1")
                    hits = hits + 1
                end
                for i = 1, 20000 do
                    local p = newproxy(true)
                    getmetatable(p).__gc = fin
                    local h = ngx.req.get_headers()
                    local _ = ngx.var.http_x_h1
                end
                ngx.say("ok ", hits > 0)
            }
        }
"#,
    );
    let mut req = String::from("GET /gc HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for i in 0..40 {
        req.push_str(&format!("X-H{}: value-{}\r\n", i, i));
    }
    req.push_str("\r\n");
    let r = s.request(&req);
    assert_eq!(
        (r.status, r.text()),
        (200, "ok true\n".to_string()),
        "{}",
        s.error_log()
    );
    let err = s.stderr();
    assert!(
        !err.contains("panicked"),
        "stderr: {}",
        &err[..err.len().min(2000)]
    );
}
