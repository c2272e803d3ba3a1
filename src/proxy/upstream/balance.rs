//! The balancing methods, each nginx's algorithm over one group of peers (primary or backup):
//! smooth weighted round robin, least_conn, ip_hash, hash (plain and ketama-consistent),
//! random [two], and our peak-EWMA. Callers hold the upstream's lock (as nginx holds the peers
//! lock), pass what this request already tried, and get an index into the group.

use std::sync::atomic::Ordering::Relaxed;

use super::PeerSlot;

/// nginx gives up on hashing after 20 collisions with unusable peers and falls back to round
/// robin.
const HASH_TRIES: u32 = 20;

/// The peers of a group one request tried already: a bit each, without an allocation for
/// groups of up to 64 peers (a picker is made for every proxied request).
#[derive(Debug, Default)]
pub struct Tried {
    bits: u64,
    many: Vec<bool>,
    len: usize,
}

impl Tried {
    pub fn new(len: usize) -> Tried {
        Tried {
            bits: 0,
            many: if len > 64 {
                vec![false; len]
            } else {
                Vec::new()
            },
            len,
        }
    }

    /// Whether peer `i` was tried (a peer past the group's end counts as tried).
    pub fn get(&self, i: usize) -> bool {
        match i < self.len {
            false => true,
            true if self.len > 64 => self.many[i],
            true => self.bits >> i & 1 == 1,
        }
    }

    pub fn set(&mut self, i: usize) {
        if i >= self.len {
            return;
        }
        match self.len > 64 {
            true => self.many[i] = true,
            false => self.bits |= 1 << i,
        }
    }
}

/// A group of peers as one pick sees it.
pub struct Group<'a> {
    pub peers: &'a [PeerSlot],
    pub tried: &'a Tried,
    pub now: u64,
    /// nginx's `peers->single`: a lone peer ignores max_fails.
    pub single: bool,
}

impl Group<'_> {
    /// Not tried yet by this request and usable now (nginx's checks, plus our health check and
    /// circuit breaker).
    pub fn usable(&self, i: usize) -> bool {
        !self.tried.get(i) && self.peers[i].usable(self.now, self.single)
    }
}

/// Per-request state of the hash methods (nginx's `hp->hash`, `rehash`, `tries`).
#[derive(Debug, Default, Clone)]
pub struct HashState {
    pub hash: u32,
    pub rehash: u32,
    pub tries: u32,
    pub started: bool,
}

/// Mark the chosen peer: nginx restarts the fail_timeout window when a failed peer gets
/// another chance.
fn chosen(g: &Group, i: usize) -> usize {
    let p = &g.peers[i];
    if g.now.saturating_sub(p.st.checked.load(Relaxed)) > p.fail_timeout_ms {
        p.st.checked.store(g.now, Relaxed);
    }
    i
}

/// nginx's smooth weighted round robin (ngx_http_upstream_get_peer), restricted to `filter`.
fn swrr_among(g: &Group, filter: impl Fn(usize) -> bool) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut total: i64 = 0;
    for (i, p) in g.peers.iter().enumerate() {
        if !filter(i) {
            continue;
        }
        let eff = p.st.effective_weight.load(Relaxed);
        let cur = p.st.current_weight.load(Relaxed) + eff;
        p.st.current_weight.store(cur, Relaxed);
        total += eff;
        if eff < p.weight {
            p.st.effective_weight.store(eff + 1, Relaxed);
        }
        if best.is_none_or(|b| cur > g.peers[b].st.current_weight.load(Relaxed)) {
            best = Some(i);
        }
    }
    let b = best?;
    g.peers[b].st.current_weight.fetch_sub(total, Relaxed);
    Some(b)
}

/// Smooth weighted round robin over the usable peers.
pub fn round_robin(g: &Group) -> Option<usize> {
    if g.single {
        return g.usable(0).then(|| chosen(g, 0));
    }
    swrr_among(g, |i| g.usable(i)).map(|i| chosen(g, i))
}

/// nginx's least_conn: fewest active connections relative to weight; ties go through smooth
/// weighted round robin among the tied peers.
pub fn least_conn(g: &Group) -> Option<usize> {
    if g.single {
        return round_robin(g);
    }
    let conns = |i: usize| g.peers[i].st.conns.load(Relaxed) as i64;
    let mut best: Option<usize> = None;
    let mut many = false;
    for i in 0..g.peers.len() {
        if !g.usable(i) {
            continue;
        }
        match best {
            None => best = Some(i),
            Some(b) => {
                let lhs = conns(i) * g.peers[b].weight;
                let rhs = conns(b) * g.peers[i].weight;
                if lhs < rhs {
                    best = Some(i);
                    many = false;
                } else if lhs == rhs {
                    many = true;
                }
            }
        }
    }
    let b = best?;
    if !many {
        return Some(chosen(g, b));
    }
    let (bc, bw) = (conns(b), g.peers[b].weight);
    swrr_among(g, |i| {
        i >= b && g.usable(i) && conns(i) * bw == bc * g.peers[i].weight
    })
    .map(|i| chosen(g, i))
}

/// Walk the weights: the peer whose cumulative weight range holds `w`.
fn by_weight(peers: &[PeerSlot], mut w: u64) -> usize {
    for (i, p) in peers.iter().enumerate() {
        let pw = p.weight as u64;
        if w < pw {
            return i;
        }
        w -= pw;
    }
    peers.len().saturating_sub(1)
}

fn total_weight(peers: &[PeerSlot]) -> u64 {
    peers.iter().map(|p| p.weight as u64).sum::<u64>().max(1)
}

/// nginx's ip_hash: the first three octets of an IPv4 address (the whole IPv6 address), hash
/// 89, `(hash * 113 + byte) % 6271` per byte; weighted; 20 misses fall back to round robin.
pub fn ip_hash(g: &Group, addr: &[u8], st: &mut HashState) -> Option<usize> {
    if st.tries > HASH_TRIES || g.single {
        return round_robin(g);
    }
    if !st.started {
        st.hash = 89;
        st.started = true;
    }
    let total = total_weight(g.peers);
    loop {
        for b in addr {
            st.hash = (st.hash * 113 + *b as u32) % 6271;
        }
        let i = by_weight(g.peers, st.hash as u64 % total);
        if g.usable(i) {
            return Some(chosen(g, i));
        }
        st.tries += 1;
        if st.tries > HASH_TRIES {
            return round_robin(g);
        }
    }
}

/// The bytes ip_hash uses.
pub fn ip_hash_bytes(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v) => v.octets()[..3].to_vec(),
        std::net::IpAddr::V6(v) => match v.to_ipv4_mapped() {
            Some(v4) => v4.octets()[..3].to_vec(),
            None => v.octets().to_vec(),
        },
    }
}

/// nginx's plain `hash $key`: Cache::Memcached compatible, `((crc32([rehash] key) >> 16) &
/// 0x7fff)` added up over rehashes.
pub fn hash(g: &Group, key: &[u8], st: &mut HashState) -> Option<usize> {
    if st.tries > HASH_TRIES || g.peers.len() < 2 || key.is_empty() {
        return round_robin(g);
    }
    let total = total_weight(g.peers);
    loop {
        let mut h = crc32fast::Hasher::new();
        if st.rehash > 0 {
            h.update(st.rehash.to_string().as_bytes());
        }
        h.update(key);
        let v = (h.finalize() >> 16) & 0x7fff;
        st.hash = st.hash.wrapping_add(v);
        st.rehash += 1;
        let i = by_weight(g.peers, st.hash as u64 % total);
        if g.usable(i) {
            return Some(chosen(g, i));
        }
        st.tries += 1;
        if st.tries > HASH_TRIES {
            return round_robin(g);
        }
    }
}

/// One point of the ketama ring: (hash, index of the server text it belongs to).
pub type Point = (u32, usize);

/// nginx's ketama ring: 160 points per unit of weight for every server (by its text as written,
/// so all addresses of one name share points), `crc32(host "\0" port prev_hash)`.
pub fn ketama_ring(peers: &[PeerSlot]) -> (Vec<Point>, Vec<std::sync::Arc<str>>) {
    let mut servers: Vec<std::sync::Arc<str>> = Vec::new();
    let mut points = Vec::new();
    for p in peers {
        if servers.iter().any(|s| **s == *p.server) {
            continue;
        }
        let idx = servers.len();
        servers.push(p.server.clone());
        let text = p.server.as_bytes();
        let (host, port) = split_port(text);
        let mut base = crc32fast::Hasher::new();
        base.update(host);
        base.update(b"\0");
        base.update(port);
        let mut prev: u32 = 0;
        for _ in 0..p.weight * 160 {
            let mut h = base.clone();
            h.update(&prev.to_le_bytes());
            let v = h.finalize();
            points.push((v, idx));
            prev = v;
        }
    }
    points.sort_by_key(|p| p.0);
    points.dedup_by_key(|p| p.0);
    (points, servers)
}

/// `host:port` split as nginx does for the ring: the port is the digits after the last colon.
fn split_port(s: &[u8]) -> (&[u8], &[u8]) {
    for j in 0..s.len() {
        let c = s[s.len() - j - 1];
        if c == b':' {
            return (&s[..s.len() - j - 1], &s[s.len() - j..]);
        }
        if !c.is_ascii_digit() {
            break;
        }
    }
    (s, b"")
}

/// `hash $key consistent`: the first ring point at or after crc32(key), then the next points
/// while that server's peers are unusable; among a server's addresses, smooth weighted round
/// robin.
pub fn consistent(
    g: &Group,
    ring: &[Point],
    servers: &[std::sync::Arc<str>],
    key: &[u8],
    st: &mut HashState,
) -> Option<usize> {
    if st.tries > HASH_TRIES || g.peers.len() < 2 || key.is_empty() || ring.is_empty() {
        return round_robin(g);
    }
    if !st.started {
        let h = crc32fast::hash(key);
        st.hash = ring.partition_point(|p| p.0 < h) as u32;
        st.started = true;
    }
    loop {
        let server = &servers[ring[st.hash as usize % ring.len()].1];
        if let Some(i) = swrr_among(g, |i| g.usable(i) && *g.peers[i].server == **server) {
            return Some(chosen(g, i));
        }
        st.hash = st.hash.wrapping_add(1);
        st.tries += 1;
        if st.tries > HASH_TRIES {
            return round_robin(g);
        }
    }
}

/// `random`: a peer at random by weight; `random two`: the less loaded (conns / weight) of two
/// such picks. 20 unusable picks fall back to round robin, as nginx.
pub fn random(g: &Group, two: bool, tries: &mut u32) -> Option<usize> {
    if g.single || *tries > HASH_TRIES {
        return round_robin(g);
    }
    let total = total_weight(g.peers);
    let usable_count = (0..g.peers.len()).filter(|i| g.usable(*i)).count();
    if usable_count == 0 {
        return None;
    }
    let mut pick = || -> Option<usize> {
        loop {
            let i = by_weight(g.peers, rand::random::<u64>() % total);
            if g.usable(i) {
                return Some(i);
            }
            *tries += 1;
            if *tries > HASH_TRIES {
                return None;
            }
        }
    };
    let Some(a) = pick() else {
        return round_robin(g);
    };
    if !two || usable_count < 2 {
        return Some(chosen(g, a));
    }
    let b = loop {
        match pick() {
            Some(b) if b != a => break b,
            Some(_) => continue,
            None => return Some(chosen(g, a)),
        }
    };
    let load =
        |i: usize| g.peers[i].st.conns.load(Relaxed) as u64 * g.peers[b + a - i].weight as u64;
    Some(chosen(g, if load(b) < load(a) { b } else { a }))
}

/// Peak EWMA (tidegate's own `ewma`): cost = latency estimate x (in-flight + 1) / weight, the
/// cheaper of two random usable peers (all of them when there are two or three). A peer with
/// no sample yet costs half the cheapest known estimate, so each new peer gets tried once.
pub fn ewma(g: &Group, decay_ms: u64) -> Option<usize> {
    let usable: Vec<usize> = (0..g.peers.len()).filter(|i| g.usable(*i)).collect();
    if usable.is_empty() {
        return None;
    }
    let est = |i: usize| g.peers[i].st.ewma_estimate(g.now, decay_ms);
    let floor = usable
        .iter()
        .filter_map(|i| est(*i))
        .fold(f64::INFINITY, f64::min);
    // Half the best known estimate: an untried peer wins the next pick, then its own samples
    // decide.
    let unknown = if floor.is_finite() { floor / 2.0 } else { 1.0 };
    let cost = |i: usize| {
        let e = est(i).unwrap_or(unknown).max(1e-3);
        e * (g.peers[i].st.conns.load(Relaxed) as f64 + 1.0) / g.peers[i].weight as f64
    };
    let candidates: Vec<usize> = if usable.len() <= 3 {
        usable
    } else {
        let a = rand::random::<u64>() as usize % usable.len();
        let mut b = rand::random::<u64>() as usize % (usable.len() - 1);
        if b >= a {
            b += 1;
        }
        vec![usable[a], usable[b]]
    };
    let best = candidates
        .into_iter()
        .min_by(|a, b| cost(*a).total_cmp(&cost(*b)))?;
    Some(chosen(g, best))
}

#[cfg(test)]
mod tests {
    use super::Tried;

    #[test]
    fn tried_marks_each_peer_in_small_and_large_groups() {
        for len in [1, 2, 63, 64, 65, 128, 300] {
            let mut t = Tried::new(len);
            assert!((0..len).all(|i| !t.get(i)), "{len}");
            assert!(t.get(len), "past the end counts as tried ({len})");
            t.set(len - 1);
            t.set(0);
            t.set(len + 5);
            assert!(t.get(0) && t.get(len - 1), "{len}");
            assert_eq!(
                (0..len).filter(|&i| t.get(i)).count(),
                if len == 1 { 1 } else { 2 }
            );
        }
    }
}
