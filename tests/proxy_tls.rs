//! proxy_pass to https origins: verification on and off, SNI, proxy_ssl_name, mutual TLS,
//! session reuse. The origin is a small rustls server on 127.0.0.1:0 with certificates made by
//! rcgen under a test CA.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
    client_cert_pem: String,
    client_key_pem: String,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let skey = KeyPair::generate().expect("key");
    let scert = CertificateParams::new(vec!["origin.test".to_string()])
        .expect("params")
        .signed_by(&skey, &ca)
        .expect("server cert");
    let ckey = KeyPair::generate().expect("key");
    let ccert = CertificateParams::new(vec!["client.test".to_string()])
        .expect("params")
        .signed_by(&ckey, &ca)
        .expect("client cert");
    Pki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        server_chain: vec![scert.der().clone()],
        server_key: skey.serialize_der(),
        client_cert_pem: ccert.pem(),
        client_key_pem: ckey.serialize_pem(),
    }
}

/// What the origin saw on each connection: (SNI, client certificate presented, resumed).
type Seen = Arc<Mutex<Vec<(Option<String>, bool, bool)>>>;

fn tls_origin(p: &Pki, require_client_cert: bool) -> (u16, Seen) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(p.ca_der.clone()).expect("root");
        let v =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.server_key.clone()));
    let cfg = Arc::new(
        builder
            .with_single_cert(p.server_chain.clone(), key)
            .expect("server config"),
    );
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let cfg = cfg.clone();
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let Ok(mut conn) = rustls::ServerConnection::new(cfg) else {
                    return;
                };
                while conn.is_handshaking() {
                    if conn.complete_io(&mut s).is_err() {
                        return;
                    }
                }
                let sni = conn.server_name().map(str::to_string);
                let client = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                if let Ok(mut v) = seen.lock() {
                    v.push((sni.clone(), client, resumed));
                }
                let mut tls = rustls::StreamOwned::new(conn, s);
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut tmp) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let body = format!("sni={:?} client={}", sni, client);
                answer_and_close(&mut tls, &body);
            });
        }
    });
    (port, seen)
}

/// A 200 with `body`, then the TLS close.
fn answer_and_close(
    tls: &mut rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>,
    body: &str,
) {
    let _ = tls.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            body
        )
        .as_bytes(),
    );
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

fn start(p: &Pki, locations: &str) -> Server {
    Server::start_with(
        &http_conf(&format!(
            "server {{ listen 127.0.0.1:PORT; server_name localhost; {} }}",
            locations
        )),
        &[
            ("conf/ca.pem", &p.ca_pem),
            ("conf/client.pem", &p.client_cert_pem),
            ("conf/client.key", &p.client_key_pem),
        ],
    )
}

#[test]
fn https_upstream_verify_sni_and_resumption() {
    let p = pki();
    let (port, seen) = tls_origin(&p, false);
    let s = start(
        &p,
        &format!(
            "location /plain {{ proxy_pass https://127.0.0.1:{port}; }}
             location /verified {{
                proxy_ssl_server_name on;
                proxy_ssl_name origin.test;
                proxy_ssl_verify on;
                proxy_ssl_trusted_certificate ca.pem;
                proxy_pass https://127.0.0.1:{port};
             }}
             location /wrongname {{
                proxy_ssl_verify on;
                proxy_ssl_name other.test;
                proxy_ssl_trusted_certificate ca.pem;
                proxy_pass https://127.0.0.1:{port};
             }}
             location /untrusted {{ proxy_ssl_verify on; proxy_ssl_name origin.test; proxy_pass https://127.0.0.1:{port}; }}"
        ),
    );
    // nginx's defaults: no verification, no SNI.
    let r = s.get("/plain");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "sni=None client=false");
    let r = s.get("/verified");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "sni=Some(\"origin.test\") client=false");
    assert_eq!(s.get("/wrongname").status, 502);
    assert_eq!(s.get("/untrusted").status, 502);
    assert!(
        s.error_log()
            .contains("upstream SSL certificate verify error"),
        "{}",
        s.error_log()
    );
    // Sessions resume across connections made with the same settings.
    assert_eq!(s.get("/verified").status, 200);
    let v = seen.lock().expect("lock").clone();
    assert!(v.last().is_some_and(|x| x.2), "no resumption: {:?}", v);
}

#[test]
fn mutual_tls_to_upstream() {
    let p = pki();
    let (port, _seen) = tls_origin(&p, true);
    let s = start(
        &p,
        &format!(
            "location /nocert {{ proxy_pass https://127.0.0.1:{port}; }}
             location /cert {{
                proxy_ssl_certificate client.pem;
                proxy_ssl_certificate_key client.key;
                proxy_pass https://127.0.0.1:{port};
             }}"
        ),
    );
    assert_eq!(s.get("/nocert").status, 502);
    let r = s.get("/cert");
    assert_eq!(r.status, 200, "{}", s.error_log());
    assert_eq!(r.text(), "sni=None client=true");
}

/// An https origin that pauses before reading each request body (a busy upstream), then
/// answers with the number of body bytes it got.
fn pausing_tls_origin(p: &Pki) -> u16 {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.server_key.clone()));
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(p.server_chain.clone(), key)
            .expect("server config"),
    );
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, s);
                let mut buf = Vec::new();
                let mut tmp = vec![0u8; 64 * 1024];
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match tls.read(&mut tmp) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let want: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                std::thread::sleep(std::time::Duration::from_millis(150));
                let mut got = buf.len() - end;
                while got < want {
                    match tls.read(&mut tmp) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                let body = format!("got {}", got);
                answer_and_close(&mut tls, &body);
            });
        }
    });
    port
}

#[test]
fn bodies_to_a_briefly_busy_https_upstream_are_sent_whole() {
    // tokio-rustls accepts bytes into its buffer when the socket is full; unless the request
    // is flushed, its tail stays there while the upstream waits for it (504 after
    // proxy_read_timeout). Sizes around the loopback socket buffers hit that.
    let p = pki();
    let port = pausing_tls_origin(&p);
    let s = start(
        &p,
        &format!(
            "location / {{ client_max_body_size 64m; proxy_read_timeout 2s; proxy_ssl_verify off; proxy_pass https://127.0.0.1:{port}; }}"
        ),
    );
    let mut bad = Vec::new();
    let mut n = 3 * 1024 * 1024 + 512 * 1024;
    while n <= 8 * 1024 * 1024 {
        let mut raw = format!(
            "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        raw.extend(std::iter::repeat_n(b'a', n));
        let r = s.request_bytes(&raw);
        if r.status != 200 || r.text() != format!("got {n}") {
            bad.push((n, r.status));
        }
        n += 256 * 1024 + 4096;
    }
    assert!(bad.is_empty(), "{:?}\n{}", bad, s.error_log());
}
