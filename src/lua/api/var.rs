//! ngx API family: var (stub).

use mlua::{Lua, Table};

pub fn register(_lua: &Lua, _ngx: &Table) -> mlua::Result<()> {
    Ok(())
}
