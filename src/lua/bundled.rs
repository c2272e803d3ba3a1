//! Lua modules shipped inside the binary and installed in `package.preload`. Searchers run
//! the preload table first, so a bundled module wins unless the user's code replaces the
//! `package.preload` entry; modules we do not bundle come from `lua_package_path` as usual.

use mlua::{Lua, Table};

/// Install the bundled modules into `package.preload`.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    let preload: Table = lua.globals().get::<Table>("package")?.get("preload")?;
    // Modern OpenResty preloads lua-resty-core; `require "resty.core"` must simply succeed.
    for name in ["resty.core", "resty.core.base"] {
        preload.set(name, lua.create_function(|lua, ()| lua.create_table())?)?;
    }
    crate::lua::api::re::preload(lua)?;
    crate::lua::api::semaphore::preload(lua)?;
    crate::lua::api::balancer::preload(lua)?;
    Ok(())
}
