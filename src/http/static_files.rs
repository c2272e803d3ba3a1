//! nginx's default content handler: files under `root`, `index`, the directory redirect.

use std::rc::Rc;

use http::HeaderValue;

use super::engine::Outcome;
use super::request::ReqCtx;

/// Serve `$uri` from `root`.
pub async fn serve(rc: &Rc<ReqCtx>) -> Outcome {
    let (method, uri, root, index) = {
        let st = rc.st.borrow();
        (
            st.method.clone(),
            st.uri.clone(),
            rc.env.cfg.prefix.join(&st.conf.root),
            st.conf.index.clone(),
        )
    };
    if method != http::Method::GET && method != http::Method::HEAD {
        return Outcome::Status(405);
    }
    let mut path = root.join(uri.trim_start_matches('/'));
    if uri.ends_with('/') {
        let mut found = None;
        for i in &index {
            let p = path.join(i);
            if tokio::fs::metadata(&p)
                .await
                .map(|m| m.is_file())
                .unwrap_or(false)
            {
                found = Some(p);
                break;
            }
        }
        match found {
            Some(p) => path = p,
            None => {
                let exists = tokio::fs::metadata(&path)
                    .await
                    .map(|m| m.is_dir())
                    .unwrap_or(false);
                if exists {
                    crate::log::request_error(
                        rc,
                        crate::log::Level::Error,
                        &format!("directory index of \"{}\" is forbidden", path.display()),
                    );
                    return Outcome::Status(403);
                }
                crate::log::request_error(
                    rc,
                    crate::log::Level::Error,
                    &format!(
                        "\"{}index.html\" is not found (2: No such file or directory)",
                        path.display()
                    ),
                );
                return Outcome::Status(404);
            }
        }
    }
    let meta = match tokio::fs::metadata(&path).await {
        Ok(m) => m,
        Err(e) => {
            log_open_error(rc, &path, &e);
            return Outcome::Status(if e.kind() == std::io::ErrorKind::PermissionDenied {
                403
            } else {
                404
            });
        }
    };
    if meta.is_dir() {
        let mut st = rc.st.borrow_mut();
        let mut loc = super::rewrite::absolute(rc, &st, &format!("{}/", uri));
        if let Some(a) = st.args.as_ref().filter(|a| !a.is_empty()) {
            loc.push('?');
            loc.push_str(a);
        }
        if let Ok(v) = HeaderValue::from_str(&loc) {
            st.resp_headers.insert(http::header::LOCATION, v);
        }
        return Outcome::Status(301);
    }
    let data = match tokio::fs::read(&path).await {
        Ok(d) => d,
        Err(e) => {
            log_open_error(rc, &path, &e);
            return Outcome::Status(403);
        }
    };
    let mut st = rc.st.borrow_mut();
    if st.status == 0 {
        st.status = 200;
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let ct = match st.conf.types.get(&ext) {
        Some(t) => HeaderValue::from_str(t).ok(),
        None => Some(st.conf.default_type.clone()),
    };
    if let Some(v) = ct {
        st.resp_headers.insert(http::header::CONTENT_TYPE, v);
    }
    if let Ok(m) = meta.modified() {
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(m)) {
            st.resp_headers.insert(http::header::LAST_MODIFIED, v);
        }
        let secs = m
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Ok(v) = HeaderValue::from_str(&format!("\"{:x}-{:x}\"", secs, meta.len())) {
            st.resp_headers.insert(http::header::ETAG, v);
        }
    }
    // nginx's `if_modified_since exact`: 304 when the client has this very version.
    let not_modified = match (
        st.headers.get(http::header::IF_MODIFIED_SINCE),
        st.resp_headers.get(http::header::LAST_MODIFIED),
    ) {
        (Some(ims), Some(lm)) => ims.as_bytes() == lm.as_bytes(),
        _ => false,
    };
    if not_modified && st.status == 200 {
        st.status = 304;
        st.resp_headers.remove(http::header::CONTENT_TYPE);
        return Outcome::Done;
    }
    st.out.extend_from_slice(&data);
    Outcome::Done
}

/// nginx's `open() "/path" failed (2: No such file or directory)`.
fn log_open_error(rc: &ReqCtx, path: &std::path::Path, e: &std::io::Error) {
    let msg = format!(
        "open() \"{}\" failed ({}: {})",
        path.display(),
        e.raw_os_error().unwrap_or(0),
        os_reason(e)
    );
    crate::log::request_error(rc, crate::log::Level::Error, &msg);
}

fn os_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_string()
}
