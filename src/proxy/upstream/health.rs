//! Active health checks (`health_check interval=2s timeout=1s uri=/health fails=3 passes=2
//! expect=200-399;`, tidegate's own directive). One checker per process, on a thread of its
//! own, outside every request path: each interval it probes all peers of an upstream at once
//! and writes the verdict into the peers' shared state, which every worker's picks read.
//!
//! A peer failing `fails` checks in a row is down until `passes` checks in a row succeed.
//! Peers start up (as nginx plus does without `mandatory`). State changes are logged:
//! `upstream "backend" peer 127.0.0.1:8081 is down (health check: status 500)`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{PeerSlot, Upstream, UpstreamSet};
use crate::conf::model::HealthCheck;
use crate::log::{self as elog, Level};

/// The running checker; dropping it (or [`Checker::stop`]) ends the thread after its current
/// round.
pub struct Checker {
    stop: watch::Sender<bool>,
}

impl Checker {
    /// Start checking every upstream of `set` that has a `health_check`; None when none has.
    pub fn start(set: &Arc<UpstreamSet>) -> Option<Checker> {
        let ups: Vec<Arc<Upstream>> = set
            .iter()
            .filter(|u| u.conf.health_check.is_some())
            .cloned()
            .collect();
        if ups.is_empty() {
            return None;
        }
        let (tx, rx) = watch::channel(false);
        let spawned = std::thread::Builder::new()
            .name("health-check".to_string())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        elog::log(Level::Alert, None, &format!("health check runtime: {}", e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let tasks: Vec<_> = ups
                        .into_iter()
                        .map(|u| tokio::spawn(run_upstream(u, rx.clone())))
                        .collect();
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            });
        if let Err(e) = spawned {
            elog::log(
                Level::Alert,
                None,
                &format!("could not start the health check thread: {}", e),
            );
            return None;
        }
        Some(Checker { stop: tx })
    }

    pub fn stop(self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn run_upstream(up: Arc<Upstream>, mut stop: watch::Receiver<bool>) {
    let Some(hc) = up.conf.health_check.clone() else {
        return;
    };
    loop {
        check_round(&up, &hc).await;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(hc.interval_ms)) => {}
            r = stop.wait_for(|v| *v) => { let _ = r; return; }
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Probe every peer of `up` once, concurrently, and record the results.
pub async fn check_round(up: &Upstream, hc: &HealthCheck) {
    let peers: Vec<&PeerSlot> = up.primary.iter().chain(up.backup.iter()).collect();
    let probes = peers.iter().map(|p| {
        let host = hc.host.clone().unwrap_or_else(|| p.host.to_string());
        probe(p.addr, host, hc)
    });
    let results = futures_util::future::join_all(probes).await;
    for (p, r) in peers.into_iter().zip(results) {
        record(up, p, hc, r);
    }
}

/// Count one result into the peer's streaks; flip its state when a streak is long enough.
pub fn record(up: &Upstream, p: &PeerSlot, hc: &HealthCheck, r: Result<(), String>) {
    let st = &p.st;
    match r {
        Ok(()) => {
            st.hc_fail_streak.store(0, Relaxed);
            let n = st.hc_pass_streak.fetch_add(1, Relaxed) + 1;
            if !st.healthy.load(Relaxed) && n >= hc.passes {
                st.healthy.store(true, Relaxed);
                // A peer back from the dead starts with a clean passive record.
                st.fails.store(0, Relaxed);
                elog::log(
                    Level::Warn,
                    None,
                    &format!(
                        "upstream \"{}\" peer {} is up (health check: {} passes)",
                        up.name, p.name, n
                    ),
                );
            }
        }
        Err(e) => {
            st.hc_pass_streak.store(0, Relaxed);
            let n = st.hc_fail_streak.fetch_add(1, Relaxed) + 1;
            if st.healthy.load(Relaxed) && n >= hc.fails {
                st.healthy.store(false, Relaxed);
                elog::log(
                    Level::Warn,
                    None,
                    &format!(
                        "upstream \"{}\" peer {} is down (health check: {})",
                        up.name, p.name, e
                    ),
                );
            }
        }
    }
}

/// One check: connect (and for HTTP, `GET uri` and read the status line) within the timeout.
pub async fn probe(addr: SocketAddr, host: String, hc: &HealthCheck) -> Result<(), String> {
    let timeout = Duration::from_millis(hc.timeout_ms);
    match tokio::time::timeout(timeout, probe_inner(addr, &host, hc)).await {
        Ok(r) => r,
        Err(_) => Err("timed out".to_string()),
    }
}

async fn probe_inner(addr: SocketAddr, host: &str, hc: &HealthCheck) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        format!(
            "connect() failed ({}: {})",
            e.raw_os_error().unwrap_or(0),
            e
        )
    })?;
    if hc.tcp {
        return Ok(());
    }
    let req = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: tidegate-health-check\r\nConnection: close\r\n\r\n",
        hc.uri, host
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send() failed ({})", e))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("recv() failed ({})", e))?;
        if n == 0 {
            return Err("connection closed before the status line".to_string());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 4096 {
            return Err("status line too long".to_string());
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or_else(|| "invalid status line".to_string())?;
    if hc.expect.iter().any(|(a, b)| (*a..=*b).contains(&status)) {
        Ok(())
    } else {
        Err(format!("status {}", status))
    }
}
