//! The rewrite module's script: `set`, `set_by_lua`, `rewrite`, `return`, `if`, `break`, run in
//! config order in the server and location rewrite phases.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use bytes::Bytes;
use http::HeaderValue;

use super::engine::Outcome;
use super::request::{LuaArgs, Phase, ReqCtx, ReqState};
use super::variables::{eval, eval_string, set_captures};
use crate::conf::model::{Cond, FileTest, RewriteFlag, RewriteOp};
use crate::lua::phase::{self as lua_phase, Outcome as LuaOutcome};

/// How a script ended.
pub enum RwResult {
    /// Ran to the end.
    Continue,
    /// `rewrite ... last`: search the location again with the new URI.
    Last,
    /// `break` or `rewrite ... break`: stop the script, stay in this location.
    Break,
    /// `return` or a redirect: the request is answered.
    Finish(Outcome),
}

/// Run a script.
pub async fn run(rc: &Rc<ReqCtx>, ops: &[RewriteOp]) -> RwResult {
    // Most blocks have no script: skip the boxed (recursion-capable) runner on the hot path.
    if ops.is_empty() {
        return RwResult::Continue;
    }
    run_boxed(rc, ops).await
}

/// Boxed because `if` blocks run their own script recursively.
fn run_boxed<'a>(
    rc: &'a Rc<ReqCtx>,
    ops: &'a [RewriteOp],
) -> Pin<Box<dyn Future<Output = RwResult> + 'a>> {
    Box::pin(async move {
        for op in ops {
            match op {
                RewriteOp::Set(var, t) => {
                    let mut st = rc.st.borrow_mut();
                    let v = eval(rc, &st, t);
                    st.vars.insert(var.clone(), Bytes::from(v));
                }
                RewriteOp::SetByLua { var, chunk, args } => {
                    {
                        let mut st = rc.st.borrow_mut();
                        let vals = args.iter().map(|a| Bytes::from(eval(rc, &st, a))).collect();
                        st.arg = LuaArgs::Set(vals);
                    }
                    let prev = rc.st.borrow().phase;
                    let out = lua_phase::run(rc, chunk, Phase::Set).await;
                    let mut st = rc.st.borrow_mut();
                    st.phase = prev;
                    st.arg = LuaArgs::None;
                    match out {
                        LuaOutcome::Ok(v) => {
                            st.vars.insert(var.clone(), v.unwrap_or_default());
                        }
                        _ => return RwResult::Finish(Outcome::Status(500)),
                    }
                }
                RewriteOp::Rewrite {
                    regex,
                    replacement,
                    flag,
                    ..
                } => {
                    let mut st = rc.st.borrow_mut();
                    let uri = st.uri.clone();
                    let Some(caps) = regex.captures(uri.as_bytes()) else {
                        continue;
                    };
                    set_captures(&mut st, uri.as_bytes(), &caps);
                    let new = eval_string(rc, &st, replacement);
                    let (new, keep_args) = match new.strip_suffix('?') {
                        Some(n) => (n.to_string(), false),
                        None => (new, true),
                    };
                    let external = new.starts_with("http://") || new.starts_with("https://");
                    if external || matches!(flag, RewriteFlag::Redirect | RewriteFlag::Permanent) {
                        let mut target = if external {
                            new
                        } else {
                            absolute(rc, &st, &new)
                        };
                        if keep_args {
                            if let Some(a) = st.args.as_ref().filter(|a| !a.is_empty()) {
                                target.push(if target.contains('?') { '&' } else { '?' });
                                target.push_str(a);
                            }
                        }
                        let code = if *flag == RewriteFlag::Permanent {
                            301
                        } else {
                            302
                        };
                        if let Ok(v) = HeaderValue::from_str(&target) {
                            st.resp_headers.insert(http::header::LOCATION, v);
                        }
                        return RwResult::Finish(Outcome::Status(code));
                    }
                    match new.split_once('?') {
                        Some((p, a)) => {
                            let merged =
                                match st.args.as_ref().filter(|x| keep_args && !x.is_empty()) {
                                    Some(old) => format!("{}&{}", a, old),
                                    None => a.to_string(),
                                };
                            st.uri = p.to_string();
                            st.args = Some(merged);
                        }
                        None => {
                            st.uri = new;
                            if !keep_args {
                                st.args = None;
                            }
                        }
                    }
                    match flag {
                        RewriteFlag::Last => return RwResult::Last,
                        RewriteFlag::Break => return RwResult::Break,
                        _ => {}
                    }
                }
                RewriteOp::Return { code, body } => {
                    let mut st = rc.st.borrow_mut();
                    let code = *code;
                    match body {
                        Some(b) if matches!(code, 301 | 302 | 303 | 307 | 308) => {
                            let target = eval_string(rc, &st, b);
                            let target = if target.starts_with('/') {
                                absolute(rc, &st, &target)
                            } else {
                                target
                            };
                            if let Ok(v) = HeaderValue::from_str(&target) {
                                st.resp_headers.insert(http::header::LOCATION, v);
                            }
                            return RwResult::Finish(Outcome::Status(code));
                        }
                        Some(b) => {
                            let text = eval(rc, &st, b);
                            st.status = code;
                            st.out.extend_from_slice(&text);
                            if text.is_empty() {
                                return RwResult::Finish(Outcome::Status(code));
                            }
                            return RwResult::Finish(Outcome::Done);
                        }
                        None => return RwResult::Finish(Outcome::Status(code)),
                    }
                }
                RewriteOp::Break => return RwResult::Break,
                RewriteOp::If { cond, ops, conf } => {
                    let hit = {
                        let mut st = rc.st.borrow_mut();
                        test(rc, &mut st, cond)
                    };
                    if hit {
                        rc.st.borrow_mut().conf = conf.clone();
                        match run_boxed(rc, ops).await {
                            RwResult::Continue => {}
                            other => return other,
                        }
                    }
                }
            }
        }
        RwResult::Continue
    })
}

/// nginx's `absolute_redirect on`: `scheme://host[:port]` + path.
pub fn absolute(rc: &ReqCtx, st: &ReqState, path: &str) -> String {
    if rc.is_subrequest() {
        // nginx completes a relative Location in its last header filter, which a subrequest's
        // response never reaches: `res.header.Location` keeps the path.
        return path.to_string();
    }
    let host = super::variables::host(st).unwrap_or_else(|| st.server.primary_name.clone());
    let port = rc.conn.local.port();
    if port == 80 {
        format!("http://{}{}", host, path)
    } else {
        format!("http://{}:{}{}", host, port, path)
    }
}

fn test(rc: &ReqCtx, st: &mut ReqState, cond: &Cond) -> bool {
    match cond {
        Cond::Truthy(t) => {
            let v = eval(rc, st, t);
            !(v.is_empty() || v == b"0")
        }
        Cond::Eq(a, b, want) => (eval(rc, st, a) == eval(rc, st, b)) == *want,
        Cond::Regex(t, re, want) => {
            let v = eval(rc, st, t);
            match re.captures(&v) {
                Some(caps) => {
                    set_captures(st, &v, &caps);
                    *want
                }
                None => !*want,
            }
        }
        Cond::FileExists(t, ft) => {
            let p = String::from_utf8_lossy(&eval(rc, st, t)).into_owned();
            let m = std::fs::metadata(&p).ok();
            match ft {
                FileTest::File(w) => m.as_ref().is_some_and(|m| m.is_file()) == *w,
                FileTest::Dir(w) => m.as_ref().is_some_and(|m| m.is_dir()) == *w,
                FileTest::Exists(w) => m.is_some() == *w,
                FileTest::Exec(w) => {
                    use std::os::unix::fs::PermissionsExt;
                    m.as_ref()
                        .is_some_and(|m| m.permissions().mode() & 0o111 != 0)
                        == *w
                }
            }
        }
    }
}
