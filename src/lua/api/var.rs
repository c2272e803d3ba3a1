//! `ngx.var`: read any nginx variable, write those declared with `set` (and `$args`, `$uri`
//! is read-only as in nginx; `$args` and `$limit_rate`-style writable built-ins are handled).

use std::borrow::Cow;
use std::os::raw::c_int;

use bytes::Bytes;
use mlua::{ffi, Lua, Table, Value};

use crate::lua::request::current;

/// `ngx.var.NAME` for a string name, without mlua's argument conversion; integer keys
/// (captures) and every refusal go to the ordinary `__index`.
unsafe extern "C-unwind" fn index_fast(l: *mut ffi::lua_State) -> c_int {
    use crate::lua::fast;
    if !fast::args_are(l, &[None, Some(ffi::LUA_TSTRING)]) {
        return fast::slow(l);
    }
    let value = (|| {
        let key = std::str::from_utf8(fast::str_at(l, 2)).ok()?;
        let rc = fast::request(l)?;
        let name: Cow<str> = if key.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(key.to_ascii_lowercase())
        } else {
            Cow::Borrowed(key)
        };
        let st = rc.st.try_borrow().ok()?;
        Some(crate::http::variables::get(&rc, &st, &name))
    })();
    match value {
        // The borrow is over: making the string may run finalizers.
        Some(Some(v)) => fast::push_bytes(l, &v),
        Some(None) => ffi::lua_pushnil(l),
        None => return fast::slow(l),
    }
    1
}

/// `ngx.var.NAME = "value"` for a variable declared with `set`, without mlua's argument
/// conversion; other values, names and every refusal go to the ordinary `__newindex`.
unsafe extern "C-unwind" fn newindex_fast(l: *mut ffi::lua_State) -> c_int {
    use crate::lua::fast;
    if !fast::args_are(l, &[None, Some(ffi::LUA_TSTRING), Some(ffi::LUA_TSTRING)]) {
        return fast::slow(l);
    }
    let done = (|| {
        let key = std::str::from_utf8(fast::str_at(l, 2)).ok()?;
        let rc = fast::request(l)?;
        let name = key.to_ascii_lowercase();
        if matches!(name.as_str(), "args" | "query_string" | "status")
            || !rc.env.declared.contains(&name)
        {
            return None;
        }
        let value = Bytes::copy_from_slice(fast::str_at(l, 3));
        rc.st.try_borrow_mut().ok()?.vars.insert(name, value);
        Some(())
    })();
    match done {
        Some(()) => 0,
        None => fast::slow(l),
    }
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let var = lua.create_table()?;
    let mt = lua.create_table()?;
    let index = lua.create_function(|lua, (_t, key): (Table, Value)| {
        let rc = current(lua)?;
        let name = match &key {
            Value::String(s) => s.to_str()?.to_ascii_lowercase(),
            Value::Integer(i) => {
                let cap = rc
                    .st
                    .borrow()
                    .captures
                    .get((*i).max(0) as usize)
                    .cloned()
                    .flatten();
                return match cap {
                    Some(c) => Ok(Value::String(lua.create_string(&c)?)),
                    None => Ok(Value::Nil),
                };
            }
            _ => return Err(mlua::Error::runtime("bad variable name")),
        };
        let v = crate::http::variables::get(&rc, &rc.st.borrow(), &name);
        match v {
            Some(v) => Ok(Value::String(lua.create_string(&v)?)),
            None => Ok(Value::Nil),
        }
    })?;
    mt.set(
        "__index",
        crate::lua::fast::closure(lua, index_fast, index)?,
    )?;
    let newindex =
        lua.create_function(|lua, (_t, key, value): (Table, mlua::LuaString, Value)| {
            let rc = current(lua)?;
            let name = key.to_str()?.to_ascii_lowercase();
            let v: Option<Bytes> = match value {
                Value::Nil => None,
                Value::String(s) => Some(Bytes::copy_from_slice(&s.as_bytes())),
                Value::Integer(i) => Some(Bytes::from(i.to_string())),
                Value::Number(n) => Some(Bytes::from(super::output::format_number(n))),
                other => return Err(mlua::Error::runtime(format!("bad variable value type \"{}\"", other.type_name()))),
            };
            let mut st = rc.st.borrow_mut();
            match name.as_str() {
                "args" | "query_string" => {
                    st.args = v.map(|b| String::from_utf8_lossy(&b).into_owned());
                    return Ok(());
                }
                "status" => return Err(mlua::Error::runtime("variable \"status\" not changeable")),
                _ => {}
            }
            if !rc.env.declared.contains(&name) {
                if crate::http::variables::is_builtin(&name) || crate::http::variables::get(&rc, &st, &name).is_some() {
                    return Err(mlua::Error::runtime(format!("variable \"{}\" not changeable", name)));
                }
                return Err(mlua::Error::runtime(format!("variable \"{}\" not found for writing; maybe it is a built-in variable that is not changeable or you forgot to use \"set ${} '';\" in the config file to define it first", name, name)));
            }
            st.vars.insert(name, v.unwrap_or_default());
            Ok(())
        })?;
    mt.set(
        "__newindex",
        crate::lua::fast::closure(lua, newindex_fast, newindex)?,
    )?;
    var.set_metatable(Some(mt))?;
    ngx.set("var", var)
}
