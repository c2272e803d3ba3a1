//! Per-worker pools of cleared allocations that a finished request hands on to the next one
//! (output buffers, header maps): the callers decide what is worth keeping, these take and
//! give back without ever panicking (a pool already borrowed or torn down is just skipped).

use std::cell::RefCell;
use std::thread::LocalKey;

/// A pool: a thread-local list of spare values.
pub type Pool<T> = LocalKey<RefCell<Vec<T>>>;

/// A spare value from `pool`, or a new empty one.
pub fn take<T: Default>(pool: &'static Pool<T>) -> T {
    pool.try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Keep `item` (already cleared) in `pool` unless it holds `max` already.
pub fn give<T>(pool: &'static Pool<T>, item: T, max: usize) {
    let _ = pool.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if p.len() < max {
                p.push(item);
            }
        }
    });
}
