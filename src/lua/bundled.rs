//! Lua modules shipped inside the binary and installed in `package.preload` unless a user's
//! copy on the package path wins (the searcher order puts the path first).

use mlua::Lua;

/// Install the bundled modules into `package.preload`.
pub fn install(_lua: &Lua) -> mlua::Result<()> {
    Ok(())
}
