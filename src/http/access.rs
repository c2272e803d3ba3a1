//! The preaccess and access phases before `access_by_lua`: realip with the location's
//! settings, `max_in_flight`, then ngx_http_access_module (`allow` / `deny`: addresses, CIDRs,
//! `all`, `unix:`; the first matching rule decides; a deny is a 403 with nginx's
//! `access forbidden by rule` in the error log). Rules see the address realip found.

use super::engine::Outcome;
use super::request::ReqCtx;

/// Run the checks; `Some(outcome)` ends the request.
pub fn check(rc: &ReqCtx) -> Option<Outcome> {
    super::realip::run(rc);
    if let Some(o) = super::limits::enter(rc) {
        return Some(o);
    }
    let denied = {
        let st = rc.st.borrow();
        let ip = st.remote(&rc.conn).ip();
        st.conf
            .access_rules
            .iter()
            .find(|r| r.what.matches(ip))
            .is_some_and(|r| !r.allow)
    };
    if denied {
        crate::log::request_error(rc, crate::log::Level::Error, "access forbidden by rule");
        return Some(Outcome::Status(403));
    }
    None
}
