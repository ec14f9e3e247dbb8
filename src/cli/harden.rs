//! Process hardening for commands that hold keys (the mount daemon above all): no core
//! dumps, key memory kept out of swap where the limits allow it, and enough descriptors
//! for a busy FUSE daemon. See README.md, "Secrets in memory".

/// Disable core dumps and ptrace-style access by other processes of the same user:
/// `PR_SET_DUMPABLE 0` (also makes `/proc/<pid>/mem` and friends root-only) and
/// `RLIMIT_CORE 0`. Both survive `fork`, so calling this before daemonizing covers the
/// daemon. Returns what could not be done (nothing, normally).
pub fn disable_core_dumps() -> Vec<String> {
    let mut failed = Vec::new();
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        failed.push(format!(
            "could not disable core dumps (prctl PR_SET_DUMPABLE): {}",
            std::io::Error::last_os_error()
        ));
    }
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        failed.push(format!(
            "could not set RLIMIT_CORE to 0: {}",
            std::io::Error::last_os_error()
        ));
    }
    failed
}

/// Raise the soft limit on open descriptors to the hard limit. A FUSE daemon holds one
/// descriptor per inode the kernel has cached plus one per open file; with the usual soft
/// limit of 1024 its inode table would have to be trimmed (see `fuse::Reclaimer`) far
/// more often than needed. Returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: valid pointer to an initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(raised.rlim_cur);
    }
    Ok(r.rlim_cur)
}

/// How many descriptor slots `presize_fd_table` reserves at most (128 KiB of kernel
/// memory for the table itself).
const FD_TABLE_PRESIZE: u64 = 16384;

/// Grow this process's descriptor table now to `min(limit, 16384)` slots, so that it does
/// not have to grow later. Linux grows the table by doubling, and when the table is shared
/// by several threads each growth waits for an RCU grace period (`synchronize_rcu` in
/// `expand_fdtable`): several milliseconds each on an idle machine. A FUSE daemon that
/// opens one descriptor per entry while listing a big directory hit six of those in its
/// first listing (measured: 2000 entries listed and stat'ed in 40–45 ms on the first
/// listing after a mount, 12–15 ms later). Growing the table while the process is still
/// single-threaded (right after the fork) costs no grace period. The table never shrinks,
/// so this holds for the whole mount. Failure only costs that time, so it is ignored.
pub fn presize_fd_table(limit: u64) {
    let want = limit.min(FD_TABLE_PRESIZE);
    let Ok(min_fd) = libc::c_int::try_from(want.saturating_sub(1)) else {
        return;
    };
    if min_fd < 1 {
        return;
    }
    let Ok(null) = std::fs::File::open("/dev/null") else {
        return;
    };
    use std::os::fd::AsRawFd;
    // SAFETY: F_DUPFD duplicates a descriptor we own onto the lowest free number at or above
    // `min_fd`; it never replaces an open descriptor and takes no pointers.
    let dup = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min_fd) };
    if dup >= 0 {
        // SAFETY: `dup` was just returned by fcntl and is owned by nothing else.
        unsafe { libc::close(dup) };
    }
}

/// The current soft limit on open descriptors.
pub fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    r.rlim_cur
}

/// Does this process have CAP_IPC_LOCK (which lifts the locked-memory limit)?
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
            u64::from_str_radix(hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Keep this process's memory (keys, derived cipher states, passphrase buffers) out of
/// swap: `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`. `MCL_ONFAULT` locks pages only
/// once they are used, so reserved but untouched memory (thread stacks, allocator arenas)
/// costs nothing. Only done when the locked-memory limit does not apply (CAP_IPC_LOCK, as
/// root normally has) or is unlimited (or can be made so): with a finite limit, `MCL_FUTURE` would make later allocations fail once
/// the limit is reached, which is worse than swappable keys. Locks are not inherited
/// across `fork`: call again in the daemon. `Err` says why memory is not locked.
pub fn lock_memory() -> Result<(), String> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return Err(format!(
            "key memory is not locked (getrlimit: {})",
            std::io::Error::last_os_error()
        ));
    }
    if r.rlim_cur != libc::RLIM_INFINITY && !has_cap_ipc_lock() {
        let inf = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: valid pointer to an initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) } != 0 {
            return Err(format!(
                "key memory is not locked and may be swapped out: the locked-memory limit \
                 (RLIMIT_MEMLOCK) is {} KiB and cannot be raised; mount as root (with \
                 CAP_IPC_LOCK) or raise the limit (ulimit -l unlimited, or \
                 LimitMEMLOCK=infinity in a systemd unit)",
                r.rlim_cur / 1024
            ));
        }
    }
    // SAFETY: mlockall takes no pointers.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if rc != 0 {
        return Err(format!(
            "key memory is not locked and may be swapped out (mlockall: {})",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// In a forked child (so this test process keeps its limits): after the call the
    /// process is not dumpable and its core size limit is 0.
    #[test]
    fn core_dumps_are_disabled() {
        // SAFETY: the child only makes raw system calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let ok = super::disable_core_dumps().is_empty();
            let mut r = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            // SAFETY: prctl without pointers; getrlimit with a valid out-pointer; _exit.
            unsafe {
                let dumpable = libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0);
                libc::getrlimit(libc::RLIMIT_CORE, &mut r);
                let good = ok && dumpable == 0 && r.rlim_cur == 0 && r.rlim_max == 0;
                libc::_exit(if good { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child reported a dumpable process or a non-zero core limit ({status:#x})"
        );
    }

    /// The kernel reports the size of a process's descriptor table as `FDSize`.
    fn fd_table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("FDSize:"));
        line.unwrap().trim().parse().unwrap()
    }

    #[test]
    fn fd_table_is_grown_ahead_and_no_descriptor_is_left_open() {
        let limit = super::raise_nofile_limit().unwrap().min(2048);
        let open_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
        super::presize_fd_table(limit);
        assert!(
            fd_table_size() >= limit,
            "FDSize {} after presizing to {limit}",
            fd_table_size()
        );
        // Other tests in this process may open descriptors meanwhile; none of ours stays.
        let high = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .filter(|&fd| fd >= limit - 1)
            .count();
        assert_eq!(
            high, 0,
            "{open_before} open before; the duplicate was not closed"
        );
    }

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let n = super::raise_nofile_limit().unwrap();
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
        assert_eq!(r.rlim_cur, r.rlim_max);
        assert_eq!(n, r.rlim_cur);
    }
}
