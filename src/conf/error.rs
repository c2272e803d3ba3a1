//! Config errors, worded as nginx words them so that `tidegate -t` reads like `nginx -t`.

use thiserror::Error;

/// A configuration error. `Display` gives nginx's text, e.g.
/// `unknown directive "proxy_pas" in conf/nginx.conf:12`.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ConfError {
    /// A message that already carries its ` in file:line` tail.
    #[error("{0}")]
    At(String),
    /// A message with no position (e.g. the top-level file cannot be opened).
    #[error("{0}")]
    Plain(String),
}

impl ConfError {
    /// `msg in file:line`.
    pub fn at(msg: impl AsRef<str>, file: &str, line: usize) -> Self {
        ConfError::At(format!("{} in {}:{}", msg.as_ref(), file, line))
    }

    /// An error about directive `d`, e.g. `invalid value "x" in "listen" directive`.
    pub fn directive(d: &super::Directive, msg: impl AsRef<str>) -> Self {
        Self::at(msg, &d.file, d.line)
    }

    /// nginx's `invalid value "x" in "name" directive` / `invalid number of arguments`.
    pub fn invalid_value(d: &super::Directive, value: &str) -> Self {
        Self::directive(
            d,
            format!("invalid value \"{}\" in \"{}\" directive", value, d.name),
        )
    }
}
