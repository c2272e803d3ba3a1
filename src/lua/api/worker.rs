//! `ngx.worker.*` and `ngx.config.*` (stub).

use mlua::{Lua, Table};

use crate::lua::vm::VmOptions;

pub fn register(_lua: &Lua, _ngx: &Table, _opts: &VmOptions) -> mlua::Result<()> {
    Ok(())
}
