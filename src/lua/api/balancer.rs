//! `ngx.balancer` (lua-resty-core's module for balancer_by_lua*) and `ngx.upstream` (the
//! read side of lua-upstream-nginx-module, plus our health and breaker states), both bundled
//! as `require`-able modules. They only read and write the request's balancer slot and the
//! shared upstream state of src/proxy/upstream; the picker does the rest.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;

use mlua::{Lua, MultiValue, Table, Value};

use crate::http::request::Phase;
use crate::lua::request::{phase, try_current};
use crate::proxy::upstream::{now_ms, BalancerCall, LuaUpstreams};

/// Install both modules into `package.preload`.
pub fn preload(lua: &Lua) -> mlua::Result<()> {
    let preload: Table = lua.globals().get::<Table>("package")?.get("preload")?;
    preload.set(
        "ngx.balancer",
        lua.create_function(|lua, ()| balancer_module(lua))?,
    )?;
    preload.set(
        "ngx.upstream",
        lua.create_function(|lua, ()| upstream_module(lua))?,
    )?;
    Ok(())
}

/// Run `f` on the request's balancer slot; OpenResty's error text outside balancer_by_lua*.
fn with_call<R>(lua: &Lua, f: impl FnOnce(&mut BalancerCall) -> R) -> Result<R, &'static str> {
    let rc = try_current(lua).ok_or("no request found")?;
    if phase(lua) != Phase::Balancer {
        return Err("API disabled in the current context");
    }
    let mut st = rc.st.borrow_mut();
    let call = st.balancer.as_mut().ok_or("no upstream peer data found")?;
    Ok(f(call))
}

fn fail(lua: &Lua, msg: &str) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([
        Value::Nil,
        Value::String(lua.create_string(msg)?),
    ]))
}

fn balancer_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("version", "0.1.28")?;
    m.set(
        "set_current_peer",
        lua.create_function(
            |lua, (addr, port, host): (mlua::LuaString, Option<Value>, Option<String>)| {
                let addr = addr.to_str()?.to_string();
                let port: u16 = match port {
                    None | Some(Value::Nil) => 0,
                    Some(Value::Integer(p)) => u16::try_from(p).unwrap_or(0),
                    Some(Value::Number(p)) => p as u16,
                    Some(Value::String(s)) => s.to_str()?.parse().unwrap_or(0),
                    Some(_) => return Err(mlua::Error::runtime("bad port number")),
                };
                let parsed = parse_peer(&addr, port);
                let sa = match parsed {
                    Ok(sa) => sa,
                    Err(e) => return fail(lua, e),
                };
                match with_call(lua, |c| c.peer = Some((sa, host))) {
                    Ok(()) => Ok(MultiValue::from_iter([Value::Boolean(true)])),
                    Err(e) => fail(lua, e),
                }
            },
        )?,
    )?;
    m.set(
        "set_more_tries",
        lua.create_function(|lua, count: i64| {
            let count = count.max(0) as u32;
            let r = with_call(lua, |c| {
                let mut n = count;
                let mut warn = None;
                if let Some(left) = c.tries_left {
                    if n > left {
                        n = left;
                        warn = Some("reduced tries due to limit");
                    }
                }
                c.more_tries = Some(n);
                warn
            });
            match r {
                Ok(None) => Ok(MultiValue::from_iter([Value::Boolean(true)])),
                Ok(Some(w)) => Ok(MultiValue::from_iter([
                    Value::Boolean(true),
                    Value::String(lua.create_string(w)?),
                ])),
                Err(e) => fail(lua, e),
            }
        })?,
    )?;
    m.set(
        "get_last_failure",
        lua.create_function(|lua, ()| match with_call(lua, |c| c.last_failure) {
            Ok(Some((state, status))) => Ok(MultiValue::from_iter([
                Value::String(lua.create_string(state)?),
                Value::Integer(status as i64),
            ])),
            Ok(None) => Ok(MultiValue::from_iter([Value::Nil])),
            Err(e) => fail(lua, e),
        })?,
    )?;
    m.set(
        "set_timeouts",
        lua.create_function(|lua, (c, s, r): (Option<f64>, Option<f64>, Option<f64>)| {
            let ms = |v: Option<f64>, what: &str| -> mlua::Result<u64> {
                match v {
                    None => Ok(0),
                    Some(t) if t > 0.0 => Ok(((t * 1000.0).round() as u64).max(1)),
                    Some(_) => Err(mlua::Error::runtime(format!("bad {} timeout", what))),
                }
            };
            let t = (ms(c, "connect")?, ms(s, "send")?, ms(r, "read")?);
            match with_call(lua, |call| call.timeouts = Some(t)) {
                Ok(()) => Ok(MultiValue::from_iter([Value::Boolean(true)])),
                Err(e) => fail(lua, e),
            }
        })?,
    )?;
    // Every try builds its request afresh here, so there is nothing to recreate.
    m.set(
        "recreate_request",
        lua.create_function(|lua, ()| match with_call(lua, |_| ()) {
            Ok(()) => Ok(MultiValue::from_iter([Value::Boolean(true)])),
            Err(e) => fail(lua, e),
        })?,
    )?;
    Ok(m)
}

/// An IP literal (`1.2.3.4`, `::1`, `[::1]`), optionally with `:port` when `port` is 0.
/// Names are refused as OpenResty refuses them ("no host allowed").
fn parse_peer(addr: &str, port: u16) -> Result<SocketAddr, &'static str> {
    if let Ok(ip) = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        if port == 0 {
            return Err("no port");
        }
        return Ok(SocketAddr::new(ip, port));
    }
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok(if port != 0 {
            SocketAddr::new(sa.ip(), port)
        } else {
            sa
        });
    }
    Err("no host allowed")
}

/// The worker's upstreams; none outside a server (`tidegate resty`, `tidegate spec`).
fn upstreams(lua: &Lua) -> mlua::Result<std::sync::Arc<crate::proxy::upstream::UpstreamSet>> {
    Ok(lua
        .app_data_ref::<LuaUpstreams>()
        .map(|u| u.0.clone())
        .unwrap_or_default())
}

fn upstream_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("_VERSION", "0.07")?;
    m.set(
        "get_upstreams",
        lua.create_function(|lua, ()| lua.create_sequence_from(upstreams(lua)?.names()))?,
    )?;
    m.set(
        "get_servers",
        lua.create_function(|lua, name: String| {
            let Some(up) = upstreams(lua)?.get(&name).cloned() else {
                return fail(lua, "upstream not found");
            };
            let t = lua.create_table()?;
            for (i, s) in up.conf.servers.iter().enumerate() {
                let e = lua.create_table()?;
                e.set("addr", s.text.as_str())?;
                let addrs: Vec<String> = s.addrs.iter().map(|a| a.to_string()).collect();
                if addrs.len() == 1 {
                    e.set("addr", addrs[0].as_str())?;
                } else {
                    e.set("addr", lua.create_sequence_from(addrs)?)?;
                }
                e.set("name", s.text.as_str())?;
                e.set("weight", s.weight)?;
                e.set("max_fails", s.max_fails)?;
                e.set("fail_timeout", s.fail_timeout_ms as f64 / 1000.0)?;
                if s.backup {
                    e.set("backup", true)?;
                }
                if s.down {
                    e.set("down", true)?;
                }
                if s.max_conns > 0 {
                    e.set("max_conns", s.max_conns)?;
                }
                t.raw_set(i + 1, e)?;
            }
            Ok(MultiValue::from_iter([Value::Table(t)]))
        })?,
    )?;
    for (fname, backup) in [("get_primary_peers", false), ("get_backup_peers", true)] {
        m.set(
            fname,
            lua.create_function(move |lua, name: String| {
                let Some(up) = upstreams(lua)?.get(&name).cloned() else {
                    return fail(lua, "upstream not found");
                };
                let now = now_ms();
                let t = lua.create_table()?;
                let list = up.peer_status(now);
                for (id, p) in list.iter().filter(|p| p.backup == backup).enumerate() {
                    let e = lua.create_table()?;
                    e.set("id", id)?;
                    e.set("name", &*p.name)?;
                    e.set("server", &*p.server)?;
                    e.set("weight", p.weight)?;
                    e.set("conns", p.conns)?;
                    e.set("fails", p.fails)?;
                    e.set("max_fails", p.max_fails)?;
                    e.set("fail_timeout", p.fail_timeout_ms as f64 / 1000.0)?;
                    if p.down {
                        e.set("down", true)?;
                    }
                    e.set("healthy", p.healthy)?;
                    e.set("usable", p.usable)?;
                    e.set("requests", p.requests)?;
                    if let Some(b) = p.breaker {
                        e.set("breaker", b.name())?;
                    }
                    if let Some(ms) = p.ewma_ms {
                        e.set("ewma_ms", ms)?;
                    }
                    t.raw_set(id + 1, e)?;
                }
                Ok(MultiValue::from_iter([Value::Table(t)]))
            })?,
        )?;
    }
    m.set(
        "set_peer_down",
        lua.create_function(
            |lua, (name, backup, id, down): (String, bool, usize, bool)| {
                let Some(up) = upstreams(lua)?.get(&name).cloned() else {
                    return fail(lua, "upstream not found");
                };
                let group = if backup { &up.backup } else { &up.primary };
                match group.get(id) {
                    Some(p) => {
                        p.st.admin_down.store(down, Relaxed);
                        Ok(MultiValue::from_iter([Value::Boolean(true)]))
                    }
                    None => fail(lua, "bad peer id"),
                }
            },
        )?,
    )?;
    Ok(m)
}
