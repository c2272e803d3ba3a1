//! Directive tables: every room declares its directives as rows (name, contexts, arity, block),
//! like nginx's `ngx_command_t` arrays. [`check`] validates a whole tree against all tables and
//! produces nginx's error text, so no handler writes its own context or arity checks.

use super::{ConfError, Directive};

/// Contexts a directive may appear in (a bit set, like nginx's `NGX_HTTP_LOC_CONF`).
pub type Ctx = u32;
pub const MAIN: Ctx = 1 << 0;
pub const EVENTS: Ctx = 1 << 1;
pub const HTTP: Ctx = 1 << 2;
pub const SERVER: Ctx = 1 << 3;
pub const LOCATION: Ctx = 1 << 4;
/// `if` inside a server block.
pub const SERVER_IF: Ctx = 1 << 5;
/// `if` inside a location block.
pub const LOCATION_IF: Ctx = 1 << 6;
pub const UPSTREAM: Ctx = 1 << 7;
/// Inside a `types { }` block (every line there is `mime/type ext...;`).
pub const TYPES: Ctx = 1 << 8;
/// Inside `map $a $b { }` (every line is `key value;`).
pub const MAP: Ctx = 1 << 9;
pub const LIMIT_EXCEPT: Ctx = 1 << 10;
/// http, server and location: the usual "inheritable" set.
pub const HSL: Ctx = HTTP | SERVER | LOCATION;

/// How many arguments a directive takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    /// Exactly this many.
    Exactly(usize),
    /// Between min and max inclusive.
    Range(usize, usize),
    /// At least this many.
    AtLeast(usize),
    /// `on` or `off` (one argument, checked).
    Flag,
}

/// One row of a directive table.
#[derive(Debug, Clone, Copy)]
pub struct Command {
    pub name: &'static str,
    pub contexts: Ctx,
    pub arity: Arity,
    /// Takes a `{ ... }` block (`http`, `server`, `location`, `if`, `upstream`, `types`, `map`).
    /// Lua blocks are not blocks here: the lexer turns their body into one argument.
    pub block: bool,
    /// May appear only once per context (nginx's `"x" directive is duplicate`).
    pub unique: bool,
    /// Accepted for compatibility and ignored, with a notice in the error log.
    pub ignored: bool,
}

impl Command {
    /// A row with the common defaults: not a block, may repeat, not ignored.
    pub const fn new(name: &'static str, contexts: Ctx, arity: Arity) -> Self {
        Command {
            name,
            contexts,
            arity,
            block: false,
            unique: false,
            ignored: false,
        }
    }
    pub const fn block(mut self) -> Self {
        self.block = true;
        self
    }
    pub const fn unique(mut self) -> Self {
        self.unique = true;
        self
    }
    pub const fn ignored(mut self) -> Self {
        self.ignored = true;
        self
    }
}

/// Which context the children of a block directive live in.
pub fn child_context(parent_ctx: Ctx, block_name: &str) -> Ctx {
    match block_name {
        "events" => EVENTS,
        "http" => HTTP,
        "server" => SERVER,
        "location" => LOCATION,
        "if" if parent_ctx == SERVER => SERVER_IF,
        "if" => LOCATION_IF,
        "upstream" => UPSTREAM,
        "types" => TYPES,
        "map" => MAP,
        "limit_except" => LIMIT_EXCEPT,
        _ => parent_ctx,
    }
}

/// Validate a whole tree (starting in the main context) against the given tables.
///
/// Reports, in nginx's words and with file:line: `unknown directive "x"`,
/// `"x" directive is not allowed here`, `invalid number of arguments in "x" directive`,
/// `invalid value "maybe" in "x" directive, it must be "on" or "off"`,
/// `"x" directive is duplicate`, `directive "x" has no opening "{"`.
/// Lines inside `types` and `map` blocks are data, not directives, and are not checked.
pub fn check(tree: &[Directive], tables: &[&[Command]]) -> Result<(), ConfError> {
    check_level(tree, MAIN, tables)
}

/// The row for `name` in context `ctx`: a name may have one row per context (`server` is a
/// block in http and a line in upstream), so a row allowed here wins over the first one.
fn find<'a>(tables: &[&'a [Command]], name: &str, ctx: Ctx) -> Option<&'a Command> {
    let mut rows = tables
        .iter()
        .flat_map(|t| t.iter())
        .filter(|c| c.name == name);
    let first = rows.next()?;
    if first.contexts & ctx != 0 {
        return Some(first);
    }
    Some(rows.find(|c| c.contexts & ctx != 0).unwrap_or(first))
}

fn check_level(list: &[Directive], ctx: Ctx, tables: &[&[Command]]) -> Result<(), ConfError> {
    if ctx == TYPES || ctx == MAP {
        return Ok(());
    }
    let mut seen: Vec<&str> = Vec::new();
    for d in list {
        let cmd = find(tables, &d.name, ctx)
            .ok_or_else(|| ConfError::directive(d, format!("unknown directive \"{}\"", d.name)))?;
        if cmd.contexts & ctx == 0 {
            return Err(ConfError::directive(
                d,
                format!("\"{}\" directive is not allowed here", d.name),
            ));
        }
        if cmd.block && d.block.is_none() {
            return Err(ConfError::directive(
                d,
                format!("directive \"{}\" has no opening \"{{\"", d.name),
            ));
        }
        if !cmd.block && d.block.is_some() {
            return Err(ConfError::directive(
                d,
                format!("directive \"{}\" is not terminated by \";\"", d.name),
            ));
        }
        let n = d.args.len();
        let ok = match cmd.arity {
            Arity::Exactly(k) => n == k,
            Arity::Range(a, b) => n >= a && n <= b,
            Arity::AtLeast(a) => n >= a,
            Arity::Flag => n == 1,
        };
        if !ok {
            return Err(ConfError::directive(
                d,
                format!("invalid number of arguments in \"{}\" directive", d.name),
            ));
        }
        if cmd.arity == Arity::Flag && d.args[0] != "on" && d.args[0] != "off" {
            return Err(ConfError::directive(
                d,
                format!(
                    "invalid value \"{}\" in \"{}\" directive, it must be \"on\" or \"off\"",
                    d.args[0], d.name
                ),
            ));
        }
        if cmd.unique {
            if seen.contains(&cmd.name) {
                return Err(ConfError::directive(
                    d,
                    format!("\"{}\" directive is duplicate", d.name),
                ));
            }
            seen.push(cmd.name);
        }
        if let Some(children) = &d.block {
            check_level(children, child_context(ctx, &d.name), tables)?;
        }
    }
    Ok(())
}
