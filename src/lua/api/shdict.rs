//! `ngx.shared.DICT`: each `lua_shared_dict` zone as a Lua object with lua-nginx-module's
//! methods and return values (as lua-resty-core shapes them, since modern OpenResty always
//! loads it).
//!
//! As in OpenResty a dict object is a table holding the zone handle at index 1 with the methods
//! in its metatable, so `dict:get(k)` and `dict.get(dict, k)` work and `dict.get(k)` fails with
//! `bad "zone" argument`. A thin Lua layer checks arguments and raises misuse errors at the
//! caller's line (`error(msg, 2)`, plain strings like OpenResty's); the work is done by Rust
//! primitives over [`crate::shdict::Zone`], which never hold a Lua value.

use bytes::Bytes;
use mlua::{
    AnyUserData, IntoLuaMulti, Lua, MultiValue, Table, UserData, UserDataRef, Value as LuaValue,
};

use crate::shdict::{check_key, ShdictError, Value, Zone, Zones};
use mlua::ffi;
use std::os::raw::c_int;
use std::rc::Rc;
use std::sync::Arc;

/// The userdata at index 1 of every dict object.
struct ZoneHandle(Arc<Zone>);

impl UserData for ZoneHandle {}

impl std::ops::Deref for ZoneHandle {
    type Target = Zone;
    fn deref(&self) -> &Zone {
        &self.0
    }
}

/// Argument checks and method table; gets the primitives table and name -> handle map, returns
/// the `ngx.shared` table.
const GLUE: &str = r#"
local prim, handles = ...
local type, error, tonumber, rawget, setmetatable = type, error, tonumber, rawget, setmetatable
local p_store, p_get, p_incr, p_push, p_pop = prim.store, prim.get, prim.incr, prim.push, prim.pop
local p_llen, p_ttl, p_expire = prim.llen, prim.ttl, prim.expire

-- Level 3: blame the code that called the dict method, not the method.
local function zone_of(dict)
    local z = type(dict) == "table" and rawget(dict, 1)
    if type(z) ~= "userdata" then
        error('bad "zone" argument', 3)
    end
    return z
end

local function exptime_of(v)
    if v == nil then
        return 0
    end
    local n = tonumber(v)
    if not n or n < 0 then
        error('bad "exptime" argument', 3)
    end
    return n
end

local function flags_of(v)
    if v == nil then
        return 0
    end
    local n = tonumber(v)
    if not n then
        error('bad "flags" argument', 3)
    end
    return n
end

local methods = {}

local function storer(op)
    return function(dict, key, value, exptime, flags)
        return p_store(zone_of(dict), op, key, value, exptime_of(exptime), flags_of(flags))
    end
end

methods.set = storer(0)
methods.safe_set = storer(1)
methods.add = storer(2)
methods.safe_add = storer(3)
methods.replace = storer(4)

function methods.delete(dict, key)
    return p_store(zone_of(dict), 0, key, nil, 0, 0)
end

function methods.get(dict, key)
    return p_get(zone_of(dict), key, false)
end

function methods.get_stale(dict, key)
    return p_get(zone_of(dict), key, true)
end

function methods.incr(dict, key, value, init, init_ttl)
    local z = zone_of(dict)
    local by = tonumber(value)
    if not by then
        error("cannot convert 'nil' to 'double'", 2)
    end
    if init ~= nil then
        local n = tonumber(init)
        if not n then
            error("bad init arg: number expected, got " .. type(init), 2)
        end
        init = n
    end
    local ttl = 0
    if init_ttl ~= nil then
        local n = tonumber(init_ttl)
        if not n then
            error("bad init_ttl arg: number expected, got " .. type(init_ttl), 2)
        end
        if n < 0 then
            error('bad "init_ttl" argument', 2)
        end
        if init == nil then
            error('must provide "init" when providing "init_ttl"', 2)
        end
        ttl = n
    end
    return p_incr(z, key, by, init, ttl)
end

function methods.lpush(dict, key, value)
    return p_push(zone_of(dict), key, value, true)
end

function methods.rpush(dict, key, value)
    return p_push(zone_of(dict), key, value, false)
end

function methods.lpop(dict, key)
    return p_pop(zone_of(dict), key, true)
end

function methods.rpop(dict, key)
    return p_pop(zone_of(dict), key, false)
end

function methods.llen(dict, key)
    return p_llen(zone_of(dict), key)
end

function methods.ttl(dict, key)
    return p_ttl(zone_of(dict), key)
end

function methods.expire(dict, key, exptime)
    local z = zone_of(dict)
    if exptime == nil then
        error('bad "exptime" argument', 2)
    end
    return p_expire(z, key, exptime_of(exptime))
end

function methods.flush_all(dict)
    return prim.flush_all(zone_of(dict))
end

function methods.flush_expired(dict, max_count)
    local z = zone_of(dict)
    return prim.flush_expired(z, tonumber(max_count) or 0)
end

function methods.get_keys(dict, max_count)
    local z = zone_of(dict)
    if max_count == nil then
        max_count = 1024
    end
    return prim.get_keys(z, tonumber(max_count) or 1024)
end

function methods.capacity(dict)
    return prim.capacity(zone_of(dict))
end

function methods.free_space(dict)
    return prim.free_space(zone_of(dict))
end

local mt = { __index = methods }
local shared = {}
for name, handle in pairs(handles) do
    shared[name] = setmetatable({ handle }, mt)
end
return shared
"#;

/// Installs `ngx.shared` with one dict object per zone.
pub fn register(lua: &Lua, ngx: &Table, zones: &Zones) -> mlua::Result<()> {
    let handles = lua.create_table()?;
    for (name, zone) in zones.iter() {
        handles.set(
            name.as_str(),
            lua.create_userdata(ZoneHandle(zone.clone()))?,
        )?;
    }
    // The zone behind each handle by the handle's address, for the raw entry points.
    let mut by_ptr = Vec::new();
    for pair in handles.pairs::<mlua::LuaString, AnyUserData>() {
        let (_, ud) = pair?;
        by_ptr.push((ud.to_pointer() as usize, zone_arg(&ud)?.0.clone()));
    }
    let by_ptr = Rc::new(ZonesByPtr(by_ptr));
    let ptr = Rc::as_ptr(&by_ptr) as *mut std::os::raw::c_void;
    // Set once per state, never replaced: the pointer lives as long as the state.
    lua.set_app_data(by_ptr);
    let shared: Table = lua
        .load(GLUE)
        .set_name("=ngx.shared")
        .call((primitives(lua, ptr)?, handles))?;
    ngx.set("shared", shared)
}

/// Zones by the address of their handle userdata (what `lua_touserdata` gives).
struct ZonesByPtr(Vec<(usize, Arc<Zone>)>);

/// The zone of the handle at stack index 1 of a raw entry point, if it is one.
///
/// # Safety
/// Inside a closure made by `fast::closure_with` over a [`ZonesByPtr`].
unsafe fn zone_at<'a>(l: *mut ffi::lua_State) -> Option<&'a Zone> {
    let map = crate::lua::fast::extra(l) as *const ZonesByPtr;
    if map.is_null() || ffi::lua_type(l, 1) != ffi::LUA_TUSERDATA {
        return None;
    }
    let p = ffi::lua_touserdata(l, 1) as usize;
    (*map).0.iter().find(|(q, _)| *q == p).map(|(_, z)| &**z)
}

/// Push one stored value.
///
/// # Safety
/// One free stack slot.
unsafe fn push_value(l: *mut ffi::lua_State, v: &Value) {
    match v {
        Value::Str(b) => crate::lua::fast::push_bytes(l, b),
        Value::Number(n) => ffi::lua_pushnumber(l, *n),
        Value::Bool(b) => ffi::lua_pushboolean(l, *b as c_int),
    }
}

/// `get(zone, key, false)` for a string key, without mlua's conversions; stale reads, other
/// key types and every error go to the ordinary primitive.
unsafe extern "C-unwind" fn get_fast(l: *mut ffi::lua_State) -> c_int {
    use crate::lua::fast;
    if !fast::args_are(l, &[None, Some(ffi::LUA_TSTRING), Some(ffi::LUA_TBOOLEAN)])
        || ffi::lua_toboolean(l, 3) != 0
    {
        return fast::slow(l);
    }
    let Some(zone) = zone_at(l) else {
        return fast::slow(l);
    };
    match zone.get(fast::str_at(l, 2)) {
        Ok(Some((v, flags))) => {
            push_value(l, &v);
            if flags == 0 {
                return 1;
            }
            ffi::lua_pushnumber(l, f64::from(flags));
            2
        }
        Ok(None) => {
            ffi::lua_pushnil(l);
            1
        }
        Err(_) => fast::slow(l),
    }
}

/// `incr(zone, key, by, init, init_ttl)` for a string key and number arguments (what the Lua
/// glue passes after its checks), without mlua's conversions; other shapes go to the ordinary
/// primitive. Errors are answered here (`nil, err`), never by running the operation twice.
unsafe extern "C-unwind" fn incr_fast(l: *mut ffi::lua_State) -> c_int {
    use crate::lua::fast;
    let init_t = ffi::lua_type(l, 4);
    if ffi::lua_gettop(l) != 5
        || ffi::lua_type(l, 2) != ffi::LUA_TSTRING
        || ffi::lua_type(l, 3) != ffi::LUA_TNUMBER
        || (init_t != ffi::LUA_TNUMBER && init_t != ffi::LUA_TNIL)
        || ffi::lua_type(l, 5) != ffi::LUA_TNUMBER
    {
        return fast::slow(l);
    }
    let Some(zone) = zone_at(l) else {
        return fast::slow(l);
    };
    let key = fast::str_at(l, 2);
    if check_key(key).is_err() {
        // The ordinary primitive words the refusal.
        return fast::slow(l);
    }
    let by = ffi::lua_tonumber(l, 3);
    let init = (init_t == ffi::LUA_TNUMBER).then(|| ffi::lua_tonumber(l, 4));
    let ttl = ffi::lua_tonumber(l, 5);
    match zone.incr(key, by, init, ttl) {
        Ok((n, forcible)) => {
            ffi::lua_pushnumber(l, n);
            if init.is_none() {
                return 1;
            }
            ffi::lua_pushnil(l);
            ffi::lua_pushboolean(l, forcible as c_int);
            3
        }
        Err(e) => {
            let msg = e.to_string();
            ffi::lua_pushnil(l);
            fast::push_bytes(l, msg.as_bytes());
            2
        }
    }
}

/// The `(nil, err)` pair every failed operation returns.
fn fail(lua: &Lua, msg: impl std::fmt::Display) -> mlua::Result<MultiValue> {
    (LuaValue::Nil, msg.to_string()).into_lua_multi(lua)
}

/// A method's key argument as OpenResty takes it: non-strings go through `tostring`, and
/// nil, empty and overlong keys are refused with the returned error text.
fn key_arg(lua: &Lua, key: LuaValue) -> mlua::Result<Result<mlua::LuaString, &'static str>> {
    let s = match key {
        LuaValue::Nil => return Ok(Err("nil key")),
        LuaValue::String(s) => s,
        LuaValue::Integer(_) | LuaValue::Number(_) => match lua.coerce_string(key)? {
            Some(s) => s,
            None => return Ok(Err("bad key")),
        },
        other => {
            let tostring: mlua::Function = lua.globals().get("tostring")?;
            tostring.call(other)?
        }
    };
    match check_key(&s.as_bytes()) {
        Ok(()) => Ok(Ok(s)),
        Err(ShdictError::EmptyKey) => Ok(Err("empty key")),
        Err(_) => Ok(Err("key too long")),
    }
}

/// Borrows the zone behind a handle. No `Arc` clone: a refcount bump on every call would make
/// all workers write the same cache line.
fn zone_arg(ud: &AnyUserData) -> mlua::Result<UserDataRef<ZoneHandle>> {
    ud.borrow::<ZoneHandle>()
        .map_err(|_| mlua::Error::runtime("bad \"zone\" argument"))
}

fn to_lua(lua: &Lua, v: Value) -> mlua::Result<LuaValue> {
    Ok(match v {
        Value::Str(b) => LuaValue::String(lua.create_string(&b)?),
        Value::Number(n) => LuaValue::Number(n),
        Value::Bool(b) => LuaValue::Boolean(b),
    })
}

/// A Lua value as a storable scalar; `Ok(None)` is nil (delete), `Err` a table, function...
fn from_lua(v: &LuaValue) -> Result<Option<Value>, ShdictError> {
    match v {
        LuaValue::Nil => Ok(None),
        LuaValue::String(s) => Ok(Some(Value::Str(Bytes::copy_from_slice(&s.as_bytes())))),
        LuaValue::Integer(i) => Ok(Some(Value::Number(*i as f64))),
        LuaValue::Number(n) => Ok(Some(Value::Number(*n))),
        LuaValue::Boolean(b) => Ok(Some(Value::Bool(*b))),
        _ => Err(ShdictError::BadValueType),
    }
}

macro_rules! key_or_fail {
    ($lua:expr, $key:expr) => {
        match key_arg($lua, $key)? {
            Ok(k) => k,
            Err(e) => return fail($lua, e),
        }
    };
}

fn primitives(lua: &Lua, zones: *mut std::os::raw::c_void) -> mlua::Result<Table> {
    let t = lua.create_table()?;

    t.set(
        "store",
        lua.create_function(
            |lua,
             (ud, op, key, value, exptime, flags): (
                AnyUserData,
                u8,
                LuaValue,
                LuaValue,
                f64,
                f64,
            )| {
                let zone = zone_arg(&ud)?;
                let key = key_or_fail!(lua, key);
                let value = match from_lua(&value) {
                    Ok(v) => v,
                    Err(e) => return fail(lua, e),
                };
                // Flags are a C uint32 in OpenResty: larger numbers wrap.
                let flags = flags as i64 as u32;
                let key = key.as_bytes();
                let res = match op {
                    0 => zone.set(&key, value, exptime, flags),
                    1 => zone.safe_set(&key, value, exptime, flags).map(|()| false),
                    2 => zone.add(&key, value, exptime, flags),
                    3 => zone.safe_add(&key, value, exptime, flags).map(|()| false),
                    _ => zone.replace(&key, value, exptime, flags),
                };
                match res {
                    Ok(forcible) => (true, LuaValue::Nil, forcible).into_lua_multi(lua),
                    // The safe variants report running out of memory with nil, as documented.
                    Err(ShdictError::NoMemory) if op == 1 || op == 3 => {
                        fail(lua, ShdictError::NoMemory)
                    }
                    Err(e) => (false, e.to_string(), false).into_lua_multi(lua),
                }
            },
        )?,
    )?;

    let get = lua.create_function(|lua, (ud, key, stale): (AnyUserData, LuaValue, bool)| {
        let zone = zone_arg(&ud)?;
        let key = key_or_fail!(lua, key);
        let key = key.as_bytes();
        if stale {
            match zone.get_stale(&key) {
                Ok(Some((v, flags, is_stale))) => {
                    let flags = if flags != 0 {
                        LuaValue::Number(f64::from(flags))
                    } else {
                        LuaValue::Nil
                    };
                    (to_lua(lua, v)?, flags, is_stale).into_lua_multi(lua)
                }
                Ok(None) => LuaValue::Nil.into_lua_multi(lua),
                Err(e) => fail(lua, e),
            }
        } else {
            match zone.get(&key) {
                Ok(Some((v, 0))) => to_lua(lua, v)?.into_lua_multi(lua),
                Ok(Some((v, flags))) => (to_lua(lua, v)?, f64::from(flags)).into_lua_multi(lua),
                Ok(None) => LuaValue::Nil.into_lua_multi(lua),
                Err(e) => fail(lua, e),
            }
        }
    })?;
    t.set(
        "get",
        // SAFETY: `zones` is kept in app data (see `register`).
        unsafe { crate::lua::fast::closure_with(lua, get_fast, get, zones)? },
    )?;

    let incr = lua.create_function(
        |lua, (ud, key, by, init, init_ttl): (AnyUserData, LuaValue, f64, Option<f64>, f64)| {
            let zone = zone_arg(&ud)?;
            let key = key_or_fail!(lua, key);
            match zone.incr(&key.as_bytes(), by, init, init_ttl) {
                // `forcible` is only part of the answer when `init` was given.
                Ok((n, forcible)) if init.is_some() => {
                    (n, LuaValue::Nil, forcible).into_lua_multi(lua)
                }
                Ok((n, _)) => n.into_lua_multi(lua),
                Err(e) => fail(lua, e),
            }
        },
    )?;
    t.set(
        "incr",
        // SAFETY: as for `get`.
        unsafe { crate::lua::fast::closure_with(lua, incr_fast, incr, zones)? },
    )?;

    t.set(
        "push",
        lua.create_function(
            |lua, (ud, key, value, front): (AnyUserData, LuaValue, LuaValue, bool)| {
                let zone = zone_arg(&ud)?;
                let key = key_or_fail!(lua, key);
                let value = match value {
                    LuaValue::String(s) => Value::Str(Bytes::copy_from_slice(&s.as_bytes())),
                    LuaValue::Integer(i) => Value::Number(i as f64),
                    LuaValue::Number(n) => Value::Number(n),
                    _ => return fail(lua, ShdictError::BadValueType),
                };
                let key = key.as_bytes();
                let res = if front {
                    zone.lpush(&key, value)
                } else {
                    zone.rpush(&key, value)
                };
                match res {
                    Ok(len) => (len as f64).into_lua_multi(lua),
                    Err(e) => fail(lua, e),
                }
            },
        )?,
    )?;

    t.set(
        "pop",
        lua.create_function(|lua, (ud, key, front): (AnyUserData, LuaValue, bool)| {
            let zone = zone_arg(&ud)?;
            let key = key_or_fail!(lua, key);
            let key = key.as_bytes();
            let res = if front {
                zone.lpop(&key)
            } else {
                zone.rpop(&key)
            };
            match res {
                Ok(Some(v)) => to_lua(lua, v)?.into_lua_multi(lua),
                Ok(None) => LuaValue::Nil.into_lua_multi(lua),
                Err(e) => fail(lua, e),
            }
        })?,
    )?;

    t.set(
        "llen",
        lua.create_function(|lua, (ud, key): (AnyUserData, LuaValue)| {
            let zone = zone_arg(&ud)?;
            let key = key_or_fail!(lua, key);
            match zone.llen(&key.as_bytes()) {
                Ok(n) => (n as f64).into_lua_multi(lua),
                Err(e) => fail(lua, e),
            }
        })?,
    )?;

    t.set(
        "ttl",
        lua.create_function(|lua, (ud, key): (AnyUserData, LuaValue)| {
            let zone = zone_arg(&ud)?;
            let key = key_or_fail!(lua, key);
            match zone.ttl(&key.as_bytes()) {
                Ok(t) => t.into_lua_multi(lua),
                Err(e) => fail(lua, e),
            }
        })?,
    )?;

    t.set(
        "expire",
        lua.create_function(|lua, (ud, key, exptime): (AnyUserData, LuaValue, f64)| {
            let zone = zone_arg(&ud)?;
            let key = key_or_fail!(lua, key);
            match zone.expire(&key.as_bytes(), exptime) {
                Ok(()) => true.into_lua_multi(lua),
                Err(e) => fail(lua, e),
            }
        })?,
    )?;

    t.set(
        "flush_all",
        lua.create_function(|_, ud: AnyUserData| {
            zone_arg(&ud)?.flush_all();
            Ok(())
        })?,
    )?;

    t.set(
        "flush_expired",
        lua.create_function(|_, (ud, max): (AnyUserData, f64)| {
            let max = if max > 0.0 { max as usize } else { 0 };
            Ok(zone_arg(&ud)?.flush_expired(max) as f64)
        })?,
    )?;

    t.set(
        "get_keys",
        lua.create_function(|lua, (ud, max): (AnyUserData, f64)| {
            let max = if max > 0.0 { max as usize } else { 0 };
            let keys = zone_arg(&ud)?.get_keys(max);
            let out = lua.create_table_with_capacity(keys.len(), 0)?;
            for (i, k) in keys.into_iter().enumerate() {
                out.raw_set(i + 1, lua.create_string(&k)?)?;
            }
            Ok(out)
        })?,
    )?;

    t.set(
        "capacity",
        lua.create_function(|_, ud: AnyUserData| Ok(zone_arg(&ud)?.capacity() as f64))?,
    )?;
    t.set(
        "free_space",
        lua.create_function(|_, ud: AnyUserData| Ok(zone_arg(&ud)?.free_space() as f64))?,
    )?;

    Ok(t)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use super::*;
    use crate::lua::vm::{new_state, VmOptions};

    fn state() -> Lua {
        let mut zones = HashMap::new();
        zones.insert("cache".to_string(), Arc::new(Zone::new("cache", 1 << 20)));
        zones.insert("tiny".to_string(), Arc::new(Zone::new("tiny", 8 * 1024)));
        let opts = VmOptions {
            zones: Arc::new(zones),
            ..VmOptions::standalone(PathBuf::from("/tmp"))
        };
        let lua = match new_state(&opts) {
            Ok(l) => l,
            Err(e) => panic!("new_state: {e}"),
        };
        let sleep = lua
            .create_function(|_, secs: f64| {
                std::thread::sleep(std::time::Duration::from_secs_f64(secs));
                Ok(())
            })
            .unwrap();
        lua.globals().set("test_sleep", sleep).unwrap();
        lua
    }

    fn run(code: &str) {
        let lua = state();
        if let Err(e) = lua.load(code).set_name("=test").exec() {
            panic!("{e}");
        }
    }

    #[test]
    fn shdict_objects_and_unknown_zone() {
        run(r##"
            local d = ngx.shared.cache
            assert(type(d) == "table")
            assert(ngx.shared.tiny ~= nil)
            assert(ngx.shared.nope == nil)
            assert(d.set(d, "k", 1) == true)
            assert(d.get(d, "k") == 1)
            local ok, err = pcall(d.get, "k")
            assert(not ok and err:find('bad "zone" argument', 1, true), err)
            -- The error is a plain string blaming the caller's line, as in OpenResty.
            ok, err = pcall(function() local v = d.get("k") return v end)
            assert(not ok and type(err) == "string", tostring(err))
            assert(err:match('^test:%d+: bad "zone" argument$'), err)
        "##);
    }

    #[test]
    fn shdict_get_set_types() {
        run(r##"
            local d = ngx.shared.cache
            local ok, err, forcible = d:set("s", "a\0b")
            assert(ok == true and err == nil and forcible == false)
            d:set("n", 42)
            d:set("f", 1.5)
            d:set("t", true)
            d:set("b", false)
            local v, flags = d:get("s")
            assert(v == "a\0b" and #v == 3 and flags == nil)
            assert(d:get("n") == 42)
            assert(tostring(d:get("n")) == "42")
            assert(d:get("f") == 1.5)
            assert(d:get("t") == true)
            assert(d:get("b") == false)
            assert(d:get("missing") == nil)
            assert(select("#", d:get("missing")) == 1)
            d:set("fl", "x", 0, 7)
            local v2, f2 = d:get("fl")
            assert(v2 == "x" and f2 == 7)
            -- nil deletes
            assert(d:set("s", nil) == true)
            assert(d:get("s") == nil)
            d:delete("n")
            assert(d:get("n") == nil)
            -- numeric keys go through tostring
            d:set(12, "twelve")
            assert(d:get("12") == "twelve")
        "##);
    }

    #[test]
    fn shdict_key_and_value_errors() {
        run(r##"
            local d = ngx.shared.cache
            local v, err = d:get(nil)
            assert(v == nil and err == "nil key", err)
            v, err = d:get("")
            assert(v == nil and err == "empty key", err)
            v, err = d:set(string.rep("k", 65536), 1)
            assert(v == nil and err == "key too long", err)
            assert(d:set(string.rep("k", 65535), 1) == true)
            v, err = d:set("k", {})
            assert(v == nil and err == "bad value type", err)
            v, err = d:set("k", print)
            assert(v == nil and err == "bad value type", err)
            local ok, e = pcall(d.set, d, "k", 1, -1)
            assert(not ok and e:find('bad "exptime" argument', 1, true), e)
        "##);
    }

    #[test]
    fn shdict_add_replace_incr() {
        run(r##"
            local d = ngx.shared.cache
            assert(d:add("a", 1) == true)
            local ok, err, forcible = d:add("a", 2)
            assert(ok == false and err == "exists" and forcible == false)
            ok, err = d:safe_add("a", 2)
            assert(ok == false and err == "exists")
            ok, err = d:replace("missing", 1)
            assert(ok == false and err == "not found")
            assert(d:replace("a", 5) == true and d:get("a") == 5)

            local n, e = d:incr("nope", 1)
            assert(n == nil and e == "not found")
            assert(select("#", d:incr("a", 2)) == 1)
            assert(d:incr("a", 2) == 9)
            assert(d:incr("a", -0.5) == 8.5)
            local v, e2, f = d:incr("c", 1, 10)
            assert(v == 11 and e2 == nil and f == false)
            d:set("str", "x")
            n, e = d:incr("str", 1)
            assert(n == nil and e == "not a number")
            local ok2, msg = pcall(d.incr, d, "c", 1, nil, 5)
            assert(not ok2 and msg:find('must provide "init"', 1, true), msg)
            ok2, msg = pcall(d.incr, d, "c", nil)
            assert(not ok2)
            -- init_ttl
            assert(d:incr("tmp", 1, 0, 0.02) == 1)
            test_sleep(0.05)
            assert(d:get("tmp") == nil)
        "##);
    }

    #[test]
    fn shdict_ttl_expire_stale() {
        run(r##"
            local d = ngx.shared.cache
            d:set("k", "v", 0.05, 3)
            local ttl = d:ttl("k")
            assert(ttl > 0 and ttl <= 0.05, ttl)
            d:set("forever", 1)
            assert(d:ttl("forever") == 0)
            local t, err = d:ttl("missing")
            assert(t == nil and err == "not found")
            local v, f, stale = d:get_stale("k")
            assert(v == "v" and f == 3 and stale == false)
            test_sleep(0.08)
            assert(d:get("k") == nil)
            v, f, stale = d:get_stale("k")
            assert(v == "v" and f == 3 and stale == true)
            t, err = d:ttl("k")
            assert(t == nil and err == "not found")
            local ok, e = d:expire("k", 1)
            assert(ok == nil and e == "not found")
            assert(d:expire("forever", 10) == true)
            assert(d:ttl("forever") > 9)
            v, f, stale = d:get_stale("forever")
            assert(v == 1 and f == nil and stale == false)
            local ok2, msg = pcall(d.expire, d, "forever")
            assert(not ok2 and msg:find('bad "exptime" argument', 1, true))
        "##);
    }

    #[test]
    fn shdict_lists() {
        run(r##"
            local d = ngx.shared.cache
            assert(d:llen("l") == 0)
            assert(d:lpop("l") == nil)
            assert(d:rpush("l", "b") == 1)
            assert(d:lpush("l", 1) == 2)
            assert(d:rpush("l", "c") == 3)
            local n, err = d:lpush("l", true)
            assert(n == nil and err == "bad value type")
            assert(d:llen("l") == 3)
            local v, e = d:get("l")
            assert(v == nil and e == "value is a list")
            assert(d:lpop("l") == 1)
            assert(d:rpop("l") == "c")
            assert(d:rpop("l") == "b")
            assert(d:rpop("l") == nil)
            d:set("s", "x")
            n, err = d:lpush("s", 1)
            assert(n == nil and err == "value not a list")
            n, err = d:lpop("s")
            assert(n == nil and err == "value not a list")
            n, err = d:llen("s")
            assert(n == nil and err == "value not a list")
        "##);
    }

    #[test]
    fn shdict_flush_keys_capacity_and_eviction() {
        run(r##"
            local d = ngx.shared.cache
            for i = 1, 2000 do d:set("k" .. i, i) end
            assert(#d:get_keys() == 1024)
            assert(#d:get_keys(0) == 2000)
            assert(#d:get_keys(5) == 5)
            d:set("short", 1, 0.01)
            test_sleep(0.03)
            assert(d:flush_expired() == 1)
            d:flush_all()
            assert(d:get("k1") == nil)
            assert(#d:get_keys(0) == 0)
            local v, _, stale = d:get_stale("k1")
            assert(v == 1 and stale == true)
            assert(d:flush_expired(10) == 10)
            assert(d:flush_expired(0) == 1990)
            assert(d:capacity() == 1048576)
            assert(d:free_space() == 1048576)

            local t = ngx.shared.tiny
            local big = string.rep("x", 3000)
            assert(t:set("a", big) == true)
            assert(t:set("b", big) == true)
            local ok, err = t:safe_set("c", big)
            assert(ok == nil and err == "no memory", err)
            local ok2, err2, forcible = t:set("c", big)
            assert(ok2 == true and err2 == nil and forcible == true)
            assert(t:get("a") == nil and t:get("b") == big and t:get("c") == big)
            ok, err = t:set("huge", string.rep("x", 9000))
            assert(ok == false and err == "no memory", err)
        "##);
    }
}
