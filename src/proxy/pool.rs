//! The upstream keep-alive pool of one worker (nginx's `keepalive N` cache): idle HTTP/1
//! connections keyed by peer address and TLS name, most recently used first, bounded per key,
//! dropped after `keepalive_timeout` or `keepalive_requests`, or when the upstream closed them
//! while idle. Nothing here is shared between workers, as in nginx.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use super::connect::Timed;

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
    pub io: Timed,
    /// The response-head timer of the last request, kept for the next one: moving a
    /// registered timer's deadline later is one atomic operation, where a timer per request
    /// went into tokio's timer wheel and out again (see `forward::attempt`).
    pub timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Requests sent on it so far, this one included.
    pub requests: u64,
    /// Whether it came from the pool (a failure there earns one fresh retry, as in nginx).
    pub reused: bool,
    pub opened: Instant,
}

/// A connection waiting in the pool.
struct Idle {
    conn: Conn,
    /// When keepalive_timeout closes it.
    deadline: Instant,
}

/// Pool keys are few per worker and come from the configuration or the resolver: a
/// multiply-rotate hash is enough, where SipHash cost more than the rest of take + release.
#[derive(Default)]
pub struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        for &b in chunks.remainder() {
            self.add(b as u64);
        }
    }
    fn write_u8(&mut self, v: u8) {
        self.add(v as u64);
    }
    fn write_u16(&mut self, v: u16) {
        self.add(v as u64);
    }
    fn write_u32(&mut self, v: u32) {
        self.add(v as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
}

/// The hash for maps whose keys come from the configuration or the resolver.
pub type FastHash = std::hash::BuildHasherDefault<KeyHasher>;

type Map = HashMap<Key, VecDeque<Idle>, FastHash>;

thread_local! {
    static POOL: RefCell<Map> = RefCell::new(Map::default());
    static SWEEPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether an idle connection is still usable: the upstream has neither closed it nor sent
/// anything unasked (either makes it useless for the next request).
fn alive(io: &mut Timed) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    // Nothing arrived since its last read returned short: alive, without a system call (the
    // reactor has seen the upstream's FIN or data otherwise, as nginx's idle read handler).
    if io.tcp().poll_read_ready(&mut cx).is_pending() {
        return true;
    }
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(Pin::new(io).poll_read(&mut cx, &mut buf), Poll::Pending)
}

/// The most recently used idle connection for `key` that is alive and younger than the
/// timeout. Connections go back the moment their response was read to the end, so a
/// request right behind another finds the one it just left. `now`: the try's start.
pub fn take(key: &Key, now: Instant) -> Option<Conn> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let q = p.get_mut(key)?;
        while let Some(mut idle) = q.pop_back() {
            if now >= idle.deadline || !alive(&mut idle.conn.io) {
                continue;
            }
            let mut conn = idle.conn;
            conn.requests += 1;
            conn.reused = true;
            return Some(conn);
        }
        None
    })
}

/// Give a connection back after a complete response that leaves it reusable; it is closed
/// instead when the pool is full for its key or the request budget is spent.
pub fn release(key: Key, conn: Conn, limits: Limits) {
    if conn.requests >= limits.requests || limits.max_idle == 0 {
        return;
    }
    // One reading for keepalive_time and the idle deadline.
    let now = crate::clock::now();
    if now.saturating_duration_since(conn.opened) >= limits.time {
        return;
    }
    put(key, conn, limits, now);
}

fn put(key: Key, conn: Conn, limits: Limits, now: Instant) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let q = p.entry(key).or_default();
        // Oldest first, so expired ones are at the front: no scan of the whole queue per
        // release (one left behind a later deadline is the sweeper's, and `take` skips it).
        while q.front().is_some_and(|i| now >= i.deadline) {
            q.pop_front();
        }
        if q.len() >= limits.max_idle {
            q.pop_front();
        }
        q.push_back(Idle {
            conn,
            deadline: now + limits.timeout,
        });
    });
    if !SWEEPER.with(|s| s.replace(true)) {
        tokio::task::spawn_local(sweep());
    }
}

/// Close idle connections whose keepalive_timeout passed, or that the upstream closed, even
/// when nobody asks for their key.
async fn sweep() {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = Instant::now();
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            for q in p.values_mut() {
                q.retain_mut(|i| now < i.deadline && alive(&mut i.conn.io));
            }
            p.retain(|_, q| !q.is_empty());
        });
    }
}
