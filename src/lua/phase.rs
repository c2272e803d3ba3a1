//! Running a `*_by_lua*` handler for a request: each call is a coroutine (a pooled one driven
//! by mlua's `AsyncThread`, see [`Entry`]; `call_async` for request-less runs) so every API
//! that waits yields to the worker's event loop. The request is installed as "current"
//! around each poll, and `ngx.exit`/`ngx.exec` end the call by dropping its future: a pending
//! future cannot be swallowed by the user's `pcall`, unlike an error.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use mlua::{Lua, MultiValue};

use super::request::Current;
use super::vm::LuaVm;
use crate::conf::model::LuaChunk;
use crate::http::request::{Exit, HeadSlot, Phase, ReqCtx};
use crate::lua::api::thread::Sched;

/// How a Lua handler ended.
#[derive(Debug)]
pub enum Outcome {
    /// Returned normally, with its return values (set_by_lua reads the first).
    Ok(Option<bytes::Bytes>),
    /// `ngx.exit`, `ngx.exec`, `ngx.redirect`.
    Exit(Exit),
    /// A Lua error: already logged as `failed to run <phase>_by_lua*: ...`.
    Error(String),
}

/// How a [`Runner`] ended.
enum Ended {
    /// The entry thread returned (and every light thread ended) or raised an error.
    Done(mlua::Result<MultiValue>),
    /// The request recorded an exit (`ngx.exit`, `ngx.exec`, ...; or the client went away).
    Exit(Exit),
    /// `ngx.exit` in a request-less handler (timer).
    Exited,
}

/// Drives one handler: polls its entry thread and its light threads with the request (or the
/// request-less phase) installed as current around each poll. Finishes when the entry thread
/// and every light thread have ended, at once when an exit is recorded or the entry thread
/// fails.
struct Runner<'a, F> {
    lua: &'a Lua,
    /// The state's current-request slot (looked up once per run, not per poll).
    cur: Rc<Current>,
    req: Option<Rc<ReqCtx>>,
    /// The phase of a request-less run (timer, init_worker).
    phase: Option<Phase>,
    /// Light threads; for requests made by the first `ngx.thread.spawn`.
    sched: Option<Rc<Sched>>,
    entry: Pin<&'a mut F>,
    done: Option<mlua::Result<MultiValue>>,
    /// `lua_check_client_abort on`: watches the client connection.
    abort: Option<AbortWatch>,
}

impl<F: Future<Output = mlua::Result<MultiValue>>> Future for Runner<'_, F> {
    type Output = Ended;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended> {
        let this = self.get_mut();
        let c = &*this.cur;
        let prev_req = c.req.replace(this.req.clone());
        let prev_phase = c.phase.replace(this.phase);
        let prev_sched = c.sched.replace(this.sched.take());
        let prev_runner = c.runner.replace(true);

        let mut abort = false;
        if let (Some(w), Some(rc)) = (this.abort.as_mut(), this.req.as_ref()) {
            if w.client_gone(rc, cx) {
                this.abort = None;
                abort = !crate::lua::api::thread::fire_on_abort(this.lua, rc, cx);
                if abort {
                    crate::log::request_error(
                        rc,
                        crate::log::Level::Info,
                        "client prematurely closed connection",
                    );
                }
            }
        }
        if this.done.is_none() && !abort {
            if let Poll::Ready(v) = this.entry.as_mut().poll(cx) {
                this.done = Some(v);
            }
        }
        let stop = abort
            || matches!(this.done, Some(Err(_)))
            || this
                .req
                .as_ref()
                .is_some_and(|rc| rc.st.borrow().exit.is_some());
        // Light threads run with the same request installed; most handlers have none.
        let mut idle = true;
        let sched = c.sched.borrow().clone();
        if let Some(s) = &sched {
            idle = if stop {
                s.idle()
            } else {
                s.poll_threads(this.lua, cx)
            };
        }
        this.sched = c.sched.replace(prev_sched);
        *c.req.borrow_mut() = prev_req;
        *c.phase.borrow_mut() = prev_phase;
        c.runner.set(prev_runner);
        if let Some(rc) = &this.req {
            if rc.st.borrow().eof_sent {
                // Nothing left to protect, and the watch must not hold the body stream open.
                this.abort = None;
            }
            if abort {
                return Poll::Ready(Ended::Exit(Exit::Status(499)));
            }
            if let Some(exit) = rc.st.borrow_mut().exit.take() {
                return Poll::Ready(Ended::Exit(exit));
            }
        } else if sched.as_ref().is_some_and(|s| s.exited.get()) {
            return Poll::Ready(Ended::Exited);
        }
        match &this.done {
            Some(Err(_)) => Poll::Ready(Ended::Done(
                this.done.take().unwrap_or(Ok(MultiValue::new())),
            )),
            Some(Ok(_)) if idle => Poll::Ready(Ended::Done(
                this.done.take().unwrap_or(Ok(MultiValue::new())),
            )),
            _ => Poll::Pending,
        }
    }
}

fn no_slot() -> mlua::Error {
    mlua::Error::runtime("Lua state without a request slot")
}

/// Notices the client closing the connection while a handler runs: before the head is
/// sent hyper drops the service future (and with it the head channel's receiver) as soon as
/// it reads EOF; afterwards it drops the body stream.
struct AbortWatch {
    body: Option<Pin<Box<dyn Future<Output = ()>>>>,
}

impl AbortWatch {
    fn client_gone(&mut self, rc: &ReqCtx, cx: &mut Context<'_>) -> bool {
        let st = rc.st.borrow();
        if st.eof_sent {
            return false;
        }
        // The connection marks the head when it drops the request (and then polls it on
        // as a task of its own: no wake-up needed here).
        match st.head {
            HeadSlot::Gone => return true,
            HeadSlot::Waiting => return false,
            HeadSlot::Ready(_) | HeadSlot::Done => {}
        }
        if self.body.is_none() {
            let Some(tx) = st.body_tx.clone() else {
                return false;
            };
            self.body = Some(Box::pin(async move { tx.closed().await }));
        }
        drop(st);
        self.body
            .as_mut()
            .is_some_and(|f| f.as_mut().poll(cx).is_ready())
    }
}

/// A handler's entry coroutine, taken from the VM's own pool: what `call_async` does, without
/// its per-call bookkeeping (~800 instructions a handler). mlua's driver ([`AsyncThread`])
/// still runs it, so waits and wakers behave the same; this adds what `call_async` would do
/// at the end: a coroutine that returned goes back to the pool, and one dropped while waiting
/// in mlua's async wrapper gets the terminate signal so its wait is dropped at once.
struct Entry<'a> {
    vm: &'a LuaVm,
    thread: Option<mlua::Thread>,
    fut: mlua::thread::AsyncThread<MultiValue>,
    returned: bool,
}

impl<'a> Entry<'a> {
    fn new(vm: &'a LuaVm, thread: mlua::Thread) -> mlua::Result<Entry<'a>> {
        let fut = thread.clone().into_async::<MultiValue>(())?;
        Ok(Entry {
            vm,
            thread: Some(thread),
            fut,
            returned: false,
        })
    }
}

impl Future for Entry<'_> {
    type Output = mlua::Result<MultiValue>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.fut).poll(cx);
        if let Poll::Ready(Ok(_)) = &r {
            this.returned = true;
        }
        r
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if self.returned {
            self.vm.put_thread(thread);
            return;
        }
        if thread.status() != mlua::thread::ThreadStatus::Resumable
            || !parked_in_async_wrapper(&thread)
        {
            return;
        }
        if let Some(sig) = self.vm.terminate() {
            // Dropped while waiting (ngx.exit, client gone): drop the wait now. The coroutine
            // then stays suspended for good and is left to the collector, as mlua does.
            let _ = thread.resume::<()>(sig);
        }
    }
}

/// Whether a suspended coroutine waits in a frame of mlua's async wrapper chunk (an async
/// function, or our coroutine wrappers that forward its wait), where the terminate signal
/// is understood; a coroutine suspended by a plain `coroutine.yield` must not get it.
fn parked_in_async_wrapper(thread: &mlua::Thread) -> bool {
    use mlua::ffi;
    // SAFETY: for a thread `lua_topointer` is its `lua_State`; reading the debug info of a
    // suspended coroutine is allowed from outside it and touches nothing.
    unsafe {
        let co = thread.to_pointer() as *mut ffi::lua_State;
        let mut ar = std::mem::zeroed::<ffi::lua_Debug>();
        ffi::lua_getstack(co, 1, &mut ar) != 0
            && ffi::lua_getinfo(co, c"S".as_ptr(), &mut ar) != 0
            && !ar.source.is_null()
            && std::ffi::CStr::from_ptr(ar.source) == c"=__mlua_async_poll"
    }
}

/// Run `chunk` for request `rc` in `phase` with the given `ngx.arg` already set by the caller.
pub async fn run(rc: &Rc<ReqCtx>, chunk: &LuaChunk, phase: Phase) -> Outcome {
    let vm = rc.env.vm.clone();
    let watch = {
        let mut st = rc.st.borrow_mut();
        st.phase = phase;
        st.exit = None;
        st.conf.check_client_abort
            && matches!(
                phase,
                Phase::Rewrite | Phase::ServerRewrite | Phase::Access | Phase::Content
            )
    };
    let thread = match vm.thread(chunk) {
        Ok(t) => t,
        Err(e) => return fail(rc, chunk, &e.to_string()),
    };
    let entry = match Entry::new(&vm, thread) {
        Ok(e) => e,
        Err(e) => return fail(rc, chunk, &error_text(&e)),
    };
    let entry = std::pin::pin!(entry);
    let res = Runner {
        lua: &vm.lua,
        cur: vm.current.clone(),
        req: Some(rc.clone()),
        phase: None,
        sched: None,
        entry,
        done: None,
        abort: watch.then_some(AbortWatch { body: None }),
    }
    .await;
    match res {
        Ended::Exit(exit) => Outcome::Exit(exit),
        Ended::Exited => Outcome::Ok(None),
        Ended::Done(Ok(values)) => {
            let first = values.into_iter().next().and_then(|v| match v {
                mlua::Value::String(s) => Some(bytes::Bytes::copy_from_slice(&s.as_bytes())),
                mlua::Value::Integer(i) => Some(bytes::Bytes::from(i.to_string())),
                mlua::Value::Number(n) => Some(bytes::Bytes::from(
                    crate::lua::api::output::format_number(n),
                )),
                _ => None,
            });
            Outcome::Ok(first)
        }
        Ended::Done(Err(e)) => fail(rc, chunk, &error_text(&e)),
    }
}

/// Run `f(args)` outside any request (init_by_lua, init_worker_by_lua, a timer callback)
/// with `phase` installed around each poll, so it may wait and spawn light threads while
/// requests interleave. `ngx.exit` ends it normally. Errors come back as their text.
pub async fn run_detached(
    lua: &Lua,
    f: &mlua::Function,
    args: MultiValue,
    phase: Phase,
) -> Result<(), String> {
    let cur = Current::of(lua).ok_or_else(|| no_slot().to_string())?;
    let fut = f.call_async::<MultiValue>(args);
    let fut = std::pin::pin!(fut);
    let res = Runner {
        lua,
        cur,
        req: None,
        phase: Some(phase),
        sched: Some(Rc::new(Sched::default())),
        entry: fut,
        done: None,
        abort: None,
    }
    .await;
    match res {
        Ended::Done(Ok(_)) | Ended::Exited | Ended::Exit(_) => Ok(()),
        Ended::Done(Err(e)) => Err(error_text(&e)),
    }
}

/// The message of a Lua error without mlua's wrapping.
pub fn error_text(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { traceback, cause } => {
            format!("{}\n{}", error_text(cause), traceback)
        }
        mlua::Error::RuntimeError(m) | mlua::Error::SyntaxError { message: m, .. } => m.clone(),
        mlua::Error::WithContext { context, cause } => {
            format!("{}: {}", context, error_text(cause))
        }
        other => other.to_string(),
    }
}

fn fail(rc: &ReqCtx, chunk: &LuaChunk, msg: &str) -> Outcome {
    let text = format!("failed to run {}*: {}", chunk.directive, msg);
    crate::log::request_error(rc, crate::log::Level::Error, &text);
    Outcome::Error(text)
}

#[cfg(test)]
mod tests {
    //! The pooled entry coroutine must end like `call_async`'s: a wait it was parked on is
    //! dropped with it, and a coroutine that returned is reused.

    use std::cell::Cell;
    use std::future::Future;
    use std::rc::Rc;
    use std::task::{Context, Poll, Waker};

    use super::Entry;
    use crate::conf::model::{LuaChunk, LuaSource};
    use crate::lua::vm::{LuaVm, VmOptions};

    struct Flag(Rc<Cell<bool>>);

    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }

    fn chunk(id: usize, code: &str) -> LuaChunk {
        LuaChunk {
            id,
            source: LuaSource::Inline(code.into()),
            name: "=test".into(),
            directive: "content_by_lua".into(),
            reload: false,
        }
    }

    fn vm_with_wait() -> (LuaVm, Rc<Cell<bool>>) {
        let vm = LuaVm::new(&VmOptions::standalone(".".into())).expect("state");
        let dropped = Rc::new(Cell::new(false));
        let d = dropped.clone();
        let wait = vm
            .lua
            .create_async_function(move |_, ()| {
                let flag = Flag(d.clone());
                async move {
                    let _flag = flag;
                    std::future::pending::<()>().await;
                    Ok(())
                }
            })
            .expect("function");
        vm.lua.globals().set("wait_forever", wait).expect("set");
        (vm, dropped)
    }

    /// Polls a fresh entry for `c` once, then drops it; whether it was ready.
    fn poll_once(vm: &LuaVm, c: &LuaChunk) -> bool {
        let thread = vm.thread(c).expect("thread");
        let mut entry = Box::pin(Entry::new(vm, thread).expect("entry"));
        let mut cx = Context::from_waker(Waker::noop());
        entry.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn a_dropped_entry_drops_its_wait() {
        let (vm, dropped) = vm_with_wait();
        let ready = poll_once(&vm, &chunk(0, "wait_forever()"));
        assert!(!ready, "the wait did not suspend the handler");
        assert!(dropped.get(), "the wait outlived the dropped handler");
    }

    #[test]
    fn a_wait_inside_a_user_coroutine_is_dropped_too() {
        let (vm, dropped) = vm_with_wait();
        let ready = poll_once(
            &vm,
            &chunk(0, "coroutine.wrap(function() wait_forever() end)()"),
        );
        assert!(!ready);
        assert!(dropped.get());
    }

    #[test]
    fn returned_threads_are_reused() {
        let (vm, _) = vm_with_wait();
        let c = chunk(0, "return 1");
        let mut entry = Box::pin(Entry::new(&vm, vm.thread(&c).expect("thread")).expect("e"));
        let mut cx = Context::from_waker(Waker::noop());
        let first = match entry.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(v)) => v.len(),
            _ => panic!("not ready"),
        };
        assert_eq!(first, 1);
        let p = entry.thread.as_ref().expect("thread").to_pointer();
        drop(entry);
        let again = vm.thread(&c).expect("thread");
        assert_eq!(again.to_pointer(), p, "the returned thread was not reused");
        let mut entry = Box::pin(Entry::new(&vm, again).expect("entry"));
        assert!(matches!(entry.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
    }
}
