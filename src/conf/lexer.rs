//! Tokenizer for nginx.conf: words (quoted or not), `;`, `{`, `}`, with nginx's quoting, escape
//! and comment rules, plus a raw mode that reads a `*_by_lua_block` body up to its matching `}`
//! while understanding Lua strings, long brackets and comments.
//!
//! The lexer is pulled by the parser, because only the parser knows when a `{` opens a Lua body
//! rather than a block of directives. It does no `${ENV}` interpolation: that is the parser's.

use std::sync::Arc;

use super::ConfError;

/// What a token is.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenKind {
    /// An argument or directive name, after quote removal and escape processing.
    Word { value: String, quoted: bool },
    /// `;`
    Semicolon,
    /// `{`
    Open,
    /// `}`
    Close,
    /// End of input.
    Eof,
}

/// A token and the line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub kind: TokenKind,
    pub line: usize,
}

/// A cursor over one file's text.
pub struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: usize,
    file: Arc<str>,
}

/// nginx's message when input stops in the middle of a directive.
pub const EOF_IN_DIRECTIVE: &str = "unexpected end of file, expecting \";\" or \"}\"";

impl<'a> Lexer<'a> {
    /// A lexer over `src`, naming `file` in its errors.
    pub fn new(src: &'a str, file: Arc<str>) -> Self {
        Lexer {
            src: src.as_bytes(),
            pos: 0,
            line: 1,
            file,
        }
    }

    /// The current line (1-based), i.e. where the next token or the end of input is.
    pub fn line(&self) -> usize {
        self.line
    }

    /// The display name of the file being read.
    pub fn file(&self) -> &Arc<str> {
        &self.file
    }

    fn err(&self, msg: impl AsRef<str>, line: usize) -> ConfError {
        ConfError::at(msg, &self.file, line)
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn peek_at(&self, off: usize) -> Option<u8> {
        self.src.get(self.pos + off).copied()
    }

    /// Advance one byte, counting lines.
    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.pos += 1;
        if c == b'\n' {
            self.line += 1;
        }
        Some(c)
    }

    /// Skip whitespace and `#` comments (a `#` only starts a comment where a token could start).
    fn skip_space(&mut self) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\r' | b'\n' => {
                    self.bump();
                }
                b'#' => {
                    while let Some(c) = self.peek() {
                        if c == b'\n' {
                            break;
                        }
                        self.bump();
                    }
                }
                _ => break,
            }
        }
    }

    /// The next token of the directive language.
    pub fn next_token(&mut self) -> Result<Token, ConfError> {
        self.skip_space();
        let line = self.line;
        let Some(c) = self.peek() else {
            return Ok(Token {
                kind: TokenKind::Eof,
                line,
            });
        };
        let kind = match c {
            b';' => {
                self.bump();
                TokenKind::Semicolon
            }
            b'{' => {
                self.bump();
                TokenKind::Open
            }
            b'}' => {
                self.bump();
                TokenKind::Close
            }
            b'"' | b'\'' => self.quoted_word(c)?,
            _ => self.bare_word(),
        };
        Ok(Token { kind, line })
    }

    /// A quoted token; the cursor is on the opening quote.
    fn quoted_word(&mut self, quote: u8) -> Result<TokenKind, ConfError> {
        self.bump();
        let start = self.pos;
        loop {
            match self.bump() {
                None => return Err(self.err(EOF_IN_DIRECTIVE, self.line)),
                Some(b'\\') => {
                    // The escaped byte can never close the string; unescape() decides its meaning.
                    if self.bump().is_none() {
                        return Err(self.err(EOF_IN_DIRECTIVE, self.line));
                    }
                }
                Some(c) if c == quote => break,
                Some(_) => {}
            }
        }
        let mut value = unescape(&self.src[start..self.pos - 1]);
        // nginx accepts `if ($a ~ "x")`: a `)` may follow the closing quote without a space.
        let folded = self.peek() == Some(b')');
        if folded {
            self.bump();
            value.push(')');
        }
        match self.peek() {
            None | Some(b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{') => {}
            // After a folded `)` nginx lets the next token start at once.
            Some(_) if folded => {}
            Some(c) => {
                let shown = self.char_at(self.pos, c);
                return Err(self.err(format!("unexpected \"{shown}\""), self.line));
            }
        }
        Ok(TokenKind::Word {
            value,
            quoted: true,
        })
    }

    /// The (possibly multi-byte) character starting at `at`, for messages.
    fn char_at(&self, at: usize, first: u8) -> String {
        let end = (at + 4).min(self.src.len());
        let tail = String::from_utf8_lossy(&self.src[at..end]);
        tail.chars()
            .next()
            .map(String::from)
            .unwrap_or_else(|| (first as char).to_string())
    }

    /// An unquoted token: runs to whitespace, `;` or `{` (a `{` right after `$` belongs to a
    /// `${var}` and does not end it; `}` never ends a word, as in nginx).
    fn bare_word(&mut self) -> TokenKind {
        let start = self.pos;
        let mut after_dollar = false;
        while let Some(c) = self.peek() {
            if c == b'{' && after_dollar {
                after_dollar = false;
                self.bump();
                continue;
            }
            after_dollar = false;
            match c {
                b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{' => break,
                b'\\' => {
                    self.bump();
                    self.bump();
                }
                b'$' => {
                    after_dollar = true;
                    self.bump();
                }
                _ => {
                    self.bump();
                }
            }
        }
        TokenKind::Word {
            value: unescape(&self.src[start..self.pos]),
            quoted: false,
        }
    }

    /// Read a Lua block body; the cursor is just past its opening `{`. Returns the text between
    /// the braces verbatim and leaves the cursor past the closing `}`.
    pub fn lua_body(&mut self) -> Result<String, ConfError> {
        let start = self.pos;
        let mut depth = 0usize;
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err("unexpected end of file, expecting \"}\"", self.line));
            };
            match c {
                b'{' => {
                    depth += 1;
                    self.bump();
                }
                b'}' => {
                    if depth == 0 {
                        let body = String::from_utf8_lossy(&self.src[start..self.pos]).into_owned();
                        self.bump();
                        return Ok(body);
                    }
                    depth -= 1;
                    self.bump();
                }
                b'"' | b'\'' => self.skip_lua_string(c),
                b'[' => {
                    if let Some(level) = self.long_bracket_level() {
                        self.skip_long_bracket(level);
                    } else {
                        self.bump();
                    }
                }
                b'-' if self.peek_at(1) == Some(b'-') => {
                    self.bump();
                    self.bump();
                    if let Some(level) = self
                        .long_bracket_level()
                        .filter(|_| self.peek() == Some(b'['))
                    {
                        self.skip_long_bracket(level);
                    } else {
                        while let Some(c) = self.peek() {
                            if c == b'\n' {
                                break;
                            }
                            self.bump();
                        }
                    }
                }
                _ => {
                    self.bump();
                }
            }
        }
    }

    /// A short Lua string; stops at the closing quote, or at a newline/end of input (a Lua syntax
    /// error that Lua itself will report with a better message).
    fn skip_lua_string(&mut self, quote: u8) {
        self.bump();
        while let Some(c) = self.peek() {
            match c {
                b'\\' => {
                    self.bump();
                    self.bump();
                }
                b'\n' => return,
                _ if c == quote => {
                    self.bump();
                    return;
                }
                _ => {
                    self.bump();
                }
            }
        }
    }

    /// If the cursor is on `[`, `[=...=[`, the number of `=`; `None` if it is not a long bracket.
    fn long_bracket_level(&self) -> Option<usize> {
        if self.peek() != Some(b'[') {
            return None;
        }
        let mut n = 0;
        while self.peek_at(1 + n) == Some(b'=') {
            n += 1;
        }
        (self.peek_at(1 + n) == Some(b'[')).then_some(n)
    }

    /// Skip a long string or long comment of the given level, opening bracket included. An
    /// unterminated one runs to end of input, where `lua_body` reports the missing `}`.
    fn skip_long_bracket(&mut self, level: usize) {
        for _ in 0..level + 2 {
            self.bump();
        }
        while let Some(c) = self.peek() {
            if c == b']' {
                let mut n = 0;
                while self.peek_at(1 + n) == Some(b'=') {
                    n += 1;
                }
                if n == level && self.peek_at(1 + n) == Some(b']') {
                    for _ in 0..level + 2 {
                        self.bump();
                    }
                    return;
                }
            }
            self.bump();
        }
    }
}

/// nginx's escape rules, for quoted and bare tokens alike: `\"`, `\'`, `\\` drop the backslash,
/// `\n`, `\r`, `\t` become control characters, any other `\x` keeps its backslash (so regexes
/// like `\d` and `\.` survive unchanged).
pub fn unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if c == b'\\' {
            match raw.get(i + 1) {
                Some(&e @ (b'"' | b'\'' | b'\\')) => {
                    out.push(e);
                    i += 2;
                    continue;
                }
                Some(b'n') => {
                    out.push(b'\n');
                    i += 2;
                    continue;
                }
                Some(b'r') => {
                    out.push(b'\r');
                    i += 2;
                    continue;
                }
                Some(b't') => {
                    out.push(b'\t');
                    i += 2;
                    continue;
                }
                _ => {}
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(src: &str) -> Result<Vec<TokenKind>, ConfError> {
        let mut lx = Lexer::new(src, Arc::from("t.conf"));
        let mut out = Vec::new();
        loop {
            let t = lx.next_token()?;
            if t.kind == TokenKind::Eof {
                return Ok(out);
            }
            out.push(t.kind);
        }
    }

    fn w(s: &str) -> TokenKind {
        TokenKind::Word {
            value: s.into(),
            quoted: false,
        }
    }

    fn q(s: &str) -> TokenKind {
        TokenKind::Word {
            value: s.into(),
            quoted: true,
        }
    }

    #[test]
    fn words_and_punctuation() {
        let toks = lex("listen 80;\nhttp{server {}}").unwrap();
        assert_eq!(
            toks,
            vec![
                w("listen"),
                w("80"),
                TokenKind::Semicolon,
                w("http"),
                TokenKind::Open,
                w("server"),
                TokenKind::Open,
                TokenKind::Close,
                TokenKind::Close
            ]
        );
    }

    #[test]
    fn close_brace_does_not_end_a_word_but_dollar_brace_is_kept() {
        assert_eq!(
            lex("a} ${host}x;").unwrap(),
            vec![w("a}"), w("${host}x"), TokenKind::Semicolon]
        );
        assert_eq!(lex("a{").unwrap(), vec![w("a"), TokenKind::Open]);
    }

    #[test]
    fn comments() {
        let toks = lex("# top\na b#c; # tail ; {\n\"#x\";").unwrap();
        assert_eq!(
            toks,
            vec![
                w("a"),
                w("b#c"),
                TokenKind::Semicolon,
                q("#x"),
                TokenKind::Semicolon
            ]
        );
    }

    #[test]
    fn quotes_and_escapes() {
        let toks =
            lex(r#""a b" 'c"d' "e\"f" 'g\'h' "i\\j" "k\nl\tm\rn" "\d\." x\;y x\ y"#).unwrap();
        assert_eq!(
            toks,
            vec![
                q("a b"),
                q("c\"d"),
                q("e\"f"),
                q("g'h"),
                q("i\\j"),
                q("k\nl\tm\rn"),
                q("\\d\\."),
                w("x\\;y"),
                w("x\\ y"),
            ]
        );
    }

    #[test]
    fn quote_inside_word_is_literal() {
        assert_eq!(
            lex("a\"b\";").unwrap(),
            vec![w("a\"b\""), TokenKind::Semicolon]
        );
    }

    #[test]
    fn multiline_quoted_string_counts_lines() {
        let mut lx = Lexer::new("\"a\nb\"\nc", Arc::from("t"));
        assert_eq!(
            lx.next_token().unwrap(),
            Token {
                kind: q("a\nb"),
                line: 1
            }
        );
        assert_eq!(
            lx.next_token().unwrap(),
            Token {
                kind: w("c"),
                line: 3
            }
        );
    }

    #[test]
    fn paren_after_quote_is_folded() {
        assert_eq!(
            lex("if ($a ~ \"x y\") {").unwrap(),
            vec![w("if"), w("($a"), w("~"), q("x y)"), TokenKind::Open]
        );
    }

    #[test]
    fn junk_after_quote_is_an_error() {
        let e = lex("a \"b\"c;").unwrap_err();
        assert_eq!(e.to_string(), "unexpected \"c\" in t.conf:1");
        let e = lex("a\n'b'}").unwrap_err();
        assert_eq!(e.to_string(), "unexpected \"}\" in t.conf:2");
    }

    #[test]
    fn unterminated_quote() {
        let e = lex("a \"b;\n\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unexpected end of file, expecting \";\" or \"}\" in t.conf:3"
        );
    }

    fn body(src: &str) -> (String, String) {
        let mut lx = Lexer::new(src, Arc::from("t"));
        let b = lx.lua_body().unwrap();
        (b, String::from_utf8_lossy(&lx.src[lx.pos..]).into_owned())
    }

    #[test]
    fn lua_body_nested_tables() {
        assert_eq!(
            body(" local t = { a = {} } }rest"),
            (" local t = { a = {} } ".into(), "rest".into())
        );
    }

    #[test]
    fn lua_body_braces_in_strings() {
        let src = r#" ngx.say("}", '}', "\"}", '\'}') }X"#;
        assert_eq!(body(src).1, "X");
    }

    #[test]
    fn lua_body_long_strings_and_comments() {
        assert_eq!(body(" x = [[ } ]] }X").1, "X");
        assert_eq!(body(" x = [==[ ]] } ]=] ]==] }X").1, "X");
        assert_eq!(body(" -- } here\n }X").1, "X");
        assert_eq!(body(" --[[ } \n } ]] }X").1, "X");
        assert_eq!(body(" --[=[ ]] } ]=] }X").1, "X");
        // `--[` without a second `[` is a line comment.
        assert_eq!(body(" --[ }\n }X").1, "X");
        // A lone `[` and a single `-` are ordinary characters.
        assert_eq!(body(" t[1] = 2 - 1 }X").1, "X");
    }

    #[test]
    fn lua_body_counts_lines_and_reports_eof() {
        let mut lx = Lexer::new("\n a = '}\n", Arc::from("t"));
        // The unterminated short string ends at the newline; then input runs out.
        let e = lx.lua_body().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unexpected end of file, expecting \"}\" in t:3"
        );
        let mut lx = Lexer::new("\n[[ }\n}\n", Arc::from("t"));
        assert!(lx.lua_body().is_err());
    }
}
