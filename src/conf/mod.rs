//! The nginx.conf language: lexer (including raw Lua blocks), parser to an AST that keeps
//! file:line, `include` with globs, `${ENV:-default}` interpolation, the generic directive checks
//! (unknown / not allowed here / wrong arity / duplicate) and the build into a typed [`Config`].
//!
//! This room knows nothing of sockets or Lua at run time: it only turns text into values.

pub mod ast;
pub mod build;
pub mod directives;
pub mod error;
pub mod lexer;
pub mod model;
pub mod parser;
pub mod table;
pub mod template;
pub mod values;

pub use ast::Directive;
pub use build::{Config, LoadOptions};
pub use error::ConfError;
