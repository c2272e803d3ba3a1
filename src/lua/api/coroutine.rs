//! The user coroutine API (`coroutine.resume`, `coroutine.wrap`, `coroutine.status`) as
//! OpenResty has it: a user coroutine may call an `ngx` API that waits (`ngx.sleep`,
//! cosockets, semaphores) and the wait reaches the worker's event loop.
//!
//! Every async API yields mlua's "pending" marker ([`Lua::poll_pending`], a hidden mlua API:
//! mlua is pinned in Cargo.toml and `tests/lua_phases.rs::user_coroutines_may_wait` guards it)
//! up to the coroutine that `call_async` drives. A plain `coroutine.resume` would hand that
//! marker to the user's code as a yielded value and drop the wait. The wrappers here pass it
//! up instead, and resume the inner coroutine when they are resumed, so the wait completes
//! where it started; ordinary yields between user code (generators, wrap iterators) are
//! untouched.
//!
//! The chunk is named `=__mlua_async_poll` on purpose: when a handler's future is dropped
//! (`ngx.exit`, a killed light thread, a client gone) mlua resumes a coroutine parked in a
//! frame of that name with its terminate signal. Our frames then forward the signal to the
//! inner coroutine, so the wait parked there (a timer, a semaphore queue entry) is dropped at
//! once instead of at the next garbage collection.

use mlua::{Function, Lua, Table};

/// Lua side of the wrappers. Arguments: the pending marker, an async "yield to the event loop
/// once" function, and `thread_status(co)` (the light-thread state or nil). Returns the
/// replacement functions and the light-thread driver.
const WRAPPERS: &str = r#"
local PENDING, yield_now, thread_status = ...
local co_create, co_resume, co_yield, co_status =
    coroutine.create, coroutine.resume, coroutine.yield, coroutine.status
local select, error = select, error

local handle

local function after_wait(co, ...)
    if select('#', ...) ~= 0 then
        -- Our own coroutine is being dropped (mlua's terminate signal): pass it on so the
        -- wait inside `co` is dropped too, and never run user code again.
        co_resume(co, ...)
        while true do co_yield() end
    end
    return handle(co, co_resume(co))
end

handle = function(co, ok, ...)
    if ok and select('#', ...) == 1 and (...) == PENDING then
        -- `co` waits on the event loop: wait with it, then let it continue.
        return after_wait(co, co_yield(PENDING))
    end
    return ok, ...
end

local function resume(co, ...)
    return handle(co, co_resume(co, ...))
end

local function wrap_result(ok, ...)
    if ok then
        return ...
    end
    error((...), 0)
end

local function wrap(f)
    local co = co_create(f)
    return function(...)
        return wrap_result(resume(co, ...))
    end
end

local function status(co)
    local s = co_status(co)
    if s ~= "running" then
        local t = thread_status(co)
        if t then
            return t
        end
    end
    return s
end

-- A light thread: runs `co` to its end. A plain coroutine.yield inside it gives the CPU to
-- the other threads, as OpenResty's scheduler does, and the thread continues afterwards.
local function light_step(co, ...)
    if co_status(co) == "suspended" then
        yield_now()
        return light_step(co, resume(co))
    end
    return ...
end

local function run_light(co, ...)
    return light_step(co, resume(co, ...))
end

return resume, wrap, status, run_light
"#;

/// The light-thread driver, kept for `ngx.thread.spawn` and `ngx.on_abort`.
pub struct Driver(pub Function);

/// Replace `coroutine.resume/wrap/status` and keep the light-thread driver in app data.
pub fn register(lua: &Lua) -> mlua::Result<()> {
    let yield_now = lua.create_async_function(|_, ()| async move {
        tokio::task::yield_now().await;
        Ok(())
    })?;
    let thread_status = lua.create_function(|lua, co: mlua::Thread| {
        Ok(crate::lua::api::thread::light_status(lua, &co))
    })?;
    let (resume, wrap, status, run_light): (Function, Function, Function, Function) = lua
        .load(WRAPPERS)
        .set_name("=__mlua_async_poll")
        .call((Lua::poll_pending(), yield_now, thread_status))?;
    let coroutine: Table = lua.globals().get("coroutine")?;
    coroutine.set("resume", resume)?;
    coroutine.set("wrap", wrap)?;
    coroutine.set("status", status)?;
    lua.set_app_data(Driver(run_light));
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Guards the mlua internals the wrappers rely on (the pending marker and the terminate
    //! signal sent to frames of the `__mlua_async_poll` chunk): an mlua upgrade that changes
    //! them fails here.

    use std::cell::Cell;
    use std::future::Future;
    use std::rc::Rc;
    use std::task::Poll;

    use crate::lua::vm::{new_state, VmOptions};

    struct Flag(Rc<Cell<bool>>);

    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }

    fn run(code: &str) -> (bool, bool) {
        let lua = new_state(&VmOptions::standalone(".".into())).expect("state");
        let dropped = Rc::new(Cell::new(false));
        let d = dropped.clone();
        let wait = lua
            .create_async_function(move |_, ()| {
                let flag = Flag(d.clone());
                async move {
                    let _flag = flag;
                    std::future::pending::<()>().await;
                    Ok(())
                }
            })
            .expect("function");
        lua.globals().set("wait_forever", wait).expect("set");
        let f = lua.load(code).into_function().expect("chunk");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let pending = rt.block_on(async {
            let mut fut = Box::pin(f.call_async::<()>(()));
            let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
            first.is_pending()
        });
        (pending, dropped.get())
    }

    #[test]
    fn a_wait_in_a_user_coroutine_suspends_the_caller_and_is_dropped_with_it() {
        let (pending, dropped) = run("coroutine.wrap(function() wait_forever() end)()");
        assert!(pending, "the wait did not reach the caller");
        assert!(dropped, "the inner wait outlived the dropped caller");
    }

    #[test]
    fn nested_coroutines_pass_the_wait_and_the_drop() {
        let (pending, dropped) = run("local outer = coroutine.create(function()
                 local inner = coroutine.create(function() wait_forever() end)
                 coroutine.resume(inner)
             end)
             coroutine.resume(outer)");
        assert!(pending);
        assert!(dropped);
    }
}
