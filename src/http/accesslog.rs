//! The access log: `log_format` templates written one line per request.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use super::request::ReqCtx;
use crate::conf::model::AccessLog;

type Files = Mutex<HashMap<PathBuf, Arc<Mutex<File>>>>;

fn files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(Default::default)
}

fn open(path: &Path) -> Option<Arc<Mutex<File>>> {
    let mut map = files().lock().ok()?;
    if let Some(f) = map.get(path) {
        return Some(f.clone());
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let f = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()?,
    ));
    map.insert(path.to_path_buf(), f.clone());
    Some(f)
}

/// Forget open files so a reload (or `-s reopen`) opens them anew.
pub fn reopen() {
    if let Ok(mut m) = files().lock() {
        m.clear();
    }
}

/// Write this request's line to every configured log.
pub fn write(rc: &ReqCtx, logs: &[AccessLog]) {
    let st = rc.st.borrow();
    for l in logs {
        let mut line = super::variables::eval_log(rc, &st, &l.format);
        for b in line.iter_mut() {
            if *b == b'\n' {
                *b = b' ';
            }
        }
        line.push(b'\n');
        if let Some(f) = open(&l.path) {
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(&line);
            }
        }
    }
}
