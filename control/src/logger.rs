//! A minimal logger: one line per record on stderr, with a UTC timestamp. The
//! daemonised router's stderr is its log file in the state directory, kept
//! bounded: past [`LOG_MAX_BYTES`] it becomes `meshnet.log.1` (replacing the
//! one before) and a new `meshnet.log` takes over stderr. A router in the
//! foreground (systemd, a container) logs to a stderr it does not own: never
//! rotated.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Size past which the daemonised router's log is rotated (so the state
/// directory holds at most about twice this much log).
pub const LOG_MAX_BYTES: u64 = 16 << 20;
/// How many bytes may be logged between two looks at the log file's size.
const CHECK_EVERY: u64 = 64 << 10;

struct Logger {
    level: log::LevelFilter,
    rotation: Option<Rotation>,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = now.as_secs();
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let line = format!("{h:02}:{m:02}:{s:02}.{:03} {:<5} {}\n", now.subsec_millis(), r.level(), r.args());
        // (A line the log cannot take cannot be said anywhere else either.)
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        if let Some(rot) = &self.rotation {
            rot.wrote(line.len() as u64);
        }
    }
    fn flush(&self) {}
}

/// Keeps the log file that `fd` writes to (at `path`) below `max` bytes.
struct Rotation {
    path: PathBuf,
    fd: RawFd,
    max: u64,
    since_check: AtomicU64,
    busy: Mutex<()>,
}

impl Rotation {
    /// Counts `n` bytes written; every [`CHECK_EVERY`] bytes, rotates the file
    /// if it is full and points `fd` at the new one.
    fn wrote(&self, n: u64) {
        if self.since_check.fetch_add(n, Ordering::Relaxed) + n < CHECK_EVERY {
            return;
        }
        let Ok(_busy) = self.busy.try_lock() else { return };
        self.since_check.store(0, Ordering::Relaxed);
        self.check();
    }

    fn check(&self) {
        match rotate_if_full(&self.path, self.max) {
            Ok(Some(new)) => {
                // SAFETY: dup2 between two open descriptors: `new` is ours and
                // open; `self.fd` is the descriptor the log is written to.
                if unsafe { libc::dup2(new.as_raw_fd(), self.fd) } < 0 {
                    let e = std::io::Error::last_os_error();
                    let _ = writeln!(std::io::stderr(), "cannot switch to the new log {}: {e}", self.path.display());
                }
            }
            Ok(None) => {}
            Err(e) => {
                // Said once per CHECK_EVERY bytes at most, into the old file.
                let _ = writeln!(std::io::stderr(), "cannot rotate the log {}: {e}", self.path.display());
            }
        }
    }
}

/// If the file at `path` holds `max` bytes or more, renames it to `PATH.1`
/// (replacing what was there) and returns a new, empty file at `path`, opened
/// for appending.
pub fn rotate_if_full(path: &Path, max: u64) -> std::io::Result<Option<File>> {
    if std::fs::metadata(path)?.len() < max {
        return Ok(None);
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::rename(path, &old)?;
    let new = std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().create(true).append(true), 0o600).open(path)?;
    Ok(Some(new))
}

/// Whether this process's stderr is the file at `path`.
fn stderr_is(path: &Path) -> bool {
    let Ok(file) = std::fs::metadata(path) else { return false };
    // SAFETY: stat is plain data; zeroed is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on descriptor 2 into a struct we own.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev == file.dev() && st.st_ino == file.ino()
}

/// Whether `MESHNET_LOG`, when set, names a level [`init`] takes (a launch
/// refuses one that does not, as it refuses such a `--log-level`).
pub fn check_env() -> Result<(), String> {
    match std::env::var_os("MESHNET_LOG") {
        Some(v) if v.to_str().and_then(|v| v.parse::<log::LevelFilter>().ok()).is_none() => {
            Err(format!("MESHNET_LOG={}: give error, warn, info, debug or trace (or off)", v.to_string_lossy()))
        }
        _ => Ok(()),
    }
}

/// Installs the logger at `level` (`--log-level`); without one,
/// `MESHNET_LOG=debug` (or trace, warn...) sets it; default info. When stderr
/// is `log_file` (the daemonised router's `meshnet.log`), it is rotated.
pub fn init(level: Option<&str>, log_file: Option<&Path>) {
    let level = level
        .and_then(|v| v.parse().ok())
        .or_else(|| std::env::var("MESHNET_LOG").ok().and_then(|v| v.parse().ok()))
        .unwrap_or(log::LevelFilter::Info);
    let rotation = log_file.filter(|p| stderr_is(p)).map(|p| Rotation {
        path: p.to_path_buf(),
        fd: 2,
        max: LOG_MAX_BYTES,
        since_check: AtomicU64::new(0),
        busy: Mutex::new(()),
    });
    // A log grown by earlier runs is rotated at once.
    if let Some(r) = &rotation {
        r.check();
    }
    if log::set_boxed_logger(Box::new(Logger { level, rotation })).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meshnet-logger-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_full_log_is_rotated_once_and_the_old_one_replaced() {
        let d = temp_dir("rotate");
        let path = d.join("meshnet.log");
        std::fs::write(&path, "a".repeat(10)).unwrap();
        assert!(rotate_if_full(&path, 11).unwrap().is_none());
        assert!(!d.join("meshnet.log.1").exists());
        let mut new = rotate_if_full(&path, 10).unwrap().expect("a full log is rotated");
        new.write_all(b"b").unwrap();
        assert_eq!(std::fs::read_to_string(d.join("meshnet.log.1")).unwrap(), "a".repeat(10));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b");
        std::fs::write(&path, "c".repeat(10)).unwrap();
        rotate_if_full(&path, 10).unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(d.join("meshnet.log.1")).unwrap(), "c".repeat(10));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Logging far past the limit through one descriptor (stderr in the
    /// router) leaves at most about twice the limit on disk, and the newest
    /// lines in the file at the log's path.
    #[test]
    fn logging_forever_keeps_the_log_bounded() {
        let d = temp_dir("bounded");
        let path = d.join("meshnet.log");
        let f = OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let max = 4 * CHECK_EVERY;
        let rot = Rotation { path: path.clone(), fd: f.as_raw_fd(), max, since_check: AtomicU64::new(0), busy: Mutex::new(()) };
        let line = format!("{}\n", "x".repeat(99));
        for i in 0..20_000 {
            let text = if i == 19_999 { "the last line\n".to_string() } else { line.clone() };
            // As the logger writes: through the descriptor, whatever file it is now.
            // SAFETY: write from a live buffer of that length to a descriptor `f` keeps open.
            let n = unsafe { libc::write(rot.fd, text.as_ptr().cast(), text.len()) };
            assert_eq!(n as usize, text.len());
            rot.wrote(text.len() as u64);
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let total = size(&path) + size(&d.join("meshnet.log.1"));
        assert!(total < 2 * (max + CHECK_EVERY), "{total} bytes of log for a limit of {max}");
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("the last line\n"));
        drop(f);
        let _ = std::fs::remove_dir_all(&d);
    }
}
