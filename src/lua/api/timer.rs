//! `ngx.timer.at`, `ngx.timer.every`, `ngx.timer.running_count`, `ngx.timer.pending_count`.
//!
//! A timer is a local task on the worker's `LocalSet`; its callback runs as a coroutine in the
//! request-less phase `timer` (see [`crate::lua::phase::run_detached`]), so it may sleep, use
//! cosockets and spawn light threads. Counts and limits (`lua_max_pending_timers`,
//! `lua_max_running_timers`) are per Lua state, i.e. per worker and configuration generation.
//! When the generation ends (graceful shutdown, or reload for the old generation's state)
//! [`shutdown`] makes every pending timer fire at once with `premature = true`.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use mlua::{Function, Lua, MultiValue, Table, Value};
use tokio::sync::watch;

use crate::http::request::Phase;
use crate::log::{self as elog, Level};
use crate::lua::request::check_phase;

/// Timer bookkeeping of one Lua state (app data).
pub struct Timers {
    pending: Cell<usize>,
    running: Cell<usize>,
    max_pending: Cell<usize>,
    max_running: Cell<usize>,
    exiting: watch::Sender<bool>,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            pending: Cell::new(0),
            running: Cell::new(0),
            max_pending: Cell::new(1024),
            max_running: Cell::new(256),
            exiting: watch::channel(false).0,
        }
    }
}

fn timers(lua: &Lua) -> Option<Rc<Timers>> {
    lua.app_data_ref::<Rc<Timers>>().map(|t| (*t).clone())
}

/// Apply `lua_max_pending_timers` / `lua_max_running_timers`.
pub fn configure(lua: &Lua, max_pending: usize, max_running: usize) {
    if let Some(t) = timers(lua) {
        t.max_pending.set(max_pending);
        t.max_running.set(max_running);
    }
}

/// The state's generation is ending: pending timers fire now with `premature = true`, new
/// ones with a delay are refused ("process exiting"), `ngx.worker.exiting()` turns true.
pub fn shutdown(lua: &Lua) {
    if let Some(t) = timers(lua) {
        t.exiting.send_replace(true);
    }
}

/// Whether [`shutdown`] was called for this state.
pub fn exiting(lua: &Lua) -> bool {
    timers(lua).is_some_and(|t| *t.exiting.borrow())
}

/// Timers pending or running (a graceful shutdown waits for them).
pub fn busy(lua: &Lua) -> usize {
    timers(lua).map_or(0, |t| t.pending.get() + t.running.get())
}

const TIMER_PHASES: &[Phase] = crate::lua::request::YIELDING_PHASES;

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    lua.set_app_data(Rc::new(Timers::default()));
    let timer = lua.create_table()?;
    timer.set(
        "at",
        lua.create_function(|lua, args: MultiValue| create(lua, args, false, "at"))?,
    )?;
    timer.set(
        "every",
        lua.create_function(|lua, args: MultiValue| create(lua, args, true, "every"))?,
    )?;
    timer.set(
        "running_count",
        lua.create_function(|lua, ()| Ok(timers(lua).map_or(0, |t| t.running.get())))?,
    )?;
    timer.set(
        "pending_count",
        lua.create_function(|lua, ()| Ok(timers(lua).map_or(0, |t| t.pending.get())))?,
    )?;
    ngx.set("timer", timer)?;
    Ok(())
}

fn create(lua: &Lua, args: MultiValue, every: bool, name: &str) -> mlua::Result<MultiValue> {
    check_phase(lua, TIMER_PHASES)?;
    if args.len() < 2 {
        return Err(mlua::Error::runtime(format!(
            "expecting at least 2 arguments but got {}",
            args.len()
        )));
    }
    let mut args = args.into_iter();
    let delay = match args.next() {
        Some(Value::Integer(i)) => i as f64,
        Some(Value::Number(n)) => n,
        Some(Value::String(s)) => s
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| {
                mlua::Error::runtime(format!(
                    "bad argument #1 to '{}' (number expected, got string)",
                    name
                ))
            })?,
        Some(other) => {
            return Err(mlua::Error::runtime(format!(
                "bad argument #1 to '{}' (number expected, got {})",
                name,
                other.type_name()
            )))
        }
        None => 0.0,
    };
    if !delay.is_finite() || delay < 0.0 {
        return Err(mlua::Error::runtime(format!(
            "bad argument #1 to '{}' (invalid delay)",
            name
        )));
    }
    let delay = Duration::from_millis((delay * 1000.0) as u64);
    if every && delay.is_zero() {
        return Err(mlua::Error::runtime("delay cannot be zero"));
    }
    let f = match args.next() {
        Some(Value::Function(f)) if f.info().what != "C" => f,
        _ => {
            return Err(mlua::Error::runtime(format!(
                "bad argument #2 to '{}' (Lua function expected)",
                name
            )))
        }
    };
    let user_args: MultiValue = args.collect();
    let Some(t) = timers(lua) else {
        return Err(mlua::Error::runtime("no timer support in this Lua state"));
    };
    if *t.exiting.borrow() && !delay.is_zero() {
        return nil_err(lua, "process exiting");
    }
    if t.pending.get() >= t.max_pending.get() {
        return nil_err(lua, "too many pending timers");
    }
    t.pending.set(t.pending.get() + 1);
    tokio::task::spawn_local(timer_task(lua.clone(), t, delay, every, f, user_args));
    Ok(MultiValue::from_iter([Value::Integer(1)]))
}

fn nil_err(lua: &Lua, msg: &str) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([
        Value::Nil,
        Value::String(lua.create_string(msg)?),
    ]))
}

/// One timer: wait for the delay (or the end of the generation), then run the callback;
/// an every-timer schedules its next run before this one runs, as OpenResty does.
async fn timer_task(
    lua: Lua,
    t: Rc<Timers>,
    delay: Duration,
    every: bool,
    f: Function,
    args: MultiValue,
) {
    let mut exit_rx = t.exiting.subscribe();
    loop {
        let premature = if delay.is_zero() {
            false
        } else {
            tokio::select! {
                _ = tokio::time::sleep(delay) => false,
                _ = exit_rx.wait_for(|v| *v) => true,
            }
        };
        t.pending.set(t.pending.get().saturating_sub(1));
        let again = every && !premature && !*t.exiting.borrow();
        if again {
            t.pending.set(t.pending.get() + 1);
        }
        if t.running.get() >= t.max_running.get() {
            elog::log(
                Level::Alert,
                None,
                &format!(
                    "{} lua_max_running_timers are not enough",
                    t.max_running.get()
                ),
            );
        } else if again {
            tokio::task::spawn_local(run_callback(
                lua.clone(),
                t.clone(),
                f.clone(),
                args.clone(),
                false,
            ));
        } else {
            run_callback(lua.clone(), t.clone(), f.clone(), args.clone(), premature).await;
        }
        if !again {
            return;
        }
    }
}

async fn run_callback(lua: Lua, t: Rc<Timers>, f: Function, args: MultiValue, premature: bool) {
    t.running.set(t.running.get() + 1);
    crate::lua::api::time::update_cached_time();
    let mut all = MultiValue::new();
    all.push_back(Value::Boolean(premature));
    all.extend(args);
    if let Err(e) = crate::lua::phase::run_detached(&lua, &f, all, Phase::Timer).await {
        elog::log(
            Level::Error,
            None,
            &format!(
                "lua entry thread aborted: runtime error: {}, context: ngx.timer",
                e
            ),
        );
    }
    t.running.set(t.running.get().saturating_sub(1));
}
