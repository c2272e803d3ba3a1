//! Whole-server tests of subrequests: `ngx.location.capture` and `ngx.location.capture_multi`
//! with each documented option, captured content handlers (Lua, static files, `return`),
//! internal locations, nesting and its limit, `ngx.is_subrequest`, and the named-location paths
//! (`ngx.exec("@name")`, `error_page ... @name`) that share the engine with them. Expected values
//! follow lua-nginx-module's README.

mod common;

use common::{http_conf, Server};

fn server_conf(http_extra: &str, locations: &str) -> String {
    http_conf(&format!(
        "{http_extra}\n    server {{\n        listen 127.0.0.1:PORT;\n        server_name localhost;\n        root html;\n{locations}\n    }}\n"
    ))
}

fn start(locations: &str) -> Server {
    Server::start(&server_conf("", locations))
}

fn start_with_files(http_extra: &str, locations: &str, files: &[(&str, &str)]) -> Server {
    Server::start_with(&server_conf(http_extra, locations), files)
}

fn assert_no_panic(s: &Server) {
    assert!(!s.stderr().contains("panicked"), "{}", s.stderr());
}

// ---------------------------------------------------------------------------------------------
// The result table

#[test]
fn capture_returns_status_headers_body_and_truncated() {
    let s = start(
        r#"
        location /sub {
            content_by_lua_block {
                ngx.status = 201
                ngx.header["X-One"] = "1"
                ngx.header["Set-Cookie"] = {"a=3", "foo=bar", "baz=blah"}
                ngx.say("hello from ", ngx.var.uri, " args=", ngx.var.args)
            }
        }
        location /main {
            content_by_lua_block {
                local res = ngx.location.capture("/sub?x=1")
                ngx.say("status=", res.status, " type=", type(res.status))
                ngx.say("body=", res.body)
                ngx.say("truncated=", tostring(res.truncated))
                ngx.say("x-one=", res.header["X-One"])
                ngx.say("cookies=", table.concat(res.header["Set-Cookie"], "|"))
                ngx.say("lower=", res.header["x-one"], " underscore=", res.header.x_one)
                ngx.say("ctype=", res.header["Content-Type"])
                ngx.say("server=", tostring(res.header["Server"]))
            }
        }
"#,
    );
    let r = s.get("/main");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(
        r.text(),
        "status=201 type=number\nbody=hello from /sub args=x=1\n\ntruncated=false\nx-one=1\n\
cookies=a=3|foo=bar|baz=blah\nlower=1 underscore=1\nctype=text/plain\nserver=nil\n"
    );
    assert_no_panic(&s);
}

#[test]
fn header_keys_are_in_nginx_case_for_pairs() {
    let s = start(
        r#"
        location /sub { content_by_lua_block { ngx.header.x_custom_thing = "v" ngx.print("") } }
        location /main {
            content_by_lua_block {
                local res = ngx.location.capture("/sub")
                local keys = {}
                for k in pairs(res.header) do keys[#keys + 1] = k end
                table.sort(keys)
                ngx.say(table.concat(keys, ","))
            }
        }
"#,
    );
    assert_eq!(s.get("/main").text(), "Content-Type,X-Custom-Thing\n");
}

#[test]
fn is_subrequest_and_is_internal_are_per_request() {
    let s = start(
        r#"
        location /sub {
            content_by_lua_block {
                ngx.print("sub:", tostring(ngx.is_subrequest), ":", tostring(ngx.req.is_internal()),
                          ":", ngx.var.request_uri, ":", ngx.req.get_method())
            }
        }
        location /main {
            content_by_lua_block {
                local res = ngx.location.capture("/sub")
                ngx.say(res.body)
                ngx.say("main:", tostring(ngx.is_subrequest), ":", tostring(ngx.req.is_internal()))
            }
        }
"#,
    );
    assert_eq!(
        s.get("/main?q=1").text(),
        "sub:true:true:/main?q=1:GET\nmain:false:false\n"
    );
}

// ---------------------------------------------------------------------------------------------
// Options

#[test]
fn method_and_body_options() {
    let s = start(
        r#"
        location /echo {
            content_by_lua_block {
                ngx.req.read_body()
                ngx.print(ngx.req.get_method(), " [", tostring(ngx.req.get_body_data()), "] len=",
                          tostring(ngx.var.http_content_length))
            }
        }
        location /main {
            content_by_lua_block {
                local m = {
                    {ngx.HTTP_POST, "POST"}, {ngx.HTTP_PUT, "PUT"}, {ngx.HTTP_DELETE, "DELETE"},
                    {ngx.HTTP_OPTIONS, "OPTIONS"}, {ngx.HTTP_PATCH, "PATCH"}, {"GET", "GET"},
                }
                for _, pair in ipairs(m) do
                    local res = ngx.location.capture("/echo", { method = pair[1], body = "hello, world" })
                    ngx.say(res.body)
                end
                local res = ngx.location.capture("/echo", { method = ngx.HTTP_POST, body = 42 })
                ngx.say(res.body)
                local res = ngx.location.capture("/echo")
                ngx.say(res.body)
            }
        }
"#,
    );
    let r = s.get("/main");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(
        r.text(),
        "POST [hello, world] len=12\nPUT [hello, world] len=12\nDELETE [hello, world] len=12\n\
OPTIONS [hello, world] len=12\nPATCH [hello, world] len=12\nGET [hello, world] len=12\n\
POST [42] len=2\nGET [nil] len=nil\n"
    );
}

#[test]
fn head_subrequest_has_headers_but_no_body() {
    let s = start_with_files(
        "",
        r#"
        location /lua { content_by_lua_block { ngx.header["X-M"] = ngx.req.get_method() ngx.say("body!") } }
        location /main {
            content_by_lua_block {
                local a = ngx.location.capture("/lua", { method = ngx.HTTP_HEAD })
                local b = ngx.location.capture("/file.txt", { method = ngx.HTTP_HEAD })
                ngx.say(a.status, " [", a.body, "] ", a.header["X-M"])
                ngx.say(b.status, " [", b.body, "] ", tostring(b.header["Last-Modified"] ~= nil))
            }
        }
"#,
        &[("html/file.txt", "file body\n")],
    );
    assert_eq!(s.get("/main").text(), "200 [] HEAD\n200 [] true\n");
}

#[test]
fn args_option_string_and_table_merge_with_inline_args() {
    let s = start(
        r#"
        location /args { content_by_lua_block { ngx.print(ngx.var.args) } }
        location /main {
            content_by_lua_block {
                ngx.say(ngx.location.capture("/args?a=1", { args = { b = 3 } }).body)
                ngx.say(ngx.location.capture("/args?a=1", { args = "b=3&c=%3a" }).body)
                ngx.say(ngx.location.capture("/args", { args = { c = ":" } }).body)
                ngx.say(ngx.location.capture("/args", { args = 7 }).body)
            }
        }
"#,
    );
    assert_eq!(s.get("/main").text(), "a=1&b=3\na=1&b=3&c=%3a\nc=%3A\n7\n");
}

#[test]
fn vars_option_sets_declared_variables() {
    // The README's example.
    let s = start(
        r#"
        location /other {
            content_by_lua_block {
                ngx.say("dog = ", ngx.var.dog)
                ngx.say("cat = ", ngx.var.cat)
            }
        }
        location /lua {
            set $dog '';
            set $cat '';
            content_by_lua_block {
                local res = ngx.location.capture("/other", { vars = { dog = "hello", cat = 32 }})
                ngx.print(res.body)
                ngx.say("parent dog = [", ngx.var.dog, "]")
            }
        }
        location /bad {
            content_by_lua_block {
                local ok, err = pcall(ngx.location.capture, "/other", { vars = { nosuch = "x" } })
                ngx.say(tostring(ok), " ", tostring(err):match("failed to adjust the subrequest: %-?%d+"))
            }
        }
"#,
    );
    assert_eq!(
        s.get("/lua").text(),
        "dog = hello\ncat = 32\nparent dog = []\n"
    );
    assert_eq!(
        s.get("/bad").text(),
        "false failed to adjust the subrequest: -1\n"
    );
    assert!(
        s.error_log()
            .contains("variable \"nosuch\" cannot be assigned a value"),
        "{}",
        s.error_log()
    );
}

#[test]
fn share_all_vars_and_copy_all_vars() {
    // The README's two examples (with content_by_lua in place of echo).
    let s = start(
        r#"
        location /other {
            set $dog "$dog world";
            content_by_lua_block { ngx.say(ngx.var.uri, " dog: ", ngx.var.dog) }
        }
        location /share {
            set $dog 'hello';
            content_by_lua_block {
                local res = ngx.location.capture("/other", { share_all_vars = true })
                ngx.print(res.body)
                ngx.say(ngx.var.uri, ": ", ngx.var.dog)
            }
        }
        location /copy {
            set $dog 'hello';
            content_by_lua_block {
                local res = ngx.location.capture("/other", { copy_all_vars = true })
                ngx.print(res.body)
                ngx.say(ngx.var.uri, ": ", ngx.var.dog)
            }
        }
        location /both {
            set $dog 'hello';
            content_by_lua_block {
                local res = ngx.location.capture("/other", { copy_all_vars = true, share_all_vars = true })
                ngx.print(res.body)
                ngx.say(ngx.var.uri, ": ", ngx.var.dog)
            }
        }
        location /none {
            set $dog 'hello';
            content_by_lua_block {
                local res = ngx.location.capture("/other")
                ngx.print(res.body)
                ngx.say(ngx.var.uri, ": ", ngx.var.dog)
            }
        }
"#,
    );
    assert_eq!(
        s.get("/share").text(),
        "/other dog: hello world\n/share: hello world\n"
    );
    assert_eq!(
        s.get("/copy").text(),
        "/other dog: hello world\n/copy: hello\n"
    );
    assert_eq!(
        s.get("/both").text(),
        "/other dog: hello world\n/both: hello world\n"
    );
    assert_eq!(s.get("/none").text(), "/other dog:  world\n/none: hello\n");
}

#[test]
fn ctx_option_custom_and_shared_table() {
    let s = start(
        r#"
        location /sub { content_by_lua_block { ngx.ctx.foo = "bar" } }
        location /custom {
            content_by_lua_block {
                local ctx = {}
                ngx.location.capture("/sub", { ctx = ctx })
                ngx.say(ctx.foo)
                ngx.say(ngx.ctx.foo)
            }
        }
        location /shared {
            content_by_lua_block {
                ngx.location.capture("/sub", { ctx = ngx.ctx })
                ngx.say(ngx.ctx.foo)
            }
        }
        location /own {
            content_by_lua_block {
                ngx.ctx.foo = "parent"
                ngx.location.capture("/sub")
                ngx.say(ngx.ctx.foo)
            }
        }
"#,
    );
    assert_eq!(s.get("/custom").text(), "bar\nnil\n");
    assert_eq!(s.get("/shared").text(), "bar\n");
    assert_eq!(s.get("/own").text(), "parent\n");
}

#[test]
fn parent_headers_and_body_are_inherited() {
    let s = start(
        r#"
        location /echo {
            content_by_lua_block {
                ngx.req.read_body()
                ngx.print(ngx.req.get_method(), " x-foo=", tostring(ngx.var.http_x_foo),
                          " body=", tostring(ngx.req.get_body_data()),
                          " cl=", tostring(ngx.var.http_content_length))
            }
        }
        location /main {
            content_by_lua_block {
                ngx.req.read_body()
                ngx.say(ngx.location.capture("/echo", { method = ngx.HTTP_POST }).body)
                ngx.say(ngx.location.capture("/echo", { method = ngx.HTTP_PUT }).body)
                ngx.say(ngx.location.capture("/echo").body)
                ngx.say(ngx.location.capture("/echo", { always_forward_body = true }).body)
                ngx.say(ngx.location.capture("/echo", { method = ngx.HTTP_POST, body = "own" }).body)
            }
        }
        location /unread {
            content_by_lua_block {
                -- The parent never read its body: the subrequest still gets it.
                ngx.say(ngx.location.capture("/echo", { method = ngx.HTTP_POST }).body)
            }
        }
"#,
    );
    let post = |path: &str| {
        s.request(&format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nX-Foo: bar\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        ))
    };
    let r = post("/main");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(
        r.text(),
        "POST x-foo=bar body=hello cl=5\nPUT x-foo=bar body=hello cl=5\n\
GET x-foo=bar body=nil cl=0\nGET x-foo=bar body=hello cl=5\nPOST x-foo=bar body=own cl=3\n"
    );
    assert_eq!(post("/unread").text(), "POST x-foo=bar body=hello cl=5\n");
}

// ---------------------------------------------------------------------------------------------
// Content handlers and statuses

#[test]
fn static_file_return_and_error_statuses() {
    let s = start_with_files(
        "",
        r#"
        location /moved { return 302 /elsewhere; }
        location /teapot { return 418 "short and stout"; }
        location /forbid { content_by_lua_block { ngx.exit(403) } }
        location /created { content_by_lua_block { ngx.exit(201) } }
        location /made { content_by_lua_block { ngx.say("made") ngx.exit(201) } }
        location /boom { content_by_lua_block { error("boom") } }
        location /main {
            content_by_lua_block {
                for _, uri in ipairs({"/file.txt", "/moved", "/teapot", "/missing.txt", "/forbid",
                                      "/created", "/made", "/boom"}) do
                    local res = ngx.location.capture(uri)
                    ngx.say(uri, " ", res.status, " [", res.body, "] ", tostring(res.truncated),
                            " ", tostring(res.header["Location"]))
                end
            }
        }
"#,
        &[("html/file.txt", "static text")],
    );
    let r = s.get("/main");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(
        r.text(),
        "/file.txt 200 [static text] false nil\n\
/moved 302 [] false /elsewhere\n\
/teapot 418 [short and stout] false nil\n\
/missing.txt 404 [] false nil\n\
/forbid 403 [] false nil\n\
/created 201 [] false nil\n\
/made 200 [made\n] false nil\n\
/boom 500 [] false nil\n"
    );
    // nginx's error-log line for a subrequest names the main request and the subrequest.
    let log = s.error_log();
    assert!(
        log.contains("request: \"GET /main HTTP/1.1\", subrequest: \"/boom\""),
        "{}",
        log
    );
    assert_no_panic(&s);
}

#[test]
fn output_cut_short_is_flagged_truncated() {
    let s = start(
        r#"
        location /partial {
            content_by_lua_block {
                ngx.say("part one")
                ngx.flush(true)
                error("gave up")
            }
        }
        location /main {
            content_by_lua_block {
                local res = ngx.location.capture("/partial")
                ngx.say(res.status, " [", res.body, "] ", tostring(res.truncated))
            }
        }
"#,
    );
    assert_eq!(s.get("/main").text(), "200 [part one\n] true\n");
}

#[test]
fn internal_locations_only_reachable_by_subrequests() {
    let s = start(
        r#"
        location /private { internal; content_by_lua_block { ngx.print("secret") } }
        location /main {
            content_by_lua_block {
                local res = ngx.location.capture("/private")
                ngx.say(res.status, " ", res.body)
            }
        }
"#,
    );
    assert_eq!(s.get("/main").text(), "200 secret\n");
    assert_eq!(s.get("/private").status, 404);
}

#[test]
fn filters_run_for_subrequests_but_not_add_header() {
    let s = start(
        r#"
        location /sub {
            add_header X-Added yes;
            header_filter_by_lua_block { ngx.header["X-Filtered"] = tostring(ngx.is_subrequest) }
            body_filter_by_lua_block { ngx.arg[1] = string.upper(ngx.arg[1] or "") }
            content_by_lua_block { ngx.print("quiet") }
        }
        location /main {
            content_by_lua_block {
                local res = ngx.location.capture("/sub")
                ngx.say(res.body, " ", tostring(res.header["X-Filtered"]), " ",
                        tostring(res.header["X-Added"]))
            }
        }
"#,
    );
    assert_eq!(s.get("/main").text(), "QUIET true nil\n");
    let direct = s.get("/sub");
    assert_eq!(direct.text(), "QUIET");
    assert_eq!(direct.header("x-added"), Some("yes"));
}

#[test]
fn rewrite_runs_but_access_phase_is_skipped_in_subrequests() {
    // nginx skips the access phase for subrequests: an access_by_lua that captures its own
    // server's locations does not recurse.
    let s = start(
        r#"
        rewrite_by_lua_block { ngx.req.set_header("X-Rewritten", "1") }
        access_by_lua_block {
            if ngx.var.uri == "/main" then
                local res = ngx.location.capture("/auth")
                if res.status ~= 200 then ngx.exit(res.status) end
                ngx.req.set_header("X-Auth", res.body)
            end
        }
        location /auth {
            content_by_lua_block { ngx.print("ok:", tostring(ngx.var.http_x_rewritten)) }
        }
        location /deny-all {
            access_by_lua_block { ngx.exit(403) }
            content_by_lua_block { ngx.print("reached") }
        }
        location /main {
            content_by_lua_block {
                ngx.say("auth=", ngx.var.http_x_auth)
                local res = ngx.location.capture("/deny-all")
                ngx.say(res.status, " ", res.body)
            }
        }
"#,
    );
    let r = s.get("/main");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "auth=ok:1\n200 reached\n");
    assert_eq!(s.get("/deny-all").status, 403);
}

#[test]
fn capture_from_rewrite_access_and_header_filter() {
    let s = start(
        r#"
        location /val { content_by_lua_block { ngx.print("v") } }
        location /main {
            rewrite_by_lua_block { ngx.ctx.r = ngx.location.capture("/val").body }
            access_by_lua_block { ngx.ctx.a = ngx.location.capture("/val").body }
            header_filter_by_lua_block { ngx.header["X-HF"] = ngx.location.capture("/val").body }
            content_by_lua_block { ngx.say(ngx.ctx.r, ngx.ctx.a) }
        }
"#,
    );
    let r = s.get("/main");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "vv\n");
    assert_eq!(r.header("x-hf"), Some("v"));
}

// ---------------------------------------------------------------------------------------------
// Nesting, concurrency, limits

#[test]
fn nested_captures() {
    let s = start(
        r#"
        location /c { content_by_lua_block { ngx.print("c") } }
        location /b {
            content_by_lua_block {
                local res = ngx.location.capture("/c")
                ngx.print("b(", res.body, ")")
            }
        }
        location /a {
            content_by_lua_block {
                local res = ngx.location.capture("/b")
                ngx.say("a(", res.body, ")")
            }
        }
"#,
    );
    assert_eq!(s.get("/a").text(), "a(b(c))\n");
}

#[test]
fn recursion_stops_at_fifty_levels() {
    let s = start(
        r#"
        location /recur {
            content_by_lua_block {
                local n = tonumber(ngx.var.arg_n)
                local ok, res = pcall(ngx.location.capture, "/recur?n=" .. (n + 1))
                if not ok then
                    ngx.print("stopped at ", n, ": ", tostring(res):match("failed to issue subrequest: %-?%d+"))
                    return
                end
                ngx.print(res.body)
            }
        }
"#,
    );
    let r = s.get("/recur?n=0");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "stopped at 50: failed to issue subrequest: -1");
    assert!(
        s.error_log()
            .contains("lua subrequests cycle while processing \"/recur\""),
        "{}",
        s.error_log()
    );
    assert_no_panic(&s);
}

#[test]
fn capture_multi_runs_concurrently_and_returns_in_order() {
    let s = start_with_files(
        "    lua_shared_dict d 1m;",
        r#"
        location /slow {
            content_by_lua_block {
                local d = ngx.shared.d
                local id = ngx.var.arg_id
                d:rpush("log", "start" .. id)
                ngx.sleep(0.1)
                d:rpush("log", "end" .. id)
                ngx.print("r", id)
            }
        }
        location /main {
            content_by_lua_block {
                local a, b, c, f = ngx.location.capture_multi({
                    { "/slow?id=1" },
                    { "/slow", { args = { id = 2 } } },
                    { "/slow?id=3" },
                    { "/file.txt" },
                })
                ngx.say(a.body, b.body, c.body, f.body)
                local d = ngx.shared.d
                local seen = {}
                while true do
                    local v = d:lpop("log")
                    if not v then break end
                    seen[#seen + 1] = v
                end
                ngx.say(table.concat(seen, ","))
            }
        }
"#,
        &[("html/file.txt", "F")],
    );
    let r = s.get("/main");
    assert_eq!(r.status, 200, "{}", s.error_log());
    let text = r.text();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("r1r2r3F"));
    let log: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    assert_eq!(log.len(), 6, "{:?}", log);
    // Concurrent: every subrequest started before any finished its sleep.
    assert_eq!(&log[..3], &["start1", "start2", "start3"], "{:?}", log);
    let mut ends = log[3..].to_vec();
    ends.sort();
    assert_eq!(ends, vec!["end1", "end2", "end3"]);
}

#[test]
fn access_log_has_no_lines_for_subrequests() {
    let s = start(
        r#"
        location /sub { content_by_lua_block { ngx.print("s") } }
        location /main {
            content_by_lua_block {
                ngx.location.capture_multi({ { "/sub" }, { "/sub" } })
                ngx.say("done")
            }
        }
"#,
    );
    assert_eq!(s.get("/main").text(), "done\n");
    // The access log is written after the response: wait for the main request's line.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut log = String::new();
    while std::time::Instant::now() < deadline {
        log = std::fs::read_to_string(s.path("logs/access.log")).unwrap_or_default();
        if log.contains("/main") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(log.lines().count(), 1, "{}", log);
    assert!(!log.contains("/sub"), "{}", log);
}

#[test]
fn argument_errors_use_lua_nginx_module_messages() {
    let s = start(
        r#"
        location /sub { content_by_lua_block { ngx.print("s") } }
        location /main {
            content_by_lua_block {
                local function try(...)
                    local ok, err = pcall(...)
                    -- The message's first line (without the traceback).
                    ngx.say(tostring(ok), " ", (tostring(err):match("^[^\n]*")))
                end
                try(ngx.location.capture)
                try(ngx.location.capture, "/sub", { method = 3 })
                try(ngx.location.capture, "/sub", { method = {} })
                try(ngx.location.capture, "/a/../sub")
                try(ngx.location.capture, "/sub", { ctx = 1 })
                try(ngx.location.capture, "/sub", { body = {} })
                try(ngx.location.capture, "/sub", { share_all_vars = 1 })
                try(ngx.location.capture, "/sub", "x")
                try(ngx.location.capture_multi, {})
                try(ngx.location.capture_multi, { "/sub" })
                try(ngx.location.capture_multi, { { "/sub" } }, 2)
            }
        }
"#,
    );
    let r = s.get("/main");
    assert_eq!(r.status, 200, "{}", s.error_log());
    let text = r.text();
    let expected = [
        "expecting one or two arguments",
        "unsupported HTTP method: 3",
        "Bad http request method",
        "unsafe uri in argument #1: /a/../sub",
        "Bad ctx option value type number, expected a Lua table",
        "Bad http request body",
        "Bad share_all_vars option value",
        "expecting table as the 2nd argument for subrequest 0, but got string",
        "at least one subrequest should be specified",
        "the query argument 0 is not a table, but a string",
        "only one argument is expected, but got 2",
    ];
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{}", text);
    for (line, want) in lines.iter().zip(expected) {
        assert!(line.starts_with("false "), "{}", line);
        assert!(line.contains(want), "{} does not contain {}", line, want);
    }
}

// ---------------------------------------------------------------------------------------------
// Named locations (share the engine's redirect paths with subrequests)

#[test]
fn exec_to_named_location_from_content_and_inside_a_subrequest() {
    let s = start(
        r#"
        location @named {
            content_by_lua_block {
                ngx.print("named uri=", ngx.var.uri, " sub=", tostring(ngx.is_subrequest),
                          " ctx=", tostring(ngx.ctx.x))
            }
        }
        location /jump {
            content_by_lua_block { ngx.ctx.x = 1 ngx.exec("@named") }
        }
        location /main {
            content_by_lua_block {
                local res = ngx.location.capture("/jump")
                ngx.say(res.status, " ", res.body)
            }
        }
"#,
    );
    assert_eq!(s.get("/jump").text(), "named uri=/jump sub=false ctx=nil");
    assert_eq!(
        s.get("/main").text(),
        "200 named uri=/jump sub=true ctx=nil\n"
    );
}

#[test]
fn error_page_to_named_location_with_lua_content() {
    let s = start(
        r#"
        location @oops {
            content_by_lua_block { ngx.say("oops for ", ngx.var.uri, " status ", ngx.status) }
        }
        location /fail {
            error_page 404 503 @oops;
            content_by_lua_block { ngx.exit(503) }
        }
        location /missing {
            error_page 404 = @oops;
        }
"#,
    );
    let r = s.get("/fail");
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "oops for /fail status 503\n");
    let r = s.get("/missing/file.txt");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert!(
        r.text().starts_with("oops for /missing/file.txt"),
        "{}",
        r.text()
    );
}
