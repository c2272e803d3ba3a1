//! `$upstream_*` variables: one entry per try, joined with ", " as nginx prints them.

use std::time::Duration;

use crate::http::request::ReqState;

/// What the tries of one request left behind.
#[derive(Default)]
pub struct UpVars {
    addr: Vec<String>,
    status: Vec<String>,
    connect: Vec<String>,
    header: Vec<String>,
    response: Vec<String>,
    pub response_length: u64,
}

fn secs(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.3}", d.as_secs_f64()),
        None => "-".to_string(),
    }
}

impl UpVars {
    /// Record one try. `status` is the upstream's, or the 502/504 nginx records for a failure.
    pub fn push(
        &mut self,
        addr: &str,
        status: u16,
        connect: Option<Duration>,
        header: Option<Duration>,
        response: Duration,
    ) {
        self.addr.push(addr.to_string());
        self.status.push(status.to_string());
        self.connect.push(secs(connect));
        self.header.push(secs(header));
        self.response.push(secs(Some(response)));
    }

    /// The last try's full time, once its body has been read.
    pub fn set_last_response_time(&mut self, d: Duration) {
        if let Some(r) = self.response.last_mut() {
            *r = secs(Some(d));
        }
    }

    /// Make them visible to `ngx.var`, the access log and header filters.
    pub fn publish(&self, st: &mut ReqState) {
        let v = &mut st.extra_vars;
        v.insert("upstream_addr", self.addr.join(", "));
        v.insert("upstream_status", self.status.join(", "));
        v.insert("upstream_connect_time", self.connect.join(", "));
        v.insert("upstream_header_time", self.header.join(", "));
        v.insert("upstream_response_time", self.response.join(", "));
        v.insert("upstream_response_length", self.response_length.to_string());
    }
}

/// `$upstream_http_NAME` (name with `_` for `-`, lower-case).
pub fn upstream_http(st: &ReqState, name: &str) -> Option<Vec<u8>> {
    let h = st.upstream_headers.as_ref()?;
    let name = name.replace('_', "-");
    let vals: Vec<&[u8]> = h
        .get_all(name.as_str())
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if vals.is_empty() {
        None
    } else {
        Some(vals.join(&b", "[..]))
    }
}
