//! Build the typed configuration from the checked tree (stub).

/// The typed configuration snapshot.
#[derive(Debug, Default)]
pub struct Config {}

/// How to load a configuration (prefix, conf path, `-g` directives).
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {}
