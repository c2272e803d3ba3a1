//! The `ngx` API, one file per family as lua-nginx-module has one C file per family.
//! Each file has one `register` entry point that adds its functions to the `ngx` table.

pub mod balancer;
pub mod cjson;
pub mod client_core;
pub mod consts;
pub mod coroutine;
pub mod ctx;
pub mod exit;
pub mod header;
pub mod location;
pub mod log;
pub mod misc;
pub mod output;
pub mod re;
pub mod redis_mux;
pub mod req;
pub mod resty_http;
pub mod resty_redis;
pub mod semaphore;
pub mod shdict;
pub mod sleep;
pub mod socket_tcp;
pub mod socket_udp;
pub mod string;
pub mod thread;
pub mod time;
pub mod timer;
pub mod var;
pub mod worker;
