//! `ngx.shared.DICT` (stub).

use mlua::{Lua, Table};

use crate::shdict::Zones;

pub fn register(_lua: &Lua, _ngx: &Table, _zones: &Zones) -> mlua::Result<()> {
    Ok(())
}
