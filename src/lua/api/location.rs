//! `ngx.location.capture` and `ngx.location.capture_multi`: subrequests whose responses come
//! back to Lua as `{status, header, body, truncated}` tables. The options are read here; the
//! subrequest itself (a request sharing the parent's connection, run through the same phases,
//! output captured) belongs to `crate::http::subrequest`.

use std::rc::Rc;

use bytes::Bytes;
use http::Method;
use mlua::{Lua, MultiValue, Table, Value};

use crate::http::request::{Phase, ReqCtx};
use crate::http::subrequest::{self, Captured, Spec, VarsMode};
use crate::lua::request::{check_phase, current};

/// Every phase that has a request: each runs as a coroutine here, so a subrequest can be waited
/// for in all of them (OpenResty allows only rewrite, access and content).
const CAPTURE_PHASES: &[Phase] = &[
    Phase::Set,
    Phase::ServerRewrite,
    Phase::Rewrite,
    Phase::Access,
    Phase::Content,
    Phase::HeaderFilter,
    Phase::BodyFilter,
    Phase::Log,
];

/// Registry name of the metatable that lets `res.header` be read case-insensitively.
const HEADER_MT: &str = "tidegate.capture_header_mt";

/// Lua's own name for a value's type (mlua says "integer" for some numbers).
fn lua_type(v: &Value) -> &'static str {
    match v {
        Value::Integer(_) => "number",
        other => other.type_name(),
    }
}

fn err(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::runtime(msg.into())
}

/// Bytes of a string or number argument (Lua's `tostring` rules for numbers).
fn string_like(v: &Value) -> Option<Bytes> {
    match v {
        Value::String(s) => Some(Bytes::copy_from_slice(&s.as_bytes())),
        Value::Integer(i) => Some(Bytes::from(i.to_string())),
        Value::Number(n) => Some(Bytes::from(super::output::format_number(*n))),
        _ => None,
    }
}

fn method_from(v: Value) -> mlua::Result<Method> {
    let name = match v {
        Value::Nil => return Ok(Method::GET),
        Value::Integer(i) => number_method(i)?,
        Value::Number(n) => number_method(n as i64)?,
        Value::String(s) => {
            let s = s.to_str()?.to_string();
            super::req::METHODS
                .iter()
                .find(|(n, _)| *n == s)
                .map(|(n, _)| *n)
                .ok_or_else(|| err("Bad http request method"))?
        }
        _ => return Err(err("Bad http request method")),
    };
    Method::from_bytes(name.as_bytes()).map_err(|_| err("Bad http request method"))
}

fn number_method(m: i64) -> mlua::Result<&'static str> {
    super::req::METHODS
        .iter()
        .find(|(_, v)| *v == m)
        .map(|(n, _)| *n)
        .ok_or_else(|| err(format!("unsupported HTTP method: {}", m)))
}

fn bool_option(opts: &Table, name: &str) -> mlua::Result<bool> {
    match opts.raw_get::<Value>(name)? {
        Value::Nil => Ok(false),
        Value::Boolean(b) => Ok(b),
        _ => Err(err(format!("Bad {} option value", name))),
    }
}

/// One `{uri, opts?}` query of `capture_multi` (`index` is 0-based in the messages, as in
/// lua-nginx-module).
fn parse_query(lua: &Lua, query: Value, index: usize) -> mlua::Result<Spec> {
    let q = match query {
        Value::Nil => return Err(err("only array-like tables are allowed")),
        Value::Table(t) => t,
        other => {
            return Err(err(format!(
                "the query argument {} is not a table, but a {}",
                index,
                lua_type(&other)
            )))
        }
    };
    let n = q.raw_len();
    if n != 1 && n != 2 {
        return Err(err(format!(
            "query argument {} expecting one or two arguments",
            index
        )));
    }
    let uri = match q.raw_get::<Value>(1)? {
        Value::String(s) => s.to_str()?.to_string(),
        Value::Integer(i) => i.to_string(),
        Value::Number(f) => super::output::format_number(f),
        other => {
            return Err(err(format!(
                "bad argument #1 to 'capture' (string expected, got {})",
                lua_type(&other)
            )))
        }
    };
    let mut spec = Spec {
        method: Method::GET,
        uri: String::new(),
        args: None,
        body: None,
        always_forward_body: false,
        vars_mode: VarsMode::Own,
        vars: Vec::new(),
        ctx: None,
    };
    let mut extra_args: Option<String> = None;
    if n == 2 {
        let opts = match q.raw_get::<Value>(2)? {
            Value::Table(t) => t,
            other => {
                return Err(err(format!(
                    "expecting table as the 2nd argument for subrequest {}, but got {}",
                    index,
                    lua_type(&other)
                )))
            }
        };
        extra_args = match opts.raw_get::<Value>("args")? {
            Value::Nil => None,
            Value::Table(t) => Some(super::req::encode_args(lua, t)?),
            v => match string_like(&v) {
                Some(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                None => return Err(err("Bad args option value")),
            },
        };
        match opts.raw_get::<Value>("vars")? {
            Value::Nil => {}
            Value::Table(t) => {
                for pair in t.pairs::<Value, Value>() {
                    let (k, v) = pair?;
                    let Value::String(k) = k else {
                        return Err(err(
                            "attempt to use a non-string key in the \"vars\" option table",
                        ));
                    };
                    let Some(v) = string_like(&v) else {
                        return Err(err(format!(
                            "attempt to use bad variable value type {}",
                            lua_type(&v)
                        )));
                    };
                    spec.vars.push((k.to_str()?.to_string(), v));
                }
            }
            _ => return Err(err("Bad vars option value")),
        }
        // share_all_vars wins over copy_all_vars, as documented.
        if bool_option(&opts, "share_all_vars")? {
            spec.vars_mode = VarsMode::Share;
        } else if bool_option(&opts, "copy_all_vars")? {
            spec.vars_mode = VarsMode::Copy;
        }
        spec.always_forward_body = opts
            .raw_get::<Value>("always_forward_body")?
            .as_boolean()
            .unwrap_or(false);
        spec.method = method_from(opts.raw_get::<Value>("method")?)?;
        match opts.raw_get::<Value>("ctx")? {
            Value::Nil => {}
            Value::Table(t) => spec.ctx = Some(lua.create_registry_value(t)?),
            other => {
                return Err(err(format!(
                    "Bad ctx option value type {}, expected a Lua table",
                    lua_type(&other)
                )))
            }
        }
        match opts.raw_get::<Value>("body")? {
            Value::Nil => {}
            v => match string_like(&v) {
                Some(b) => spec.body = Some(b),
                None => return Err(err("Bad http request body")),
            },
        }
    }
    if subrequest::unsafe_uri(&uri) {
        return Err(err(format!("unsafe uri in argument #1: {}", uri)));
    }
    let (path, inline_args) = match uri.split_once('?') {
        Some((p, a)) => (p.to_string(), Some(a.to_string()).filter(|a| !a.is_empty())),
        None => (uri, None),
    };
    spec.uri = path;
    spec.args = match (inline_args, extra_args.filter(|a| !a.is_empty())) {
        (Some(a), Some(e)) => Some(format!("{}&{}", a, e)),
        (a, e) => a.or(e),
    };
    Ok(spec)
}

/// nginx's spelling of a header name (`content-type` -> `Content-Type`): hyper keeps names in
/// lower case, and `res.header` is a plain table that users index as `res.header["Set-Cookie"]`.
fn canonical(name: &str) -> String {
    match name {
        "etag" => return "ETag".into(),
        "www-authenticate" => return "WWW-Authenticate".into(),
        _ => {}
    }
    let mut out = String::with_capacity(name.len());
    let mut up = true;
    for c in name.chars() {
        out.push(if up { c.to_ascii_uppercase() } else { c });
        up = c == '-';
    }
    out
}

fn result_table(lua: &Lua, c: Captured) -> mlua::Result<Table> {
    let res = lua.create_table_with_capacity(0, 4)?;
    res.raw_set("status", c.status)?;
    let header = lua.create_table()?;
    for name in c.headers.keys() {
        let vals: Vec<_> = c.headers.get_all(name).iter().collect();
        let key = canonical(name.as_str());
        if let [one] = vals.as_slice() {
            header.raw_set(key, lua.create_string(one.as_bytes())?)?;
        } else {
            let arr = lua.create_table_with_capacity(vals.len(), 0)?;
            for v in vals {
                arr.raw_push(lua.create_string(v.as_bytes())?)?;
            }
            header.raw_set(key, arr)?;
        }
    }
    header.set_metatable(Some(lua.named_registry_value::<Table>(HEADER_MT)?))?;
    res.raw_set("header", header)?;
    res.raw_set("body", lua.create_string(&c.body)?)?;
    res.raw_set("truncated", c.truncated)?;
    Ok(res)
}

/// Make every subrequest, run them concurrently, and return their results in order.
async fn capture_all(lua: &Lua, specs: Vec<Spec>) -> mlua::Result<MultiValue> {
    check_phase(lua, CAPTURE_PHASES)?;
    let rc: Rc<ReqCtx> = current(lua)?;
    let mut srs = Vec::with_capacity(specs.len());
    for spec in specs {
        srs.push(subrequest::create(&rc, spec).await.map_err(err)?);
    }
    // One future for all: if the parent's handler is abandoned (ngx.exit from elsewhere, a
    // client abort), its subrequests are dropped with it, as nginx finalizes them with the main
    // request.
    let results = futures_util::future::join_all(srs.into_iter().map(subrequest::run)).await;
    let mut out = MultiValue::with_capacity(results.len());
    for c in results {
        out.push_back(Value::Table(result_table(lua, c)?));
    }
    Ok(out)
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|_, (t, k): (Table, Value)| {
            let Value::String(k) = k else {
                return Ok(Value::Nil);
            };
            let norm = canonical(&k.to_str()?.to_ascii_lowercase().replace('_', "-"));
            t.raw_get::<Value>(norm)
        })?,
    )?;
    lua.set_named_registry_value(HEADER_MT, mt)?;

    let location = lua.create_table()?;
    location.set(
        "capture",
        lua.create_async_function(|lua, args: MultiValue| async move {
            if args.is_empty() || args.len() > 2 {
                return Err(err("expecting one or two arguments"));
            }
            let q = lua.create_sequence_from(args)?;
            let spec = parse_query(&lua, Value::Table(q), 0)?;
            let mut out = capture_all(&lua, vec![spec]).await?;
            Ok(out.pop_front().unwrap_or(Value::Nil))
        })?,
    )?;
    location.set(
        "capture_multi",
        lua.create_async_function(|lua, args: MultiValue| async move {
            if args.len() != 1 {
                return Err(err(format!(
                    "only one argument is expected, but got {}",
                    args.len()
                )));
            }
            let Some(Value::Table(queries)) = args.into_iter().next() else {
                return Err(err("bad argument #1 to 'capture_multi' (table expected)"));
            };
            let n = queries.raw_len();
            if n == 0 {
                return Err(err("at least one subrequest should be specified"));
            }
            let mut specs = Vec::with_capacity(n);
            for i in 0..n {
                specs.push(parse_query(&lua, queries.raw_get::<Value>(i + 1)?, i)?);
            }
            capture_all(&lua, specs).await
        })?,
    )?;
    ngx.set("location", location)
}

#[cfg(test)]
mod tests {
    use super::canonical;

    #[test]
    fn header_names_in_nginx_case() {
        assert_eq!(canonical("content-type"), "Content-Type");
        assert_eq!(canonical("set-cookie"), "Set-Cookie");
        assert_eq!(canonical("x-a-b"), "X-A-B");
        assert_eq!(canonical("etag"), "ETag");
    }
}
