//! `ngx.exit`, `ngx.exec`, `ngx.redirect`: each records how the phase ends and then never
//! returns (a pending future), so the phase runner drops the coroutine and a user's `pcall`
//! cannot swallow the exit.

use mlua::{Lua, Table, Value};

use crate::http::request::{Exit, Phase};
use crate::lua::request::{check_phase, current, phase};

async fn never() -> mlua::Result<()> {
    std::future::pending::<()>().await;
    Ok(())
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    ngx.set(
        "exit",
        lua.create_async_function(|lua, code: i64| async move {
            let p = phase(&lua);
            check_phase(
                &lua,
                &[
                    Phase::Rewrite,
                    Phase::ServerRewrite,
                    Phase::Access,
                    Phase::Content,
                    Phase::HeaderFilter,
                    Phase::Timer,
                    Phase::InitWorker,
                    Phase::Balancer,
                ],
            )?;
            if p == Phase::Timer || p == Phase::InitWorker {
                // Outside a request ngx.exit just ends the current handler (with its threads).
                if !crate::lua::api::thread::exit_detached(&lua) {
                    return Err(mlua::Error::runtime("ngx.exit"));
                }
                return never().await;
            }
            let rc = current(&lua)?;
            if p == Phase::HeaderFilter {
                // In header_filter only the status may change; the phase just ends.
                if code >= 200 {
                    rc.st.borrow_mut().status = code as u16;
                }
            }
            rc.st.borrow_mut().exit = Some(Exit::Status(code as i32));
            never().await
        })?,
    )?;
    ngx.set(
        "exec",
        lua.create_async_function(
            |lua, (uri, args): (mlua::LuaString, Option<Value>)| async move {
                check_phase(
                    &lua,
                    &[
                        Phase::Rewrite,
                        Phase::ServerRewrite,
                        Phase::Access,
                        Phase::Content,
                    ],
                )?;
                let rc = current(&lua)?;
                let uri = uri.to_str()?.to_string();
                if uri.is_empty() {
                    return Err(mlua::Error::runtime("uri is empty"));
                }
                let args = match args {
                    None | Some(Value::Nil) => None,
                    Some(Value::String(s)) => Some(s.to_str()?.to_string()),
                    Some(Value::Table(t)) => Some(super::req::encode_args(&lua, t)?),
                    Some(other) => {
                        return Err(mlua::Error::runtime(format!(
                            "bad argument #2 to 'exec' (string, number, or table expected, got {})",
                            other.type_name()
                        )))
                    }
                };
                if crate::http::engine::output_started(&rc.st.borrow()) {
                    return Err(mlua::Error::runtime(
                        "attempt to call ngx.exec after sending out response headers",
                    ));
                }
                let exit = if let Some(name) = uri.strip_prefix('@') {
                    Exit::Named(name.to_string())
                } else {
                    let (path, inline_args) = match uri.split_once('?') {
                        Some((p, a)) => (p.to_string(), Some(a.to_string())),
                        None => (uri.clone(), None),
                    };
                    Exit::Exec(path, args.or(inline_args))
                };
                rc.st.borrow_mut().exit = Some(exit);
                never().await
            },
        )?,
    )?;
    ngx.set(
        "redirect",
        lua.create_async_function(|lua, (uri, status): (mlua::LuaString, Option<i64>)| async move {
            check_phase(&lua, &[Phase::Rewrite, Phase::ServerRewrite, Phase::Access, Phase::Content])?;
            let rc = current(&lua)?;
            let status = status.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err(mlua::Error::runtime("only ngx.HTTP_MOVED_TEMPORARILY, ngx.HTTP_MOVED_PERMANENTLY, ngx.HTTP_PERMANENT_REDIRECT, ngx.HTTP_SEE_OTHER, and ngx.HTTP_TEMPORARY_REDIRECT are allowed"));
            }
            if crate::http::engine::output_started(&rc.st.borrow()) {
                return Err(mlua::Error::runtime("attempt to call ngx.redirect after sending out the headers"));
            }
            let v = http::HeaderValue::from_bytes(&uri.as_bytes()).map_err(|_| mlua::Error::runtime("invalid redirect uri"))?;
            {
                let mut st = rc.st.borrow_mut();
                st.resp_headers.insert("location", v);
                st.exit = Some(Exit::Status(status as i32));
            }
            never().await
        })?,
    )?;
    Ok(())
}
