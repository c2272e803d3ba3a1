//! `ngx.say`, `ngx.print`, `ngx.flush`, `ngx.eof`: output goes into the request's buffer and
//! through the filters on flush or at the end of the content phase.

use std::os::raw::c_int;

use mlua::{ffi, Lua, Table, Value};

use crate::http::request::Phase;
use crate::lua::request::{check_phase, current};

/// Lua's `%.14g` number formatting (what `tostring` and `ngx.say` print).
pub fn format_number(n: f64) -> String {
    if n.is_nan() {
        return if n.is_sign_negative() {
            "-nan".into()
        } else {
            "nan".into()
        };
    }
    if n.is_infinite() {
        return if n > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // %.14g prints integers below 1e14 without an exponent.
    if n == n.trunc() && n.abs() < 1e14 {
        return format!("{}", n as i64);
    }
    let sci = format!("{:.13e}", n);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..14).contains(&exp) {
        let mant = trim_zeros(mant);
        format!(
            "{}e{}{:02}",
            mant,
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    } else {
        let prec = (13 - exp).max(0) as usize;
        trim_zeros(&format!("{:.*}", prec, n)).to_string()
    }
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// Append a value as ngx.print renders it (strings, numbers, booleans, nil, ngx.null, and
/// arrays of those, nested).
pub fn render(out: &mut Vec<u8>, v: &Value, depth: usize) -> mlua::Result<()> {
    match v {
        Value::String(s) => out.extend_from_slice(&s.as_bytes()),
        Value::Integer(i) => out.extend_from_slice(format_number(*i as f64).as_bytes()),
        Value::Number(n) => out.extend_from_slice(format_number(*n).as_bytes()),
        Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Nil => out.extend_from_slice(b"nil"),
        Value::LightUserData(p) if p.0.is_null() => out.extend_from_slice(b"null"),
        Value::Table(t) if depth < 100 => {
            let n = t.raw_len();
            for pair in t.clone().pairs::<Value, Value>() {
                let (k, _) = pair?;
                let in_seq = matches!(k, Value::Integer(i) if i >= 1 && (i as usize) <= n)
                    || matches!(k, Value::Number(f) if f >= 1.0 && f.fract() == 0.0 && (f as usize) <= n);
                if !in_seq {
                    return Err(mlua::Error::runtime(
                        "bad argument #1 to 'say' (non-array table found)",
                    ));
                }
            }
            for item in t.clone().sequence_values::<Value>() {
                render(out, &item?, depth + 1)?;
            }
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "bad argument #1 to 'say' ({} not allowed)",
                other.type_name()
            )));
        }
    }
    Ok(())
}

const OUTPUT_PHASES: &[Phase] = &[
    Phase::Rewrite,
    Phase::ServerRewrite,
    Phase::Access,
    Phase::Content,
];

fn emit(lua: &Lua, args: mlua::Variadic<Value>, newline: bool) -> mlua::Result<(i64,)> {
    let mut buf = Vec::new();
    for a in args.iter() {
        render(&mut buf, a, 0)?;
    }
    if newline {
        buf.push(b'\n');
    }
    // `tidegate spec`/`resty` install their own ngx.say; here a request is required. One
    // lookup of the current request, then the phase check on it.
    let Some(rc) = crate::lua::request::try_current(lua) else {
        // init/init_worker/timer: OpenResty's "API disabled in the context of ..." message.
        check_phase(lua, OUTPUT_PHASES)?;
        return Err(mlua::Error::runtime("no request found"));
    };
    let phase = rc.st.borrow().phase;
    if !OUTPUT_PHASES.contains(&phase) {
        return Err(mlua::Error::runtime(format!(
            "API disabled in the context of {}",
            crate::lua::request::context_name(phase)
        )));
    }
    let mut st = rc.st.borrow_mut();
    if st.eof_sent {
        return Ok((0,));
    }
    st.out.extend_from_slice(&buf);
    Ok((1,))
}

/// `ngx.say`/`ngx.print` without mlua's argument conversion when every argument is a string
/// or a number and the request is in an output phase; anything else goes to [`emit`].
///
/// # Safety
/// A C closure made by [`crate::lua::fast::closure`].
unsafe fn emit_fast(l: *mut ffi::lua_State, newline: bool) -> c_int {
    use crate::lua::fast;
    let n = ffi::lua_gettop(l);
    // One reservation for the whole call (numbers take at most 24 bytes as %.14g).
    let mut len = newline as usize;
    for i in 1..=n {
        match ffi::lua_type(l, i) {
            ffi::LUA_TSTRING => len += fast::str_at(l, i).len(),
            ffi::LUA_TNUMBER => len += 24,
            _ => return fast::slow(l),
        }
    }
    let written = (|| {
        let rc = fast::request(l)?;
        let mut st = rc.st.try_borrow_mut().ok()?;
        if !OUTPUT_PHASES.contains(&st.phase) {
            return None;
        }
        if st.eof_sent {
            return Some(0);
        }
        // No Lua value is made below (numbers are rendered in Rust), so no finalizer can run
        // while the state is borrowed.
        st.out.reserve(len);
        for i in 1..=n {
            if ffi::lua_type(l, i) == ffi::LUA_TSTRING {
                st.out.extend_from_slice(fast::str_at(l, i));
            } else {
                st.out
                    .extend_from_slice(format_number(ffi::lua_tonumber(l, i)).as_bytes());
            }
        }
        if newline {
            st.out.extend_from_slice(b"\n");
        }
        Some(1)
    })();
    match written {
        Some(r) => {
            ffi::lua_pushinteger(l, r);
            1
        }
        None => fast::slow(l),
    }
}

unsafe extern "C-unwind" fn say_fast(l: *mut ffi::lua_State) -> c_int {
    emit_fast(l, true)
}

unsafe extern "C-unwind" fn print_fast(l: *mut ffi::lua_State) -> c_int {
    emit_fast(l, false)
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let say = lua.create_function(|lua, args: mlua::Variadic<Value>| emit(lua, args, true))?;
    ngx.set("say", crate::lua::fast::closure(lua, say_fast, say)?)?;
    let print = lua.create_function(|lua, args: mlua::Variadic<Value>| emit(lua, args, false))?;
    ngx.set("print", crate::lua::fast::closure(lua, print_fast, print)?)?;
    ngx.set(
        "flush",
        lua.create_async_function(|lua, _wait: Option<bool>| async move {
            check_phase(&lua, OUTPUT_PHASES)?;
            let rc = current(&lua)?;
            match crate::http::filter::send(&rc, false).await {
                Ok(()) => Ok((Value::Integer(1), Value::Nil)),
                Err(e) => Ok((Value::Nil, Value::String(lua.create_string(&e)?))),
            }
        })?,
    )?;
    ngx.set(
        "eof",
        lua.create_async_function(|lua, ()| async move {
            check_phase(&lua, OUTPUT_PHASES)?;
            let rc = current(&lua)?;
            match crate::http::filter::send(&rc, true).await {
                Ok(()) => Ok((Value::Integer(1), Value::Nil)),
                Err(e) => Ok((Value::Nil, Value::String(lua.create_string(&e)?))),
            }
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::format_number;

    #[test]
    fn numbers_like_lua() {
        assert_eq!(format_number(1.0), "1");
        assert_eq!(format_number(1.5), "1.5");
        assert_eq!(format_number(0.1), "0.1");
        assert_eq!(format_number(1e20), "1e+20");
        assert_eq!(format_number(1.2345678901234567), "1.2345678901235");
        assert_eq!(format_number(1e-5), "1e-05");
        assert_eq!(format_number(-2.0), "-2");
    }
}
