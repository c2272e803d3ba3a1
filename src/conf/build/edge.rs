//! Building the settings of `map`, the realip and access modules and `max_in_flight`
//! (a child of `build` so it can use the builder's helpers).

use std::net::ToSocketAddrs;
use std::sync::Arc;

use super::{arg, template, var_name, Builder};
use crate::conf::model::*;
use crate::conf::{ConfError, Directive};
use crate::http::limits::InFlight;
use crate::lua::api::re::Regex;

/// List-valued settings a level replaces rather than extends when it has its own.
pub(super) fn level_start(conf: &mut LocConf, list: &[Directive]) {
    let has = |n: &str| list.iter().any(|d| d.name == n);
    if has("set_real_ip_from") {
        conf.realip.from = Arc::new(Vec::new());
    }
    if has("allow") || has("deny") {
        conf.access_rules = Arc::new(Vec::new());
    }
}

/// Every `max_in_flight` scope of the configuration, once each.
pub(super) fn collect_in_flight(http: &Http) -> Vec<Arc<InFlight>> {
    fn add(out: &mut Vec<Arc<InFlight>>, c: &LocConf) {
        if let Some(f) = &c.max_in_flight {
            if !out.iter().any(|o| Arc::ptr_eq(o, f)) {
                out.push(f.clone());
            }
        }
    }
    fn walk(out: &mut Vec<Arc<InFlight>>, locs: &[Arc<Location>]) {
        for l in locs {
            add(out, &l.conf);
            walk(out, &l.children);
        }
    }
    let mut out = Vec::new();
    for s in &http.servers {
        add(&mut out, &s.conf);
        walk(&mut out, &s.locations);
        let named: Vec<Arc<Location>> = s.named.values().cloned().collect();
        walk(&mut out, &named);
    }
    out
}

impl Builder {
    /// Settings of this room; `Ok(false)` when `d` is not one of them.
    pub(super) fn edge_setting(
        &mut self,
        conf: &mut LocConf,
        d: &Directive,
    ) -> Result<bool, ConfError> {
        match d.name.as_str() {
            "set_real_ip_from" => {
                let a = arg(d, 0);
                let mut list = (*conf.realip.from).clone();
                if a == "unix:" {
                    list.push(AddrMatch::Unix);
                } else if let Some(c) = self.cidr(d, a)? {
                    list.push(AddrMatch::Net(c));
                } else {
                    // nginx (1.13.1+) resolves a host name at load and trusts every address.
                    let addrs: Vec<_> = (a, 0u16)
                        .to_socket_addrs()
                        .map_err(|_| {
                            ConfError::directive(
                                d,
                                format!("host not found in set_real_ip_from \"{}\"", a),
                            )
                        })?
                        .collect();
                    for sa in addrs {
                        let max = if sa.is_ipv4() { 32 } else { 128 };
                        list.push(AddrMatch::Net(Cidr {
                            addr: sa.ip(),
                            prefix: max,
                        }));
                    }
                }
                conf.realip.from = Arc::new(list);
            }
            "real_ip_header" => {
                let h = arg(d, 0);
                conf.realip.header = if h.eq_ignore_ascii_case("x-real-ip") {
                    RealIpHeader::XRealIp
                } else if h.eq_ignore_ascii_case("x-forwarded-for") {
                    RealIpHeader::XForwardedFor
                } else if h == "proxy_protocol" {
                    return Err(ConfError::directive(
                        d,
                        "the \"proxy_protocol\" parameter of \"real_ip_header\" is not supported yet",
                    ));
                } else {
                    RealIpHeader::Other(h.to_ascii_lowercase())
                };
            }
            "real_ip_recursive" => conf.realip.recursive = arg(d, 0) == "on",
            "allow" | "deny" => {
                let a = arg(d, 0);
                let what = match a {
                    "all" => AddrMatch::All,
                    "unix:" => AddrMatch::Unix,
                    _ => match self.cidr(d, a)? {
                        Some(c) => AddrMatch::Net(c),
                        None => {
                            return Err(ConfError::directive(
                                d,
                                format!("invalid parameter \"{}\"", a),
                            ))
                        }
                    },
                };
                Arc::make_mut(&mut conf.access_rules).push(AccessRule {
                    allow: d.name == "allow",
                    what,
                });
            }
            "max_in_flight" => {
                let a = arg(d, 0);
                let n: u64 = match a {
                    "off" => 0,
                    _ => a.parse().map_err(|_| ConfError::invalid_value(d, a))?,
                };
                conf.max_in_flight = (n > 0).then(|| Arc::new(InFlight::new(d.location(), n)));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// An address or CIDR; `None` when `a` is neither. Warns as nginx does about host bits
    /// set beyond the prefix.
    fn cidr(&mut self, d: &Directive, a: &str) -> Result<Option<Cidr>, ConfError> {
        match Cidr::parse(a) {
            Some((c, low_bits)) => {
                if low_bits {
                    self.notices.push(format!(
                        "low address bits of {} are meaningless in {}",
                        a,
                        d.location()
                    ));
                }
                Ok(Some(c))
            }
            None if a.contains('/') => Err(ConfError::directive(
                d,
                format!("invalid parameter \"{}\"", a),
            )),
            None => Ok(None),
        }
    }

    /// `map $source $var { ... }`.
    pub(super) fn map(&mut self, d: &Directive, http: &mut Http) -> Result<(), ConfError> {
        let source = template(d, arg(d, 0))?;
        let var = var_name(d, arg(d, 1))?;
        if crate::http::variables::is_named_builtin(&var) {
            return Err(ConfError::directive(
                d,
                format!("the duplicate \"{}\" variable", var),
            ));
        }
        let lines = d.block.as_deref().unwrap_or(&[]);
        let flag = |n: &str| lines.iter().any(|e| e.name == n && e.args.is_empty());
        let mut m = MapDef {
            var: var.clone(),
            source,
            default: None,
            hostnames: flag("hostnames"),
            volatile: flag("volatile"),
            exact: Default::default(),
            wild_head: Vec::new(),
            wild_tail: Vec::new(),
            regexes: Vec::new(),
        };
        for e in lines {
            let key = e.name.as_str();
            if e.args.is_empty() && (key == "hostnames" || key == "volatile") {
                continue;
            }
            if e.args.len() != 1 || e.block.is_some() {
                return Err(ConfError::directive(
                    e,
                    "invalid number of the map parameters",
                ));
            }
            let value = arg(e, 0);
            if key == "default" {
                if m.default.is_some() {
                    return Err(ConfError::directive(e, "duplicate default map parameter"));
                }
                m.default = Some(template(e, value)?);
                continue;
            }
            if let Some(re) = key.strip_prefix('~') {
                let (caseless, pat) = match re.strip_prefix('*') {
                    Some(p) => (true, p),
                    None => (false, re),
                };
                let regex = Regex::new(pat, caseless).map_err(|err| {
                    ConfError::directive(
                        e,
                        format!("pcre2_compile() failed: {} in \"{}\"", err, pat),
                    )
                })?;
                let names = regex.names();
                for (n, _) in &names {
                    // Named captures are variables, as nginx makes them.
                    self.declare(&n.to_ascii_lowercase());
                }
                let names = names
                    .into_iter()
                    .map(|(n, i)| (n.to_ascii_lowercase(), i))
                    .collect();
                m.regexes.push(MapRegex {
                    regex,
                    names,
                    value: template(e, value)?,
                });
                continue;
            }
            // `\default`, `\~x`, `\hostnames`: the key itself.
            let key = key.strip_prefix('\\').unwrap_or(key).to_ascii_lowercase();
            let v = template(e, value)?;
            let conflict = || ConfError::directive(e, format!("conflicting parameter \"{}\"", key));
            if m.hostnames && (key.contains('*') || key.starts_with('.')) {
                let bad =
                    || ConfError::directive(e, format!("invalid hostname or wildcard \"{}\"", key));
                if let Some(s) = key.strip_prefix("*.") {
                    if s.is_empty() || s.contains('*') {
                        return Err(bad());
                    }
                    let s = format!(".{}", s);
                    if m.wild_head.iter().any(|(k, b, _)| *k == s && !*b) {
                        return Err(conflict());
                    }
                    m.wild_head.push((s, false, v));
                } else if let Some(p) = key.strip_suffix(".*") {
                    if p.is_empty() || p.contains('*') {
                        return Err(bad());
                    }
                    let p = format!("{}.", p);
                    if m.wild_tail.iter().any(|(k, _)| *k == p) {
                        return Err(conflict());
                    }
                    m.wild_tail.push((p, v));
                } else if key.starts_with('.') && !key.contains('*') && key.len() > 1 {
                    if m.wild_head.iter().any(|(k, b, _)| *k == key && *b) {
                        return Err(conflict());
                    }
                    m.wild_head.push((key, true, v));
                } else {
                    return Err(bad());
                }
                continue;
            }
            if m.exact.contains_key(key.as_bytes()) {
                return Err(conflict());
            }
            m.exact.insert(key.into_bytes(), v);
        }
        self.declare(&var);
        match http.map_vars.get(&var) {
            // A later map of the same variable wins, as in nginx.
            Some(&i) => http.maps[i] = m,
            None => {
                http.map_vars.insert(var, http.maps.len());
                http.maps.push(m);
            }
        }
        Ok(())
    }
}
