//! `ngx.var`: read any nginx variable, write those declared with `set` (and `$args`, `$uri`
//! is read-only as in nginx; `$args` and `$limit_rate`-style writable built-ins are handled).

use bytes::Bytes;
use mlua::{Lua, Table, Value};

use crate::lua::request::current;

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let var = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|lua, (_t, key): (Table, Value)| {
            let rc = current(lua)?;
            let name = match &key {
                Value::String(s) => s.to_str()?.to_ascii_lowercase(),
                Value::Integer(i) => {
                    let cap = rc
                        .st
                        .borrow()
                        .captures
                        .get((*i).max(0) as usize)
                        .cloned()
                        .flatten();
                    return match cap {
                        Some(c) => Ok(Value::String(lua.create_string(&c)?)),
                        None => Ok(Value::Nil),
                    };
                }
                _ => return Err(mlua::Error::runtime("bad variable name")),
            };
            let v = crate::http::variables::get(&rc, &rc.st.borrow(), &name);
            match v {
                Some(v) => Ok(Value::String(lua.create_string(&v)?)),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    mt.set(
        "__newindex",
        lua.create_function(|lua, (_t, key, value): (Table, mlua::LuaString, Value)| {
            let rc = current(lua)?;
            let name = key.to_str()?.to_ascii_lowercase();
            let v: Option<Bytes> = match value {
                Value::Nil => None,
                Value::String(s) => Some(Bytes::copy_from_slice(&s.as_bytes())),
                Value::Integer(i) => Some(Bytes::from(i.to_string())),
                Value::Number(n) => Some(Bytes::from(super::output::format_number(n))),
                other => return Err(mlua::Error::runtime(format!("bad variable value type \"{}\"", other.type_name()))),
            };
            let mut st = rc.st.borrow_mut();
            match name.as_str() {
                "args" | "query_string" => {
                    st.args = v.map(|b| String::from_utf8_lossy(&b).into_owned());
                    return Ok(());
                }
                "status" => return Err(mlua::Error::runtime("variable \"status\" not changeable")),
                _ => {}
            }
            if !rc.env.declared.contains(&name) {
                if crate::http::variables::is_builtin(&name) || crate::http::variables::get(&rc, &st, &name).is_some() {
                    return Err(mlua::Error::runtime(format!("variable \"{}\" not changeable", name)));
                }
                return Err(mlua::Error::runtime(format!("variable \"{}\" not found for writing; maybe it is a built-in variable that is not changeable or you forgot to use \"set ${} '';\" in the config file to define it first", name, name)));
            }
            st.vars.insert(name, v.unwrap_or_default());
            Ok(())
        })?,
    )?;
    var.set_metatable(Some(mt))?;
    ngx.set("var", var)
}
