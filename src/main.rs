//! The `tidegate` command: nginx's flags (`-p -c -g -t -T -s -e -v -V`) plus the subcommands
//! `spec` (the Lua test runner) and `resty` (run Lua like OpenResty's resty-cli).

use std::path::PathBuf;
use std::process::exit;

use tidegate::conf::{build::load, LoadOptions};

const USAGE: &str =
    "Usage: tidegate [-?hvVtTq] [-s signal] [-p prefix] [-e filename] [-c filename] [-g directives]
       tidegate spec [paths...]
       tidegate resty [-I dir] [-e code | file.lua [args...]]

Options:
  -?,-h         : this help
  -v            : show version and exit
  -V            : show version and configure options then exit
  -t            : test configuration and exit
  -T            : test configuration, dump it and exit
  -q            : suppress non-error messages during configuration testing
  -s signal     : send signal to the running instance: stop, quit, reopen, reload
  -p prefix     : set prefix path (default: .)
  -e filename   : set error log file (default: logs/error.log)
  -c filename   : set configuration file (default: conf/nginx.conf)
  -g directives : set global directives out of configuration file
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("spec") => exit(spec(&args[1..])),
        Some("resty") => exit(resty(&args[1..])),
        _ => {}
    }
    let mut opts = LoadOptions {
        prefix: PathBuf::from("."),
        conf: PathBuf::from("conf/nginx.conf"),
        globals: None,
    };
    let (mut test, mut dump, mut quiet) = (false, false, false);
    let mut signal: Option<String> = None;
    let mut error_log: Option<String> = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let value = |i: &mut usize| -> String {
            *i += 1;
            match args.get(*i) {
                Some(v) => v.clone(),
                None => {
                    eprintln!(
                        "nginx: option \"{}\" requires {}",
                        a,
                        if a == "-g" {
                            "directives"
                        } else {
                            "a parameter"
                        }
                    );
                    exit(1);
                }
            }
        };
        match a {
            "-h" | "-?" | "--help" => {
                print!("{}", USAGE);
                exit(0);
            }
            "-v" | "--version" => {
                eprintln!("tidegate version: tidegate/{}", tidegate::VERSION);
                exit(0);
            }
            "-V" => {
                eprintln!("tidegate version: tidegate/{}", tidegate::VERSION);
                eprintln!(
                    "built with LuaJIT (mlua), hyper, tokio; lua-nginx-module API {}",
                    tidegate::NGX_LUA_VERSION
                );
                eprintln!("configure arguments: --prefix=. --conf-path=conf/nginx.conf");
                exit(0);
            }
            "-t" => test = true,
            "-T" => {
                test = true;
                dump = true;
            }
            "-q" => quiet = true,
            "-p" => opts.prefix = PathBuf::from(value(&mut i)),
            "-c" => opts.conf = PathBuf::from(value(&mut i)),
            "-g" => opts.globals = Some(value(&mut i)),
            "-s" => signal = Some(value(&mut i)),
            "-e" => error_log = Some(value(&mut i)),
            other => {
                eprintln!(
                    "nginx: invalid option: \"{}\"",
                    other.trim_start_matches('-')
                );
                exit(1);
            }
        }
        i += 1;
    }
    if let Ok(abs) = std::fs::canonicalize(&opts.prefix) {
        opts.prefix = abs;
    }
    if let Some(e) = error_log {
        let path = if e == "stderr" {
            PathBuf::from("stderr")
        } else {
            opts.prefix.join(e)
        };
        let _ = tidegate::log::open(&path, "notice");
    }
    let conf_display = opts.conf_path().display().to_string();
    if test {
        match load(&opts) {
            Ok(cfg) => {
                if dump {
                    println!("{}", tidegate::conf::parser::dump(&cfg.parsed));
                }
                if !quiet {
                    eprintln!(
                        "nginx: the configuration file {} syntax is ok",
                        conf_display
                    );
                    eprintln!(
                        "nginx: configuration file {} test is successful",
                        conf_display
                    );
                }
                exit(0);
            }
            Err(e) => {
                eprintln!("nginx: [emerg] {}", e);
                eprintln!("nginx: configuration file {} test failed", conf_display);
                exit(1);
            }
        }
    }
    if let Some(sig) = signal {
        exit(send_signal(&opts, &sig));
    }
    exit(tidegate::server::run(opts));
}

/// `-s stop|quit|reopen|reload`: signal the instance named by the pid file.
fn send_signal(opts: &LoadOptions, sig: &str) -> i32 {
    let signo = match sig {
        "stop" => libc::SIGTERM,
        "quit" => libc::SIGQUIT,
        "reopen" => libc::SIGUSR1,
        "reload" => libc::SIGHUP,
        other => {
            eprintln!("nginx: invalid option: \"-s {}\"", other);
            return 1;
        }
    };
    let pid_path = match load(opts) {
        Ok(cfg) => cfg.pid.clone(),
        Err(e) => {
            eprintln!("nginx: [emerg] {}", e);
            return 1;
        }
    };
    let text = match std::fs::read_to_string(&pid_path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "nginx: [error] open() \"{}\" failed ({})",
                pid_path.display(),
                e
            );
            return 1;
        }
    };
    let pid: i32 = match text.trim().parse() {
        Ok(p) if p > 0 => p,
        _ => {
            eprintln!(
                "nginx: [error] invalid PID number \"{}\" in \"{}\"",
                text.trim(),
                pid_path.display()
            );
            return 1;
        }
    };
    // SAFETY: kill(2) with a pid read from our pid file and a valid signal number.
    if unsafe { libc::kill(pid, signo) } != 0 {
        eprintln!(
            "nginx: [error] kill({}, {}) failed ({})",
            pid,
            signo,
            std::io::Error::last_os_error()
        );
        return 1;
    }
    0
}

fn spec(args: &[String]) -> i32 {
    let prefix = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let paths: Vec<PathBuf> = args.iter().map(PathBuf::from).collect();
    tidegate::lua::spec::run_spec(&prefix, &paths)
}

fn resty(args: &[String]) -> i32 {
    let prefix = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    tidegate::lua::resty_cli::run_resty(&prefix, args)
}

// mimalloc: the request path allocates many small short-lived objects (headers, Lua strings).
// A/B in bench/run.sh against glibc malloc: equal on d_lua_content, 15-21% less CPU per request
// on g_access_shdict (bench/README.md).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// mimalloc through its plain entry points whenever the alignment asked for is one every
/// mimalloc block has (its size classes are multiples of the word size). The `mimalloc`
/// crate's allocator calls `mi_malloc_aligned` for everything; past 1 KiB (a request's state,
/// a boxed future, I/O buffers) that takes an over-allocating slow path even for 8-byte
/// alignment, ~200 instructions an allocation in callgrind (bench/README.md).
struct MiMalloc;

const WORD_ALIGN: usize = std::mem::size_of::<usize>();

// SAFETY: every pointer comes from mimalloc with at least the layout's alignment (plain calls
// only for alignments every block has), and goes back to mi_free / mi_realloc*.
unsafe impl std::alloc::GlobalAlloc for MiMalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= WORD_ALIGN {
            mi::mi_malloc(layout.size()) as *mut u8
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= WORD_ALIGN {
            mi::mi_zalloc(layout.size()) as *mut u8
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr as *mut std::ffi::c_void);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys as mi;
        let p = ptr as *mut std::ffi::c_void;
        if layout.align() <= WORD_ALIGN {
            mi::mi_realloc(p, new_size) as *mut u8
        } else {
            mi::mi_realloc_aligned(p, new_size, layout.align()) as *mut u8
        }
    }
}
