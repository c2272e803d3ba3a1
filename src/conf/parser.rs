//! Parser: tokens to [`Directive`] trees, with `include` expansion (globs, sorted), `${ENV}`
//! interpolation of arguments, raw `*_by_lua_block` bodies, and nginx's syntax error messages.
//!
//! It checks only the shape of the language; whether a directive exists, where it may appear and
//! how many arguments it takes is `table::check`'s business.

use std::borrow::Cow;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::lexer::{Lexer, TokenKind, EOF_IN_DIRECTIVE};
use super::{ConfError, Directive};

/// A parsed configuration: the tree and every file read (display name, text) for `-T`.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub tree: Vec<Directive>,
    pub files: Vec<(String, String)>,
}

/// nginx has no limit here, but a runaway include chain must end with a message, not a crash.
const MAX_INCLUDE_DEPTH: usize = 32;
/// Nested `{` levels; guards the recursive descent against pathological input.
const MAX_BLOCK_DEPTH: usize = 128;

/// Parse the main configuration file. `prefix` is the `-p` prefix: file names in messages are
/// shown relative to it when the file lies under it. Relative `include` paths resolve against
/// the directory of `path`, as nginx resolves them against its conf prefix.
pub fn parse_file(path: &Path, prefix: &Path) -> Result<Parsed, ConfError> {
    let abs = absolute(path);
    let conf_dir = abs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut p = Parser {
        conf_dir,
        prefix: Some(absolute(prefix)),
        files: Vec::new(),
        includes: 0,
        env: &env_lookup,
    };
    let text = read_text(&abs).map_err(|e| ConfError::Plain(open_failed(&abs, &e)))?;
    let name = p.display_name(&abs);
    let tree = p.parse_text(&text, &name)?;
    Ok(Parsed {
        tree,
        files: p.files,
    })
}

/// Parse a string (used for `-g 'directives;'`), naming it `file` in messages.
pub fn parse_str(src: &str, file: &str, conf_dir: &Path) -> Result<Vec<Directive>, ConfError> {
    let mut p = Parser {
        conf_dir: absolute(conf_dir),
        prefix: None,
        files: Vec::new(),
        includes: 0,
        env: &env_lookup,
    };
    p.parse_unrecorded(src, file)
}

/// The text `nginx -T` prints after the syntax check: every file read, in order.
pub fn dump(parsed: &Parsed) -> String {
    let mut out = String::new();
    for (name, text) in &parsed.files {
        out.push_str("# configuration file ");
        out.push_str(name);
        out.push_str(":\n");
        out.push_str(text);
        if !text.is_empty() && !text.ends_with('\n') {
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

type EnvLookup<'e> = &'e dyn Fn(&str) -> Option<String>;

fn env_lookup(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

struct Parser<'e> {
    /// Absolute directory that relative includes resolve against.
    conf_dir: PathBuf,
    /// Absolute prefix for display names; `None` shows absolute paths.
    prefix: Option<PathBuf>,
    files: Vec<(String, String)>,
    /// Current include nesting.
    includes: usize,
    env: EnvLookup<'e>,
}

/// How a directive's argument list ended.
enum End {
    Semicolon,
    Open,
}

impl Parser<'_> {
    /// Parse one file's text, recording it for `-T`.
    fn parse_text(&mut self, text: &str, name: &str) -> Result<Vec<Directive>, ConfError> {
        self.files.push((name.to_string(), text.to_string()));
        self.parse_unrecorded(text, name)
    }

    fn parse_unrecorded(&mut self, text: &str, name: &str) -> Result<Vec<Directive>, ConfError> {
        let mut lx = Lexer::new(text, Arc::from(name));
        self.block(&mut lx, 0)
    }

    /// Directives up to the `}` closing this block (`depth > 0`) or end of input (`depth == 0`).
    fn block(&mut self, lx: &mut Lexer<'_>, depth: usize) -> Result<Vec<Directive>, ConfError> {
        let mut out = Vec::new();
        loop {
            let first = lx.next_token()?;
            let line = first.line;
            let name = match first.kind {
                TokenKind::Word { value, .. } => value,
                TokenKind::Semicolon => {
                    return Err(ConfError::at("unexpected \";\"", lx.file(), line))
                }
                TokenKind::Open => return Err(ConfError::at("unexpected \"{\"", lx.file(), line)),
                TokenKind::Close if depth > 0 => return Ok(out),
                TokenKind::Close => return Err(ConfError::at("unexpected \"}\"", lx.file(), line)),
                TokenKind::Eof if depth > 0 => {
                    return Err(ConfError::at(
                        "unexpected end of file, expecting \"}\"",
                        lx.file(),
                        line,
                    ))
                }
                TokenKind::Eof => return Ok(out),
            };

            let mut args = Vec::new();
            let mut quoted = Vec::new();
            let end = loop {
                let t = lx.next_token()?;
                match t.kind {
                    TokenKind::Word { value, quoted: q } => {
                        let value = interpolate(&value, self.env)
                            .map_err(|var| {
                                ConfError::at(
                                    format!("environment variable \"{var}\" is not set"),
                                    lx.file(),
                                    t.line,
                                )
                            })?
                            .into_owned();
                        args.push(value);
                        quoted.push(q);
                    }
                    TokenKind::Semicolon => break End::Semicolon,
                    TokenKind::Open => break End::Open,
                    TokenKind::Close => {
                        return Err(ConfError::at("unexpected \"}\"", lx.file(), t.line))
                    }
                    TokenKind::Eof => {
                        return Err(ConfError::at(EOF_IN_DIRECTIVE, lx.file(), t.line))
                    }
                }
            };

            let file = Arc::clone(lx.file());
            let lua = name.ends_with("_by_lua_block");
            let block = match end {
                End::Semicolon if lua => {
                    return Err(ConfError::at(
                        format!("directive \"{name}\" has no opening \"{{\""),
                        &file,
                        line,
                    ));
                }
                End::Semicolon if name == "include" => {
                    out.extend(self.include(&args, &file, line)?);
                    continue;
                }
                End::Semicolon => None,
                End::Open if lua => {
                    args.push(lx.lua_body()?);
                    quoted.push(false);
                    None
                }
                End::Open if name == "include" => {
                    return Err(ConfError::at(
                        "directive \"include\" is not terminated by \";\"",
                        &file,
                        line,
                    ));
                }
                End::Open => {
                    if depth + 1 > MAX_BLOCK_DEPTH {
                        return Err(ConfError::at("blocks nested too deeply", &file, line));
                    }
                    Some(self.block(lx, depth + 1)?)
                }
            };
            out.push(Directive {
                name,
                args,
                quoted,
                block,
                file,
                line,
            });
        }
    }

    /// Expand `include <path-or-glob>;` into the directives of the files it names.
    fn include(
        &mut self,
        args: &[String],
        file: &str,
        line: usize,
    ) -> Result<Vec<Directive>, ConfError> {
        let [arg] = args else {
            return Err(ConfError::at(
                "invalid number of arguments in \"include\" directive",
                file,
                line,
            ));
        };
        if self.includes >= MAX_INCLUDE_DEPTH {
            return Err(ConfError::at(
                format!(
                    "include nesting deeper than {MAX_INCLUDE_DEPTH} levels (recursive include?)"
                ),
                file,
                line,
            ));
        }
        let paths = if arg.contains(['*', '?', '[']) {
            self.glob(arg, file, line)?
        } else {
            vec![lexical_normalize(&self.conf_dir.join(arg))]
        };

        let mut out = Vec::new();
        for path in paths {
            let text =
                read_text(&path).map_err(|e| ConfError::at(open_failed(&path, &e), file, line))?;
            let name = self.display_name(&path);
            self.includes += 1;
            let parsed = self.parse_text(&text, &name);
            self.includes -= 1;
            out.extend(parsed?);
        }
        Ok(out)
    }

    /// Files matching an include pattern, sorted; directories are skipped and no match is fine.
    fn glob(&self, arg: &str, file: &str, line: usize) -> Result<Vec<PathBuf>, ConfError> {
        let pattern = if Path::new(arg).is_absolute() {
            arg.to_string()
        } else {
            // The directory part is literal text; only the user's pattern may hold wildcards.
            let dir = glob::Pattern::escape(&self.conf_dir.to_string_lossy());
            format!("{}/{}", dir.trim_end_matches('/'), arg)
        };
        let entries = glob::glob(&pattern).map_err(|e| {
            ConfError::at(
                format!("invalid include pattern \"{arg}\": {}", e.msg),
                file,
                line,
            )
        })?;
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| {
                ConfError::at(
                    format!("glob() \"{}\" failed ({})", e.path().display(), e.error()),
                    file,
                    line,
                )
            })?;
            if !path.is_dir() {
                paths.push(lexical_normalize(&path));
            }
        }
        paths.sort();
        Ok(paths)
    }

    /// How a file is named in messages: relative to the prefix when under it, else absolute.
    fn display_name(&self, abs: &Path) -> String {
        if let Some(rel) = self
            .prefix
            .as_deref()
            .and_then(|p| abs.strip_prefix(p).ok())
        {
            if !rel.as_os_str().is_empty() {
                return rel.to_string_lossy().into_owned();
            }
        }
        abs.to_string_lossy().into_owned()
    }
}

/// Replace `${NAME:-default}` (always) and `${NAME}` (when NAME looks like an environment
/// variable: uppercase, digits, underscore, not starting with a digit). Lowercase `${host}` and
/// digit-only `${1}` are nginx variables and regex captures and stay as written. On an unset
/// uppercase `${NAME}` returns `Err(NAME)`.
fn interpolate<'a>(value: &'a str, env: EnvLookup<'_>) -> Result<Cow<'a, str>, String> {
    if !value.contains("${") {
        return Ok(Cow::Borrowed(value));
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let name_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let (name, tail) = after.split_at(name_len);
        if let Some(with_default) = tail.strip_prefix(":-").filter(|_| name_len > 0) {
            if let Some(end) = with_default.find('}') {
                match env(name).filter(|v| !v.is_empty()) {
                    Some(v) => out.push_str(&v),
                    None => out.push_str(&with_default[..end]),
                }
                rest = &with_default[end + 1..];
                continue;
            }
        } else if let Some(after_close) = tail.strip_prefix('}').filter(|_| is_env_name(name)) {
            out.push_str(&env(name).ok_or_else(|| name.to_string())?);
            rest = after_close;
            continue;
        }
        out.push_str("${");
        rest = after;
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

fn is_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_uppercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
}

fn read_text(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// nginx's `open() "/path" failed (2: No such file or directory)`.
fn open_failed(path: &Path, err: &std::io::Error) -> String {
    let text = err.to_string();
    match err.raw_os_error() {
        Some(code) => {
            let reason = text.split(" (os error").next().unwrap_or(&text);
            format!("open() \"{}\" failed ({code}: {reason})", path.display())
        }
        None => format!("open() \"{}\" failed ({text})", path.display()),
    }
}

/// An absolute, `.`/`..`-free form of `p` (lexically: symlinks are not resolved, so names in
/// messages stay the ones the user wrote).
fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return lexical_normalize(p);
    }
    match std::env::current_dir() {
        Ok(cwd) => lexical_normalize(&cwd.join(p)),
        Err(_) => lexical_normalize(p),
    }
}

fn lexical_normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(c);
                }
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn test_env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("8080".into()),
            "EMPTY" => Some(String::new()),
            "host" => Some("from-env".into()),
            "UP_1" => Some("10.0.0.1".into()),
            _ => None,
        }
    }

    fn parse_env(src: &str, env: EnvLookup<'_>) -> Result<Vec<Directive>, ConfError> {
        let mut p = Parser {
            conf_dir: PathBuf::from("/nonexistent"),
            prefix: None,
            files: Vec::new(),
            includes: 0,
            env,
        };
        p.parse_unrecorded(src, "conf/x.conf")
    }

    fn parse(src: &str) -> Result<Vec<Directive>, ConfError> {
        parse_env(src, &test_env)
    }

    fn err(src: &str) -> String {
        parse(src).unwrap_err().to_string()
    }

    #[test]
    fn simple_directives_and_lines() {
        let t = parse("worker_processes 2;\n\nevents {\n  worker_connections 1024;\n}\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "worker_processes");
        assert_eq!(t[0].args, vec!["2"]);
        assert_eq!(t[0].quoted, vec![false]);
        assert_eq!(t[0].line, 1);
        assert!(t[0].block.is_none());
        assert_eq!(&*t[0].file, "conf/x.conf");
        assert_eq!(t[1].name, "events");
        assert_eq!(t[1].line, 3);
        let inner = t[1].block.as_ref().unwrap();
        assert_eq!(inner[0].name, "worker_connections");
        assert_eq!(inner[0].line, 4);
        assert_eq!(t[1].location(), "conf/x.conf:3");
    }

    #[test]
    fn directive_line_is_the_name_line() {
        let t = parse("listen\n  80\n  ;").unwrap();
        assert_eq!(t[0].line, 1);
    }

    #[test]
    fn nested_blocks() {
        let src = "http { server { listen 80; location / { if ($a) { return 200; } } } server {} }";
        let t = parse(src).unwrap();
        let http = t[0].block.as_ref().unwrap();
        assert_eq!(http.len(), 2);
        let server = http[0].block.as_ref().unwrap();
        assert_eq!(server[1].name, "location");
        assert_eq!(server[1].args, vec!["/"]);
        let loc = server[1].block.as_ref().unwrap();
        assert_eq!(loc[0].name, "if");
        assert_eq!(loc[0].args, vec!["($a)"]);
        assert_eq!(loc[0].block.as_ref().unwrap()[0].args, vec!["200"]);
        assert_eq!(http[1].block, Some(vec![]));
    }

    #[test]
    fn quoting_and_escapes_in_directives() {
        let t = parse(r#"add_header X-A "a b" 'c;d' e\"f "\d+\.x";"#).unwrap();
        assert_eq!(t[0].args, vec!["X-A", "a b", "c;d", "e\"f", "\\d+\\.x"]);
        assert_eq!(t[0].quoted, vec![false, true, true, false, true]);
        let t = parse("return 200 \"line\\n\";").unwrap();
        assert_eq!(t[0].args[1], "line\n");
    }

    #[test]
    fn if_with_quoted_regex_and_paren() {
        let t = parse("if ($uri ~ \"^/a b\") { return 403; }").unwrap();
        assert_eq!(t[0].args, vec!["($uri", "~", "^/a b)"]);
        assert_eq!(t[0].quoted, vec![false, false, true]);
    }

    #[test]
    fn comments_everywhere() {
        let t = parse("# c1\nhttp { # c2\n  a 1; # c3 }\n  b \"#not\"; # ;\n}\n# end").unwrap();
        let http = t[0].block.as_ref().unwrap();
        assert_eq!(http.len(), 2);
        assert_eq!(http[1].args, vec!["#not"]);
    }

    #[test]
    fn nginx_variables_stay_text() {
        let t = parse("proxy_set_header Host $host; set $x ${host}_a; rewrite ^(.*)$ /p${1}q;")
            .unwrap();
        assert_eq!(t[0].args[1], "$host");
        // Lowercase ${host} is nginx syntax even when an env var of that name exists.
        assert_eq!(t[1].args[1], "${host}_a");
        assert_eq!(t[2].args[1], "/p${1}q");
    }

    #[test]
    fn env_interpolation() {
        let t = parse(
            "listen ${PORT};\nlisten \"${PORT}\";\nx ${NOPE:-9000} ${PORT:-1} ${EMPTY:-d} ${EMPTY} a${UP_1}:${PORT}b;\n\
             y '${host:-dflt}' ${lower:-v} ${NOPE:-};",
        )
        .unwrap();
        assert_eq!(t[0].args, vec!["8080"]);
        assert_eq!(t[1].args, vec!["8080"]);
        assert_eq!(t[1].quoted, vec![true]);
        assert_eq!(t[2].args, vec!["9000", "8080", "d", "", "a10.0.0.1:8080b"]);
        assert_eq!(t[3].args, vec!["from-env", "v", ""]);
    }

    #[test]
    fn env_interpolation_leaves_malformed_text() {
        let t = parse("x ${PORT ${ $ ${Mixed} ${:-a} \"${PORT:-x\";").unwrap();
        assert_eq!(
            t[0].args,
            vec!["${PORT", "${", "$", "${Mixed}", "${:-a}", "${PORT:-x"]
        );
    }

    #[test]
    fn env_unset_is_an_error_with_line() {
        let e = err("a 1;\nb\n  ${MISSING_VAR};");
        assert_eq!(
            e,
            "environment variable \"MISSING_VAR\" is not set in conf/x.conf:3"
        );
        let e = parse_env("a \"x${X}\";", &no_env).unwrap_err().to_string();
        assert_eq!(e, "environment variable \"X\" is not set in conf/x.conf:1");
    }

    #[test]
    fn env_from_process_environment() {
        std::env::set_var("TIDEGATE_PARSER_TEST_PORT", "1234");
        let t = parse_str("listen ${TIDEGATE_PARSER_TEST_PORT};", "-g", Path::new("/")).unwrap();
        assert_eq!(t[0].args, vec!["1234"]);
        let e = parse_str(
            "a;\nlisten ${TIDEGATE_PARSER_TEST_UNSET};",
            "-g",
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment variable \"TIDEGATE_PARSER_TEST_UNSET\" is not set in -g:2"
        );
    }

    #[test]
    fn lua_block_body_is_one_raw_arg() {
        let src = "location / {\n  content_by_lua_block {\n    local t = { a = \"}\" }\n    ngx.say('${PORT}')\n  }\n  b 1;\n}";
        let t = parse(src).unwrap();
        let loc = t[0].block.as_ref().unwrap();
        let lua = &loc[0];
        assert_eq!(lua.name, "content_by_lua_block");
        assert!(lua.is_lua_block());
        assert!(lua.block.is_none());
        assert_eq!(lua.line, 2);
        assert_eq!(
            lua.args,
            vec!["\n    local t = { a = \"}\" }\n    ngx.say('${PORT}')\n  "]
        );
        assert_eq!(lua.quoted, vec![false]);
        assert_eq!(loc[1].name, "b");
        assert_eq!(loc[1].line, 6);
    }

    #[test]
    fn lua_block_with_strings_long_strings_and_comments() {
        let body = r#"
    local a = "}" .. '}' .. "\"}" .. '\'}'
    local b = [[ } ]] .. [==[ ]] } ]==]
    -- a } in a comment
    --[[ long
         } comment ]]
    --[=[ } ]] ]=]
    if a then local t = {} end
"#;
        let src = format!("access_by_lua_block {{{body}}}\nnext_one;");
        let t = parse(&src).unwrap();
        assert_eq!(t[0].args, vec![body]);
        assert_eq!(t[1].name, "next_one");
        assert_eq!(t[1].line, 10);
    }

    #[test]
    fn set_by_lua_block_keeps_leading_args() {
        let t = parse("set_by_lua_block $v ${PORT} { return ngx.var.a .. \"}\" }").unwrap();
        assert_eq!(t[0].name, "set_by_lua_block");
        assert_eq!(t[0].args, vec!["$v", "8080", " return ngx.var.a .. \"}\" "]);
        assert_eq!(t[0].quoted, vec![false, false, false]);
    }

    #[test]
    fn lua_block_without_brace() {
        assert_eq!(
            err("\ncontent_by_lua_block;"),
            "directive \"content_by_lua_block\" has no opening \"{\" in conf/x.conf:2"
        );
    }

    #[test]
    fn unterminated_lua_block() {
        assert_eq!(
            err("content_by_lua_block {\n ngx.say('}')\n"),
            "unexpected end of file, expecting \"}\" in conf/x.conf:3"
        );
    }

    #[test]
    fn syntax_errors_with_lines() {
        assert_eq!(err("a;\n\n}"), "unexpected \"}\" in conf/x.conf:3");
        assert_eq!(err("a;\nb c\n}"), "unexpected \"}\" in conf/x.conf:3");
        assert_eq!(
            err("a;\nb c"),
            "unexpected end of file, expecting \";\" or \"}\" in conf/x.conf:2"
        );
        assert_eq!(
            err("a;\nb c\n"),
            "unexpected end of file, expecting \";\" or \"}\" in conf/x.conf:3"
        );
        assert_eq!(
            err("http {\n a;\n"),
            "unexpected end of file, expecting \"}\" in conf/x.conf:3"
        );
        assert_eq!(err("a;\n ;"), "unexpected \";\" in conf/x.conf:2");
        assert_eq!(err("http {\n\n {"), "unexpected \"{\" in conf/x.conf:3");
        assert_eq!(err("a \"b\"c;"), "unexpected \"c\" in conf/x.conf:1");
        assert_eq!(
            err("a \"b;\n"),
            "unexpected end of file, expecting \";\" or \"}\" in conf/x.conf:2"
        );
        assert_eq!(
            err("\ninclude a b;"),
            "invalid number of arguments in \"include\" directive in conf/x.conf:2"
        );
        assert_eq!(
            err("include a {"),
            "directive \"include\" is not terminated by \";\" in conf/x.conf:1"
        );
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let src = "a {".repeat(10_000);
        assert!(err(&src).contains("nested too deeply"));
    }

    #[test]
    fn empty_input() {
        assert!(parse("").unwrap().is_empty());
        assert!(parse("  # only a comment\n").unwrap().is_empty());
    }

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(p, text).unwrap();
    }

    #[test]
    fn parse_file_with_includes_and_globs() {
        let tmp = tempfile::tempdir().unwrap();
        let prefix = tmp.path();
        write(prefix, "conf/nginx.conf", "events {}\nhttp {\n  include mime.types;\n  include conf.d/*.conf;\n  include conf.d/none-*.conf;\n  z 1;\n}\n");
        write(prefix, "conf/mime.types", "types {\n  text/html html;\n}\n");
        write(prefix, "conf/conf.d/b.conf", "server { listen 2; }\n");
        write(
            prefix,
            "conf/conf.d/a.conf",
            "\nserver { listen 1; include snippets/s.inc; }\n",
        );
        write(prefix, "conf/conf.d/c.txt", "not included;\n");
        fs::create_dir_all(prefix.join("conf/conf.d/dir.conf")).unwrap();
        write(
            prefix,
            "conf/snippets/s.inc",
            "# snippet\nadd_header X 1;\n",
        );

        let parsed = parse_file(&prefix.join("conf/nginx.conf"), prefix).unwrap();
        let names: Vec<&str> = parsed.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "conf/nginx.conf",
                "conf/mime.types",
                "conf/conf.d/a.conf",
                "conf/snippets/s.inc",
                "conf/conf.d/b.conf"
            ]
        );
        assert_eq!(parsed.files[1].1, "types {\n  text/html html;\n}\n");

        let http = parsed.tree[1].block.as_ref().unwrap();
        let kinds: Vec<(&str, &str, usize)> = http
            .iter()
            .map(|d| (d.name.as_str(), &*d.file, d.line))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("types", "conf/mime.types", 1),
                ("server", "conf/conf.d/a.conf", 2),
                ("server", "conf/conf.d/b.conf", 1),
                ("z", "conf/nginx.conf", 6),
            ]
        );
        let a = http[1].block.as_ref().unwrap();
        assert_eq!(a[1].name, "add_header");
        assert_eq!(&*a[1].file, "conf/snippets/s.inc");
        assert_eq!(a[1].line, 2);

        let dumped = dump(&parsed);
        assert!(dumped.starts_with("# configuration file conf/nginx.conf:\nevents {}\n"));
        assert!(dumped.contains("\n\n# configuration file conf/mime.types:\ntypes {\n"));
        assert!(dumped.contains("add_header X 1;\n\n# configuration file conf/conf.d/b.conf:\n"));
        assert!(dumped.ends_with("server { listen 2; }\n\n"));
    }

    #[test]
    fn include_absolute_path_outside_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        write(other.path(), "extra.conf", "x 1;");
        let abs = other.path().join("extra.conf");
        write(
            tmp.path(),
            "conf/nginx.conf",
            &format!("include {};\n", abs.display()),
        );
        let parsed = parse_file(&tmp.path().join("conf/nginx.conf"), tmp.path()).unwrap();
        assert_eq!(&*parsed.tree[0].file, abs.to_string_lossy());
        assert_eq!(parsed.files[1].0, abs.to_string_lossy());
        assert_eq!(dump(&parsed).matches("# configuration file").count(), 2);
        assert!(dump(&parsed).contains("x 1;\n\n"));
    }

    #[test]
    fn include_with_env_path() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            "conf/nginx.conf",
            "include ${TIDEGATE_PARSER_NO_SUCH:-site}.conf;\n",
        );
        write(tmp.path(), "conf/site.conf", "s 1;");
        let parsed = parse_file(&tmp.path().join("conf/nginx.conf"), tmp.path()).unwrap();
        assert_eq!(parsed.tree[0].name, "s");
    }

    #[test]
    fn missing_include_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            "conf/nginx.conf",
            "a;\nb;\nc;\nd;\ninclude missing.conf;\n",
        );
        let e = parse_file(&tmp.path().join("conf/nginx.conf"), tmp.path()).unwrap_err();
        let missing = tmp.path().join("conf/missing.conf");
        assert_eq!(
            e.to_string(),
            format!(
                "open() \"{}\" failed (2: No such file or directory) in conf/nginx.conf:5",
                missing.display()
            )
        );
    }

    #[test]
    fn missing_main_file() {
        let tmp = tempfile::tempdir().unwrap();
        let e = parse_file(&tmp.path().join("conf/nginx.conf"), tmp.path()).unwrap_err();
        let p = tmp.path().join("conf/nginx.conf");
        assert_eq!(
            e,
            ConfError::Plain(format!(
                "open() \"{}\" failed (2: No such file or directory)",
                p.display()
            ))
        );
    }

    #[test]
    fn errors_in_included_files_name_that_file() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            "conf/nginx.conf",
            "http {\n include sub.conf;\n}\n",
        );
        write(tmp.path(), "conf/sub.conf", "ok;\n\n}\n");
        let e = parse_file(&tmp.path().join("conf/nginx.conf"), tmp.path()).unwrap_err();
        assert_eq!(e.to_string(), "unexpected \"}\" in conf/sub.conf:3");
    }

    #[test]
    fn recursive_include_is_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "conf/nginx.conf", "include loop.conf;\n");
        write(tmp.path(), "conf/loop.conf", "a 1;\ninclude loop.conf;\n");
        let e = parse_file(&tmp.path().join("conf/nginx.conf"), tmp.path()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("include nesting deeper than 32 levels"),
            "{msg}"
        );
        assert!(msg.ends_with("in conf/loop.conf:2"), "{msg}");
    }

    #[test]
    fn relative_main_path_and_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "conf/nginx.conf", "include ./conf.d/*.conf;\n");
        write(tmp.path(), "conf/conf.d/one.conf", "one;");
        let via_dots = tmp.path().join("conf/../conf/./nginx.conf");
        let parsed = parse_file(&via_dots, &tmp.path().join(".")).unwrap();
        assert_eq!(parsed.files[0].0, "conf/nginx.conf");
        assert_eq!(parsed.files[1].0, "conf/conf.d/one.conf");
    }

    #[test]
    fn parse_str_includes_resolve_against_conf_dir() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "g.conf", "worker_processes 3;");
        let t = parse_str("include g.conf; daemon off;", "-g", tmp.path()).unwrap();
        assert_eq!(t[0].name, "worker_processes");
        assert_eq!(t[0].args, vec!["3"]);
        assert_eq!(t[1].name, "daemon");
        assert_eq!(&*t[1].file, "-g");
    }

    #[test]
    fn dump_format() {
        let parsed = Parsed {
            tree: vec![],
            files: vec![
                ("a.conf".into(), "x;".into()),
                ("b.conf".into(), "y;\n".into()),
            ],
        };
        assert_eq!(
            dump(&parsed),
            "# configuration file a.conf:\nx;\n\n# configuration file b.conf:\ny;\n\n"
        );
    }

    #[test]
    fn interpolate_borrows_when_nothing_to_do() {
        assert!(matches!(
            interpolate("plain", &no_env),
            Ok(Cow::Borrowed("plain"))
        ));
        assert_eq!(interpolate("${A:-x}${B:-y}", &no_env).unwrap(), "xy");
        assert!(is_env_name("_X1"));
        assert!(!is_env_name("1X"));
        assert!(!is_env_name("Ab"));
    }
}
