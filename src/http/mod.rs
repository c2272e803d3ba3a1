//! The nginx request walk: find server and location, run the rewrite/access/content phases,
//! the header and body filters and the log phase, with nginx's rules for each. Variables,
//! rewrite-module scripts, static files, special responses and the access log live here too.

pub mod access;
pub mod accesslog;
pub mod body;
pub mod engine;
pub mod filter;
pub mod limits;
pub mod location;
pub mod map;
pub mod realip;
pub mod request;
pub mod rewrite;
pub mod spare;
pub mod special;
pub mod static_files;
pub mod subrequest;
pub mod variables;
