//! The daemon's logger: stderr in the foreground, a file or syslog once detached.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

enum Sink {
    Stderr,
    File(Mutex<File>),
    Syslog,
}

struct Logger {
    sink: Sink,
    level: LevelFilter,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) || !r.target().starts_with("kekfs") {
            return;
        }
        let msg = format!("{}: {}", r.level(), r.args());
        match &self.sink {
            Sink::Stderr => eprintln!("kekfs[{}]: {msg}", std::process::id()),
            Sink::File(f) => {
                let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = crate::time::unix_now();
                let _ = writeln!(f, "{now} kekfs[{}]: {msg}", std::process::id());
            }
            Sink::Syslog => {
                let prio = match r.level() {
                    Level::Error => libc::LOG_ERR,
                    Level::Warn => libc::LOG_WARNING,
                    Level::Info => libc::LOG_INFO,
                    _ => libc::LOG_DEBUG,
                };
                if let Ok(c) = CString::new(msg.replace('\0', " ")) {
                    // SAFETY: "%s" with one valid C string argument.
                    unsafe { libc::syslog(prio, c"%s".as_ptr(), c.as_ptr()) };
                }
            }
        }
    }

    fn flush(&self) {}
}

/// Where log lines go.
pub enum Target {
    /// Standard error.
    Stderr,
    /// Append to this file.
    File(File),
    /// The system log (journal), ident "kekfs".
    Syslog,
}

/// Install the logger (once per process; later calls are ignored).
pub fn init(target: Target, verbose: bool) {
    let sink = match target {
        Target::Stderr => Sink::Stderr,
        Target::File(f) => Sink::File(Mutex::new(f)),
        Target::Syslog => {
            // SAFETY: the ident is a static C string; LOG_PID|LOG_DAEMON are plain flags.
            unsafe { libc::openlog(c"kekfs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
            Sink::Syslog
        }
    };
    let level = if verbose {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    if log::set_boxed_logger(Box::new(Logger { sink, level })).is_ok() {
        log::set_max_level(level);
    }
}
