//! The per-peer circuit breaker (`circuit_breaker failures=5 window=10s open=5s half_open=1`,
//! tidegate's own directive). Closed: failures are counted in a sliding window; `failures` of
//! them within `window` open it. Open: the peer is skipped for `open`. Then half-open: up to
//! `half_open` trial requests go through; a success closes it, a failure opens it again.
//!
//! Pure state machine: every call takes `now` (milliseconds on any monotonic clock), so tests
//! drive it with a fake clock. Callers hold it behind the peer's mutex and log transitions.

use std::collections::VecDeque;

use crate::conf::model::CircuitBreaker;

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A state change, for the error log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

#[derive(Debug)]
pub struct Breaker {
    pub conf: CircuitBreaker,
    state: BreakerState,
    /// Failure times within the window (closed state), oldest first, at most `failures`.
    failures: VecDeque<u64>,
    opened_at: u64,
    /// Trial requests let through in half-open state and not yet answered.
    trials: u32,
}

impl Breaker {
    pub fn new(conf: CircuitBreaker) -> Breaker {
        Breaker {
            conf,
            state: BreakerState::Closed,
            failures: VecDeque::new(),
            opened_at: 0,
            trials: 0,
        }
    }

    /// The state as a reader would see it now: an open breaker whose time is up reads as
    /// half-open (the next pick moves it there).
    pub fn state(&self, now: u64) -> BreakerState {
        match self.state {
            BreakerState::Open if self.open_expired(now) => BreakerState::HalfOpen,
            s => s,
        }
    }

    fn open_expired(&self, now: u64) -> bool {
        now.saturating_sub(self.opened_at) >= self.conf.open_ms
    }

    /// Whether a request may go to this peer now (no side effects).
    pub fn allows(&self, now: u64) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => self.open_expired(now) && self.conf.half_open > 0,
            BreakerState::HalfOpen => self.trials < self.conf.half_open,
        }
    }

    /// The peer was picked: an expired open breaker turns half-open, and a half-open one
    /// counts a trial. Returns whether the pick holds a trial, and the transition if any.
    pub fn on_pick(&mut self, now: u64) -> (bool, Option<Transition>) {
        let mut t = None;
        if self.state == BreakerState::Open && self.open_expired(now) {
            t = self.go(BreakerState::HalfOpen);
            self.trials = 0;
        }
        if self.state == BreakerState::HalfOpen {
            self.trials += 1;
            return (true, t);
        }
        (false, t)
    }

    /// A trial ended without a verdict (the request was abandoned).
    pub fn release_trial(&mut self) {
        self.trials = self.trials.saturating_sub(1);
    }

    /// The outcome of a request to this peer.
    pub fn on_result(&mut self, now: u64, ok: bool, trial: bool) -> Option<Transition> {
        if trial {
            self.release_trial();
        }
        match (self.state, ok) {
            (BreakerState::Closed, true) => None,
            (BreakerState::Closed, false) => {
                let horizon = now.saturating_sub(self.conf.window_ms);
                while self.failures.front().is_some_and(|t| *t < horizon) {
                    self.failures.pop_front();
                }
                self.failures.push_back(now);
                if self.failures.len() as u32 >= self.conf.failures {
                    self.opened_at = now;
                    self.failures.clear();
                    return self.go(BreakerState::Open);
                }
                None
            }
            (BreakerState::HalfOpen, true) => {
                self.failures.clear();
                self.trials = 0;
                self.go(BreakerState::Closed)
            }
            (BreakerState::HalfOpen, false) => {
                self.opened_at = now;
                self.trials = 0;
                self.go(BreakerState::Open)
            }
            // Answers of requests sent before it opened say nothing new.
            (BreakerState::Open, _) => None,
        }
    }

    fn go(&mut self, to: BreakerState) -> Option<Transition> {
        let from = self.state;
        self.state = to;
        (from != to).then_some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf() -> CircuitBreaker {
        CircuitBreaker {
            failures: 3,
            window_ms: 10_000,
            open_ms: 5_000,
            half_open: 1,
        }
    }

    #[test]
    fn opens_after_failures_within_window() {
        let mut b = Breaker::new(conf());
        assert_eq!(b.on_result(0, false, false), None);
        assert_eq!(b.on_result(1000, false, false), None);
        let t = b.on_result(2000, false, false).expect("opens");
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        assert!(!b.allows(2000));
        assert!(!b.allows(6999));
        assert_eq!(b.state(6999), BreakerState::Open);
    }

    #[test]
    fn old_failures_fall_out_of_the_window() {
        let mut b = Breaker::new(conf());
        b.on_result(0, false, false);
        b.on_result(1000, false, false);
        // 11 s later the first two are outside the 10 s window.
        assert_eq!(b.on_result(12_000, false, false), None);
        assert_eq!(b.on_result(13_000, false, false), None);
        assert!(b.on_result(14_000, false, false).is_some());
    }

    #[test]
    fn successes_do_not_reset_a_closed_window() {
        let mut b = Breaker::new(conf());
        b.on_result(0, false, false);
        b.on_result(10, true, false);
        b.on_result(20, false, false);
        b.on_result(30, true, false);
        assert!(b.on_result(40, false, false).is_some());
    }

    #[test]
    fn half_open_lets_trials_through_and_closes_on_success() {
        let mut b = Breaker::new(conf());
        for t in 0..3 {
            b.on_result(t, false, false);
        }
        assert!(!b.allows(4_000));
        assert!(b.allows(5_002));
        assert_eq!(b.state(5_002), BreakerState::HalfOpen);
        let (trial, t) = b.on_pick(5_002);
        assert!(trial);
        assert_eq!(t.map(|t| t.to), Some(BreakerState::HalfOpen));
        // half_open=1: a second request is refused while the trial runs.
        assert!(!b.allows(5_003));
        let t = b.on_result(5_100, true, true).expect("closes");
        assert_eq!(t.to, BreakerState::Closed);
        assert!(b.allows(5_101));
        assert_eq!(b.on_pick(5_101), (false, None));
    }

    #[test]
    fn half_open_failure_reopens() {
        let mut b = Breaker::new(conf());
        for t in 0..3 {
            b.on_result(t, false, false);
        }
        let (trial, _) = b.on_pick(6_000);
        let t = b.on_result(6_010, false, trial).expect("reopens");
        assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Open));
        assert!(!b.allows(6_020));
        assert!(!b.allows(11_000));
        assert!(b.allows(11_010));
    }

    #[test]
    fn abandoned_trial_is_released() {
        let mut b = Breaker::new(CircuitBreaker {
            half_open: 2,
            ..conf()
        });
        for t in 0..3 {
            b.on_result(t, false, false);
        }
        b.on_pick(5_010);
        b.on_pick(5_011);
        assert!(!b.allows(5_012));
        b.release_trial();
        assert!(b.allows(5_012));
    }
}
