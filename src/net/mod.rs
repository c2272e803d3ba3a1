//! Outbound networking shared by cosockets and the proxy: name resolution (`resolver`,
//! `resolver_timeout`) and client TLS over rustls. Nothing here knows about Lua or requests.
//!
//! Contract (see /work/briefs/contracts.md, owner "sock"): [`resolve`] turns a host and port
//! into addresses (IP literals at once, the configured resolver with its shared cache, else the
//! system resolver); [`tls::client_config`] and [`tls::connect`] do client TLS.

pub mod resolver;
pub mod tls;

pub use resolver::{resolve, Resolver};
pub use tls::ClientTls;
pub mod pool;
pub mod read;
pub mod stream;
