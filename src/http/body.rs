//! The response body type handed to hyper: a whole buffer (the common case: the content
//! handler finished before anything was flushed) or a channel fed by a still-running handler.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

/// A piece of response body: shared bytes, or a request's whole output buffer
/// (`ReqState.out`), which goes back to the worker's pool once hyper has copied it into its
/// write buffer. With the pool a handler's `ngx.say` writes into memory a finished request
/// gave back, and the last buffer reaches hyper without being frozen into a `Bytes` (which
/// allocates when the buffer has room left); both were an allocation per request.
pub enum Chunk {
    Shared(Bytes),
    Out(OutBuf),
}

/// A request's output buffer on its way out (see [`Chunk`]). hyper's reads move `pos`, not
/// the buffer's start, so that the buffer goes back to the pool with all its room.
pub struct OutBuf {
    buf: BytesMut,
    pos: usize,
}

thread_local! {
    static SPARE_OUT: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// At most this many spare output buffers per worker, each of at most this capacity (a
/// large page gives its memory back instead of keeping it in the pool).
const SPARE_OUT_MAX: usize = 256;
const SPARE_OUT_CAPACITY_MAX: usize = 16 * 1024;

/// An empty output buffer, with room from the pool when it has some.
pub fn spare_out() -> BytesMut {
    super::spare::take(&SPARE_OUT)
}

/// Give an output buffer's room back to the pool.
pub fn recycle_out(mut out: BytesMut) {
    if out.capacity() == 0 || out.capacity() > SPARE_OUT_CAPACITY_MAX {
        return;
    }
    out.clear();
    super::spare::give(&SPARE_OUT, out, SPARE_OUT_MAX);
}

impl Drop for OutBuf {
    fn drop(&mut self) {
        recycle_out(std::mem::take(&mut self.buf));
    }
}

impl Chunk {
    /// A request's whole output buffer.
    pub fn out(buf: BytesMut) -> Chunk {
        Chunk::Out(OutBuf { buf, pos: 0 })
    }

    pub fn is_empty(&self) -> bool {
        self.as_ref().is_empty()
    }

    /// As shared bytes (for a stream, a capture or a body filter).
    pub fn into_bytes(self) -> Bytes {
        match self {
            Chunk::Shared(b) => b,
            Chunk::Out(mut o) => {
                let mut b = std::mem::take(&mut o.buf);
                b.advance(o.pos);
                b.freeze()
            }
        }
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        match self {
            Chunk::Shared(b) => b,
            Chunk::Out(o) => &o.buf[o.pos..],
        }
    }
}

impl Buf for Chunk {
    fn remaining(&self) -> usize {
        match self {
            Chunk::Shared(b) => b.remaining(),
            Chunk::Out(o) => o.buf.len() - o.pos,
        }
    }

    fn chunk(&self) -> &[u8] {
        self.as_ref()
    }

    fn advance(&mut self, cnt: usize) {
        match self {
            Chunk::Shared(b) => b.advance(cnt),
            Chunk::Out(o) => {
                o.pos = (o.pos + cnt).min(o.buf.len());
            }
        }
    }
}

/// A response body.
pub enum Body {
    Full(Option<Chunk>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(None)
    }
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body::chunk(Chunk::Shared(b.into()))
    }
    pub fn chunk(c: Chunk) -> Body {
        if c.is_empty() {
            Body::Full(None)
        } else {
            Body::Full(Some(c))
        }
    }
}

impl http_body::Body for Body {
    type Data = Chunk;
    /// Only a streamed body fails: an empty chunk is the abort signal (see `filter::abort`),
    /// so the client sees a cut-off response instead of a clean end.
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Chunk>, Self::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| {
                o.map(|b| {
                    if b.is_empty() {
                        Err(std::io::Error::other("response aborted"))
                    } else {
                        Ok(Frame::data(Chunk::Shared(b)))
                    }
                })
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.remaining() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}
