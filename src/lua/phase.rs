//! Running a `*_by_lua*` handler for a request: each call is a coroutine (`call_async`) so every
//! API that waits yields to the worker's event loop. The request is installed as "current"
//! around each poll, and `ngx.exit`/`ngx.exec` end the call by dropping its future: a pending
//! future cannot be swallowed by the user's `pcall`, unlike an error.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use mlua::{Lua, MultiValue};

use super::request::Current;
use crate::conf::model::LuaChunk;
use crate::http::request::{Exit, Phase, ReqCtx};

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

/// Polls `fut` with `rc` installed as the current request; finishes early once the request
/// records an exit.
struct WithReq<'a, F> {
    lua: &'a Lua,
    rc: Rc<ReqCtx>,
    fut: Pin<&'a mut F>,
}

impl<F: Future> Future for WithReq<'_, F> {
    type Output = Result<F::Output, Exit>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let prev = match self.lua.app_data_ref::<Current>() {
            Some(c) => c.req.replace(Some(self.rc.clone())),
            None => None,
        };
        let r = self.fut.as_mut().poll(cx);
        if let Some(c) = self.lua.app_data_ref::<Current>() {
            *c.req.borrow_mut() = prev;
        }
        if let Some(exit) = self.rc.st.borrow_mut().exit.take() {
            return Poll::Ready(Err(exit));
        }
        r.map(Ok)
    }
}

/// Run `chunk` for request `rc` in `phase` with the given `ngx.arg` already set by the caller.
pub async fn run(rc: &Rc<ReqCtx>, chunk: &LuaChunk, phase: Phase) -> Outcome {
    let vm = rc.env.vm.clone();
    {
        let mut st = rc.st.borrow_mut();
        st.phase = phase;
        st.exit = None;
    }
    let f = match vm.handler(chunk) {
        Ok(f) => f,
        Err(e) => return fail(rc, chunk, &e.to_string()),
    };
    let fut = f.call_async::<MultiValue>(());
    let fut = std::pin::pin!(fut);
    let res = WithReq {
        lua: &vm.lua,
        rc: rc.clone(),
        fut,
    }
    .await;
    match res {
        Err(exit) => Outcome::Exit(exit),
        Ok(Ok(values)) => {
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
        Ok(Err(e)) => fail(rc, chunk, &error_text(&e)),
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
