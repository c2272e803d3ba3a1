//! `require "ngx.semaphore"`: lua-resty-core's semaphore (`new`, `post`, `wait`, `count`).
//!
//! A semaphore lives in one worker's Lua state and is shared by every request, timer and
//! light thread of that worker, as in OpenResty. `post` hands resources to queued waiters
//! first (oldest first) and wakes their tasks; a waiter that times out or whose handler is
//! dropped (`ngx.exit`, client gone, thread killed) leaves the queue, and a resource handed
//! to a waiter that is dropped before it could return goes back to the semaphore.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mlua::{Lua, MultiValue, UserData, UserDataMethods, Value};

use crate::lua::request::check_phase;

#[derive(Default)]
struct Inner {
    resources: Cell<i64>,
    waiters: RefCell<VecDeque<Rc<Waiter>>>,
}

#[derive(Default)]
struct Waiter {
    granted: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Inner {
    fn post(&self, n: i64) {
        // Bounded by the waiters, not by `n`: `post(1e12)` must not spin the worker.
        let mut left = n;
        while left > 0 {
            let Some(w) = self.waiters.borrow_mut().pop_front() else {
                break;
            };
            left -= 1;
            w.granted.set(true);
            let waker = w.waker.borrow_mut().take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        self.resources
            .set(self.resources.get().saturating_add(left));
    }
}

/// A queued `wait`.
struct Wait {
    sem: Rc<Inner>,
    me: Rc<Waiter>,
    done: bool,
}

impl Future for Wait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.me.granted.get() {
            self.done = true;
            return Poll::Ready(());
        }
        *self.me.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.me.granted.get() {
            // Handed a resource but gone before taking it: give it to the next one.
            self.sem.post(1);
        } else {
            self.sem
                .waiters
                .borrow_mut()
                .retain(|w| !Rc::ptr_eq(w, &self.me));
        }
    }
}

/// The Lua object `semaphore.new` returns.
struct Semaphore(Rc<Inner>);

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(i) => Some(*i as f64),
        Value::Number(n) => Some(*n),
        Value::String(s) => s.to_str().ok()?.trim().parse().ok(),
        _ => None,
    }
}

impl UserData for Semaphore {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("post", |_, this, n: Option<Value>| {
            let n = match n {
                None | Some(Value::Nil) => 1.0,
                Some(v) => number(&v).unwrap_or(1.0),
            };
            if n < 1.0 {
                return Err(mlua::Error::runtime("positive number required"));
            }
            this.0.post(n as i64);
            Ok(true)
        });
        m.add_method("count", |_, this, ()| {
            Ok(this.0.resources.get() - this.0.waiters.borrow().len() as i64)
        });
        m.add_async_method("wait", |lua, this, secs: Value| {
            let sem = this.0.clone();
            let setup = (|| {
                check_phase(&lua, crate::lua::request::YIELDING_PHASES)?;
                let secs = number(&secs).ok_or_else(|| {
                    mlua::Error::runtime(format!(
                        "attempt to perform arithmetic on a {} value",
                        secs.type_name()
                    ))
                })?;
                if secs.is_nan() || secs < 0.0 {
                    return Err(mlua::Error::runtime("no negative number"));
                }
                Ok(secs)
            })();
            async move {
                let secs = setup?;
                if sem.resources.get() > 0 {
                    sem.resources.set(sem.resources.get() - 1);
                    return Ok(MultiValue::from_iter([Value::Boolean(true)]));
                }
                let ms = (secs * 1000.0) as u64;
                if ms > 0 {
                    let me = Rc::new(Waiter::default());
                    sem.waiters.borrow_mut().push_back(me.clone());
                    let wait = Wait {
                        sem: sem.clone(),
                        me,
                        done: false,
                    };
                    if tokio::time::timeout(Duration::from_millis(ms), wait)
                        .await
                        .is_ok()
                    {
                        return Ok(MultiValue::from_iter([Value::Boolean(true)]));
                    }
                }
                Ok(MultiValue::from_iter([
                    Value::Nil,
                    Value::String(lua.create_string("timeout")?),
                ]))
            }
        });
    }
}

/// Install `ngx.semaphore` into `package.preload`.
pub fn preload(lua: &Lua) -> mlua::Result<()> {
    let preload: mlua::Table = lua
        .globals()
        .get::<mlua::Table>("package")?
        .get("preload")?;
    preload.set(
        "ngx.semaphore",
        lua.create_function(|lua, ()| {
            let m = lua.create_table()?;
            m.set("_VERSION", "0.1.28")?;
            m.set(
                "new",
                lua.create_function(|_, n: Option<Value>| {
                    let n = match n {
                        None | Some(Value::Nil) => 0.0,
                        Some(v) => number(&v).unwrap_or(0.0),
                    };
                    if n < 0.0 {
                        return Err(mlua::Error::runtime("no negative number"));
                    }
                    let inner = Inner::default();
                    inner.resources.set(n as i64);
                    Ok(Semaphore(Rc::new(inner)))
                })?,
            )?;
            Ok(m)
        })?,
    )?;
    Ok(())
}
