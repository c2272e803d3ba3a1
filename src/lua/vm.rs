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

/// mlua keeps private the value it resumes a dropped coroutine with (so that the future it
/// waits on is dropped at once, not at the next garbage collection). Learn it once: park a
/// probe in a frame of mlua's async wrapper chunk name, drop it and record what it receives.
/// `tests/lua_phases.rs` and the unit test below guard it.
fn terminate_signal(lua: &Lua) -> Option<mlua::LightUserData> {
    use std::future::Future;
    let seen = std::rc::Rc::new(std::cell::Cell::new(None));
    let s = seen.clone();
    let store = lua
        .create_function(move |_, v: mlua::Value| {
            if let mlua::Value::LightUserData(p) = v {
                s.set(Some(p));
            }
            Ok(())
        })
        .ok()?;
    let probe: mlua::Function = lua
        .load(
            "local pending, store = ...
             return function()
                 local sig = coroutine.yield(pending)
                 store(sig)
             end",
        )
        .set_name("=__mlua_async_poll")
        .call((Lua::poll_pending(), store))
        .ok()?;
    let mut fut = Box::pin(probe.call_async::<()>(()));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if fut.as_mut().poll(&mut cx).is_ready() {
        return None;
    }
    drop(fut);
    seen.get().filter(|p| *p != Lua::poll_pending())
}

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
    lua.set_app_data(std::rc::Rc::new(crate::lua::request::Current::default()));
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
    /// By chunk id (ids are dense: the index in the configuration's chunk list).
    cache: std::cell::RefCell<Vec<Option<Cached>>>,
    /// Handler coroutines that returned, for reuse by [`crate::lua::phase::run`].
    threads: std::cell::RefCell<Vec<mlua::Thread>>,
    /// mlua's signal that drops the wait of a coroutine parked in its async wrapper; `None`
    /// when it could not be learnt (an mlua change: `learns_the_terminate_signal` fails), and
    /// then such waits are dropped by the garbage collector.
    terminate: Option<mlua::LightUserData>,
    /// The state's current-request slot (also in its app data), without a lookup per run.
    pub current: std::rc::Rc<crate::lua::request::Current>,
}

impl LuaVm {
    /// Make a worker's state and install the current-request slot.
    pub fn new(opts: &VmOptions) -> mlua::Result<LuaVm> {
        let lua = new_state(opts)?;
        let terminate = terminate_signal(&lua);
        let current = crate::lua::request::Current::of(&lua)
            .ok_or_else(|| mlua::Error::runtime("Lua state without a request slot"))?;
        Ok(LuaVm {
            lua,
            cache: Default::default(),
            threads: Default::default(),
            terminate,
            current,
        })
    }

    /// The compiled function of a configuration chunk (compiled on first use).
    pub fn handler(&self, chunk: &crate::conf::model::LuaChunk) -> mlua::Result<mlua::Function> {
        if !chunk.reload {
            if let Some(Some(c)) = self.cache.borrow().get(chunk.id) {
                return Ok(c.f.clone());
            }
        }
        let f = self.compile(chunk)?;
        if !chunk.reload {
            let key = self.lua.create_registry_value(&f)?;
            let mut cache = self.cache.borrow_mut();
            if cache.len() <= chunk.id {
                cache.resize_with(chunk.id + 1, || None);
            }
            cache[chunk.id] = Some(Cached { f: f.clone(), key });
        }
        Ok(f)
    }

    /// A coroutine ready to run `chunk`: a returned one reset, or a new one (the caller must
    /// end it as `phase::Entry` does).
    pub fn thread(&self, chunk: &crate::conf::model::LuaChunk) -> mlua::Result<mlua::Thread> {
        let pooled = self.threads.borrow_mut().pop();
        let Some(t) = pooled else {
            return self.lua.create_thread(self.handler(chunk)?);
        };
        let cached = if chunk.reload {
            None
        } else {
            self.cache
                .borrow()
                .get(chunk.id)
                .and_then(|c| c.as_ref().map(|c| c.key.id()))
        };
        match cached {
            // SAFETY: pooled threads returned normally (status ok, no frames: mlua's
            // "finished"), which `Thread::reset` would also accept; this is its work (empty
            // the stack, push the function) without the checks and a handle clone. For a
            // thread `lua_topointer` is its `lua_State`.
            Some(id) => unsafe {
                let co = t.to_pointer() as *mut mlua::ffi::lua_State;
                mlua::ffi::lua_settop(co, 0);
                mlua::ffi::lua_rawgeti_(co, mlua::ffi::LUA_REGISTRYINDEX, id);
                Ok(t)
            },
            None => {
                t.reset(self.handler(chunk)?)?;
                Ok(t)
            }
        }
    }

    /// Give back a coroutine that returned normally.
    pub fn put_thread(&self, t: mlua::Thread) {
        let mut pool = self.threads.borrow_mut();
        if pool.len() < THREAD_POOL {
            pool.push(t);
        }
    }

    /// The signal to send a coroutine dropped while parked in mlua's async wrapper.
    pub fn terminate(&self) -> Option<mlua::LightUserData> {
        self.terminate
    }

    fn compile(&self, chunk: &crate::conf::model::LuaChunk) -> mlua::Result<mlua::Function> {
        use crate::conf::model::LuaSource;
        Ok(match &chunk.source {
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
        })
    }
}

/// A compiled chunk, also held in the registry so a pooled thread can be given it directly.
struct Cached {
    f: mlua::Function,
    key: mlua::RegistryKey,
}

#[cfg(test)]
mod tests {
    use super::{LuaVm, VmOptions};

    /// Pooled handler threads rely on learning mlua's private terminate signal; an mlua
    /// change that breaks the probe fails here instead of silently slowing every handler.
    #[test]
    fn learns_the_terminate_signal() {
        let vm = LuaVm::new(&VmOptions::standalone(".".into())).expect("state");
        let sig = vm.terminate().expect("terminate signal");
        assert_ne!(sig, mlua::Lua::poll_pending());
    }
}
