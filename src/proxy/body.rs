//! The request body sent upstream: none, a kept buffer (replayable for a retry), or the
//! client's body streamed as it arrives (sent once, never kept).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A request body for the upstream client.
pub enum UpBody {
    Empty,
    Full(Option<Bytes>),
    /// The client's body, read frame by frame while hyper writes it upstream.
    Stream(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            UpBody::Stream(inc) => loop {
                // Trailers are not forwarded (nginx drops request trailers too).
                match Pin::new(&mut *inc).poll_frame(cx) {
                    Poll::Ready(Some(Ok(f))) => match f.into_data() {
                        Ok(d) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                        Err(_) => continue,
                    },
                    other => return other,
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty | UpBody::Full(None) => true,
            UpBody::Full(Some(_)) => false,
            UpBody::Stream(i) => i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty | UpBody::Full(None) => SizeHint::with_exact(0),
            UpBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            UpBody::Stream(i) => i.size_hint(),
        }
    }
}

/// Where the request body comes from, across tries.
pub enum BodySrc {
    Empty,
    /// Read whole (request buffering, small bodies when retries are possible, or Lua read it):
    /// every try sends it again.
    Kept(Bytes),
    /// Streamed from the client; `None` once a try took it.
    Stream(Option<Incoming>),
}

impl BodySrc {
    /// The body for the next try.
    pub fn take(&mut self) -> UpBody {
        match self {
            BodySrc::Empty => UpBody::Empty,
            BodySrc::Kept(b) => UpBody::Full(Some(b.clone())),
            BodySrc::Stream(s) => match s.take() {
                Some(i) => UpBody::Stream(i),
                None => UpBody::Empty,
            },
        }
    }

    /// Whether another try can send the body again.
    pub fn replayable(&self) -> bool {
        !matches!(self, BodySrc::Stream(None))
    }
}
