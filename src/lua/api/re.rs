//! `ngx.re.*` (match, find, gmatch, sub, gsub) and the `ngx.re` module's `split`, on PCRE2 so
//! that Lua code written for OpenResty keeps its Perl semantics: lookaround, backreferences,
//! named captures. Also the `Regex` type that nginx-level regexes (`location ~`, `rewrite`,
//! `if ($x ~ ...)`) compile to. This file owns pattern compilation and its per-state cache; it
//! must not know about requests.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use mlua::{Function, Lua, LuaString, MultiValue, Table, Value};
use pcre2::bytes::{CaptureLocations, Regex as Pcre, RegexBuilder};

/// Bound on the compiled-regex cache of one Lua state (OpenResty's `lua_regex_cache_max_entries`
/// defaults to 1024 too).
const CACHE_MAX: usize = 1024;

/// A compiled PCRE pattern for Rust callers (location matching, `rewrite`, `if`); shareable
/// between worker threads.
#[derive(Clone)]
pub struct Regex {
    inner: Pcre,
    names: Vec<(String, usize)>,
}

impl std::fmt::Debug for Regex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Regex").field(&self.inner.as_str()).finish()
    }
}

impl Regex {
    /// Compile `pattern` as nginx does (`~` or, with `caseless`, `~*`).
    pub fn new(pattern: &str, caseless: bool) -> Result<Regex, String> {
        let inner = RegexBuilder::new()
            .caseless(caseless)
            .jit_if_available(true)
            .build(pattern)
            .map_err(|e| compile_error_text(&e, pattern))?;
        let names = group_names(&inner);
        Ok(Regex { inner, names })
    }

    /// Byte ranges of every group of the first match (index 0 is the whole match), or `None`.
    pub fn captures(&self, subject: &[u8]) -> Option<Vec<Option<(usize, usize)>>> {
        let mut locs = self.inner.capture_locations();
        match self.inner.captures_read(&mut locs, subject) {
            Ok(Some(_)) => Some((0..locs.len()).map(|i| locs.get(i)).collect()),
            Ok(None) => None,
            Err(e) => {
                tracing::error!(
                    "pcre2_match() failed: {e} (pattern \"{}\")",
                    self.inner.as_str()
                );
                None
            }
        }
    }

    /// Whether the pattern matches anywhere in `subject`.
    pub fn is_match(&self, subject: &[u8]) -> bool {
        self.inner.is_match(subject).unwrap_or(false)
    }

    /// Named groups and their indexes.
    pub fn names(&self) -> Vec<(String, usize)> {
        self.names.clone()
    }

    /// Number of capturing groups, not counting the whole match.
    pub fn group_count(&self) -> usize {
        self.inner.captures_len().saturating_sub(1)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        self.inner.as_str()
    }
}

fn group_names(re: &Pcre) -> Vec<(String, usize)> {
    re.capture_names()
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.as_ref().map(|n| (n.clone(), i)))
        .collect()
}

/// nginx's wording for a compile failure, so logs read the same as under OpenResty.
fn compile_error_text(e: &pcre2::Error, pattern: &str) -> String {
    let full = e.to_string();
    // The crate renders "PCRE2: error compiling pattern at offset N: <message>"; keep the message.
    let msg = match e.offset() {
        Some(off) => {
            let marker = format!("offset {off}: ");
            full.find(&marker)
                .map(|i| full[i + marker.len()..].to_string())
                .unwrap_or(full)
        }
        None => full,
    };
    format!("pcre2_compile() failed: {msg} in \"{pattern}\"")
}

// ---------------------------------------------------------------------------------------------
// Options and compilation

const F_CASELESS: u8 = 1;
const F_MULTILINE: u8 = 2;
const F_DOTALL: u8 = 4;
const F_EXTENDED: u8 = 8;
const F_UTF: u8 = 16;
const F_DUPNAMES: u8 = 32;
const F_ANCHORED: u8 = 64;

/// The parsed `options` string: compile-time bits (the cache key) and match-time switches.
#[derive(Clone, Copy, Default)]
struct Opts {
    compile: u8,
    anchored: bool,
}

fn parse_opts(opts: &[u8]) -> Result<Opts, String> {
    let mut o = Opts::default();
    for &c in opts {
        match c {
            b'i' => o.compile |= F_CASELESS,
            b'm' => o.compile |= F_MULTILINE,
            b's' => o.compile |= F_DOTALL,
            b'x' => o.compile |= F_EXTENDED,
            // `U` only skips PCRE's validity check of the subject in OpenResty; we keep the check
            // (an invalid subject gives an error instead of undefined behaviour).
            b'u' | b'U' => o.compile |= F_UTF,
            b'D' => o.compile |= F_DUPNAMES,
            b'a' => {
                o.anchored = true;
                o.compile |= F_ANCHORED;
            }
            // JIT is always attempted and every pattern is cached, so `j` and `o` are implied.
            // `d` (DFA, longest match) runs as a normal match; `J` (JavaScript compat) is ignored.
            b'j' | b'o' | b'd' | b'J' => {}
            _ => {
                return Err(format!(
                    "unknown flag \"{}\" (flags \"{}\")",
                    char::from(c),
                    String::from_utf8_lossy(opts)
                ))
            }
        }
    }
    Ok(o)
}

/// A pattern compiled for Lua callers, with what building result tables needs.
struct Compiled {
    re: Pcre,
    /// Capturing groups, not counting the whole match.
    ncaps: usize,
    names: Vec<(String, usize)>,
    dupnames: bool,
    utf: bool,
}

/// Pattern bytes -> (compiled, last use).
type PatternMap = HashMap<Vec<u8>, (Rc<Compiled>, u64)>;

#[derive(Default)]
struct ReCache {
    /// Compile flags -> pattern -> (compiled, last use); split by flags so a hit needs no key
    /// allocation.
    maps: HashMap<u8, PatternMap>,
    len: usize,
    tick: u64,
}

/// The per-state cache lives in app data so `ngx.re` and the `ngx.re` module share it.
#[derive(Clone, Default)]
struct SharedCache(Rc<RefCell<ReCache>>);

fn cache_of(lua: &Lua) -> SharedCache {
    if let Some(c) = lua.app_data_ref::<SharedCache>() {
        return c.clone();
    }
    let c = SharedCache::default();
    lua.set_app_data(c.clone());
    c
}

/// Turn a Lua pattern into the `&str` PCRE2's crate wants. Outside UTF mode bytes that are not
/// UTF-8 become `\x{HH}` escapes, which match the same single byte.
fn pattern_text(pat: &[u8], utf: bool) -> Result<String, String> {
    if let Ok(s) = std::str::from_utf8(pat) {
        return Ok(s.to_string());
    }
    if utf {
        return Err(format!(
            "pcre2_compile() failed: UTF-8 error: invalid pattern in \"{}\"",
            String::from_utf8_lossy(pat)
        ));
    }
    let mut out = String::with_capacity(pat.len() + 16);
    for chunk in pat.utf8_chunks() {
        out.push_str(chunk.valid());
        for &b in chunk.invalid() {
            // A backslash right before the byte escaped it as a literal: the hex escape replaces
            // both, otherwise it would escape our own backslash.
            let trailing = out.bytes().rev().take_while(|&c| c == b'\\').count();
            if trailing % 2 == 1 {
                out.pop();
            }
            out.push_str(&format!("\\x{{{b:02x}}}"));
        }
    }
    Ok(out)
}

fn build(text: &str, f: u8) -> Result<Pcre, pcre2::Error> {
    RegexBuilder::new()
        .caseless(f & F_CASELESS != 0)
        .multi_line(f & F_MULTILINE != 0)
        .dotall(f & F_DOTALL != 0)
        .extended(f & F_EXTENDED != 0)
        .utf(f & F_UTF != 0)
        .jit_if_available(true)
        .build(text)
}

fn compile(lua: &Lua, pat: &[u8], opts: Opts) -> Result<Rc<Compiled>, String> {
    let cache = cache_of(lua);
    let f = opts.compile;
    {
        let mut c = cache.0.borrow_mut();
        c.tick += 1;
        let tick = c.tick;
        if let Some(entry) = c.maps.get_mut(&f).and_then(|m| m.get_mut(pat)) {
            entry.1 = tick;
            return Ok(entry.0.clone());
        }
    }
    let mut text = pattern_text(pat, f & F_UTF != 0)?;
    if f & F_DUPNAMES != 0 {
        // The crate has no PCRE2_DUPNAMES switch; the inline option means the same.
        text.insert_str(0, "(?J)");
    }
    let mut re =
        build(&text, f).map_err(|e| compile_error_text(&e, &String::from_utf8_lossy(pat)))?;
    if f & F_ANCHORED != 0 {
        // The crate cannot pass PCRE2_ANCHORED, so anchor with `\G` (true at the start offset).
        // The plain pattern compiled, so the wrapped one means the same whenever it compiles too;
        // when it does not (an `x`-mode comment eating our parenthesis, a leading `(*VERB)`),
        // `exec` still rejects matches that do not begin at the start offset.
        let sep = if f & F_EXTENDED != 0 { "\n" } else { "" };
        if let Ok(anchored) = build(&format!("\\G(?:{text}{sep})"), f) {
            re = anchored;
        }
    }
    let compiled = Rc::new(Compiled {
        ncaps: re.captures_len().saturating_sub(1),
        names: group_names(&re),
        dupnames: f & F_DUPNAMES != 0,
        utf: f & F_UTF != 0,
        re,
    });
    let mut c = cache.0.borrow_mut();
    if c.len >= CACHE_MAX {
        let oldest = c
            .maps
            .iter()
            .flat_map(|(fl, m)| m.iter().map(move |(k, v)| (v.1, *fl, k)))
            .min_by_key(|e| e.0)
            .map(|(_, fl, k)| (fl, k.clone()));
        if let Some((fl, k)) = oldest {
            if let Some(m) = c.maps.get_mut(&fl) {
                m.remove(&k);
            }
            c.len -= 1;
        }
    }
    let tick = c.tick;
    if c.maps
        .entry(f)
        .or_default()
        .insert(pat.to_vec(), (compiled.clone(), tick))
        .is_none()
    {
        c.len += 1;
    }
    Ok(compiled)
}

/// Run one search from `start`. `Ok(true)` leaves the groups in `locs`.
fn exec(
    c: &Compiled,
    locs: &mut CaptureLocations,
    subj: &[u8],
    start: usize,
    anchored: bool,
) -> Result<bool, String> {
    match c.re.captures_read_at(locs, subj, start) {
        // Backstop for patterns `compile` could not wrap in `\G`: the leftmost match starts at
        // `start` exactly when an anchored match exists.
        Ok(Some(m)) => Ok(!anchored || m.start() == start),
        Ok(None) => Ok(false),
        Err(e) => Err(format!("pcre2_match() failed: {e}")),
    }
}

/// Bytes to step over after an empty match at `at`, so the next search makes progress.
fn step_len(c: &Compiled, subj: &[u8], at: usize) -> usize {
    if !c.utf || at >= subj.len() {
        return 1;
    }
    let n = match subj[at] {
        b if b >= 0xF0 => 4,
        b if b >= 0xE0 => 3,
        b if b >= 0xC0 => 2,
        _ => 1,
    };
    n.min(subj.len() - at)
}

// ---------------------------------------------------------------------------------------------
// Lua-facing helpers

/// The match table: `[0]` whole match, `[1..n]` groups (`false` when unmatched), names as keys
/// (arrays of the matched values with the `D` option).
fn captures_table(
    lua: &Lua,
    c: &Compiled,
    subj: &[u8],
    locs: &CaptureLocations,
    res: Option<Table>,
) -> mlua::Result<Table> {
    let t = match res {
        Some(t) => t,
        None => lua.create_table_with_capacity(c.ncaps, c.names.len())?,
    };
    let value_of = |i: usize| -> mlua::Result<Value> {
        Ok(match locs.get(i) {
            Some((s, e)) => Value::String(lua.create_string(&subj[s..e])?),
            None => Value::Boolean(false),
        })
    };
    for i in 0..=c.ncaps {
        t.raw_set(i, value_of(i)?)?;
    }
    if c.dupnames {
        let mut arrays: Vec<(&str, Table)> = Vec::new();
        for (name, idx) in &c.names {
            let v = value_of(*idx)?;
            if matches!(v, Value::Boolean(false)) {
                continue;
            }
            let arr = match arrays.iter().find(|(n, _)| *n == name.as_str()) {
                Some((_, a)) => a.clone(),
                None => {
                    let a = lua.create_table()?;
                    arrays.push((name.as_str(), a.clone()));
                    a
                }
            };
            arr.raw_push(v)?;
        }
        for (name, arr) in arrays {
            t.raw_set(name, arr)?;
        }
    } else {
        for (name, idx) in &c.names {
            t.raw_set(name.as_str(), value_of(*idx)?)?;
        }
    }
    Ok(t)
}

/// 0-based start offset from `ctx.pos` (1-based; missing or non-positive means the beginning).
fn ctx_start(ctx: &Option<Table>) -> mlua::Result<usize> {
    let Some(ctx) = ctx else { return Ok(0) };
    let pos: Option<f64> = ctx.get("pos")?;
    Ok(match pos {
        Some(p) if p >= 1.0 => (p as usize) - 1,
        _ => 0,
    })
}

fn opts_of(opts: &Option<LuaString>) -> mlua::Result<Opts> {
    let bytes = opts
        .as_ref()
        .map(|s| s.as_bytes().to_vec())
        .unwrap_or_default();
    parse_opts(&bytes).map_err(mlua::Error::runtime)
}

fn nil_err(lua: &Lua, n_nils: usize, msg: &str) -> mlua::Result<MultiValue> {
    let mut v: Vec<Value> = vec![Value::Nil; n_nils];
    v.push(Value::String(lua.create_string(msg)?));
    Ok(MultiValue::from_iter(v))
}

fn re_match(
    lua: &Lua,
    (subj, regex, opts, ctx, res): (
        LuaString,
        LuaString,
        Option<LuaString>,
        Option<Table>,
        Option<Table>,
    ),
) -> mlua::Result<MultiValue> {
    let o = opts_of(&opts)?;
    let c = match compile(lua, &regex.as_bytes(), o) {
        Ok(c) => c,
        Err(e) => return nil_err(lua, 1, &e),
    };
    let subj = subj.as_bytes();
    let start = ctx_start(&ctx)?;
    if start > subj.len() {
        return Ok(MultiValue::from_iter([Value::Nil]));
    }
    let mut locs = c.re.capture_locations();
    match exec(&c, &mut locs, &subj, start, o.anchored) {
        Err(e) => nil_err(lua, 1, &e),
        Ok(false) => Ok(MultiValue::from_iter([Value::Nil])),
        Ok(true) => {
            let t = captures_table(lua, &c, &subj, &locs, res)?;
            if let (Some(ctx), Some((_, e))) = (&ctx, locs.get(0)) {
                ctx.set("pos", e + 1)?;
            }
            Ok(MultiValue::from_iter([Value::Table(t)]))
        }
    }
}

fn re_find(
    lua: &Lua,
    (subj, regex, opts, ctx, nth): (
        LuaString,
        LuaString,
        Option<LuaString>,
        Option<Table>,
        Option<i64>,
    ),
) -> mlua::Result<MultiValue> {
    let o = opts_of(&opts)?;
    let c = match compile(lua, &regex.as_bytes(), o) {
        Ok(c) => c,
        Err(e) => return nil_err(lua, 2, &e),
    };
    let nth = nth.unwrap_or(0).max(0) as usize;
    if nth > c.ncaps {
        return nil_err(lua, 2, "nth out of bound");
    }
    let subj = subj.as_bytes();
    let start = ctx_start(&ctx)?;
    if start > subj.len() {
        return Ok(MultiValue::from_iter([Value::Nil]));
    }
    let mut locs = c.re.capture_locations();
    match exec(&c, &mut locs, &subj, start, o.anchored) {
        Err(e) => nil_err(lua, 2, &e),
        Ok(false) => Ok(MultiValue::from_iter([Value::Nil])),
        Ok(true) => {
            if let (Some(ctx), Some((_, e))) = (&ctx, locs.get(0)) {
                ctx.set("pos", e + 1)?;
            }
            Ok(match locs.get(nth) {
                Some((s, e)) => {
                    MultiValue::from_iter([Value::Integer(s as i64 + 1), Value::Integer(e as i64)])
                }
                None => MultiValue::from_iter([Value::Nil, Value::Nil]),
            })
        }
    }
}

fn re_gmatch(
    lua: &Lua,
    (subj, regex, opts): (LuaString, LuaString, Option<LuaString>),
) -> mlua::Result<MultiValue> {
    let o = opts_of(&opts)?;
    let c = match compile(lua, &regex.as_bytes(), o) {
        Ok(c) => c,
        Err(e) => return nil_err(lua, 1, &e),
    };
    let subj = subj.as_bytes().to_vec();
    // `None` once the iterator is exhausted or failed.
    let next: Cell<Option<usize>> = Cell::new(Some(0));
    let iter = lua.create_function(move |lua, ()| {
        let Some(pos) = next.get() else {
            return Ok(MultiValue::from_iter([Value::Nil]));
        };
        if pos > subj.len() {
            next.set(None);
            return Ok(MultiValue::from_iter([Value::Nil]));
        }
        let mut locs = c.re.capture_locations();
        match exec(&c, &mut locs, &subj, pos, o.anchored) {
            Err(e) => {
                next.set(None);
                nil_err(lua, 1, &e)
            }
            Ok(false) => {
                next.set(None);
                Ok(MultiValue::from_iter([Value::Nil]))
            }
            Ok(true) => {
                let (s, e) = locs.get(0).unwrap_or((pos, pos));
                next.set(Some(if s == e {
                    e + step_len(&c, &subj, e)
                } else {
                    e
                }));
                let t = captures_table(lua, &c, &subj, &locs, None)?;
                Ok(MultiValue::from_iter([Value::Table(t)]))
            }
        }
    })?;
    Ok(MultiValue::from_iter([Value::Function(iter)]))
}

// ---------------------------------------------------------------------------------------------
// Replacement templates

#[derive(Debug, PartialEq)]
enum Piece {
    Lit(Vec<u8>),
    Group(usize),
    Named(String),
}

/// Parse a `sub`/`gsub` template: `$N`, `${N}`, `${name}` and `$$` for a literal dollar.
fn compile_template(t: &[u8]) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut lit = Vec::new();
    let mut i = 0;
    let bad = || {
        format!(
            "invalid capturing variable name found in \"{}\"",
            String::from_utf8_lossy(t)
        )
    };
    while i < t.len() {
        if t[i] != b'$' {
            lit.push(t[i]);
            i += 1;
            continue;
        }
        i += 1;
        let Some(&c) = t.get(i) else {
            return Err(bad());
        };
        if c == b'$' {
            lit.push(b'$');
            i += 1;
            continue;
        }
        let piece = if c.is_ascii_digit() {
            let end = t[i..]
                .iter()
                .position(|b| !b.is_ascii_digit())
                .map_or(t.len(), |p| i + p);
            let n = parse_index(&t[i..end]).ok_or_else(bad)?;
            i = end;
            Piece::Group(n)
        } else if c == b'{' {
            let close = t[i..]
                .iter()
                .position(|&b| b == b'}')
                .map(|p| i + p)
                .ok_or_else(|| {
                    format!(
                        "the closing bracket in \"{}\" variable is missing",
                        String::from_utf8_lossy(t)
                    )
                })?;
            let name = &t[i + 1..close];
            i = close + 1;
            if !name.is_empty() && name.iter().all(u8::is_ascii_digit) {
                Piece::Group(parse_index(name).ok_or_else(bad)?)
            } else if !name.is_empty()
                && name.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
            {
                Piece::Named(String::from_utf8_lossy(name).into_owned())
            } else {
                return Err(bad());
            }
        } else {
            return Err(bad());
        };
        if !lit.is_empty() {
            out.push(Piece::Lit(std::mem::take(&mut lit)));
        }
        out.push(piece);
    }
    if !lit.is_empty() {
        out.push(Piece::Lit(lit));
    }
    Ok(out)
}

fn parse_index(digits: &[u8]) -> Option<usize> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn expand_template(
    out: &mut Vec<u8>,
    pieces: &[Piece],
    c: &Compiled,
    subj: &[u8],
    locs: &CaptureLocations,
) {
    let group = |out: &mut Vec<u8>, n: usize| {
        if let Some((s, e)) = locs.get(n) {
            out.extend_from_slice(&subj[s..e]);
        }
    };
    for p in pieces {
        match p {
            Piece::Lit(b) => out.extend_from_slice(b),
            Piece::Group(n) => group(out, *n),
            Piece::Named(name) => {
                // With duplicate names the first group that matched wins.
                if let Some((_, idx)) = c
                    .names
                    .iter()
                    .find(|(n, idx)| n == name && locs.get(*idx).is_some())
                {
                    group(out, *idx);
                }
            }
        }
    }
}

enum Replace {
    Template(Vec<Piece>),
    Func(Function),
}

fn re_sub_impl(
    lua: &Lua,
    (subj, regex, replace, opts): (LuaString, LuaString, Value, Option<LuaString>),
    global: bool,
) -> mlua::Result<MultiValue> {
    let o = opts_of(&opts)?;
    let replace = match replace {
        Value::Function(f) => Replace::Func(f),
        other => {
            let ty = other.type_name();
            let Some(s) = lua.coerce_string(other)? else {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #3 to '{}' (string, number, or function expected, got {ty})",
                    if global { "gsub" } else { "sub" }
                )));
            };
            match compile_template(&s.as_bytes()) {
                Ok(p) => Replace::Template(p),
                Err(e) => {
                    return nil_err(
                        lua,
                        2,
                        &format!("failed to compile the replacement template: {e}"),
                    )
                }
            }
        }
    };
    let c = match compile(lua, &regex.as_bytes(), o) {
        Ok(c) => c,
        Err(e) => return nil_err(lua, 2, &e),
    };
    let subj = subj.as_bytes();
    let mut locs = c.re.capture_locations();
    let mut out: Vec<u8> = Vec::with_capacity(subj.len());
    let (mut pos, mut copied, mut count) = (0usize, 0usize, 0i64);
    while pos <= subj.len() {
        match exec(&c, &mut locs, &subj, pos, o.anchored) {
            Err(e) => return nil_err(lua, 2, &e),
            Ok(false) => break,
            Ok(true) => {}
        }
        let Some((s, e)) = locs.get(0) else { break };
        out.extend_from_slice(&subj[copied..s]);
        match &replace {
            Replace::Template(p) => expand_template(&mut out, p, &c, &subj, &locs),
            Replace::Func(f) => {
                let m = captures_table(lua, &c, &subj, &locs, None)?;
                let v: Value = f.call(m)?;
                let ty = v.type_name();
                match lua.coerce_string(v)? {
                    Some(s) => out.extend_from_slice(&s.as_bytes()),
                    None => {
                        return Err(mlua::Error::runtime(format!(
                            "attempt to use a {ty} value as the replacement (string expected)"
                        )))
                    }
                }
            }
        }
        count += 1;
        copied = e;
        pos = e;
        if s == e {
            // An empty match: copy one character and search after it, or the loop never ends.
            if e >= subj.len() {
                break;
            }
            let step = step_len(&c, &subj, e);
            out.extend_from_slice(&subj[e..e + step]);
            copied = e + step;
            pos = e + step;
        }
        if !global {
            break;
        }
    }
    out.extend_from_slice(&subj[copied.min(subj.len())..]);
    Ok(MultiValue::from_iter([
        Value::String(lua.create_string(&out)?),
        Value::Integer(count),
    ]))
}

// ---------------------------------------------------------------------------------------------
// The `ngx.re` module (lua-resty-core's): split

fn re_split(
    lua: &Lua,
    (subj, regex, opts, ctx, max, res): (
        LuaString,
        LuaString,
        Option<LuaString>,
        Option<Table>,
        Option<i64>,
        Option<Table>,
    ),
) -> mlua::Result<MultiValue> {
    let o = opts_of(&opts)?;
    let c = match compile(lua, &regex.as_bytes(), o) {
        Ok(c) => c,
        Err(e) => return nil_err(lua, 1, &e),
    };
    let subj = subj.as_bytes();
    let max = max.filter(|m| *m > 0).map(|m| m as usize);
    let start = ctx_start(&ctx)?;
    let mut parts: Vec<&[u8]> = Vec::new();
    if start <= subj.len() {
        let mut locs = c.re.capture_locations();
        let (mut last, mut pos, mut pieces) = (start, start, 0usize);
        let mut tail = true;
        loop {
            if max.is_some_and(|m| pieces + 1 >= m) || pos > subj.len() {
                break;
            }
            match exec(&c, &mut locs, &subj, pos, o.anchored) {
                Err(e) => return nil_err(lua, 1, &e),
                Ok(false) => break,
                Ok(true) => {}
            }
            let Some((s, e)) = locs.get(0) else { break };
            if s == e && s == last {
                // An empty match right after the previous cut would give an empty field.
                if s >= subj.len() {
                    break;
                }
                pos = s + step_len(&c, &subj, s);
                continue;
            }
            parts.push(&subj[last..s]);
            pieces += 1;
            if c.ncaps > 0 {
                if let Some((cs, ce)) = locs.get(1) {
                    parts.push(&subj[cs..ce]);
                }
            }
            last = e;
            pos = e;
            if e >= subj.len() && s == e {
                tail = false;
                break;
            }
        }
        // Like Perl, the empty remainder after a final separator is not a field.
        if tail && last < subj.len() {
            parts.push(&subj[last..]);
        }
    }
    let t = match res {
        Some(t) => t,
        None => lua.create_table_with_capacity(parts.len(), 0)?,
    };
    for (i, p) in parts.iter().enumerate() {
        t.raw_set(i + 1, lua.create_string(p)?)?;
    }
    t.raw_set(parts.len() + 1, Value::Nil)?;
    Ok(MultiValue::from_iter([Value::Table(t)]))
}

/// Make `require "ngx.re"` return the module with `split` (and a no-op `opt`).
pub fn preload(lua: &Lua) -> mlua::Result<()> {
    let package: Table = lua.globals().get("package")?;
    let preload: Table = package.get("preload")?;
    let loader = lua.create_function(|lua, ()| {
        let m = lua.create_table()?;
        m.set("_VERSION", "0.1.0")?;
        m.set("split", lua.create_function(re_split)?)?;
        // PCRE2's JIT stack grows on demand here, so the tuning knob has nothing to do.
        m.set(
            "opt",
            lua.create_function(|_, (_name, _value): (Value, Value)| Ok(()))?,
        )?;
        Ok(m)
    })?;
    preload.set("ngx.re", loader)
}

/// Install `ngx.re` into the `ngx` table.
pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let re = lua.create_table()?;
    re.set("match", lua.create_function(re_match)?)?;
    re.set("find", lua.create_function(re_find)?)?;
    re.set("gmatch", lua.create_function(re_gmatch)?)?;
    re.set(
        "sub",
        lua.create_function(|lua, args| re_sub_impl(lua, args, false))?,
    )?;
    re.set(
        "gsub",
        lua.create_function(|lua, args| re_sub_impl(lua, args, true))?,
    )?;
    ngx.set("re", re)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> Lua {
        let lua =
            crate::lua::vm::new_state(&crate::lua::vm::VmOptions::standalone(std::env::temp_dir()))
                .expect("lua state");
        preload(&lua).expect("preload");
        lua
    }

    fn eval<T: mlua::FromLuaMulti>(lua: &Lua, code: &str) -> T {
        lua.load(code)
            .eval()
            .unwrap_or_else(|e| panic!("{code}: {e}"))
    }

    #[test]
    fn regex_type_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Regex>();
    }

    #[test]
    fn rust_regex_captures_and_names() {
        let re = Regex::new(r"^/api/(?<ver>v\d+)/(.*)$", false).unwrap();
        let caps = re.captures(b"/api/v2/users").unwrap();
        assert_eq!(caps[0], Some((0, 13)));
        assert_eq!(caps[1], Some((5, 7)));
        assert_eq!(caps[2], Some((8, 13)));
        assert_eq!(re.names(), vec![("ver".to_string(), 1)]);
        assert!(re.captures(b"/other").is_none());
        let ci = Regex::new(r"\.(JPG|png)$", true).unwrap();
        assert!(ci.captures(b"/a.jpg").is_some());
        assert!(Regex::new("(abc", false)
            .unwrap_err()
            .contains("pcre2_compile() failed"));
    }

    #[test]
    fn match_basic_named_and_unmatched() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local m = ngx.re.match("hello, 1234", "([0-9])(?<rest>[0-9]+)")
               return m[0] .. "|" .. m[1] .. "|" .. m[2] .. "|" .. m.rest"#,
        );
        assert_eq!(r, "1234|1|234|234");
        let r: String = eval(
            &lua,
            r#"local m = ngx.re.match("hello, world", "(world)|(hello)|(?<named>howdy)")
               return tostring(m[1]) .. tostring(m[2]) .. tostring(m[3]) .. tostring(m.named)"#,
        );
        assert_eq!(r, "falsehellofalsefalse");
        let r: bool = eval(&lua, r#"return ngx.re.match("abc", "\\d") == nil"#);
        assert!(r);
    }

    #[test]
    fn match_lookaround_and_backreference() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"return ngx.re.match("price: 100USD", "\\d+(?=USD)")[0]"#,
        );
        assert_eq!(r, "100");
        let r: String = eval(&lua, r#"return ngx.re.match("xabcabcx", "(abc)\\1")[0]"#);
        assert_eq!(r, "abcabc");
        let r: String = eval(
            &lua,
            r#"return ngx.re.match("foobar bazbar", "(?<!foo)bar")[0]"#,
        );
        assert_eq!(r, "bar");
        let r: i64 = eval(
            &lua,
            r#"local from = ngx.re.find("foobar bazbar", "(?<!foo)bar") return from"#,
        );
        assert_eq!(r, 11);
    }

    #[test]
    fn match_options() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"return ngx.re.match("hello, world", "HEL LO", "ix")[0]"#,
        );
        assert_eq!(r, "hello");
        let r: String = eval(
            &lua,
            r#"local m = ngx.re.match("hello, 美好生活", "HELLO, (.{2})", "iu") return m[1]"#,
        );
        assert_eq!(r, "美好");
        let r: bool = eval(&lua, r#"return ngx.re.match("xab", "ab", "a") == nil"#);
        assert!(r);
        let r: String = eval(&lua, r#"return ngx.re.match("a\nb", "^b$", "m")[0]"#);
        assert_eq!(r, "b");
        let r: String = eval(&lua, r#"return ngx.re.match("a\nb", "a.b", "s")[0]"#);
        assert_eq!(r, "a\nb");
        let r: String = eval(&lua, r#"return ngx.re.match("abc", "b", "jod")[0]"#);
        assert_eq!(r, "b");
        let r: String = eval(
            &lua,
            r#"local m = ngx.re.match("hello, world", "(?<named>\\w+), (?<named>\\w+)", "D")
               return m.named[1] .. "+" .. m.named[2]"#,
        );
        assert_eq!(r, "hello+world");
        let r: String = eval(
            &lua,
            r#"local ok, err = pcall(ngx.re.match, "a", "a", "z") return tostring(err)"#,
        );
        assert!(r.contains(r#"unknown flag "z""#), "{r}");
    }

    #[test]
    fn match_ctx_pos_and_anchored_lexer() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local ctx = {}
               local m = ngx.re.match("1234, hello", "[0-9]+", "", ctx)
               local a = m[0] .. ":" .. ctx.pos
               ctx = { pos = 2 }
               m = ngx.re.match("1234, hello", "[0-9]+", "", ctx)
               return a .. "|" .. m[0] .. ":" .. ctx.pos"#,
        );
        // README's example says "34", a known slip: pos 2 starts at the "2".
        assert_eq!(r, "1234:5|234:5");
        let r: String = eval(
            &lua,
            r#"local ctx, out = { pos = 1 }, {}
               local s = "ab12cd"
               while true do
                 local m = ngx.re.match(s, "[a-z]+|[0-9]+", "a", ctx)
                 if not m then break end
                 out[#out + 1] = m[0]
               end
               local miss = ngx.re.match("xx12", "[0-9]+", "a")
               return table.concat(out, ",") .. tostring(miss)"#,
        );
        assert_eq!(r, "ab,12,cdnil");
        // An `x`-mode comment at the end cannot be wrapped in `\G(?:...)`; the backstop anchors.
        let r: String = eval(
            &lua,
            r#"local a = ngx.re.find("xx12", "[0-9]+ # digits", "ax")
               local ctx = { pos = 3 }
               local f, t = ngx.re.find("xx12", "[0-9]+ # digits", "ax", ctx)
               local b = ngx.re.match("ab", "(?<=a)b", "a", { pos = 2 })
               return tostring(a) .. f .. t .. b[0]"#,
        );
        assert_eq!(r, "nil34b");
        let r: String = eval(
            &lua,
            r#"local m = ngx.re.match("hello, world", "(?<w>\\w+), (?<w>\\w+)", "Da")
               local v = ngx.re.match("xab", "(*NO_JIT)ab", "a")
               return table.concat(m.w, "+") .. tostring(v)"#,
        );
        assert_eq!(r, "hello+worldnil");
    }

    #[test]
    fn bad_regex_returns_error() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local m, err = ngx.re.match("abc", "(abc") return tostring(m) .. " " .. err"#,
        );
        assert!(r.starts_with("nil pcre2_compile() failed: "), "{r}");
        assert!(r.ends_with(r#"in "(abc""#), "{r}");
        let r: String = eval(
            &lua,
            r#"local a, b, err = ngx.re.find("abc", "[") return tostring(a) .. err"#,
        );
        assert!(r.starts_with("nilpcre2_compile"), "{r}");
        let r: String = eval(
            &lua,
            r#"local s, n, err = ngx.re.gsub("abc", "(", "x") return tostring(s) .. err"#,
        );
        assert!(r.starts_with("nilpcre2_compile"), "{r}");
        let r: String = eval(
            &lua,
            r#"local it, err = ngx.re.gmatch("abc", "(") return tostring(it) .. err"#,
        );
        assert!(r.starts_with("nilpcre2_compile"), "{r}");
    }

    #[test]
    fn find_and_nth() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local f, t = ngx.re.find("hello, 1234", "([0-9]+)", "jo")
               local f2, t2 = ngx.re.find("hello, 1234", "([0-9])([0-9]+)", "jo", nil, 2)
               local f3, t3 = ngx.re.find("hello", "(x)?hel", "", nil, 1)
               return f .. "-" .. t .. " " .. f2 .. "-" .. t2 .. " " .. tostring(f3) .. tostring(t3)"#,
        );
        assert_eq!(r, "8-11 9-11 nilnil");
        let r: bool = eval(&lua, r#"return ngx.re.find("abc", "x") == nil"#);
        assert!(r);
    }

    #[test]
    fn gmatch_iterates_and_handles_empty_matches() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local out = {}
               for m in ngx.re.gmatch("hello, world!", "([a-z]+)", "i") do out[#out + 1] = m[0] .. "/" .. m[1] end
               return table.concat(out, ",")"#,
        );
        assert_eq!(r, "hello/hello,world/world");
        let r: String = eval(
            &lua,
            r#"local out = {}
               for m in ngx.re.gmatch("abc", "b*") do out[#out + 1] = "[" .. m[0] .. "]" end
               return table.concat(out)"#,
        );
        assert_eq!(r, "[][b][][]");
        let r: String = eval(
            &lua,
            r#"local out = {}
               for m in ngx.re.gmatch("美好", "", "u") do out[#out + 1] = "." end
               return table.concat(out)"#,
        );
        assert_eq!(r, "...");
    }

    #[test]
    fn sub_and_gsub_templates() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local a, n1 = ngx.re.sub("hello, 1234", "([0-9])[0-9]", "[$0][$1]")
               local b = ngx.re.sub("hello, 1234", "[0-9]", "${0}00")
               local c = ngx.re.sub("hello, 1234", "[0-9]", "$$")
               local d, n2 = ngx.re.gsub("hello, world", "([a-z])[a-z]+", "[$0,$1]", "i")
               local e = ngx.re.gsub("john smith", "(?<first>\\w+) (?<last>\\w+)", "${last} ${first}")
               return table.concat({a, n1, b, c, d, n2, e}, "|")"#,
        );
        assert_eq!(
            r,
            "hello, [12][1]34|1|hello, 100234|hello, $234|[hello,h], [world,w]|2|smith john"
        );
        let r: String = eval(
            &lua,
            r#"local s, n, err = ngx.re.sub("abc", "b", "$x") return tostring(s) .. tostring(n) .. err"#,
        );
        assert!(
            r.starts_with("nilnilfailed to compile the replacement template"),
            "{r}"
        );
        let r: String = eval(
            &lua,
            r#"local s, n, err = ngx.re.sub("abc", "b", "${1") return err"#,
        );
        assert!(r.contains("closing bracket"), "{r}");
    }

    #[test]
    fn gsub_with_function_and_empty_matches() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local s, n = ngx.re.gsub("hello, world", "([a-z])[a-z]+", function(m)
                   return "[" .. m[0] .. "," .. m[1] .. "]" end, "i")
               return s .. n"#,
        );
        assert_eq!(r, "[hello,h], [world,w]2");
        let r: String = eval(
            &lua,
            r#"local s, n = ngx.re.gsub("abc", "", "-") return s .. n"#,
        );
        assert_eq!(r, "-a-b-c-4");
        let r: String = eval(
            &lua,
            r#"local s, n = ngx.re.gsub("abc", "b*", "-") return s .. n"#,
        );
        assert_eq!(r, "-a--c-4");
        let r: String = eval(
            &lua,
            r#"local s, n = ngx.re.gsub("x", "y", "-") return s .. n"#,
        );
        assert_eq!(r, "x0");
        let r: String = eval(
            &lua,
            r#"return (ngx.re.gsub("a$b", "\\$", function() return "$1" end))"#,
        );
        assert_eq!(r, "a$1b");
    }

    #[test]
    fn binary_subjects_and_patterns() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local s = ngx.re.gsub("a\0b\255c", "\255", "X")
               local f = ngx.re.find("a\0b", "\0")
               return s:gsub("%z", "0") .. f"#,
        );
        assert_eq!(r, "a0bXc2");
        let r: String = eval(
            &lua,
            r#"local m, err = ngx.re.match("caf\233", "caf.", "u") return tostring(m) .. tostring(err ~= nil)"#,
        );
        assert_eq!(r, "niltrue");
    }

    #[test]
    fn split_module() {
        let lua = state();
        let r: String = eval(
            &lua,
            r##"local re = require "ngx.re"
               local function j(t) return table.concat(t, " ") .. "#" .. #t end
               return table.concat({
                 j(re.split("a,b,c,d", ",")),
                 j(re.split("a;,b;,c;,d,e", "(;),")),
                 j(re.split("a,b,c,d,e", "(;)|,")),
                 j(re.split("a,b,c,d,e", ",", nil, nil, 3)),
                 j(re.split("a,b,c,d,e", "(,)", nil, nil, 3)),
                 j(re.split("a,b,c,d,e", ",", nil, { pos = 5 })),
                 j(re.split(",a,b,c,d,", ",")),
                 j(re.split("12345", "", "jo")),
                 j(re.split("12345", "", "jo", nil, 3)),
                 j(re.split("12345", "", "jo", { pos = 2 })),
                 j(re.split("a,b,c,d,e", ",", nil, { pos = 10 })),
                 j(re.split(1234512345, "23")),
               }, "|")"##,
        );
        assert_eq!(
            r,
            "a b c d#4|a ; b ; c ; d,e#7|a b c d e#5|a b c,d,e#3|a , b , c,d,e#5|c d e#3| a b c d#5|\
             1 2 3 4 5#5|1 2 345#3|2 3 4 5#4|#0|1 451 45#3"
        );
        let r: String = eval(
            &lua,
            r#"local t = {"W", "X", "Y", "Z"}
               local res = require("ngx.re").split("a,b", ",", nil, nil, nil, t)
               return tostring(res == t) .. res[1] .. res[2] .. tostring(res[3]) .. res[4]"#,
        );
        assert_eq!(r, "trueabnilZ");
    }

    #[test]
    fn template_parser() {
        assert_eq!(
            compile_template(b"a$1${2}$$${n}").unwrap(),
            vec![
                Piece::Lit(b"a".to_vec()),
                Piece::Group(1),
                Piece::Group(2),
                Piece::Lit(b"$".to_vec()),
                Piece::Named("n".into())
            ]
        );
        assert!(compile_template(b"$").is_err());
        assert!(compile_template(b"${}").is_err());
    }

    #[test]
    fn cache_is_bounded() {
        let lua = state();
        let n: i64 = eval(
            &lua,
            r#"local n = 0
               for i = 1, 1100 do if ngx.re.find("x" .. i, "x" .. i) then n = n + 1 end end
               return n"#,
        );
        assert_eq!(n, 1100);
        let cache = cache_of(&lua);
        let c = cache.0.borrow();
        assert!(c.len <= CACHE_MAX);
        assert_eq!(c.len, c.maps.values().map(HashMap::len).sum::<usize>());
    }
}
