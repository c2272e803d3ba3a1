//! Test harness: start the real `tidegate` binary on a prefix of its own with a port picked
//! for it, and talk to it over real sockets with a small raw HTTP/1.1 client (raw, so tests can
//! also send malformed and hostile requests).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound to 0, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// A running tidegate with its own prefix directory.
pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub prefix: tempfile::TempDir,
    /// Extra environment for the process (`${NAME}` in confs).
    pub env: Vec<(String, String)>,
}

/// Write `files` (path relative to the prefix, contents) into a fresh prefix. `PORT` in any
/// file is replaced by the chosen port.
pub fn prefix_with(files: &[(&str, &str)], port: u16) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text.replace("PORT", &port.to_string())).expect("write file");
    }
    dir
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tidegate")
}

/// Wrap an http-block body in a minimal main context.
pub fn http_conf(http_body: &str) -> String {
    format!(
        "worker_processes 1;\nerror_log logs/error.log info;\npid logs/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n    access_log logs/access.log;\n{}\n}}\n",
        http_body
    )
}

impl Server {
    /// Start with `conf` as conf/nginx.conf (PORT replaced) plus extra files.
    pub fn start(conf: &str) -> Server {
        Server::start_with(conf, &[])
    }

    pub fn start_with(conf: &str, extra: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut files = vec![("conf/nginx.conf", conf)];
        files.extend_from_slice(extra);
        let prefix = prefix_with(&files, port);
        Server::start_prefix(prefix, port, &[])
    }

    /// Start on a prefix made by the caller, listening on `port`, with extra environment.
    pub fn start_prefix(prefix: tempfile::TempDir, port: u16, env: &[(&str, &str)]) -> Server {
        let mut s = Server {
            child: None,
            port,
            prefix,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        // stderr goes to a file: a pipe nobody reads would block the server once full, and
        // tests can look for panics there.
        let stderr =
            std::fs::File::create(self.prefix.path().join("logs/stderr.log")).expect("stderr file");
        let child = Command::new(bin())
            .arg("-p")
            .arg(self.prefix.path())
            .arg("-c")
            .arg("conf/nginx.conf")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn tidegate");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            // Ready when our own child wrote its pid (after binding): a bare connect could reach
            // another test's server that grabbed the same free port first.
            let pid = std::fs::read_to_string(self.prefix.path().join("logs/nginx.pid"))
                .unwrap_or_default();
            let ours = self
                .child
                .as_ref()
                .map(|c| c.id().to_string())
                .unwrap_or_default();
            if pid.trim() == ours && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let err = std::fs::read_to_string(self.prefix.path().join("logs/stderr.log"))
                        .unwrap_or_default();
                    panic!(
                        "tidegate exited early ({}): {}\nerror.log:\n{}",
                        status,
                        err,
                        self.error_log()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "tidegate did not start listening on {}\n{}",
            self.port,
            self.error_log()
        );
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.prefix.path().join(p)
    }

    /// What the server wrote to stderr (panics would show up here).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.prefix.path().join("logs/stderr.log")).unwrap_or_default()
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.path().join("logs/error.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Send a signal to the server process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Wait for the process to exit (bounded).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    return Some(s);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// GET `path` with an optional Host header.
    pub fn get(&self, path: &str) -> Response {
        self.request(&format!(
            "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            path
        ))
    }

    /// Send raw bytes on a new connection and read one response (connection closed after).
    pub fn request(&self, raw: &str) -> Response {
        self.request_bytes(raw.as_bytes())
    }

    pub fn request_bytes(&self, raw: &[u8]) -> Response {
        let mut s = TcpStream::connect(self.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(raw).expect("write");
        read_response(&mut s).expect("response")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Read one response from a stream (Content-Length, chunked, or until close). HEAD-less.
pub fn read_response(s: &mut TcpStream) -> std::io::Result<Response> {
    read_response_for(s, false)
}

pub fn read_response_for(s: &mut TcpStream, head: bool) -> std::io::Result<Response> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("eof before headers: {:?}", String::from_utf8_lossy(&buf)),
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head_text = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut rest = buf[head_end + 4..].to_vec();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let body = if head || status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if let Some(cl) = get("content-length") {
        let n: usize = cl.parse().unwrap_or(0);
        while rest.len() < n {
            let k = s.read(&mut tmp)?;
            if k == 0 {
                break;
            }
            rest.extend_from_slice(&tmp[..k]);
        }
        rest.truncate(n);
        rest
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            while find(&rest, b"\r\n").is_none() {
                let k = s.read(&mut tmp)?;
                if k == 0 {
                    return Ok(Response {
                        status,
                        headers,
                        body,
                    });
                }
                rest.extend_from_slice(&tmp[..k]);
            }
            let le = find(&rest, b"\r\n").unwrap_or(0);
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..le])
                    .split(';')
                    .next()
                    .unwrap_or("0")
                    .trim(),
                16,
            )
            .unwrap_or(0);
            rest.drain(..le + 2);
            if size == 0 {
                break;
            }
            while rest.len() < size + 2 {
                let k = s.read(&mut tmp)?;
                if k == 0 {
                    break;
                }
                rest.extend_from_slice(&tmp[..k]);
            }
            body.extend_from_slice(&rest[..size.min(rest.len())]);
            rest.drain(..(size + 2).min(rest.len()));
        }
        body
    } else {
        loop {
            let k = s.read(&mut tmp)?;
            if k == 0 {
                break;
            }
            rest.extend_from_slice(&tmp[..k]);
        }
        rest
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Run `tidegate -t` (or other flags) on a prefix and return (exit code, stderr).
pub fn run_cli(prefix: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .arg("-p")
        .arg(prefix)
        .args(args)
        .output()
        .expect("run tidegate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An `http {}` conf with `http_extra` and one server on `127.0.0.1:PORT` holding `locations`.
pub fn server_conf(http_extra: &str, locations: &str) -> String {
    http_conf(&format!(
        "{http_extra}\n    server {{\n        listen 127.0.0.1:PORT;\n        server_name localhost;\n{locations}\n    }}\n"
    ))
}

/// Wait (bounded) until the error log contains `needle`; returns the log either way.
pub fn wait_log(s: &Server, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = s.error_log();
        if log.contains(needle) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
