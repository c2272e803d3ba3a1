//! `ngx.worker.*` and `ngx.config.*`.

use mlua::{Lua, Table, Value};

use crate::lua::vm::VmOptions;

pub fn register(lua: &Lua, ngx: &Table, opts: &VmOptions) -> mlua::Result<()> {
    let worker = lua.create_table()?;
    let id = opts.worker_id;
    worker.set(
        "id",
        lua.create_function(move |_, ()| {
            Ok(id.map(|i| Value::Integer(i as i64)).unwrap_or(Value::Nil))
        })?,
    )?;
    let count = opts.worker_count.max(1) as i64;
    worker.set("count", lua.create_function(move |_, ()| Ok(count))?)?;
    worker.set(
        "pid",
        lua.create_function(|_, ()| Ok(std::process::id() as i64))?,
    )?;
    worker.set(
        "exiting",
        lua.create_function(|lua, ()| {
            Ok(crate::server::exiting() || crate::lua::api::timer::exiting(lua))
        })?,
    )?;
    ngx.set("worker", worker)?;

    let config = lua.create_table()?;
    let prefix = format!(
        "{}/",
        opts.prefix.display().to_string().trim_end_matches('/')
    );
    config.set(
        "prefix",
        lua.create_function(move |_, ()| Ok(prefix.clone()))?,
    )?;
    config.set("subsystem", "http")?;
    config.set("debug", false)?;
    config.set("ngx_lua_version", crate::NGX_LUA_VERSION)?;
    config.set("nginx_version", crate::NGINX_VERSION)?;
    config.set(
        "nginx_configure",
        lua.create_function(|_, ()| Ok(format!("tidegate {}", crate::VERSION)))?,
    )?;
    ngx.set("config", config)?;
    Ok(())
}
