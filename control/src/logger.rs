//! A minimal logger: one line per record on stderr, with a UTC timestamp. The
//! daemonised router's stderr is its log file in the state directory.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

struct Logger {
    level: log::LevelFilter,
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
        let _ = writeln!(
            std::io::stderr().lock(),
            "{h:02}:{m:02}:{s:02}.{:03} {:<5} {}",
            now.subsec_millis(),
            r.level(),
            r.args()
        );
    }
    fn flush(&self) {}
}

/// Installs the logger at `level` (`--log-level`); without one,
/// `MESHNET_LOG=debug` (or trace, warn...) sets it; default info.
pub fn init(level: Option<&str>) {
    let level = level
        .and_then(|v| v.parse().ok())
        .or_else(|| std::env::var("MESHNET_LOG").ok().and_then(|v| v.parse().ok()))
        .unwrap_or(log::LevelFilter::Info);
    if log::set_boxed_logger(Box::new(Logger { level })).is_ok() {
        log::set_max_level(level);
    }
}
