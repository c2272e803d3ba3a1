//! `map $source $var { ... }` at run time (ngx_http_map_module): a map variable is computed
//! when first read, from the source evaluated then, and kept for the rest of the request
//! unless the map is `volatile`.
//!
//! Precedence as nginx: exact key (case-insensitive), then with `hostnames` the longest
//! `*.example.com` / `.example.com` key, then the longest `mail.*` key, then regexes in config
//! order (never for an empty source), then `default` (else the empty string).
//!
//! `$1`.. and named captures in a regex line's value refer to that regex's match. Named
//! captures also become variables for the rest of the request, as in nginx. Unlike nginx, a
//! map's regex does not overwrite the request's `$1`..`$9` (nginx's lazy evaluation makes that
//! depend on when a variable happens to be read first).

use bytes::Bytes;

use super::request::{ReqCtx, ReqState};
use super::variables;
use crate::conf::model::MapDef;
use crate::conf::template::{Part, Template};

/// Per-request map state.
#[derive(Debug, Default)]
/// Vectors, not hash maps: a request evaluates a handful of maps at most, and every request
/// makes one of these (empty vectors cost nothing to make).
pub struct Cache {
    values: Vec<(usize, Bytes)>,
    /// Maps being evaluated now: a map that needs itself is a cycle, not a stack overflow.
    busy: Vec<usize>,
    /// Named captures of the map regexes that matched.
    named: Vec<(String, Bytes)>,
}

/// `Some(value)` when `name` is a map variable (`Some(None)` after a cycle); `None` otherwise.
pub fn get(rc: &ReqCtx, st: &ReqState, name: &str) -> Option<Option<Vec<u8>>> {
    let http = &rc.env.cfg.http;
    if http.map_vars.is_empty() {
        return None;
    }
    if let Some(idx) = http.map_vars.get(name) {
        return Some(value(rc, st, *idx));
    }
    let c = st.map_cache.borrow();
    if c.named.is_empty() {
        return None;
    }
    c.named
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| Some(v.to_vec()))
}

fn value(rc: &ReqCtx, st: &ReqState, idx: usize) -> Option<Vec<u8>> {
    let m = rc.env.cfg.http.maps.get(idx)?;
    {
        let mut c = st.map_cache.borrow_mut();
        if !m.volatile {
            if let Some((_, v)) = c.values.iter().find(|(i, _)| *i == idx) {
                return Some(v.to_vec());
            }
        }
        if c.busy.contains(&idx) {
            drop(c);
            crate::log::request_error(
                rc,
                crate::log::Level::Error,
                &format!("cycle while evaluating variable \"{}\"", m.var),
            );
            return None;
        }
        c.busy.push(idx);
    }
    let src = variables::eval(rc, st, &m.source);
    let v = lookup(rc, st, m, &src);
    let mut c = st.map_cache.borrow_mut();
    c.busy.retain(|i| *i != idx);
    if !m.volatile {
        let b = Bytes::copy_from_slice(&v);
        match c.values.iter_mut().find(|(i, _)| *i == idx) {
            Some(slot) => slot.1 = b,
            None => c.values.push((idx, b)),
        }
    }
    Some(v)
}

/// A regex match to resolve captures against.
struct Match<'a> {
    subject: &'a [u8],
    groups: &'a [Option<(usize, usize)>],
    names: &'a [(String, usize)],
}

impl Match<'_> {
    fn group(&self, i: usize) -> Option<&[u8]> {
        self.groups
            .get(i)
            .copied()
            .flatten()
            .map(|(s, e)| &self.subject[s..e])
    }
}

fn lookup(rc: &ReqCtx, st: &ReqState, m: &MapDef, src: &[u8]) -> Vec<u8> {
    let mut key = src;
    if m.hostnames {
        if let [rest @ .., b'.'] = key {
            key = rest;
        }
    }
    let low = key.to_ascii_lowercase();
    if let Some(t) = m.exact.get(&low) {
        return eval_value(rc, st, t, None);
    }
    if m.hostnames && !low.is_empty() {
        let mut best: Option<(usize, &Template)> = None;
        for (suffix, bare, t) in &m.wild_head {
            let s = suffix.as_bytes();
            let hit = (low.len() > s.len() && low.ends_with(s)) || (*bare && low == s[1..]);
            if hit && best.is_none_or(|(l, _)| s.len() > l) {
                best = Some((s.len(), t));
            }
        }
        if best.is_none() {
            for (prefix, t) in &m.wild_tail {
                let p = prefix.as_bytes();
                if low.len() > p.len()
                    && low.starts_with(p)
                    && best.is_none_or(|(l, _)| p.len() > l)
                {
                    best = Some((p.len(), t));
                }
            }
        }
        if let Some((_, t)) = best {
            return eval_value(rc, st, t, None);
        }
    }
    if !key.is_empty() {
        for r in &m.regexes {
            let Some(groups) = r.regex.captures(key) else {
                continue;
            };
            let mt = Match {
                subject: key,
                groups: &groups,
                names: &r.names,
            };
            if !r.names.is_empty() {
                let mut c = st.map_cache.borrow_mut();
                for (name, i) in &r.names {
                    let v = mt.group(*i).unwrap_or_default();
                    let v = Bytes::copy_from_slice(v);
                    match c.named.iter_mut().find(|(n, _)| n == name) {
                        Some(slot) => slot.1 = v,
                        None => c.named.push((name.clone(), v)),
                    }
                }
            }
            return eval_value(rc, st, &r.value, Some(&mt));
        }
    }
    match &m.default {
        Some(t) => eval_value(rc, st, t, None),
        None => Vec::new(),
    }
}

/// Evaluate a map value; captures come from the map's own regex match when there is one.
fn eval_value(rc: &ReqCtx, st: &ReqState, t: &Template, mt: Option<&Match<'_>>) -> Vec<u8> {
    if let Some(l) = t.as_literal() {
        return l.to_vec();
    }
    let Some(mt) = mt else {
        return variables::eval(rc, st, t);
    };
    let mut out = Vec::new();
    for p in &t.parts {
        match p {
            Part::Lit(l) => out.extend_from_slice(l),
            Part::Capture(i) => out.extend_from_slice(mt.group(*i).unwrap_or_default()),
            Part::Var(n) => match mt.names.iter().find(|(name, _)| name == n) {
                Some((_, i)) => out.extend_from_slice(mt.group(*i).unwrap_or_default()),
                None => {
                    if let Some(v) = variables::get(rc, st, n) {
                        out.extend_from_slice(&v);
                    }
                }
            },
        }
    }
    out
}
