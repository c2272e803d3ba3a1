//! The per-request fields of the `ngx` table: `ngx.ctx`, `ngx.status`, `ngx.headers_sent`,
//! `ngx.is_subrequest`, and `ngx.arg` (set_by_lua arguments, body_filter chunk and eof). They
//! live behind a metatable because their value depends on the request of the running coroutine.

use std::os::raw::c_int;

use bytes::Bytes;
use mlua::{ffi, Lua, Table, Value};

use crate::http::request::{LuaArgs, Phase};
use crate::lua::request::{current, phase, try_current};

/// `ngx.ctx`: the request's table, made on first use; a timer's own outside requests.
fn request_ctx(lua: &Lua) -> mlua::Result<Value> {
    let Some(rc) = try_current(lua) else {
        // A timer has its own ngx.ctx, as OpenResty's fake request does.
        return super::thread::detached_ctx(lua, None);
    };
    table_in(
        lua,
        || {
            rc.st
                .borrow()
                .ctx_table
                .as_ref()
                .map(|k| lua.registry_value::<Value>(k))
        },
        |key| rc.st.borrow_mut().ctx_table = Some(key),
    )
}

/// A `ngx.ctx` table: the one `read` finds behind its registry key, or a new one whose key
/// goes to `store`. The new table is made after `read`'s borrow ended: no Lua allocation
/// under a borrow (a __gc finalizer may call ngx APIs).
pub fn table_in(
    lua: &Lua,
    read: impl FnOnce() -> Option<mlua::Result<Value>>,
    store: impl FnOnce(mlua::RegistryKey),
) -> mlua::Result<Value> {
    if let Some(v) = read() {
        return v;
    }
    let t = lua.create_table()?;
    store(lua.create_registry_value(&t)?);
    Ok(Value::Table(t))
}

/// `ngx.ctx` and `ngx.status` without mlua's argument conversion (a new ctx table is made by
/// a helper without arguments); everything else goes to the ordinary `__index`.
unsafe extern "C-unwind" fn index_fast(l: *mut ffi::lua_State) -> c_int {
    use crate::lua::fast;
    if !fast::args_are(l, &[None, Some(ffi::LUA_TSTRING)]) {
        return fast::slow(l);
    }
    enum Hit {
        Ctx(c_int),
        NewCtx,
        Status(u16),
    }
    let hit = (|| {
        let key = fast::str_at(l, 2);
        let rc = fast::request(l)?;
        let st = rc.st.try_borrow().ok()?;
        match key {
            b"ctx" => match st.ctx_table.as_ref().map(|k| k.id()) {
                Some(id) if id != ffi::LUA_REFNIL => Some(Hit::Ctx(id)),
                Some(_) => None,
                None => Some(Hit::NewCtx),
            },
            b"status" => Some(Hit::Status(st.status)),
            _ => None,
        }
    })();
    match hit {
        Some(Hit::Ctx(id)) => {
            ffi::lua_rawgeti_(l, ffi::LUA_REGISTRYINDEX, id);
        }
        Some(Hit::NewCtx) => fast::call_helper(l),
        Some(Hit::Status(s)) => ffi::lua_pushinteger(l, s as ffi::lua_Integer),
        None => return fast::slow(l),
    }
    1
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let mt = lua.create_table()?;
    let index = lua.create_function(|lua, (_t, key): (Table, Value)| {
        let Value::String(k) = key else {
            return Ok(Value::Nil);
        };
        match &*k.as_bytes() {
            b"ctx" => request_ctx(lua),
            b"status" => {
                let Some(rc) = try_current(lua) else {
                    return Ok(Value::Integer(0));
                };
                let st = rc.st.borrow();
                Ok(Value::Integer(st.status as i64))
            }
            b"is_subrequest" => Ok(Value::Boolean(
                try_current(lua).is_some_and(|rc| rc.is_subrequest()),
            )),
            b"headers_sent" => {
                let Some(rc) = try_current(lua) else {
                    return Ok(Value::Boolean(false));
                };
                let st = rc.st.borrow();
                // ngx.say/print send the header in OpenResty: buffered output counts as sent.
                Ok(Value::Boolean(crate::http::engine::output_started(&st)))
            }
            _ => Ok(Value::Nil),
        }
    })?;
    let new_ctx = lua.create_function(|lua, ()| request_ctx(lua))?;
    mt.set(
        "__index",
        crate::lua::fast::closure_with_fn(lua, index_fast, index, new_ctx)?,
    )?;
    mt.set(
        "__newindex",
        lua.create_function(|lua, (t, key, value): (Table, Value, Value)| {
            let is =
                |name: &str| matches!(&key, Value::String(s) if *s.as_bytes() == *name.as_bytes());
            if is("ctx") {
                let Value::Table(tbl) = value else {
                    return Err(mlua::Error::runtime(
                        "ctx should be a table while getting a ".to_string() + value.type_name(),
                    ));
                };
                let Some(rc) = try_current(lua) else {
                    return super::thread::detached_ctx(lua, Some(tbl)).map(|_| ());
                };
                rc.st.borrow_mut().ctx_table = Some(lua.create_registry_value(&tbl)?);
                return Ok(());
            }
            if is("status") {
                let rc = current(lua)?;
                let code = match value {
                    Value::Integer(i) => i,
                    Value::Number(n) => n as i64,
                    Value::String(s) => s
                        .to_str()?
                        .trim()
                        .parse()
                        .map_err(|_| mlua::Error::runtime("bad status"))?,
                    _ => {
                        return Err(mlua::Error::runtime(
                            "attempt to set ngx.status to a non-number",
                        ))
                    }
                };
                let mut st = rc.st.borrow_mut();
                if crate::http::engine::output_started(&st) && st.phase != Phase::HeaderFilter {
                    drop(st);
                    crate::log::request_error(
                        &rc,
                        crate::log::Level::Error,
                        "attempt to set ngx.status after sending out response headers",
                    );
                    return Ok(());
                }
                if !(100..=999).contains(&code) {
                    return Err(mlua::Error::runtime(format!(
                        "invalid HTTP status code {}",
                        code
                    )));
                }
                st.status = code as u16;
                return Ok(());
            }
            t.raw_set(key, value)
        })?,
    )?;
    ngx.set_metatable(Some(mt))?;

    let arg = lua.create_table()?;
    let amt = lua.create_table()?;
    amt.set(
        "__index",
        lua.create_function(|lua, (_t, idx): (Table, i64)| {
            let rc = current(lua)?;
            // Copy out (Bytes clones are cheap) before making Lua values: no borrow may be
            // held while a __gc finalizer could run.
            let (bytes, flag) = {
                let st = rc.st.borrow();
                match &st.arg {
                    LuaArgs::Set(v) if idx >= 1 => (v.get((idx - 1) as usize).cloned(), None),
                    LuaArgs::Body { chunk, .. } if idx == 1 => (Some(chunk.clone()), None),
                    LuaArgs::Body { eof, .. } if idx == 2 => (None, Some(*eof)),
                    _ => (None, None),
                }
            };
            match (bytes, flag) {
                (Some(b), _) => Ok(Value::String(lua.create_string(&b)?)),
                (None, Some(f)) => Ok(Value::Boolean(f)),
                _ => Ok(Value::Nil),
            }
        })?,
    )?;
    amt.set(
        "__newindex",
        lua.create_function(|lua, (_t, idx, value): (Table, i64, Value)| {
            if phase(lua) != Phase::BodyFilter {
                return Err(mlua::Error::runtime(
                    "attempt to write to ngx.arg outside body_filter_by_lua*",
                ));
            }
            let rc = current(lua)?;
            let mut st = rc.st.borrow_mut();
            if let LuaArgs::Body { chunk, eof } = &mut st.arg {
                match idx {
                    1 => {
                        *chunk = match value {
                            Value::Nil => Bytes::new(),
                            Value::String(s) => Bytes::copy_from_slice(&s.as_bytes()),
                            Value::Table(t) => {
                                let mut out = Vec::new();
                                super::output::render(&mut out, &Value::Table(t), 0)?;
                                Bytes::from(out)
                            }
                            Value::Integer(i) => Bytes::from(i.to_string()),
                            Value::Number(n) => Bytes::from(super::output::format_number(n)),
                            other => {
                                return Err(mlua::Error::runtime(format!(
                                    "bad chunk data type: {}",
                                    other.type_name()
                                )))
                            }
                        }
                    }
                    2 => *eof = value.as_boolean().unwrap_or(false),
                    _ => return Err(mlua::Error::runtime("bad index")),
                }
            }
            Ok(())
        })?,
    )?;
    arg.set_metatable(Some(amt))?;
    ngx.raw_set("arg", arg)?;
    Ok(())
}
