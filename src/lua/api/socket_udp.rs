//! `ngx.socket.udp()`: lua-nginx-module's UDP (and datagram unix socket) cosocket:
//! `setpeername`, `send`, `receive`, `settimeout`, `close`. Waits are tokio futures.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{Lua, MultiValue, Table, UserData, UserDataMethods, UserDataRef, Value};
use tokio::net::{UdpSocket, UnixDatagram};

use super::socket_tcp::{after_wait, conf_of, log_error, track, Orphan};
use crate::conf::model::LocConf;
use crate::net::stream;

/// OpenResty's largest (and default) datagram read.
const MAX_DGRAM: usize = 8192;

enum Dgram {
    Inet(UdpSocket),
    Unix(UnixDatagram),
}

#[derive(Default)]
pub struct Udp {
    sock: Option<Rc<Dgram>>,
    timeout_ms: Option<u64>,
    conf: Option<Arc<LocConf>>,
    owner: Option<Weak<crate::http::request::ReqCtx>>,
}

impl Orphan for RefCell<Udp> {
    fn close_orphan(&self) {
        if let Ok(mut u) = self.try_borrow_mut() {
            if u.owner.as_ref().is_some_and(|o| o.strong_count() == 0) {
                u.sock = None;
            }
        }
    }
}

impl Udp {
    fn read_timeout(&self) -> Duration {
        let d = self
            .conf
            .as_ref()
            .map(|c| c.lua_socket.read_timeout_ms)
            .unwrap_or(60_000);
        Duration::from_millis(self.timeout_ms.unwrap_or(d).max(1))
    }
}

/// The Lua object.
pub struct UdpSock(Rc<RefCell<Udp>>);

fn nil_err(lua: &Lua, err: &str) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Nil,
        Value::String(lua.create_string(err)?),
    ]))
}

fn ok1() -> MultiValue {
    MultiValue::from_vec(vec![Value::Integer(1)])
}

async fn setpeername(lua: Lua, u: Rc<RefCell<Udp>>, args: MultiValue) -> mlua::Result<MultiValue> {
    let mut it = args.into_iter();
    let target = match it.next() {
        Some(Value::String(h)) => h.to_str()?.to_string(),
        _ => {
            return Err(mlua::Error::runtime(
                "bad argument #1 to 'setpeername' (string expected)",
            ))
        }
    };
    let conf = conf_of(&lua);
    {
        let mut st = u.borrow_mut();
        st.sock = None;
        st.conf = conf.clone();
    }
    let made = if let Some(path) = target.strip_prefix("unix:") {
        UnixDatagram::unbound().and_then(|d| {
            d.connect(path)?;
            Ok(Dgram::Unix(d))
        })
    } else {
        let port = match it.next() {
            Some(Value::Integer(p)) if (0..=65535).contains(&p) => p as u16,
            Some(Value::Number(p)) if (0.0..=65535.0).contains(&p) => p as u16,
            Some(Value::Integer(p)) => return nil_err(&lua, &format!("bad port number: {}", p)),
            _ => {
                return Err(mlua::Error::runtime(
                    "bad argument #2 to 'setpeername' (number expected)",
                ))
            }
        };
        let timeout = {
            let st = u.borrow();
            let d = conf
                .as_ref()
                .map(|c| c.lua_socket.connect_timeout_ms)
                .unwrap_or(60_000);
            Duration::from_millis(st.timeout_ms.unwrap_or(d).max(1))
        };
        let resolver = conf.as_ref().and_then(|c| c.resolver.clone());
        let deadline = Instant::now() + timeout;
        let addrs = match tokio::time::timeout_at(
            deadline.into(),
            crate::net::resolve(resolver.as_ref(), &target, port),
        )
        .await
        {
            Err(_) => return nil_err(&lua, "timeout"),
            Ok(Err(e)) => {
                log_error(&lua, &conf, &e);
                return nil_err(&lua, &e);
            }
            Ok(Ok(a)) => a,
        };
        let addr = addrs[if addrs.len() > 1 {
            rand::random_range(0..addrs.len())
        } else {
            0
        }];
        let bind: std::net::SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        match UdpSocket::bind(bind).await {
            Ok(s) => s.connect(addr).await.map(|_| Dgram::Inet(s)),
            Err(e) => Err(e),
        }
    };
    match made {
        Ok(d) => {
            let owner = crate::lua::request::try_current(&lua).map(|rc| Rc::downgrade(&rc));
            {
                let mut st = u.borrow_mut();
                st.sock = Some(Rc::new(d));
                st.owner = owner.clone();
            }
            if let Some(o) = owner {
                let weak: Weak<dyn Orphan> = Rc::downgrade(&u) as Weak<dyn Orphan>;
                track(o, weak);
            }
            Ok(ok1())
        }
        Err(e) => {
            log_error(
                &lua,
                &conf,
                &format!(
                    "connect() to {} failed ({})",
                    target,
                    stream::errno_text(&e)
                ),
            );
            nil_err(&lua, &stream::error_text(&e))
        }
    }
}

async fn send(lua: Lua, u: Rc<RefCell<Udp>>, data: Value) -> mlua::Result<MultiValue> {
    let mut out = Vec::new();
    crate::lua::api::output::render(&mut out, &data, 0)
        .map_err(|e| mlua::Error::runtime(e.to_string().replace("'say'", "'send'")))?;
    let Some(sock) = u.borrow().sock.clone() else {
        return nil_err(&lua, "closed");
    };
    let r = match &*sock {
        Dgram::Inet(s) => s.send(&out).await,
        Dgram::Unix(s) => s.send(&out).await,
    };
    match r {
        Ok(_) => Ok(ok1()),
        Err(e) => nil_err(&lua, &stream::error_text(&e)),
    }
}

async fn receive(lua: Lua, u: Rc<RefCell<Udp>>, size: Option<f64>) -> mlua::Result<MultiValue> {
    let size = match size {
        None => MAX_DGRAM,
        Some(n) if n >= 0.0 => (n as usize).clamp(1, MAX_DGRAM),
        Some(_) => {
            return Err(mlua::Error::runtime(
                "bad argument #2 to 'receive' (bad size)",
            ))
        }
    };
    let (sock, timeout, conf) = {
        let st = u.borrow();
        let Some(sock) = st.sock.clone() else {
            return nil_err(&lua, "closed");
        };
        (sock, st.read_timeout(), st.conf.clone())
    };
    let mut buf = vec![0u8; size];
    let r = tokio::time::timeout(timeout, async {
        match &*sock {
            Dgram::Inet(s) => s.recv(&mut buf).await,
            Dgram::Unix(s) => s.recv(&mut buf).await,
        }
    })
    .await;
    match r {
        Ok(Ok(n)) => Ok(MultiValue::from_vec(vec![Value::String(
            lua.create_string(&buf[..n])?,
        )])),
        Err(_) => {
            log_error(&lua, &conf, "lua udp socket read timed out");
            nil_err(&lua, "timeout")
        }
        Ok(Err(e)) => {
            log_error(
                &lua,
                &conf,
                &format!("recv() failed ({})", stream::errno_text(&e)),
            );
            nil_err(&lua, &stream::error_text(&e))
        }
    }
}

impl UserData for UdpSock {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_async_method(
            "setpeername",
            |lua, this: UserDataRef<UdpSock>, args: MultiValue| {
                let u = this.0.clone();
                async move { after_wait(setpeername(lua, u, args).await) }
            },
        );
        m.add_async_method("send", |lua, this: UserDataRef<UdpSock>, data: Value| {
            let u = this.0.clone();
            async move { after_wait(send(lua, u, data).await) }
        });
        m.add_async_method(
            "receive",
            |lua, this: UserDataRef<UdpSock>, size: Option<f64>| {
                let u = this.0.clone();
                async move { after_wait(receive(lua, u, size).await) }
            },
        );
        m.add_method("settimeout", |_, this, t: Option<f64>| {
            this.0.borrow_mut().timeout_ms = t.filter(|t| *t > 0.0).map(|t| t as u64);
            Ok(())
        });
        m.add_method("close", |lua, this, ()| {
            if this.0.borrow_mut().sock.take().is_none() {
                return nil_err(lua, "closed");
            }
            Ok(ok1())
        });
    }
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let socket: Table = match ngx.get::<Option<Table>>("socket")? {
        Some(t) => t,
        None => {
            let t = lua.create_table()?;
            ngx.set("socket", &t)?;
            t
        }
    };
    socket.set(
        "udp",
        lua.create_function(|lua, ()| {
            lua.create_userdata(UdpSock(Rc::new(RefCell::new(Udp::default()))))
        })?,
    )?;
    Ok(())
}
