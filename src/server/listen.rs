//! Listening sockets: one `SO_REUSEPORT` socket per worker and address, so the kernel spreads
//! connections across workers without an accept mutex.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Bind a worker's socket for `addr`.
pub fn bind(addr: SocketAddr, backlog: i32) -> std::io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog.max(1))?;
    Ok(sock.into())
}

/// Fail like nginx when another process already holds the address: `SO_REUSEPORT` would
/// otherwise let us silently share it.
pub fn probe(addr: SocketAddr) -> std::io::Result<()> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    Ok(())
}
