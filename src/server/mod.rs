//! Processes and sockets: the main thread loads the configuration, binds listeners, starts one
//! worker thread per `worker_processes` (each with its own current-thread tokio runtime, Lua
//! state and `SO_REUSEPORT` sockets) and turns signals into reload and shutdown, as nginx's
//! master does.

pub mod conn;
pub mod listen;
pub mod worker;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::conf::{self, Config, LoadOptions};
use crate::log::{self as elog, Level};
use crate::proxy::upstream::{health::Checker, UpstreamSet};
use crate::shdict::{Zone, Zones};

/// Stack of a worker thread: as much as a process's main thread gets on Linux.
const WORKER_STACK: usize = 8 << 20;

static EXITING: AtomicBool = AtomicBool::new(false);

/// `ngx.worker.exiting()`: true once a shutdown or reload has begun for this generation.
pub fn exiting() -> bool {
    EXITING.load(Ordering::Relaxed)
}

/// Messages from the main thread to a worker.
pub enum Control {
    /// A new configuration with its zones, upstreams and this worker's listening sockets.
    Reload(
        Arc<Config>,
        Zones,
        Arc<UpstreamSet>,
        Vec<(SocketAddr, std::net::TcpListener)>,
    ),
    /// Stop accepting, finish in-flight requests, exit.
    Quit,
}

/// Zones for a configuration, reusing the running ones of the same name (their data survives
/// a reload, as nginx's shared memory does).
pub fn make_zones(cfg: &Config, old: Option<&Zones>) -> Zones {
    let mut m = HashMap::new();
    for (name, size) in &cfg.http.lua.shared_dicts {
        let z = old
            .and_then(|o| o.get(name).cloned())
            .unwrap_or_else(|| Arc::new(Zone::new(name, *size)));
        m.insert(name.clone(), z);
    }
    Arc::new(m)
}

/// Every distinct listen address of a configuration.
pub fn listen_addrs(cfg: &Config) -> Vec<(SocketAddr, i32)> {
    let mut v: Vec<(SocketAddr, i32)> = Vec::new();
    for s in &cfg.http.servers {
        for l in &s.listens {
            if !v.iter().any(|(a, _)| *a == l.addr) {
                v.push((l.addr, l.backlog));
            }
        }
    }
    v
}

/// Run the server in the foreground until a stop signal. Returns the exit code.
pub fn run(opts: LoadOptions) -> i32 {
    let cfg = match conf::build::load(&opts) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("nginx: [emerg] {}", e);
            return 1;
        }
    };
    if let Err(e) = elog::open(&cfg.error_log.0, &cfg.error_log.1) {
        eprintln!(
            "nginx: [alert] could not open error log file: open() \"{}\" failed ({})",
            cfg.error_log.0.display(),
            e
        );
    }
    elog::install_tracing();
    for n in &cfg.notices {
        elog::log(Level::Notice, None, n);
    }
    let zones = make_zones(&cfg, None);
    let upstreams = UpstreamSet::build(&cfg, None);
    let addrs = listen_addrs(&cfg);
    for (addr, _) in &addrs {
        if let Err(e) = listen::probe(*addr) {
            let msg = format!(
                "bind() to {} failed ({}: {})",
                addr,
                e.raw_os_error().unwrap_or(0),
                e
            );
            elog::log(Level::Emerg, None, &msg);
            eprintln!("nginx: [emerg] {}", msg);
            return 1;
        }
    }
    let workers = cfg.worker_processes;
    let mut handles = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for id in 0..workers {
        let mut socks = Vec::new();
        for (addr, backlog) in &addrs {
            match listen::bind(*addr, *backlog) {
                Ok(l) => socks.push((*addr, l)),
                Err(e) => {
                    let msg = format!(
                        "bind() to {} failed ({}: {})",
                        addr,
                        e.raw_os_error().unwrap_or(0),
                        e
                    );
                    elog::log(Level::Emerg, None, &msg);
                    eprintln!("nginx: [emerg] {}", msg);
                    return 1;
                }
            }
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cfg2 = cfg.clone();
        let zones2 = zones.clone();
        let ups2 = upstreams.clone();
        let ready = ready_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("worker-{}", id))
            // A request's phases run on hyper's stack (the connection task polls them) and
            // nested subrequests poll each other recursively: 50 levels of
            // ngx.location.capture need more than the 2 MiB default of a spawned thread.
            // Only touched pages cost memory.
            .stack_size(WORKER_STACK)
            .spawn(move || worker::main(id, workers, cfg2, zones2, ups2, socks, rx, ready));
        match h {
            Ok(h) => handles.push((h, tx)),
            Err(e) => {
                eprintln!("nginx: [emerg] could not start worker thread: {}", e);
                return 1;
            }
        }
    }
    drop(ready_tx);
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                elog::log(Level::Emerg, None, &e);
                eprintln!("nginx: [emerg] {}", e);
                return 1;
            }
            Err(_) => return 1,
        }
    }
    // One health checker per process, outside the workers' request paths.
    let checker = Checker::start(&upstreams);
    let code = master_loop(opts, cfg, zones, (upstreams, checker), &handles);
    for (h, _) in handles {
        let _ = h.join();
    }
    code
}

/// Write the pid file and say we started.
fn write_pid(cfg: &Config, workers: usize) {
    if let Some(dir) = cfg.pid.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&cfg.pid, format!("{}\n", std::process::id())) {
        elog::log(
            Level::Emerg,
            None,
            &format!("open() \"{}\" failed ({})", cfg.pid.display(), e),
        );
    }
    elog::log(
        Level::Notice,
        None,
        &format!("tidegate/{} started, {} worker(s)", crate::VERSION, workers),
    );
}

/// The signal loop of the main thread.
fn master_loop(
    opts: LoadOptions,
    mut cfg: Arc<Config>,
    mut zones: Zones,
    (mut upstreams, mut checker): (Arc<UpstreamSet>, Option<Checker>),
    workers: &[(
        std::thread::JoinHandle<()>,
        tokio::sync::mpsc::UnboundedSender<Control>,
    )],
) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nginx: [emerg] {}", e);
            return 1;
        }
    };
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut hup), Ok(mut quit), Ok(mut term), Ok(mut int), Ok(mut usr1)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::user_defined1()),
        ) else {
            return 1;
        };
        // The pid file appears only once the signal handlers are in place: whoever reads it
        // may signal at once, and SIGQUIT's default action would kill us.
        write_pid(&cfg, workers.len());
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    elog::log(Level::Notice, None, "signal 1 (SIGHUP) received, reconfiguring");
                    match reload(&opts, &cfg, &zones, &upstreams, workers) {
                        Ok((c, z, u)) => {
                            cfg = c;
                            zones = z;
                            upstreams = u;
                            if let Some(old) = checker.take() {
                                old.stop();
                            }
                            checker = Checker::start(&upstreams);
                        }
                        Err(e) => elog::log(Level::Emerg, None, &e),
                    }
                }
                _ = usr1.recv() => {
                    elog::log(Level::Notice, None, "signal 10 (SIGUSR1) received, reopening logs");
                    crate::http::accesslog::reopen();
                    let _ = elog::open(&cfg.error_log.0, &cfg.error_log.1);
                }
                _ = quit.recv() => {
                    elog::log(Level::Notice, None, "signal 3 (SIGQUIT) received, shutting down");
                    EXITING.store(true, Ordering::Relaxed);
                    for (_, tx) in workers {
                        let _ = tx.send(Control::Quit);
                    }
                    let _ = std::fs::remove_file(&cfg.pid);
                    return 0;
                }
                _ = term.recv() => {
                    elog::log(Level::Notice, None, "signal 15 (SIGTERM) received, exiting");
                    let _ = std::fs::remove_file(&cfg.pid);
                    std::process::exit(0);
                }
                _ = int.recv() => {
                    elog::log(Level::Notice, None, "signal 2 (SIGINT) received, exiting");
                    let _ = std::fs::remove_file(&cfg.pid);
                    std::process::exit(0);
                }
            }
        }
    })
}

type WorkerHandles = [(
    std::thread::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedSender<Control>,
)];

/// Load and check a new configuration and hand it to every worker; the old one keeps serving
/// when the new one is broken.
fn reload(
    opts: &LoadOptions,
    old: &Arc<Config>,
    old_zones: &Zones,
    old_upstreams: &Arc<UpstreamSet>,
    workers: &WorkerHandles,
) -> Result<(Arc<Config>, Zones, Arc<UpstreamSet>), String> {
    let cfg = Arc::new(conf::build::load(opts).map_err(|e| e.to_string())?);
    let old_addrs: Vec<SocketAddr> = listen_addrs(old).into_iter().map(|(a, _)| a).collect();
    let addrs = listen_addrs(&cfg);
    for (addr, _) in &addrs {
        if !old_addrs.contains(addr) {
            listen::probe(*addr).map_err(|e| {
                format!(
                    "bind() to {} failed ({}: {})",
                    addr,
                    e.raw_os_error().unwrap_or(0),
                    e
                )
            })?;
        }
    }
    let zones = make_zones(&cfg, Some(old_zones));
    let upstreams = UpstreamSet::build(&cfg, Some(old_upstreams));
    if cfg.error_log != old.error_log {
        let _ = elog::open(&cfg.error_log.0, &cfg.error_log.1);
    }
    crate::http::accesslog::reopen();
    for (_, tx) in workers {
        let mut socks = Vec::new();
        for (addr, backlog) in &addrs {
            if !old_addrs.contains(addr) {
                let l = listen::bind(*addr, *backlog)
                    .map_err(|e| format!("bind() to {} failed ({})", addr, e))?;
                socks.push((*addr, l));
            }
        }
        let _ = tx.send(Control::Reload(
            cfg.clone(),
            zones.clone(),
            upstreams.clone(),
            socks,
        ));
    }
    Ok((cfg, zones, upstreams))
}
