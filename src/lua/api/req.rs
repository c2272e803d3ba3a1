//! `ngx.req.*`: the request line, arguments, headers and body as Lua sees them.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use mlua::{Lua, Table, Value};

use crate::http::request::{Exit, Phase, ReqBody};
use crate::lua::request::{check_phase, current};

/// `ngx.HTTP_*` method constants and their names.
pub const METHODS: &[(&str, i64)] = &[
    ("GET", 2),
    ("HEAD", 4),
    ("POST", 8),
    ("PUT", 16),
    ("DELETE", 32),
    ("MKCOL", 64),
    ("COPY", 128),
    ("MOVE", 256),
    ("OPTIONS", 512),
    ("PROPFIND", 1024),
    ("PROPPATCH", 2048),
    ("LOCK", 4096),
    ("UNLOCK", 8192),
    ("PATCH", 16384),
    ("TRACE", 32768),
];

fn arg_value(v: &Value) -> mlua::Result<Option<Vec<u8>>> {
    Ok(match v {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Integer(i) => Some(i.to_string().into_bytes()),
        Value::Number(n) => Some(super::output::format_number(*n).into_bytes()),
        _ => None,
    })
}

/// `get_uri_args`/`get_post_args` results: the table and `"truncated"` when `max` cut it short.
fn decode_args(lua: &Lua, args: &[u8], max: i64) -> mlua::Result<(Table, Option<String>)> {
    let (t, truncated) = super::string::decode_args(lua, args, max.max(0) as usize)?;
    Ok((t, truncated.then(|| "truncated".to_string())))
}

/// A Lua table as a query string (`ngx.encode_args`), for `set_uri_args` and `ngx.exec`.
pub fn encode_args(lua: &Lua, t: Table) -> mlua::Result<String> {
    Ok(super::string::encode_args(lua, t)?.to_str()?.to_string())
}

fn header_name(name: &str) -> mlua::Result<HeaderName> {
    HeaderName::from_bytes(name.replace('_', "-").as_bytes())
        .map_err(|_| mlua::Error::runtime(format!("invalid header name \"{}\"", name)))
}

const BODY_PHASES: &[Phase] = &[
    Phase::Rewrite,
    Phase::ServerRewrite,
    Phase::Access,
    Phase::Content,
];

/// `ngx.req.start_time()` without mlua's call protocol; no request goes to the ordinary one.
unsafe extern "C-unwind" fn start_time_fast(l: *mut mlua::ffi::lua_State) -> std::os::raw::c_int {
    match crate::lua::fast::request(l) {
        Some(rc) => {
            let t = rc.start_time;
            drop(rc);
            mlua::ffi::lua_pushnumber(l, t);
            1
        }
        None => crate::lua::fast::slow(l),
    }
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let req = lua.create_table()?;
    req.set(
        "get_method",
        lua.create_function(|lua, ()| {
            let rc = current(lua)?;
            let st = rc.st.borrow();
            Ok(st.method.as_str().to_string())
        })?,
    )?;
    req.set(
        "set_method",
        lua.create_function(|lua, m: i64| {
            let rc = current(lua)?;
            let name = METHODS
                .iter()
                .find(|(_, v)| *v == m)
                .map(|(n, _)| *n)
                .ok_or_else(|| mlua::Error::runtime(format!("unsupported HTTP method: {}", m)))?;
            rc.st.borrow_mut().method = Method::from_bytes(name.as_bytes())
                .map_err(|e| mlua::Error::runtime(e.to_string()))?;
            Ok(())
        })?,
    )?;
    req.set(
        "get_uri_args",
        lua.create_function(|lua, max: Option<i64>| {
            let rc = current(lua)?;
            let args = rc.st.borrow().args.clone().unwrap_or_default();
            decode_args(lua, args.as_bytes(), max.unwrap_or(100))
        })?,
    )?;
    req.set(
        "set_uri_args",
        lua.create_function(|lua, v: Value| {
            let rc = current(lua)?;
            let s = match v {
                Value::String(s) => s.to_str()?.to_string(),
                Value::Table(t) => encode_args(lua, t)?,
                Value::Integer(i) => i.to_string(),
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "bad argument #1 to 'set_uri_args' (string or table expected, got {})",
                        other.type_name()
                    )))
                }
            };
            rc.st.borrow_mut().args = Some(s);
            Ok(())
        })?,
    )?;
    req.set(
        "get_headers",
        lua.create_function(|lua, (max, raw): (Option<i64>, Option<bool>)| {
            let rc = current(lua)?;
            let headers = rc.st.borrow().headers.clone();
            super::header::headers_table(lua, &headers, max.unwrap_or(100), raw.unwrap_or(false))
        })?,
    )?;
    req.set(
        "set_header",
        lua.create_function(|lua, (name, value): (mlua::LuaString, Value)| {
            let rc = current(lua)?;
            let name = header_name(&name.to_str()?)?;
            let mut st = rc.st.borrow_mut();
            st.headers.remove(&name);
            let vals: Vec<Value> = match value {
                Value::Table(t) => t.sequence_values::<Value>().collect::<mlua::Result<_>>()?,
                v => vec![v],
            };
            for v in vals {
                if let Some(b) = arg_value(&v)? {
                    let hv = HeaderValue::from_bytes(&b)
                        .map_err(|_| mlua::Error::runtime("invalid header value"))?;
                    st.headers.append(name.clone(), hv);
                }
            }
            Ok(())
        })?,
    )?;
    req.set(
        "clear_header",
        lua.create_function(|lua, name: mlua::LuaString| {
            let rc = current(lua)?;
            let name = header_name(&name.to_str()?)?;
            rc.st.borrow_mut().headers.remove(&name);
            Ok(())
        })?,
    )?;
    req.set(
        "read_body",
        lua.create_async_function(|lua, ()| async move {
            check_phase(&lua, BODY_PHASES)?;
            let rc = current(&lua)?;
            if let Err(code) = crate::http::engine::read_body(&rc).await {
                // As in OpenResty, a failed read finalizes the request with the status.
                rc.st.borrow_mut().exit = Some(Exit::Status(code as i32));
                std::future::pending::<()>().await;
            }
            Ok(())
        })?,
    )?;
    req.set(
        "discard_body",
        lua.create_function(|lua, ()| {
            let rc = current(lua)?;
            crate::http::engine::discard_body(&rc);
            Ok(())
        })?,
    )?;
    req.set(
        "get_body_data",
        lua.create_function(|lua, ()| {
            let rc = current(lua)?;
            let body = match &rc.st.borrow().body {
                ReqBody::Read(b) if !b.is_empty() => Some(b.clone()),
                _ => None,
            };
            match body {
                Some(b) => Ok(Value::String(lua.create_string(&b)?)),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    // Bodies are kept in memory (bounded by client_max_body_size): there is never a file.
    req.set(
        "get_body_file",
        lua.create_function(|_, ()| Ok(Value::Nil))?,
    )?;
    req.set(
        "set_body_data",
        lua.create_function(|lua, data: mlua::LuaString| {
            let rc = current(lua)?;
            let b = Bytes::copy_from_slice(&data.as_bytes());
            let mut st = rc.st.borrow_mut();
            if let Ok(v) = HeaderValue::from_str(&b.len().to_string()) {
                st.headers.insert("content-length", v);
            }
            st.body = ReqBody::Read(b);
            Ok(())
        })?,
    )?;
    req.set(
        "get_post_args",
        lua.create_function(|lua, max: Option<i64>| {
            let rc = current(lua)?;
            // Copied out first: no borrow may be held while Lua values are made.
            let body = match &rc.st.borrow().body {
                ReqBody::Read(b) => ReqBodyView::Read(b.clone()),
                ReqBody::Unread(_) => ReqBodyView::Unread,
                ReqBody::Discarded => ReqBodyView::Discarded,
            };
            match body {
                ReqBodyView::Read(b) => {
                    let (t, e) = decode_args(lua, &b, max.unwrap_or(100))?;
                    let err = match e {
                        Some(e) => Value::String(lua.create_string(&e)?),
                        None => Value::Nil,
                    };
                    Ok((Value::Table(t), err))
                }
                ReqBodyView::Unread => Err(mlua::Error::runtime("request body not read")),
                ReqBodyView::Discarded => Ok((Value::Table(lua.create_table()?), Value::Nil)),
            }
        })?,
    )?;
    req.set(
        "http_version",
        lua.create_function(|lua, ()| {
            let rc = current(lua)?;
            let v = match rc.st.borrow().version {
                http::Version::HTTP_09 => 0.9,
                http::Version::HTTP_10 => 1.0,
                http::Version::HTTP_2 => 2.0,
                http::Version::HTTP_3 => 3.0,
                _ => 1.1,
            };
            Ok(v)
        })?,
    )?;
    req.set(
        "raw_header",
        lua.create_function(|lua, no_request_line: Option<bool>| {
            let rc = current(lua)?;
            let mut out = Vec::new();
            let st = rc.st.borrow();
            if !no_request_line.unwrap_or(false) {
                let v = match st.version {
                    http::Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                };
                out.extend_from_slice(
                    format!("{} {} {}\r\n", st.method, st.request_uri, v).as_bytes(),
                );
            }
            for (k, v) in st.headers.iter() {
                out.extend_from_slice(k.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(v.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            drop(st);
            lua.create_string(&out)
        })?,
    )?;
    let start_time = lua.create_function(|lua, ()| Ok(current(lua)?.start_time))?;
    req.set(
        "start_time",
        crate::lua::fast::closure(lua, start_time_fast, start_time)?,
    )?;
    req.set(
        "is_internal",
        lua.create_function(|lua, ()| Ok(current(lua)?.st.borrow().internal))?,
    )?;
    req.set(
        "set_uri",
        lua.create_async_function(
            |lua, (uri, jump): (mlua::LuaString, Option<bool>)| async move {
                let rc = current(&lua)?;
                let uri = uri.to_str()?.to_string();
                if uri.is_empty() {
                    return Err(mlua::Error::runtime("attempt to use zero-length uri"));
                }
                if jump.unwrap_or(false) {
                    let p = crate::lua::request::phase(&lua);
                    if p != Phase::Rewrite && p != Phase::ServerRewrite {
                        return Err(mlua::Error::runtime("API disabled in the current context"));
                    }
                    let args = rc.st.borrow().args.clone();
                    rc.st.borrow_mut().exit = Some(Exit::Exec(uri.clone(), args));
                    std::future::pending::<()>().await;
                }
                rc.st.borrow_mut().uri = uri;
                Ok(())
            },
        )?,
    )?;
    ngx.set("req", req)
}

/// The request body's state without the (non-clonable) unread stream.
enum ReqBodyView {
    Read(Bytes),
    Unread,
    Discarded,
}
