//! ngx API family: time (`ngx.now`, `ngx.time`, `ngx.update_time`, `ngx.today`, `ngx.localtime`,
//! `ngx.utctime`, `ngx.http_time`, `ngx.cookie_time`, `ngx.parse_http_time`).
//!
//! Like nginx, each worker keeps a cached clock that only moves when the server refreshes it
//! (at each event-loop turn, through [`expire_cached_time`], and after waits, through
//! [`update_cached_time`]) or when Lua calls `ngx.update_time()`. The cache is thread-local
//! because a worker is a thread here.
//! This file only formats and parses times; it never touches the request or the event loop.

use std::cell::Cell;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Datelike, Local, NaiveDateTime, TimeZone, Timelike, Utc};
use mlua::{Lua, MultiValue, Table, Value};

const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

thread_local! {
    /// Milliseconds since the epoch at the last refresh; negative until the first read.
    static CACHED_MS: Cell<i64> = const { Cell::new(-1) };
}

fn clock_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        // A clock set before 1970 is not worth an error path: report the epoch.
        Err(_) => 0,
    }
}

/// Refresh this worker thread's cached time from the system clock (the loop clock too).
pub fn update_cached_time() {
    CACHED_MS.with(|c| c.set(clock_ms()));
    crate::clock::refresh();
}

/// A new event-loop turn: the next read takes the time afresh (see `crate::clock`).
pub fn expire_cached_time() {
    CACHED_MS.with(|c| c.set(-1));
}

fn cached_ms() -> i64 {
    CACHED_MS.with(|c| {
        let v = c.get();
        if v >= 0 {
            return v;
        }
        let now = clock_ms();
        c.set(now);
        now
    })
}

/// This worker thread's cached time in seconds since the epoch, with millisecond resolution.
pub fn cached_now() -> f64 {
    cached_ms() as f64 / 1000.0
}

fn cached_secs() -> i64 {
    cached_ms().div_euclid(1000)
}

/// `yyyy-mm-dd hh:mm:ss` (or only the date) for any chrono date-time.
fn format_ymd<T: Datelike + Timelike>(t: &T, with_time: bool) -> String {
    let mut s = format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day());
    if with_time {
        let _ = write!(s, " {:02}:{:02}:{:02}", t.hour(), t.minute(), t.second());
    }
    s
}

fn utc_at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

fn local_at(secs: i64) -> NaiveDateTime {
    match Local.timestamp_opt(secs, 0).earliest() {
        Some(t) => t.naive_local(),
        None => utc_at(secs).naive_utc(),
    }
}

/// `ngx.localtime()`-style text for `secs` in the local zone (`with_time = false`: `ngx.today()`).
pub fn format_local(secs: i64, with_time: bool) -> String {
    format_ymd(&local_at(secs), with_time)
}

/// `ngx.utctime()`-style text (`yyyy-mm-dd hh:mm:ss`) for `secs` in UTC.
pub fn format_utc(secs: i64) -> String {
    format_ymd(&utc_at(secs), true)
}

/// The HTTP date of `secs` (`Thu, 18 Nov 2010 11:27:35 GMT`), as in `Last-Modified`.
pub fn http_time(secs: i64) -> String {
    let t = utc_at(secs);
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[t.weekday().num_days_from_monday() as usize],
        t.day(),
        MONTHS[t.month0() as usize],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The cookie expiry date of `secs` (`Thu, 18-Nov-10 11:27:35 GMT`): nginx keeps two-digit years
/// up to 2037 for old browsers and writes four digits after that.
pub fn cookie_time(secs: i64) -> String {
    let t = utc_at(secs);
    let year = if t.year() > 2037 {
        format!("{}", t.year())
    } else {
        format!("{:02}", t.year().rem_euclid(100))
    };
    format!(
        "{}, {:02}-{}-{} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[t.weekday().num_days_from_monday() as usize],
        t.day(),
        MONTHS[t.month0() as usize],
        year,
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Small cursor over the bytes of a date being parsed.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.i += 1)
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }

    fn digits(&mut self, n: usize) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            let c = self.peek()?;
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(c - b'0');
            self.i += 1;
        }
        Some(v)
    }

    fn month(&mut self) -> Option<u32> {
        let name = self.s.get(self.i..self.i + 3)?;
        let m = MONTHS
            .iter()
            .position(|m| m.as_bytes().eq_ignore_ascii_case(name))?;
        self.i += 3;
        Some(m as u32 + 1)
    }

    fn clock(&mut self) -> Option<(u32, u32, u32)> {
        let h = self.digits(2)?;
        self.eat(b':')?;
        let m = self.digits(2)?;
        self.eat(b':')?;
        let s = self.digits(2)?;
        Some((h, m, s))
    }
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parse an HTTP date in any of the three forms nginx accepts (RFC 1123 `Thu, 18 Nov 2010
/// 11:27:35 GMT`, RFC 850 `Thursday, 18-Nov-10 11:27:35 GMT`, asctime `Thu Nov 18 11:27:35 2010`)
/// into seconds since the epoch. Like nginx, the weekday name is not checked.
pub fn parse_http_time(text: &[u8]) -> Option<i64> {
    let mut c = Cursor { s: text, i: 0 };
    // The weekday ends at a comma (RFC 1123/850) or a space (asctime).
    let asctime = loop {
        match c.peek()? {
            b',' => break false,
            b' ' => break true,
            _ => c.i += 1,
        }
    };
    c.i += 1;
    c.skip_spaces();

    let (year, month, day, (h, mi, s));
    if asctime {
        month = c.month()?;
        c.eat(b' ')?;
        // asctime pads a one-digit day with a space.
        c.skip_spaces();
        let d1 = c.digits(1)?;
        day = match c.digits(1) {
            Some(d2) => d1 * 10 + d2,
            None => d1,
        };
        c.eat(b' ')?;
        (h, mi, s) = c.clock()?;
        c.eat(b' ')?;
        year = i64::from(c.digits(4)?);
    } else {
        day = c.digits(2)?;
        match c.peek()? {
            b' ' => {
                c.i += 1;
                month = c.month()?;
                c.eat(b' ')?;
                year = i64::from(c.digits(4)?);
            }
            b'-' => {
                c.i += 1;
                month = c.month()?;
                c.eat(b'-')?;
                let yy = i64::from(c.digits(2)?);
                year = yy + if yy < 70 { 2000 } else { 1900 };
            }
            _ => return None,
        }
        c.eat(b' ')?;
        (h, mi, s) = c.clock()?;
    }
    if h > 23 || mi > 59 || s > 59 || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + i64::from(h * 3600 + mi * 60 + s))
}

/// The single `sec` argument of `ngx.http_time`/`ngx.cookie_time`, truncated like C's cast.
fn one_seconds_arg(lua: &Lua, args: MultiValue, name: &str) -> mlua::Result<i64> {
    if args.len() != 1 {
        return Err(mlua::Error::runtime("expecting one argument"));
    }
    let v = args.into_iter().next().unwrap_or(Value::Nil);
    let type_name = v.type_name();
    match lua.coerce_number(v)? {
        Some(n) if n.is_finite() => Ok(n.trunc() as i64),
        Some(_) => Err(mlua::Error::runtime(format!(
            "bad argument #1 to '{name}' (number out of range)"
        ))),
        None => Err(mlua::Error::runtime(format!(
            "bad argument #1 to '{name}' (number expected, got {type_name})"
        ))),
    }
}

/// `ngx.now()` as a plain C function: it cannot fail, so it never needs the ordinary one.
unsafe extern "C-unwind" fn now_fast(l: *mut mlua::ffi::lua_State) -> std::os::raw::c_int {
    mlua::ffi::lua_pushnumber(l, cached_now());
    1
}

/// Install the time functions into the `ngx` table.
pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let now = lua.create_function(|_, ()| Ok(cached_now()))?;
    ngx.set("now", crate::lua::fast::closure(lua, now_fast, now)?)?;
    ngx.set("time", lua.create_function(|_, ()| Ok(cached_secs()))?)?;
    ngx.set(
        "update_time",
        lua.create_function(|_, ()| {
            update_cached_time();
            Ok(())
        })?,
    )?;
    ngx.set(
        "today",
        lua.create_function(|_, ()| Ok(format_local(cached_secs(), false)))?,
    )?;
    ngx.set(
        "localtime",
        lua.create_function(|_, ()| Ok(format_local(cached_secs(), true)))?,
    )?;
    ngx.set(
        "utctime",
        lua.create_function(|_, ()| Ok(format_utc(cached_secs())))?,
    )?;
    ngx.set(
        "http_time",
        lua.create_function(|lua, args: MultiValue| {
            Ok(http_time(one_seconds_arg(lua, args, "http_time")?))
        })?,
    )?;
    ngx.set(
        "cookie_time",
        lua.create_function(|lua, args: MultiValue| {
            Ok(cookie_time(one_seconds_arg(lua, args, "cookie_time")?))
        })?,
    )?;
    ngx.set(
        "parse_http_time",
        lua.create_function(|lua, args: MultiValue| {
            if args.len() != 1 {
                return Err(mlua::Error::runtime("expecting one argument"));
            }
            let v = args.into_iter().next().unwrap_or(Value::Nil);
            let type_name = v.type_name();
            let Some(s) = lua.coerce_string(v)? else {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #1 to 'parse_http_time' (string expected, got {type_name})"
                )));
            };
            Ok(parse_http_time(&s.as_bytes()))
        })?,
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

    #[test]
    fn time_http_and_cookie_formats() {
        assert_eq!(http_time(1290079655), "Thu, 18 Nov 2010 11:27:35 GMT");
        assert_eq!(cookie_time(1290079655), "Thu, 18-Nov-10 11:27:35 GMT");
        assert_eq!(http_time(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(cookie_time(0), "Thu, 01-Jan-70 00:00:00 GMT");
        assert_eq!(cookie_time(1_000_000_000), "Sun, 09-Sep-01 01:46:40 GMT");
        // 2038-01-19 and later keep four digits.
        assert_eq!(cookie_time(2_200_000_000), "Sun, 18-Sep-2039 23:06:40 GMT");
        assert_eq!(format_utc(1290079655), "2010-11-18 11:27:35");
    }

    #[test]
    fn time_parse_http_time_forms() {
        assert_eq!(
            parse_http_time(b"Thu, 18 Nov 2010 11:27:35 GMT"),
            Some(1290079655)
        );
        assert_eq!(
            parse_http_time(b"Thursday, 18-Nov-10 11:27:35 GMT"),
            Some(1290079655)
        );
        assert_eq!(
            parse_http_time(b"Thu, 18-Nov-10 11:27:35 GMT"),
            Some(1290079655)
        );
        assert_eq!(
            parse_http_time(b"Thu Nov 18 11:27:35 2010"),
            Some(1290079655)
        );
        assert_eq!(
            parse_http_time(b"Sun Nov  6 08:49:37 1994"),
            Some(784111777)
        );
        assert_eq!(
            parse_http_time(b"Tue, 29 Feb 2000 00:00:00 GMT"),
            Some(951782400)
        );
        assert_eq!(parse_http_time(b"Thu, 29 Feb 2001 00:00:00 GMT"), None);
        assert_eq!(parse_http_time(b"Thu, 18 Nov 2010 25:27:35 GMT"), None);
        assert_eq!(parse_http_time(b"garbage"), None);
        assert_eq!(parse_http_time(b""), None);
        for secs in [0i64, 1, 86_399, 951_782_400, 1_290_079_655, 4_102_444_800] {
            assert_eq!(parse_http_time(http_time(secs).as_bytes()), Some(secs));
        }
    }

    #[test]
    fn time_cache_moves_only_on_update() {
        update_cached_time();
        let a = cached_now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(cached_now(), a);
        update_cached_time();
        assert!(cached_now() > a);
        assert_eq!((cached_now() * 1000.0).round() / 1000.0, cached_now());
    }

    #[test]
    fn time_lua_api() {
        let lua = state();
        let ok: bool = lua
            .load(
                r#"
                local t = ngx.time()
                assert(math.floor(t) == t)
                local n = ngx.now()
                assert(n >= t and n < t + 1)
                ngx.update_time()
                assert(ngx.now() >= n)
                assert(ngx.today():match("^%d%d%d%d%-%d%d%-%d%d$"))
                assert(ngx.localtime():match("^%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d$"))
                assert(ngx.utctime():match("^%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d$"))
                assert(ngx.http_time(1290079655) == "Thu, 18 Nov 2010 11:27:35 GMT")
                assert(ngx.http_time(1290079655.9) == "Thu, 18 Nov 2010 11:27:35 GMT")
                assert(ngx.cookie_time(1290079655) == "Thu, 18-Nov-10 11:27:35 GMT")
                assert(ngx.parse_http_time("Thu, 18 Nov 2010 11:27:35 GMT") == 1290079655)
                assert(ngx.parse_http_time("nope") == nil)
                assert(not pcall(ngx.http_time))
                assert(not pcall(ngx.http_time, {}))
                return true
                "#,
            )
            .eval()
            .unwrap();
        assert!(ok);
    }
}
