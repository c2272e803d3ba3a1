//! One shared Redis connection per pool and worker for the plain commands of concurrent
//! `resty.redis` objects, as a pipelining client does: every command queued while the worker
//! runs other ready tasks goes out in one write, and one read answers many of them. Replies
//! come back in request order, so each queued command has a slot in a FIFO and the connection's
//! driver task fills the slots in order. A slot whose caller gave up (its read timeout, or its
//! request went away) stays in the queue and its late reply is dropped, so the replies of the
//! others stay in step.
//!
//! The shared connection is an ordinary pooled connection promoted at `set_keepalive` (so a
//! worker's first user opens, authenticates and counts reuses exactly as before), and an object
//! that needs connection state takes it back over when nothing is in flight (`take_idle`), so
//! sequential users see the single connection lua-resty-redis would give them. What may run
//! here is decided by `resty_redis.rs`: only commands that touch no connection state.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

use super::resty_redis::{io_text, parse, Io, Reply};

/// Where the shared connection goes: what an attached object needs to open a connection of
/// its own when the shared one is busy.
pub(super) struct Target {
    pub host: String,
    pub port: Option<u16>,
    pub resolver: Option<std::sync::Arc<crate::net::Resolver>>,
}

/// What a queued command gets back.
pub(super) enum CallErr {
    /// The connection failed or the wait timed out: the cosocket error text.
    Failed(String),
    /// The connection was handed over or closed while idle: use a connection of one's own.
    Gone,
}

/// The result a slot receives: a reply, or the connection's failure.
type Answer = Result<Reply, String>;

#[derive(Default)]
struct Slot {
    answer: Option<Answer>,
    waker: Option<Waker>,
    /// The caller gave up: drop the reply.
    abandoned: bool,
}

/// A connection's state that follows it between the pool, the shared role and an object.
pub(super) struct Creds {
    pub reused: u32,
    /// Hash and encoded command of the last successful `AUTH` on the connection.
    pub auth: Option<u64>,
    pub auth_cmd: Option<Rc<[u8]>>,
}

struct State {
    io: Option<Io>,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written.
    wpos: usize,
    queue: VecDeque<Rc<RefCell<Slot>>>,
    driver: Option<Waker>,
    /// The connection failed: the error every later command gets.
    dead: Option<String>,
    /// No new objects attach (a command timed out, `close`, handed over): the driver closes the
    /// connection once nothing is in flight.
    retired: bool,
    last_used: Instant,
    creds: Creds,
}

pub(super) struct Mux {
    pub target: Rc<Target>,
    st: RefCell<State>,
    /// Close the connection after it has been idle this long (the latest `set_keepalive`
    /// timeout of an attached object; 0: never).
    pub idle_ms: Cell<u64>,
}

impl Mux {
    /// Take over a pooled connection and start its driver on this worker's `LocalSet`.
    pub fn start(
        io: Io,
        rbuf: BytesMut,
        creds: Creds,
        target: Rc<Target>,
        idle_ms: u64,
    ) -> Rc<Mux> {
        let mux = Rc::new(Mux {
            target,
            st: RefCell::new(State {
                io: Some(io),
                rbuf,
                wbuf: Vec::with_capacity(4096),
                wpos: 0,
                queue: VecDeque::new(),
                driver: None,
                dead: None,
                retired: false,
                last_used: Instant::now(),
                creds,
            }),
            idle_ms: Cell::new(idle_ms),
        });
        tokio::task::spawn_local(drive(mux.clone()));
        mux
    }

    /// Whether a newly connecting object may attach.
    pub fn usable(&self) -> bool {
        let st = self.st.borrow();
        st.dead.is_none() && !st.retired && st.io.is_some()
    }

    /// A new object attaches: counts as a reuse of the connection; returns the count.
    pub fn attach(&self) -> u32 {
        let mut st = self.st.borrow_mut();
        st.creds.reused += 1;
        st.creds.reused
    }

    /// Whether the connection is authenticated with these credentials.
    pub fn has_auth(&self, h: u64) -> bool {
        self.st.borrow().creds.auth == Some(h)
    }

    pub fn auth_cmd(&self) -> Option<(u64, Rc<[u8]>)> {
        let st = self.st.borrow();
        Some((st.creds.auth?, st.creds.auth_cmd.clone()?))
    }

    /// No new objects attach; the connection closes once nothing is in flight.
    pub fn retire(&self) {
        let w = {
            let mut st = self.st.borrow_mut();
            st.retired = true;
            st.driver.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Hand the connection to one object when nothing is in flight (its driver then ends).
    pub fn take_idle(&self) -> Option<(Io, BytesMut, Creds)> {
        let (io, rbuf, creds, w) = {
            let mut st = self.st.borrow_mut();
            if st.dead.is_some()
                || !st.queue.is_empty()
                || st.wpos != st.wbuf.len()
                || !st.rbuf.is_empty()
            {
                return None;
            }
            let io = st.io.take()?;
            st.retired = true;
            let creds = Creds {
                reused: st.creds.reused,
                auth: st.creds.auth,
                auth_cmd: st.creds.auth_cmd.clone(),
            };
            (io, std::mem::take(&mut st.rbuf), creds, st.driver.take())
        };
        if let Some(w) = w {
            w.wake();
        }
        Some((io, rbuf, creds))
    }

    /// Queue one encoded command and wait for its reply, at most `read_ms`.
    pub async fn call(&self, enc: &[u8], read_ms: u64) -> Result<Reply, CallErr> {
        let slot = {
            let mut st = self.st.borrow_mut();
            if let Some(e) = &st.dead {
                return Err(CallErr::Failed(e.clone()));
            }
            if st.io.is_none() {
                return Err(CallErr::Gone);
            }
            st.wbuf.extend_from_slice(enc);
            let slot = Rc::new(RefCell::new(Slot::default()));
            st.queue.push_back(slot.clone());
            if let Some(w) = st.driver.take() {
                w.wake();
            }
            slot
        };
        let guard = Abandon(&slot);
        match super::resty_redis::with_timeout(read_ms, SlotWait(&slot)).await {
            Some(a) => {
                std::mem::forget(guard);
                a.map_err(CallErr::Failed)
            }
            None => {
                drop(guard);
                // The server may be stuck: let nobody new queue behind this.
                self.retire();
                Err(CallErr::Failed("timeout".into()))
            }
        }
    }
}

/// Marks the slot abandoned when the waiting caller goes away without its answer.
struct Abandon<'a>(&'a Rc<RefCell<Slot>>);
impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        let mut s = self.0.borrow_mut();
        s.abandoned = true;
        s.waker = None;
    }
}

struct SlotWait<'a>(&'a Rc<RefCell<Slot>>);
impl Future for SlotWait<'_> {
    type Output = Answer;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        let mut s = self.0.borrow_mut();
        if let Some(a) = s.answer.take() {
            return Poll::Ready(a);
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

fn answer(slot: &Rc<RefCell<Slot>>, a: Answer) {
    let w = {
        let mut s = slot.borrow_mut();
        if s.abandoned {
            return;
        }
        s.answer = Some(a);
        s.waker.take()
    };
    if let Some(w) = w {
        w.wake();
    }
}

/// The connection's task: writes what is queued, reads replies and hands them out in order.
/// Ends when the connection fails, is handed over, or is retired or idle too long with
/// nothing in flight.
async fn drive(mux: Rc<Mux>) {
    let mut idle = Box::pin(tokio::time::sleep(Duration::from_secs(3600)));
    let mut idle_at: Option<Instant> = None;
    std::future::poll_fn(|cx| {
        let mut guard = mux.st.borrow_mut();
        let st = &mut *guard;
        let Some(io) = st.io.as_mut() else {
            return Poll::Ready(());
        };
        let failure = 'io: {
            // Write everything queued.
            while st.wpos < st.wbuf.len() {
                match io.poll_write(cx, &st.wbuf[st.wpos..]) {
                    Poll::Ready(Ok(0)) => break 'io Some("closed".to_string()),
                    Poll::Ready(Ok(n)) => st.wpos += n,
                    Poll::Ready(Err(e)) => break 'io Some(io_text(&e)),
                    Poll::Pending => break,
                }
            }
            if st.wpos == st.wbuf.len() {
                st.wbuf.clear();
                st.wpos = 0;
            }
            // Read and hand out replies (also while idle: notices the server closing).
            loop {
                match io.poll_read_into(cx, &mut st.rbuf) {
                    Poll::Ready(Ok(0)) => break 'io Some("closed".to_string()),
                    Poll::Ready(Ok(_)) => loop {
                        match parse(&st.rbuf) {
                            Ok(Some((reply, used))) => {
                                st.rbuf.advance(used);
                                match st.queue.pop_front() {
                                    Some(s) => answer(&s, Ok(reply)),
                                    None => break 'io Some("unexpected reply".to_string()),
                                }
                            }
                            Ok(None) => break,
                            Err(e) => break 'io Some(e),
                        }
                    },
                    Poll::Ready(Err(e)) => break 'io Some(io_text(&e)),
                    Poll::Pending => break,
                }
            }
            None
        };
        if let Some(e) = failure {
            st.dead = Some(e.clone());
            st.io = None;
            for s in st.queue.drain(..) {
                answer(&s, Err(e.clone()));
            }
            return Poll::Ready(());
        }
        if st.queue.is_empty() {
            if st.retired {
                st.io = None;
                return Poll::Ready(());
            }
            let idle_ms = mux.idle_ms.get();
            if idle_ms > 0 {
                let deadline = st.last_used + Duration::from_millis(idle_ms);
                if idle_at != Some(deadline) {
                    idle.as_mut().reset(deadline.into());
                    idle_at = Some(deadline);
                }
                if idle.as_mut().poll(cx).is_ready() {
                    st.retired = true;
                    st.io = None;
                    return Poll::Ready(());
                }
            }
        } else {
            st.last_used = Instant::now();
        }
        match &st.driver {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.driver = Some(cx.waker().clone()),
        }
        Poll::Pending
    })
    .await
}
