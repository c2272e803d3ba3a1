//! Request limits: `max_in_flight N` (http, server, location), a cap on the requests of one
//! scope that are being served at once. Past the cap a new request gets 503 at once: no
//! queueing, which is what a proxy under overload should do (the client or the load balancer
//! in front retries elsewhere).
//!
//! A scope is the level that declares the directive; levels below without their own
//! `max_in_flight` share its counter (nginx's inheritance, as for `limit_conn`). The counter
//! lives in the configuration snapshot, which every worker shares, so the cap holds across
//! workers. After a reload the new snapshot counts afresh while requests of the old one finish
//! against the old counter, so for a moment the cap can be exceeded by the old requests.
//!
//! Like `limit_conn`, the check runs once per request, in the preaccess phase (after the
//! rewrite phase chose the final location), and the slot is held to the end of the log phase.
//! A [`InFlightGuard`] frees it: dropping the request on any path (Lua error, `ngx.exit`,
//! client gone, task dropped at shutdown) gives the slot back.
//!
//! For metrics: `cfg.http.in_flight` lists every scope; [`InFlight::current`] and
//! [`InFlight::rejected`] read its numbers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::engine::Outcome;
use super::request::ReqCtx;

/// One `max_in_flight` scope's counter, shared by all workers.
#[derive(Debug)]
pub struct InFlight {
    /// Where the directive is (`conf/nginx.conf:12`), to name the scope in logs and metrics.
    pub scope: String,
    pub limit: u64,
    current: AtomicU64,
    rejected: AtomicU64,
}

impl InFlight {
    pub fn new(scope: String, limit: u64) -> InFlight {
        InFlight {
            scope,
            limit,
            current: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// Requests of this scope being served now.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Relaxed)
    }

    /// Requests refused with 503 since the configuration was loaded.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Take a slot, or count a rejection and return `None` when all are taken.
    pub fn try_enter(self: &Arc<Self>) -> Option<InFlightGuard> {
        let taken = self
            .current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            });
        match taken {
            Ok(_) => Some(InFlightGuard(self.clone())),
            Err(_) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// A held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The preaccess check: `Some(503)` when the scope is full. Runs once per request.
pub fn enter(rc: &ReqCtx) -> Option<Outcome> {
    let limit = {
        let mut st = rc.st.borrow_mut();
        if st.in_flight_checked {
            return None;
        }
        st.in_flight_checked = true;
        let lim = st.conf.max_in_flight.clone()?;
        match lim.try_enter() {
            Some(g) => {
                st.in_flight = Some(g);
                return None;
            }
            None => lim.limit,
        }
    };
    crate::log::request_error(
        rc,
        crate::log::Level::Warn,
        &format!("max_in_flight limit {} reached", limit),
    );
    Some(Outcome::Status(503))
}

/// Give the slot back (end of the log phase); dropping the request does it too.
pub fn leave(rc: &ReqCtx) {
    let g = rc.st.borrow_mut().in_flight.take();
    drop(g);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_and_freed() {
        let f = Arc::new(InFlight::new("t".into(), 2));
        let a = f.try_enter().expect("first");
        let b = f.try_enter().expect("second");
        assert!(f.try_enter().is_none());
        assert_eq!((f.current(), f.rejected()), (2, 1));
        drop(a);
        let c = f.try_enter().expect("freed slot");
        drop((b, c));
        assert_eq!((f.current(), f.rejected()), (0, 1));
    }

    #[test]
    fn shared_across_threads() {
        let f = Arc::new(InFlight::new("t".into(), 8));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let g = f.try_enter();
                        drop(g);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(f.current(), 0);
    }
}
