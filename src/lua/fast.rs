//! Raw C entry points for the hottest `ngx` calls (`ngx.say`, `ngx.var.x`, `ngx.ctx`, ...).
//!
//! An mlua callback converts every argument into a `Value` (a slot in mlua's reference thread,
//! freed again on drop), boxes the results and runs its error protocol: ~1,900 instructions for
//! `ngx.say("hello")`, about 10% of a whole `content_by_lua` request. The functions here read
//! the Lua stack directly for the common shapes of arguments and, for anything else (other
//! argument types, a phase that refuses the call, no request, a borrow conflict), hand the
//! unchanged arguments to the ordinary mlua implementation, which stays the one place that
//! decides errors. So results and error values are those of the ordinary implementation; the
//! traceback of such an error has one more line (`[C]: in ?`, the ordinary function called from
//! the entry point).
//!
//! Each entry point is a C closure with two upvalues: a light pointer to the state's
//! [`Current`] slot (kept alive by app data, which mlua drops after `lua_close`) and the
//! ordinary function; some have a third (a light pointer, or a helper function).
//!
//! Rules inside a fast path: raise no Lua error, and make no Lua value (so no garbage
//! collection step, whose `__gc` finalizers may call `ngx` APIs) while the request state is
//! borrowed.

use std::os::raw::{c_int, c_void};
use std::rc::Rc;

use mlua::{ffi, Function, Lua};

use super::request::Current;
use crate::http::request::ReqCtx;

/// Wrap `slow` in the C function `f` (see the module docs for the upvalues).
pub fn closure(lua: &Lua, f: ffi::lua_CFunction, slow: Function) -> mlua::Result<Function> {
    // SAFETY: a null pointer is never dereferenced (see `extra`).
    unsafe { closure_with(lua, f, slow, std::ptr::null_mut()) }
}

/// [`closure`] with a third upvalue: a light pointer for the fast path (see [`extra`]).
///
/// # Safety
/// `extra` must stay valid as long as the state (kept in its app data, say): the fast path
/// dereferences it.
pub unsafe fn closure_with(
    lua: &Lua,
    f: ffi::lua_CFunction,
    slow: Function,
    extra: *mut c_void,
) -> mlua::Result<Function> {
    let cur = Current::of(lua).ok_or_else(|| mlua::Error::runtime("no current-request slot"))?;
    let ptr = Rc::as_ptr(&cur) as *mut c_void;
    // SAFETY: the closure runs protected with `slow` as its one argument on the stack; it
    // pushes two light pointers and turns all three into a C closure left as the one result.
    unsafe {
        lua.exec_raw::<Function>(slow, |l| {
            ffi::lua_pushlightuserdata(l, ptr);
            ffi::lua_insert(l, -2);
            ffi::lua_pushlightuserdata(l, extra);
            ffi::lua_pushcclosure(l, f, 3);
        })
    }
}

/// [`closure`] with a helper function as third upvalue, for [`call_helper`].
pub fn closure_with_fn(
    lua: &Lua,
    f: ffi::lua_CFunction,
    slow: Function,
    helper: Function,
) -> mlua::Result<Function> {
    let cur = Current::of(lua).ok_or_else(|| mlua::Error::runtime("no current-request slot"))?;
    let ptr = Rc::as_ptr(&cur) as *mut c_void;
    // SAFETY: as in `closure_with`, with the helper as the second argument on the stack.
    unsafe {
        lua.exec_raw::<Function>((slow, helper), |l| {
            ffi::lua_pushlightuserdata(l, ptr);
            ffi::lua_insert(l, -3);
            ffi::lua_pushcclosure(l, f, 3);
        })
    }
}

/// Call the helper of a [`closure_with_fn`] closure with no arguments; its one result is
/// left on the stack.
///
/// # Safety
/// As [`slow`]: only there, with no Rust value alive that needs dropping.
pub unsafe fn call_helper(l: *mut ffi::lua_State) {
    ffi::lua_pushvalue(l, ffi::lua_upvalueindex(3));
    ffi::lua_call(l, 0, 1);
}

/// The third upvalue of a closure made by [`closure_with`].
///
/// # Safety
/// Only inside such a closure.
pub unsafe fn extra(l: *mut ffi::lua_State) -> *mut c_void {
    ffi::lua_touserdata(l, ffi::lua_upvalueindex(3))
}

/// The request being polled, from the closure's first upvalue.
///
/// # Safety
/// Only inside a closure made by [`closure`].
pub unsafe fn request(l: *mut ffi::lua_State) -> Option<Rc<ReqCtx>> {
    let cur = ffi::lua_touserdata(l, ffi::lua_upvalueindex(1)) as *const Current;
    if cur.is_null() {
        return None;
    }
    (*cur).req.try_borrow().ok().and_then(|r| r.clone())
}

/// Call the ordinary implementation with the unchanged arguments and return its results.
///
/// # Safety
/// Only inside a closure made by [`closure`], with no Rust value alive that needs dropping:
/// errors raised by the ordinary function unwind through here.
pub unsafe fn slow(l: *mut ffi::lua_State) -> c_int {
    let n = ffi::lua_gettop(l);
    ffi::lua_pushvalue(l, ffi::lua_upvalueindex(2));
    ffi::lua_insert(l, 1);
    ffi::lua_call(l, n, ffi::LUA_MULTRET);
    ffi::lua_gettop(l)
}

/// Whether the call got exactly `types.len()` arguments of these Lua types (`None`: any).
///
/// # Safety
/// `l` is the state of a running C function.
#[inline]
pub unsafe fn args_are(l: *mut ffi::lua_State, types: &[Option<c_int>]) -> bool {
    ffi::lua_gettop(l) == types.len() as c_int
        && types
            .iter()
            .zip(1..)
            .all(|(t, i)| t.is_none_or(|t| ffi::lua_type(l, i) == t))
}

/// The bytes of the string at `idx` (which must be a string: no conversion, no allocation).
///
/// # Safety
/// `idx` must hold a string; the slice lives as long as the value stays on the stack.
pub unsafe fn str_at<'a>(l: *mut ffi::lua_State, idx: c_int) -> &'a [u8] {
    let mut len = 0usize;
    let p = ffi::lua_tolstring(l, idx, &mut len);
    if p.is_null() {
        return &[];
    }
    std::slice::from_raw_parts(p as *const u8, len)
}

/// Push bytes as a Lua string.
///
/// # Safety
/// Needs one free stack slot; may run the garbage collector.
pub unsafe fn push_bytes(l: *mut ffi::lua_State, b: &[u8]) {
    ffi::lua_pushlstring_(l, b.as_ptr() as *const _, b.len());
}
