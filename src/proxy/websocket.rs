//! Protocol upgrades (WebSocket): after the upstream's `101 Switching Protocols` has gone to
//! the client, both upgraded connections are joined and bytes flow both ways until one side
//! closes or stays silent for proxy_read_timeout, as nginx tunnels them.

use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connect::Timed;

/// Join the client and upstream sides; `early` is what the upstream sent right behind its
/// 101 head. Returns the bytes moved (client->upstream, back).
pub async fn tunnel(
    client: OnUpgrade,
    upstream: Timed,
    early: Bytes,
    idle: Duration,
) -> Result<(u64, u64), String> {
    let c = client
        .await
        .map_err(|e| format!("client upgrade failed: {}", e))?;
    join(c, upstream, early, idle).await
}

async fn join(c: Upgraded, u: Timed, early: Bytes, idle: Duration) -> Result<(u64, u64), String> {
    let (mut cr, mut cw) = tokio::io::split(TokioIo::new(c));
    let (mut ur, mut uw) = tokio::io::split(u);
    let mut up = 0u64;
    let mut down = early.len() as u64;
    // Every write is flushed: on a TLS stream the bytes may otherwise stay in the TLS
    // buffer while both sides wait for each other.
    if !early.is_empty() && (cw.write_all(&early).await.is_err() || cw.flush().await.is_err()) {
        return Ok((up, down));
    }
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut ubuf = vec![0u8; 16 * 1024];
    let (mut c_open, mut u_open) = (true, true);
    while c_open || u_open {
        tokio::select! {
            r = cr.read(&mut cbuf), if c_open => match r {
                Ok(0) | Err(_) => { c_open = false; let _ = uw.shutdown().await; }
                Ok(n) => {
                    if uw.write_all(&cbuf[..n]).await.is_err() || uw.flush().await.is_err() { break; }
                    up += n as u64;
                }
            },
            r = ur.read(&mut ubuf), if u_open => match r {
                Ok(0) | Err(_) => { u_open = false; let _ = cw.shutdown().await; }
                Ok(n) => {
                    if cw.write_all(&ubuf[..n]).await.is_err() || cw.flush().await.is_err() { break; }
                    down += n as u64;
                }
            },
            _ = tokio::time::sleep(idle) => break,
        }
    }
    Ok((up, down))
}
