//! A test DNS server on 127.0.0.1:0 answering A queries from a fixed table (wire format from
//! `tidegate::net::resolver::testing`).
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

/// Start it; `table` maps a name to its A records (anything else: NXDOMAIN).
pub fn start(table: Vec<(&'static str, Vec<Ipv4Addr>)>) -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
    let addr = udp.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..10_000 {
            let Ok((n, from)) = udp.recv_from(&mut buf) else {
                return;
            };
            let q = &buf[..n];
            let name = qname(q);
            let ips = table
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            if let Some(r) = tidegate::net::resolver::testing::answer(q, &ips, 300) {
                let _ = udp.send_to(&r, from);
            }
        }
    });
    addr
}

fn qname(q: &[u8]) -> String {
    let mut i = 12;
    let mut parts = Vec::new();
    while i < q.len() && q[i] != 0 {
        let l = q[i] as usize;
        parts.push(String::from_utf8_lossy(&q[i + 1..(i + 1 + l).min(q.len())]).into_owned());
        i += 1 + l;
    }
    parts.join(".")
}
