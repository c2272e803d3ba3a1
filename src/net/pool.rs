//! Per-worker keepalive pools for cosockets, keyed as OpenResty keys them (`"host:port"`, the
//! unix socket path, or the `pool` option). A pool counts its connections (in use and idle);
//! with a `backlog`, a connect finding `size` connections out waits in a queue (bounded by
//! `backlog` and by the caller's timeout) until one is closed or put back.
//!
//! An idle connection is owned by a small local task that closes it when the peer sends
//! anything or closes (nginx's keepalive close handler), when its idle timeout passes, or when
//! a newer idle connection pushes it out of a full pool; a connect asks that task for it.
//! Must run inside a tokio `LocalSet` (every worker, `tidegate spec` and `tidegate resty` do).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

use super::stream::Stream;

thread_local! {
    static POOLS: RefCell<HashMap<String, Rc<RefCell<Pool>>>> = RefCell::new(HashMap::new());
}

/// One pool of a worker.
#[derive(Debug)]
pub struct Pool {
    size: usize,
    backlog: Option<usize>,
    /// Connections counted against this pool (in use + idle).
    active: usize,
    idle: VecDeque<Idle>,
    waiters: VecDeque<oneshot::Sender<()>>,
    next_id: u64,
}

#[derive(Debug)]
struct Idle {
    id: u64,
    take: oneshot::Sender<oneshot::Sender<Pooled>>,
}

/// The place a connection holds in its pool; released (and a waiter woken) on drop.
#[derive(Debug)]
pub struct Slot {
    pool: Rc<RefCell<Pool>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let w = {
            let mut p = self.pool.borrow_mut();
            p.active = p.active.saturating_sub(1);
            p.waiters.pop_front()
        };
        wake(&self.pool, w);
    }
}

/// Wake the first waiter still waiting (a waiter that timed out has dropped its receiver).
fn wake(pool: &Rc<RefCell<Pool>>, mut w: Option<oneshot::Sender<()>>) {
    while let Some(tx) = w {
        if tx.send(()).is_ok() {
            return;
        }
        w = pool.borrow_mut().waiters.pop_front();
    }
}

/// A connection handed out by a pool.
#[derive(Debug)]
pub struct Pooled {
    pub stream: Stream,
    pub slot: Slot,
    /// How many times it was reused before (`getreusedtimes` is this + 1 once taken).
    pub reused: u32,
}

/// What a connect gets from [`acquire`].
#[derive(Debug)]
pub enum Acquired {
    /// An idle connection to reuse.
    Reuse(Pooled),
    /// Room for a new connection (None when the pool does not exist: it is uncounted).
    New(Option<Slot>),
}

/// The pool named `key`; created with `size`/`backlog` when `create` and it does not exist
/// (later calls never resize an existing pool, as in OpenResty).
pub fn pool(
    key: &str,
    create: bool,
    size: usize,
    backlog: Option<usize>,
) -> Option<Rc<RefCell<Pool>>> {
    POOLS.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(p) = m.get(key) {
            return Some(p.clone());
        }
        if !create {
            return None;
        }
        let p = Rc::new(RefCell::new(Pool {
            size: size.max(1),
            backlog,
            active: 0,
            idle: VecDeque::new(),
            waiters: VecDeque::new(),
            next_id: 0,
        }));
        m.insert(key.to_string(), p.clone());
        Some(p)
    })
}

/// Count a connection made outside the pool against it (at `setkeepalive`).
pub fn slot(pool: &Rc<RefCell<Pool>>) -> Slot {
    pool.borrow_mut().active += 1;
    Slot { pool: pool.clone() }
}

/// The most recently idled live connection, if any.
async fn take_idle(pool: &Rc<RefCell<Pool>>) -> Option<Pooled> {
    loop {
        let entry = pool.borrow_mut().idle.pop_back()?;
        let (tx, rx) = oneshot::channel();
        if entry.take.send(tx).is_err() {
            continue;
        }
        if let Ok(p) = rx.await {
            return Some(p);
        }
    }
}

/// Reuse an idle connection, or get room for a new one; with a backlog, wait for room until
/// `deadline`. Errors are OpenResty's: "too many waiting connect operations", "timeout".
pub async fn acquire(
    pool: Option<&Rc<RefCell<Pool>>>,
    deadline: Instant,
) -> Result<Acquired, &'static str> {
    let Some(pool) = pool else {
        return Ok(Acquired::New(None));
    };
    loop {
        if let Some(p) = take_idle(pool).await {
            return Ok(Acquired::Reuse(p));
        }
        let rx = {
            let mut p = pool.borrow_mut();
            match p.backlog {
                Some(backlog) if p.active >= p.size => {
                    // Waiters that gave up (timed out, request gone) no longer count.
                    p.waiters.retain(|w| !w.is_closed());
                    if p.waiters.len() >= backlog {
                        return Err("too many waiting connect operations");
                    }
                    let (tx, rx) = oneshot::channel();
                    p.waiters.push_back(tx);
                    rx
                }
                _ => {
                    p.active += 1;
                    return Ok(Acquired::New(Some(Slot { pool: pool.clone() })));
                }
            }
        };
        let mut waiting = Waiting { rx, pool };
        match tokio::time::timeout_at(deadline.into(), &mut waiting.rx).await {
            Ok(_) => continue,
            Err(_) => return Err("timeout"),
        }
    }
}

/// A queued connect. If it is dropped after being woken but before it could use the room
/// (its request ended, or its timeout fired at the same moment), the wake goes to the next.
struct Waiting<'a> {
    rx: oneshot::Receiver<()>,
    pool: &'a Rc<RefCell<Pool>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.rx.try_recv().is_ok() {
            let w = self.pool.borrow_mut().waiters.pop_front();
            wake(self.pool, w);
        }
    }
}

/// Put a connection into `pool` for `timeout` (None: no expiry). A full pool drops its oldest
/// idle connection to make room.
pub fn put(
    pool: &Rc<RefCell<Pool>>,
    stream: Stream,
    slot: Slot,
    reused: u32,
    timeout: Option<Duration>,
) {
    let (tx, rx) = oneshot::channel();
    let (id, evicted, waiter) = {
        let mut p = pool.borrow_mut();
        p.next_id += 1;
        let id = p.next_id;
        let evicted = if p.idle.len() >= p.size {
            p.idle.pop_front()
        } else {
            None
        };
        p.idle.push_back(Idle { id, take: tx });
        (id, evicted, p.waiters.pop_front())
    };
    drop(evicted);
    let pooled = Pooled {
        stream,
        slot,
        reused,
    };
    tokio::task::spawn_local(watch(pool.clone(), id, pooled, rx, timeout));
    wake(pool, waiter);
}

async fn watch(
    pool: Rc<RefCell<Pool>>,
    id: u64,
    mut pooled: Pooled,
    mut rx: oneshot::Receiver<oneshot::Sender<Pooled>>,
    timeout: Option<Duration>,
) {
    let taker = {
        let expiry = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let mut one = [0u8; 1];
        tokio::select! {
            biased;
            r = &mut rx => r.ok(),
            // Data or EOF on an idle connection: it cannot be reused (a TLS session ticket is
            // consumed inside rustls and does not end this read).
            _ = pooled.stream.read(&mut one) => None,
            _ = expiry => None,
        }
    };
    match taker {
        Some(reply) => {
            // If the taker gave up meanwhile, the connection is simply closed.
            let _ = reply.send(pooled);
        }
        None => {
            pool.borrow_mut().idle.retain(|i| i.id != id);
            drop(pooled);
        }
    }
}

/// Idle connections in the pool `key` (for tests and diagnostics).
pub fn idle_count(key: &str) -> usize {
    POOLS.with(|m| {
        m.borrow()
            .get(key)
            .map(|p| p.borrow().idle.len())
            .unwrap_or(0)
    })
}
