//! `ngx.thread.spawn/wait/kill` and `ngx.on_abort`: OpenResty's "light threads".
//!
//! A handler's code runs in its "entry thread" (the coroutine the phase runner drives); each
//! `ngx.thread.spawn` adds a light thread to the handler's [`Sched`]. The phase runner
//! ([`crate::lua::phase`]) polls the entry thread and every light thread with the same request
//! installed, so they share `ngx.var`/`ngx.ctx` and interleave at every wait. As in OpenResty
//! the handler ends when the entry thread and all light threads have ended, or at once on
//! `ngx.exit` (any thread) or an error in the entry thread; an error in a light thread is
//! logged and ends only that thread.
//!
//! A light thread is a plain Lua coroutine (so `coroutine.status(t)` works on the handle),
//! driven by the Lua driver of [`super::coroutine`] through `call_async`: dropping that
//! future (kill, end of the handler) drops whatever the thread was waiting on.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use mlua::{Function, Lua, MultiValue, Table, Value, Variadic};

use crate::http::request::Phase;
use crate::lua::request::{check_phase, context_name, try_current, Current};

type ThreadFuture = Pin<Box<dyn Future<Output = mlua::Result<MultiValue>>>>;

/// The light threads of one handler run (a request phase or a timer).
#[derive(Default)]
pub struct Sched {
    threads: RefCell<Vec<Rc<Light>>>,
    /// `ngx.exit` in a request-less handler (timer): the whole run ends.
    pub exited: Cell<bool>,
    /// `ngx.ctx` of a request-less handler (timer).
    ctx: RefCell<Option<mlua::RegistryKey>>,
}

struct Light {
    co: mlua::Thread,
    /// The coroutine that spawned it: only it may wait on or kill the thread.
    parent: usize,
    fut: RefCell<Option<ThreadFuture>>,
    state: RefCell<State>,
}

enum State {
    Running,
    /// Ended, results (`true, ...` or `false, err`) not collected yet.
    Zombie(MultiValue),
    /// Waited on or killed.
    Dead,
}

/// Keep at most this many dead entries (so "already waited or killed" can be told) in a
/// long-running handler that spawns in a loop.
const MAX_DEAD: usize = 128;

fn id_of(co: &mlua::Thread) -> usize {
    co.to_pointer() as usize
}

fn running_id(lua: &Lua) -> usize {
    id_of(&lua.current_thread())
}

impl Sched {
    fn find(&self, co: &mlua::Thread) -> Option<Rc<Light>> {
        let id = id_of(co);
        self.threads
            .borrow()
            .iter()
            .find(|t| id_of(&t.co) == id)
            .cloned()
    }

    /// Whether no light thread is still running.
    pub fn idle(&self) -> bool {
        self.threads
            .borrow()
            .iter()
            .all(|t| !matches!(*t.state.borrow(), State::Running))
    }

    /// Poll every running light thread once. Returns true when none is left running.
    pub fn poll_threads(&self, lua: &Lua, cx: &mut Context<'_>) -> bool {
        let list: Vec<Rc<Light>> = self
            .threads
            .borrow()
            .iter()
            .filter(|t| t.fut.borrow().is_some())
            .cloned()
            .collect();
        let mut ended = false;
        for t in list {
            // Out of the cell while it runs: the thread may spawn, wait or kill.
            let Some(mut fut) = t.fut.borrow_mut().take() else {
                continue;
            };
            match fut.as_mut().poll(cx) {
                Poll::Pending => {
                    if matches!(*t.state.borrow(), State::Running) {
                        *t.fut.borrow_mut() = Some(fut);
                    }
                }
                Poll::Ready(r) => {
                    drop(fut);
                    t.finish(lua, r);
                    ended = true;
                }
            }
            if self.exited.get() {
                break;
            }
        }
        if ended {
            // A waiter (entry or light thread) may have been polled before the thread ended.
            cx.waker().wake_by_ref();
            self.prune();
        }
        self.idle()
    }

    fn prune(&self) {
        let mut threads = self.threads.borrow_mut();
        let dead = threads
            .iter()
            .filter(|t| matches!(*t.state.borrow(), State::Dead))
            .count();
        if dead > MAX_DEAD {
            let mut extra = dead - MAX_DEAD;
            threads.retain(|t| {
                if extra > 0 && matches!(*t.state.borrow(), State::Dead) {
                    extra -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }

    /// Start a light thread running `f(args)` now, until its first wait (as OpenResty's
    /// spawn does); it continues when the phase runner polls it.
    fn start(
        &self,
        lua: &Lua,
        cx: &mut Context<'_>,
        co: mlua::Thread,
        parent: usize,
        args: MultiValue,
    ) -> mlua::Result<()> {
        let driver = lua
            .app_data_ref::<super::coroutine::Driver>()
            .map(|d| d.0.clone())
            .ok_or_else(|| mlua::Error::runtime("light threads are not available here"))?;
        let mut fut: ThreadFuture = Box::pin(driver.call_async::<MultiValue>((co.clone(), args)));
        let light = Rc::new(Light {
            co,
            parent,
            fut: RefCell::new(None),
            state: RefCell::new(State::Running),
        });
        self.threads.borrow_mut().push(light.clone());
        match fut.as_mut().poll(cx) {
            Poll::Pending => *light.fut.borrow_mut() = Some(fut),
            Poll::Ready(r) => {
                drop(fut);
                light.finish(lua, r);
            }
        }
        Ok(())
    }
}

impl Light {
    fn finish(&self, lua: &Lua, r: mlua::Result<MultiValue>) {
        if !matches!(*self.state.borrow(), State::Running) {
            return;
        }
        let values = match r {
            Ok(v) => v,
            Err(e) => {
                let msg = crate::lua::phase::error_text(&e);
                MultiValue::from_iter([
                    Value::Boolean(false),
                    lua.create_string(&msg)
                        .map(Value::String)
                        .unwrap_or(Value::Nil),
                ])
            }
        };
        if let Some(Value::Boolean(false)) = values.front() {
            let err = values.get(1).map(value_text).unwrap_or_default();
            log_error(
                lua,
                &format!("lua user thread aborted: runtime error: {}", err),
            );
        }
        *self.state.borrow_mut() = State::Zombie(values);
    }

    /// The results for `ngx.thread.wait`, once.
    fn collect(&self) -> Option<MultiValue> {
        let mut st = self.state.borrow_mut();
        if !matches!(*st, State::Zombie(_)) {
            return None;
        }
        match std::mem::replace(&mut *st, State::Dead) {
            State::Zombie(v) => Some(v),
            _ => None,
        }
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string_lossy(),
        Value::Nil => "nil".into(),
        other => other
            .to_string()
            .unwrap_or_else(|_| other.type_name().to_string()),
    }
}

/// Log an error of a Lua thread with its context: the request's, or `context: ngx.timer`.
pub fn log_error(lua: &Lua, text: &str) {
    use crate::log::Level;
    match try_current(lua) {
        Some(rc) => crate::log::request_error(&rc, Level::Error, text),
        None => {
            let p = crate::lua::request::phase(lua);
            crate::log::log(
                Level::Error,
                None,
                &format!("{}, context: {}", text, context_name(p)),
            );
        }
    }
}

/// The scheduler of the running handler; made on first use when a phase runner is polling.
fn sched(lua: &Lua) -> Option<Rc<Sched>> {
    let c = lua.app_data_ref::<Rc<Current>>()?;
    if let Some(s) = c.sched.borrow().clone() {
        return Some(s);
    }
    if !c.runner.get() {
        return None;
    }
    let s = Rc::new(Sched::default());
    *c.sched.borrow_mut() = Some(s.clone());
    Some(s)
}

fn existing_sched(lua: &Lua) -> Option<Rc<Sched>> {
    lua.app_data_ref::<Rc<Current>>()
        .and_then(|c| c.sched.borrow().clone())
}

/// `coroutine.status` for light threads: "running" while alive (even when waiting),
/// "zombie" once ended but not waited on, "dead" after wait or kill; None for others.
pub fn light_status(lua: &Lua, co: &mlua::Thread) -> Option<&'static str> {
    let t = existing_sched(lua)?.find(co)?;
    let st = t.state.borrow();
    Some(match *st {
        State::Running => "running",
        State::Zombie(_) => "zombie",
        State::Dead => "dead",
    })
}

const SPAWN_PHASES: &[Phase] = crate::lua::request::YIELDING_PHASES;

/// Poll a future once from inside an async API call (to run a new thread to its first wait).
async fn with_cx<R>(f: impl FnOnce(&mut Context<'_>) -> R) -> R {
    let mut f = Some(f);
    std::future::poll_fn(move |cx| match f.take() {
        Some(f) => Poll::Ready(f(cx)),
        None => Poll::Pending,
    })
    .await
}

async fn never() {
    std::future::pending::<()>().await
}

/// Whether the handler is ending (`ngx.exit` seen): a spawn that ran into it must not let
/// its parent continue.
fn stopping(lua: &Lua, sched: &Sched) -> bool {
    sched.exited.get() || try_current(lua).is_some_and(|rc| rc.st.borrow().exit.is_some())
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let thread = lua.create_table()?;
    thread.set(
        "spawn",
        lua.create_async_function(|lua, (f, args): (Value, MultiValue)| {
            let setup = (|| {
                check_phase(&lua, SPAWN_PHASES)?;
                let Value::Function(f) = f else {
                    return Err(mlua::Error::runtime(format!(
                        "bad argument #1 to 'spawn' (function expected, got {})",
                        f.type_name()
                    )));
                };
                let sched = sched(&lua).ok_or_else(|| mlua::Error::runtime("no request found"))?;
                let parent = running_id(&lua);
                let co = lua.create_thread(f)?;
                Ok((sched, parent, co))
            })();
            async move {
                let (sched, parent, co) = setup?;
                let handle = co.clone();
                with_cx(|cx| sched.start(&lua, cx, co, parent, args)).await?;
                if stopping(&lua, &sched) {
                    never().await;
                }
                Ok(handle)
            }
        })?,
    )?;
    thread.set(
        "wait",
        lua.create_async_function(|lua, threads: Variadic<Value>| {
            let setup = wait_setup(&lua, threads);
            async move {
                let waiting = match setup? {
                    Waited::Now(v) => return Ok(v),
                    Waited::Later(list) => list,
                };
                std::future::poll_fn(|_| {
                    for t in &waiting {
                        if let Some(v) = t.collect() {
                            return Poll::Ready(Ok(v));
                        }
                    }
                    if waiting
                        .iter()
                        .all(|t| matches!(*t.state.borrow(), State::Dead))
                    {
                        // Killed meanwhile by someone else.
                        return Poll::Ready(nil_err(&lua, "already waited or killed"));
                    }
                    // The phase runner polls again whenever a light thread ends.
                    Poll::Pending
                })
                .await
            }
        })?,
    )?;
    thread.set(
        "kill",
        lua.create_function(|lua, t: Value| {
            let Value::Thread(co) = t else {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #1 to 'kill' (lua thread expected, got {})",
                    t.type_name()
                )));
            };
            let Some(light) = existing_sched(lua).and_then(|s| s.find(&co)) else {
                return nil_err(lua, "not user thread");
            };
            if light.parent != running_id(lua) {
                return nil_err(lua, "killer not parent");
            }
            let prev = std::mem::replace(&mut *light.state.borrow_mut(), State::Dead);
            match prev {
                State::Zombie(_) => nil_err(lua, "already terminated"),
                State::Dead => nil_err(lua, "already waited or killed"),
                State::Running => {
                    // Dropped outside the borrow: dropping resumes the thread once to end it.
                    let fut = light.fut.borrow_mut().take();
                    drop(fut);
                    Ok(MultiValue::from_iter([Value::Integer(1)]))
                }
            }
        })?,
    )?;
    ngx.set("thread", thread)?;
    ngx.set(
        "on_abort",
        lua.create_function(|lua, f: Value| {
            check_phase(
                lua,
                &[
                    Phase::Rewrite,
                    Phase::ServerRewrite,
                    Phase::Access,
                    Phase::Content,
                ],
            )?;
            let Value::Function(f) = f else {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #1 to 'on_abort' (function expected, got {})",
                    f.type_name()
                )));
            };
            let rc = crate::lua::request::current(lua)?;
            if !rc.st.borrow().conf.check_client_abort {
                return nil_err(lua, "lua_check_client_abort is off");
            }
            if rc.st.borrow().on_abort.is_some() {
                return nil_err(lua, "duplicate call");
            }
            rc.st.borrow_mut().on_abort = Some(OnAbort {
                func: Some(f),
                parent: running_id(lua),
            });
            Ok(MultiValue::from_iter([Value::Integer(1)]))
        })?,
    )?;
    Ok(())
}

/// A registered `ngx.on_abort` callback (kept in the request's state); `func` is taken when
/// it runs, and the request then ignores the closed connection, as OpenResty does.
#[derive(Debug)]
pub struct OnAbort {
    func: Option<Function>,
    parent: usize,
}

/// The client went away: run the request's `ngx.on_abort` callback as a light thread of the
/// running handler. Returns false when there is none (the caller then aborts the request).
pub fn fire_on_abort(lua: &Lua, rc: &crate::http::request::ReqCtx, cx: &mut Context<'_>) -> bool {
    let cb = match rc.st.borrow_mut().on_abort.as_mut() {
        None => return false,
        Some(o) => o.func.take().map(|f| (f, o.parent)),
    };
    let Some((func, parent)) = cb else {
        // The callback already ran (in an earlier phase): it decided what to do.
        return true;
    };
    let Some(sched) = sched(lua) else {
        return false;
    };
    let co = match lua.create_thread(func) {
        Ok(co) => co,
        Err(e) => {
            log_error(lua, &format!("failed to run the on_abort callback: {}", e));
            return true;
        }
    };
    if let Err(e) = sched.start(lua, cx, co, parent, MultiValue::new()) {
        log_error(lua, &format!("failed to run the on_abort callback: {}", e));
    }
    true
}

enum Waited {
    Now(MultiValue),
    Later(Vec<Rc<Light>>),
}

fn nil_err(lua: &Lua, msg: &str) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([
        Value::Nil,
        Value::String(lua.create_string(msg)?),
    ]))
}

fn wait_setup(lua: &Lua, threads: Variadic<Value>) -> mlua::Result<Waited> {
    check_phase(lua, SPAWN_PHASES)?;
    if threads.is_empty() {
        return Err(mlua::Error::runtime(
            "at least one coroutine should be specified",
        ));
    }
    let sched = existing_sched(lua);
    let me = running_id(lua);
    let n = threads.len();
    let mut later = Vec::new();
    for (i, v) in threads.into_iter().enumerate() {
        let Value::Thread(co) = v else {
            return Err(mlua::Error::runtime(format!(
                "bad argument #{} to 'wait' (lua thread expected, got {})",
                i + 1,
                v.type_name()
            )));
        };
        let Some(t) = sched.as_ref().and_then(|s| s.find(&co)) else {
            return Err(mlua::Error::runtime(
                "attempt to wait on a coroutine that is not a user thread",
            ));
        };
        if t.parent != me {
            return Err(mlua::Error::runtime(
                "only the parent coroutine can wait on the thread",
            ));
        }
        if let Some(v) = t.collect() {
            return Ok(Waited::Now(v));
        }
        if matches!(*t.state.borrow(), State::Dead) {
            if i + 1 == n {
                return nil_err(lua, "already waited or killed").map(Waited::Now);
            }
            continue;
        }
        later.push(t);
    }
    Ok(Waited::Later(later))
}

/// `ngx.exit` in a request-less handler (timer): end it with its light threads. False when
/// no phase runner drives the running code.
pub fn exit_detached(lua: &Lua) -> bool {
    match existing_sched(lua) {
        Some(s) => {
            s.exited.set(true);
            true
        }
        None => false,
    }
}

/// `ngx.ctx` outside a request: one table per timer run (made on first use, or `set`).
pub fn detached_ctx(lua: &Lua, set: Option<Table>) -> mlua::Result<Value> {
    let Some(s) = existing_sched(lua) else {
        return Err(mlua::Error::runtime("no request found"));
    };
    if let Some(t) = set {
        let key = lua.create_registry_value(&t)?;
        *s.ctx.borrow_mut() = Some(key);
        return Ok(Value::Table(t));
    }
    super::ctx::table_in(
        lua,
        || {
            s.ctx
                .borrow()
                .as_ref()
                .map(|k| lua.registry_value::<Value>(k))
        },
        |key| *s.ctx.borrow_mut() = Some(key),
    )
}
