//! Which request a running Lua call belongs to. Requests interleave on one worker at every
//! yield, so the phase runner installs the request around each poll of its coroutine (see
//! [`crate::lua::phase`]); API functions read it here, never from a global "current request".

use std::cell::RefCell;
use std::rc::Rc;

use mlua::Lua;

use crate::http::request::{Phase, ReqCtx};

/// App data slot holding the request of the coroutine being polled right now. It sits in app
/// data as `Rc<Current>` (set once in [`crate::lua::vm::new_state`], never replaced): phase
/// runners keep a clone instead of looking it up on every poll, and the raw C entry points of
/// [`crate::lua::fast`] reach it through a pointer upvalue (app data outlives `lua_close`).
#[derive(Default)]
pub struct Current {
    pub req: RefCell<Option<Rc<ReqCtx>>>,
    /// The phase of a call that has no request (init, init_worker, timer).
    pub phase: RefCell<Option<Phase>>,
    /// The light threads of the running handler (made on the first `ngx.thread.spawn`).
    pub sched: RefCell<Option<Rc<crate::lua::api::thread::Sched>>>,
    /// A phase runner is polling (so `ngx.thread.spawn` may make the scheduler).
    pub runner: std::cell::Cell<bool>,
}

impl Current {
    /// The state's slot (one app-data lookup).
    pub fn of(lua: &Lua) -> Option<Rc<Current>> {
        lua.app_data_ref::<Rc<Current>>().map(|c| Rc::clone(&c))
    }
}

/// The current request, or OpenResty's error for APIs that need one.
pub fn current(lua: &Lua) -> mlua::Result<Rc<ReqCtx>> {
    try_current(lua).ok_or_else(|| mlua::Error::runtime("no request found"))
}

/// The current request when there is one.
pub fn try_current(lua: &Lua) -> Option<Rc<ReqCtx>> {
    lua.app_data_ref::<Rc<Current>>()
        .and_then(|c| c.req.borrow().clone())
}

/// The phase the running Lua code is in.
pub fn phase(lua: &Lua) -> Phase {
    if let Some(r) = try_current(lua) {
        return r.st.borrow().phase;
    }
    lua.app_data_ref::<Rc<Current>>()
        .and_then(|c| *c.phase.borrow())
        .unwrap_or(Phase::Timer)
}

/// Every phase a handler runs in, init aside: where waiting APIs (timers, light threads,
/// semaphores) are allowed here, beyond OpenResty's list.
pub const YIELDING_PHASES: &[Phase] = &[
    Phase::InitWorker,
    Phase::Set,
    Phase::Rewrite,
    Phase::ServerRewrite,
    Phase::Access,
    Phase::Content,
    Phase::HeaderFilter,
    Phase::BodyFilter,
    Phase::Log,
    Phase::Balancer,
    Phase::Timer,
];

/// OpenResty's refusal for an API used in a phase that does not allow it.
pub fn check_phase(lua: &Lua, allowed: &[Phase]) -> mlua::Result<()> {
    let p = phase(lua);
    if allowed.contains(&p) {
        Ok(())
    } else {
        Err(mlua::Error::runtime(format!(
            "API disabled in the context of {}",
            context_name(p)
        )))
    }
}

/// The context name OpenResty's messages use, e.g. `header_filter_by_lua*`.
pub fn context_name(p: Phase) -> &'static str {
    match p {
        Phase::Init => "init_by_lua*",
        Phase::InitWorker => "init_worker_by_lua*",
        Phase::Set => "set_by_lua*",
        Phase::Rewrite | Phase::ServerRewrite => "rewrite_by_lua*",
        Phase::Access => "access_by_lua*",
        Phase::Content => "content_by_lua*",
        Phase::HeaderFilter => "header_filter_by_lua*",
        Phase::BodyFilter => "body_filter_by_lua*",
        Phase::Log => "log_by_lua*",
        Phase::Timer => "ngx.timer",
        Phase::Balancer => "balancer_by_lua*",
    }
}
