//! The worker's loop clock: the monotonic clock read at most once per event-loop turn, as
//! nginx caches its time after each `epoll_wait` (`ngx_time_update`) and times requests,
//! upstream tries and keep-alive deadlines against that cached value.
//!
//! A proxied request read the clock about ten times (request start, try start, connect,
//! header and response times, pool deadlines, the connection's idle mark); each reading is a
//! vDSO call (~1.3% of a 1 KB proxied request's CPU in a `perf` profile, against nginx's
//! 0.06%). Within one turn every reading now returns the first one's value.
//!
//! Only a thread whose runtime calls [`turn`] (the workers: `on_thread_unpark`) caches; on any
//! other thread (tests, the health checker, `tidegate spec`) [`now`] is `Instant::now()`.
//! A turn runs at most one `LocalSet` tick (61 task polls) between two refreshes, so a cached
//! value is at most that old: the same staleness nginx has within one batch of events.

use std::cell::Cell;
use std::time::Instant;

struct Loop {
    /// This thread's runtime refreshes the clock at each turn.
    on: Cell<bool>,
    /// The reading of this turn, once something asked for it.
    now: Cell<Option<Instant>>,
}

thread_local! {
    static LOOP: Loop = const {
        Loop {
            on: Cell::new(false),
            now: Cell::new(None),
        }
    };
}

/// The current turn's time on the monotonic clock.
#[inline]
pub fn now() -> Instant {
    LOOP.with(|l| match l.now.get() {
        Some(t) => t,
        None => {
            let t = Instant::now();
            if l.on.get() {
                l.now.set(Some(t));
            }
            t
        }
    })
}

/// A new event-loop turn began (the runtime woke from waiting for events): the next reading
/// is fresh. Also expires the wall-clock time `ngx.now()` caches.
pub fn turn() {
    LOOP.with(|l| {
        l.on.set(true);
        l.now.set(None);
    });
    crate::lua::api::time::expire_cached_time();
}

/// Forget this turn's reading (`ngx.update_time()`, and after waits that refresh nginx's clock).
pub fn refresh() {
    LOOP.with(|l| l.now.set(None));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn uncached_off_the_workers() {
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            now() > a,
            "a thread without turns reads the clock each time"
        );
    }

    #[test]
    fn one_reading_per_turn() {
        std::thread::spawn(|| {
            turn();
            let a = now();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(now(), a, "the same turn sees the same time");
            turn();
            assert!(now() > a, "a new turn reads the clock again");
            let b = now();
            std::thread::sleep(Duration::from_millis(2));
            refresh();
            assert!(now() > b, "refresh forgets the turn's reading");
        })
        .join()
        .unwrap();
    }
}
