//! Protocol upgrades (WebSocket): after the upstream's `101 Switching Protocols` has gone to
//! the client, both upgraded connections are joined and bytes flow both ways until one side
//! closes or stays silent for proxy_read_timeout, as nginx tunnels them.

use std::time::Duration;

use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Join the client and upstream sides; returns the bytes moved (client->upstream, back).
pub async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
) -> Result<(u64, u64), String> {
    let (c, u) = tokio::join!(client, upstream);
    let c = c.map_err(|e| format!("client upgrade failed: {}", e))?;
    let u = u.map_err(|e| format!("upstream upgrade failed: {}", e))?;
    join(c, u, idle).await
}

async fn join(c: Upgraded, u: Upgraded, idle: Duration) -> Result<(u64, u64), String> {
    let (mut cr, mut cw) = tokio::io::split(TokioIo::new(c));
    let (mut ur, mut uw) = tokio::io::split(TokioIo::new(u));
    let mut up = 0u64;
    let mut down = 0u64;
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut ubuf = vec![0u8; 16 * 1024];
    let (mut c_open, mut u_open) = (true, true);
    while c_open || u_open {
        tokio::select! {
            r = cr.read(&mut cbuf), if c_open => match r {
                Ok(0) | Err(_) => { c_open = false; let _ = uw.shutdown().await; }
                Ok(n) => { if uw.write_all(&cbuf[..n]).await.is_err() { break; } up += n as u64; }
            },
            r = ur.read(&mut ubuf), if u_open => match r {
                Ok(0) | Err(_) => { u_open = false; let _ = cw.shutdown().await; }
                Ok(n) => { if cw.write_all(&ubuf[..n]).await.is_err() { break; } down += n as u64; }
            },
            _ = tokio::time::sleep(idle) => break,
        }
    }
    Ok((up, down))
}
