//! Client-side TLS over rustls for cosockets (`tcpsock:sslhandshake`) and upstreams. One
//! `rustls::ClientConfig` is made per distinct [`ClientTls`] and kept for the life of the
//! process, so rustls' in-memory session cache gives session resumption across connections.
//!
//! Verification follows OpenResty: with `verify` off anything is accepted; with it on, the
//! chain must lead to a certificate of `lua_ssl_trusted_certificate` (no system store, as in
//! OpenResty), and `verify_depth` limits how many intermediates the peer may present.
//! Errors use OpenSSL's words that Lua code greps for (`"20: unable to get local issuer
//! certificate"`, `"certificate host mismatch"`, `"handshake failed"`).
//!
//! ```ignore
//! let cfg = net::tls::client_config(&ClientTls { verify: true, trusted: Some(ca), ..Default::default() })?;
//! let tls = net::tls::connect(tcp, cfg, Some("example.com"), "example.com").await?;
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};

/// What a TLS client needs to know; equal values share one `ClientConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientTls {
    pub verify: bool,
    /// PEM bundle of trusted CAs (`lua_ssl_trusted_certificate`, `proxy_ssl_trusted_certificate`).
    pub trusted: Option<PathBuf>,
    /// `lua_ssl_verify_depth` / `proxy_ssl_verify_depth` (nginx's default is 1).
    pub verify_depth: u32,
    /// (certificate, key) PEM files for mutual TLS.
    pub cert: Option<(PathBuf, PathBuf)>,
}

impl Default for ClientTls {
    fn default() -> Self {
        ClientTls {
            verify: false,
            trusted: None,
            verify_depth: 1,
            cert: None,
        }
    }
}

struct Made {
    cfg: Arc<ClientConfig>,
    verifier: Arc<Verifier>,
    /// Modification times of the files it was made from: a rotated file makes a new config.
    stamps: Vec<Option<std::time::SystemTime>>,
}

fn stamps(t: &ClientTls) -> Vec<Option<std::time::SystemTime>> {
    let mut files: Vec<&PathBuf> = t.trusted.iter().collect();
    if let Some((c, k)) = &t.cert {
        files.push(c);
        files.push(k);
    }
    files
        .into_iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

fn cache() -> &'static Mutex<HashMap<ClientTls, Made>> {
    static C: OnceLock<Mutex<HashMap<ClientTls, Made>>> = OnceLock::new();
    C.get_or_init(Default::default)
}

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The (cached) rustls config for `t`. Errors name the file that could not be loaded.
pub fn client_config(t: &ClientTls) -> Result<Arc<ClientConfig>, String> {
    let mut c = cache().lock().unwrap_or_else(|e| e.into_inner());
    let now = stamps(t);
    if let Some(m) = c.get(t) {
        if m.stamps == now {
            return Ok(m.cfg.clone());
        }
    }
    let mut made = build(t)?;
    made.stamps = now;
    let cfg = made.cfg.clone();
    c.insert(t.clone(), made);
    Ok(cfg)
}

fn verifier_of(cfg: &Arc<ClientConfig>) -> Option<Arc<Verifier>> {
    let c = cache().lock().unwrap_or_else(|e| e.into_inner());
    c.values()
        .find(|m| Arc::ptr_eq(&m.cfg, cfg))
        .map(|m| m.verifier.clone())
}

fn build(t: &ClientTls) -> Result<Made, String> {
    let p = provider();
    let inner = match &t.trusted {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                format!(
                    "failed to load trusted certificate \"{}\": {}",
                    path.display(),
                    e
                )
            })?;
            for c in certs {
                let c = c.map_err(|e| {
                    format!(
                        "failed to load trusted certificate \"{}\": {}",
                        path.display(),
                        e
                    )
                })?;
                roots.add(c).map_err(|e| {
                    format!(
                        "failed to load trusted certificate \"{}\": {}",
                        path.display(),
                        e
                    )
                })?;
            }
            if roots.is_empty() {
                None
            } else {
                Some(
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), p.clone())
                        .build()
                        .map_err(|e| {
                            format!("trusted certificates \"{}\": {}", path.display(), e)
                        })?,
                )
            }
        }
        None => None,
    };
    let verifier = Arc::new(Verifier {
        inner,
        verify: t.verify,
        depth: t.verify_depth,
        provider: p.clone(),
        name: None,
    });
    let builder = ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {}", e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let cfg = match &t.cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot load certificate \"{}\": {}", cert.display(), e))?;
            let k = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot load certificate key \"{}\": {}", key.display(), e))?;
            builder
                .with_client_auth_cert(chain, k)
                .map_err(|e| format!("cannot use certificate \"{}\": {}", cert.display(), e))?
        }
    };
    Ok(Made {
        cfg: Arc::new(cfg),
        verifier,
        stamps: Vec::new(),
    })
}

/// OpenSSL-like verification on top of webpki: off means accept, depth limits intermediates,
/// and `name` (when set) replaces the SNI name for the host name check.
#[derive(Debug, Clone)]
struct Verifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    verify: bool,
    depth: u32,
    provider: Arc<CryptoProvider>,
    name: Option<ServerName<'static>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.verify {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(inner) = &self.inner else {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        };
        // OpenSSL counts the chain it builds; rustls does not tell us, so the presented
        // intermediates stand in (one extra is tolerated: servers often send their root too).
        if intermediates.len() > self.depth as usize {
            return Err(rustls::Error::General(
                "22: certificate chain too long".to_string(),
            ));
        }
        let name = self.name.as_ref().unwrap_or(server_name);
        inner.verify_server_cert(end_entity, intermediates, name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Handshake over `s`. SNI is sent when `sni` is Some; verification (when on) checks
/// `verify_name`. A `cfg` not made by [`client_config`] checks the SNI name instead.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    cfg: Arc<ClientConfig>,
    sni: Option<&str>,
    verify_name: &str,
) -> Result<tokio_rustls::client::TlsStream<S>, String> {
    let target = sni.unwrap_or(verify_name);
    let target = if target.is_empty() {
        "localhost"
    } else {
        target
    };
    let target = target
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(target);
    let server_name = ServerName::try_from(target.to_string())
        .map_err(|_| format!("invalid server name \"{}\"", target))?;
    let cfg = if sni == Some(verify_name) {
        cfg
    } else {
        // SNI off, or a different name to verify: a copy of the config shares the session
        // cache (an Arc inside) and swaps in a verifier bound to verify_name.
        let mut c = (*cfg).clone();
        c.enable_sni = sni.is_some();
        if let Some(base) = verifier_of(&cfg) {
            let name = ServerName::try_from(verify_name.to_string()).ok();
            let v = Verifier {
                name,
                ..(*base).clone()
            };
            c.dangerous().set_certificate_verifier(Arc::new(v));
        }
        Arc::new(c)
    };
    tokio_rustls::TlsConnector::from(cfg)
        .connect(server_name, s)
        .await
        .map_err(|e| error_text(&e))
}

/// OpenResty's words for a failed handshake.
pub fn error_text(e: &std::io::Error) -> String {
    let Some(re) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "handshake failed".to_string(),
            std::io::ErrorKind::TimedOut => "timeout".to_string(),
            _ => "handshake failed".to_string(),
        };
    };
    match re {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "20: unable to get local issuer certificate",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "10: certificate has expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "9: certificate is not yet valid"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "certificate host mismatch"
            }
            CertificateError::BadSignature => "7: certificate signature failure",
            CertificateError::Revoked => "23: certificate revoked",
            _ => "certificate verify failed",
        }
        .to_string(),
        rustls::Error::General(m) if m.starts_with("22:") => m.clone(),
        _ => "handshake failed".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_cached_per_settings() {
        let a = client_config(&ClientTls::default()).unwrap();
        let b = client_config(&ClientTls::default()).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = client_config(&ClientTls {
            verify: true,
            ..Default::default()
        })
        .unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        let e = client_config(&ClientTls {
            trusted: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{}", e);
        // A rotated trusted file makes a fresh config.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, PKI.with(|p| p.0.clone())).unwrap();
        let t = ClientTls {
            verify: true,
            trusted: Some(ca.clone()),
            ..Default::default()
        };
        let a = client_config(&t).unwrap();
        assert!(Arc::ptr_eq(&a, &client_config(&t).unwrap()));
        let f = std::fs::File::options().write(true).open(&ca).unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &client_config(&t).unwrap()));
    }

    /// A CA and a leaf for `localhost` signed by it: (ca pem, leaf cert der, leaf key der).
    fn pki() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        (
            ca.pem(),
            leaf.der().clone(),
            PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
    }

    async fn handshake(
        cfg: Arc<ClientConfig>,
        sni: Option<&str>,
        name: &str,
    ) -> Result<(), String> {
        let (cert, key) = PKI.with(|p| (p.1.clone(), p.2.clone_key()));
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let srv = tokio::spawn(async move { acceptor.accept(b).await.map(|_| ()) });
        let r = connect(a, cfg, sni, name).await.map(|_| ());
        srv.abort();
        r
    }

    thread_local! {
        static PKI: (String, CertificateDer<'static>, PrivateKeyDer<'static>) = {
            let (ca, c, k) = pki();
            (ca, c, k)
        };
    }

    #[tokio::test]
    async fn verify_against_trusted_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, PKI.with(|p| p.0.clone())).unwrap();
        let trusted = ClientTls {
            verify: true,
            trusted: Some(ca),
            ..Default::default()
        };
        let cfg = client_config(&trusted).unwrap();
        handshake(cfg.clone(), Some("localhost"), "localhost")
            .await
            .unwrap();
        let e = handshake(cfg.clone(), Some("other.test"), "other.test")
            .await
            .unwrap_err();
        assert_eq!(e, "certificate host mismatch");
        // No SNI, but the name checked is still ours.
        handshake(cfg, None, "localhost").await.unwrap();
        // Verification on without trusted CAs fails as OpenSSL does.
        let bare = client_config(&ClientTls {
            verify: true,
            ..Default::default()
        })
        .unwrap();
        let e = handshake(bare, Some("localhost"), "localhost")
            .await
            .unwrap_err();
        assert_eq!(e, "20: unable to get local issuer certificate");
        // Verification off accepts anything.
        let off = client_config(&ClientTls::default()).unwrap();
        handshake(off, Some("x.test"), "x.test").await.unwrap();
    }
}
