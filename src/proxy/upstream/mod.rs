//! Upstream groups at run time: the peers of every `upstream {}` block with their shared state
//! (active connections, passive-health counters, active-health verdicts, circuit breakers,
//! latency estimates), the balancing methods, and the per-request [`Picker`] the proxy asks for
//! a peer on every try.
//!
//! One [`UpstreamSet`] serves all workers (state is shared, as an nginx upstream with a `zone`).
//! It is rebuilt on reload; a peer with the same server text and address keeps its state, and
//! an unchanged block keeps its whole [`Upstream`], so counters, health and breakers survive.
//!
//! ```ignore
//! let up = rc.env.upstreams.get("backend").ok_or("no upstream")?;
//! let mut picker = up.picker_for(&rc);
//! loop {
//!     let peer = picker.next(&rc).await?;          // Err: "no live upstreams" -> 502
//!     match try_peer(&peer).await {
//!         Ok(resp) => { picker.report(&peer, TryResult::Ok { elapsed }); break }
//!         Err(_) => picker.report(&peer, TryResult::Fail { elapsed }),
//!     }
//! }
//! // keep `picker` alive until the response body is done: it holds the peer's connection
//! // count (least_conn, max_conns) and releases it on drop.
//! ```
//!
//! Contract notes (changes from docs/briefs): `TryResult` has a third variant `Status` for a
//! response status that made proxy_next_upstream move on; `Picker::exit_status` tells the
//! proxy which status to finalize with when `next` fails (None: 502); `Picker::tries` is
//! nginx's `peer.tries`; `Picker::limit_tries` passes proxy_next_upstream_tries to
//! `ngx.balancer.set_more_tries`; `Upstream::picker_for` evaluates the hash key template.

pub mod balance;
pub mod breaker;
pub mod health;

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::conf::model::{Balance, UpstreamConf};
use crate::conf::template::Template;
use crate::conf::Config;
use crate::http::request::ReqCtx;
use crate::log::{self as elog, Level};
use balance::{Group, HashState, Point, Tried};
use breaker::{Breaker, BreakerState, Transition};

/// Milliseconds on the process's monotonic clock (nginx uses seconds; we keep finer time).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let d = crate::clock::now().saturating_duration_since(*START.get_or_init(Instant::now));
    // as_millis() without its u128 division (this runs on every pick).
    d.as_secs() * 1000 + d.subsec_millis() as u64 + 1
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every upstream of a configuration, by name.
#[derive(Default, Debug)]
pub struct UpstreamSet {
    map: crate::NameMap<String, Arc<Upstream>>,
}

impl UpstreamSet {
    /// Borrowed: the proxy holds it for one request without touching its shared count.
    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.map.get(name)
    }

    /// All upstreams, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.map.values()
    }

    /// Names, sorted (for `ngx.upstream.get_upstreams`).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map.keys().cloned().collect();
        v.sort();
        v
    }

    /// Build the set for `cfg`, carrying over the state of `old` (see the module doc).
    pub fn build(cfg: &Config, old: Option<&UpstreamSet>) -> Arc<UpstreamSet> {
        let mut map = crate::NameMap::default();
        for uc in &cfg.http.upstreams {
            let prev = old.and_then(|o| o.map.get(&uc.name));
            let up = match prev {
                Some(p) if p.conf.same_shape(uc) => p.clone(),
                _ => Arc::new(Upstream::new(uc.clone(), prev.map(|p| &**p))),
            };
            map.insert(uc.name.clone(), up);
        }
        Arc::new(UpstreamSet { map })
    }
}

/// Connection pool settings of an upstream (`keepalive N`, `keepalive_timeout`,
/// `keepalive_requests`, `keepalive_time`), for the proxy's pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Keepalive {
    pub max_idle: usize,
    pub timeout_ms: u64,
    pub requests: u64,
    pub time_ms: u64,
}

/// State of one peer shared by all workers.
#[derive(Debug)]
pub struct PeerState {
    /// Requests holding this peer now (least_conn, max_conns).
    pub conns: AtomicU32,
    /// nginx's passive health: `fails`, `accessed`, `checked` (ms).
    pub fails: AtomicU32,
    pub accessed: AtomicU64,
    pub checked: AtomicU64,
    /// Smooth weighted round robin.
    pub current_weight: AtomicI64,
    pub effective_weight: AtomicI64,
    /// `ngx.upstream.set_peer_down`.
    pub admin_down: AtomicBool,
    /// Active health check verdict and streaks.
    pub healthy: AtomicBool,
    pub hc_fail_streak: AtomicU32,
    pub hc_pass_streak: AtomicU32,
    /// Peak EWMA of response time in ms (f64 bits; NaN bits until the first sample) and the
    /// time of the last sample.
    ewma: AtomicU64,
    ewma_at: AtomicU64,
    /// Set through [`PeerState::set_breaker`] only, which keeps `has_breaker` true to it.
    breaker: Mutex<Option<Breaker>>,
    /// Whether `breaker` holds one, read without the lock: most upstreams have no
    /// circuit_breaker, and the lock was taken three times a request for nothing (a pair of
    /// atomic operations each, on a line every worker shares).
    has_breaker: AtomicBool,
    /// Picks so far (metrics).
    pub requests: AtomicU64,
}

const NO_SAMPLE: u64 = u64::MAX;

impl PeerState {
    fn new(weight: i64, breaker: Option<crate::conf::model::CircuitBreaker>) -> PeerState {
        PeerState {
            conns: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            accessed: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            current_weight: AtomicI64::new(0),
            effective_weight: AtomicI64::new(weight),
            admin_down: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            hc_fail_streak: AtomicU32::new(0),
            hc_pass_streak: AtomicU32::new(0),
            ewma: AtomicU64::new(NO_SAMPLE),
            ewma_at: AtomicU64::new(0),
            has_breaker: AtomicBool::new(breaker.is_some()),
            breaker: Mutex::new(breaker.map(Breaker::new)),
            requests: AtomicU64::new(0),
        }
    }

    /// The latency estimate (ms) decayed toward zero since the last sample (as Finagle's
    /// peak EWMA reads it), so a peer that was slow once gets tried again after a while.
    /// None before the first sample; `decay_ms` 0 reads the raw value.
    pub fn ewma_estimate(&self, now: u64, decay_ms: u64) -> Option<f64> {
        let bits = self.ewma.load(Relaxed);
        if bits == NO_SAMPLE {
            return None;
        }
        let v = f64::from_bits(bits);
        if decay_ms == 0 {
            return Some(v);
        }
        let dt = now.saturating_sub(self.ewma_at.load(Relaxed)) as f64;
        Some(v * (-dt / decay_ms as f64).exp())
    }

    /// Feed one response time: peaks are taken at once, improvements are averaged in with
    /// weight `1 - exp(-dt/decay)`.
    pub fn ewma_observe(&self, now: u64, sample_ms: f64, decay_ms: u64) {
        let bits = self.ewma.load(Relaxed);
        let prev_at = self.ewma_at.swap(now, Relaxed);
        let next = if bits == NO_SAMPLE {
            sample_ms
        } else {
            let prev = f64::from_bits(bits);
            if sample_ms > prev {
                sample_ms
            } else {
                let dt = now.saturating_sub(prev_at) as f64;
                let w = (-dt / decay_ms.max(1) as f64).exp();
                prev * w + sample_ms * (1.0 - w)
            }
        };
        self.ewma.store(next.to_bits(), Relaxed);
    }

    pub fn breaker_state(&self, now: u64) -> Option<BreakerState> {
        self.with_breaker(|b| b.state(now))
    }

    /// Run `f` on the peer's breaker under its lock; `None` (no lock taken) when it has none.
    fn with_breaker<R>(&self, f: impl FnOnce(&mut Breaker) -> R) -> Option<R> {
        if !self.has_breaker.load(Relaxed) {
            return None;
        }
        lock(&self.breaker).as_mut().map(f)
    }

    /// Install the breaker a (re)loaded configuration asks for, keeping one whose settings
    /// did not change (its state survives a reload).
    fn set_breaker(&self, conf: Option<crate::conf::model::CircuitBreaker>) {
        let mut b = lock(&self.breaker);
        if b.as_ref().map(|b| b.conf) != conf {
            *b = conf.map(Breaker::new);
        }
        self.has_breaker.store(b.is_some(), Relaxed);
    }
}

/// One address of a `server` line, with its settings and shared state.
#[derive(Debug)]
pub struct PeerSlot {
    pub addr: SocketAddr,
    /// `$upstream_addr` text: the address.
    pub name: Arc<str>,
    /// The server's host as written (Host header / SNI).
    pub host: Arc<str>,
    /// The `server` argument as written (consistent hashing keys on it, as nginx).
    pub server: Arc<str>,
    pub weight: i64,
    pub max_fails: u32,
    pub fail_timeout_ms: u64,
    pub max_conns: u32,
    pub down: bool,
    pub backup: bool,
    pub st: Arc<PeerState>,
}

impl PeerSlot {
    /// nginx's skip rules (down, max_fails within fail_timeout, max_conns; a lone peer ignores
    /// max_fails), then our health check and breaker.
    pub fn usable(&self, now: u64, single: bool) -> bool {
        let st = &self.st;
        if self.down || st.admin_down.load(Relaxed) || !st.healthy.load(Relaxed) {
            return false;
        }
        if !single
            && self.max_fails > 0
            && st.fails.load(Relaxed) >= self.max_fails
            && now.saturating_sub(st.checked.load(Relaxed)) <= self.fail_timeout_ms
        {
            return false;
        }
        if self.max_conns > 0 && st.conns.load(Relaxed) >= self.max_conns {
            return false;
        }
        st.with_breaker(|b| b.allows(now)).unwrap_or(true)
    }
}

/// An `upstream {}` block at run time.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub keepalive: Option<Keepalive>,
    pub conf: Arc<UpstreamConf>,
    pub primary: Vec<PeerSlot>,
    pub backup: Vec<PeerSlot>,
    /// Serialises picks and passive-health updates, as nginx's peers lock.
    lock: Mutex<()>,
    ring: Vec<Point>,
    ring_servers: Vec<Arc<str>>,
}

impl Upstream {
    /// Build from a block; peers that `prev` had (same server text and address) keep their
    /// shared state.
    pub fn new(conf: Arc<UpstreamConf>, prev: Option<&Upstream>) -> Upstream {
        let mut primary = Vec::new();
        let mut backup = Vec::new();
        for s in &conf.servers {
            let server: Arc<str> = Arc::from(s.text.as_str());
            let host: Arc<str> = Arc::from(s.host.as_str());
            for addr in &s.addrs {
                let weight = s.weight as i64;
                let st = prev
                    .and_then(|p| {
                        p.primary
                            .iter()
                            .chain(p.backup.iter())
                            .find(|o| o.addr == *addr && *o.server == *server)
                    })
                    .map(|o| {
                        let st = o.st.clone();
                        if st.effective_weight.load(Relaxed) > weight {
                            st.effective_weight.store(weight, Relaxed);
                        }
                        st.set_breaker(conf.circuit_breaker);
                        if conf.health_check.is_none() {
                            st.healthy.store(true, Relaxed);
                        }
                        st
                    })
                    .unwrap_or_else(|| Arc::new(PeerState::new(weight, conf.circuit_breaker)));
                let slot = PeerSlot {
                    addr: *addr,
                    name: Arc::from(addr.to_string().as_str()),
                    host: host.clone(),
                    server: server.clone(),
                    weight,
                    max_fails: s.max_fails,
                    fail_timeout_ms: s.fail_timeout_ms,
                    max_conns: s.max_conns,
                    down: s.down,
                    backup: s.backup,
                    st,
                };
                if s.backup {
                    backup.push(slot);
                } else {
                    primary.push(slot);
                }
            }
        }
        let (ring, ring_servers) = match conf.method {
            Balance::Hash {
                consistent: true, ..
            } => balance::ketama_ring(&primary),
            _ => (Vec::new(), Vec::new()),
        };
        Upstream {
            name: conf.name.clone(),
            keepalive: conf.keepalive.as_ref().map(|k| Keepalive {
                max_idle: k.max_idle,
                timeout_ms: k.timeout_ms,
                requests: k.requests,
                time_ms: k.time_ms,
            }),
            conf,
            primary,
            backup,
            lock: Mutex::new(()),
            ring,
            ring_servers,
        }
    }

    /// The implicit upstream of `proxy_pass http://host:port` (nginx makes one per address
    /// list: round robin, max_fails=1, fail_timeout=10s).
    pub fn implicit(name: &str, host: &str, addrs: &[SocketAddr]) -> Arc<Upstream> {
        let conf = UpstreamConf {
            name: name.to_string(),
            servers: vec![crate::conf::model::UpstreamServer {
                text: name.to_string(),
                host: host.to_string(),
                addrs: addrs.to_vec(),
                weight: 1,
                max_fails: 1,
                fail_timeout_ms: 10_000,
                backup: false,
                down: false,
                max_conns: 0,
            }],
            method: Balance::RoundRobin,
            keepalive: None,
            zone: None,
            health_check: None,
            circuit_breaker: None,
            balancer: None,
            file_line: String::new(),
        };
        Arc::new(Upstream::new(Arc::new(conf), None))
    }

    /// The `hash` key template, when the method is `hash`.
    pub fn hash_key(&self) -> Option<&Template> {
        match &self.conf.method {
            Balance::Hash { key, .. } => Some(key),
            _ => None,
        }
    }

    /// A picker for one request (contract form: the caller evaluated the hash key).
    pub fn picker(self: &Arc<Self>, hash_key: Option<Bytes>, client: IpAddr) -> Picker {
        Picker {
            up: self.clone(),
            key: hash_key,
            client,
            in_backup: false,
            tried: Tried::new(self.primary.len()),
            hash: HashState::default(),
            random_tries: 0,
            current: None,
            last_failure: None,
            more_tries: 0,
            tries_limit: None,
            lua_tries: None,
            timeouts: None,
            exit_status: None,
            rc: None,
        }
    }

    /// A picker for `rc`: evaluates the `hash` key and takes the client address.
    pub fn picker_for(self: &Arc<Self>, rc: &ReqCtx) -> Picker {
        let key = self.hash_key().map(|t| {
            let st = rc.st.borrow();
            Bytes::from(crate::http::variables::eval(rc, &st, t))
        });
        self.picker(key, rc.conn.remote.ip())
    }

    /// Primary peers that are not `down` plus backups: nginx's `peer.tries`.
    pub fn tries(&self) -> u32 {
        self.primary
            .iter()
            .chain(self.backup.iter())
            .filter(|p| !p.down)
            .count()
            .max(1) as u32
    }

    /// Per-peer view for metrics and `ngx.upstream`.
    pub fn peer_status(&self, now: u64) -> Vec<PeerStatus> {
        let decay = match self.conf.method {
            Balance::Ewma { decay_ms } => decay_ms,
            _ => 0,
        };
        self.primary
            .iter()
            .chain(self.backup.iter())
            .map(|p| PeerStatus {
                name: p.name.clone(),
                server: p.server.clone(),
                backup: p.backup,
                weight: p.weight,
                conns: p.st.conns.load(Relaxed),
                fails: p.st.fails.load(Relaxed),
                max_fails: p.max_fails,
                fail_timeout_ms: p.fail_timeout_ms,
                down: p.down || p.st.admin_down.load(Relaxed),
                healthy: p.st.healthy.load(Relaxed),
                breaker: p.st.breaker_state(now),
                requests: p.st.requests.load(Relaxed),
                ewma_ms: p.st.ewma_estimate(now, decay),
                usable: p.usable(now, self.primary.len() == 1 && self.backup.is_empty()),
            })
            .collect()
    }

    fn single(&self) -> bool {
        self.primary.len() == 1 && self.backup.is_empty()
    }
}

/// One peer's state for readers (metrics, `ngx.upstream`).
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub name: Arc<str>,
    pub server: Arc<str>,
    pub backup: bool,
    pub weight: i64,
    pub conns: u32,
    pub fails: u32,
    pub max_fails: u32,
    pub fail_timeout_ms: u64,
    pub down: bool,
    pub healthy: bool,
    pub breaker: Option<BreakerState>,
    pub requests: u64,
    pub ewma_ms: Option<f64>,
    pub usable: bool,
}

/// The peer chosen for one try.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// `$upstream_addr` text.
    pub name: Arc<str>,
    /// The server's host for Host/SNI.
    pub host: Arc<str>,
    /// (backup group, index) for configured peers; None for a peer set by balancer_by_lua that
    /// is not one of the upstream's servers.
    slot: Option<(bool, usize)>,
}

/// How one try went.
#[derive(Debug, Clone, Copy)]
pub enum TryResult {
    /// A response the proxy keeps.
    Ok { elapsed: Duration },
    /// Connect error, timeout, reset, invalid response: nginx's NGX_PEER_FAILED
    /// (`get_last_failure()` says "failed", 502).
    Fail { elapsed: Duration },
    /// A response whose status made proxy_next_upstream move on. `failed`: the status counts
    /// as a peer failure (http_500/502/503/504 do; http_403/404/429 do not, they are "next").
    Status {
        elapsed: Duration,
        status: u16,
        failed: bool,
    },
}

impl TryResult {
    fn failed(&self) -> bool {
        match self {
            TryResult::Ok { .. } => false,
            TryResult::Fail { .. } => true,
            TryResult::Status { failed, .. } => *failed,
        }
    }
    fn elapsed(&self) -> Duration {
        match self {
            TryResult::Ok { elapsed }
            | TryResult::Fail { elapsed }
            | TryResult::Status { elapsed, .. } => *elapsed,
        }
    }
}

/// What the Lua balancer of one try asked for (filled by `ngx.balancer`, read by the picker).
#[derive(Debug, Default)]
pub struct BalancerCall {
    pub peer: Option<(SocketAddr, Option<String>)>,
    pub more_tries: Option<u32>,
    /// Seconds -> ms; 0 means "inherit".
    pub timeouts: Option<(u64, u64, u64)>,
    pub last_failure: Option<(&'static str, u16)>,
    /// How many tries set_more_tries may still add (proxy_next_upstream_tries minus the tries
    /// already allowed), for its "reduced tries due to limit".
    pub tries_left: Option<u32>,
}

/// The peer currently held by a picker.
#[derive(Debug)]
struct Held {
    /// The held peer's address (its names are not needed here: no Arc clones per pick).
    addr: SocketAddr,
    st: Arc<PeerState>,
    trial: bool,
    reported: bool,
}

/// Per-request balancing state: what was tried, hash progress, what balancer_by_lua set.
pub struct Picker {
    up: Arc<Upstream>,
    key: Option<Bytes>,
    client: IpAddr,
    in_backup: bool,
    tried: Tried,
    hash: HashState,
    random_tries: u32,
    current: Option<Held>,
    last_failure: Option<(&'static str, u16)>,
    more_tries: u32,
    tries_limit: Option<u32>,
    /// Tries allowed with balancer_by_lua: the upstream's own count, plus every
    /// set_more_tries (OpenResty adds them up).
    lua_tries: Option<u32>,
    timeouts: Option<(u64, u64, u64)>,
    exit_status: Option<u16>,
    rc: Option<Rc<ReqCtx>>,
}

impl Picker {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.up
    }

    /// Runs balancer_by_lua (when the upstream has one) with the request installed, else the
    /// balancing method. Err = no live upstreams (logged here; the proxy answers 502, or
    /// [`Picker::exit_status`] when the Lua balancer failed or called ngx.exit).
    pub async fn next(&mut self, rc: &Rc<ReqCtx>) -> Result<Peer, String> {
        self.release();
        if self.rc.is_none() {
            self.rc = Some(rc.clone());
        }
        let chunk = rc
            .env
            .cfg
            .http
            .upstreams
            .iter()
            .find(|u| u.name == self.up.name)
            .and_then(|u| u.balancer.clone());
        if let Some(chunk) = chunk {
            if let Some(peer) = self.run_lua(rc, &chunk).await? {
                return Ok(peer);
            }
        }
        self.pick().map_err(|e| {
            crate::log::request_error(
                rc,
                Level::Error,
                &format!(
                    "{} while connecting to upstream, upstream: \"{}\"",
                    e, self.up.name
                ),
            );
            e
        })
    }

    async fn run_lua(
        &mut self,
        rc: &Rc<ReqCtx>,
        chunk: &crate::conf::model::LuaChunk,
    ) -> Result<Option<Peer>, String> {
        use crate::http::request::{Exit, Phase};
        use crate::lua::phase::Outcome;
        let prev_phase = {
            let mut st = rc.st.borrow_mut();
            let allowed = self.lua_tries.unwrap_or_else(|| self.up.tries());
            st.balancer = Some(Box::new(BalancerCall {
                last_failure: self.last_failure,
                tries_left: self.tries_limit.map(|l| l.saturating_sub(allowed)),
                ..Default::default()
            }));
            st.phase
        };
        let out = crate::lua::phase::run(rc, chunk, Phase::Balancer).await;
        let call = {
            let mut st = rc.st.borrow_mut();
            st.phase = prev_phase;
            st.balancer.take()
        };
        match out {
            Outcome::Ok(_) | Outcome::Exit(Exit::Status(0)) => {}
            Outcome::Exit(Exit::Status(code)) if code >= 200 => {
                self.exit_status = Some(code as u16);
                return Err(format!("balancer_by_lua exited with status {}", code));
            }
            Outcome::Exit(_) => {
                self.exit_status = Some(500);
                return Err("ngx.exec is not allowed in balancer_by_lua*".to_string());
            }
            Outcome::Error(e) => {
                self.exit_status = Some(500);
                return Err(e);
            }
        }
        let Some(call) = call else { return Ok(None) };
        let allowed = self.lua_tries.unwrap_or_else(|| self.up.tries());
        self.lua_tries = Some(allowed);
        if let Some(n) = call.more_tries {
            self.more_tries = n;
            self.lua_tries = Some(allowed + n);
        }
        if let Some(t) = call.timeouts {
            self.timeouts = Some(t);
        }
        let Some((addr, host)) = call.peer else {
            return Ok(None);
        };
        // A peer that is one of the upstream's servers shares its counters and breaker.
        let slot = self
            .up
            .primary
            .iter()
            .position(|p| p.addr == addr)
            .map(|i| (false, i))
            .or_else(|| {
                self.up
                    .backup
                    .iter()
                    .position(|p| p.addr == addr)
                    .map(|i| (true, i))
            });
        let st = match slot {
            Some((b, i)) => self.group(b)[i].st.clone(),
            None => Arc::new(PeerState::new(1, None)),
        };
        st.conns.fetch_add(1, Relaxed);
        st.requests.fetch_add(1, Relaxed);
        let name: Arc<str> = Arc::from(addr.to_string().as_str());
        let peer = Peer {
            addr,
            host: host
                .map(|h| Arc::from(h.as_str()))
                .unwrap_or_else(|| name.clone()),
            name,
            slot,
        };
        self.current = Some(Held {
            addr: peer.addr,
            st,
            trial: false,
            reported: false,
        });
        Ok(Some(peer))
    }

    fn group(&self, backup: bool) -> &[PeerSlot] {
        if backup {
            &self.up.backup
        } else {
            &self.up.primary
        }
    }

    /// The balancing method alone (no Lua): usable without a request (tests, health tools).
    pub fn pick(&mut self) -> Result<Peer, String> {
        self.release();
        let now = now_ms();
        let up = self.up.clone();
        let guard = lock(&up.lock);
        let mut found = self.choose(&up, self.in_backup, now);
        if found.is_none() && !self.in_backup && !up.backup.is_empty() {
            self.in_backup = true;
            self.tried = Tried::new(up.backup.len());
            found = self.choose(&up, true, now);
        }
        let Some(i) = found else {
            // nginx: "all peers failed, mark them as live for quick recovery".
            for p in up.primary.iter().chain(up.backup.iter()) {
                p.st.fails.store(0, Relaxed);
            }
            return Err("no live upstreams".to_string());
        };
        self.tried.set(i);
        let slot = &self.group(self.in_backup)[i];
        let st = slot.st.clone();
        st.conns.fetch_add(1, Relaxed);
        st.requests.fetch_add(1, Relaxed);
        drop(guard);
        let (trial, t) = st.with_breaker(|b| b.on_pick(now)).unwrap_or((false, None));
        let peer = Peer {
            addr: slot.addr,
            name: slot.name.clone(),
            host: slot.host.clone(),
            slot: Some((self.in_backup, i)),
        };
        if let Some(t) = t {
            self.log_transition(&peer, t);
        }
        self.current = Some(Held {
            addr: peer.addr,
            st,
            trial,
            reported: false,
        });
        Ok(peer)
    }

    /// Choose in one group of `up`; None when nothing there is usable.
    fn choose(&mut self, up: &Upstream, backup: bool, now: u64) -> Option<usize> {
        let g = Group {
            peers: if backup { &up.backup } else { &up.primary },
            tried: &self.tried,
            now,
            single: !backup && up.single(),
        };
        if backup {
            return match up.conf.method {
                Balance::LeastConn => balance::least_conn(&g),
                _ => balance::round_robin(&g),
            };
        }
        let key = self.key.as_deref().unwrap_or_default();
        let hs = &mut self.hash;
        match &up.conf.method {
            Balance::RoundRobin => balance::round_robin(&g),
            Balance::LeastConn => balance::least_conn(&g),
            Balance::IpHash => balance::ip_hash(&g, &balance::ip_hash_bytes(self.client), hs),
            Balance::Hash {
                consistent: false, ..
            } => balance::hash(&g, key, hs),
            Balance::Hash {
                consistent: true, ..
            } => balance::consistent(&g, &up.ring, &up.ring_servers, key, hs),
            Balance::Random { two } => balance::random(&g, *two, &mut self.random_tries),
            Balance::Ewma { decay_ms } => balance::ewma(&g, *decay_ms),
        }
    }

    /// Passive health, circuit breaker and latency estimate for the try that used `peer`.
    pub fn report(&mut self, peer: &Peer, r: TryResult) {
        // The clock is read only when a failure or a breaker needs it (most reports: neither).
        let mut clock = None;
        let mut now = || *clock.get_or_insert_with(now_ms);
        let failed = r.failed();
        self.last_failure = match r {
            TryResult::Ok { .. } => None,
            TryResult::Fail { .. } => Some(("failed", 502)),
            TryResult::Status { status, failed, .. } => {
                Some((if failed { "failed" } else { "next" }, status))
            }
        };
        let mut trial = false;
        if let Some(h) = self.current.as_mut() {
            if h.addr == peer.addr && !h.reported {
                h.reported = true;
                trial = std::mem::take(&mut h.trial);
            }
        }
        let Some((backup, i)) = peer.slot else {
            return;
        };
        let up = &self.up;
        let slot = &self.group(backup)[i];
        let st = &slot.st;
        let mut disabled = false;
        // A success with no failures to forget changes nothing: no lock (it is shared by
        // every worker and was taken on every response). `checked` moves on picks once
        // fail_timeout has passed, so `fails` is what says whether there is anything to reset.
        if failed
            || (st.fails.load(Relaxed) != 0 && st.accessed.load(Relaxed) < st.checked.load(Relaxed))
        {
            let _g = lock(&up.lock);
            if failed {
                let fails = st.fails.fetch_add(1, Relaxed) + 1;
                let now = now();
                st.accessed.store(now, Relaxed);
                st.checked.store(now, Relaxed);
                if slot.max_fails > 0 {
                    let eff =
                        st.effective_weight.load(Relaxed) - slot.weight / slot.max_fails as i64;
                    st.effective_weight.store(eff.max(0), Relaxed);
                    disabled = fails >= slot.max_fails;
                } else if st.effective_weight.load(Relaxed) < 0 {
                    st.effective_weight.store(0, Relaxed);
                }
            } else if st.accessed.load(Relaxed) < st.checked.load(Relaxed) {
                st.fails.store(0, Relaxed);
            }
        }
        if disabled {
            self.log(
                Level::Warn,
                &format!(
                    "upstream server temporarily disabled while connecting to upstream, upstream: \"{}\", peer: {}",
                    self.up.name, peer.name
                ),
            );
        }
        let t = st
            .with_breaker(|b| b.on_result(now(), !failed, trial))
            .flatten();
        if let Some(t) = t {
            self.log_transition(peer, t);
        }
        if let Balance::Ewma { decay_ms } = self.up.conf.method {
            let mut ms = r.elapsed().as_secs_f64() * 1000.0;
            if failed {
                // A peer that fails fast must not look fast.
                ms = ms.max(1000.0);
            }
            st.ewma_observe(now(), ms, decay_ms);
        }
    }

    /// Give back the held peer: its connection count and an unanswered breaker trial.
    fn release(&mut self) {
        if let Some(h) = self.current.take() {
            h.st.conns.fetch_sub(1, Relaxed);
            if h.trial && !h.reported {
                h.st.with_breaker(|b| b.release_trial());
            }
        }
    }

    fn log(&self, level: Level, msg: &str) {
        match &self.rc {
            Some(rc) => crate::log::request_error(rc, level, msg),
            None => elog::log(level, None, msg),
        }
    }

    fn log_transition(&self, peer: &Peer, t: Transition) {
        let level = if t.to == BreakerState::Open {
            Level::Warn
        } else {
            Level::Notice
        };
        self.log(
            level,
            &format!(
                "upstream \"{}\" peer {} circuit breaker {} -> {}",
                self.up.name,
                peer.name,
                t.from.name(),
                t.to.name()
            ),
        );
    }

    /// Extra tries set by `ngx.balancer.set_more_tries`.
    pub fn more_tries(&self) -> u32 {
        self.more_tries
    }

    /// nginx's `peer.tries`: how many tries this request may make in all (the proxy also
    /// applies proxy_next_upstream_tries). With balancer_by_lua: the upstream's count (1 for
    /// the usual placeholder server) plus every `set_more_tries`.
    pub fn tries(&self) -> u32 {
        self.lua_tries.unwrap_or_else(|| self.up.tries())
    }

    /// proxy_next_upstream_tries (0: unlimited), so set_more_tries can warn
    /// "reduced tries due to limit".
    pub fn limit_tries(&mut self, n: u32) {
        self.tries_limit = (n > 0).then_some(n);
    }

    /// `ngx.balancer.set_timeouts` (connect, send, read in ms; 0 = keep the configured one).
    pub fn timeouts(&self) -> Option<(u64, u64, u64)> {
        self.timeouts
    }

    /// The status to finalize with when [`Picker::next`] failed in balancer_by_lua (500 for a
    /// Lua error, ngx.exit's status); None: nginx's 502.
    pub fn exit_status(&self) -> Option<u16> {
        self.exit_status
    }
}

impl Drop for Picker {
    fn drop(&mut self) {
        self.release();
    }
}

/// The upstream set a Lua state reads (`ngx.upstream`), installed as app data per worker.
pub struct LuaUpstreams(pub Arc<UpstreamSet>);

#[cfg(test)]
mod tests;
