//! The parsed configuration tree: directives with their arguments, optional block and origin.

use std::sync::Arc;

/// One directive as written, e.g. `listen 8080 default_server;` or `location / { ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Directive {
    pub name: String,
    /// Arguments after quote removal, escape processing and `${ENV}` interpolation. For a
    /// `*_by_lua_block` the raw Lua body (without the outer braces) is the single argument.
    pub args: Vec<String>,
    /// Whether each argument was quoted in the source (same length as `args`).
    pub quoted: Vec<bool>,
    /// `Some` for block directives (`http { ... }`); Lua blocks keep `None` and carry the body in args.
    pub block: Option<Vec<Directive>>,
    /// The file this directive was read from, as the user named it (relative to the prefix when
    /// it is under the prefix), for `nginx -t` style messages.
    pub file: Arc<str>,
    pub line: usize,
}

impl Directive {
    /// `in conf/nginx.conf:12`, the tail nginx puts on every config error.
    pub fn location(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }

    /// Whether this directive's body is raw Lua (`*_by_lua_block`).
    pub fn is_lua_block(&self) -> bool {
        self.name.ends_with("_by_lua_block")
    }
}
