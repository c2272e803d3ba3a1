//! Shared dict zones (`lua_shared_dict name size;`): byte-bounded, LRU-evicting, TTL-aware
//! key/value stores shared by every worker thread. Values are bytes, numbers or booleans (and
//! lists of bytes/numbers), never Lua values, as in nginx shared memory.
//!
//! A zone is split into shards, each a `Mutex` around a hash map plus an intrusive LRU list, so
//! workers touching different keys rarely contend. Memory is accounted zone-wide (one atomic
//! byte counter) and eviction picks the globally least recently used entry by comparing each
//! shard's oldest "tick", so LRU order holds across shards as it does in nginx's single tree.
//!
//! This room knows nothing about Lua: `src/lua/api/shdict.rs` adapts it to `ngx.shared.DICT`,
//! and other Rust rooms (metrics, rate limits) may use a [`Zone`] directly.
//!
//! ```
//! use tidegate::shdict::{Value, Zone};
//! let zone = Zone::new("cache", 1 << 20);
//! zone.set(b"k", Some(Value::Number(1.0)), 0.0, 0).unwrap();
//! assert_eq!(zone.incr(b"k", 2.0, None, 0.0).unwrap().0, 3.0);
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Smallest zone `lua_shared_dict` accepts (nginx needs a few slab pages).
pub const MIN_ZONE_SIZE: usize = 8 * 1024;
/// Longest key OpenResty accepts.
pub const MAX_KEY_LEN: usize = 65535;
/// Bookkeeping bytes charged per entry on top of key and value (nginx's node + rbtree + slab).
const ENTRY_OVERHEAD: usize = 64;
/// Bookkeeping bytes charged per list element on top of its value.
const LIST_ITEM_OVERHEAD: usize = 24;
const SHARDS: usize = 16;
/// How many entries from each LRU tail a "safe" operation inspects for expired ones, like
/// nginx which only looks at the tail of its queue before giving up.
const EXPIRED_SCAN: usize = 32;
const NIL: u32 = u32::MAX;

/// A scalar value stored in a zone (and the element type of lists).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Binary-safe bytes (a Lua string).
    Str(Bytes),
    /// A Lua number.
    Number(f64),
    /// A Lua boolean (not allowed in lists).
    Bool(bool),
}

impl Value {
    fn byte_len(&self) -> usize {
        match self {
            Value::Str(b) => b.len(),
            Value::Number(_) => 8,
            Value::Bool(_) => 1,
        }
    }
}

/// Errors of zone operations; `Display` is the exact text OpenResty returns to Lua.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShdictError {
    #[error("no memory")]
    NoMemory,
    #[error("exists")]
    Exists,
    #[error("not found")]
    NotFound,
    #[error("not a number")]
    NotANumber,
    #[error("value not a list")]
    NotAList,
    #[error("value is a list")]
    IsAList,
    #[error("bad value type")]
    BadValueType,
    #[error("empty key")]
    EmptyKey,
    #[error("key too long")]
    KeyTooLong,
}

#[derive(Debug)]
enum Data {
    Scalar(Value),
    List(VecDeque<Value>),
}

#[derive(Debug)]
struct Node {
    key: Arc<[u8]>,
    data: Data,
    flags: u32,
    expires: Option<Instant>,
    /// Bytes charged to the zone for this node (key, value or list items, overhead).
    size: usize,
    tick: u64,
    prev: u32,
    next: u32,
}

impl Node {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// One shard: a map from key to slot and a doubly linked LRU list threaded through the slots
/// (head = most recently used).
#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Arc<[u8]>, u32>,
    slots: Vec<Option<Node>>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
}

impl Inner {
    fn new() -> Self {
        Inner {
            head: NIL,
            tail: NIL,
            ..Default::default()
        }
    }

    fn node(&self, i: u32) -> &Node {
        // Slots referenced by the map or the list are always occupied; a hole here would be a
        // bookkeeping bug, which we surface as a panic in debug builds only.
        match self.slots.get(i as usize).and_then(Option::as_ref) {
            Some(n) => n,
            None => unreachable!("shdict slot {i} is empty"),
        }
    }

    fn node_mut(&mut self, i: u32) -> &mut Node {
        match self.slots.get_mut(i as usize).and_then(Option::as_mut) {
            Some(n) => n,
            None => unreachable!("shdict slot {i} is empty"),
        }
    }

    fn find(&self, key: &[u8]) -> Option<u32> {
        self.map.get(key).copied()
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = self.node(i);
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.node_mut(prev).next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.node_mut(next).prev = prev;
        }
    }

    fn push_front(&mut self, i: u32, tick: u64) {
        let old_head = self.head;
        {
            let n = self.node_mut(i);
            n.prev = NIL;
            n.next = old_head;
            n.tick = tick;
        }
        if old_head == NIL {
            self.tail = i;
        } else {
            self.node_mut(old_head).prev = i;
        }
        self.head = i;
    }

    fn touch(&mut self, i: u32, tick: u64) {
        self.unlink(i);
        self.push_front(i, tick);
    }

    fn insert(&mut self, node: Node, tick: u64) -> u32 {
        let key = node.key.clone();
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(node);
                i
            }
            None => {
                self.slots.push(Some(node));
                (self.slots.len() - 1) as u32
            }
        };
        self.map.insert(key, i);
        self.push_front(i, tick);
        i
    }

    /// Unlinks and frees slot `i`, returning the node so callers can release its bytes.
    fn remove(&mut self, i: u32) -> Node {
        self.unlink(i);
        let node = match self.slots.get_mut(i as usize).and_then(Option::take) {
            Some(n) => n,
            None => unreachable!("shdict slot {i} is empty"),
        };
        self.map.remove(&node.key[..]);
        self.free.push(i);
        node
    }

    fn tail_tick(&self) -> u64 {
        if self.tail == NIL {
            u64::MAX
        } else {
            self.node(self.tail).tick
        }
    }

    /// Slot indices from the LRU tail towards the head, at most `limit` of them.
    fn tail_slots(&self, limit: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut i = self.tail;
        while i != NIL && out.len() < limit {
            out.push(i);
            i = self.node(i).prev;
        }
        out
    }
}

#[derive(Debug)]
struct Shard {
    inner: Mutex<Inner>,
    /// Mirror of the shard's oldest tick so eviction can pick a victim shard without locking all.
    tail_tick: AtomicU64,
}

/// A locked shard; keeps the shard's `tail_tick` mirror current when released.
struct Guard<'a> {
    g: MutexGuard<'a, Inner>,
    tail_tick: &'a AtomicU64,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.tail_tick.store(self.g.tail_tick(), Ordering::Relaxed);
    }
}

impl std::ops::Deref for Guard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.g
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.g
    }
}

impl Shard {
    fn lock(&self) -> Guard<'_> {
        // A panic while holding the lock cannot leave the list half-linked in a way later
        // operations trip over badly enough to justify poisoning the whole zone for every worker.
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Guard {
            g,
            tail_tick: &self.tail_tick,
        }
    }

    fn try_lock(&self) -> Option<Guard<'_>> {
        match self.inner.try_lock() {
            Ok(g) => Some(Guard {
                g,
                tail_tick: &self.tail_tick,
            }),
            Err(TryLockError::Poisoned(e)) => Some(Guard {
                g: e.into_inner(),
                tail_tick: &self.tail_tick,
            }),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

/// Which condition a store operation checks before writing (nginx's set/add/replace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoreOp {
    Set,
    Add,
    Replace,
}

/// One `lua_shared_dict` zone, shared by all worker threads.
#[derive(Debug)]
pub struct Zone {
    /// The `lua_shared_dict` name.
    pub name: String,
    /// Configured size in bytes.
    pub capacity: usize,
    used: AtomicUsize,
    /// Origin of LRU ticks.
    epoch: Instant,
    shards: Box<[Shard]>,
}

/// All zones of a configuration by name.
pub type Zones = Arc<HashMap<String, Arc<Zone>>>;

/// Rejects keys OpenResty rejects: empty or longer than [`MAX_KEY_LEN`].
pub fn check_key(key: &[u8]) -> Result<(), ShdictError> {
    if key.is_empty() {
        Err(ShdictError::EmptyKey)
    } else if key.len() > MAX_KEY_LEN {
        Err(ShdictError::KeyTooLong)
    } else {
        Ok(())
    }
}

/// Converts an `exptime` in seconds (0 = never) to a deadline.
fn deadline(now: Instant, exptime: f64) -> Option<Instant> {
    if exptime > 0.0 && exptime.is_finite() {
        // Millisecond resolution, as documented for ngx.shared.DICT.
        let ms = (exptime * 1000.0).round().max(1.0);
        Some(now + Duration::from_millis(ms as u64))
    } else {
        None
    }
}

fn shard_index(key: &[u8]) -> usize {
    // FNV-1a: cheap, and only needs to spread keys over a handful of shards.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h ^ (h >> 32)) as usize % SHARDS
}

fn scalar_size(key: &[u8], v: &Value) -> usize {
    key.len() + v.byte_len() + ENTRY_OVERHEAD
}

fn item_size(v: &Value) -> usize {
    v.byte_len() + LIST_ITEM_OVERHEAD
}

impl Zone {
    /// A zone named `name` holding at most `capacity_bytes` of keys, values and overhead.
    pub fn new(name: &str, capacity_bytes: usize) -> Zone {
        let shards = (0..SHARDS)
            .map(|_| Shard {
                inner: Mutex::new(Inner::new()),
                tail_tick: AtomicU64::new(u64::MAX),
            })
            .collect();
        Zone {
            name: name.to_string(),
            capacity: capacity_bytes,
            used: AtomicUsize::new(0),
            epoch: Instant::now(),
            shards,
        }
    }

    /// The zone's size in bytes as configured (`ngx.shared.DICT:capacity()`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes not charged to any entry (`ngx.shared.DICT:free_space()`).
    pub fn free_space(&self) -> usize {
        self.capacity
            .saturating_sub(self.used.load(Ordering::Relaxed))
    }

    /// LRU tick for an entry touched at `now` in shard `g`: the monotonic clock in nanoseconds,
    /// so shards compare without sharing a counter (one contended atomic per operation would
    /// undo the sharding), nudged past the shard's head so order within a shard stays strict.
    fn tick(&self, g: &Inner, now: Instant) -> u64 {
        let t = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let head = if g.head == NIL {
            0
        } else {
            g.node(g.head).tick
        };
        t.max(head + 1)
    }

    fn try_reserve(&self, n: usize) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(n) > self.capacity {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    fn remove_node(&self, g: &mut Inner, i: u32) -> Node {
        let node = g.remove(i);
        self.release(node.size);
        node
    }

    /// Runs `f` on shard `j` while the caller holds shard `own`. Locks are only ever waited for
    /// in increasing shard order (a lower one is only tried), so two workers evicting for each
    /// other cannot deadlock; a busy lower shard is simply skipped.
    fn with_shard<R>(
        &self,
        own: usize,
        g: &mut Inner,
        j: usize,
        f: impl FnOnce(&mut Inner) -> R,
    ) -> Option<R> {
        if j == own {
            return Some(f(g));
        }
        let mut other = if j > own {
            self.shards[j].lock()
        } else {
            self.shards[j].try_lock()?
        };
        Some(f(&mut other))
    }

    /// Reserves `n` bytes, first by dropping expired entries near the LRU tails, then (when
    /// `force`) by evicting least recently used entries zone-wide. Returns whether a valid
    /// (unexpired) entry was evicted: the `forcible` flag of `set`.
    fn reserve(
        &self,
        own: usize,
        g: &mut Inner,
        n: usize,
        force: bool,
        now: Instant,
    ) -> Result<bool, ShdictError> {
        if n > self.capacity {
            return Err(ShdictError::NoMemory);
        }
        if self.try_reserve(n) {
            return Ok(false);
        }
        for k in 0..SHARDS {
            let j = (own + k) % SHARDS;
            let done = self.with_shard(own, g, j, |s| {
                for i in s.tail_slots(EXPIRED_SCAN) {
                    if s.node(i).expired(now) {
                        self.remove_node(s, i);
                        if self.try_reserve(n) {
                            return true;
                        }
                    }
                }
                false
            });
            if done == Some(true) {
                return Ok(false);
            }
        }
        if !force {
            return Err(ShdictError::NoMemory);
        }
        let mut forcible = false;
        let mut skipped = [false; SHARDS];
        loop {
            let victim = (0..SHARDS)
                .filter(|&j| !skipped[j])
                .map(|j| {
                    let t = if j == own {
                        g.tail_tick()
                    } else {
                        self.shards[j].tail_tick.load(Ordering::Relaxed)
                    };
                    (t, j)
                })
                .filter(|&(t, _)| t != u64::MAX)
                .min();
            let Some((_, j)) = victim else {
                return Err(ShdictError::NoMemory);
            };
            let evicted = self.with_shard(own, g, j, |s| {
                if s.tail == NIL {
                    return None;
                }
                let tail = s.tail;
                Some(!self.remove_node(s, tail).expired(now))
            });
            match evicted {
                Some(Some(valid)) => forcible |= valid,
                _ => skipped[j] = true,
            }
            if self.try_reserve(n) {
                return Ok(forcible);
            }
        }
    }

    fn store(
        &self,
        op: StoreOp,
        key: &[u8],
        value: Option<Value>,
        exptime: f64,
        flags: u32,
        force: bool,
    ) -> Result<bool, ShdictError> {
        check_key(key)?;
        let own = shard_index(key);
        let now = Instant::now();
        let mut g = self.shards[own].lock();
        let existing = g.find(key);
        let live = existing.is_some_and(|i| !g.node(i).expired(now));
        match op {
            StoreOp::Add if live => return Err(ShdictError::Exists),
            StoreOp::Replace if !live => return Err(ShdictError::NotFound),
            _ => {}
        }
        // Like nginx, the old node is freed before the new one is allocated, so a failed
        // store leaves the key absent rather than stale.
        if let Some(i) = existing {
            self.remove_node(&mut g, i);
        }
        let Some(value) = value else {
            return Ok(false);
        };
        let size = scalar_size(key, &value);
        let forcible = self.reserve(own, &mut g, size, force, now)?;
        let node = Node {
            key: Arc::from(key),
            data: Data::Scalar(value),
            flags,
            expires: deadline(now, exptime),
            size,
            tick: 0,
            prev: NIL,
            next: NIL,
        };
        let tick = self.tick(&g, now);
        g.insert(node, tick);
        Ok(forcible)
    }

    /// Stores `value` (`None` deletes), evicting LRU entries if needed; returns `forcible`.
    pub fn set(
        &self,
        key: &[u8],
        value: Option<Value>,
        exptime: f64,
        flags: u32,
    ) -> Result<bool, ShdictError> {
        self.store(StoreOp::Set, key, value, exptime, flags, true)
    }

    /// Like [`Zone::set`] but fails with `NoMemory` instead of evicting valid entries.
    pub fn safe_set(
        &self,
        key: &[u8],
        value: Option<Value>,
        exptime: f64,
        flags: u32,
    ) -> Result<(), ShdictError> {
        self.store(StoreOp::Set, key, value, exptime, flags, false)
            .map(|_| ())
    }

    /// Stores only if the key is absent or expired (`Exists` otherwise); returns `forcible`.
    pub fn add(
        &self,
        key: &[u8],
        value: Option<Value>,
        exptime: f64,
        flags: u32,
    ) -> Result<bool, ShdictError> {
        self.store(StoreOp::Add, key, value, exptime, flags, true)
    }

    /// Like [`Zone::add`] but fails with `NoMemory` instead of evicting valid entries.
    pub fn safe_add(
        &self,
        key: &[u8],
        value: Option<Value>,
        exptime: f64,
        flags: u32,
    ) -> Result<(), ShdictError> {
        self.store(StoreOp::Add, key, value, exptime, flags, false)
            .map(|_| ())
    }

    /// Stores only if the key holds a live value (`NotFound` otherwise); returns `forcible`.
    pub fn replace(
        &self,
        key: &[u8],
        value: Option<Value>,
        exptime: f64,
        flags: u32,
    ) -> Result<bool, ShdictError> {
        self.store(StoreOp::Replace, key, value, exptime, flags, true)
    }

    /// Removes the key (expired or not).
    pub fn delete(&self, key: &[u8]) -> Result<(), ShdictError> {
        self.store(StoreOp::Set, key, None, 0.0, 0, false)
            .map(|_| ())
    }

    /// The live value and its flags; `None` if absent or expired. Lists give `IsAList`.
    pub fn get(&self, key: &[u8]) -> Result<Option<(Value, u32)>, ShdictError> {
        check_key(key)?;
        let now = Instant::now();
        let mut g = self.shards[shard_index(key)].lock();
        let Some(i) = g.find(key) else {
            return Ok(None);
        };
        if g.node(i).expired(now) {
            return Ok(None);
        }
        let out = match &g.node(i).data {
            Data::Scalar(v) => (v.clone(), g.node(i).flags),
            Data::List(_) => return Err(ShdictError::IsAList),
        };
        let tick = self.tick(&g, now);
        g.touch(i, tick);
        Ok(Some(out))
    }

    /// The value even if expired (until evicted or flushed), its flags and whether it is stale.
    pub fn get_stale(&self, key: &[u8]) -> Result<Option<(Value, u32, bool)>, ShdictError> {
        check_key(key)?;
        let now = Instant::now();
        let mut g = self.shards[shard_index(key)].lock();
        let Some(i) = g.find(key) else {
            return Ok(None);
        };
        let stale = g.node(i).expired(now);
        let out = match &g.node(i).data {
            Data::Scalar(v) => (v.clone(), g.node(i).flags, stale),
            Data::List(_) => return Err(ShdictError::IsAList),
        };
        if !stale {
            let tick = self.tick(&g, now);
            g.touch(i, tick);
        }
        Ok(Some(out))
    }

    /// Adds `by` to a number. A missing or expired key is created as `init + by` (with
    /// `init_ttl` seconds to live) when `init` is given, else `NotFound`. Returns the new value
    /// and `forcible`. An existing key keeps its TTL and flags.
    pub fn incr(
        &self,
        key: &[u8],
        by: f64,
        init: Option<f64>,
        init_ttl: f64,
    ) -> Result<(f64, bool), ShdictError> {
        check_key(key)?;
        let own = shard_index(key);
        let now = Instant::now();
        let mut g = self.shards[own].lock();
        if let Some(i) = g.find(key) {
            if !g.node(i).expired(now) {
                let node = g.node_mut(i);
                let Data::Scalar(Value::Number(n)) = &mut node.data else {
                    return Err(ShdictError::NotANumber);
                };
                *n += by;
                let out = *n;
                let tick = self.tick(&g, now);
                g.touch(i, tick);
                return Ok((out, false));
            }
            if init.is_none() {
                return Err(ShdictError::NotFound);
            }
            self.remove_node(&mut g, i);
        }
        let Some(init) = init else {
            return Err(ShdictError::NotFound);
        };
        let value = Value::Number(init + by);
        let size = scalar_size(key, &value);
        let forcible = self.reserve(own, &mut g, size, true, now)?;
        let node = Node {
            key: Arc::from(key),
            data: Data::Scalar(value),
            flags: 0,
            expires: deadline(now, init_ttl),
            size,
            tick: 0,
            prev: NIL,
            next: NIL,
        };
        let tick = self.tick(&g, now);
        g.insert(node, tick);
        Ok((init + by, forcible))
    }

    fn push(&self, key: &[u8], value: Value, front: bool) -> Result<usize, ShdictError> {
        check_key(key)?;
        if matches!(value, Value::Bool(_)) {
            return Err(ShdictError::BadValueType);
        }
        let own = shard_index(key);
        let now = Instant::now();
        let mut g = self.shards[own].lock();
        let mut slot = None;
        if let Some(i) = g.find(key) {
            if g.node(i).expired(now) {
                self.remove_node(&mut g, i);
            } else if matches!(g.node(i).data, Data::List(_)) {
                slot = Some(i);
            } else {
                return Err(ShdictError::NotAList);
            }
        }
        let add = item_size(&value);
        match slot {
            Some(i) => {
                // Pushing never evicts valid entries (OpenResty: "no memory" instead).
                self.reserve(own, &mut g, add, false, now)?;
                let node = g.node_mut(i);
                node.size += add;
                let Data::List(list) = &mut node.data else {
                    return Err(ShdictError::NotAList);
                };
                if front {
                    list.push_front(value);
                } else {
                    list.push_back(value);
                }
                let len = list.len();
                let tick = self.tick(&g, now);
                g.touch(i, tick);
                Ok(len)
            }
            None => {
                let size = key.len() + ENTRY_OVERHEAD + add;
                self.reserve(own, &mut g, size, false, now)?;
                let node = Node {
                    key: Arc::from(key),
                    data: Data::List(VecDeque::from([value])),
                    flags: 0,
                    expires: None,
                    size,
                    tick: 0,
                    prev: NIL,
                    next: NIL,
                };
                let tick = self.tick(&g, now);
                g.insert(node, tick);
                Ok(1)
            }
        }
    }

    fn pop(&self, key: &[u8], front: bool) -> Result<Option<Value>, ShdictError> {
        check_key(key)?;
        let now = Instant::now();
        let mut g = self.shards[shard_index(key)].lock();
        let Some(i) = g.find(key) else {
            return Ok(None);
        };
        if g.node(i).expired(now) {
            return Ok(None);
        }
        let node = g.node_mut(i);
        let Data::List(list) = &mut node.data else {
            return Err(ShdictError::NotAList);
        };
        let v = if front {
            list.pop_front()
        } else {
            list.pop_back()
        };
        let empty = list.is_empty();
        if let Some(v) = &v {
            let sz = item_size(v);
            node.size -= sz;
            self.release(sz);
        }
        if empty {
            self.remove_node(&mut g, i);
        } else {
            let tick = self.tick(&g, now);
            g.touch(i, tick);
        }
        Ok(v)
    }

    /// Pushes onto the head of the list at `key` (created if absent); returns the new length.
    pub fn lpush(&self, key: &[u8], value: Value) -> Result<usize, ShdictError> {
        self.push(key, value, true)
    }

    /// Pushes onto the tail of the list at `key` (created if absent); returns the new length.
    pub fn rpush(&self, key: &[u8], value: Value) -> Result<usize, ShdictError> {
        self.push(key, value, false)
    }

    /// Pops the head of the list at `key`; `None` if absent. An emptied list is removed.
    pub fn lpop(&self, key: &[u8]) -> Result<Option<Value>, ShdictError> {
        self.pop(key, true)
    }

    /// Pops the tail of the list at `key`; `None` if absent. An emptied list is removed.
    pub fn rpop(&self, key: &[u8]) -> Result<Option<Value>, ShdictError> {
        self.pop(key, false)
    }

    /// Length of the list at `key` (0 if absent).
    pub fn llen(&self, key: &[u8]) -> Result<usize, ShdictError> {
        check_key(key)?;
        let now = Instant::now();
        let g = self.shards[shard_index(key)].lock();
        let Some(i) = g.find(key) else { return Ok(0) };
        let node = g.node(i);
        if node.expired(now) {
            return Ok(0);
        }
        match &node.data {
            Data::List(l) => Ok(l.len()),
            Data::Scalar(_) => Err(ShdictError::NotAList),
        }
    }

    /// Remaining seconds to live (millisecond resolution), 0 for no expiry, `NotFound` if absent
    /// or expired.
    pub fn ttl(&self, key: &[u8]) -> Result<f64, ShdictError> {
        check_key(key)?;
        let now = Instant::now();
        let g = self.shards[shard_index(key)].lock();
        let Some(i) = g.find(key) else {
            return Err(ShdictError::NotFound);
        };
        let node = g.node(i);
        match node.expires {
            None => Ok(0.0),
            Some(e) if e <= now => Err(ShdictError::NotFound),
            // Rounded up so a live entry never reports 0, which would mean "never expires".
            Some(e) => Ok(((e - now).as_micros() as f64 / 1000.0).ceil() / 1000.0),
        }
    }

    /// Sets a new TTL (seconds from now, 0 = never) on a live key; `NotFound` otherwise.
    pub fn expire(&self, key: &[u8], exptime: f64) -> Result<(), ShdictError> {
        check_key(key)?;
        let now = Instant::now();
        let mut g = self.shards[shard_index(key)].lock();
        let Some(i) = g.find(key) else {
            return Err(ShdictError::NotFound);
        };
        let node = g.node_mut(i);
        if node.expired(now) {
            return Err(ShdictError::NotFound);
        }
        node.expires = deadline(now, exptime);
        Ok(())
    }

    /// Marks every entry expired without freeing memory (`get_stale` still sees them).
    pub fn flush_all(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            let mut g = shard.lock();
            for node in g.slots.iter_mut().flatten() {
                node.expires = Some(now);
            }
        }
    }

    /// Frees up to `max` expired entries (0 = all); returns how many were freed.
    pub fn flush_expired(&self, max: usize) -> usize {
        let now = Instant::now();
        let mut freed = 0;
        for shard in self.shards.iter() {
            let mut g = shard.lock();
            let victims: Vec<u32> = g
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.as_ref().filter(|n| n.expired(now)).map(|_| i as u32))
                .collect();
            for i in victims {
                if max != 0 && freed >= max {
                    return freed;
                }
                self.remove_node(&mut g, i);
                freed += 1;
            }
        }
        freed
    }

    /// Up to `max` live keys (0 = all), in no particular order.
    pub fn get_keys(&self, max: usize) -> Vec<Vec<u8>> {
        let now = Instant::now();
        let mut keys = Vec::new();
        for shard in self.shards.iter() {
            let g = shard.lock();
            for node in g.slots.iter().flatten() {
                if max != 0 && keys.len() >= max {
                    return keys;
                }
                if !node.expired(now) {
                    keys.push(node.key.to_vec());
                }
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::sleep;

    fn s(v: &str) -> Option<Value> {
        Some(Value::Str(Bytes::copy_from_slice(v.as_bytes())))
    }

    fn n(v: f64) -> Option<Value> {
        Some(Value::Number(v))
    }

    #[test]
    fn basic_get_set_types_and_flags() {
        let z = Zone::new("t", 1 << 20);
        assert_eq!(z.set(b"a", s("x\0y"), 0.0, 0), Ok(false));
        assert_eq!(z.set(b"b", n(1.5), 0.0, 7), Ok(false));
        assert_eq!(z.set(b"c", Some(Value::Bool(false)), 0.0, 0), Ok(false));
        assert_eq!(
            z.get(b"a").unwrap(),
            Some((Value::Str(Bytes::from_static(b"x\0y")), 0))
        );
        assert_eq!(z.get(b"b").unwrap(), Some((Value::Number(1.5), 7)));
        assert_eq!(z.get(b"c").unwrap(), Some((Value::Bool(false), 0)));
        assert_eq!(z.get(b"zz").unwrap(), None);
        assert_eq!(z.get(b""), Err(ShdictError::EmptyKey));
        assert_eq!(
            z.get(&vec![b'k'; MAX_KEY_LEN + 1]),
            Err(ShdictError::KeyTooLong)
        );
        z.set(b"a", None, 0.0, 0).unwrap();
        assert_eq!(z.get(b"a").unwrap(), None);
        z.delete(b"b").unwrap();
        assert_eq!(z.get(b"b").unwrap(), None);
    }

    #[test]
    fn add_replace() {
        let z = Zone::new("t", 1 << 20);
        assert_eq!(z.replace(b"k", n(1.0), 0.0, 0), Err(ShdictError::NotFound));
        assert_eq!(z.add(b"k", n(1.0), 0.0, 0), Ok(false));
        assert_eq!(z.add(b"k", n(2.0), 0.0, 0), Err(ShdictError::Exists));
        assert_eq!(z.safe_add(b"k", n(2.0), 0.0, 0), Err(ShdictError::Exists));
        assert_eq!(z.replace(b"k", n(3.0), 0.0, 0), Ok(false));
        assert_eq!(z.get(b"k").unwrap(), Some((Value::Number(3.0), 0)));
    }

    #[test]
    fn lru_eviction_under_byte_pressure() {
        // Room for exactly four entries of this size.
        let size = scalar_size(b"k0", &Value::Str(Bytes::from(vec![0u8; 100])));
        let z = Zone::new("t", size * 4);
        let v = || Some(Value::Str(Bytes::from(vec![b'x'; 100])));
        for k in ["k0", "k1", "k2", "k3"] {
            assert_eq!(z.set(k.as_bytes(), v(), 0.0, 0), Ok(false));
        }
        assert_eq!(z.free_space(), 0);
        // Touch k0 so k1 becomes the least recently used.
        assert!(z.get(b"k0").unwrap().is_some());
        assert_eq!(z.set(b"k4", v(), 0.0, 0), Ok(true));
        assert!(z.get(b"k1").unwrap().is_none());
        for k in ["k0", "k2", "k3", "k4"] {
            assert!(z.get(k.as_bytes()).unwrap().is_some(), "{k} evicted");
        }
        // safe_set refuses to evict valid entries.
        assert_eq!(z.safe_set(b"k5", v(), 0.0, 0), Err(ShdictError::NoMemory));
        assert_eq!(z.safe_add(b"k5", v(), 0.0, 0), Err(ShdictError::NoMemory));
        assert_eq!(z.get_keys(0).len(), 4);
        // A value bigger than the whole zone never fits.
        let huge = Some(Value::Str(Bytes::from(vec![0u8; size * 5])));
        assert_eq!(z.set(b"big", huge, 0.0, 0), Err(ShdictError::NoMemory));
    }

    #[test]
    fn expired_entries_are_evicted_first_without_forcible() {
        let size = scalar_size(b"k0", &Value::Number(0.0));
        let z = Zone::new("t", size * 2);
        z.set(b"k0", n(0.0), 0.0, 0).unwrap();
        z.set(b"k1", n(1.0), 0.01, 0).unwrap();
        sleep(Duration::from_millis(30));
        // k1 is expired: it makes room even though k0 is older, and safely.
        assert_eq!(z.safe_set(b"k2", n(2.0), 0.0, 0), Ok(()));
        assert!(z.get(b"k0").unwrap().is_some());
        // The get above made k2 the least recently used entry.
        assert_eq!(z.set(b"k3", n(3.0), 0.0, 0), Ok(true));
        assert!(z.get(b"k2").unwrap().is_none());
        assert!(z.get(b"k0").unwrap().is_some());
    }

    #[test]
    fn ttl_expiry_and_stale() {
        let z = Zone::new("t", 1 << 20);
        z.set(b"k", s("v"), 0.05, 3).unwrap();
        let ttl = z.ttl(b"k").unwrap();
        assert!(ttl > 0.0 && ttl <= 0.05, "{ttl}");
        assert_eq!(
            z.get_stale(b"k").unwrap(),
            Some((Value::Str(Bytes::from_static(b"v")), 3, false))
        );
        sleep(Duration::from_millis(70));
        assert_eq!(z.get(b"k").unwrap(), None);
        assert_eq!(z.ttl(b"k"), Err(ShdictError::NotFound));
        assert_eq!(z.expire(b"k", 1.0), Err(ShdictError::NotFound));
        assert_eq!(
            z.get_stale(b"k").unwrap(),
            Some((Value::Str(Bytes::from_static(b"v")), 3, true))
        );
        // add and incr-with-init treat an expired key as absent.
        assert_eq!(z.add(b"k", s("w"), 0.0, 0), Ok(false));
        assert_eq!(z.ttl(b"k"), Ok(0.0));
        assert_eq!(z.expire(b"k", 0.05), Ok(()));
        assert!(z.ttl(b"k").unwrap() > 0.0);
        assert_eq!(z.expire(b"k", 0.0), Ok(()));
        assert_eq!(z.ttl(b"k"), Ok(0.0));
    }

    #[test]
    fn incr_semantics() {
        let z = Zone::new("t", 1 << 20);
        assert_eq!(z.incr(b"c", 1.0, None, 0.0), Err(ShdictError::NotFound));
        assert_eq!(z.incr(b"c", 1.0, Some(10.0), 0.0), Ok((11.0, false)));
        assert_eq!(z.incr(b"c", -0.5, Some(100.0), 0.0), Ok((10.5, false)));
        z.set(b"s", s("x"), 0.0, 0).unwrap();
        assert_eq!(z.incr(b"s", 1.0, None, 0.0), Err(ShdictError::NotANumber));
        assert_eq!(
            z.incr(b"s", 1.0, Some(0.0), 0.0),
            Err(ShdictError::NotANumber)
        );
        z.incr(b"t", 1.0, Some(0.0), 0.02).unwrap();
        sleep(Duration::from_millis(40));
        assert_eq!(z.get(b"t").unwrap(), None);
        assert_eq!(z.incr(b"t", 1.0, None, 0.0), Err(ShdictError::NotFound));
        assert_eq!(z.incr(b"t", 1.0, Some(5.0), 0.0), Ok((6.0, false)));
    }

    #[test]
    fn concurrent_incr_is_exact() {
        let z = Arc::new(Zone::new("t", 1 << 20));
        z.set(b"n", n(0.0), 0.0, 0).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let z = z.clone();
                std::thread::spawn(move || {
                    for i in 0..10000 {
                        z.incr(b"n", 1.0, None, 0.0).unwrap();
                        // Other keys too, so shards contend and evict while we count.
                        z.set(format!("k{t}-{}", i % 50).as_bytes(), n(1.0), 0.0, 0)
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(z.get(b"n").unwrap(), Some((Value::Number(40000.0), 0)));
    }

    #[test]
    fn concurrent_eviction_stays_bounded() {
        let z = Arc::new(Zone::new("t", 16 * 1024));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let z = z.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        let _ = z.set(
                            format!("k{t}-{i}").as_bytes(),
                            s("0123456789abcdef0123456789"),
                            0.0,
                            0,
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(z.used.load(Ordering::Relaxed) <= z.capacity);
        let charged: usize = z
            .shards
            .iter()
            .map(|s| {
                s.lock()
                    .slots
                    .iter()
                    .flatten()
                    .map(|n| n.size)
                    .sum::<usize>()
            })
            .sum();
        assert_eq!(charged, z.used.load(Ordering::Relaxed));
    }

    #[test]
    fn lists() {
        let z = Zone::new("t", 1 << 20);
        assert_eq!(z.llen(b"l"), Ok(0));
        assert_eq!(z.lpop(b"l"), Ok(None));
        assert_eq!(z.rpush(b"l", Value::Str(Bytes::from_static(b"b"))), Ok(1));
        assert_eq!(z.lpush(b"l", Value::Number(1.0)), Ok(2));
        assert_eq!(z.rpush(b"l", Value::Str(Bytes::from_static(b"c"))), Ok(3));
        assert_eq!(
            z.lpush(b"l", Value::Bool(true)),
            Err(ShdictError::BadValueType)
        );
        assert_eq!(z.llen(b"l"), Ok(3));
        assert_eq!(z.get(b"l"), Err(ShdictError::IsAList));
        assert_eq!(z.incr(b"l", 1.0, None, 0.0), Err(ShdictError::NotANumber));
        assert_eq!(z.lpop(b"l"), Ok(Some(Value::Number(1.0))));
        assert_eq!(z.rpop(b"l"), Ok(Some(Value::Str(Bytes::from_static(b"c")))));
        assert_eq!(z.rpop(b"l"), Ok(Some(Value::Str(Bytes::from_static(b"b")))));
        assert_eq!(z.rpop(b"l"), Ok(None));
        assert_eq!(z.free_space(), z.capacity());
        z.set(b"s", s("x"), 0.0, 0).unwrap();
        assert_eq!(
            z.lpush(b"s", Value::Number(1.0)),
            Err(ShdictError::NotAList)
        );
        assert_eq!(z.lpop(b"s"), Err(ShdictError::NotAList));
        assert_eq!(z.llen(b"s"), Err(ShdictError::NotAList));
        // A full zone makes pushes fail rather than evict.
        let tiny = Zone::new("t", 200);
        tiny.set(b"x", s("y"), 0.0, 0).unwrap();
        assert_eq!(
            tiny.rpush(b"l", Value::Str(Bytes::from(vec![0u8; 100]))),
            Err(ShdictError::NoMemory)
        );
    }

    #[test]
    fn flush_all_flush_expired_get_keys() {
        let z = Zone::new("t", 1 << 20);
        for i in 0..2000 {
            z.set(format!("k{i}").as_bytes(), n(i as f64), 0.0, 0)
                .unwrap();
        }
        assert_eq!(z.get_keys(1024).len(), 1024);
        assert_eq!(z.get_keys(0).len(), 2000);
        assert_eq!(z.get_keys(10).len(), 10);
        z.set(b"short", n(1.0), 0.01, 0).unwrap();
        sleep(Duration::from_millis(30));
        assert_eq!(z.get_keys(0).len(), 2000);
        assert_eq!(z.flush_expired(0), 1);
        assert_eq!(z.get_stale(b"short").unwrap(), None);
        let before = z.free_space();
        z.flush_all();
        assert_eq!(z.get(b"k1").unwrap(), None);
        assert_eq!(
            z.get_stale(b"k1").unwrap(),
            Some((Value::Number(1.0), 0, true))
        );
        assert_eq!(z.get_keys(0).len(), 0);
        assert_eq!(z.free_space(), before);
        assert_eq!(z.flush_expired(100), 100);
        assert_eq!(z.flush_expired(0), 1900);
        assert_eq!(z.free_space(), z.capacity());
    }
}
