//! Small APIs with no family of their own: `ngx.get_phase`, `ngx.is_subrequest`.

use mlua::{Lua, Table};

use crate::lua::request::{phase, try_current};

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    ngx.set(
        "get_phase",
        lua.create_function(|lua, ()| Ok(phase(lua).name()))?,
    )?;
    ngx.set(
        "is_subrequest",
        lua.create_function(|lua, ()| Ok(try_current(lua).is_some_and(|_| false)))?,
    )?;
    Ok(())
}
