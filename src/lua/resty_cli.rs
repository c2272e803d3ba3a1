//! `tidegate resty`: runs a Lua script or a `-e` snippet in tidegate's runtime, as OpenResty's
//! `resty` command does, so scripts written for `resty` (and their `ngx.*` calls) work unchanged.
//!
//! The script runs as one coroutine on a current-thread tokio runtime, so `ngx.sleep` and the
//! other waiting APIs yield normally. Only the command line lives here: the state, the output
//! fallbacks and the runtime come from the spec runner's helpers.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use mlua::{Function, Lua, MultiValue, Table, Value};
use tokio::sync::Notify;

use crate::lua::spec::{block_on_local, load_chunk, standalone_state, Sink};

const USAGE: &str = "Usage: tidegate resty [-I dir]... [-e code] [script.lua [args...]]
  -e code   run the Lua code given (before the script, if both are given)
  -I dir    add dir/?.lua and dir/?/init.lua to package.path (repeatable)
  -h        show this help
";

/// resty options that only make sense for a real nginx behind it; accepted with a warning so
/// existing command lines keep working. The bool says whether the option takes a value.
const IGNORED: &[(&str, bool)] = &[
    ("-c", true),
    ("--http-conf", true),
    ("--main-conf", true),
    ("--http-include", true),
    ("--main-include", true),
    ("--shdict", true),
    ("--ns", true),
    ("--errlog-level", true),
    ("--nginx", true),
    ("--user-runner", true),
    ("--stap-options", true),
    ("--gdb-opts", true),
    ("--valgrind-opts", true),
    ("--resolve-ipv6", false),
    ("--stap", false),
    ("--gdb", false),
    ("--valgrind", false),
];

/// What the command line asks for.
#[derive(Debug, Default, PartialEq)]
struct Invocation {
    code: Vec<String>,
    include: Vec<PathBuf>,
    script: Option<PathBuf>,
    script_args: Vec<String>,
}

enum Parsed {
    Run(Invocation),
    /// Print this to stdout and exit with 0 (help, version).
    Info(String),
}

fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut inv = Invocation::default();
    let mut i = 0;
    let value = |i: &mut usize, opt: &str| -> Result<String, String> {
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| format!("option {opt} needs a value"))
    };
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "-e" => inv.code.push(value(&mut i, a)?),
            "-I" => inv.include.push(PathBuf::from(value(&mut i, a)?)),
            "-h" | "--help" => return Ok(Parsed::Info(USAGE.to_string())),
            "-v" | "-V" | "--version" => {
                return Ok(Parsed::Info(format!("tidegate resty {}\n", crate::VERSION)))
            }
            "--" => {
                i += 1;
                break;
            }
            _ if a.starts_with("-I") && a.len() > 2 => inv.include.push(PathBuf::from(&a[2..])),
            _ if a.starts_with('-') && a.len() > 1 => {
                let name = a.split('=').next().unwrap_or(a);
                let Some(&(_, takes_value)) = IGNORED.iter().find(|(n, _)| *n == name) else {
                    return Err(format!("unknown option {a}"));
                };
                if takes_value && !a.contains('=') {
                    value(&mut i, a)?;
                }
                eprintln!("tidegate resty: warning: option {name} is not supported, ignored");
            }
            _ => break,
        }
        i += 1;
    }
    if let Some(script) = args.get(i) {
        inv.script = Some(PathBuf::from(script));
        inv.script_args = args[i + 1..].to_vec();
    }
    if inv.script.is_none() && inv.code.is_empty() {
        return Err("nothing to run: give -e code or a script".to_string());
    }
    Ok(Parsed::Run(inv))
}

/// Run `tidegate resty` with its arguments (after the subcommand) and return the exit code.
pub fn run_resty(prefix: &Path, args: &[String]) -> i32 {
    let inv = match parse(args) {
        Ok(Parsed::Run(inv)) => inv,
        Ok(Parsed::Info(text)) => {
            print!("{text}");
            return 0;
        }
        Err(e) => {
            eprintln!("tidegate resty: {e}\n{USAGE}");
            return 2;
        }
    };
    let sink: Sink = Rc::new(RefCell::new(std::io::stdout()));
    let code = run_invocation(prefix, &inv, sink.clone());
    let _ = sink.borrow_mut().flush();
    code
}

fn run_invocation(prefix: &Path, inv: &Invocation, sink: Sink) -> i32 {
    let lua = match standalone_state(prefix, sink) {
        Ok(lua) => lua,
        Err(e) => {
            eprintln!("ERROR: failed to create the Lua state: {e}");
            return 1;
        }
    };
    let outcome = block_on_local(async {
        let exit = install_os_exit(&lua)?;
        prepare(&lua, inv)?;
        let mut chunks: Vec<(Function, MultiValue)> = Vec::new();
        for (n, code) in inv.code.iter().enumerate() {
            let name = if n == 0 {
                "=(command line -e)".to_string()
            } else {
                format!("=(command line -e #{})", n + 1)
            };
            let f = lua.load(code.as_str()).set_name(name).into_function()?;
            chunks.push((f, MultiValue::new()));
        }
        if let Some(script) = &inv.script {
            let f = load_chunk(&lua, script, &format!("@{}", script.display()))
                .map_err(mlua::Error::runtime)?;
            let args = inv
                .script_args
                .iter()
                .map(|a| lua.create_string(a).map(Value::String))
                .collect::<mlua::Result<MultiValue>>()?;
            chunks.push((f, args));
        }
        for (f, args) in chunks {
            // The request-less runner, as for a timer: light threads and ngx.exit work too.
            let run =
                crate::lua::phase::run_detached(&lua, &f, args, crate::http::request::Phase::Timer);
            tokio::select! {
                r = run => r.map_err(mlua::Error::RuntimeError)?,
                _ = exit.notify.notified() => return Ok(exit.code.get()),
            }
        }
        // Like OpenResty's resty, stay until the timers the script started have run.
        while crate::lua::api::timer::busy(&lua) > 0 {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(5)) => {}
                _ = exit.notify.notified() => return Ok(exit.code.get()),
            }
        }
        Ok(0)
    });
    match outcome {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("ERROR: {}", error_text(&e));
            1
        }
        Err(e) => {
            eprintln!("ERROR: failed to start the runtime: {e}");
            1
        }
    }
}

/// The user-facing text of a Lua error: syntax errors without mlua's prefix.
fn error_text(e: &mlua::Error) -> String {
    match e {
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::CallbackError { traceback, cause } => {
            format!("{}\n{traceback}", error_text(cause))
        }
        other => other.to_string(),
    }
}

/// `os.exit` requested from inside the script.
struct ExitRequest {
    code: Rc<Cell<i32>>,
    notify: Rc<Notify>,
}

/// Replace `os.exit` so it ends the script like a process exit but lets the caller flush
/// output and return the code (and lets the function return normally in tests). It parks the
/// script forever; the caller stops polling it once notified.
fn install_os_exit(lua: &Lua) -> mlua::Result<ExitRequest> {
    let code = Rc::new(Cell::new(0));
    let notify = Rc::new(Notify::new());
    let (c, n) = (code.clone(), notify.clone());
    let exit = lua.create_async_function(move |_, v: Value| {
        let value = match v {
            Value::Nil | Value::Boolean(true) => Ok(0),
            Value::Boolean(false) => Ok(1),
            Value::Integer(i) => Ok(i as i32),
            Value::Number(f) => Ok(f as i32),
            other => Err(mlua::Error::runtime(format!(
                "bad argument #1 to 'exit' (number expected, got {})",
                other.type_name()
            ))),
        };
        let (c, n) = (c.clone(), n.clone());
        async move {
            c.set(value?);
            n.notify_one();
            std::future::pending::<()>().await;
            Ok(())
        }
    })?;
    let os: Table = lua.globals().get("os")?;
    os.set("exit", exit)?;
    Ok(ExitRequest { code, notify })
}

/// `-I` folders in front of package.path and the `arg` table, as `lua`/`resty` set it up.
fn prepare(lua: &Lua, inv: &Invocation) -> mlua::Result<()> {
    let package: Table = lua.globals().get("package")?;
    if !inv.include.is_empty() {
        let path: String = package.get("path")?;
        let mut extra = String::new();
        for dir in &inv.include {
            let d = dir.display().to_string();
            let d = d.trim_end_matches('/');
            extra.push_str(&format!("{d}/?.lua;{d}/?/init.lua;"));
        }
        package.set("path", format!("{extra}{path}"))?;
    }
    let arg = lua.create_table()?;
    if let Some(script) = &inv.script {
        arg.raw_set(0, script.display().to_string())?;
    }
    for (i, a) in inv.script_args.iter().enumerate() {
        arg.raw_set(i + 1, a.as_str())?;
    }
    lua.globals().set("arg", arg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Clone, Default)]
    struct Captured(Rc<RefCell<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn resty(prefix: &Path, args: &[&str]) -> (i32, String) {
        let inv = match parse(&strings(args)) {
            Ok(Parsed::Run(inv)) => inv,
            _ => panic!("bad args {args:?}"),
        };
        let cap = Captured::default();
        let sink: Sink = Rc::new(RefCell::new(cap.clone()));
        let code = run_invocation(prefix, &inv, sink);
        let out = String::from_utf8(cap.0.borrow().clone()).unwrap();
        (code, out)
    }

    #[test]
    fn resty_parse_forms() {
        let Ok(Parsed::Run(inv)) = parse(&strings(&[
            "-I", "a", "-Ib", "-e", "x()", "s.lua", "-e", "1",
        ])) else {
            panic!()
        };
        assert_eq!(inv.include, vec![PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(inv.code, vec!["x()".to_string()]);
        assert_eq!(inv.script, Some(PathBuf::from("s.lua")));
        assert_eq!(inv.script_args, strings(&["-e", "1"]));
        assert!(parse(&strings(&["--bogus"])).is_err());
        assert!(parse(&strings(&[])).is_err());
        assert!(matches!(
            parse(&strings(&["--shdict", "d 1m", "-e", "1"])),
            Ok(Parsed::Run(_))
        ));
        assert!(matches!(parse(&strings(&["-h"])), Ok(Parsed::Info(_))));
    }

    #[test]
    fn resty_e_prints_and_sleeps() {
        let (code, out) = resty(
            Path::new("."),
            &[
                "-e",
                "print('a', 1) ngx.sleep(0.005) ngx.say('b', {'c'}) ngx.print('d')",
            ],
        );
        assert_eq!(code, 0);
        assert_eq!(out, "a\t1\nbc\nd");
    }

    #[test]
    fn resty_script_args_and_include() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lib/pkg")).unwrap();
        std::fs::write(dir.path().join("lib/mymod.lua"), "return { v = 42 }").unwrap();
        std::fs::write(dir.path().join("lib/pkg/init.lua"), "return { w = 7 }").unwrap();
        let script = dir.path().join("s.lua");
        std::fs::write(
            &script,
            "#!/usr/bin/env resty\nlocal a, b = ...\nprint(arg[0], arg[1], arg[2], a, b, #arg)\n\
             print(require('mymod').v, require('pkg').w)\n",
        )
        .unwrap();
        let lib = dir.path().join("lib");
        let s = script.to_str().unwrap();
        let (code, out) = resty(Path::new("."), &["-I", lib.to_str().unwrap(), s, "x", "y"]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(out, format!("{s}\tx\ty\tx\ty\t2\n42\t7\n"));
    }

    #[test]
    fn resty_errors_exit_one() {
        let (code, _) = resty(Path::new("."), &["-e", "error('boom')"]);
        assert_eq!(code, 1);
        let (code, _) = resty(Path::new("."), &["-e", "this is not lua"]);
        assert_eq!(code, 1);
        let (code, _) = resty(Path::new("."), &["/nonexistent/x.lua"]);
        assert_eq!(code, 1);
    }

    #[test]
    fn resty_os_exit_stops_the_script() {
        let (code, out) = resty(
            Path::new("."),
            &["-e", "print('x') ngx.sleep(0) os.exit(3) print('y')"],
        );
        assert_eq!(code, 3);
        assert_eq!(out, "x\n");
        let (code, _) = resty(Path::new("."), &["-e", "os.exit(false)"]);
        assert_eq!(code, 1);
        let (code, _) = resty(
            Path::new("."),
            &["-e", "pcall(os.exit, true) error('unreached')"],
        );
        assert_eq!(code, 0);
    }

    /// Hand-run helper while main.rs has no subcommand (arguments split on `|`):
    /// `TIDEGATE_RESTY_ARGS="-e|print(1)" cargo test --lib resty_cli_by_hand -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn resty_cli_by_hand() {
        let args = std::env::var("TIDEGATE_RESTY_ARGS").unwrap_or_default();
        let args: Vec<String> = args.split('|').map(str::to_string).collect();
        let code = run_resty(Path::new("."), &args);
        println!("exit code {code}");
    }
}
