//! Creation of a worker's Lua state: LuaJIT with `ffi`, the `ngx` table with every API family,
//! `package.path` from `lua_package_path`, and the bundled modules.

use std::path::PathBuf;

use mlua::{Lua, LuaOptions, StdLib, Table};

use crate::shdict::Zones;

/// What a Lua state needs to know about the process and the configuration.
#[derive(Clone, Debug, Default)]
pub struct VmOptions {
    /// nginx's `-p` prefix (`ngx.config.prefix()`), always ending without a slash.
    pub prefix: PathBuf,
    /// `lua_package_path` as written (`;;` stands for the default path).
    pub package_path: Option<String>,
    /// `lua_package_cpath` as written.
    pub package_cpath: Option<String>,
    pub zones: Zones,
    /// `ngx.worker.id()`; `None` outside a worker (init phase, `tidegate spec`, `tidegate resty`).
    pub worker_id: Option<usize>,
    pub worker_count: usize,
}

impl VmOptions {
    /// Options for a state that runs outside any server (`tidegate spec`, `tidegate resty`).
    pub fn standalone(prefix: PathBuf) -> Self {
        VmOptions {
            prefix,
            worker_count: 1,
            ..Default::default()
        }
    }
}

/// Finished handler coroutines kept for reuse per VM (one per concurrent request is enough).
const THREAD_POOL: usize = 256;

/// Build a fresh Lua state with the whole `ngx` API installed as global `ngx`.
pub fn new_state(opts: &VmOptions) -> mlua::Result<Lua> {
    // SAFETY: FFI is part of the OpenResty contract (lua-resty-core and many libraries use it);
    // the user's Lua code is trusted exactly as it is in OpenResty.
    let lua = unsafe {
        Lua::unsafe_new_with(
            StdLib::ALL_SAFE | StdLib::FFI | StdLib::DEBUG,
            // Every handler runs as a coroutine (`call_async`): without a pool mlua makes a new
            // Lua thread per call, and its allocation and collection were ~8% of the
            // instructions of a `content_by_lua` request. Only threads that returned are
            // reused (a thread left yielded by `ngx.exit` is never recycled on LuaJIT).
            LuaOptions::new().thread_pool_size(THREAD_POOL),
        )
    };
    // The current-request slot: the phase runners install requests and phases into it.
    lua.set_app_data(crate::lua::request::Current::default());
    let ngx = lua.create_table()?;
    lua.globals().set("ngx", &ngx)?;
    register_all(&lua, &ngx, opts)?;
    set_package_paths(&lua, opts)?;
    crate::lua::bundled::install(&lua)?;
    Ok(lua)
}

fn register_all(lua: &Lua, ngx: &Table, opts: &VmOptions) -> mlua::Result<()> {
    use crate::lua::api::*;
    consts::register(lua, ngx)?;
    log::register(lua, ngx)?;
    sleep::register(lua, ngx)?;
    socket_tcp::register(lua, ngx)?;
    socket_udp::register(lua, ngx)?;
    time::register(lua, ngx)?;
    string::register(lua, ngx)?;
    re::register(lua, ngx)?;
    cjson::register(lua, ngx)?;
    shdict::register(lua, ngx, &opts.zones)?;
    worker::register(lua, ngx, opts)?;
    misc::register(lua, ngx)?;
    var::register(lua, ngx)?;
    req::register(lua, ngx)?;
    header::register(lua, ngx)?;
    output::register(lua, ngx)?;
    exit::register(lua, ngx)?;
    location::register(lua, ngx)?;
    ctx::register(lua, ngx)?;
    // timers, light threads, user coroutines
    coroutine::register(lua)?;
    thread::register(lua, ngx)?;
    timer::register(lua, ngx)?;
    Ok(())
}

/// The default search path: the prefix's `lua/` folder, then the usual system folders where
/// Debian installs pure-Lua OpenResty libraries.
fn default_path(prefix: &std::path::Path) -> String {
    let p = prefix.display();
    format!(
        "{p}/lua/?.lua;{p}/lua/?/init.lua;./?.lua;/usr/local/share/lua/5.1/?.lua;/usr/local/share/lua/5.1/?/init.lua;/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua"
    )
}

fn default_cpath() -> String {
    "./?.so;/usr/local/lib/lua/5.1/?.so;/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;/usr/lib/lua/5.1/?.so".to_string()
}

fn set_package_paths(lua: &Lua, opts: &VmOptions) -> mlua::Result<()> {
    let package: Table = lua.globals().get("package")?;
    // `$prefix` / `${prefix}` in the paths mean the server prefix, as in lua-nginx-module.
    let prefix = opts.prefix.display().to_string();
    let expand = |p: &str| p.replace("${prefix}", &prefix).replace("$prefix", &prefix);
    let opts = &VmOptions {
        package_path: opts.package_path.as_deref().map(expand),
        package_cpath: opts.package_cpath.as_deref().map(expand),
        ..opts.clone()
    };
    let path = match &opts.package_path {
        Some(p) => p.replace(";;", &format!(";{};", default_path(&opts.prefix))),
        None => default_path(&opts.prefix),
    };
    let cpath = match &opts.package_cpath {
        Some(p) => p.replace(";;", &format!(";{};", default_cpath())),
        None => default_cpath(),
    };
    package.set("path", path)?;
    package.set("cpath", cpath)?;
    Ok(())
}

/// A worker's Lua state with its code cache (`lua_code_cache on`: each chunk compiled once).
pub struct LuaVm {
    pub lua: Lua,
    cache: std::cell::RefCell<std::collections::HashMap<usize, mlua::Function>>,
}

impl LuaVm {
    /// Make a worker's state and install the current-request slot.
    pub fn new(opts: &VmOptions) -> mlua::Result<LuaVm> {
        let lua = new_state(opts)?;
        Ok(LuaVm {
            lua,
            cache: Default::default(),
        })
    }

    /// The compiled function of a configuration chunk (compiled on first use).
    pub fn handler(&self, chunk: &crate::conf::model::LuaChunk) -> mlua::Result<mlua::Function> {
        use crate::conf::model::LuaSource;
        if !chunk.reload {
            if let Some(f) = self.cache.borrow().get(&chunk.id) {
                return Ok(f.clone());
            }
        }
        let f = match &chunk.source {
            LuaSource::Inline(src) => self
                .lua
                .load(src.as_str())
                .set_name(&chunk.name)
                .into_function()?,
            LuaSource::File(path) => {
                let src = std::fs::read(path).map_err(|e| {
                    mlua::Error::runtime(format!(
                        "failed to load external Lua file \"{}\": cannot open {}: {}",
                        path.display(),
                        path.display(),
                        e
                    ))
                })?;
                self.lua
                    .load(src)
                    .set_name(format!("@{}", path.display()))
                    .into_function()?
            }
        };
        if !chunk.reload {
            self.cache.borrow_mut().insert(chunk.id, f.clone());
        }
        Ok(f)
    }
}
