//! `ngx.sleep`: an async wait that yields the request's coroutine to the worker's event loop.

use std::time::Duration;

use mlua::{Lua, Table};

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let sleep = lua.create_async_function(|_, secs: f64| async move {
        if secs.is_nan() || secs < 0.0 || !secs.is_finite() {
            return Err(mlua::Error::runtime("invalid sleep duration"));
        }
        // tokio timers tick in whole milliseconds; 0 still yields once, as in OpenResty.
        if secs == 0.0 {
            tokio::task::yield_now().await;
        } else {
            // Beyond Duration's range it is a sleep forever (tokio caps far deadlines), never a panic.
            let d = Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX);
            tokio::time::sleep(d).await;
        }
        // nginx refreshes its clock on every event loop turn: ngx.now() moves after a sleep.
        crate::lua::api::time::update_cached_time();
        Ok(())
    })?;
    ngx.set("sleep", sleep)
}
