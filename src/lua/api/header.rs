//! `ngx.header` (response headers: case-insensitive, `_` as `-`, multi-value tables) and
//! `ngx.resp.get_headers`.

use http::{HeaderName, HeaderValue};
use std::os::raw::c_int;

use mlua::{ffi, Lua, Table, Value};

use crate::http::request::Phase;
use crate::lua::request::{check_phase, current};

/// The header name a Lua key means: `content_type` -> `content-type`.
fn header_name(key: &str) -> mlua::Result<HeaderName> {
    let n = key.replace('_', "-");
    HeaderName::from_bytes(n.as_bytes())
        .map_err(|_| mlua::Error::runtime(format!("invalid header name \"{}\"", key)))
}

fn value_bytes(v: &Value) -> mlua::Result<Option<Vec<u8>>> {
    Ok(match v {
        Value::Nil => None,
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Integer(i) => Some(i.to_string().into_bytes()),
        Value::Number(n) => Some(super::output::format_number(*n).into_bytes()),
        Value::Boolean(b) => Some(if *b {
            b"true".to_vec()
        } else {
            b"false".to_vec()
        }),
        other => {
            return Err(mlua::Error::runtime(format!(
                "bad header value type \"{}\"",
                other.type_name()
            )))
        }
    })
}

/// Multi-valued headers OpenResty returns as a table even with one value are the ones set
/// from a table; we return a table whenever there is more than one value.
/// Values copied out of the request state first: making Lua values may run a `__gc`
/// finalizer that calls ngx APIs, so no borrow may be held meanwhile.
fn get_values(lua: &Lua, vals: Vec<Vec<u8>>) -> mlua::Result<Value> {
    match vals.len() {
        0 => Ok(Value::Nil),
        1 => Ok(Value::String(lua.create_string(&vals[0])?)),
        _ => {
            let t = lua.create_table()?;
            for v in vals {
                t.raw_push(lua.create_string(&v)?)?;
            }
            Ok(Value::Table(t))
        }
    }
}

const SET_PHASES: &[Phase] = &[
    Phase::Rewrite,
    Phase::ServerRewrite,
    Phase::Access,
    Phase::Content,
    Phase::HeaderFilter,
];

/// `ngx.header.NAME = "value"` without mlua's argument conversion when both are strings and
/// the write is allowed; anything else (tables, nil, numbers, bad names or values, a refused
/// phase, headers already sent) goes to the ordinary `__newindex`.
unsafe extern "C-unwind" fn newindex_fast(l: *mut ffi::lua_State) -> c_int {
    use crate::lua::fast;
    if !fast::args_are(l, &[None, Some(ffi::LUA_TSTRING), Some(ffi::LUA_TSTRING)]) {
        return fast::slow(l);
    }
    let done = (|| {
        // No UTF-8 check: a name that is not ASCII fails `HeaderName::from_bytes` below and
        // the ordinary function words the error.
        let key = fast::str_at(l, 2);
        let mut buf = [0u8; 64];
        let name = buf.get_mut(..key.len())?;
        for (d, s) in name.iter_mut().zip(key) {
            *d = if *s == b'_' { b'-' } else { *s };
        }
        let name = HeaderName::from_bytes(name).ok()?;
        let value = HeaderValue::from_bytes(fast::str_at(l, 3)).ok()?;
        let rc = fast::request(l)?;
        let mut st = rc.st.try_borrow_mut().ok()?;
        if !SET_PHASES.contains(&st.phase) || (st.headers_sent && st.phase != Phase::HeaderFilter) {
            return None;
        }
        // `insert` drops every earlier value of the name and keeps its place, as nginx and the
        // slow path do.
        st.resp_headers.insert(name, value);
        Some(())
    })();
    match done {
        Some(()) => 0,
        None => fast::slow(l),
    }
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let header = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|lua, (_t, key): (Table, mlua::LuaString)| {
            let rc = current(lua)?;
            let name = header_name(&key.to_str()?)?;
            let vals: Vec<Vec<u8>> = rc
                .st
                .borrow()
                .resp_headers
                .get_all(&name)
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect();
            get_values(lua, vals)
        })?,
    )?;
    let newindex =
        lua.create_function(|lua, (_t, key, value): (Table, mlua::LuaString, Value)| {
            check_phase(
                lua,
                &[
                    Phase::Rewrite,
                    Phase::ServerRewrite,
                    Phase::Access,
                    Phase::Content,
                    Phase::HeaderFilter,
                ],
            )?;
            let rc = current(lua)?;
            let key = key.to_str()?.to_string();
            let name = header_name(&key)?;
            let mut st = rc.st.borrow_mut();
            if st.headers_sent && st.phase != Phase::HeaderFilter {
                crate::log::request_error(
                    &rc,
                    crate::log::Level::Error,
                    "attempt to set ngx.header.HEADER after sending out response headers",
                );
                return Ok(());
            }
            let values: Vec<Vec<u8>> = match &value {
                Value::Table(t) => {
                    let mut vs = Vec::new();
                    for v in t.clone().sequence_values::<Value>() {
                        if let Some(b) = value_bytes(&v?)? {
                            vs.push(b);
                        }
                    }
                    vs
                }
                v => value_bytes(v)?.into_iter().collect(),
            };
            // A CR or LF would split the header: OpenResty escapes them; we reject them (all
            // checked before anything changes).
            let values = values
                .iter()
                .map(|v| HeaderValue::from_bytes(v))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    mlua::Error::runtime(format!("invalid value for header \"{}\"", key))
                })?;
            // As nginx: the first value takes the place of the header already there (so the
            // order of the others stays), the rest follow it; nil or {} removes the header.
            let mut values = values.into_iter();
            match values.next() {
                Some(first) => {
                    st.resp_headers.insert(name.clone(), first);
                }
                None => {
                    st.resp_headers.remove(&name);
                }
            }
            for v in values {
                st.resp_headers.append(name.clone(), v);
            }
            Ok(())
        })?;
    mt.set(
        "__newindex",
        crate::lua::fast::closure(lua, newindex_fast, newindex)?,
    )?;
    header.set_metatable(Some(mt))?;
    ngx.set("header", header)?;

    let resp = lua.create_table()?;
    resp.set(
        "get_headers",
        lua.create_function(|lua, (max, raw): (Option<i64>, Option<bool>)| {
            let rc = current(lua)?;
            let headers = rc.st.borrow().resp_headers.clone();
            headers_table(lua, &headers, max.unwrap_or(100), raw.unwrap_or(false))
        })?,
    )?;
    ngx.set("resp", resp)?;
    Ok(())
}

/// A headers table as `ngx.req.get_headers` / `ngx.resp.get_headers` return it: lower-case keys
/// (unless raw), repeated headers as arrays, and a metatable that finds `Foo_Bar` as `foo-bar`.
pub fn headers_table(
    lua: &Lua,
    headers: &http::HeaderMap,
    max: i64,
    raw: bool,
) -> mlua::Result<(Table, Option<String>)> {
    let t = lua.create_table()?;
    let mut truncated = None;
    for (count, (name, value)) in headers.iter().enumerate() {
        if max > 0 && count as i64 >= max {
            truncated = Some("truncated".to_string());
            break;
        }
        let k = name.as_str();
        let v = lua.create_string(value.as_bytes())?;
        match t.raw_get::<Value>(k)? {
            Value::Nil => t.raw_set(k, v)?,
            Value::Table(arr) => arr.raw_push(v)?,
            prev => {
                let arr = lua.create_table()?;
                arr.raw_push(prev)?;
                arr.raw_push(v)?;
                t.raw_set(k, arr)?;
            }
        }
    }
    if !raw {
        let mt = lua.create_table()?;
        mt.set(
            "__index",
            lua.create_function(|_, (t, k): (Table, mlua::LuaString)| {
                let norm = k.to_str()?.to_ascii_lowercase().replace('_', "-");
                t.raw_get::<Value>(norm)
            })?,
        )?;
        t.set_metatable(Some(mt))?;
    }
    Ok((t, truncated))
}
