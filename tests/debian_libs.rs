//! Unmodified pure-Lua OpenResty libraries as Debian ships them, loaded from
//! /usr/share/lua/5.1 (on the default `package.path`, as with Debian's nginx + lua module):
//! `nginx.redis` (package lua-nginx-redis) over our cosockets against a real redis-server, and
//! `resty.lrucache` / `resty.lrucache.pureffi` (package lua-resty-lrucache, LuaJIT FFI).
//! scripts/test.sh installs the packages and redis-server; a test whose package is missing
//! says so loudly and is skipped.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, http_conf, Server};

fn start(http_extra: &str, locations: &str) -> Server {
    Server::start(&http_conf(&format!(
        "{http_extra}\n    server {{\n        listen 127.0.0.1:PORT;\n        server_name localhost;\n{locations}\n    }}\n"
    )))
}

fn have(file: &str, package: &str) -> bool {
    if Path::new(file).exists() {
        return true;
    }
    eprintln!(
        "\n!!!!! SKIPPED: {} missing (apt-get install {}; scripts/test.sh does) !!!!!\n",
        file, package
    );
    false
}

/// A redis-server of our own on a free port, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_server() -> Option<Redis> {
    let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let dir = tempfile::tempdir().ok()?;
    let port = free_port();
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(Redis {
                child,
                port,
                _dir: dir,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn nginx_redis_runs_on_cosockets() {
    if !have("/usr/share/lua/5.1/nginx/redis.lua", "lua-nginx-redis") {
        return;
    }
    let Some(redis) = redis_server() else {
        eprintln!("\n!!!!! SKIPPED: redis-server not installed or did not start !!!!!\n");
        return;
    };
    let s = start(
        "",
        &r#"
        location /t {
            content_by_lua_block {
                local redis = require "nginx.redis"
                local red = redis:new()
                red:set_timeout(2000)
                local ok, err = red:connect("127.0.0.1", REDIS)
                if not ok then ngx.say("connect: ", err) return end
                ngx.say("reused: ", red:get_reused_times())
                ngx.say("set: ", red:set("dog", "an animal"))
                ngx.say("get: ", red:get("dog"))
                ngx.say("missing: ", red:get("no-such-key") == ngx.null)
                red:init_pipeline()
                red:set("n", 1)
                red:incr("n")
                red:incrby("n", 40)
                red:get("n")
                local res, err = red:commit_pipeline()
                ngx.say("pipeline: ", table.concat(res, ","))
                local lr = red:lrange("nolist", 0, -1)
                ngx.say("empty list: ", type(lr), " ", #lr)
                local res, err = red:hgetall("nohash")
                ngx.say("bad cmd: ", select(2, red:incr("dog")))
                ngx.say("keepalive: ", red:set_keepalive(10000, 10))
            }
        }
        location /reuse {
            content_by_lua_block {
                local red = require("nginx.redis"):new()
                assert(red:connect("127.0.0.1", REDIS))
                local n = red:get_reused_times()
                ngx.say("reused>0: ", n > 0, " ", red:get("n"))
                red:set_keepalive(10000, 10)
            }
        }
        "#
        .replace("REDIS", &redis.port.to_string()),
    );
    let r = s.get("/t");
    assert_eq!(
        r.text(),
        "reused: 0\nset: OK\nget: an animal\nmissing: true\npipeline: OK,2,42,42\n\
         empty list: table 0\nbad cmd: ERR value is not an integer or out of range\nkeepalive: 1\n",
        "{}",
        s.error_log()
    );
    assert_eq!(s.get("/reuse").text(), "reused>0: true 42\n");
    assert_eq!(s.get("/reuse").text(), "reused>0: true 42\n");
}

#[test]
fn lrucache_and_pureffi_load_and_work() {
    if !have(
        "/usr/share/lua/5.1/resty/lrucache.lua",
        "lua-resty-lrucache",
    ) {
        return;
    }
    let s = start(
        "lua_package_path '/nonexistent/?.lua;;';",
        r#"
        location /t {
            content_by_lua_block {
                for _, name in ipairs({"resty.lrucache", "resty.lrucache.pureffi"}) do
                    local lrucache = require(name)
                    local c = assert(lrucache.new(2))
                    c:set("a", 1)
                    c:set("b", {x = 2})
                    local out = {name, c:get("a"), c:get("b").x}
                    c:set("c", 3)                 -- evicts a, the least recently used
                    out[#out + 1] = tostring(c:get("a"))
                    c:delete("b")
                    out[#out + 1] = tostring(c:get("b"))
                    c:set("t", "v", 0.05)
                    ngx.sleep(0.1)
                    local v, stale = c:get("t")
                    out[#out + 1] = tostring(v) .. "/" .. tostring(stale)
                    ngx.say(table.concat(out, " "))
                end
            }
        }
        "#,
    );
    let r = s.get("/t");
    assert_eq!(
        r.text(),
        "resty.lrucache 1 2 nil nil nil/v\nresty.lrucache.pureffi 1 2 nil nil nil/v\n",
        "{}",
        s.error_log()
    );
}
