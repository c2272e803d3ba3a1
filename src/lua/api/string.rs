//! `ngx.*` string utilities: base64, digests (md5, sha1, hmac_sha1, crc32), URI escaping,
//! query-args encoding and decoding, and MySQL string quoting. Pure byte functions: nothing here
//! touches requests or shared state.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use mlua::{Lua, LuaString, MultiValue, Table, Value};
use sha1::Sha1;

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// OpenResty's string helpers read `nil` as the empty string and stringify scalars.
fn arg_bytes(lua: &Lua, v: Value, func: &str) -> mlua::Result<Vec<u8>> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Boolean(b) => Ok(if b {
            b"true".to_vec()
        } else {
            b"false".to_vec()
        }),
        other => {
            let ty = other.type_name();
            match lua.coerce_string(other)? {
                Some(s) => Ok(s.as_bytes().to_vec()),
                None => Err(mlua::Error::runtime(format!(
                    "bad argument #1 to '{func}' (string expected, got {ty})"
                ))),
            }
        }
    }
}

/// Strict variant for the decoders, which reject anything but strings and numbers.
fn str_arg(lua: &Lua, v: Value, func: &str) -> mlua::Result<Vec<u8>> {
    let ty = v.type_name();
    match lua.coerce_string(v)? {
        Some(s) => Ok(s.as_bytes().to_vec()),
        None => Err(mlua::Error::runtime(format!(
            "bad argument #1 to '{func}' (string expected, got {ty})"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// base64

fn b64_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// nginx's decoder: data ends at the first `=`, every byte before must be in the alphabet, and a
/// lone sextet at the end is invalid; unused trailing bits are not checked.
fn decode_base64(src: &[u8]) -> Option<Vec<u8>> {
    let data = match src.iter().position(|&c| c == b'=') {
        Some(p) => &src[..p],
        None => src,
    };
    if data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in data {
        acc = (acc << 6) | u32::from(b64_value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// MIME flavour: bytes outside the alphabet (line breaks, spaces) are skipped.
fn decode_base64mime(src: &[u8]) -> Option<Vec<u8>> {
    let data: Vec<u8> = src
        .iter()
        .copied()
        .take_while(|&c| c != b'=')
        .filter(|&c| b64_value(c).is_some())
        .collect();
    decode_base64(&data)
}

// ---------------------------------------------------------------------------------------------
// URI escaping

/// Whether `ngx.escape_uri` with `kind` escapes byte `c` (kind 0: a full URI, 2: a component).
fn must_escape(kind: u8, c: u8) -> bool {
    match kind {
        0 => matches!(c, b' ' | b'#' | b'%' | b'?' | 0x00..=0x1f | 0x7f..=0xff),
        _ => !(c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')),
    }
}

fn escape_uri(src: &[u8], kind: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() + src.len() / 2);
    for &c in src {
        if must_escape(kind, c) {
            out.extend_from_slice(&[
                b'%',
                HEX_UPPER[usize::from(c >> 4)],
                HEX_UPPER[usize::from(c & 15)],
            ]);
        } else {
            out.push(c);
        }
    }
    out
}

fn hex_value(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// `%XX` becomes the byte and `+` a space; a `%` not followed by two hex digits stays as written.
fn unescape_uri(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        match src[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                match (
                    src.get(i + 1).and_then(|&c| hex_value(c)),
                    src.get(i + 2).and_then(|&c| hex_value(c)),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h << 4) | l);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Query args

fn push_arg(out: &mut Vec<u8>, key: &[u8], value: Option<&[u8]>) {
    if !out.is_empty() {
        out.push(b'&');
    }
    out.extend_from_slice(&escape_uri(key, 2));
    if let Some(v) = value {
        out.push(b'=');
        out.extend_from_slice(&escape_uri(v, 2));
    }
}

/// Append one `key=value` (or bare `key` for `true`); `false` adds nothing.
fn encode_scalar(lua: &Lua, out: &mut Vec<u8>, key: &[u8], v: Value) -> mlua::Result<()> {
    match v {
        Value::Boolean(true) => push_arg(out, key, None),
        Value::Boolean(false) | Value::Nil => {}
        other => {
            let ty = other.type_name();
            match lua.coerce_string(other)? {
                Some(s) => push_arg(out, key, Some(&s.as_bytes())),
                None => {
                    return Err(mlua::Error::runtime(format!(
                        "attempt to use {ty} as query arg value"
                    )))
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn encode_args(lua: &Lua, args: Table) -> mlua::Result<LuaString> {
    let mut out = Vec::new();
    for pair in args.pairs::<Value, Value>() {
        let (k, v) = pair?;
        let kty = k.type_name();
        let key = match k {
            Value::String(_) | Value::Integer(_) | Value::Number(_) => lua.coerce_string(k)?,
            _ => None,
        };
        let Some(key) = key else {
            return Err(mlua::Error::runtime(format!(
                "attempt to use a {kty} key in query args"
            )));
        };
        let key = key.as_bytes().to_vec();
        match v {
            Value::Table(list) => {
                for i in 1..=list.raw_len() {
                    encode_scalar(lua, &mut out, &key, list.raw_get(i)?)?;
                }
            }
            other => encode_scalar(lua, &mut out, &key, other)?,
        }
    }
    lua.create_string(&out)
}

/// Parse a query string into a table; returns it and whether `max_args` cut it short.
pub(crate) fn decode_args(lua: &Lua, src: &[u8], max_args: usize) -> mlua::Result<(Table, bool)> {
    let t = lua.create_table()?;
    let mut n = 0usize;
    for part in src.split(|&c| c == b'&') {
        if part.is_empty() {
            continue;
        }
        if max_args > 0 && n >= max_args {
            return Ok((t, true));
        }
        n += 1;
        let (key, value) = match part.iter().position(|&c| c == b'=') {
            Some(eq) => (
                unescape_uri(&part[..eq]),
                Value::String(lua.create_string(unescape_uri(&part[eq + 1..]))?),
            ),
            None => (unescape_uri(part), Value::Boolean(true)),
        };
        if key.is_empty() {
            continue;
        }
        let key = lua.create_string(&key)?;
        match t.raw_get::<Value>(&key)? {
            Value::Nil => t.raw_set(key, value)?,
            Value::Table(list) => list.raw_push(value)?,
            first => t.raw_set(key, lua.create_sequence_from([first, value])?)?,
        }
    }
    Ok((t, false))
}

// ---------------------------------------------------------------------------------------------
// SQL quoting

fn quote_sql_str(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() + 2);
    out.push(b'\'');
    for &c in src {
        let esc: Option<u8> = match c {
            0 => Some(b'0'),
            b'\x08' => Some(b'b'),
            b'\n' => Some(b'n'),
            b'\r' => Some(b'r'),
            b'\t' => Some(b't'),
            0x1a => Some(b'Z'),
            b'\\' | b'\'' | b'"' => Some(c),
            _ => None,
        };
        match esc {
            Some(e) => out.extend_from_slice(&[b'\\', e]),
            None => out.push(c),
        }
    }
    out.push(b'\'');
    out
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Install the string helpers into the `ngx` table.
pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    ngx.set(
        "encode_base64",
        lua.create_function(|lua, (s, no_padding): (Value, Option<bool>)| {
            let s = arg_bytes(lua, s, "encode_base64")?;
            let text = if no_padding.unwrap_or(false) {
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(s)
            } else {
                base64::engine::general_purpose::STANDARD.encode(s)
            };
            lua.create_string(text)
        })?,
    )?;
    ngx.set(
        "decode_base64",
        lua.create_function(|lua, s: Value| {
            let s = str_arg(lua, s, "decode_base64")?;
            decode_base64(&s).map(|d| lua.create_string(d)).transpose()
        })?,
    )?;
    ngx.set(
        "decode_base64mime",
        lua.create_function(|lua, s: Value| {
            let s = str_arg(lua, s, "decode_base64mime")?;
            decode_base64mime(&s)
                .map(|d| lua.create_string(d))
                .transpose()
        })?,
    )?;
    ngx.set(
        "md5",
        lua.create_function(|lua, s: Value| {
            Ok(hex_lower(&Md5::digest(arg_bytes(lua, s, "md5")?)))
        })?,
    )?;
    ngx.set(
        "md5_bin",
        lua.create_function(|lua, s: Value| {
            lua.create_string(Md5::digest(arg_bytes(lua, s, "md5_bin")?))
        })?,
    )?;
    ngx.set(
        "sha1_bin",
        lua.create_function(|lua, s: Value| {
            lua.create_string(Sha1::digest(arg_bytes(lua, s, "sha1_bin")?))
        })?,
    )?;
    ngx.set(
        "crc32_short",
        lua.create_function(|lua, s: Value| {
            Ok(crc32fast::hash(&arg_bytes(lua, s, "crc32_short")?))
        })?,
    )?;
    ngx.set(
        "crc32_long",
        lua.create_function(|lua, s: Value| {
            Ok(crc32fast::hash(&arg_bytes(lua, s, "crc32_long")?))
        })?,
    )?;
    ngx.set(
        "hmac_sha1",
        lua.create_function(|lua, (key, s): (Value, Value)| {
            let key = arg_bytes(lua, key, "hmac_sha1")?;
            let s = arg_bytes(lua, s, "hmac_sha1")?;
            let mut mac = Hmac::<Sha1>::new_from_slice(&key)
                .map_err(|e| mlua::Error::runtime(format!("hmac_sha1: {e}")))?;
            mac.update(&s);
            lua.create_string(mac.finalize().into_bytes())
        })?,
    )?;
    ngx.set(
        "escape_uri",
        lua.create_function(|lua, (s, kind): (Value, Option<i64>)| {
            let s = arg_bytes(lua, s, "escape_uri")?;
            let kind = match kind.unwrap_or(2) {
                0 => 0,
                2 => 2,
                other => {
                    return Err(mlua::Error::runtime(format!(
                    "bad argument #2 to 'escape_uri' (unsupported type {other}, expected 0 or 2)"
                )))
                }
            };
            lua.create_string(escape_uri(&s, kind))
        })?,
    )?;
    ngx.set(
        "unescape_uri",
        lua.create_function(|lua, s: Value| {
            lua.create_string(unescape_uri(&arg_bytes(lua, s, "unescape_uri")?))
        })?,
    )?;
    ngx.set(
        "encode_args",
        lua.create_function(|lua, args: Value| match args {
            Value::Table(t) => encode_args(lua, t),
            other => Err(mlua::Error::runtime(format!(
                "bad argument #1 to 'encode_args' (table expected, got {})",
                other.type_name()
            ))),
        })?,
    )?;
    ngx.set(
        "decode_args",
        lua.create_function(|lua, (s, max): (Value, Option<i64>)| {
            let s = str_arg(lua, s, "decode_args")?;
            let max = max.unwrap_or(100).max(0) as usize;
            let (t, truncated) = decode_args(lua, &s, max)?;
            let mut ret = vec![Value::Table(t)];
            if truncated {
                ret.push(Value::String(lua.create_string("truncated")?));
            }
            Ok(MultiValue::from_iter(ret))
        })?,
    )?;
    ngx.set(
        "quote_sql_str",
        lua.create_function(|lua, s: Value| {
            lua.create_string(quote_sql_str(&arg_bytes(lua, s, "quote_sql_str")?))
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> Lua {
        crate::lua::vm::new_state(&crate::lua::vm::VmOptions::standalone(std::env::temp_dir()))
            .expect("lua state")
    }

    fn eval<T: mlua::FromLuaMulti>(lua: &Lua, code: &str) -> T {
        lua.load(code)
            .eval()
            .unwrap_or_else(|e| panic!("{code}: {e}"))
    }

    #[test]
    fn base64_round_trip_and_padding() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"return table.concat({ngx.encode_base64("hello"), ngx.encode_base64("hello", true),
               ngx.encode_base64(nil), ngx.decode_base64("aGVsbG8="), ngx.decode_base64("aGVsbG8"),
               tostring(ngx.decode_base64("a")), tostring(ngx.decode_base64("aGV$bG8=")),
               ngx.decode_base64mime("aGVs\r\nbG8=")}, "|")"#,
        );
        assert_eq!(r, "aGVsbG8=|aGVsbG8||hello|hello|nil|nil|hello");
        let r: bool = eval(
            &lua,
            r#"return ngx.decode_base64(ngx.encode_base64("\0\255\1")) == "\0\255\1""#,
        );
        assert!(r);
    }

    #[test]
    fn digests() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end
               return table.concat({ngx.md5("hello"), hex(ngx.md5_bin("hello")), hex(ngx.sha1_bin("abc")),
                 ngx.crc32_short("hello"), ngx.crc32_long("hello"),
                 ngx.encode_base64(ngx.hmac_sha1("thisisverysecretstuff", "some string we want to sign"))}, "|")"#,
        );
        assert_eq!(
            r,
            "5d41402abc4b2a76b9719d911017c592|5d41402abc4b2a76b9719d911017c592|\
             a9993e364706816aba3e25717850c26c9cd0d89d|907060870|907060870|R/pvxzHC4NLtj7S+kXFg/NePTmk="
        );
    }

    #[test]
    fn uri_escaping() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"return table.concat({ngx.escape_uri("a b/c?d=é~._-"), ngx.escape_uri("/a b?c#d%e&f", 0),
               ngx.unescape_uri("b%20r56+7"), ngx.unescape_uri("%zz%4"), ngx.unescape_uri("%C3%A9"),
               ngx.escape_uri(nil)}, "|")"#,
        );
        assert_eq!(
            r,
            "a%20b%2Fc%3Fd%3D%C3%A9~._-|/a%20b%3Fc%23d%25e&f|b r56 7|%zz%4|\u{e9}|"
        );
        let r: bool = eval(
            &lua,
            r#"return ngx.unescape_uri("%e9%C3%a9%00") == "\233\195\169\0""#,
        );
        assert!(r);
    }

    #[test]
    fn encode_args_shapes() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local s = ngx.encode_args({foo = 3, ["b r"] = "hello world", a = true, f = false,
                                          baz = {32, "hello", true, false}, e = {}})
               local parts = {}
               for p in s:gmatch("[^&]+") do parts[#parts + 1] = p end
               table.sort(parts)
               return table.concat(parts, "&")"#,
        );
        assert_eq!(r, "a&b%20r=hello%20world&baz&baz=32&baz=hello&foo=3");
        let r: bool = eval(&lua, r#"return not pcall(ngx.encode_args, {a = {{}}})"#);
        assert!(r);
    }

    #[test]
    fn decode_args_shapes() {
        let lua = state();
        let r: String = eval(
            &lua,
            r#"local t = ngx.decode_args("a=1&b&c=&a=2&d=x%20y+z&&=v&a=3")
               return table.concat({type(t.a), table.concat(t.a, ","), tostring(t.b), "[" .. t.c .. "]", t.d,
                                    tostring(t[""])}, "|")"#,
        );
        assert_eq!(r, "table|1,2,3|true|[]|x y z|nil");
        let r: String = eval(
            &lua,
            r#"local t, err = ngx.decode_args("a=1&b=2&c=3", 2)
               local all = ngx.decode_args("a=1&b=2&c=3", 0)
               return tostring(t.c) .. tostring(err) .. all.c"#,
        );
        assert_eq!(r, "niltruncated3");
    }

    #[test]
    fn quote_sql() {
        let lua = state();
        let r: bool = eval(
            &lua,
            r#"return ngx.quote_sql_str("a'b\"c\\d\n\r\t\0\26") == "'a\\'b\\\"c\\\\d\\n\\r\\t\\0\\Z'""#,
        );
        assert!(r);
    }
}
