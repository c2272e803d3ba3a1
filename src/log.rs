//! The error log, in nginx's line format because users' tooling greps it:
//! `2026/11/23 01:02:03 [error] 123#0: *7 failed to run access_by_lua*: ...`.
//!
//! Our own code logs through `tracing` (a layer here formats those events the same way) or,
//! where the nginx level matters (`ngx.log(ngx.CRIT, ...)`), through [`log`] directly.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use crate::http::request::ReqCtx;

/// nginx's log levels, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Stderr = 0,
    Emerg = 1,
    Alert = 2,
    Crit = 3,
    Error = 4,
    Warn = 5,
    Notice = 6,
    Info = 7,
    Debug = 8,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Stderr => "",
            Level::Emerg => "emerg",
            Level::Alert => "alert",
            Level::Crit => "crit",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Notice => "notice",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    pub fn from_name(s: &str) -> Option<Level> {
        Some(match s {
            "emerg" => Level::Emerg,
            "alert" => Level::Alert,
            "crit" => Level::Crit,
            "error" => Level::Error,
            "warn" => Level::Warn,
            "notice" => Level::Notice,
            "info" => Level::Info,
            "debug" => Level::Debug,
            _ => return None,
        })
    }

    /// From `ngx.log`'s numeric levels (ngx.STDERR = 0 ... ngx.DEBUG = 8).
    pub fn from_ngx(n: i64) -> Option<Level> {
        Some(match n {
            0 => Level::Stderr,
            1 => Level::Emerg,
            2 => Level::Alert,
            3 => Level::Crit,
            4 => Level::Error,
            5 => Level::Warn,
            6 => Level::Notice,
            7 => Level::Info,
            8 => Level::Debug,
            _ => return None,
        })
    }
}

struct Sink {
    file: Option<File>,
    level: Level,
}

fn sink() -> &'static Mutex<Sink> {
    static SINK: OnceLock<Mutex<Sink>> = OnceLock::new();
    SINK.get_or_init(|| {
        Mutex::new(Sink {
            file: None,
            level: Level::Notice,
        })
    })
}

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Tag this thread's log lines with a worker number (nginx's `pid#tid`).
pub fn set_worker(id: usize) {
    WORKER.with(|w| w.set(id));
}

/// Open the error log (`stderr` or a path) at a level; lines below it are dropped.
pub fn open(path: &Path, level: &str) -> std::io::Result<()> {
    let level = Level::from_name(level).unwrap_or(Level::Error);
    let file = if path == Path::new("stderr") {
        None
    } else {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        Some(OpenOptions::new().create(true).append(true).open(path)?)
    };
    let mut s = sink().lock().unwrap_or_else(|e| e.into_inner());
    s.file = file;
    s.level = level;
    Ok(())
}

/// Whether a line at `level` would be written.
pub fn enabled(level: Level) -> bool {
    level <= sink().lock().map(|s| s.level).unwrap_or(Level::Error)
}

/// Write one line: `conn` is nginx's connection number (`*7`).
pub fn log(level: Level, conn: Option<u64>, msg: &str) {
    let mut s = sink().lock().unwrap_or_else(|e| e.into_inner());
    if level > s.level {
        return;
    }
    let now = chrono::Local::now().format("%Y/%m/%d %H:%M:%S");
    let worker = WORKER.with(|w| w.get());
    let conn = conn.map(|c| format!("*{} ", c)).unwrap_or_default();
    let line = if level == Level::Stderr {
        format!("{}\n", msg)
    } else {
        format!(
            "{} [{}] {}#{}: {}{}\n",
            now,
            level.name(),
            std::process::id(),
            worker,
            conn,
            msg
        )
    };
    match s.file.as_mut() {
        Some(f) => {
            let _ = f.write_all(line.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

/// Log for a request, with nginx's tail: `, client: 1.2.3.4, server: x, request: "GET / HTTP/1.1", host: "h"`.
pub fn request_error(rc: &ReqCtx, level: Level, msg: &str) {
    if !enabled(level) {
        return;
    }
    let tail = match rc.st.try_borrow() {
        Ok(st) => {
            let version = match st.version {
                http::Version::HTTP_10 => "HTTP/1.0",
                http::Version::HTTP_2 => "HTTP/2.0",
                _ => "HTTP/1.1",
            };
            let mut t = match &rc.sub {
                // nginx names the main request's line, then the subrequest's URI.
                Some(sub) => format!(
                    ", client: {}, server: {}, request: \"{}\", subrequest: \"{}\"",
                    st.remote(&rc.conn).ip(),
                    st.server.primary_name,
                    sub.request_line,
                    st.uri
                ),
                None => format!(
                    ", client: {}, server: {}, request: \"{} {} {}\"",
                    st.remote(&rc.conn).ip(),
                    st.server.primary_name,
                    st.method,
                    st.request_uri,
                    version
                ),
            };
            if let Some(h) = st.headers.get("host").and_then(|h| h.to_str().ok()) {
                t.push_str(&format!(", host: \"{}\"", h));
            }
            t
        }
        Err(_) => format!(", client: {}", rc.conn.remote.ip()),
    };
    log(level, Some(rc.conn.id), &format!("{}{}", msg, tail));
}

/// A `tracing` layer that writes our own events into the error log in nginx's format.
pub struct NginxLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for NginxLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::INFO => Level::Notice,
            tracing::Level::DEBUG => Level::Info,
            tracing::Level::TRACE => Level::Debug,
        };
        if !enabled(level) {
            return;
        }
        struct V(String, Option<u64>);
        impl tracing::field::Visit for V {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "conn" {
                    self.1 = Some(value);
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{:?}", value);
                } else if field.name() != "conn" {
                    self.0.push_str(&format!(" {}={:?}", field.name(), value));
                }
            }
        }
        let mut v = V(String::new(), None);
        event.record(&mut v);
        log(level, v.1, &v.0);
    }
}

/// Install the tracing layer (once per process).
pub fn install_tracing() {
    use tracing_subscriber::prelude::*;
    let _ = tracing_subscriber::registry().with(NginxLayer).try_init();
}
