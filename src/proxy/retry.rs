//! Which peer a try goes to and whether another try may follow: proxy_next_upstream and its
//! limits (tries, timeout, idempotency, a replayable body), and the backoff between tries
//! (`proxy_next_upstream_backoff`: exponential with full jitter).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conf::{next, ProxyConf};

/// One server to try.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// `$upstream_addr` text.
    pub name: Arc<str>,
    /// The upstream block's own peer, to report back to its picker.
    pub up: Option<super::upstream::Peer>,
}

/// The peers of one request: the addresses of a name, tried round robin from a shared start.
pub struct Selector<'a> {
    addrs: &'a [(SocketAddr, Arc<str>)],
    start: usize,
    tried: usize,
}

impl<'a> Selector<'a> {
    pub fn new(addrs: &'a [(SocketAddr, Arc<str>)], start: usize) -> Selector<'a> {
        Selector {
            addrs,
            start,
            tried: 0,
        }
    }

    /// The next untried peer; `None` when every one was tried.
    pub fn next(&mut self) -> Option<Peer> {
        if self.tried >= self.addrs.len() {
            return None;
        }
        let (addr, name) = &self.addrs[(self.start + self.tried) % self.addrs.len()];
        self.tried += 1;
        Some(Peer {
            addr: *addr,
            name: name.clone(),
            up: None,
        })
    }

    pub fn has_more(&self) -> bool {
        self.tried < self.addrs.len()
    }
}

/// Where the peers of a request come from: the addresses of a name (round robin here) or an
/// `upstream {}` block's picker (its balancer, health, breakers, balancer_by_lua).
/// The picker is held inline, not boxed: it lives in the proxy's future, which is built in
/// its own box and never moved, so a box only added an allocation per request (callgrind:
/// -144 instructions a proxied request without it).
#[allow(clippy::large_enum_variant)]
pub enum Peers<'a> {
    Addrs(Selector<'a>),
    Group(super::upstream::Picker),
}

impl Peers<'_> {
    /// The next peer; `Err(status)` when none is left (the picker logged why).
    pub async fn next(
        &mut self,
        rc: &std::rc::Rc<crate::http::request::ReqCtx>,
    ) -> Result<Peer, u16> {
        match self {
            Peers::Addrs(s) => s.next().ok_or(502),
            Peers::Group(p) => match p.next(rc).await {
                Ok(peer) => Ok(Peer {
                    addr: peer.addr,
                    name: peer.name.clone(),
                    up: Some(peer),
                }),
                Err(_) => Err(p.exit_status().unwrap_or(502)),
            },
        }
    }

    /// Whether another try is allowed after `tries` (nginx's `peer.tries`).
    pub fn has_more(&self, tries: u32) -> bool {
        match self {
            Peers::Addrs(s) => s.has_more(),
            Peers::Group(p) => tries < p.tries(),
        }
    }

    /// How the try on `peer` went (passive health, breakers, EWMA).
    pub fn report(&mut self, peer: &Peer, r: super::upstream::TryResult) {
        if let (Peers::Group(p), Some(up)) = (self, &peer.up) {
            p.report(up, r);
        }
    }

    /// `ngx.balancer.set_timeouts` for the current try (ms, 0 = keep the configured one).
    pub fn timeouts(&self) -> Option<(u64, u64, u64)> {
        match self {
            Peers::Group(p) => p.timeouts(),
            Peers::Addrs(_) => None,
        }
    }
}

/// Why a try failed, in proxy_next_upstream's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Error,
    Timeout,
    InvalidHeader,
    Status(u16),
}

impl Failure {
    fn bit(self) -> u32 {
        match self {
            Failure::Error => next::ERROR,
            Failure::Timeout => next::TIMEOUT,
            Failure::InvalidHeader => next::INVALID_HEADER,
            Failure::Status(s) => next::for_status(s),
        }
    }
}

/// The retry budget of one request.
pub struct Budget {
    /// Read only with proxy_next_upstream_timeout set (a clock reading less per request).
    started: Option<Instant>,
    pub tries: u32,
    idempotent: bool,
}

impl Budget {
    pub fn new(method: &http::Method, pc: &ProxyConf) -> Budget {
        Budget {
            started: (pc.next_upstream_timeout_ms > 0).then(Instant::now),
            tries: 0,
            // nginx's non-idempotent methods.
            idempotent: !matches!(method.as_str(), "POST" | "LOCK" | "PATCH"),
        }
    }

    /// Whether a failure may be retried on another peer. `sent`: the request reached the
    /// upstream; `replayable`: its body can be sent again.
    pub fn may_retry(&self, pc: &ProxyConf, f: Failure, sent: bool, replayable: bool) -> bool {
        if pc.next_upstream & f.bit() == 0 {
            return false;
        }
        if sent && !self.idempotent && pc.next_upstream & next::NON_IDEMPOTENT == 0 {
            return false;
        }
        if sent && !replayable {
            return false;
        }
        if pc.next_upstream_tries > 0 && self.tries >= pc.next_upstream_tries {
            return false;
        }
        if pc.next_upstream_timeout_ms > 0
            && self
                .started
                .is_some_and(|s| s.elapsed() >= Duration::from_millis(pc.next_upstream_timeout_ms))
        {
            return false;
        }
        true
    }

    /// The wait before the next try (full jitter over an exponential ceiling).
    pub fn backoff(&self, pc: &ProxyConf) -> Option<Duration> {
        let (base, max) = pc.backoff?;
        let exp = self.tries.saturating_sub(1).min(20);
        let ceiling = base.saturating_mul(1u64 << exp).min(max);
        Some(Duration::from_millis(rand::random_range(0..=ceiling)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_a_growing_cap() {
        let pc = ProxyConf {
            backoff: Some((50, 1000)),
            ..Default::default()
        };
        let mut b = Budget::new(&http::Method::GET, &pc);
        for (tries, cap) in [(1, 50), (2, 100), (3, 200), (5, 800), (6, 1000), (30, 1000)] {
            b.tries = tries;
            for _ in 0..50 {
                let d = b.backoff(&pc).unwrap();
                assert!(d <= Duration::from_millis(cap), "{} {:?}", tries, d);
            }
        }
        assert!(Budget::new(&http::Method::GET, &pc)
            .backoff(&ProxyConf::default())
            .is_none());
    }

    #[test]
    fn retry_rules() {
        let pc = ProxyConf::default();
        let get = Budget::new(&http::Method::GET, &pc);
        let post = Budget::new(&http::Method::POST, &pc);
        assert!(get.may_retry(&pc, Failure::Error, true, true));
        assert!(get.may_retry(&pc, Failure::Timeout, true, true));
        assert!(!get.may_retry(&pc, Failure::Status(502), true, true));
        assert!(!get.may_retry(&pc, Failure::InvalidHeader, true, true));
        // Not sent yet: even a POST moves on; sent: only with non_idempotent.
        assert!(post.may_retry(&pc, Failure::Error, false, true));
        assert!(!post.may_retry(&pc, Failure::Error, true, true));
        // A body that cannot be sent again stops retries once it went out.
        assert!(!get.may_retry(&pc, Failure::Error, true, false));
        assert!(get.may_retry(&pc, Failure::Error, false, false));
    }
}
