//! nginx's location matching: exact, then the longest prefix (descending into its nested
//! locations), `^~` stopping the regex search, then regexes in config order (nested ones of the
//! matched prefix first), else the longest prefix.

use std::sync::Arc;

use crate::conf::model::{LocMatch, Location};

/// The outcome of a location search: the location and the captures of a regex match.
pub struct Found {
    pub loc: Arc<Location>,
    pub captures: Option<Vec<Option<(usize, usize)>>>,
}

enum Hit {
    Exact(Arc<Location>),
    NoRegex(Arc<Location>),
    Regex(Arc<Location>, Vec<Option<(usize, usize)>>),
    Prefix(Arc<Location>),
    None,
}

/// Find the location for `uri` among a server's locations.
pub fn find(locs: &[Arc<Location>], uri: &str) -> Option<Found> {
    match search(locs, uri) {
        Hit::Exact(l) | Hit::NoRegex(l) | Hit::Prefix(l) => Some(Found {
            loc: l,
            captures: None,
        }),
        Hit::Regex(l, c) => Some(Found {
            loc: l,
            captures: Some(c),
        }),
        Hit::None => None,
    }
}

fn search(locs: &[Arc<Location>], uri: &str) -> Hit {
    for l in locs {
        if let LocMatch::Exact(p) = &l.matcher {
            if p == uri {
                return Hit::Exact(l.clone());
            }
        }
    }
    let mut best: Option<&Arc<Location>> = None;
    for l in locs {
        if let LocMatch::Prefix(p) | LocMatch::PrefixNoRegex(p) = &l.matcher {
            if uri.starts_with(p.as_str()) && best.is_none_or(|b| prefix_len(b) < p.len()) {
                best = Some(l);
            }
        }
    }
    let mut chosen = best.cloned();
    if let Some(b) = best {
        if !b.children.is_empty() {
            match search(&b.children, uri) {
                h @ (Hit::Exact(_) | Hit::NoRegex(_) | Hit::Regex(..)) => return h,
                Hit::Prefix(inner) => chosen = Some(inner),
                Hit::None => {}
            }
        }
        if matches!(b.matcher, LocMatch::PrefixNoRegex(_)) {
            return chosen.map(Hit::NoRegex).unwrap_or(Hit::None);
        }
    }
    for l in locs {
        if let LocMatch::Regex(re) = &l.matcher {
            if let Some(caps) = re.captures(uri.as_bytes()) {
                return Hit::Regex(l.clone(), caps);
            }
        }
    }
    chosen.map(Hit::Prefix).unwrap_or(Hit::None)
}

fn prefix_len(l: &Location) -> usize {
    match &l.matcher {
        LocMatch::Prefix(p) | LocMatch::PrefixNoRegex(p) => p.len(),
        _ => 0,
    }
}
