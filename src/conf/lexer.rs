//! Tokenizer for nginx.conf (stub: filled in by the parser work).
