//! ngx API family: re (temporary minimal Regex; the full ngx.re lands from its own branch).

use mlua::{Lua, Table};

/// A compiled PCRE2 pattern shared by the configuration (locations, rewrite, if).
#[derive(Debug)]
pub struct Regex {
    re: pcre2::bytes::Regex,
}

impl Regex {
    pub fn new(pattern: &str, caseless: bool) -> Result<Regex, String> {
        let re = pcre2::bytes::RegexBuilder::new()
            .caseless(caseless)
            .jit_if_available(true)
            .build(pattern)
            .map_err(|e| e.to_string())?;
        Ok(Regex { re })
    }

    pub fn captures(&self, subject: &[u8]) -> Option<Vec<Option<(usize, usize)>>> {
        let caps = self.re.captures(subject).ok()??;
        Some(
            (0..caps.len())
                .map(|i| caps.get(i).map(|m| (m.start(), m.end())))
                .collect(),
        )
    }

    pub fn names(&self) -> Vec<(String, usize)> {
        self.re
            .capture_names()
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (n.clone(), i)))
            .collect()
    }
}

pub fn register(_lua: &Lua, _ngx: &Table) -> mlua::Result<()> {
    Ok(())
}
