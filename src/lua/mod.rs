//! The Lua runtime: one LuaJIT state per worker thread with the `ngx` API, the code cache,
//! the phase runner that executes `*_by_lua*` handlers as coroutines, and the spec runner.
//!
//! This room never owns sockets or caches: its API files call into the rooms that do.

pub mod api;
pub mod bundled;
pub mod fast;
pub mod phase;
pub mod request;
pub mod resty_cli;
pub mod spec;
pub mod vm;
