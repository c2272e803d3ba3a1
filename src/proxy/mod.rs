//! The upstream side of the proxy. `upstream` holds the upstream groups: peers, balancing,
//! passive and active health, circuit breakers, and the per-request picker the forwarding code
//! asks for a peer on every try.

pub mod upstream;
