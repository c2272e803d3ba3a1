//! Strings with nginx variables (`"$scheme://$host${uri}x"`, `$1` regex captures), parsed once
//! at load time and evaluated per request by the http room.

/// One piece of a template.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Lit(Vec<u8>),
    /// `$name` / `${name}`, stored lower-case as nginx variable names are case-insensitive.
    Var(String),
    /// `$1`..`$9` from the last regex match (`rewrite`, `location ~`, `if ~`).
    Capture(usize),
}

/// A parsed string with variables.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Template {
    pub parts: Vec<Part>,
}

impl Template {
    /// Parse `s`; `$` not followed by a name stays literal, as nginx keeps it.
    pub fn parse(s: &str) -> Result<Template, String> {
        let b = s.as_bytes();
        let mut parts = Vec::new();
        let mut lit = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'$' || i + 1 >= b.len() {
                lit.push(b[i]);
                i += 1;
                continue;
            }
            let (name, next) = if b[i + 1] == b'{' {
                let end = s[i + 2..].find('}').ok_or_else(|| {
                    format!(
                        "the closing bracket in \"{}\" variable is missing",
                        &s[i + 2..]
                    )
                })?;
                (&s[i + 2..i + 2 + end], i + 3 + end)
            } else {
                let mut j = i + 1;
                if b[j].is_ascii_digit() {
                    j += 1;
                } else {
                    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                        j += 1;
                    }
                }
                (&s[i + 1..j], j)
            };
            if name.is_empty() {
                lit.push(b'$');
                i += 1;
                continue;
            }
            if !lit.is_empty() {
                parts.push(Part::Lit(std::mem::take(&mut lit)));
            }
            match name.parse::<usize>() {
                Ok(n) => parts.push(Part::Capture(n)),
                Err(_) => parts.push(Part::Var(name.to_ascii_lowercase())),
            }
            i = next;
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template { parts })
    }

    /// The literal value when the template has no variables.
    pub fn as_literal(&self) -> Option<&[u8]> {
        match self.parts.as_slice() {
            [] => Some(b""),
            [Part::Lit(l)] => Some(l),
            _ => None,
        }
    }

    pub fn has_captures(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Capture(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vars_and_captures() {
        let t = Template::parse("$scheme://${host}x/$1$").unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Var("scheme".into()),
                Part::Lit(b"://".to_vec()),
                Part::Var("host".into()),
                Part::Lit(b"x/".to_vec()),
                Part::Capture(1),
                Part::Lit(b"$".to_vec()),
            ]
        );
        assert_eq!(
            Template::parse("plain").unwrap().as_literal(),
            Some(&b"plain"[..])
        );
        assert!(Template::parse("${oops").is_err());
    }
}
