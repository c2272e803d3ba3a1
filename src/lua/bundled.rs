//! Lua modules shipped inside the binary.
//!
//! Two kinds: `package.preload` entries (`resty.core`, `ngx.re`) that always win, and the
//! bundled clients (`resty.redis`, `resty.http`) that are found by a searcher appended to
//! `package.loaders`, after the path searchers: a user's own copy of lua-resty-redis or
//! lua-resty-http on `lua_package_path` is loaded instead of ours, as the design promises.

use mlua::{Function, Lua, Table, Value};

/// Lua halves of the bundled clients; each chunk receives its natives table as argument.
const RESTY_REDIS: &str = include_str!("bundled/resty_redis.lua");
const RESTY_HTTP: &str = include_str!("bundled/resty_http.lua");

/// Install the bundled modules into `package.preload` and the bundled-client searcher.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    let package: Table = lua.globals().get("package")?;
    let preload: Table = package.get("preload")?;
    // Modern OpenResty preloads lua-resty-core; `require "resty.core"` must simply succeed.
    for name in ["resty.core", "resty.core.base"] {
        preload.set(name, lua.create_function(|lua, ()| lua.create_table())?)?;
    }
    crate::lua::api::re::preload(lua)?;
    crate::lua::api::semaphore::preload(lua)?;
    crate::lua::api::balancer::preload(lua)?;

    let searcher = lua.create_function(|lua, name: String| {
        let (src, chunk_name) = match name.as_str() {
            "resty.redis" => (RESTY_REDIS, "=[bundled resty.redis]"),
            "resty.http" => (RESTY_HTTP, "=[bundled resty.http]"),
            _ => {
                return Ok(Value::String(
                    lua.create_string(format!("\n\tno bundled module '{}'", name))?,
                ))
            }
        };
        let chunk: Function = lua.load(src).set_name(chunk_name).into_function()?;
        let natives = match name.as_str() {
            "resty.redis" => crate::lua::api::resty_redis::natives(lua)?,
            _ => crate::lua::api::resty_http::natives(lua)?,
        };
        let loader = lua
            .create_function(move |_, _: mlua::MultiValue| chunk.call::<Value>(natives.clone()))?;
        Ok(Value::Function(loader))
    })?;
    let loaders: Table = match package.get::<Option<Table>>("loaders")? {
        Some(t) => t,
        None => package.get("searchers")?,
    };
    loaders.raw_set(loaders.raw_len() + 1, searcher)?;
    Ok(())
}
