//! Output filters: the header filter (status default, Content-Type, add_header, headers-more,
//! header_filter_by_lua) runs once before the head goes out; the body filter
//! (body_filter_by_lua) sees every chunk with its eof flag. [`send`] pushes buffered output
//! through both and hands it to hyper: as one whole body when the handler already finished,
//! else as a stream.

use std::rc::Rc;

use bytes::{Buf, Bytes};
use http::header::Entry;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use tokio::sync::mpsc;

use super::body::{Body, Chunk};
use super::request::{HeadSlot, LuaArgs, Phase, ReqCtx};
use crate::conf::model::MoreHeaders;
use crate::lua::phase as lua_phase;

// Constants: `HeaderValue::from_static` checks its bytes when it runs, once per response.
const SERVER_TOKENS: HeaderValue =
    HeaderValue::from_static(concat!("tidegate/", env!("CARGO_PKG_VERSION")));
const SERVER_NAME: HeaderValue = HeaderValue::from_static("tidegate");

const ADD_HEADER_STATUSES: &[u16] = &[200, 201, 204, 206, 301, 302, 303, 304, 307, 308];

/// Send buffered output (and the head, the first time). `eof` ends the response.
pub async fn send(rc: &Rc<ReqCtx>, eof: bool) -> Result<(), String> {
    send_with(rc, None, eof).await
}

/// [`send`] with `chunk` after the buffered output; when nothing is buffered the chunk goes
/// on as it is, without the copy into the output buffer (the proxy's upstream body).
pub async fn send_chunk(rc: &Rc<ReqCtx>, chunk: Bytes, eof: bool) -> Result<(), String> {
    send_with(rc, Some(chunk), eof).await
}

async fn send_with(rc: &Rc<ReqCtx>, extra: Option<Bytes>, eof: bool) -> Result<(), String> {
    if rc.st.borrow().eof_sent {
        return Ok(());
    }
    if !rc.st.borrow().headers_sent {
        header_filter(rc).await;
    }
    let chunk = {
        let mut st = rc.st.borrow_mut();
        match extra {
            Some(b) if st.out.is_empty() => Chunk::Shared(b),
            Some(b) => {
                st.out.extend_from_slice(&b);
                take_out(&mut st.out, eof)
            }
            None => take_out(&mut st.out, eof),
        }
    };
    let (chunk, eof) = body_filter(rc, chunk, eof).await;
    if let Some(sub) = &rc.sub {
        // A subrequest's response is captured for its parent (ngx.location.capture), never sent.
        let mut st = rc.st.borrow_mut();
        st.body_bytes_sent += chunk.remaining() as u64;
        // A HEAD subrequest has no body, whatever its handler printed (nginx's header_only).
        if st.method != http::Method::HEAD {
            sub.body.borrow_mut().extend_from_slice(chunk.as_ref());
        }
        if eof {
            st.eof_sent = true;
            sub.complete.set(true);
        }
        return Ok(());
    }
    // Decide under the borrow, await after it: another request's coroutine may run meanwhile.
    let (head, send) = {
        let mut st = rc.st.borrow_mut();
        st.body_bytes_sent += chunk.remaining() as u64;
        if matches!(st.head, HeadSlot::Waiting | HeadSlot::Gone) {
            let body = if eof {
                Body::chunk(chunk)
            } else {
                let (tx, rx) = mpsc::channel(16);
                if !chunk.is_empty() {
                    let _ = tx.try_send(chunk.into_bytes());
                }
                st.body_tx = Some(tx);
                Body::Stream(rx)
            };
            if eof {
                st.eof_sent = true;
            }
            let resp = build_response(&mut st, body, eof);
            // A head the client left before is dropped; later output finds the body closed.
            let gone = matches!(st.head, HeadSlot::Gone);
            st.head = if gone {
                HeadSlot::Done
            } else {
                HeadSlot::Ready(resp)
            };
            (Some(gone), None)
        } else {
            let tx = st.body_tx.clone();
            if eof {
                st.eof_sent = true;
                st.body_tx = None;
            }
            (None, tx.map(|tx| (tx, chunk)))
        }
    };
    if let Some(gone) = head {
        return match gone {
            true => Err("client closed connection".to_string()),
            false => Ok(()),
        };
    }
    if let Some((tx, chunk)) = send {
        if !chunk.is_empty() {
            tx.send(chunk.into_bytes())
                .await
                .map_err(|_| "client closed connection".to_string())?;
        }
    }
    Ok(())
}

/// The buffered output as one chunk. The last one takes the buffer whole (its room goes back
/// to the pool once hyper copied it out, see `body::Chunk`). An earlier one (a flush) takes
/// it whole too and later output starts a buffer of its own: a split-off rest would still
/// share the flushed allocation, and pooling that rest would pin the whole of it (its
/// `capacity()` shows only the room left).
fn take_out(out: &mut bytes::BytesMut, eof: bool) -> Chunk {
    if eof {
        Chunk::out(std::mem::take(out))
    } else {
        Chunk::Shared(std::mem::take(out).freeze())
    }
}

/// Cut a streamed response off (its source failed mid-body): the client connection is closed
/// instead of the body ending as if complete.
pub async fn abort(rc: &Rc<ReqCtx>) {
    let tx = {
        let mut st = rc.st.borrow_mut();
        st.eof_sent = true;
        st.out.clear();
        st.body_tx.take()
    };
    if let Some(tx) = tx {
        let _ = tx.send(Bytes::new()).await;
    }
}

fn build_response(st: &mut super::request::ReqState, body: Body, eof: bool) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(st.status).unwrap_or(StatusCode::OK);
    let h = resp.headers_mut();
    // Once the response is complete only the log phase may read the headers again
    // ($sent_http_*, ngx.header); without one they can move out instead of being copied.
    if !eof || st.conf.log_by_lua.is_some() || !st.conf.access_logs.is_empty() {
        *h = st.resp_headers.clone();
    } else {
        // A swap leaves the response's fresh empty map in the request: no map made or
        // dropped here.
        std::mem::swap(h, &mut st.resp_headers);
    }
    if st.status == 444 {
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The header filter: runs once per response.
async fn header_filter(rc: &Rc<ReqCtx>) {
    {
        let mut guard = rc.st.borrow_mut();
        let st = &mut *guard;
        st.headers_sent = true;
        if st.status == 0 {
            st.status = 200;
        }
        let status = st.status;
        // entry(): one hash and probe where contains_key + insert took two.
        if status != 204 && status != 304 && status >= 200 {
            if let Entry::Vacant(e) = st.resp_headers.entry(http::header::CONTENT_TYPE) {
                e.insert(st.conf.default_type.clone());
            }
        }
        // nginx adds Server (ngx_http_header_filter) and add_header (ngx_http_headers_filter)
        // to the main request only; a subrequest's captured headers have neither.
        let main = !rc.is_subrequest();
        // Added before headers-more runs so that `more_clear_headers Server` can remove it.
        if main {
            let tokens = st.conf.server_tokens;
            if let Entry::Vacant(e) = st.resp_headers.entry(http::header::SERVER) {
                e.insert(if tokens { SERVER_TOKENS } else { SERVER_NAME });
            }
        }
        // The location's configuration is cloned (an atomic count shared by the workers) only
        // when its headers directives need it beside the mutable state.
        let edits =
            (main && !st.conf.add_headers.is_empty()) || !st.conf.more_set_headers.is_empty();
        let conf = edits.then(|| st.conf.clone());
        let conf = conf.as_deref();
        for ah in conf
            .iter()
            .flat_map(|c| c.add_headers.iter())
            .filter(|_| main)
        {
            if ah.always || ADD_HEADER_STATUSES.contains(&status) {
                let v = super::variables::eval(rc, st, &ah.value);
                if v.is_empty() {
                    continue;
                }
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(ah.name.as_bytes()),
                    HeaderValue::from_bytes(&v),
                ) {
                    st.resp_headers.append(n, v);
                }
            }
        }
        for m in conf.iter().flat_map(|c| c.more_set_headers.iter()) {
            apply_more(rc, st, m, true);
        }
        let conn = &rc.conn;
        if main {
            conn.send_timeout_ms.set(st.conf.send_timeout_ms);
        }
        let limit = st.conf.keepalive_requests;
        if main && limit > 0 && conn.requests.get() >= limit {
            st.resp_headers
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    let (lua, body_lua) = {
        let st = rc.st.borrow();
        (
            st.conf.header_filter_by_lua.clone(),
            st.conf.body_filter_by_lua.is_some(),
        )
    };
    if let Some(chunk) = &lua {
        let prev = rc.st.borrow().phase;
        let _ = lua_phase::run(rc, chunk, Phase::HeaderFilter).await;
        rc.st.borrow_mut().phase = prev;
    }
    if body_lua {
        // The filter may change the length; the response goes out chunked instead.
        rc.st
            .borrow_mut()
            .resp_headers
            .remove(http::header::CONTENT_LENGTH);
    }
}

/// Apply one headers-more directive to the response (`output`) or request headers.
pub fn apply_more(rc: &ReqCtx, st: &mut super::request::ReqState, m: &MoreHeaders, output: bool) {
    if output && !m.statuses.is_empty() && !m.statuses.contains(&st.status) {
        return;
    }
    if !m.types.is_empty() {
        let headers = if output {
            &st.resp_headers
        } else {
            &st.headers
        };
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let ct = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !m.types.contains(&ct) {
            return;
        }
    }
    for (name, value) in &m.headers {
        let v = value.as_ref().map(|t| super::variables::eval(rc, st, t));
        let headers = if output {
            &mut st.resp_headers
        } else {
            &mut st.headers
        };
        if let Some(prefix) = name.strip_suffix('*') {
            let prefix = prefix.to_ascii_lowercase();
            let names: Vec<HeaderName> = headers
                .keys()
                .filter(|k| k.as_str().starts_with(&prefix))
                .cloned()
                .collect();
            for n in names {
                headers.remove(n);
            }
            continue;
        }
        let Ok(n) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        match v {
            Some(v) if !v.is_empty() => {
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    headers.insert(n, v);
                }
            }
            _ => {
                headers.remove(n);
            }
        }
    }
}

/// The body filter: body_filter_by_lua sees (and may replace) each chunk.
async fn body_filter(rc: &Rc<ReqCtx>, chunk: Chunk, eof: bool) -> (Chunk, bool) {
    let conf = rc.st.borrow().conf.clone();
    let Some(lua_chunk) = &conf.body_filter_by_lua else {
        return (chunk, eof);
    };
    let prev = {
        let mut st = rc.st.borrow_mut();
        st.arg = LuaArgs::Body {
            chunk: chunk.into_bytes(),
            eof,
        };
        st.phase
    };
    let _ = lua_phase::run(rc, lua_chunk, Phase::BodyFilter).await;
    let mut st = rc.st.borrow_mut();
    st.phase = prev;
    match std::mem::take(&mut st.arg) {
        LuaArgs::Body { chunk, eof: e } => (Chunk::Shared(chunk), e || eof),
        _ => (Chunk::Shared(Bytes::new()), eof),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_takes_the_buffer_whole() {
        // Nothing may stay behind sharing the flushed allocation (see `take_out`).
        let mut out = bytes::BytesMut::with_capacity(100_000);
        out.extend_from_slice(&[b'x'; 90_000]);
        let c = take_out(&mut out, false);
        assert_eq!(c.as_ref().len(), 90_000);
        assert_eq!(out.capacity(), 0);
        out.extend_from_slice(b"tail");
        let c = take_out(&mut out, true);
        assert_eq!(c.as_ref(), b"tail");
        assert_eq!(out.capacity(), 0);
    }
}
