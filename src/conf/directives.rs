//! Every directive tidegate knows, one table per nginx module, as nginx's `ngx_command_t`
//! arrays. `table::check` validates context/arity/duplicates from these rows; `build` turns the
//! checked tree into typed settings.

use super::table::{Arity::*, Command as C, *};

/// Core and events module.
pub const CORE: &[C] = &[
    C::new("worker_processes", MAIN, Exactly(1)).unique(),
    C::new("error_log", MAIN | HSL, AtLeast(1)),
    C::new("pid", MAIN, Exactly(1)).unique(),
    C::new("env", MAIN, Exactly(1)),
    C::new(
        "include",
        MAIN | EVENTS | HSL | UPSTREAM | TYPES | SERVER_IF | LOCATION_IF,
        Exactly(1),
    ),
    C::new("events", MAIN, Exactly(0)).block().unique(),
    C::new("worker_connections", EVENTS, Exactly(1)).unique(),
    C::new("http", MAIN, Exactly(0)).block().unique(),
];

/// ngx_http_core_module (the parts tidegate implements).
pub const HTTP_CORE: &[C] = &[
    C::new("server", HTTP, Exactly(0)).block(),
    C::new("listen", SERVER, AtLeast(1)),
    C::new("server_name", SERVER, AtLeast(1)),
    C::new("location", SERVER | LOCATION, Range(1, 2)).block(),
    C::new("root", HSL | LOCATION_IF, Exactly(1)).unique(),
    C::new("index", HSL, AtLeast(1)),
    C::new("default_type", HSL, Exactly(1)).unique(),
    C::new("types", HSL, Exactly(0)).block(),
    C::new("error_page", HSL | LOCATION_IF, AtLeast(2)),
    C::new("internal", LOCATION, Exactly(0)).unique(),
    C::new("keepalive_timeout", HSL, Range(1, 2)).unique(),
    C::new("keepalive_requests", HSL, Exactly(1)).unique(),
    C::new("client_max_body_size", HSL, Exactly(1)).unique(),
    C::new("client_header_timeout", HTTP | SERVER, Exactly(1)).unique(),
    C::new("client_body_timeout", HSL, Exactly(1)).unique(),
    C::new("send_timeout", HSL, Exactly(1)).unique(),
    C::new("large_client_header_buffers", HTTP | SERVER, Exactly(2)).unique(),
    C::new("server_tokens", HSL, Flag).unique(),
];

/// ngx_http_rewrite_module.
pub const REWRITE: &[C] = &[
    C::new(
        "return",
        SERVER | LOCATION | SERVER_IF | LOCATION_IF,
        Range(1, 2),
    ),
    C::new(
        "rewrite",
        SERVER | LOCATION | SERVER_IF | LOCATION_IF,
        Range(2, 3),
    ),
    C::new(
        "set",
        SERVER | LOCATION | SERVER_IF | LOCATION_IF,
        Exactly(2),
    ),
    C::new("if", SERVER | LOCATION, AtLeast(1)).block(),
    C::new(
        "break",
        SERVER | LOCATION | SERVER_IF | LOCATION_IF,
        Exactly(0),
    ),
];

/// ngx_http_headers_module and headers-more.
pub const HEADERS: &[C] = &[
    C::new("add_header", HSL | LOCATION_IF, Range(2, 3)),
    C::new("more_set_headers", HSL | LOCATION_IF, AtLeast(1)),
    C::new("more_clear_headers", HSL | LOCATION_IF, AtLeast(1)),
    C::new("more_set_input_headers", HSL | LOCATION_IF, AtLeast(1)),
    C::new("more_clear_input_headers", HSL | LOCATION_IF, AtLeast(1)),
];

/// ngx_http_log_module.
pub const LOG: &[C] = &[
    C::new("access_log", HSL | LOCATION_IF, Range(1, 4)),
    C::new("log_format", HTTP, AtLeast(2)),
];

/// lua-nginx-module.
pub const LUA: &[C] = &[
    C::new("lua_package_path", HTTP, Exactly(1)).unique(),
    C::new("lua_package_cpath", HTTP, Exactly(1)).unique(),
    C::new("lua_code_cache", HSL, Flag).unique(),
    C::new("lua_shared_dict", HTTP, Exactly(2)),
    C::new("init_by_lua_block", HTTP, Exactly(1)).unique(),
    C::new("init_by_lua_file", HTTP, Exactly(1)).unique(),
    C::new("init_worker_by_lua_block", HTTP, Exactly(1)).unique(),
    C::new("init_worker_by_lua_file", HTTP, Exactly(1)).unique(),
    C::new(
        "set_by_lua_block",
        SERVER | LOCATION | SERVER_IF | LOCATION_IF,
        AtLeast(2),
    ),
    C::new(
        "set_by_lua_file",
        SERVER | LOCATION | SERVER_IF | LOCATION_IF,
        AtLeast(2),
    ),
    C::new("rewrite_by_lua_block", HSL | LOCATION_IF, Exactly(1)).unique(),
    C::new("rewrite_by_lua_file", HSL | LOCATION_IF, Exactly(1)).unique(),
    C::new("access_by_lua_block", HSL | LOCATION_IF, Exactly(1)).unique(),
    C::new("access_by_lua_file", HSL | LOCATION_IF, Exactly(1)).unique(),
    C::new("content_by_lua_block", LOCATION | LOCATION_IF, Exactly(1)).unique(),
    C::new("content_by_lua_file", LOCATION | LOCATION_IF, Exactly(1)).unique(),
    C::new("header_filter_by_lua_block", HSL | LOCATION_IF, Exactly(1)).unique(),
    C::new("header_filter_by_lua_file", HSL | LOCATION_IF, Exactly(1)).unique(),
    C::new("body_filter_by_lua_block", HSL | LOCATION_IF, Exactly(1)).unique(),
    C::new("body_filter_by_lua_file", HSL | LOCATION_IF, Exactly(1)).unique(),
    C::new("log_by_lua_block", HSL | LOCATION_IF, Exactly(1)).unique(),
    C::new("log_by_lua_file", HSL | LOCATION_IF, Exactly(1)).unique(),
    // timers, light threads (src/lua/api/timer.rs, thread.rs)
    C::new("lua_max_pending_timers", HTTP, Exactly(1)).unique(),
    C::new("lua_max_running_timers", HTTP, Exactly(1)).unique(),
    C::new("lua_check_client_abort", HSL | LOCATION_IF, Flag).unique(),
];

/// Directives that fill real nginx configs but mean nothing here: accepted, ignored, noticed.
pub const IGNORED: &[C] = &[
    C::new("daemon", MAIN, Flag).ignored(),
    C::new("master_process", MAIN, Flag).ignored(),
    C::new("user", MAIN, Range(1, 2)).ignored(),
    C::new("worker_rlimit_nofile", MAIN, Exactly(1)).ignored(),
    C::new("worker_cpu_affinity", MAIN, AtLeast(1)).ignored(),
    C::new("worker_priority", MAIN, Exactly(1)).ignored(),
    C::new("worker_shutdown_timeout", MAIN, Exactly(1)).ignored(),
    C::new("pcre_jit", MAIN, Flag).ignored(),
    C::new("load_module", MAIN, Exactly(1)).ignored(),
    C::new("accept_mutex", EVENTS, Flag).ignored(),
    C::new("accept_mutex_delay", EVENTS, Exactly(1)).ignored(),
    C::new("multi_accept", EVENTS, Flag).ignored(),
    C::new("use", EVENTS, Exactly(1)).ignored(),
    C::new("sendfile", HSL | LOCATION_IF, Flag).ignored(),
    C::new("tcp_nopush", HSL, Flag).ignored(),
    C::new("tcp_nodelay", HSL, Flag).ignored(),
    C::new("client_body_temp_path", HSL, Range(1, 4)).ignored(),
    C::new("proxy_temp_path", HSL, Range(1, 4)).ignored(),
    C::new("fastcgi_temp_path", HSL, Range(1, 4)).ignored(),
    C::new("uwsgi_temp_path", HSL, Range(1, 4)).ignored(),
    C::new("scgi_temp_path", HSL, Range(1, 4)).ignored(),
    C::new("types_hash_max_size", HSL, Exactly(1)).ignored(),
    C::new("types_hash_bucket_size", HSL, Exactly(1)).ignored(),
    C::new("server_names_hash_bucket_size", HTTP, Exactly(1)).ignored(),
    C::new("server_names_hash_max_size", HTTP, Exactly(1)).ignored(),
    C::new("variables_hash_max_size", HTTP, Exactly(1)).ignored(),
    C::new("variables_hash_bucket_size", HTTP, Exactly(1)).ignored(),
    C::new("client_header_buffer_size", HTTP | SERVER, Exactly(1)).ignored(),
    C::new("open_file_cache", HSL, Range(1, 2)).ignored(),
    C::new("open_file_cache_valid", HSL, Exactly(1)).ignored(),
    C::new("open_file_cache_min_uses", HSL, Exactly(1)).ignored(),
    C::new("open_file_cache_errors", HSL, Flag).ignored(),
    C::new("reset_timedout_connection", HSL, Flag).ignored(),
    C::new("lua_need_request_body", HSL, Flag).ignored(),
    C::new("lua_transform_underscores_in_response_headers", HSL, Flag).ignored(),
    C::new("lua_http10_buffering", HSL, Flag).ignored(),
    C::new("lua_regex_cache_max_entries", HTTP, Exactly(1)).ignored(),
    C::new("lua_regex_match_limit", HTTP, Exactly(1)).ignored(),
];

/// Outbound networking: nginx's resolver and lua-nginx-module's cosocket settings (owner: sock).
pub const NET: &[C] = &[
    C::new("resolver", HSL, AtLeast(1)).unique(),
    C::new("resolver_timeout", HSL, Exactly(1)).unique(),
    C::new("lua_socket_connect_timeout", HSL, Exactly(1)).unique(),
    C::new("lua_socket_send_timeout", HSL, Exactly(1)).unique(),
    C::new("lua_socket_read_timeout", HSL, Exactly(1)).unique(),
    C::new("lua_socket_buffer_size", HSL, Exactly(1)).unique(),
    C::new("lua_socket_pool_size", HSL, Exactly(1)).unique(),
    C::new("lua_socket_keepalive_timeout", HSL, Exactly(1)).unique(),
    C::new("lua_socket_log_errors", HSL, Flag).unique(),
    C::new("lua_ssl_trusted_certificate", HSL, Exactly(1)).unique(),
    C::new("lua_ssl_verify_depth", HSL, Exactly(1)).unique(),
];

/// ngx_http_map_module, ngx_http_realip_module, ngx_http_access_module, and tidegate's
/// `max_in_flight` (src/http/map.rs, realip.rs, access.rs, limits.rs).
pub const EDGE: &[C] = &[
    C::new("map", HTTP, Exactly(2)).block(),
    C::new("map_hash_max_size", HTTP, Exactly(1)).ignored(),
    C::new("map_hash_bucket_size", HTTP, Exactly(1)).ignored(),
    C::new("set_real_ip_from", HSL, Exactly(1)),
    C::new("real_ip_header", HSL, Exactly(1)).unique(),
    C::new("real_ip_recursive", HSL, Flag).unique(),
    C::new("allow", HSL | LIMIT_EXCEPT, Exactly(1)),
    C::new("deny", HSL | LIMIT_EXCEPT, Exactly(1)),
    C::new("max_in_flight", HSL, Exactly(1)).unique(),
];

/// ngx_http_upstream_module and its balancers, lua-nginx-module's balancer_by_lua, and our
/// own `health_check`, `circuit_breaker` and `ewma` (src/proxy/upstream).
pub const UPSTREAM_MOD: &[C] = &[
    C::new("upstream", HTTP, Exactly(1)).block(),
    C::new("server", UPSTREAM, AtLeast(1)),
    C::new("least_conn", UPSTREAM, Exactly(0)),
    C::new("ip_hash", UPSTREAM, Exactly(0)),
    C::new("hash", UPSTREAM, Range(1, 2)),
    C::new("random", UPSTREAM, Range(0, 2)),
    C::new("ewma", UPSTREAM, Range(0, 1)),
    C::new("keepalive", UPSTREAM, Exactly(1)).unique(),
    C::new("keepalive_timeout", UPSTREAM, Exactly(1)).unique(),
    C::new("keepalive_requests", UPSTREAM, Exactly(1)).unique(),
    C::new("keepalive_time", UPSTREAM, Exactly(1)).unique(),
    C::new("zone", UPSTREAM, Range(1, 2)).unique(),
    C::new("health_check", UPSTREAM, AtLeast(0)).unique(),
    C::new("circuit_breaker", UPSTREAM, AtLeast(0)).unique(),
    C::new("balancer_by_lua_block", UPSTREAM, Exactly(1)).unique(),
    C::new("balancer_by_lua_file", UPSTREAM, Exactly(1)).unique(),
];

/// All tables, in the order `check` searches them.
pub const ALL: &[&[C]] = &[
    CORE,
    HTTP_CORE,
    REWRITE,
    HEADERS,
    LOG,
    LUA,
    IGNORED,
    NET,
    EDGE,
    UPSTREAM_MOD,
    PROXY,
];

/// ngx_http_proxy_module (src/proxy/conf.rs builds them).
pub const PROXY: &[C] = &[
    C::new("proxy_pass", LOCATION | LOCATION_IF, Exactly(1)).unique(),
    C::new("proxy_set_header", HSL, Exactly(2)),
    C::new("proxy_hide_header", HSL, Exactly(1)),
    C::new("proxy_pass_header", HSL, Exactly(1)),
    C::new("proxy_pass_request_headers", HSL, Flag).unique(),
    C::new("proxy_pass_request_body", HSL, Flag).unique(),
    C::new("proxy_http_version", HSL, Exactly(1)).unique(),
    C::new("proxy_connect_timeout", HSL, Exactly(1)).unique(),
    C::new("proxy_send_timeout", HSL, Exactly(1)).unique(),
    C::new("proxy_read_timeout", HSL, Exactly(1)).unique(),
    C::new("proxy_buffering", HSL, Flag).unique(),
    C::new("proxy_request_buffering", HSL, Flag).unique(),
    C::new("proxy_intercept_errors", HSL, Flag).unique(),
    C::new("proxy_redirect", HSL, Range(1, 2)),
    C::new("proxy_ssl_server_name", HSL, Flag).unique(),
    C::new("proxy_ssl_name", HSL, Exactly(1)).unique(),
    C::new("proxy_ssl_verify", HSL, Flag).unique(),
    C::new("proxy_ssl_trusted_certificate", HSL, Exactly(1)).unique(),
    C::new("proxy_ssl_verify_depth", HSL, Exactly(1)).unique(),
    C::new("proxy_ssl_certificate", HSL, Exactly(1)).unique(),
    C::new("proxy_ssl_certificate_key", HSL, Exactly(1)).unique(),
    C::new("proxy_next_upstream", HSL, AtLeast(1)).unique(),
    C::new("proxy_next_upstream_tries", HSL, Exactly(1)).unique(),
    C::new("proxy_next_upstream_timeout", HSL, Exactly(1)).unique(),
    C::new("proxy_next_upstream_backoff", HSL, Range(1, 2)).unique(),
    C::new("client_body_buffer_size", HSL, Exactly(1)).unique(),
    C::new("proxy_buffer_size", HSL, Exactly(1)).unique(),
    // Buffer sizing and temp files: bodies stream here, nothing spills to disk.
    C::new("proxy_buffers", HSL, Exactly(2)).ignored(),
    C::new("proxy_busy_buffers_size", HSL, Exactly(1)).ignored(),
    C::new("proxy_max_temp_file_size", HSL, Exactly(1)).ignored(),
    C::new("proxy_temp_file_write_size", HSL, Exactly(1)).ignored(),
    C::new("proxy_headers_hash_max_size", HSL, Exactly(1)).ignored(),
    C::new("proxy_headers_hash_bucket_size", HSL, Exactly(1)).ignored(),
    C::new("proxy_socket_keepalive", HSL, Flag).ignored(),
];
