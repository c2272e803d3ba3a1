//! Small APIs with no family of their own: `ngx.get_phase`, `ngx.is_subrequest`.

use mlua::{Lua, Table};

use crate::lua::request::phase;

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    ngx.set(
        "get_phase",
        lua.create_function(|lua, ()| Ok(phase(lua).name()))?,
    )?;
    // `ngx.is_subrequest` is a per-request field: see ctx.rs (the `ngx` metatable).
    Ok(())
}
