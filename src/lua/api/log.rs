//! `ngx.log(level, ...)` and the global `print` (level NOTICE), written to the error log in
//! nginx's format with lua-nginx-module's `[lua] file:line: func(): ` prefix.

use mlua::{Lua, Table, Value};

use crate::log::{log, request_error, Level};
use crate::lua::request::try_current;

fn message(lua: &Lua, args: &[Value]) -> mlua::Result<String> {
    let mut out = Vec::new();
    for a in args {
        match a {
            Value::Table(_) => {
                // OpenResty rejects tables unless they have __tostring.
                let s: mlua::LuaString = lua
                    .globals()
                    .get::<mlua::Function>("tostring")?
                    .call(a.clone())?;
                out.extend_from_slice(&s.as_bytes());
            }
            Value::LightUserData(p) if p.0.is_null() => out.extend_from_slice(b"null"),
            v => super::output::render(&mut out, v, 0)?,
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `[lua] file:line: func(): ` for the Lua caller at `level` on the stack.
fn location(lua: &Lua) -> String {
    match lua.inspect_stack(1, |d| {
        let src = d.source();
        let short = src.short_src.as_deref().unwrap_or("?").to_string();
        let name = d
            .names()
            .name
            .map(|n| format!("{}(): ", n))
            .unwrap_or_default();
        format!(
            "[lua] {}:{}: {}",
            short,
            d.current_line().unwrap_or(0),
            name
        )
    }) {
        Some(s) => s,
        None => "[lua] ".to_string(),
    }
}

fn emit(lua: &Lua, level: Level, args: &[Value]) -> mlua::Result<()> {
    if !crate::log::enabled(level) {
        return Ok(());
    }
    let msg = format!("{}{}", location(lua), message(lua, args)?);
    match try_current(lua) {
        Some(rc) => request_error(&rc, level, &msg),
        None => log(level, None, &msg),
    }
    Ok(())
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    ngx.set(
        "log",
        lua.create_function(|lua, args: mlua::Variadic<Value>| {
            let level = match args.first() {
                Some(Value::Integer(i)) => Level::from_ngx(*i),
                Some(Value::Number(n)) => Level::from_ngx(*n as i64),
                _ => None,
            }
            .ok_or_else(|| mlua::Error::runtime("bad argument #1 to 'log' (bad log level)"))?;
            emit(lua, level, &args[1..])
        })?,
    )?;
    lua.globals().set(
        "print",
        lua.create_function(|lua, args: mlua::Variadic<Value>| emit(lua, Level::Notice, &args))?,
    )?;
    Ok(())
}
