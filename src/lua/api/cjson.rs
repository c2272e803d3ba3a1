//! The bundled `cjson` and `cjson.safe` modules, with the behaviour of the lua-cjson fork that
//! OpenResty ships: same encoding choices (sparse arrays, `\/`, `%.14g` numbers), same settings
//! functions, same error texts, plus `cjson.null` shared with `ngx.null`.
//!
//! The encoder and the decoder work directly on Lua values and never go through an intermediate
//! tree, so object keys come out in Lua's own `next` order as they do with the C module. Both are
//! iterative (an explicit stack, not Rust recursion), so a deep document cannot overflow a worker
//! thread's stack whatever `*_max_depth` says.
//!
//! Errors reach Lua as plain strings (as `luaL_error` would raise them) through a small Lua glue
//! layer: the Rust side returns `nil, err` and the glue raises with `error(err, 0)` in `cjson` or
//! passes `nil, err` through in `cjson.safe`.
//!
//! ```lua
//! local cjson = require "cjson"
//! cjson.encode({ a = { 1, 2 }, b = cjson.null })  --> {"a":[1,2],"b":null}
//! local safe = require "cjson.safe"
//! safe.decode("{")  --> nil, "Expected object key string but found T_END at character 2"
//! ```

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::rc::Rc;

use mlua::{Function, LightUserData, Lua, MultiValue, Table, Value};

/// The version lua-cjson reports in the OpenResty bundle this module mirrors.
const VERSION: &str = "2.1.0.14";

const REG_ARRAY_MT: &str = "tidegate.cjson.array_mt";
const REG_EMPTY_ARRAY_MT: &str = "tidegate.cjson.empty_array_mt";
const REG_GLUE: &str = "tidegate.cjson.glue";

/// Only its address matters: `cjson.empty_array` is a light userdata pointing here.
static EMPTY_ARRAY_TAG: u8 = 0;

/// The `cjson.null` / `ngx.null` value: a NULL light userdata, as in OpenResty.
pub fn null() -> LightUserData {
    LightUserData(std::ptr::null_mut())
}

/// The `cjson.empty_array` value, encoded as `[]`.
pub fn empty_array() -> LightUserData {
    LightUserData(&EMPTY_ARRAY_TAG as *const u8 as *mut c_void)
}

/// How `encode` treats NaN and infinities (`cjson.encode_invalid_numbers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InvalidNumbers {
    Off,
    On,
    Null,
}

/// The settings of one module instance (`cjson`, `cjson.safe` and each `cjson.new()` have their own).
#[derive(Clone, Copy, Debug)]
struct Config {
    sparse_convert: bool,
    sparse_ratio: i64,
    sparse_safe: i64,
    encode_max_depth: i64,
    decode_max_depth: i64,
    number_precision: usize,
    keep_buffer: bool,
    encode_invalid_numbers: InvalidNumbers,
    decode_invalid_numbers: bool,
    empty_table_as_object: bool,
    decode_array_with_array_mt: bool,
    escape_forward_slash: bool,
    skip_unsupported_value_types: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sparse_convert: false,
            sparse_ratio: 2,
            sparse_safe: 10,
            encode_max_depth: 1000,
            decode_max_depth: 1000,
            number_precision: 14,
            keep_buffer: true,
            encode_invalid_numbers: InvalidNumbers::Off,
            decode_invalid_numbers: true,
            empty_table_as_object: true,
            decode_array_with_array_mt: false,
            escape_forward_slash: true,
            skip_unsupported_value_types: false,
        }
    }
}

/// One module instance: its settings and the output buffer it may keep between calls.
struct Instance {
    cfg: Cell<Config>,
    buf: RefCell<Vec<u8>>,
}

/// A kept encode buffer larger than this is released rather than held by an idle worker.
const KEEP_BUFFER_MAX: usize = 1 << 20;

/// Identity of the two marker metatables, compared by address while encoding.
#[derive(Clone, Copy)]
struct Markers {
    array_mt: *const c_void,
    empty_array_mt: *const c_void,
}

/// Lua's name for a value's type, as `lua_typename` gives it in error messages.
fn lua_type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::LightUserData(_) | Value::UserData(_) | Value::Error(_) => "userdata",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        Value::Thread(_) => "thread",
        _ => "cdata",
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(i) => Some(*i as f64),
        Value::Number(n) => Some(*n),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Number formatting
// ---------------------------------------------------------------------------------------------

/// Append `x` formatted as C's `%.{prec}g` (always with `.` as the decimal point).
fn write_g(out: &mut Vec<u8>, x: f64, prec: usize) {
    let prec = prec.max(1);
    if x == 0.0 {
        out.extend_from_slice(if x.is_sign_negative() { b"-0" } else { b"0" });
        return;
    }
    // Integers that fit in the precision print as-is: the common case, and the cheapest.
    if x.fract() == 0.0 && x.abs() < 10f64.powi(prec as i32) {
        out.extend_from_slice((x as i64).to_string().as_bytes());
        return;
    }
    // Round to `prec` significant digits first: the exponent after rounding decides the style.
    let sci = format!("{:.*e}", prec - 1, x);
    let (mantissa, exp) = match sci.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (sci.as_str(), 0),
    };
    if exp < -4 || exp >= prec as i32 {
        out.extend_from_slice(strip_fraction_zeros(mantissa).as_bytes());
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let e = exp.unsigned_abs();
        if e < 10 {
            out.push(b'0');
        }
        out.extend_from_slice(e.to_string().as_bytes());
    } else {
        let decimals = (prec as i32 - 1 - exp).max(0) as usize;
        let fixed = format!("{x:.decimals$}");
        out.extend_from_slice(strip_fraction_zeros(&fixed).as_bytes());
    }
}

fn strip_fraction_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Encoder
// ---------------------------------------------------------------------------------------------

/// Where the elements of an array being written come from.
enum ArraySource {
    /// Entries collected by `next`, sorted by index; missing indexes are holes (`null`).
    Sorted(Vec<(i64, Value)>, usize),
    /// A table with `cjson.array_mt`: its elements `1..#t`, read raw.
    Table(Table),
}

/// A container whose elements are still being written.
enum Frame {
    Array {
        source: ArraySource,
        next: i64,
        len: i64,
    },
    Object {
        items: Vec<(Value, Value)>,
        pos: usize,
        first: bool,
    },
}

/// What to do next for the innermost open container.
enum Step {
    Close(u8),
    Value(Value),
    Pair(Value, Value),
}

struct Encoder<'a> {
    cfg: Config,
    markers: Markers,
    out: &'a mut Vec<u8>,
}

type EncResult = Result<(), String>;

fn cannot_serialise(v: &Value, reason: &str) -> String {
    format!("Cannot serialise {}: {reason}", lua_type_name(v))
}

fn is_unsupported(v: &Value) -> bool {
    match v {
        Value::Nil
        | Value::Boolean(_)
        | Value::Integer(_)
        | Value::Number(_)
        | Value::String(_)
        | Value::Table(_) => false,
        Value::LightUserData(p) => !(p.0.is_null() || *p == empty_array()),
        _ => true,
    }
}

impl Encoder<'_> {
    fn encode(&mut self, root: Value) -> EncResult {
        let mut stack: Vec<Frame> = Vec::new();
        self.value(root, &mut stack)?;
        loop {
            let step = match stack.last_mut() {
                None => return Ok(()),
                Some(Frame::Array { source, next, len }) => {
                    if *next > *len {
                        Step::Close(b']')
                    } else {
                        let i = *next;
                        *next += 1;
                        if i > 1 {
                            self.out.push(b',');
                        }
                        let v = match source {
                            ArraySource::Sorted(items, pos) => match items.get_mut(*pos) {
                                Some((k, v)) if *k == i => {
                                    *pos += 1;
                                    std::mem::replace(v, Value::Nil)
                                }
                                _ => Value::Nil,
                            },
                            ArraySource::Table(t) => {
                                t.raw_get::<Value>(i).map_err(|e| e.to_string())?
                            }
                        };
                        Step::Value(v)
                    }
                }
                Some(Frame::Object { items, pos, first }) => match items.get_mut(*pos) {
                    None => Step::Close(b'}'),
                    Some((k, v)) => {
                        *pos += 1;
                        let (k, v) = (
                            std::mem::replace(k, Value::Nil),
                            std::mem::replace(v, Value::Nil),
                        );
                        if self.cfg.skip_unsupported_value_types && is_unsupported(&v) {
                            continue;
                        }
                        if !*first {
                            self.out.push(b',');
                        }
                        *first = false;
                        Step::Pair(k, v)
                    }
                },
            };
            match step {
                Step::Close(c) => {
                    self.out.push(c);
                    stack.pop();
                }
                Step::Value(v) => self.value(v, &mut stack)?,
                Step::Pair(k, v) => {
                    self.key(&k)?;
                    self.value(v, &mut stack)?;
                }
            }
        }
    }

    fn key(&mut self, k: &Value) -> EncResult {
        match k {
            Value::String(s) => {
                self.string(&s.as_bytes());
                self.out.push(b':');
            }
            Value::Integer(_) | Value::Number(_) => {
                self.out.push(b'"');
                self.number(as_f64(k).unwrap_or_default())?;
                self.out.extend_from_slice(b"\":");
            }
            _ => return Err(cannot_serialise(k, "table key must be a number or string")),
        }
        Ok(())
    }

    /// Write a scalar, or open a table: push its frame so the main loop writes its elements.
    fn value(&mut self, v: Value, stack: &mut Vec<Frame>) -> EncResult {
        match &v {
            Value::Nil => self.out.extend_from_slice(b"null"),
            Value::Boolean(true) => self.out.extend_from_slice(b"true"),
            Value::Boolean(false) => self.out.extend_from_slice(b"false"),
            Value::Integer(i) => self.number(*i as f64)?,
            Value::Number(n) => self.number(*n)?,
            Value::String(s) => self.string(&s.as_bytes()),
            Value::LightUserData(p) if p.0.is_null() => self.out.extend_from_slice(b"null"),
            Value::LightUserData(p) if *p == empty_array() => self.out.extend_from_slice(b"[]"),
            Value::Table(t) => self.table(t, stack)?,
            _ => return Err(cannot_serialise(&v, "type not supported")),
        }
        Ok(())
    }

    fn table(&mut self, t: &Table, stack: &mut Vec<Frame>) -> EncResult {
        let depth = stack.len() as i64 + 1;
        if depth > self.cfg.encode_max_depth {
            return Err(format!("Cannot serialise, excessive nesting ({depth})"));
        }
        let mt = t.metatable().map(|m| m.to_pointer());
        if mt == Some(self.markers.array_mt) {
            self.out.push(b'[');
            let len = t.raw_len() as i64;
            stack.push(Frame::Array {
                source: ArraySource::Table(t.clone()),
                next: 1,
                len,
            });
            return Ok(());
        }

        let mut items: Vec<(Value, Value)> = Vec::new();
        let mut max: i64 = 0;
        let mut is_array = true;
        for pair in t.pairs::<Value, Value>() {
            let (k, v) = pair.map_err(|e| e.to_string())?;
            if is_array {
                match array_index(&k) {
                    Some(i) => max = max.max(i),
                    None => is_array = false,
                }
            }
            items.push((k, v));
        }

        if is_array && max > 0 {
            let count = items.len() as i64;
            let sparse = self.cfg.sparse_ratio > 0
                && max > count.saturating_mul(self.cfg.sparse_ratio)
                && max > self.cfg.sparse_safe;
            if sparse && !self.cfg.sparse_convert {
                return Err("Cannot serialise table: excessively sparse array".to_string());
            }
            if !sparse {
                let mut sorted: Vec<(i64, Value)> = items
                    .into_iter()
                    .filter_map(|(k, v)| array_index(&k).map(|i| (i, v)))
                    .collect();
                sorted.sort_unstable_by_key(|(i, _)| *i);
                self.out.push(b'[');
                stack.push(Frame::Array {
                    source: ArraySource::Sorted(sorted, 0),
                    next: 1,
                    len: max,
                });
                return Ok(());
            }
        }

        if items.is_empty()
            && (!self.cfg.empty_table_as_object || mt == Some(self.markers.empty_array_mt))
        {
            self.out.extend_from_slice(b"[]");
            return Ok(());
        }
        self.out.push(b'{');
        stack.push(Frame::Object {
            items,
            pos: 0,
            first: true,
        });
        Ok(())
    }

    fn number(&mut self, n: f64) -> EncResult {
        if !n.is_finite() {
            match self.cfg.encode_invalid_numbers {
                InvalidNumbers::Off => {
                    return Err("Cannot serialise number: must not be NaN or Infinity".to_string());
                }
                InvalidNumbers::Null => self.out.extend_from_slice(b"null"),
                InvalidNumbers::On if n.is_nan() => self.out.extend_from_slice(b"NaN"),
                InvalidNumbers::On if n < 0.0 => self.out.extend_from_slice(b"-Infinity"),
                InvalidNumbers::On => self.out.extend_from_slice(b"Infinity"),
            }
            return Ok(());
        }
        write_g(self.out, n, self.cfg.number_precision);
        Ok(())
    }

    fn string(&mut self, s: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let out = &mut *self.out;
        out.reserve(s.len() + 2);
        out.push(b'"');
        let mut start = 0;
        for (i, &c) in s.iter().enumerate() {
            let short: &[u8] = match c {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'/' if self.cfg.escape_forward_slash => b"\\/",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0..=0x1f | 0x7f => b"",
                _ => continue,
            };
            out.extend_from_slice(&s[start..i]);
            start = i + 1;
            if short.is_empty() {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(c >> 4)]);
                out.push(HEX[usize::from(c & 15)]);
            } else {
                out.extend_from_slice(short);
            }
        }
        out.extend_from_slice(&s[start..]);
        out.push(b'"');
    }
}

/// The array index a key stands for, if it is a positive integer cjson would treat as one.
fn array_index(k: &Value) -> Option<i64> {
    match k {
        Value::Integer(i) if *i >= 1 && *i <= i64::from(i32::MAX) => Some(*i),
        Value::Number(n) if n.fract() == 0.0 && *n >= 1.0 && *n <= f64::from(i32::MAX) => {
            Some(*n as i64)
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Tok {
    ObjBegin,
    ObjEnd,
    ArrBegin,
    ArrEnd,
    Str,
    Num(f64),
    Bool(bool),
    Null,
    Colon,
    Comma,
    End,
    Error(&'static str),
}

impl Tok {
    fn describe(&self) -> &'static str {
        match self {
            Tok::ObjBegin => "T_OBJ_BEGIN",
            Tok::ObjEnd => "T_OBJ_END",
            Tok::ArrBegin => "T_ARR_BEGIN",
            Tok::ArrEnd => "T_ARR_END",
            Tok::Str => "T_STRING",
            Tok::Num(_) => "T_NUMBER",
            Tok::Bool(_) => "T_BOOLEAN",
            Tok::Null => "T_NULL",
            Tok::Colon => "T_COLON",
            Tok::Comma => "T_COMMA",
            Tok::End => "T_END",
            Tok::Error(msg) => msg,
        }
    }
}

/// A token and the 0-based offset it starts at (reported 1-based, as cjson does).
struct Token {
    tok: Tok,
    at: usize,
}

/// A container whose members are still being read.
enum Open {
    Object(Table, Value),
    Array(Table, i64),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    cfg: Config,
    /// The decoded bytes of the last `Tok::Str`.
    text: Vec<u8>,
}

enum DecodeError {
    Json(String),
    Lua(mlua::Error),
}

impl From<mlua::Error> for DecodeError {
    fn from(e: mlua::Error) -> Self {
        DecodeError::Lua(e)
    }
}

fn expected(what: &str, t: &Token) -> DecodeError {
    DecodeError::Json(format!(
        "Expected {what} but found {} at character {}",
        t.tok.describe(),
        t.at + 1
    ))
}

fn hex4(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b.get(..4)? {
        v = v * 16 + (c as char).to_digit(16)?;
    }
    Some(v)
}

impl Parser<'_> {
    fn at(&self, i: usize) -> u8 {
        // The C module reads a NUL-terminated buffer: a NUL byte ends the text wherever it is.
        self.s.get(i).copied().unwrap_or(0)
    }

    fn starts_with(&self, word: &[u8]) -> bool {
        self.s[self.i..].starts_with(word)
    }

    fn next_token(&mut self) -> Token {
        while matches!(self.at(self.i), b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
        let at = self.i;
        let single = match self.at(at) {
            0 => Some(Tok::End),
            b'{' => Some(Tok::ObjBegin),
            b'}' => Some(Tok::ObjEnd),
            b'[' => Some(Tok::ArrBegin),
            b']' => Some(Tok::ArrEnd),
            b':' => Some(Tok::Colon),
            b',' => Some(Tok::Comma),
            _ => None,
        };
        if let Some(tok) = single {
            if !matches!(tok, Tok::End) {
                self.i += 1;
            }
            return Token { tok, at };
        }
        let c = self.at(at);
        let tok = if c == b'"' {
            return self.string_token();
        } else if c == b'-' || c.is_ascii_digit() {
            if !self.cfg.decode_invalid_numbers && self.is_invalid_number() {
                Tok::Error("invalid number")
            } else {
                self.number_token()
            }
        } else if self.starts_with(b"true") {
            self.i += 4;
            Tok::Bool(true)
        } else if self.starts_with(b"false") {
            self.i += 5;
            Tok::Bool(false)
        } else if self.starts_with(b"null") {
            self.i += 4;
            Tok::Null
        } else if self.cfg.decode_invalid_numbers && self.is_invalid_number() {
            self.number_token()
        } else {
            Tok::Error("invalid token")
        };
        Token { tok, at }
    }

    /// Whether the number starting here is outside JSON's grammar (a leading `+`, hex, leading
    /// zeros, inf, nan): such numbers are only accepted with `decode_invalid_numbers`.
    fn is_invalid_number(&self) -> bool {
        let mut p = self.i;
        match self.at(p) {
            b'+' => return true,
            b'-' => p += 1,
            _ => {}
        }
        let c = self.at(p);
        if c == b'0' {
            let c2 = self.at(p + 1);
            return c2 | 0x20 == b'x' || c2.is_ascii_digit();
        }
        if c <= b'9' {
            return false;
        }
        let rest = &self.s[p.min(self.s.len())..];
        let prefix = |w: &[u8]| rest.len() >= w.len() && rest[..w.len()].eq_ignore_ascii_case(w);
        prefix(b"inf") || prefix(b"nan")
    }

    /// Read a number the way C's `strtod` does (which is what the C module relies on).
    fn number_token(&mut self) -> Tok {
        match self.scan_number() {
            Some((n, end)) => {
                self.i = end;
                Tok::Num(n)
            }
            None => Tok::Error("invalid number"),
        }
    }

    fn scan_number(&self) -> Option<(f64, usize)> {
        let start = self.i;
        let mut p = start;
        let negative = self.at(p) == b'-';
        if matches!(self.at(p), b'+' | b'-') {
            p += 1;
        }
        let sign = if negative { -1.0 } else { 1.0 };
        let rest = &self.s[p.min(self.s.len())..];
        let prefix = |w: &[u8]| rest.len() >= w.len() && rest[..w.len()].eq_ignore_ascii_case(w);
        if self.at(p) == b'0' && self.at(p + 1) | 0x20 == b'x' && self.at(p + 2).is_ascii_hexdigit()
        {
            let mut q = p + 2;
            let mut v = 0.0f64;
            while let Some(d) = (self.at(q) as char).to_digit(16) {
                v = v * 16.0 + f64::from(d);
                q += 1;
            }
            return Some((sign * v, q));
        }
        if prefix(b"infinity") {
            return Some((sign * f64::INFINITY, p + 8));
        }
        if prefix(b"inf") {
            return Some((sign * f64::INFINITY, p + 3));
        }
        if prefix(b"nan") {
            return Some((f64::NAN, p + 3));
        }
        let mut q = p;
        let mut digits = 0;
        while self.at(q).is_ascii_digit() {
            q += 1;
            digits += 1;
        }
        if self.at(q) == b'.' {
            q += 1;
            while self.at(q).is_ascii_digit() {
                q += 1;
                digits += 1;
            }
        }
        if digits == 0 {
            return None;
        }
        if self.at(q) | 0x20 == b'e' {
            let mut e = q + 1;
            if matches!(self.at(e), b'+' | b'-') {
                e += 1;
            }
            if self.at(e).is_ascii_digit() {
                while self.at(e).is_ascii_digit() {
                    e += 1;
                }
                q = e;
            }
        }
        let text = std::str::from_utf8(&self.s[start..q]).ok()?;
        text.parse::<f64>().ok().map(|n| (n, q))
    }

    fn string_token(&mut self) -> Token {
        let at = self.i;
        self.i += 1;
        self.text.clear();
        loop {
            let c = self.at(self.i);
            match c {
                0 => {
                    return Token {
                        tok: Tok::Error("unexpected end of string"),
                        at: self.i,
                    }
                }
                b'"' => {
                    self.i += 1;
                    return Token { tok: Tok::Str, at };
                }
                b'\\' => {
                    let unescaped = match self.at(self.i + 1) {
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'/' => b'/',
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            if self.unicode_escape().is_none() {
                                return Token {
                                    tok: Tok::Error("invalid unicode escape code"),
                                    at: self.i,
                                };
                            }
                            continue;
                        }
                        _ => {
                            return Token {
                                tok: Tok::Error("invalid escape code"),
                                at: self.i,
                            }
                        }
                    };
                    self.text.push(unescaped);
                    self.i += 2;
                }
                _ => {
                    // Copy the run of plain bytes in one go.
                    let start = self.i;
                    let end = self.s[start..]
                        .iter()
                        .position(|&b| matches!(b, b'"' | b'\\' | 0))
                        .map_or(self.s.len(), |n| start + n);
                    self.text.extend_from_slice(&self.s[start..end]);
                    self.i = end;
                }
            }
        }
    }

    /// Decode `\uXXXX` (or a `\uD8xx\uDCxx` surrogate pair) at `self.i` into UTF-8.
    fn unicode_escape(&mut self) -> Option<()> {
        let rest = &self.s[self.i..];
        let first = hex4(rest.get(2..)?)?;
        let (cp, len) = match first {
            0xDC00..=0xDFFF => return None,
            0xD800..=0xDBFF => {
                if rest.get(6..8)? != b"\\u" {
                    return None;
                }
                let low = hex4(rest.get(8..)?)?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return None;
                }
                (0x10000 + ((first - 0xD800) << 10) + (low - 0xDC00), 12)
            }
            _ => (first, 6),
        };
        let ch = char::from_u32(cp)?;
        let mut tmp = [0u8; 4];
        self.text
            .extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
        self.i += len;
        Some(())
    }

    fn descend(&self, depth: usize, bracket_at: usize) -> Result<(), DecodeError> {
        if depth as i64 > self.cfg.decode_max_depth {
            return Err(DecodeError::Json(format!(
                "Found too many nested data structures ({depth}) at character {}",
                bracket_at + 1
            )));
        }
        Ok(())
    }

    /// Read an object key (a string token) and its colon.
    fn object_key(&mut self, lua: &Lua, t: Token) -> Result<Value, DecodeError> {
        if !matches!(t.tok, Tok::Str) {
            return Err(expected("object key string", &t));
        }
        let key = Value::String(lua.create_string(&self.text)?);
        let colon = self.next_token();
        if !matches!(colon.tok, Tok::Colon) {
            return Err(expected("colon", &colon));
        }
        Ok(key)
    }

    fn decode(&mut self, lua: &Lua) -> Result<Value, DecodeError> {
        let array_mt: Option<Table> = if self.cfg.decode_array_with_array_mt {
            Some(lua.named_registry_value(REG_ARRAY_MT)?)
        } else {
            None
        };
        let mut stack: Vec<Open> = Vec::new();
        let mut pending: Option<Token> = None;
        loop {
            // Read one value; a container that is not empty is pushed and its first member read next.
            let t = match pending.take() {
                Some(t) => t,
                None => self.next_token(),
            };
            let mut value = match t.tok {
                Tok::ObjBegin => {
                    self.descend(stack.len() + 1, t.at)?;
                    let table = lua.create_table()?;
                    let first = self.next_token();
                    if matches!(first.tok, Tok::ObjEnd) {
                        Value::Table(table)
                    } else {
                        let key = self.object_key(lua, first)?;
                        stack.push(Open::Object(table, key));
                        continue;
                    }
                }
                Tok::ArrBegin => {
                    self.descend(stack.len() + 1, t.at)?;
                    let table = lua.create_table()?;
                    if let Some(mt) = &array_mt {
                        table.set_metatable(Some(mt.clone()))?;
                    }
                    let first = self.next_token();
                    if matches!(first.tok, Tok::ArrEnd) {
                        Value::Table(table)
                    } else {
                        pending = Some(first);
                        stack.push(Open::Array(table, 1));
                        continue;
                    }
                }
                Tok::Str => Value::String(lua.create_string(&self.text)?),
                Tok::Num(n) => Value::Number(n),
                Tok::Bool(b) => Value::Boolean(b),
                Tok::Null => Value::LightUserData(null()),
                _ => return Err(expected("value", &t)),
            };
            // Store the finished value in its container; close every container that ends here.
            loop {
                let Some(open) = stack.last_mut() else {
                    let t = self.next_token();
                    if !matches!(t.tok, Tok::End) {
                        return Err(expected("the end", &t));
                    }
                    return Ok(value);
                };
                let t = match open {
                    Open::Object(table, key) => {
                        table.raw_set(std::mem::replace(key, Value::Nil), value)?;
                        let t = self.next_token();
                        match t.tok {
                            Tok::Comma => {
                                let k = self.next_token();
                                *key = self.object_key(lua, k)?;
                                break;
                            }
                            Tok::ObjEnd => t,
                            _ => return Err(expected("comma or object end", &t)),
                        }
                    }
                    Open::Array(table, next) => {
                        table.raw_set(*next, value)?;
                        *next += 1;
                        let t = self.next_token();
                        match t.tok {
                            Tok::Comma => break,
                            Tok::ArrEnd => t,
                            _ => return Err(expected("comma or array end", &t)),
                        }
                    }
                };
                debug_assert!(matches!(t.tok, Tok::ObjEnd | Tok::ArrEnd));
                value = match stack.pop() {
                    Some(Open::Object(table, _)) | Some(Open::Array(table, _)) => {
                        Value::Table(table)
                    }
                    None => Value::Nil,
                };
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lua bindings
// ---------------------------------------------------------------------------------------------

/// `cjson.encode(v)` before the glue: the JSON text, or `nil, err`.
fn raw_encode(
    lua: &Lua,
    inst: &Instance,
    markers: Markers,
    args: MultiValue,
) -> mlua::Result<(Value, Value)> {
    if args.len() != 1 {
        return fail(
            lua,
            "bad argument #1 to 'encode' (expected 1 argument)".to_string(),
        );
    }
    let v = args.into_iter().next().unwrap_or(Value::Nil);
    let cfg = inst.cfg.get();
    let mut kept = inst.buf.borrow_mut();
    let mut fresh = Vec::new();
    let out = if cfg.keep_buffer {
        &mut *kept
    } else {
        &mut fresh
    };
    out.clear();
    let result = Encoder {
        cfg,
        markers,
        out: &mut *out,
    }
    .encode(v);
    let ret = match result {
        Ok(()) => Ok((Value::String(lua.create_string(&*out)?), Value::Nil)),
        Err(msg) => fail(lua, msg),
    };
    if out.capacity() > KEEP_BUFFER_MAX {
        *out = Vec::new();
    }
    ret
}

fn fail(lua: &Lua, msg: String) -> mlua::Result<(Value, Value)> {
    Ok((Value::Nil, Value::String(lua.create_string(msg)?)))
}

/// `cjson.decode(s)` before the glue: `true, value` or `false, err`.
fn raw_decode(lua: &Lua, inst: &Instance, args: MultiValue) -> mlua::Result<(bool, Value)> {
    let err = |msg: String| -> mlua::Result<(bool, Value)> {
        Ok((false, Value::String(lua.create_string(msg)?)))
    };
    if args.len() != 1 {
        return err("bad argument #1 to 'decode' (expected 1 argument)".to_string());
    }
    let v = args.into_iter().next().unwrap_or(Value::Nil);
    let type_name = lua_type_name(&v);
    let Some(text) = lua.coerce_string(v)? else {
        return err(format!(
            "bad argument #1 to 'decode' (string expected, got {type_name})"
        ));
    };
    let bytes = text.as_bytes();
    if bytes.len() >= 2 && (bytes[0] == 0 || bytes[1] == 0) {
        return err("JSON parser does not support UTF-16 or UTF-32".to_string());
    }
    let mut parser = Parser {
        s: &bytes,
        i: 0,
        cfg: inst.cfg.get(),
        text: Vec::new(),
    };
    match parser.decode(lua) {
        Ok(v) => Ok((true, v)),
        Err(DecodeError::Json(msg)) => err(msg),
        Err(DecodeError::Lua(e)) => Err(e),
    }
}

/// A settings argument that is a boolean or one of `options` (lua-cjson's "enum option").
fn enum_option(
    fname: &str,
    n: usize,
    v: &Value,
    options: &[&str],
) -> Result<Option<usize>, String> {
    match v {
        Value::Nil => Ok(None),
        Value::Boolean(b) => Ok(Some(usize::from(*b))),
        Value::String(s) => {
            let s = s.to_string_lossy();
            match options.iter().position(|o| *o == s) {
                Some(i) => Ok(Some(i)),
                None => Err(format!(
                    "bad argument #{n} to '{fname}' (invalid option '{s}')"
                )),
            }
        }
        Value::Integer(_) | Value::Number(_) => {
            let mut buf = Vec::new();
            write_g(&mut buf, as_f64(v).unwrap_or_default(), 14);
            Err(format!(
                "bad argument #{n} to '{fname}' (invalid option '{}')",
                String::from_utf8_lossy(&buf)
            ))
        }
        _ => Err(format!(
            "bad argument #{n} to '{fname}' (string expected, got {})",
            lua_type_name(v)
        )),
    }
}

/// A settings argument that is an integer within `min..=max`.
fn int_option(
    lua: &Lua,
    fname: &str,
    n: usize,
    v: &Value,
    min: i64,
    max: i64,
) -> Result<Option<i64>, String> {
    if v.is_nil() {
        return Ok(None);
    }
    let num = lua.coerce_number(v.clone()).ok().flatten();
    let Some(num) = num else {
        return Err(format!(
            "bad argument #{n} to '{fname}' (number expected, got {})",
            lua_type_name(v)
        ));
    };
    let i = num.trunc() as i64;
    if i < min || i > max {
        return Err(format!(
            "bad argument #{n} to '{fname}' (expected integer between {min} and {max})"
        ));
    }
    Ok(Some(i))
}

const BOOL_OPTIONS: &[&str] = &["off", "on"];
const INT_MAX: i64 = i32::MAX as i64;

/// Apply one settings call to `cfg`; returns the current values as the Lua function returns them.
fn configure(
    lua: &Lua,
    cfg: &mut Config,
    fname: &str,
    args: &[Value],
) -> Result<Vec<Value>, String> {
    let nargs = if fname == "encode_sparse_array" { 3 } else { 1 };
    if args.len() > nargs {
        return Err(format!(
            "bad argument #{} to '{fname}' (found too many arguments)",
            nargs + 1
        ));
    }
    let arg = |i: usize| args.get(i).cloned().unwrap_or(Value::Nil);
    let set_bool = |field: &mut bool| -> Result<Vec<Value>, String> {
        if let Some(i) = enum_option(fname, 1, &arg(0), BOOL_OPTIONS)? {
            *field = i == 1;
        }
        Ok(vec![Value::Boolean(*field)])
    };
    match fname {
        "encode_sparse_array" => {
            if let Some(i) = enum_option(fname, 1, &arg(0), BOOL_OPTIONS)? {
                cfg.sparse_convert = i == 1;
            }
            if let Some(r) = int_option(lua, fname, 2, &arg(1), 0, INT_MAX)? {
                cfg.sparse_ratio = r;
            }
            if let Some(s) = int_option(lua, fname, 3, &arg(2), 0, INT_MAX)? {
                cfg.sparse_safe = s;
            }
            Ok(vec![
                Value::Boolean(cfg.sparse_convert),
                Value::Integer(cfg.sparse_ratio),
                Value::Integer(cfg.sparse_safe),
            ])
        }
        "encode_max_depth" => {
            if let Some(d) = int_option(lua, fname, 1, &arg(0), 1, INT_MAX)? {
                cfg.encode_max_depth = d;
            }
            Ok(vec![Value::Integer(cfg.encode_max_depth)])
        }
        "decode_max_depth" => {
            if let Some(d) = int_option(lua, fname, 1, &arg(0), 1, INT_MAX)? {
                cfg.decode_max_depth = d;
            }
            Ok(vec![Value::Integer(cfg.decode_max_depth)])
        }
        "encode_number_precision" => {
            if let Some(p) = int_option(lua, fname, 1, &arg(0), 1, 16)? {
                cfg.number_precision = p as usize;
            }
            Ok(vec![Value::Integer(cfg.number_precision as i64)])
        }
        "encode_invalid_numbers" => {
            if let Some(i) = enum_option(fname, 1, &arg(0), &["off", "on", "null"])? {
                cfg.encode_invalid_numbers = match i {
                    0 => InvalidNumbers::Off,
                    1 => InvalidNumbers::On,
                    _ => InvalidNumbers::Null,
                };
            }
            Ok(vec![match cfg.encode_invalid_numbers {
                InvalidNumbers::Off => Value::Boolean(false),
                InvalidNumbers::On => Value::Boolean(true),
                InvalidNumbers::Null => {
                    Value::String(lua.create_string("null").map_err(|e| e.to_string())?)
                }
            }])
        }
        "encode_keep_buffer" => set_bool(&mut cfg.keep_buffer),
        "decode_invalid_numbers" => set_bool(&mut cfg.decode_invalid_numbers),
        "encode_empty_table_as_object" => set_bool(&mut cfg.empty_table_as_object),
        "decode_array_with_array_mt" => set_bool(&mut cfg.decode_array_with_array_mt),
        "encode_escape_forward_slash" => set_bool(&mut cfg.escape_forward_slash),
        "encode_skip_unsupported_value_types" => set_bool(&mut cfg.skip_unsupported_value_types),
        _ => Err(format!("unknown cjson setting '{fname}'")),
    }
}

const SETTINGS: &[&str] = &[
    "encode_sparse_array",
    "encode_max_depth",
    "decode_max_depth",
    "encode_number_precision",
    "encode_keep_buffer",
    "encode_invalid_numbers",
    "decode_invalid_numbers",
    "encode_empty_table_as_object",
    "decode_array_with_array_mt",
    "encode_escape_forward_slash",
    "encode_skip_unsupported_value_types",
];

/// Turns the Rust primitives into the module table. Settings functions return `true, ...` or
/// `false, err`; `encode` returns the text or `nil, err`; `decode` returns `ok, value_or_err`.
const GLUE: &str = r#"
local raw, safe, name, version = ...
local error = error
local M = {
    _NAME = name,
    _VERSION = version,
    null = raw.null,
    empty_array = raw.empty_array,
    array_mt = raw.array_mt,
    empty_array_mt = raw.empty_array_mt,
    new = raw.new,
}
local encode, decode = raw.encode, raw.decode
if safe then
    M.encode = function(v)
        local s, err = encode(v)
        if s == nil then return nil, err end
        return s
    end
    M.decode = function(s)
        local ok, v = decode(s)
        if ok then return v end
        return nil, v
    end
else
    M.encode = function(...)
        local s, err = encode(...)
        if s == nil then error(err, 0) end
        return s
    end
    M.decode = function(...)
        local ok, v = decode(...)
        if not ok then error(v, 0) end
        return v
    end
end
local function check(ok, ...)
    if not ok then error((...), 0) end
    return ...
end
for k, f in pairs(raw.settings) do
    M[k] = function(...) return check(f(...)) end
end
return M
"#;

fn markers(lua: &Lua) -> mlua::Result<Markers> {
    let array_mt: Table = lua.named_registry_value(REG_ARRAY_MT)?;
    let empty_array_mt: Table = lua.named_registry_value(REG_EMPTY_ARRAY_MT)?;
    Ok(Markers {
        array_mt: array_mt.to_pointer(),
        empty_array_mt: empty_array_mt.to_pointer(),
    })
}

/// Build a fresh module instance (`require "cjson"`, `require "cjson.safe"`, `cjson.new()`).
fn new_module(lua: &Lua, safe: bool) -> mlua::Result<Table> {
    let inst = Rc::new(Instance {
        cfg: Cell::new(Config::default()),
        buf: RefCell::new(Vec::new()),
    });
    let markers = markers(lua)?;
    let raw = lua.create_table()?;

    let i = inst.clone();
    raw.set(
        "encode",
        lua.create_function(move |lua, args: MultiValue| raw_encode(lua, &i, markers, args))?,
    )?;
    let i = inst.clone();
    raw.set(
        "decode",
        lua.create_function(move |lua, args: MultiValue| raw_decode(lua, &i, args))?,
    )?;

    let settings = lua.create_table()?;
    for &fname in SETTINGS {
        let i = inst.clone();
        let f = lua.create_function(move |lua, args: MultiValue| {
            let args: Vec<Value> = args.into_iter().collect();
            let mut cfg = i.cfg.get();
            let mut ret = MultiValue::new();
            match configure(lua, &mut cfg, fname, &args) {
                Ok(values) => {
                    i.cfg.set(cfg);
                    ret.push_back(Value::Boolean(true));
                    ret.extend(values);
                }
                Err(msg) => {
                    ret.push_back(Value::Boolean(false));
                    ret.push_back(Value::String(lua.create_string(msg)?));
                }
            }
            Ok(ret)
        })?;
        settings.set(fname, f)?;
    }
    raw.set("settings", settings)?;

    raw.set("null", null())?;
    raw.set("empty_array", empty_array())?;
    raw.set("array_mt", lua.named_registry_value::<Table>(REG_ARRAY_MT)?)?;
    raw.set(
        "empty_array_mt",
        lua.named_registry_value::<Table>(REG_EMPTY_ARRAY_MT)?,
    )?;
    raw.set(
        "new",
        lua.create_function(move |lua, ()| new_module(lua, safe))?,
    )?;

    let glue: Function = lua.named_registry_value(REG_GLUE)?;
    let name = if safe { "cjson.safe" } else { "cjson" };
    glue.call((raw, safe, name, VERSION))
}

/// Set `ngx.null` and install `cjson` and `cjson.safe` into `package.preload`.
pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    ngx.set("null", null())?;
    lua.set_named_registry_value(REG_ARRAY_MT, lua.create_table()?)?;
    lua.set_named_registry_value(REG_EMPTY_ARRAY_MT, lua.create_table()?)?;
    lua.set_named_registry_value(REG_GLUE, lua.load(GLUE).set_name("=cjson").into_function()?)?;

    let package: Table = lua.globals().get("package")?;
    let preload: Table = package.get("preload")?;
    preload.set(
        "cjson",
        lua.create_function(|lua, _: MultiValue| new_module(lua, false))?,
    )?;
    preload.set(
        "cjson.safe",
        lua.create_function(|lua, _: MultiValue| new_module(lua, true))?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> Lua {
        crate::lua::vm::new_state(&crate::lua::vm::VmOptions::standalone(std::env::temp_dir()))
            .unwrap()
    }

    /// Run a chunk that returns a string; the chunk sees `cjson` and `safe` as locals.
    fn run(lua: &Lua, body: &str) -> String {
        let code =
            format!("local cjson = require 'cjson'\nlocal safe = require 'cjson.safe'\n{body}");
        match lua.load(&code).eval::<String>() {
            Ok(s) => s,
            Err(e) => panic!("lua failed: {e}\n{body}"),
        }
    }

    fn enc(lua: &Lua, expr: &str) -> String {
        run(lua, &format!("return cjson.encode({expr})"))
    }

    /// The error text `cjson.encode`/`cjson.decode` raise for a call.
    fn err(lua: &Lua, call: &str) -> String {
        run(
            lua,
            &format!("local ok, e = pcall(function() return {call} end) assert(not ok) return e"),
        )
    }

    #[test]
    fn cjson_number_formatting() {
        let lua = state();
        for (expr, want) in [
            ("1", "1"),
            ("1.5", "1.5"),
            ("0.1", "0.1"),
            ("1e20", "1e+20"),
            ("-0.0", "-0"),
            ("0", "0"),
            ("3.14159265358979", "3.1415926535898"),
            ("1/3", "0.33333333333333"),
            ("123456789012345", "1.2345678901234e+14"),
            ("12345678901234", "12345678901234"),
            ("1e-5", "1e-05"),
            ("0.0001", "0.0001"),
            ("-2.5e-7", "-2.5e-07"),
            ("2^53", "9.007199254741e+15"),
            ("1e300", "1e+300"),
            ("-42", "-42"),
        ] {
            assert_eq!(enc(&lua, expr), want, "encode({expr})");
        }
        assert_eq!(
            run(&lua, "local c = cjson.new() assert(c.encode_number_precision(16) == 16) return c.encode(1/3)"),
            "0.3333333333333333"
        );
        assert_eq!(
            run(
                &lua,
                "local c = cjson.new() c.encode_number_precision(3) return c.encode(3.14159)"
            ),
            "3.14"
        );
    }

    #[test]
    fn cjson_invalid_numbers() {
        let lua = state();
        assert_eq!(
            err(&lua, "cjson.encode(0/0)"),
            "Cannot serialise number: must not be NaN or Infinity"
        );
        assert_eq!(
            err(&lua, "cjson.encode({math.huge})"),
            "Cannot serialise number: must not be NaN or Infinity"
        );
        assert_eq!(
            run(&lua, "local c = cjson.new() assert(c.encode_invalid_numbers(true) == true) return c.encode({1/0, -1/0})"),
            "[Infinity,-Infinity]"
        );
        assert_eq!(
            run(&lua, "local c = cjson.new() assert(c.encode_invalid_numbers('null') == 'null') return c.encode({0/0})"),
            "[null]"
        );
    }

    #[test]
    fn cjson_string_escaping() {
        let lua = state();
        assert_eq!(enc(&lua, r#""a/b""#), r#""a\/b""#);
        assert_eq!(enc(&lua, r#""q\"b\\s""#), r#""q\"b\\s""#);
        assert_eq!(
            enc(&lua, r#""\n\r\t\b\f\0\1\31\127""#),
            r#""\n\r\t\b\f\u0000\u0001\u001f\u007f""#
        );
        assert_eq!(enc(&lua, r#""héllo ☃""#), "\"héllo ☃\"");
        assert_eq!(
            run(
                &lua,
                r#"return tostring(cjson.encode("\255\128") == '"\255\128"')"#
            ),
            "true"
        );
        assert_eq!(
            run(
                &lua,
                r#"local c = cjson.new() assert(c.encode_escape_forward_slash(false) == false) return c.encode("a/b")"#
            ),
            r#""a/b""#
        );
    }

    #[test]
    fn cjson_tables_and_markers() {
        let lua = state();
        assert_eq!(enc(&lua, "{1, 2, 3}"), "[1,2,3]");
        assert_eq!(enc(&lua, "{a = {b = true}}"), r#"{"a":{"b":true}}"#);
        assert_eq!(enc(&lua, "{}"), "{}");
        assert_eq!(enc(&lua, "nil"), "null");
        assert_eq!(enc(&lua, "false"), "false");
        assert_eq!(enc(&lua, "{1, nil, 3}"), "[1,null,3]");
        assert_eq!(
            enc(&lua, "{[1] = 'a', [2] = 'b', x = 1}").len(),
            r#"{"1":"a","2":"b","x":1}"#.len()
        );
        assert_eq!(enc(&lua, "{[1.5] = true}"), r#"{"1.5":true}"#);
        assert_eq!(enc(&lua, "{[0] = true}"), r#"{"0":true}"#);
        assert_eq!(enc(&lua, "cjson.null"), "null");
        assert_eq!(enc(&lua, "ngx.null"), "null");
        assert_eq!(
            run(
                &lua,
                "return tostring(cjson.null == ngx.null and safe.null == ngx.null)"
            ),
            "true"
        );
        assert_eq!(enc(&lua, "{a = cjson.null}"), r#"{"a":null}"#);
        assert_eq!(enc(&lua, "cjson.empty_array"), "[]");
        assert_eq!(enc(&lua, "{list = cjson.empty_array}"), r#"{"list":[]}"#);
        assert_eq!(enc(&lua, "setmetatable({}, cjson.array_mt)"), "[]");
        assert!(enc(&lua, "setmetatable({1, 2, nil, 4}, cjson.array_mt)").starts_with("[1,2"));
        assert_eq!(enc(&lua, "setmetatable({x = 1}, cjson.array_mt)"), "[]");
        assert_eq!(enc(&lua, "setmetatable({}, cjson.empty_array_mt)"), "[]");
        assert_eq!(enc(&lua, "setmetatable({1}, cjson.empty_array_mt)"), "[1]");
        assert_eq!(
            enc(&lua, "setmetatable({a = 1}, cjson.empty_array_mt)"),
            r#"{"a":1}"#
        );
        assert_eq!(
            run(&lua, "return tostring(cjson.array_mt == safe.array_mt)"),
            "true"
        );
        assert_eq!(
            run(&lua, "local c = cjson.new() assert(c.encode_empty_table_as_object(false) == false) return c.encode({a = {}})"),
            r#"{"a":[]}"#
        );
        assert_eq!(
            run(
                &lua,
                "local c = cjson.new() c.encode_empty_table_as_object('off') return c.encode({})"
            ),
            "[]"
        );
        // Settings are per instance: the module itself is untouched by the instances above.
        assert_eq!(enc(&lua, "{}"), "{}");
    }

    #[test]
    fn cjson_sparse_arrays() {
        let lua = state();
        assert_eq!(enc(&lua, "{[1] = 1, [3] = 3}"), "[1,null,3]");
        assert_eq!(
            enc(&lua, "{[10] = 1}"),
            "[null,null,null,null,null,null,null,null,null,1]"
        );
        assert_eq!(
            err(&lua, "cjson.encode({[11] = 1})"),
            "Cannot serialise table: excessively sparse array"
        );
        assert_eq!(
            err(&lua, "cjson.encode({[1000] = 1, [1] = 2})"),
            "Cannot serialise table: excessively sparse array"
        );
        assert_eq!(
            run(&lua, "local c = cjson.new() local a, b, d = c.encode_sparse_array(true) assert(a == true and b == 2 and d == 10) return c.encode({[1000] = 1})"),
            r#"{"1000":1}"#
        );
        assert_eq!(
            run(
                &lua,
                "local c = cjson.new() c.encode_sparse_array(false, 0) return c.encode({[20] = 1})"
            ),
            format!("[{}1]", "null,".repeat(19))
        );
        assert_eq!(run(&lua, "local a, b, c = cjson.encode_sparse_array() return tostring(a) .. ',' .. b .. ',' .. c"), "false,2,10");
    }

    #[test]
    fn cjson_encode_errors() {
        let lua = state();
        assert_eq!(
            err(&lua, "cjson.encode(print)"),
            "Cannot serialise function: type not supported"
        );
        assert_eq!(
            err(&lua, "cjson.encode({f = print})"),
            "Cannot serialise function: type not supported"
        );
        assert_eq!(
            err(&lua, "cjson.encode(coroutine.create(print))"),
            "Cannot serialise thread: type not supported"
        );
        assert_eq!(
            err(&lua, "cjson.encode({[true] = 1})"),
            "Cannot serialise boolean: table key must be a number or string"
        );
        assert_eq!(
            err(&lua, "cjson.encode()"),
            "bad argument #1 to 'encode' (expected 1 argument)"
        );
        assert_eq!(
            err(&lua, "cjson.encode(1, 2)"),
            "bad argument #1 to 'encode' (expected 1 argument)"
        );
        assert_eq!(
            err(
                &lua,
                "(function() local t = {} t.t = t return cjson.encode(t) end)()"
            ),
            "Cannot serialise, excessive nesting (1001)"
        );
        assert_eq!(
            run(&lua, "local c = cjson.new() assert(c.encode_max_depth(2) == 2) local ok, e = pcall(c.encode, {{{}}}) return e"),
            "Cannot serialise, excessive nesting (3)"
        );
        assert_eq!(
            run(&lua, "local c = cjson.new() c.encode_skip_unsupported_value_types(true) return c.encode({a = print, b = 1})"),
            r#"{"b":1}"#
        );
        assert_eq!(
            err(&lua, "cjson.encode_max_depth(0)"),
            "bad argument #1 to 'encode_max_depth' (expected integer between 1 and 2147483647)"
        );
        assert_eq!(
            err(&lua, "cjson.encode_number_precision(17)"),
            "bad argument #1 to 'encode_number_precision' (expected integer between 1 and 16)"
        );
        assert_eq!(
            err(&lua, "cjson.encode_keep_buffer('maybe')"),
            "bad argument #1 to 'encode_keep_buffer' (invalid option 'maybe')"
        );
        // A deep but allowed document does not need a deep Rust stack.
        assert_eq!(
            run(&lua, "local c = cjson.new() c.encode_max_depth(100000) local t = {} local cur = t for i = 1, 50000 do cur[1] = {} cur = cur[1] end return #c.encode(t) .. ''"),
            (50001 * 2).to_string()
        );
    }

    #[test]
    fn cjson_decode_values() {
        let lua = state();
        let check =
            |code: &str| assert_eq!(run(&lua, &format!("{code}\nreturn 'ok'")), "ok", "{code}");
        check(
            r#"local t = cjson.decode([[{"a":[1,2,{"b":null}],"c":"x\/y","d":true,"e":false}]])
                 assert(t.a[1] == 1 and t.a[2] == 2 and t.a[3].b == cjson.null and t.a[3].b == ngx.null)
                 assert(t.c == "x/y" and t.d == true and t.e == false)
                 assert(getmetatable(t.a) == nil)"#,
        );
        check(
            r#"assert(cjson.decode([["\u00e9\ud83d\ude00\n\t\"\\"]]) == "\195\169\240\159\152\128\n\t\"\\")"#,
        );
        check(r#"assert(cjson.decode(' 12.5e1 ') == 125)"#);
        check(r#"assert(cjson.decode('-0.25') == -0.25)"#);
        check(r#"assert(cjson.decode('12345678901234567890') == 1.2345678901234567e19)"#);
        check(r#"assert(cjson.decode('9007199254740993') == 9007199254740992)"#);
        check(r#"assert(cjson.decode('null') == cjson.null)"#);
        check(r#"assert(cjson.decode(123) == 123)"#);
        check(r#"assert(cjson.decode('0x10') == 16)"#);
        check(r#"local n = cjson.decode('NaN') assert(n ~= n)"#);
        check(r#"assert(cjson.decode('-Infinity') == -math.huge)"#);
        check(r#"assert(cjson.decode([["\u0000"]]) == "\0")"#);
        check(r#"local t = cjson.decode('{"a":1,"a":2}') assert(t.a == 2)"#);
        check(r#"local t = cjson.decode('[]') assert(next(t) == nil and getmetatable(t) == nil)"#);
        check(
            r#"local c = cjson.new() assert(c.decode_array_with_array_mt(true) == true)
                 local t = c.decode('{"a":[],"b":[1,2],"o":{}}')
                 assert(getmetatable(t.a) == cjson.array_mt and getmetatable(t.b) == cjson.array_mt)
                 assert(getmetatable(t) == nil and getmetatable(t.o) == nil)
                 assert(c.encode(t.a) == "[]")"#,
        );
        check(
            r#"local s = '{"k":[1,"two",{"three":3.5}],"z":null}'
                 local t = cjson.decode(cjson.encode(cjson.decode(s)))
                 assert(t.k[1] == 1 and t.k[2] == "two" and t.k[3].three == 3.5 and t.z == cjson.null)"#,
        );
    }

    #[test]
    fn cjson_decode_errors() {
        let lua = state();
        for (json, want) in [
            (
                "abc",
                "Expected value but found invalid token at character 1",
            ),
            ("", "Expected value but found T_END at character 1"),
            ("[", "Expected value but found T_END at character 2"),
            (
                "{1:2}",
                "Expected object key string but found T_NUMBER at character 2",
            ),
            (
                r#"{"a" 1}"#,
                "Expected colon but found T_NUMBER at character 6",
            ),
            (
                r#"{"a":1 "b":2}"#,
                "Expected comma or object end but found T_STRING at character 8",
            ),
            (
                "[1 2]",
                "Expected comma or array end but found T_NUMBER at character 4",
            ),
            ("[1,]", "Expected value but found T_ARR_END at character 4"),
            (
                r#"{"a":1,}"#,
                "Expected object key string but found T_OBJ_END at character 8",
            ),
            (
                "[1] x",
                "Expected the end but found invalid token at character 5",
            ),
            (
                "truex",
                "Expected the end but found invalid token at character 5",
            ),
            (
                r#""abc"#,
                "Expected value but found unexpected end of string at character 5",
            ),
            (
                r#""\q""#,
                "Expected value but found invalid escape code at character 2",
            ),
            (
                r#""\ud800""#,
                "Expected value but found invalid unicode escape code at character 2",
            ),
            (
                "-",
                "Expected value but found invalid number at character 1",
            ),
        ] {
            let code =
                format!("local ok, e = pcall(cjson.decode, {json:?}) assert(not ok) return e");
            assert_eq!(run(&lua, &code), want, "decode({json})");
        }
        assert_eq!(
            err(&lua, "cjson.decode()"),
            "bad argument #1 to 'decode' (expected 1 argument)"
        );
        assert_eq!(
            err(&lua, "cjson.decode({})"),
            "bad argument #1 to 'decode' (string expected, got table)"
        );
        assert_eq!(
            run(&lua, "local c = cjson.new() c.decode_max_depth(2) local ok, e = pcall(c.decode, '[[[1]]]') return e"),
            "Found too many nested data structures (3) at character 3"
        );
        assert_eq!(
            err(
                &lua,
                "cjson.decode(string.rep('[', 1001) .. string.rep(']', 1001))"
            ),
            "Found too many nested data structures (1001) at character 1001"
        );
        assert_eq!(
            run(&lua, "local c = cjson.new() assert(c.decode_invalid_numbers(false) == false) local ok, e = pcall(c.decode, '0x10') return e"),
            "Expected value but found invalid number at character 1"
        );
        assert_eq!(
            run(&lua, "local c = cjson.new() c.decode_invalid_numbers(false) local ok, e = pcall(c.decode, 'NaN') return e"),
            "Expected value but found invalid token at character 1"
        );
    }

    #[test]
    fn cjson_safe_and_instances() {
        let lua = state();
        assert_eq!(
            run(
                &lua,
                "local v, e = safe.decode('{') assert(v == nil) return e"
            ),
            "Expected object key string but found T_END at character 2"
        );
        assert_eq!(
            run(
                &lua,
                "local v, e = safe.encode(print) assert(v == nil) return e"
            ),
            "Cannot serialise function: type not supported"
        );
        assert_eq!(run(&lua, "return safe.encode({1})"), "[1]");
        assert_eq!(run(&lua, "return safe.decode('[1]')[1] .. ''"), "1");
        assert_eq!(
            run(&lua, "local v, e = safe.new().decode('x') return e"),
            "Expected value but found invalid token at character 1"
        );
        assert_eq!(
            run(
                &lua,
                "return cjson._NAME .. ' ' .. safe._NAME .. ' ' .. cjson._VERSION"
            ),
            "cjson cjson.safe 2.1.0.14"
        );
        assert_eq!(run(&lua, "return tostring(require('cjson') == cjson and cjson ~= safe and cjson.new() ~= cjson)"), "true");
        // Settings of one instance do not leak into another.
        assert_eq!(run(&lua, "local a = cjson.new() a.encode_escape_forward_slash(false) return a.encode('/') .. cjson.encode('/') .. safe.encode('/')"), r#""/""\/""\/""#);
    }
}
