//! One client connection around hyper: the keepalive (header read) timeout and graceful
//! shutdown, kept off the per-request path.
//!
//! hyper's own `header_read_timeout` boxes a fresh tokio timer for every request and puts it
//! in the timer wheel while it waits for the next head; selecting on the shutdown channel
//! beside the connection polls that channel at every wake-up of the connection. Here a
//! watchdog task per connection owns one timer that moves only when it fires (at most once
//! per timeout, not once per request), and a request only flips two cells. The rules are
//! those of hyper's timer: the clock runs from the accept, or from the moment the last byte of
//! a response was written, until the next request head is parsed; it never runs while a
//! request is being served. When it runs out the connection is dropped (closed), as when
//! hyper's header timeout fires. hyper takes a response's last frame before it has written it
//! to a slow client, so the socket is wrapped ([`Tracked`]) to learn when writing last made
//! progress: a download that outlives keepalive_timeout is not cut (nginx starts the keepalive
//! timer only after the response was sent).
//!
//! The same watchdog is `send_timeout`: while a write to the client is blocked (the socket
//! would block, or took part of its bytes), the connection is closed once no write made
//! progress for that long, whether the request is still being served or hyper is flushing its
//! last bytes. The socket wrapper tells the watchdog when a write blocks (a stored
//! notification: nothing per unblocked write), so the send deadline is exact; while a write is
//! blocked the watchdog also looks again once per keepalive timeout, never later than an idle
//! deadline that can follow the stall (unblocked, response finished, plus that timeout).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http_body::{Frame, SizeHint};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::conf::model::{LocConf, Location, RewriteOp};
use crate::conf::Config;
use crate::http::body::{Body, Chunk};
use crate::http::request::ConnInfo;
use crate::log::{self as elog, Level};

/// What the socket wrapper tells the watchdog about writes; shared across threads because
/// hyper requires the socket to be `Send` (for upgrades).
#[derive(Default)]
struct WriteClock {
    /// When a write last made progress after a stall, or last blocked, in nanoseconds after
    /// the connection was born.
    at: AtomicU64,
    /// A write is blocked now.
    blocked: AtomicBool,
    /// Notified when a write starts to block.
    blocks: Notify,
}

/// What the connection task and its watchdog share.
pub struct ConnState {
    /// A request head was handed to the engine and hyper has not finished its response body.
    busy: Cell<bool>,
    /// When the connection last became idle (accepted, or a response finished).
    idle_since: Cell<Instant>,
    /// Shared with the socket wrapper.
    writes: Arc<WriteClock>,
    born: Instant,
    /// The timeout ran out: close now.
    expired: Cell<bool>,
    /// The worker is shutting down: finish the current request, then close.
    shutdown: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl ConnState {
    pub fn new() -> Rc<ConnState> {
        Rc::new(ConnState {
            busy: Cell::new(false),
            idle_since: Cell::new(Instant::now()),
            writes: Arc::new(WriteClock::default()),
            born: Instant::now(),
            expired: Cell::new(false),
            shutdown: Cell::new(false),
            waker: RefCell::new(None),
        })
    }

    /// A request head was parsed: the timeout stops until its response is written.
    pub fn request_started(&self) {
        self.busy.set(true);
    }

    fn response_finished(&self) {
        self.busy.set(false);
        self.idle_since.set(Instant::from_std(crate::clock::now()));
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }
}

/// The client socket: records when a write last made progress (see the module doc). A write
/// taken whole at once needs no clock: it happens while a request is served or right after
/// its response finished (`idle_since`), and neither moves the deadline. The clock is read
/// when a write first blocks (would block, or took part of its bytes) and at each progress
/// after that, until a write goes through whole.
pub struct Tracked<S> {
    io: S,
    writes: Arc<WriteClock>,
    born: Instant,
    stalled: bool,
}

impl<S> Tracked<S> {
    pub fn new(io: S, state: &ConnState) -> Tracked<S> {
        Tracked {
            io,
            writes: state.writes.clone(),
            born: state.born,
            stalled: false,
        }
    }

    fn stamp(&self) {
        let ns = self.born.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.writes.at.store(ns, Ordering::Relaxed);
    }

    /// Note the result of a write of `len` bytes.
    fn track(&mut self, r: &Poll<std::io::Result<usize>>, len: usize) {
        let was = self.stalled;
        match r {
            Poll::Ready(Ok(n)) if *n >= len && !was => return,
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.stamp();
                self.stalled = *n < len;
            }
            Poll::Pending if !was => {
                self.stamp();
                self.stalled = true;
            }
            _ => return,
        }
        if self.stalled != was {
            self.writes.blocked.store(self.stalled, Ordering::Relaxed);
            if self.stalled {
                self.writes.blocks.notify_one();
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.track(&r, buf.len());
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.track(&r, bufs.iter().map(|b| b.len()).sum());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The response body handed to hyper: hyper drops it once it has taken the last frame, which
/// is when it goes back to reading the next request head (and its header timer would start).
pub struct ConnBody {
    body: Body,
    state: Rc<ConnState>,
}

impl ConnBody {
    pub fn new(body: Body, state: Rc<ConnState>) -> ConnBody {
        ConnBody { body, state }
    }
}

impl Drop for ConnBody {
    fn drop(&mut self) {
        self.state.response_finished();
    }
}

impl http_body::Body for ConnBody {
    type Data = Chunk;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Chunk>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How [`Watched`] ended.
pub enum End<T> {
    /// The connection finished (hyper's result).
    Done(T),
    /// The keepalive / header timeout or the send timeout ran out.
    Expired,
}

/// Polls the connection; starts hyper's graceful shutdown when the worker asks for it and
/// stops when the watchdog says the timeout ran out. Checking two cells per poll is all it
/// adds.
pub struct Watched<'a, C> {
    conn: Pin<&'a mut C>,
    state: &'a ConnState,
    graceful: Option<fn(Pin<&mut C>)>,
}

impl<'a, C: Future> Watched<'a, C> {
    pub fn new(conn: Pin<&'a mut C>, state: &'a ConnState, graceful: fn(Pin<&mut C>)) -> Self {
        Watched {
            conn,
            state,
            graceful: Some(graceful),
        }
    }
}

impl<C: Future> Future for Watched<'_, C> {
    type Output = End<C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        {
            let mut w = this.state.waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        if this.state.expired.get() {
            return Poll::Ready(End::Expired);
        }
        if this.state.shutdown.get() {
            if let Some(g) = this.graceful.take() {
                g(this.conn.as_mut());
            }
        }
        this.conn.as_mut().poll(cx).map(End::Done)
    }
}

/// What the watchdog found when it looked.
enum Due {
    At(Instant),
    /// The keepalive (header) timeout ran out.
    Idle,
    /// A write made no progress for send_timeout.
    Send,
}

fn due(state: &ConnState, conn: &ConnInfo, timeout: Duration, now: Instant) -> Due {
    let w = &state.writes;
    let wrote = state.born + Duration::from_nanos(w.at.load(Ordering::Relaxed));
    if w.blocked.load(Ordering::Relaxed) {
        let at = wrote.checked_add(Duration::from_millis(conn.send_timeout_ms.get()));
        return match at {
            Some(at) if at <= now => Due::Send,
            // Looked at again within the keepalive timeout at the latest: the write may
            // unblock and the response end (neither notifies), and the idle deadline that
            // follows can come before the send deadline.
            Some(at) => Due::At(at.min(now + timeout)),
            None => Due::At(now + timeout),
        };
    }
    if state.busy.get() {
        // Nothing can run out while a request is served and its writes go through; a write
        // that blocks notifies the watchdog.
        return Due::At(now + timeout);
    }
    let at = state.idle_since.get().max(wrote) + timeout;
    if at <= now {
        Due::Idle
    } else {
        Due::At(at)
    }
}

/// The connection's timer: sleeps until a timeout could run out, then looks whether it did.
/// Also turns the worker's shutdown signal into the connection's flag.
pub async fn watchdog(
    state: Rc<ConnState>,
    conn: Rc<ConnInfo>,
    timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let sleep = tokio::time::sleep_until(state.idle_since.get() + timeout);
    tokio::pin!(sleep);
    let mut shutting_down = false;
    let writes = state.writes.clone();
    loop {
        tokio::select! {
            _ = sleep.as_mut() => {}
            _ = writes.blocks.notified() => {}
            r = shutdown.wait_for(|v| *v), if !shutting_down => {
                shutting_down = true;
                if r.is_ok() {
                    state.shutdown.set(true);
                    state.wake();
                }
                continue;
            }
        }
        match due(&state, &conn, timeout, Instant::now()) {
            Due::At(next) => sleep.as_mut().reset(next),
            end => {
                if let Due::Send = end {
                    // nginx's line (at info: a client going away is not the server's fault).
                    elog::log(
                        Level::Info,
                        Some(conn.id),
                        &format!(
                            "client timed out (110: Connection timed out) while sending response to client, client: {}",
                            conn.remote.ip()
                        ),
                    );
                }
                state.expired.set(true);
                state.wake();
                return;
            }
        }
    }
}

/// Stops the watchdog when the connection's future ends or is dropped (a worker dropping its
/// tasks), so the timer never outlives its connection.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether any location (or `if` block, named location, server) of the configuration has
/// `lua_check_client_abort on`. Only then must hyper watch a connection for EOF while a
/// request runs (it reads the socket once more per request to do so, and keeps the request
/// head's read buffer from being reused).
pub fn watches_client_abort(cfg: &Config) -> bool {
    fn ops(list: &[RewriteOp]) -> bool {
        list.iter().any(|op| match op {
            RewriteOp::If {
                ops: inner, conf, ..
            } => on(conf) || ops(inner),
            _ => false,
        })
    }
    fn loc(l: &Location) -> bool {
        on(&l.conf) || ops(&l.rewrites) || l.children.iter().any(|c| loc(c))
    }
    fn on(c: &LocConf) -> bool {
        c.check_client_abort
    }
    cfg.http.conf.as_deref().is_some_and(on)
        || cfg.http.servers.iter().any(|s| {
            on(&s.conf)
                || ops(&s.rewrites)
                || s.locations.iter().any(|l| loc(l))
                || s.named.values().any(|l| loc(l))
        })
}
