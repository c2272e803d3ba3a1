//! Subrequests (`ngx.location.capture`): a new request that shares its parent's connection and
//! worker environment, walks the same phases as a main request (server rewrite, location,
//! rewrite, content; nginx skips the access phase for subrequests) and whose response is
//! captured instead of sent. Every content handler (static files, Lua, `return`, proxy) writes
//! through `filter::send`, which routes a subrequest's output to its [`Sub`] sink, so all of
//! them can be captured.
//!
//! The Lua API (`src/lua/api/location.rs`) turns its options into a [`Spec`], makes the
//! subrequests with [`create`] and runs them (concurrently for `capture_multi`) with [`run`].
//!
//! ```ignore
//! let sr = subrequest::create(&parent, spec).await?;
//! let res: Captured = subrequest::run(sr).await;
//! ```

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method};

use super::request::{ReqBody, ReqCtx, ReqState, Sub, Vars};

/// Nesting limit: nginx answers "subrequests cycle" past it.
pub const MAX_DEPTH: u32 = 50;

/// Which variables a subrequest starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VarsMode {
    /// None of the parent's (the default).
    #[default]
    Own,
    /// A copy of the parent's (`copy_all_vars`).
    Copy,
    /// The parent's very variables (`share_all_vars`).
    Share,
}

/// What to request.
pub struct Spec {
    pub method: Method,
    /// The path, as given (not unescaped, as nginx takes a subrequest's URI).
    pub uri: String,
    pub args: Option<String>,
    /// `body`: replaces the parent's body.
    pub body: Option<Bytes>,
    pub always_forward_body: bool,
    pub vars_mode: VarsMode,
    /// `vars`: set after the parent's were shared or copied.
    pub vars: Vec<(String, Bytes)>,
    /// `ctx`: the registry key of the table the subrequest sees as `ngx.ctx`.
    pub ctx: Option<mlua::RegistryKey>,
}

/// A subrequest's response as `ngx.location.capture` returns it.
pub struct Captured {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The response did not end normally (its handler failed after output had begun).
    pub truncated: bool,
}

/// The main request's line, as nginx's error log shows it for a request and its subrequests.
fn request_line(rc: &ReqCtx, st: &ReqState) -> String {
    if let Some(sub) = &rc.sub {
        return sub.request_line.clone();
    }
    let version = match st.version {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    };
    format!("{} {} {}", st.method, st.request_uri, version)
}

/// Make a subrequest of `parent`. Errors are the Lua error text (the reason is logged, as
/// nginx logs it, where lua-nginx-module only says "failed to ...").
pub async fn create(parent: &Rc<ReqCtx>, spec: Spec) -> Result<Rc<ReqCtx>, String> {
    let depth = parent.sub.as_ref().map_or(0, |s| s.depth) + 1;
    if depth > MAX_DEPTH {
        crate::log::request_error(
            parent,
            crate::log::Level::Error,
            &format!("lua subrequests cycle while processing \"{}\"", spec.uri),
        );
        return Err("failed to issue subrequest: -1".into());
    }
    // lua-nginx-module forwards the parent's body to POST and PUT subrequests (to any with
    // always_forward_body) unless `body` was given. Our subrequest cannot read the client's
    // stream itself, so the parent's body is read now when it is to be forwarded.
    let forward = spec.body.is_none()
        && (spec.always_forward_body || spec.method == Method::POST || spec.method == Method::PUT);
    if forward {
        if let Err(code) = super::engine::read_body(parent).await {
            return Err(format!("failed to read the request body: {}", code));
        }
    }
    let mut st = {
        let mut pst = parent.st.borrow_mut();
        let mut headers = pst.headers.clone();
        let body = if let Some(b) = spec.body {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(b.len()));
            headers.remove(http::header::TRANSFER_ENCODING);
            ReqBody::Read(b)
        } else if forward {
            match &pst.body {
                ReqBody::Read(b) => ReqBody::Read(b.clone()),
                _ => ReqBody::Discarded,
            }
        } else {
            if headers.contains_key(http::header::CONTENT_LENGTH) {
                headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            }
            headers.remove(http::header::TRANSFER_ENCODING);
            ReqBody::Discarded
        };
        let vars = match spec.vars_mode {
            VarsMode::Own => Vars::default(),
            VarsMode::Copy => pst.vars.copy(),
            VarsMode::Share => pst.vars.share(),
        };
        let mut st = ReqState::new(
            spec.method,
            spec.uri,
            spec.args,
            // nginx gives a subrequest its parent's unparsed URI ($request_uri).
            pst.request_uri.clone(),
            pst.version,
            headers,
            body,
            pst.server.clone(),
        );
        st.vars = vars;
        // The parent's real client address, not the connection's.
        st.realip = pst.realip;
        st.internal = true;
        st.ctx_table = spec.ctx;
        st
    };
    for (name, value) in spec.vars {
        let name = name.to_ascii_lowercase();
        if name == "args" || name == "query_string" {
            st.args = Some(String::from_utf8_lossy(&value).into_owned());
        } else if parent.env.declared.contains(&name) {
            st.vars.insert(name, value);
        } else {
            let (why, code) = if super::variables::is_known(&name) {
                (format!("variable \"{}\" not changeable", name), 500)
            } else {
                (
                    format!(
                        "variable \"{}\" cannot be assigned a value (maybe you forgot to define it first?) ",
                        name
                    ),
                    -1,
                )
            };
            crate::log::request_error(parent, crate::log::Level::Error, &why);
            return Err(format!("failed to adjust the subrequest: {}", code));
        }
    }
    let request_line = request_line(parent, &parent.st.borrow());
    let sub = Sub {
        depth,
        request_line,
        body: RefCell::new(BytesMut::new()),
        complete: Cell::new(false),
    };
    Ok(Rc::new(ReqCtx::new(
        parent.conn.clone(),
        parent.env.clone(),
        st,
        Some(Box::new(sub)),
    )))
}

/// Run a subrequest to its end and take its response.
pub async fn run(sr: Rc<ReqCtx>) -> Captured {
    super::engine::run_subrequest(&sr).await;
    let mut st = sr.st.borrow_mut();
    let (body, truncated) = match &sr.sub {
        Some(sub) => (sub.body.take().freeze(), !sub.complete.get()),
        None => (Bytes::new(), true),
    };
    Captured {
        status: if st.status == 0 { 200 } else { st.status },
        headers: std::mem::take(&mut st.resp_headers),
        body,
        truncated,
    }
}

/// nginx's `ngx_http_parse_unsafe_uri` test: a subrequest URI may not climb with `.`/`..`
/// segments (also `%2E`-encoded) nor carry a NUL.
pub fn unsafe_uri(uri: &str) -> bool {
    if uri.contains('\0') || uri.to_ascii_lowercase().contains("%00") {
        return true;
    }
    let lower = uri.to_ascii_lowercase();
    lower
        .split('/')
        .any(|seg| matches!(seg.replace("%2e", ".").as_str(), "." | ".."))
}

#[cfg(test)]
mod tests {
    use super::unsafe_uri;

    #[test]
    fn unsafe_uris() {
        assert!(unsafe_uri("/a/../b"));
        assert!(unsafe_uri("/a/%2E%2e/b"));
        assert!(unsafe_uri("/a/./b"));
        assert!(unsafe_uri("../b"));
        assert!(unsafe_uri("/a%00b"));
        assert!(!unsafe_uri("/a/..b/c.d"));
        assert!(!unsafe_uri("/"));
    }
}
