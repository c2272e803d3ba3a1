//! Buffered reads with cosocket semantics: a line (`*l`), a byte count, all until close (`*a`),
//! whatever is there (`receiveany`), and up to a delimiter (`receiveuntil`). Each wait for data
//! has its own timeout, as nginx re-arms its read timer per event. On an error the data read
//! so far is handed back (OpenResty's third return value, "partial") and is consumed.
//!
//! Memory is bounded: one read takes at most `chunk` bytes, and lines / delimited reads give up
//! with "line too long" past `max` bytes (OpenResty itself buffers without limit).

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a read ended without its data.
#[derive(Debug)]
pub enum ReadErr {
    Timeout,
    /// The peer closed the connection.
    Closed,
    /// A line or delimited read passed the limit.
    TooLong,
    Io(std::io::Error),
}

impl ReadErr {
    /// OpenResty's error string.
    pub fn text(&self) -> String {
        match self {
            ReadErr::Timeout => "timeout".to_string(),
            ReadErr::Closed => "closed".to_string(),
            ReadErr::TooLong => "line too long".to_string(),
            ReadErr::Io(e) => super::stream::error_text(e),
        }
    }

    /// Whether the connection is still usable (OpenResty keeps it after a timeout).
    pub fn keeps_socket(&self) -> bool {
        matches!(self, ReadErr::Timeout | ReadErr::TooLong)
    }
}

/// A failed read: the error and the data consumed so far.
pub type Failed = (ReadErr, Bytes);

/// One read of at most `chunk` bytes appended to `buf`, within `timeout`.
pub async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    chunk: usize,
    timeout: Duration,
) -> Result<(), ReadErr> {
    buf.reserve(chunk);
    let mut lim = buf.limit(chunk);
    match tokio::time::timeout(timeout, r.read_buf(&mut lim)).await {
        Err(_) => Err(ReadErr::Timeout),
        Ok(Ok(0)) => Err(ReadErr::Closed),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(ReadErr::Io(e)),
    }
}

fn take_all(buf: &mut BytesMut) -> Bytes {
    buf.split().freeze()
}

fn strip_cr(b: &[u8]) -> Bytes {
    if b.contains(&b'\r') {
        Bytes::from(
            b.iter()
                .copied()
                .filter(|&c| c != b'\r')
                .collect::<Vec<u8>>(),
        )
    } else {
        Bytes::copy_from_slice(b)
    }
}

/// `receive("*l")`: a line without its `\n`; every `\r` in it is dropped, as OpenResty does.
pub async fn line<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    chunk: usize,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, Failed> {
    let mut scanned = 0;
    loop {
        if let Some(i) = memchr(b'\n', &buf[scanned..]) {
            let i = scanned + i;
            let l = buf.split_to(i + 1);
            return Ok(strip_cr(&l[..i]));
        }
        scanned = buf.len();
        if buf.len() >= max {
            let p = strip_cr(&take_all(buf));
            return Err((ReadErr::TooLong, p));
        }
        let room = chunk.min(max - buf.len()).max(1);
        if let Err(e) = fill(r, buf, room, timeout).await {
            return Err((e, strip_cr(&take_all(buf))));
        }
    }
}

/// `receive(n)`: exactly `n` bytes.
pub async fn exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    n: usize,
    chunk: usize,
    timeout: Duration,
) -> Result<Bytes, Failed> {
    while buf.len() < n {
        // Large counts read in bigger steps (a body), never more than what is still missing.
        let want = (n - buf.len()).min(chunk.max(64 * 1024));
        if let Err(e) = fill(r, buf, want, timeout).await {
            return Err((e, take_all(buf)));
        }
    }
    Ok(buf.split_to(n).freeze())
}

/// `receive("*a")`: everything until the peer closes (closing is not an error here).
pub async fn all<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    chunk: usize,
    timeout: Duration,
) -> Result<Bytes, Failed> {
    loop {
        match fill(r, buf, chunk.max(16 * 1024), timeout).await {
            Ok(()) => {}
            Err(ReadErr::Closed) => return Ok(take_all(buf)),
            Err(e) => return Err((e, take_all(buf))),
        }
    }
}

/// `receiveany(max)`: what is buffered, else the next read, at most `max` bytes.
pub async fn any<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
    chunk: usize,
    timeout: Duration,
) -> Result<Bytes, Failed> {
    if buf.is_empty() {
        if let Err(e) = fill(r, buf, chunk.min(max).max(1), timeout).await {
            return Err((e, Bytes::new()));
        }
    }
    let n = buf.len().min(max);
    Ok(buf.split_to(n).freeze())
}

/// State of one `receiveuntil` iterator between calls.
#[derive(Debug, Default)]
pub struct Until {
    /// In size mode, the delimiter was reached: the next call returns nil and starts over.
    pub done: bool,
}

/// One call of a `receiveuntil` iterator. `Ok(None)` is the end of a size-mode stream.
#[allow(clippy::too_many_arguments)]
pub async fn until<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    st: &mut Until,
    pat: &[u8],
    inclusive: bool,
    size: Option<usize>,
    chunk: usize,
    max: usize,
    timeout: Duration,
) -> Result<Option<Bytes>, Failed> {
    if st.done {
        st.done = false;
        return Ok(None);
    }
    let plen = pat.len();
    // Where the next search starts: bytes already searched cannot hold a whole match.
    let mut from = 0;
    loop {
        if let Some(i) = find(&buf[from..], pat).map(|i| i + from) {
            let end = if inclusive { i + plen } else { i };
            return Ok(match size {
                None => {
                    let data = buf.split_to(end).freeze();
                    if !inclusive {
                        buf.advance(plen);
                    }
                    Some(data)
                }
                Some(sz) if end > sz => Some(buf.split_to(sz).freeze()),
                Some(_) => {
                    let data = buf.split_to(end).freeze();
                    if !inclusive {
                        buf.advance(plen);
                    }
                    if data.is_empty() {
                        None
                    } else {
                        st.done = true;
                        Some(data)
                    }
                }
            });
        }
        if let Some(sz) = size {
            // Bytes that cannot start the delimiter may go out already.
            let safe = buf.len() - partial_suffix(buf, pat);
            if safe >= sz {
                return Ok(Some(buf.split_to(sz).freeze()));
            }
        } else if buf.len() >= max {
            return Err((ReadErr::TooLong, take_all(buf)));
        }
        let room = if size.is_some() {
            chunk
        } else {
            chunk.min(max - buf.len()).max(1)
        };
        from = buf.len().saturating_sub(plen - 1);
        if let Err(e) = fill(r, buf, room, timeout).await {
            return Err((e, take_all(buf)));
        }
    }
}

fn memchr(c: u8, b: &[u8]) -> Option<usize> {
    b.iter().position(|&x| x == c)
}

fn find(hay: &[u8], pat: &[u8]) -> Option<usize> {
    if pat.is_empty() || hay.len() < pat.len() {
        return None;
    }
    hay.windows(pat.len()).position(|w| w == pat)
}

/// Length of the longest end of `b` that is a proper prefix of `pat`.
fn partial_suffix(b: &[u8], pat: &[u8]) -> usize {
    let m = pat.len().saturating_sub(1).min(b.len());
    (1..=m)
        .rev()
        .find(|&k| b[b.len() - k..] == pat[..k])
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const T: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn lines_and_counts() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"he\rllo\r\nworld\nabc").await.unwrap();
        drop(a);
        let mut buf = BytesMut::new();
        assert_eq!(line(&mut b, &mut buf, 3, 100, T).await.unwrap(), "hello");
        assert_eq!(line(&mut b, &mut buf, 3, 100, T).await.unwrap(), "world");
        let (e, p) = line(&mut b, &mut buf, 3, 100, T).await.unwrap_err();
        assert_eq!((e.text().as_str(), &p[..]), ("closed", &b"abc"[..]));
    }

    #[tokio::test]
    async fn line_is_bounded() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&[b'x'; 5000]).await.unwrap();
        let mut buf = BytesMut::new();
        let (e, p) = line(&mut b, &mut buf, 512, 1024, T).await.unwrap_err();
        assert_eq!(e.text(), "line too long");
        assert_eq!(p.len(), 1024);
        let (e, p) = exact(&mut b, &mut buf, 10_000, 512, T).await.unwrap_err();
        assert_eq!(e.text(), "timeout");
        assert_eq!(p.len(), 5000 - 1024);
    }

    #[tokio::test]
    async fn until_with_and_without_size() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"abc--Xdefgh--X--Xtail").await.unwrap();
        drop(a);
        let mut buf = BytesMut::new();
        let mut st = Until::default();
        let r = until(&mut b, &mut buf, &mut st, b"--X", false, None, 4, 100, T).await;
        assert_eq!(r.unwrap().unwrap(), "abc");
        let mut got = Vec::new();
        while let Some(d) = until(&mut b, &mut buf, &mut st, b"--X", false, Some(2), 4, 100, T)
            .await
            .unwrap()
        {
            got.push(d);
        }
        assert_eq!(got, vec!["de", "fg", "h"]);
        // Delimiter at once: nil straight away in size mode.
        let r = until(&mut b, &mut buf, &mut st, b"--X", false, Some(2), 4, 100, T).await;
        assert!(r.unwrap().is_none());
        let r = until(&mut b, &mut buf, &mut st, b"--X", true, None, 4, 100, T).await;
        let (e, p) = r.unwrap_err();
        assert_eq!((e.text().as_str(), &p[..]), ("closed", &b"tail"[..]));
    }

    #[test]
    fn suffixes() {
        assert_eq!(partial_suffix(b"abc-", b"--X"), 1);
        assert_eq!(partial_suffix(b"abc--", b"--X"), 2);
        assert_eq!(partial_suffix(b"abc", b"--X"), 0);
    }
}
