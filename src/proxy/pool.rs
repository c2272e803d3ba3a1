//! The upstream keep-alive pool of one worker (nginx's `keepalive N` cache): idle HTTP/1
//! connections keyed by peer address and TLS name, most recently used first, bounded per key,
//! dropped after `keepalive_timeout` or `keepalive_requests`. Nothing here is shared between
//! workers, as in nginx.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

use super::body::UpBody;

/// The keep-alive limits of an upstream (`keepalive`, `keepalive_timeout`, `keepalive_requests`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_idle: usize,
    pub timeout: Duration,
    pub requests: u64,
    /// `keepalive_time`: the longest a connection is reused, from when it was opened.
    pub time: Duration,
}

/// What a connection is reusable for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub addr: SocketAddr,
    /// `None` for plain HTTP; for TLS the verify name, SNI, and which `proxy_ssl_*` block
    /// made it (a connection with one client certificate never serves another's requests).
    pub tls: Option<(Arc<str>, bool, usize)>,
}

/// A connection in use; hand it back with [`release`] when its response is complete.
pub struct Conn {
    pub tx: SendRequest<UpBody>,
    /// Requests sent on it so far, this one included.
    pub requests: u64,
    /// Whether it came from the pool (a failure there earns one fresh retry, as in nginx).
    pub reused: bool,
    pub opened: Instant,
    /// The connection's proxy_send_timeout, set by each request.
    pub send_limit: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

struct Idle {
    tx: SendRequest<UpBody>,
    opened: Instant,
    send_limit: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// When keepalive_timeout closes it.
    deadline: Instant,
    requests: u64,
}

thread_local! {
    static POOL: RefCell<HashMap<Key, VecDeque<Idle>>> = RefCell::new(HashMap::new());
    static SWEEPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The most recently used idle connection for `key` that is alive and younger than the
/// timeout. Its response was read to the end, but hyper's connection task may not have run
/// since then to mark it idle: the caller waits for [`ready`] (a wakeup away) rather than
/// opening another connection meanwhile.
pub fn take(key: &Key) -> Option<Conn> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let q = p.get_mut(key)?;
        let now = Instant::now();
        q.retain(|i| now < i.deadline && !i.tx.is_closed());
        let idle = q.pop_back()?;
        Some(Conn {
            tx: idle.tx,
            requests: idle.requests + 1,
            reused: true,
            opened: idle.opened,
            send_limit: idle.send_limit,
        })
    })
}

/// A pooled connection ready for its next request, or none (the caller opens one): each
/// candidate whose task turns out closed is dropped and the next one tried.
pub async fn take_ready(key: &Key) -> Option<Conn> {
    while let Some(mut c) = take(key) {
        if c.tx.is_ready() || c.tx.ready().await.is_ok() {
            return Some(c);
        }
    }
    None
}

/// Give a connection back after a complete response; it is closed instead when the pool is
/// full for its key, the request budget is spent, or hyper says it cannot take another request
/// (the upstream asked to close, or the response was not read to the end).
pub fn release(key: Key, conn: Conn, limits: Limits) {
    if conn.requests >= limits.requests
        || limits.max_idle == 0
        || conn.opened.elapsed() >= limits.time
    {
        return;
    }
    if conn.tx.is_closed() {
        return;
    }
    put(key, conn, limits);
}

fn put(key: Key, conn: Conn, limits: Limits) {
    let now = Instant::now();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let q = p.entry(key).or_default();
        q.retain(|i| now < i.deadline && !i.tx.is_closed());
        if q.len() >= limits.max_idle {
            q.pop_front();
        }
        q.push_back(Idle {
            tx: conn.tx,
            opened: conn.opened,
            send_limit: conn.send_limit,
            deadline: now + limits.timeout,
            requests: conn.requests,
        });
    });
    if !SWEEPER.with(|s| s.replace(true)) {
        tokio::task::spawn_local(sweep());
    }
}

/// Close idle connections whose keepalive_timeout passed even when nobody asks for their key.
async fn sweep() {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = Instant::now();
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            for q in p.values_mut() {
                q.retain(|i| now < i.deadline && !i.tx.is_closed());
            }
            p.retain(|_, q| !q.is_empty());
        });
    }
}
