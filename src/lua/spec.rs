//! `tidegate spec [paths]`: runs busted-style `*_spec.lua` files inside tidegate's own Lua
//! runtime, so specs see the same `ngx` API (and the same async behaviour) as request handlers.
//!
//! The runner itself (describe/it, hooks, assertions, spies) is Lua, in `busted.lua`; this file
//! finds the spec files, drives every test through `call_async` (one coroutine per test, so
//! `ngx.sleep` yields to a tokio event loop) and owns the output. It also holds the helpers that
//! `tidegate resty` shares: the standalone state, the stdout fallbacks for `ngx.say`/`print`,
//! and the single-threaded runtime.

use std::cell::RefCell;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use mlua::{Function, Lua, MultiValue, Table, Value, Variadic};

use crate::lua::vm::{new_state, VmOptions};

const BUSTED: &str = include_str!("busted.lua");

/// Where `print`, `ngx.say` and the runner's report lines go (stdout, or a buffer in tests).
pub(crate) type Sink = Rc<RefCell<dyn Write>>;

/// Counts of one spec run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpecSummary {
    pub passed: u64,
    pub failed: u64,
    pub pending: u64,
}

impl SpecSummary {
    /// The process exit code for this run: 1 when anything failed.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.failed > 0)
    }
}

/// Run the spec files under `paths` (default: `<prefix>/spec`) and return the exit code.
pub fn run_spec(prefix: &Path, paths: &[PathBuf]) -> i32 {
    let sink: Sink = Rc::new(RefCell::new(std::io::stdout()));
    match run_spec_to(prefix, paths, sink) {
        Ok(summary) => summary.exit_code(),
        Err(e) => {
            eprintln!("tidegate spec: {e}");
            1
        }
    }
}

/// Run specs, writing every line to `sink`; errors are problems of the runner itself
/// (a missing path, a state that failed to build), never a failing test.
pub(crate) fn run_spec_to(
    prefix: &Path,
    paths: &[PathBuf],
    sink: Sink,
) -> Result<SpecSummary, String> {
    let files = spec_files(prefix, paths)?;
    let lua = standalone_state(prefix, sink.clone())
        .map_err(|e| format!("failed to create the Lua state: {e}"))?;
    let summary = block_on_local(drive(&lua, prefix, &files, sink.clone()))
        .map_err(|e| format!("failed to start the runtime: {e}"))?
        .map_err(|e| format!("spec runner error: {e}"))?;
    let mut out = sink.borrow_mut();
    // Write errors on stdout (a closed pipe) must not turn a green run red, so they are ignored.
    if summary.pending > 0 {
        let _ = writeln!(out, "{} pending", summary.pending);
    }
    let _ = writeln!(out, "{} passed, {} failed", summary.passed, summary.failed);
    let _ = out.flush();
    Ok(summary)
}

async fn drive(
    lua: &Lua,
    prefix: &Path,
    files: &[PathBuf],
    sink: Sink,
) -> mlua::Result<SpecSummary> {
    let write = lua.create_function(move |_, s: mlua::LuaString| {
        let mut out = sink.borrow_mut();
        let _ = out.write_all(&s.as_bytes());
        let _ = out.flush();
        Ok(())
    })?;
    let runner: Table = lua.load(BUSTED).set_name("=busted").call(write)?;
    let install: Function = runner.get("install")?;
    install.call::<()>(lua.globals())?;
    let collect: Function = runner.get("collect")?;
    let next_step: Function = runner.get("next_step")?;
    let internal_failure: Function = runner.get("internal_failure")?;

    for file in files {
        let name = display_name(prefix, file);
        match load_chunk(lua, file, &format!("@{name}")) {
            Ok(chunk) => {
                if let Err(e) = collect.call_async::<()>((chunk, name.as_str())).await {
                    internal_failure.call::<()>(e.to_string())?;
                }
            }
            Err(msg) => collect.call::<()>((Value::Nil, name.as_str(), msg))?,
        }
        while let Some(step) = next_step.call::<Option<Function>>(())? {
            if let Err(e) = step.call_async::<()>(()).await {
                internal_failure.call::<()>(e.to_string())?;
            }
        }
    }
    let (passed, failed, pending): (u64, u64, u64) = runner.get::<Function>("counts")?.call(())?;
    Ok(SpecSummary {
        passed,
        failed,
        pending,
    })
}

/// Compile a Lua file; the error is the message a user should see (already naming the file).
pub(crate) fn load_chunk(lua: &Lua, path: &Path, chunk_name: &str) -> Result<Function, String> {
    let mut source =
        std::fs::read(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // Like `lua file.lua`, skip a `#!` line but keep its newline so line numbers still match.
    if source.first() == Some(&b'#') {
        let end = source
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(source.len());
        source.drain(..end);
    }
    lua.load(source)
        .set_name(chunk_name)
        .into_function()
        .map_err(|e| match e {
            mlua::Error::SyntaxError { message, .. } => message,
            other => other.to_string(),
        })
}

/// Every spec file to run, in run order: a directory contributes its `*_spec.lua` files
/// (recursively, sorted), a file is taken as given.
fn spec_files(prefix: &Path, paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let default = [prefix.join("spec")];
    let paths = if paths.is_empty() {
        &default[..]
    } else {
        paths
    };
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(format!("{}: no such file or directory", path.display()));
        }
    }
    Ok(files)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, found)?;
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with("_spec.lua"))
        {
            found.push(path);
        }
    }
    Ok(())
}

/// How a spec file is named in the output and in Lua error messages: relative to the prefix
/// when it lives there, so `spec/foo_spec.lua:12` reads the same from any working directory.
fn display_name(prefix: &Path, file: &Path) -> String {
    let rel = if prefix.as_os_str().is_empty() || prefix == Path::new(".") {
        file
    } else {
        file.strip_prefix(prefix).unwrap_or(file)
    };
    let rel = rel.strip_prefix(".").unwrap_or(rel);
    rel.display().to_string()
}

/// A Lua state for `tidegate spec` / `tidegate resty`, with output going to `sink`.
pub(crate) fn standalone_state(prefix: &Path, sink: Sink) -> mlua::Result<Lua> {
    let lua = new_state(&VmOptions::standalone(prefix.to_path_buf()))?;
    // The runner locates failing lines with `debug.getinfo`, and OpenResty code expects `debug`.
    if lua.globals().get::<Value>("debug")?.is_nil() {
        lua.load_std_libs(mlua::StdLib::DEBUG)?;
    }
    install_console(&lua, sink)?;
    Ok(lua)
}

/// Route `print` to the sink and fill in the request-output API for scripts that run outside
/// a request. Existing `ngx` fields win: only missing ones are installed.
fn install_console(lua: &Lua, sink: Sink) -> mlua::Result<()> {
    let globals = lua.globals();
    let tostring: Function = globals.get("tostring")?;
    let out = sink.clone();
    let print = lua.create_function(move |_, args: Variadic<Value>| {
        let mut line = Vec::new();
        for (i, v) in args.into_iter().enumerate() {
            if i > 0 {
                line.push(b'\t');
            }
            let s: mlua::LuaString = tostring.call(v)?;
            line.extend_from_slice(&s.as_bytes());
        }
        line.push(b'\n');
        let mut out = out.borrow_mut();
        let _ = out.write_all(&line);
        let _ = out.flush();
        Ok(())
    })?;
    globals.set("print", print)?;

    let ngx: Table = globals.get("ngx")?;
    // A standalone state has no request: ngx.say/ngx.print write to the same sink as print.
    ngx.set("say", output_fn(lua, sink.clone(), true)?)?;
    ngx.set("print", output_fn(lua, sink, false)?)?;
    if ngx.get::<Value>("get_phase")?.is_nil() {
        ngx.set("get_phase", lua.create_function(|_, ()| Ok("timer"))?)?;
    }
    if ngx.get::<Value>("flush")?.is_nil() {
        ngx.set("flush", lua.create_function(|_, ()| Ok(1))?)?;
    }
    install_log_fallback(lua, &ngx)?;
    Ok(())
}

const LOG_LEVELS: [&str; 9] = [
    "stderr", "emerg", "alert", "crit", "error", "warn", "notice", "info", "debug",
];

/// `ngx.log` to stderr, for when the log API family is not there to do it properly.
fn install_log_fallback(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let names = [
        "STDERR", "EMERG", "ALERT", "CRIT", "ERR", "WARN", "NOTICE", "INFO", "DEBUG",
    ];
    for (level, name) in names.iter().enumerate() {
        if ngx.get::<Value>(*name)?.is_nil() {
            ngx.set(*name, level)?;
        }
    }
    if !ngx.get::<Value>("log")?.is_nil() {
        return Ok(());
    }
    let tostring: Function = lua.globals().get("tostring")?;
    let log = lua.create_function(move |lua, (level, args): (i64, Variadic<Value>)| {
        let name = usize::try_from(level)
            .ok()
            .and_then(|l| LOG_LEVELS.get(l))
            .ok_or_else(|| mlua::Error::runtime(format!("bad log level: {level}")))?;
        let mut msg = Vec::new();
        for v in args {
            let s: mlua::LuaString = tostring.call(v)?;
            msg.extend_from_slice(&s.as_bytes());
        }
        let place = lua
            .inspect_stack(1, |d| {
                let src = d
                    .source()
                    .short_src
                    .map(|s| s.into_owned())
                    .unwrap_or_default();
                let line = d.current_line().unwrap_or(0);
                format!("{src}:{line}: ")
            })
            .unwrap_or_default();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "[{name}] [lua] {place}{}",
            String::from_utf8_lossy(&msg)
        );
        Ok(())
    })?;
    ngx.set("log", log)
}

/// `ngx.say` / `ngx.print` outside a request: same argument rules, written to the sink.
fn output_fn(lua: &Lua, sink: Sink, newline: bool) -> mlua::Result<Function> {
    let tostring: Function = lua.globals().get("tostring")?;
    lua.create_function(move |_, args: MultiValue| {
        let mut buf = Vec::new();
        for v in args.iter() {
            append_output(v, &tostring, &mut buf, 0)?;
        }
        if newline {
            buf.push(b'\n');
        }
        let mut out = sink.borrow_mut();
        let _ = out.write_all(&buf);
        let _ = out.flush();
        Ok(1)
    })
}

fn append_output(
    v: &Value,
    tostring: &Function,
    buf: &mut Vec<u8>,
    depth: usize,
) -> mlua::Result<()> {
    match v {
        Value::String(s) => buf.extend_from_slice(&s.as_bytes()),
        // Numbers print exactly as Lua's tostring prints them.
        Value::Integer(_) | Value::Number(_) => {
            let s: mlua::LuaString = tostring.call(v)?;
            buf.extend_from_slice(&s.as_bytes());
        }
        Value::Boolean(b) => buf.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Nil => buf.extend_from_slice(b"nil"),
        Value::LightUserData(p) if p.0.is_null() => buf.extend_from_slice(b"null"),
        Value::Table(t) if depth < 100 => {
            for item in t.sequence_values::<Value>() {
                append_output(&item?, tostring, buf, depth + 1)?;
            }
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "bad argument to 'say' or 'print': {} not allowed",
                other.type_name()
            )))
        }
    }
    Ok(())
}

/// Run a future to completion on a fresh current-thread runtime inside a `LocalSet`, where the
/// `!Send` Lua state and the `spawn_local` tasks of the async APIs can live.
pub(crate) fn block_on_local<F: Future>(fut: F) -> std::io::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    Ok(local.block_on(&rt, fut))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer sink whose contents the test can read back.
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

    fn run(files: &[(&str, &str)]) -> (SpecSummary, String) {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        }
        let cap = Captured::default();
        let sink: Sink = Rc::new(RefCell::new(cap.clone()));
        let summary = run_spec_to(dir.path(), &[], sink).unwrap();
        let text = String::from_utf8(cap.0.borrow().clone()).unwrap();
        (summary, text)
    }

    fn counts(s: SpecSummary) -> (u64, u64, u64) {
        (s.passed, s.failed, s.pending)
    }

    #[test]
    fn spec_passing_failing_erroring_pending() {
        let (s, out) = run(&[(
            "spec/a_spec.lua",
            r#"
describe("math", function()
  it("adds", function() assert.equal(2, 1 + 1) end)
  it("fails", function()
    assert.equal(3, 1 + 1)
  end)
  it("errors", function() local t = nil; return t.x end)
  pending("later")
  it("no body")
  describe("inner", function()
    it("works", function() assert.is_true(true) end)
  end)
end)
"#,
        )]);
        assert_eq!(counts(s), (2, 2, 2), "{out}");
        assert_eq!(s.exit_code(), 1);
        assert!(out.contains("ok - math > adds\n"), "{out}");
        assert!(out.contains("FAIL - math > fails\n"), "{out}");
        assert!(out.contains("Expected objects to be equal."), "{out}");
        assert!(out.contains("(number) 2"), "{out}");
        assert!(out.contains("    spec/a_spec.lua:5\n"), "{out}");
        assert!(out.contains("FAIL - math > errors\n"), "{out}");
        assert!(out.contains("spec/a_spec.lua:7: attempt to index"), "{out}");
        assert!(out.contains("pending - math > later\n"), "{out}");
        assert!(out.contains("ok - math > inner > works\n"), "{out}");
        assert!(out.ends_with("2 pending\n2 passed, 2 failed\n"), "{out}");
    }

    #[test]
    fn spec_all_green_exits_zero() {
        let (s, out) = run(&[("spec/ok_spec.lua", "it('x', function() assert(1 == 1) end)")]);
        assert_eq!(counts(s), (1, 0, 0));
        assert_eq!(s.exit_code(), 0);
        assert!(out.ends_with("\n1 passed, 0 failed\n"), "{out}");
        assert!(!out.contains("pending"), "{out}");
    }

    #[test]
    fn spec_load_error_counts_as_one_failure_and_run_continues() {
        let (s, out) = run(&[
            (
                "spec/a_spec.lua",
                "describe('x', function() it('y', function() end) end) error('boom')",
            ),
            ("spec/b_spec.lua", "this is not lua"),
            ("spec/sub/c_spec.lua", "it('runs', function() end)"),
            ("spec/helper.lua", "error('not a spec')"),
        ]);
        assert_eq!(counts(s), (1, 2, 0), "{out}");
        assert!(out.contains("FAIL - spec/a_spec.lua\n"), "{out}");
        assert!(out.contains("boom"), "{out}");
        assert!(out.contains("FAIL - spec/b_spec.lua\n"), "{out}");
        assert!(out.contains("ok - runs\n"), "{out}");
        let a = out.find("spec/a_spec").unwrap();
        let b = out.find("spec/b_spec").unwrap();
        let c = out.find("ok - runs").unwrap();
        assert!(a < b && b < c, "{out}");
    }

    #[test]
    fn spec_hook_order() {
        let (s, out) = run(&[(
            "spec/hooks_spec.lua",
            r#"
local log = {}
describe("outer", function()
  setup(function() log[#log + 1] = "setup" end)
  teardown(function() log[#log + 1] = "teardown" end)
  before_each(function() log[#log + 1] = "b-outer" end)
  after_each(function() log[#log + 1] = "a-outer" end)
  describe("inner", function()
    before_each(function() log[#log + 1] = "b-inner" end)
    after_each(function() log[#log + 1] = "a-inner" end)
    it("one", function() log[#log + 1] = "one" end)
  end)
  it("two", function() log[#log + 1] = "two" end)
end)
describe("check", function()
  it("order", function()
    assert.same({ "setup", "b-outer", "b-inner", "one", "a-inner", "a-outer",
                  "b-outer", "two", "a-outer", "teardown" }, log)
  end)
end)
"#,
        )]);
        assert_eq!(counts(s), (3, 0, 0), "{out}");
    }

    #[test]
    fn spec_setup_failure_fails_the_block() {
        let (s, out) = run(&[(
            "spec/s_spec.lua",
            r#"
describe("broken", function()
  setup(function() error("no db") end)
  it("a", function() end)
  it("b", function() end)
end)
it("after", function() end)
"#,
        )]);
        assert_eq!(counts(s), (1, 2, 0), "{out}");
        assert!(out.contains("setup failed"), "{out}");
    }

    #[test]
    fn spec_spies_and_stubs_revert_after_each_test() {
        let (s, out) = run(&[(
            "spec/spy_spec.lua",
            r#"
local obj = { greet = function(name) return "hi " .. name end }
describe("spies", function()
  it("spy.on calls through", function()
    local s = spy.on(obj, "greet")
    assert.equal("hi a", obj.greet("a"))
    assert.spy(s).was.called(1)
    assert.spy(s).was_called_with("a")
    assert.spy(s).was_not_called_with("b")
  end)
  it("stub returns fixed values", function()
    local s = stub(obj, "greet", "fixed", 2)
    local a, b = obj.greet("x")
    assert.equal("fixed", a)
    assert.equal(2, b)
    assert.stub(s).was.called()
    s:revert()
    assert.equal("hi y", obj.greet("y"))
  end)
  it("auto reverted", function()
    stub(obj, "greet")
  end)
  it("sees the original", function()
    assert.is_false(spy.is_spy(obj.greet))
    assert.equal("hi z", obj.greet("z"))
  end)
  it("spy.new records calls", function()
    local s = spy.new(function(a) return a * 2 end)
    assert.equal(4, s(2))
    s(3)
    assert.equal(2, #s.calls)
    assert.equal(3, s.calls[2].vals[1])
    s:clear()
    assert.spy(s).was.not_called()
  end)
  it("reports a wrong count", function()
    local s = spy.new(function() end)
    assert.spy(s).was.called(2)
  end)
end)
"#,
        )]);
        assert_eq!(counts(s), (5, 1, 0), "{out}");
        assert!(
            out.contains("FAIL - spies > reports a wrong count"),
            "{out}"
        );
        assert!(out.contains("called 0 time(s)"), "{out}");
    }

    #[test]
    fn spec_ngx_sleep_yields_inside_it() {
        let (s, out) = run(&[(
            "spec/sleep_spec.lua",
            r#"
describe("async", function()
  before_each(function() ngx.sleep(0) end)
  it("sleeps", function()
    local t = os.clock()
    ngx.sleep(0.01)
    assert.is_true(true)
  end)
  it("sleeps inside has_no.errors and pcall", function()
    assert.has_no.errors(function() ngx.sleep(0.001) end)
    local ok = pcall(ngx.sleep, 0.001)
    assert.is_true(ok)
  end)
  it("fails after sleeping", function()
    ngx.sleep(0.001)
    assert.is_nil(1)
  end)
end)
"#,
        )]);
        assert!(!out.contains("yield across"), "{out}");
        assert_eq!(counts(s), (2, 1, 0), "{out}");
        assert!(out.contains("    spec/sleep_spec.lua:16\n"), "{out}");
    }

    #[test]
    fn spec_print_and_ngx_say_reach_the_output() {
        let (s, out) = run(&[(
            "spec/say_spec.lua",
            r#"it("talks", function()
  print("a", 1, nil)
  ngx.say("b", 2, { "c", 3 }, true)
  ngx.print("d")
  assert.equal("timer", ngx.get_phase())
end)"#,
        )]);
        assert_eq!(counts(s), (1, 0, 0), "{out}");
        assert!(out.starts_with("a\t1\tnil\nb2c3true\nd"), "{out}");
    }

    #[test]
    fn spec_explicit_paths_and_missing_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("one_spec.lua");
        std::fs::write(&file, "it('x', function() end)").unwrap();
        let cap = Captured::default();
        let sink: Sink = Rc::new(RefCell::new(cap.clone()));
        let s = run_spec_to(Path::new("/nonexistent"), &[file], sink.clone()).unwrap();
        assert_eq!(counts(s), (1, 0, 0));
        let missing = run_spec_to(dir.path(), &[dir.path().join("nope")], sink);
        assert!(missing.is_err());
    }

    #[test]
    fn spec_repo_runner_spec_passes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cap = Captured::default();
        let sink: Sink = Rc::new(RefCell::new(cap.clone()));
        let s = run_spec_to(root, &[root.join("spec/runner_spec.lua")], sink).unwrap();
        let out = String::from_utf8(cap.0.borrow().clone()).unwrap();
        assert_eq!(s.failed, 0, "{out}");
        assert!(s.passed > 20, "{out}");
    }

    /// Hand-run helper while main.rs has no subcommand:
    /// `TIDEGATE_SPEC_ARGS="spec/" cargo test --lib spec_cli_by_hand -- --ignored --nocapture`
    /// (paths are relative to the crate root; `TIDEGATE_PREFIX` sets the prefix).
    #[test]
    #[ignore]
    fn spec_cli_by_hand() {
        let prefix = PathBuf::from(std::env::var("TIDEGATE_PREFIX").unwrap_or_else(|_| ".".into()));
        let args = std::env::var("TIDEGATE_SPEC_ARGS").unwrap_or_default();
        let paths: Vec<PathBuf> = args.split_whitespace().map(PathBuf::from).collect();
        let code = run_spec(&prefix, &paths);
        println!("exit code {code}");
    }
}
