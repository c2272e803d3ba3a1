//! The configuration language and the command line, as `nginx -t` users know them: test and
//! dump, errors naming file:line in nginx's words, includes, `${ENV}` interpolation, `-g`,
//! ignored directives, and the signals (`-s reload`, `-s quit`, SIGTERM), including a reload
//! under steady load that must drop nothing.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A full main context around an http body, so tests know the exact line numbers: the
/// http body starts on line 6.
fn conf_with(http_body: &str) -> String {
    format!(
        "worker_processes 1;\nerror_log logs/error.log info;\npid logs/nginx.pid;\nevents {{ worker_connections 64; }}\nhttp {{\n{}\n}}\n",
        http_body
    )
}

/// Run `-t` on a fresh prefix holding these files; returns (exit code, stdout, stderr).
fn test_conf(files: &[(&str, &str)]) -> (i32, String, String) {
    let dir = prefix_with(files, free_port());
    run_cli(dir.path(), &["-c", "conf/nginx.conf", "-t"])
}

/// `-t` on a config expected to be rejected: asserts exit 1, the `test failed` line, and
/// returns stderr.
fn rejected(files: &[(&str, &str)]) -> String {
    let (code, out, err) = test_conf(files);
    assert_eq!(code, 1, "expected exit 1\nstdout: {}\nstderr: {}", out, err);
    assert!(
        err.contains("[emerg]") || err.contains("[error]"),
        "stderr: {}",
        err
    );
    assert!(err.contains("test failed"), "stderr: {}", err);
    err
}

/// Start tidegate on a prefix with extra environment variables on the child.
fn start_env(
    conf: &str,
    extra: &[(&str, &str)],
    env: &[(&str, &str)],
    env_remove: &[&str],
) -> Server {
    let port = free_port();
    let mut files = vec![("conf/nginx.conf", conf)];
    files.extend_from_slice(extra);
    let prefix = prefix_with(&files, port);
    let mut cmd = Command::new(bin());
    cmd.arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg("conf/nginx.conf");
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in env_remove {
        cmd.env_remove(k);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tidegate");
    let mut s = Server {
        child: Some(child),
        port,
        prefix,
        env: Vec::new(),
    };
    wait_ready(&mut s);
    s
}

/// Start with extra `tidegate` arguments (after `-c conf/nginx.conf`).
fn start_args(conf: &str, args: &[&str]) -> Server {
    let port = free_port();
    let prefix = prefix_with(&[("conf/nginx.conf", conf)], port);
    let child = Command::new(bin())
        .arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg("conf/nginx.conf")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tidegate");
    let mut s = Server {
        child: Some(child),
        port,
        prefix,
        env: Vec::new(),
    };
    wait_ready(&mut s);
    s
}

fn wait_ready(s: &mut Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        // Our own child's pid in the pid file: a bare connect could reach another test's server.
        let pid = std::fs::read_to_string(s.path("logs/nginx.pid")).unwrap_or_default();
        if pid.trim() == s.pid().to_string() && TcpStream::connect(("127.0.0.1", s.port)).is_ok() {
            return;
        }
        if let Some(st) = s.wait_exit(Duration::from_millis(0)) {
            panic!(
                "tidegate exited early ({})\nerror.log:\n{}",
                st,
                s.error_log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("tidegate did not start on {}\n{}", s.port, s.error_log());
}

/// Overwrite conf/nginx.conf of a running server (PORT replaced).
fn rewrite_conf(s: &Server, conf: &str) {
    std::fs::write(
        s.path("conf/nginx.conf"),
        conf.replace("PORT", &s.port.to_string()),
    )
    .expect("write conf");
}

fn reload(s: &Server) {
    let (code, out, err) = run_cli(s.prefix.path(), &["-c", "conf/nginx.conf", "-s", "reload"]);
    assert_eq!(
        code, 0,
        "-s reload failed\nstdout: {}\nstderr: {}",
        out, err
    );
}

/// Poll until GET `path` answers `body` (bounded).
fn wait_body(s: &Server, path: &str, body: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = try_get(s.addr(), path) {
            if r.status == 200 && r.text() == body {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn try_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<Response> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(
        format!(
            "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            path
        )
        .as_bytes(),
    )?;
    read_response(&mut c)
}

fn returning(body: &str) -> String {
    http_conf(&format!(
        "server {{ listen 127.0.0.1:PORT; location / {{ return 200 \"{}\"; }} }}",
        body
    ))
}

fn exists(p: &Path) -> bool {
    p.exists()
}

// ---------------------------------------------------------------- -t / -T

#[test]
fn t_good_config_is_ok() {
    let conf = conf_with("server { listen 127.0.0.1:PORT; location / { return 200 ok; } }");
    let (code, out, err) = test_conf(&[("conf/nginx.conf", &conf)]);
    assert_eq!(code, 0, "stdout: {}\nstderr: {}", out, err);
    assert!(err.contains("syntax is ok"), "stderr: {}", err);
    assert!(err.contains("test is successful"), "stderr: {}", err);
    assert!(err.contains("conf/nginx.conf"), "stderr: {}", err);
}

#[test]
fn capital_t_dumps_the_configuration() {
    let conf =
        conf_with("server { listen 127.0.0.1:PORT; location /dumped { return 200 marker_xyz; } }");
    let dir = prefix_with(&[("conf/nginx.conf", &conf)], free_port());
    let (code, out, err) = run_cli(dir.path(), &["-c", "conf/nginx.conf", "-T"]);
    assert_eq!(code, 0, "stdout: {}\nstderr: {}", out, err);
    assert!(err.contains("test is successful"), "stderr: {}", err);
    assert!(out.contains("# configuration file "), "stdout: {}", out);
    assert!(out.contains("conf/nginx.conf:"), "stdout: {}", out);
    assert!(out.contains("marker_xyz"), "stdout: {}", out);
    assert!(out.contains("worker_processes"), "stdout: {}", out);
}

#[test]
fn capital_t_dumps_included_files_too() {
    let conf = conf_with("include conf.d/*.conf;");
    let inc = "server { listen 127.0.0.1:PORT; location / { return 200 from_include_abc; } }\n";
    let dir = prefix_with(
        &[("conf/nginx.conf", &conf), ("conf/conf.d/a.conf", inc)],
        free_port(),
    );
    let (code, out, err) = run_cli(dir.path(), &["-c", "conf/nginx.conf", "-T"]);
    assert_eq!(code, 0, "stderr: {}", err);
    assert!(out.contains("conf.d/a.conf:"), "stdout: {}", out);
    assert!(out.contains("from_include_abc"), "stdout: {}", out);
}

#[test]
fn q_suppresses_success_messages() {
    let conf = conf_with("server { listen 127.0.0.1:PORT; }");
    let dir = prefix_with(&[("conf/nginx.conf", &conf)], free_port());
    let (code, _, err) = run_cli(dir.path(), &["-c", "conf/nginx.conf", "-t", "-q"]);
    assert_eq!(code, 0, "stderr: {}", err);
    assert!(!err.contains("syntax is ok"), "stderr: {}", err);
}

// ---------------------------------------------------------------- errors

#[test]
fn unknown_directive_names_file_and_line() {
    // line 6: server {, line 7: listen, line 8: the typo
    let conf =
        conf_with("server {\n  listen 127.0.0.1:PORT;\n  location / { proxy_pas http://x; }\n}");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(
        err.contains("unknown directive \"proxy_pas\" in "),
        "stderr: {}",
        err
    );
    assert!(err.contains("conf/nginx.conf:8"), "stderr: {}", err);
}

#[test]
fn directive_not_allowed_here() {
    let conf = conf_with("listen 80;\nserver { listen 127.0.0.1:PORT; }");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(
        err.contains("\"listen\" directive is not allowed here in "),
        "stderr: {}",
        err
    );
    assert!(err.contains("conf/nginx.conf:6"), "stderr: {}", err);
}

#[test]
fn invalid_number_of_arguments() {
    let conf = conf_with("server {\n  listen 127.0.0.1:PORT;\n  root a b;\n}");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(
        err.contains("invalid number of arguments in \"root\" directive in "),
        "stderr: {}",
        err
    );
    assert!(err.contains("conf/nginx.conf:8"), "stderr: {}", err);
}

#[test]
fn duplicate_directive() {
    let conf = conf_with("server {\n  listen 127.0.0.1:PORT;\n  root html;\n  root html2;\n}");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(
        err.contains("\"root\" directive is duplicate in "),
        "stderr: {}",
        err
    );
    assert!(err.contains("conf/nginx.conf:9"), "stderr: {}", err);
}

#[test]
fn lua_syntax_error_in_inlined_block() {
    // line 8: location, line 9: content_by_lua_block {, line 10: the bad statement
    let conf = conf_with(
        "server {\n  listen 127.0.0.1:PORT;\n  location / {\n    content_by_lua_block {\n      local x = = 1\n    }\n  }\n}",
    );
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(
        err.contains("failed to load inlined Lua code"),
        "stderr: {}",
        err
    );
    assert!(err.contains("nginx.conf:9"), "stderr: {}", err);
}

#[test]
fn unexpected_closing_brace() {
    let conf = conf_with("server { listen 127.0.0.1:PORT; }\n}");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(err.contains("unexpected \"}\" in "), "stderr: {}", err);
    assert!(err.contains("conf/nginx.conf:8"), "stderr: {}", err);
}

#[test]
fn unexpected_end_of_file() {
    let conf = "events { worker_connections 64; }\nhttp {\n  server { listen 127.0.0.1:PORT; }\n";
    let err = rejected(&[("conf/nginx.conf", conf)]);
    assert!(err.contains("unexpected end of file"), "stderr: {}", err);
    assert!(err.contains("expecting \"}\""), "stderr: {}", err);
    assert!(err.contains("conf/nginx.conf:"), "stderr: {}", err);
}

#[test]
fn missing_semicolon_reports_unexpected_end_or_brace() {
    let conf = conf_with("server {\n  listen 127.0.0.1:PORT\n}");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    // nginx: `unexpected "}" in ...:8` (the directive swallowed the newline)
    assert!(err.contains("unexpected \"}\""), "stderr: {}", err);
    assert!(err.contains("conf/nginx.conf:8"), "stderr: {}", err);
}

#[test]
fn include_of_missing_file() {
    let conf = conf_with("include conf.d/missing.conf;");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(err.contains("open() \""), "stderr: {}", err);
    assert!(err.contains("missing.conf"), "stderr: {}", err);
    assert!(err.contains("failed"), "stderr: {}", err);
    assert!(err.contains("conf/nginx.conf:6"), "stderr: {}", err);
}

#[test]
fn include_glob_matching_nothing_is_fine() {
    let conf = conf_with("include conf.d/*.conf;\nserver { listen 127.0.0.1:PORT; }");
    let (code, _, err) = test_conf(&[("conf/nginx.conf", &conf)]);
    assert_eq!(
        code, 0,
        "an empty glob is not an error in nginx\nstderr: {}",
        err
    );
}

#[test]
fn error_inside_included_file_names_that_file() {
    let conf = conf_with("include conf.d/*.conf;");
    let inc = "server {\n  listen 127.0.0.1:PORT;\n  bogus_directive on;\n}\n";
    let err = rejected(&[("conf/nginx.conf", &conf), ("conf/conf.d/site.conf", inc)]);
    assert!(
        err.contains("unknown directive \"bogus_directive\""),
        "stderr: {}",
        err
    );
    assert!(err.contains("conf.d/site.conf:3"), "stderr: {}", err);
}

#[test]
fn unknown_directive_at_main_level() {
    let conf = "events { worker_connections 64; }\nfoo bar;\nhttp { }\n";
    let err = rejected(&[("conf/nginx.conf", conf)]);
    assert!(err.contains("unknown directive \"foo\""), "stderr: {}", err);
    assert!(err.contains("conf/nginx.conf:2"), "stderr: {}", err);
}

#[test]
fn unknown_variable_is_rejected() {
    let conf =
        conf_with("server {\n  listen 127.0.0.1:PORT;\n  return 200 \"$no_such_var_xyz\";\n}");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(
        err.contains("unknown \"no_such_var_xyz\" variable"),
        "stderr: {}",
        err
    );
}

#[test]
fn invalid_return_code_is_rejected() {
    let conf = conf_with("server {\n  listen 127.0.0.1:PORT;\n  location / { return abc def; }\n}");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(
        err.contains("invalid return code \"abc\""),
        "stderr: {}",
        err
    );
    assert!(err.contains("conf/nginx.conf:8"), "stderr: {}", err);
}

#[test]
fn unknown_log_format_is_rejected() {
    let conf = conf_with("access_log logs/x.log nosuchformat;\nserver { listen 127.0.0.1:PORT; }");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(
        err.contains("unknown log format \"nosuchformat\""),
        "stderr: {}",
        err
    );
    assert!(err.contains("conf/nginx.conf:6"), "stderr: {}", err);
}

#[test]
fn invalid_regex_in_location_is_rejected() {
    let conf = conf_with(
        "server {\n  listen 127.0.0.1:PORT;\n  location ~ ^/(unclosed { return 200 x; }\n}",
    );
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(err.contains("conf/nginx.conf:8"), "stderr: {}", err);
}

#[test]
fn duplicate_location_is_rejected() {
    let conf = conf_with("server {\n  listen 127.0.0.1:PORT;\n  location /a { return 200 x; }\n  location /a { return 200 y; }\n}");
    let err = rejected(&[("conf/nginx.conf", &conf)]);
    assert!(err.contains("duplicate location \"/a\""), "stderr: {}", err);
    assert!(err.contains("conf/nginx.conf:9"), "stderr: {}", err);
}

#[test]
fn quoted_strings_and_escapes() {
    let conf = http_conf(
        "server { listen 127.0.0.1:PORT; location /q { return 200 'single \"dq\" $uri'; } location /e { return 200 \"a\\\"b\"; } location /sp { return 200 \"semi;colon {brace}\"; } }",
    );
    let s = Server::start(&conf);
    assert_eq!(s.get("/q").text(), "single \"dq\" /q");
    assert_eq!(s.get("/e").text(), "a\"b");
    assert_eq!(s.get("/sp").text(), "semi;colon {brace}");
}

#[test]
fn comments_are_ignored() {
    let conf = http_conf("# a comment { with braces ;\nserver { listen 127.0.0.1:PORT; # trailing\n location / { return 200 \"c#not-a-comment\"; } }");
    let s = Server::start(&conf);
    assert_eq!(s.get("/").text(), "c#not-a-comment");
}

#[test]
fn running_with_a_broken_config_exits_1() {
    let conf = conf_with("server { listen 127.0.0.1:PORT; nope; }");
    let dir = prefix_with(&[("conf/nginx.conf", &conf)], free_port());
    let mut child = Command::new(bin())
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg("conf/nginx.conf")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tidegate kept running with a broken config");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read");
    assert!(
        err.contains("unknown directive \"nope\""),
        "stderr: {}",
        err
    );
}

// ---------------------------------------------------------------- include, env, -g, ignored

#[test]
fn include_glob_servers_serve_requests() {
    let conf = http_conf("include conf.d/*.conf;");
    let a = "server { listen 127.0.0.1:PORT; server_name a.test; location / { return 200 \"site-a\"; } }\n";
    let b = "server { listen 127.0.0.1:PORT; server_name b.test; location / { return 200 \"site-b\"; } }\n";
    let s = Server::start_with(
        &conf,
        &[
            ("conf/conf.d/a.conf", a),
            ("conf/conf.d/b.conf", b),
            ("conf/conf.d/c.txt", "garbage {"),
        ],
    );
    let ra = s.request("GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    let rb = s.request("GET / HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n");
    assert_eq!((ra.status, ra.text().as_str()), (200, "site-a"));
    assert_eq!((rb.status, rb.text().as_str()), (200, "site-b"));
}

#[test]
fn include_mime_types_relative_to_conf_dir() {
    let conf = http_conf("include mime.types;\nserver { listen 127.0.0.1:PORT; root html; }");
    let mime = "types { text/x-special spc; }\n";
    let s = Server::start_with(&conf, &[("conf/mime.types", mime), ("html/a.spc", "x")]);
    let r = s.get("/a.spc");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/x-special"));
}

const ENV_CONF: &str =
    "server { listen 127.0.0.1:PORT; location / { return 200 \"v=${TG_TEST_VAR:-default}\"; } }";

#[test]
fn env_interpolation_uses_default_when_unset() {
    let s = start_env(&http_conf(ENV_CONF), &[], &[], &["TG_TEST_VAR"]);
    let r = s.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "v=default"));
}

#[test]
fn env_interpolation_uses_value_when_set() {
    let s = start_env(
        &http_conf(ENV_CONF),
        &[],
        &[("TG_TEST_VAR", "from-env")],
        &[],
    );
    let r = s.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "v=from-env"));
}

#[test]
fn g_global_directives_accepted() {
    let conf = "error_log logs/error.log info;\npid logs/nginx.pid;\nevents { worker_connections 64; }\nhttp { server { listen 127.0.0.1:PORT; location / { return 200 g_ok; } } }\n";
    let dir = prefix_with(&[("conf/nginx.conf", conf)], free_port());
    let (code, _, err) = run_cli(
        dir.path(),
        &["-c", "conf/nginx.conf", "-g", "worker_processes 2;", "-t"],
    );
    assert_eq!(code, 0, "stderr: {}", err);
    let s = start_args(conf, &["-g", "worker_processes 2;"]);
    let r = s.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "g_ok"));
}

#[test]
fn g_duplicate_of_config_directive_is_rejected() {
    // nginx: "worker_processes" directive is duplicate (the -g one and the file's one)
    let conf = conf_with("server { listen 127.0.0.1:PORT; }");
    let dir = prefix_with(&[("conf/nginx.conf", &conf)], free_port());
    let (code, _, err) = run_cli(
        dir.path(),
        &["-c", "conf/nginx.conf", "-g", "worker_processes 2;", "-t"],
    );
    assert_eq!(code, 1, "stderr: {}", err);
    assert!(
        err.contains("\"worker_processes\" directive is duplicate"),
        "stderr: {}",
        err
    );
}

#[test]
fn ignored_directives_load_and_leave_a_notice() {
    let conf = "daemon off;\nmaster_process on;\nload_module modules/x.so;\nworker_rlimit_nofile 1024;\nworker_processes 1;\nerror_log logs/error.log info;\npid logs/nginx.pid;\nevents { worker_connections 64; }\nhttp {\n  sendfile on;\n  server { listen 127.0.0.1:PORT; location / { return 200 ign; } }\n}\n";
    let (code, _, err) = test_conf(&[("conf/nginx.conf", conf)]);
    assert_eq!(code, 0, "stderr: {}", err);
    let s = Server::start(conf);
    let r = s.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "ign"));
    let log = s.error_log();
    for d in [
        "daemon",
        "master_process",
        "load_module",
        "worker_rlimit_nofile",
        "sendfile",
    ] {
        let hit = log
            .lines()
            .any(|l| l.contains("[notice]") && l.contains(&format!("\"{}\"", d)));
        assert!(hit, "no notice for {} in error.log:\n{}", d, log);
    }
}

// ---------------------------------------------------------------- -v, flags

#[test]
fn v_prints_version() {
    let out = Command::new(bin()).arg("-v").output().expect("run");
    assert_eq!(out.status.code(), Some(0));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("version"), "{}", all);
    assert!(all.chars().any(|c| c.is_ascii_digit()), "{}", all);
}

#[test]
fn invalid_flag_exits_1() {
    let out = Command::new(bin()).arg("-Z").output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid option"), "{}", err);
}

#[test]
fn flag_missing_value_exits_1() {
    let out = Command::new(bin()).arg("-c").output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires"), "{}", err);
}

#[test]
fn s_reload_without_running_instance_fails() {
    let conf = conf_with("server { listen 127.0.0.1:PORT; }");
    let dir = prefix_with(&[("conf/nginx.conf", &conf)], free_port());
    let (code, _, err) = run_cli(dir.path(), &["-c", "conf/nginx.conf", "-s", "reload"]);
    assert_eq!(code, 1, "stderr: {}", err);
    assert!(err.contains("nginx.pid"), "stderr: {}", err);
}

// ---------------------------------------------------------------- signals

#[test]
fn s_reload_switches_to_new_config() {
    let s = Server::start(&returning("one"));
    assert_eq!(s.get("/").text(), "one");
    rewrite_conf(&s, &returning("two"));
    reload(&s);
    assert!(
        wait_body(&s, "/", "two", Duration::from_secs(10)),
        "never saw \"two\"\n{}",
        s.error_log()
    );
    assert!(s.error_log().contains("SIGHUP"), "{}", s.error_log());
}

#[test]
fn reload_with_broken_config_keeps_old_one() {
    let s = Server::start(&returning("one"));
    assert_eq!(s.get("/").text(), "one");
    rewrite_conf(
        &s,
        &http_conf("server { listen 127.0.0.1:PORT; location / { return 200 \"two\"; } bogus; }"),
    );
    s.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !s.error_log().contains("[emerg]") {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = s.error_log();
    assert!(
        log.lines()
            .any(|l| l.contains("[emerg]") && l.contains("bogus")),
        "error.log:\n{}",
        log
    );
    let r = s.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "one"));
}

#[test]
fn reload_adds_a_new_listen_port() {
    let s = Server::start(&returning("one"));
    let port2 = free_port();
    let conf = http_conf(&format!(
        "server {{ listen 127.0.0.1:PORT; location / {{ return 200 \"one\"; }} }}\nserver {{ listen 127.0.0.1:{}; location / {{ return 200 \"second\"; }} }}",
        port2
    ));
    rewrite_conf(&s, &conf);
    reload(&s);
    let addr2 = std::net::SocketAddr::from(([127, 0, 0, 1], port2));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = None;
    while Instant::now() < deadline {
        if let Ok(r) = try_get(addr2, "/") {
            got = Some(r.text());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(got.as_deref(), Some("second"), "{}", s.error_log());
}

#[test]
fn s_quit_exits_0_and_removes_pid_file() {
    let mut s = Server::start(&returning("one"));
    let pid_file = s.path("logs/nginx.pid");
    let pid_text = std::fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(pid_text.trim().parse::<i32>().ok(), Some(s.pid()));
    let (code, _, err) = run_cli(s.prefix.path(), &["-c", "conf/nginx.conf", "-s", "quit"]);
    assert_eq!(code, 0, "stderr: {}", err);
    let st = s
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit after -s quit");
    assert_eq!(st.code(), Some(0));
    assert!(!exists(&pid_file), "pid file left behind");
}

#[test]
fn sigquit_exits_0_and_removes_pid_file() {
    let mut s = Server::start(&returning("one"));
    s.signal(libc::SIGQUIT);
    let st = s
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit after SIGQUIT");
    assert_eq!(st.code(), Some(0));
    assert!(!exists(&s.path("logs/nginx.pid")), "pid file left behind");
}

#[test]
fn sigquit_finishes_in_flight_request() {
    let conf = http_conf(
        "server { listen 127.0.0.1:PORT; location / { content_by_lua_block { ngx.sleep(0.5) ngx.say(\"finished\") } } }",
    );
    let mut s = Server::start(&conf);
    let addr = s.addr();
    let h = std::thread::spawn(move || try_get(addr, "/"));
    std::thread::sleep(Duration::from_millis(150));
    s.signal(libc::SIGQUIT);
    let r = h.join().expect("client thread");
    let r = r.expect("in-flight request was dropped by a graceful quit");
    assert_eq!((r.status, r.text().as_str()), (200, "finished\n"));
    assert!(
        s.wait_exit(Duration::from_secs(10)).is_some(),
        "did not exit"
    );
}

#[test]
fn sigterm_exits() {
    let mut s = Server::start(&returning("one"));
    s.signal(libc::SIGTERM);
    assert!(
        s.wait_exit(Duration::from_secs(10)).is_some(),
        "did not exit after SIGTERM"
    );
}

#[test]
fn s_stop_exits() {
    let mut s = Server::start(&returning("one"));
    let (code, _, err) = run_cli(s.prefix.path(), &["-c", "conf/nginx.conf", "-s", "stop"]);
    assert_eq!(code, 0, "stderr: {}", err);
    assert!(
        s.wait_exit(Duration::from_secs(10)).is_some(),
        "did not exit after -s stop"
    );
}

#[test]
fn s_reopen_reopens_access_log() {
    let s = Server::start(&returning("one"));
    s.get("/first");
    let log = s.path("logs/access.log");
    let rotated = s.path("logs/access.log.1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("/first")
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::rename(&log, &rotated).expect("rename");
    let (code, _, err) = run_cli(s.prefix.path(), &["-c", "conf/nginx.conf", "-s", "reopen"]);
    assert_eq!(code, 0, "stderr: {}", err);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ok = false;
    while Instant::now() < deadline {
        s.get("/second");
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("/second")
        {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        ok,
        "access.log not reopened; rotated has: {}",
        std::fs::read_to_string(&rotated).unwrap_or_default()
    );
}

// ---------------------------------------------------------------- reload under load

/// One client loop: alternates keep-alive requests and fresh connections until `stop`,
/// bounded by `max` requests. Returns (ok count, errors, idle keep-alive closes).
fn load_loop(
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max: usize,
    allowed: &[&str],
) -> (usize, Vec<String>, usize) {
    use std::sync::atomic::Ordering;
    let mut ok = 0;
    let mut errors = Vec::new();
    let mut idle_closes = 0;
    let mut ka: Option<TcpStream> = None;
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) && i < max {
        i += 1;
        let keepalive = i % 2 == 0;
        let res: Result<Response, String> = if keepalive {
            let reused = ka.is_some();
            if ka.is_none() {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(c) => {
                        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                        ka = Some(c);
                    }
                    Err(e) => {
                        errors.push(format!("keep-alive connect: {}", e));
                        continue;
                    }
                }
            }
            let c = ka.as_mut().expect("connection");
            let r = c
                .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .and_then(|_| read_response(c));
            match r {
                Ok(resp) => {
                    if resp
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                    {
                        ka = None;
                    }
                    Ok(resp)
                }
                Err(e) => {
                    ka = None;
                    // An idle keep-alive connection closed by the old generation before it
                    // read our request: every HTTP client retries that; nginx does the same.
                    if reused && e.to_string().contains("eof before headers: \"\"") {
                        idle_closes += 1;
                        continue;
                    }
                    Err(format!("keep-alive request (reused={}): {}", reused, e))
                }
            }
        } else {
            try_get(addr, "/").map_err(|e| format!("new connection: {}", e))
        };
        match res {
            Ok(r) if r.status == 200 && allowed.contains(&r.text().as_str()) => ok += 1,
            Ok(r) => errors.push(format!("unexpected response {} {:?}", r.status, r.text())),
            Err(e) => errors.push(e),
        }
    }
    (ok, errors, idle_closes)
}

#[test]
fn reload_under_load_drops_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let conf_n = |n: usize| {
        format!(
            "worker_processes 2;\nerror_log logs/error.log info;\npid logs/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  server {{ listen 127.0.0.1:PORT; location / {{ return 200 \"gen{}\"; }} }}\n}}\n",
            n
        )
    };
    let s = Server::start(&conf_n(0));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = s.addr();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let stop2 = stop.clone();
        clients.push(std::thread::spawn(move || {
            load_loop(addr, stop2, 20_000, &["gen0", "gen1", "gen2", "gen3"])
        }));
    }
    let started = Instant::now();
    for n in 1..=3 {
        std::thread::sleep(Duration::from_millis(700));
        rewrite_conf(&s, &conf_n(n));
        reload(&s);
    }
    assert!(
        wait_body(&s, "/", "gen3", Duration::from_secs(10)),
        "last generation never served\n{}",
        s.error_log()
    );
    while started.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut all_errors = Vec::new();
    let mut closes = 0;
    for c in clients {
        let (ok, errs, ic) = c.join().expect("client thread");
        total += ok;
        all_errors.extend(errs);
        closes += ic;
    }
    eprintln!(
        "reload under load: {} ok, {} errors, {} idle keep-alive closes",
        total,
        all_errors.len(),
        closes
    );
    assert!(total > 50, "too few requests completed: {}", total);
    assert!(
        all_errors.is_empty(),
        "{} errors out of {} (first: {:?})\nerror.log:\n{}",
        all_errors.len(),
        total,
        &all_errors[..all_errors.len().min(5)],
        s.error_log()
    );
    // at most one idle close per keep-alive connection per reload and worker
    assert!(closes <= 12, "{} idle keep-alive closes", closes);
}
