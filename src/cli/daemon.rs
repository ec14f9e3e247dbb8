//! Becoming a daemon: fork after all checks, tell the waiting parent when the mount is
//! ready (or why it failed), and turn SIGTERM/SIGINT/SIGHUP into a clean unmount.

use super::error::CliError;
use super::exit;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

/// The child's end of the readiness pipe.
pub struct Ready {
    pipe: Option<File>,
    detached: bool,
}

impl Ready {
    /// Foreground mode: nobody is waiting.
    pub fn foreground() -> Self {
        Self {
            pipe: None,
            detached: false,
        }
    }

    /// Report success; the parent exits 0. In the foreground under systemd
    /// (`Type=notify`), tell the service manager the mount is ready.
    pub fn ok(&mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(b"0\n");
        } else if !self.detached {
            sd_notify(&format!("READY=1\nMAINPID={}", std::process::id()));
        }
    }

    /// Report failure; the parent prints the message and exits with the code.
    pub fn fail(&mut self, e: &CliError) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(format!("{}\n{}", e.code, e.message).as_bytes());
        }
    }

    /// True when detached from the terminal.
    pub fn detached(&self) -> bool {
        self.detached
    }
}

/// Send a state string to the service manager named by `$NOTIFY_SOCKET` (sd_notify(3)):
/// a socket path, or `@name` for an abstract socket. Silently does nothing without one.
pub fn sd_notify(state: &str) {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = target.as_encoded_bytes();
    let addr = match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(&target)),
        _ => return,
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        log::warn!("notifying the service manager failed: {e}");
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), CliError> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid two-int array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(CliError::failure(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Fork. In the parent this waits for the child's report and never returns; in the child
/// it returns the readiness handle. Must be called before any thread is started.
pub fn daemonize() -> Result<Ready, CliError> {
    let (r, w) = pipe()?;
    // SAFETY: the process is single-threaded here (no threads have been spawned yet), so
    // the child may keep running Rust code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(CliError::failure(format!(
            "fork: {}",
            std::io::Error::last_os_error()
        )));
    }
    if pid > 0 {
        drop(w);
        let mut s = String::new();
        let _ = File::from(r).read_to_string(&mut s);
        let (code, msg) = s.split_once('\n').unwrap_or((s.as_str(), ""));
        match code.trim().parse::<i32>() {
            Ok(0) => std::process::exit(exit::OK),
            Ok(c) => {
                eprintln!("kekfs: {msg}");
                std::process::exit(c)
            }
            Err(_) => {
                eprintln!("kekfs: the mount daemon exited before the mount was ready");
                std::process::exit(exit::MOUNT_FAILED)
            }
        }
    }
    drop(r);
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    Ok(Ready {
        pipe: Some(File::from(w)),
        detached: true,
    })
}

/// Point stdin/stdout/stderr at /dev/null (after the parent has been told).
pub fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors with a valid source descriptor.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Block the termination signals in this thread (and every thread it starts later), so
/// only the waiter thread sees them.
pub fn block_signals() {
    let set = signal_set();
    // SAFETY: valid sigset pointer; old mask not requested.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Start a thread that waits for a termination signal and then runs `on_signal`.
pub fn on_termination(on_signal: impl FnOnce(i32) + Send + 'static) {
    std::thread::spawn(move || {
        let set = signal_set();
        let mut sig = 0i32;
        // SAFETY: valid sigset and out-pointer; the signals are blocked in every thread.
        let r = unsafe { libc::sigwait(&set, &mut sig) };
        if r == 0 {
            on_signal(sig);
        }
    });
}
