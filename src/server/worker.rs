//! One worker thread: a current-thread runtime, a `LocalSet`, its Lua state, its sockets.
//! Connections are served with `spawn_local` because the Lua state is not `Send`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, LocalSet};

use super::conn::{self, ConnBody, ConnState};
use super::Control;
use crate::conf::Config;
use crate::http::request::{ConnInfo, Env, Phase};
use crate::log::{self as elog, Level};
use crate::lua::vm::{LuaVm, VmOptions};
use crate::proxy::upstream::UpstreamSet;
use crate::shdict::Zones;

/// nginx's connection numbers are unique per process.
static CONN_IDS: AtomicU64 = AtomicU64::new(1);

struct Worker {
    id: usize,
    count: usize,
    env: RefCell<Rc<Env>>,
    active: Cell<usize>,
    shutdown: watch::Sender<bool>,
}

/// Build a generation: a Lua state with init_by_lua and init_worker_by_lua run.
async fn build_env(
    id: usize,
    count: usize,
    cfg: Arc<Config>,
    zones: Zones,
    upstreams: Arc<UpstreamSet>,
) -> Result<Rc<Env>, String> {
    let opts = VmOptions {
        prefix: cfg.prefix.clone(),
        package_path: cfg.http.lua.package_path.clone(),
        package_cpath: cfg.http.lua.package_cpath.clone(),
        zones,
        worker_id: Some(id),
        worker_count: count,
    };
    let vm = LuaVm::new(&opts).map_err(|e| format!("failed to create Lua state: {}", e))?;
    crate::lua::api::timer::configure(
        &vm.lua,
        cfg.http.lua.max_pending_timers,
        cfg.http.lua.max_running_timers,
    );
    vm.lua
        .set_app_data(crate::proxy::upstream::LuaUpstreams(upstreams.clone()));
    // Cosockets used without a request (timers, init_worker) take the http-level settings.
    if let Some(c) = &cfg.http.conf {
        vm.lua
            .set_app_data(crate::lua::api::socket_tcp::HttpConf(c.clone()));
    }
    if let Some(init) = &cfg.http.lua.init {
        run_chunk(&vm, init, Phase::Init)
            .await
            .map_err(|e| format!("init_by_lua error: {}", e))?;
    }
    if let Some(iw) = &cfg.http.lua.init_worker {
        if let Err(e) = run_chunk(&vm, iw, Phase::InitWorker).await {
            elog::log(
                Level::Error,
                None,
                &format!("init_worker_by_lua error: {}", e),
            );
        }
    }
    let declared: crate::NameSet<String> = cfg.http.declared_vars.iter().cloned().collect();
    let watch_client_abort = super::conn::watches_client_abort(&cfg);
    Ok(Rc::new(Env {
        watch_client_abort,
        cfg,
        vm: Rc::new(vm),
        worker_id: id,
        declared,
        upstreams,
    }))
}

/// Run a request-less chunk (init, init_worker) as a coroutine.
async fn run_chunk(
    vm: &LuaVm,
    chunk: &crate::conf::model::LuaChunk,
    phase: Phase,
) -> Result<(), String> {
    let f = vm
        .handler(chunk)
        .map_err(|e| crate::lua::phase::error_text(&e))?;
    crate::lua::phase::run_detached(&vm.lua, &f, mlua::MultiValue::new(), phase).await
}

/// The worker thread's entry point.
#[allow(clippy::too_many_arguments)]
pub fn main(
    id: usize,
    count: usize,
    cfg: Arc<Config>,
    zones: Zones,
    upstreams: Arc<UpstreamSet>,
    socks: Vec<(SocketAddr, std::net::TcpListener)>,
    mut rx: mpsc::UnboundedReceiver<Control>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    elog::set_worker(id);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // One clock reading per event-loop turn serves the whole turn (src/clock.rs).
        .on_thread_unpark(crate::clock::turn)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("worker runtime: {}", e)));
            return;
        }
    };
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let env = match build_env(id, count, cfg.clone(), zones, upstreams).await {
            Ok(e) => e,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let (shutdown, _) = watch::channel(false);
        let _adopting = Adopting::start();
        let w = Rc::new(Worker {
            id,
            count,
            env: RefCell::new(env),
            active: Cell::new(0),
            shutdown,
        });
        let mut accepts: HashMap<SocketAddr, JoinHandle<()>> = HashMap::new();
        for (addr, l) in socks {
            match TcpListener::from_std(l) {
                Ok(l) => {
                    accepts.insert(addr, tokio::task::spawn_local(accept_loop(w.clone(), l)));
                }
                Err(e) => {
                    let _ = ready.send(Err(format!("listen on {}: {}", addr, e)));
                    return;
                }
            }
        }
        let _ = ready.send(Ok(()));
        while let Some(msg) = rx.recv().await {
            match msg {
                Control::Reload(cfg, zones, upstreams, socks) => {
                    match build_env(w.id, w.count, cfg.clone(), zones, upstreams).await {
                        Ok(env) => {
                            // In-flight requests keep their Rc<Env>: they finish on the old state.
                            // The old state's pending timers fire now, premature.
                            let old = std::mem::replace(&mut *w.env.borrow_mut(), env);
                            crate::lua::api::timer::shutdown(&old.vm.lua);
                        }
                        Err(e) => {
                            elog::log(
                                Level::Emerg,
                                None,
                                &format!("reload failed, keeping the old configuration: {}", e),
                            );
                            continue;
                        }
                    }
                    let wanted: Vec<SocketAddr> = super::listen_addrs(&cfg)
                        .into_iter()
                        .map(|(a, _)| a)
                        .collect();
                    accepts.retain(|addr, h| {
                        let keep = wanted.contains(addr);
                        if !keep {
                            h.abort();
                        }
                        keep
                    });
                    for (addr, l) in socks {
                        if let Ok(l) = TcpListener::from_std(l) {
                            accepts
                                .insert(addr, tokio::task::spawn_local(accept_loop(w.clone(), l)));
                        }
                    }
                }
                Control::Quit => break,
            }
        }
        // Graceful shutdown: stop accepting, let connections finish their current request.
        for (_, h) in accepts.drain() {
            h.abort();
        }
        let _ = w.shutdown.send(true);
        // Pending timers fire now with premature = true; their callbacks may still run.
        let lua = w.env.borrow().vm.lua.clone();
        crate::lua::api::timer::shutdown(&lua);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while (w.active.get() > 0 || crate::lua::api::timer::busy(&lua) > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

async fn accept_loop(w: Rc<Worker>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: nginx logs and keeps accepting after a pause.
                elog::log(Level::Alert, None, &format!("accept() failed ({})", e));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let limit = w.env.borrow().cfg.worker_connections;
        if w.active.get() >= limit {
            elog::log(
                Level::Alert,
                None,
                &format!("{} worker_connections are not enough", limit),
            );
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let conn = Rc::new(ConnInfo {
            id: CONN_IDS.fetch_add(1, Ordering::Relaxed),
            remote: peer,
            local,
            requests: Cell::new(0),
            send_timeout_ms: Cell::new(60_000),
        });
        w.active.set(w.active.get() + 1);
        let w2 = w.clone();
        tokio::task::spawn_local(async move {
            // A guard: a request that panics while the connection polls it ends the
            // connection's task, and its slot must still be given back.
            let _slot = Slot(w2.clone());
            serve_conn(&w2, conn, stream).await;
        });
    }
}

/// One of `worker_connections`, taken while a connection is served.
struct Slot(Rc<Worker>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get().saturating_sub(1));
    }
}

/// Lets walks that lose their connection become tasks while the worker's `LocalSet` runs
/// (see `engine::orphan`), and stops it however the worker's run ends.
struct Adopting;

impl Adopting {
    fn start() -> Adopting {
        crate::http::engine::adopt_orphans(true);
        Adopting
    }
}

impl Drop for Adopting {
    fn drop(&mut self) {
        crate::http::engine::adopt_orphans(false);
    }
}

async fn serve_conn(w: &Rc<Worker>, conn: Rc<ConnInfo>, stream: tokio::net::TcpStream) {
    // The header timer also runs while a keep-alive connection waits for its next request,
    // so it serves as keepalive_timeout (0 turns keep-alive off, as in nginx).
    let (keepalive_ms, send_timeout, half_close) = {
        let env = w.env.borrow();
        let first = env.cfg.http.servers.first().map(|s| &s.conf);
        let ka = first.map(|c| c.keepalive_timeout_ms).unwrap_or(75_000);
        let send = first.map(|c| c.send_timeout_ms).unwrap_or(60_000);
        (ka, send, !env.watch_client_abort)
    };
    // The server default, until a response says which location answers it.
    conn.send_timeout_ms.set(send_timeout);
    let header_timeout = Duration::from_millis(keepalive_ms.max(1000));
    let keepalive = keepalive_ms > 0;
    let state = ConnState::new();
    let _watchdog = conn::AbortOnDrop(tokio::task::spawn_local(conn::watchdog(
        state.clone(),
        conn.clone(),
        header_timeout,
        w.shutdown.subscribe(),
    )));
    let w2 = w.clone();
    let c2 = conn.clone();
    let s2 = state.clone();
    let svc = service_fn(move |req| {
        s2.request_started();
        // Until this request's response says which location answers (error answers made
        // before that keep the server default, not the previous request's location).
        c2.send_timeout_ms.set(send_timeout);
        let env = w2.env.borrow().clone();
        let head = crate::http::engine::serve(env, c2.clone(), req);
        let state = s2.clone();
        async move {
            let resp = head.await;
            Ok::<_, std::convert::Infallible>(resp.map(|b| ConnBody::new(b, state)))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        // One flat buffer per response: measured 1-5% less CPU per request than writev with
        // separate head and body slices (bench/results/ab-writev-vs-flat.md).
        .writev(false)
        .keep_alive(keepalive)
        // Without lua_check_client_abort nothing needs to learn mid-request that the client
        // left (nginx too only notices when it writes): hyper then skips a read per request.
        .half_close(half_close)
        .max_buf_size(32 * 1024);
    // with_upgrades: the proxy tunnels WebSocket connections after a 101.
    let c = builder
        .serve_connection(TokioIo::new(conn::Tracked::new(stream, &state)), svc)
        .with_upgrades();
    tokio::pin!(c);
    let end = conn::Watched::new(c, &state, |c| c.graceful_shutdown()).await;
    if let conn::End::Done(Err(e)) = end {
        tracing::debug!(conn = conn.id, "connection error: {}", e);
    }
}
