#!/usr/bin/env python3
"""Mount time and daemon memory of kekfs on the soft: keystore, on a tmpfs backing.

mount:  mounts and unmounts the volume --mounts times; reports the wall time of
        `kekfs mount` (returns once the mount is up) and the phases the daemon logs
        (KEK provider open = the passphrase KDF for soft:, volume header, FUSE mount);
        median / min / max.
rss:    a 4-job 4 KiB random read/write fio load on one 2 GiB file for --seconds,
        sampling the daemon's VmRSS every 0.2 s; then 20000 small files created,
        stat'ed and deleted, to show per-file state is freed. Reports peak RSS, RSS
        after each phase, and VmHWM.
cpu:    what the transport and spinning cost: for the default mount (FUSE over io_uring
        with spinning, where the kernel offers it), spin=0 and uring=off, a 4 KiB direct
        random-read fio job at queue depth 1 for --cpu-seconds, then as long without I/O;
        reports IOPS, the daemon's CPU time (all threads) per second and per request
        under load, and its CPU time per second while idle.
Benchmark figures only, never pass/fail.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PASS = "bench-passphrase"


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


class Volume:
    def __init__(self, binary, work, options):
        self.bin = binary
        self.work = work
        self.options = options
        self.ks = os.path.join(work, "keystore")
        self.passfile = os.path.join(work, "pass")
        self.backing = os.path.join(work, "backing")
        self.mnt = os.path.join(work, "mnt")
        self.log = os.path.join(work, "daemon.log")
        os.makedirs(self.mnt)
        with open(self.passfile, "w") as f:
            f.write(PASS + "\n")
        self.k(["keystore", "init"])
        self.k(["key", "create", "bench"])
        self.k(["init", self.backing, "--kek", "soft:bench"])

    def k(self, args):
        sh([self.bin, "--keystore", self.ks, "--passfile", self.passfile] + args,
           stdout=subprocess.DEVNULL)

    def mount(self):
        args = ["mount", self.backing, self.mnt, "--log", self.log]
        if self.options:
            args += ["-o", self.options]
        t = time.perf_counter()
        self.k(args)
        return time.perf_counter() - t

    def unmount(self):
        if os.path.ismount(self.mnt):
            subprocess.run([self.bin, "unmount", self.mnt], capture_output=True)

    def pid(self):
        out = subprocess.run([self.bin, "status", self.mnt, "--json"], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)["pid"]


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


LINE = re.compile(r"mounted at .* in (\d+) ms \(KEK provider (\d+) ms.*volume header (\d+) ms; "
                  r"FUSE mount (\d+) ms\)")


def bench_mount(vol, n):
    wall, total, provider, header, fuse = [], [], [], [], []
    for _ in range(n):
        open(vol.log, "w").close()
        wall.append(vol.mount() * 1000)
        vol.unmount()
        time.sleep(0.05)
        m = None
        with open(vol.log) as f:
            for line in f:
                m = LINE.search(line) or m
        if not m:
            raise RuntimeError("daemon log has no 'mounted ... in N ms' line")
        t, p, h, fu = (int(x) for x in m.groups())
        total.append(t)
        provider.append(p)
        header.append(h)
        fuse.append(fu)
    excl = [t - p for t, p in zip(total, provider)]
    r = {"wall_ms": stats(wall), "daemon_total_ms": stats(total),
         "kek_provider_incl_kdf_ms": stats(provider), "volume_header_ms": stats(header),
         "fuse_mount_ms": stats(fuse), "daemon_total_excl_kdf_ms": stats(excl)}
    print(f"mount ({n} times): `kekfs mount` wall {r['wall_ms']['median']:.0f} ms median "
          f"(min {r['wall_ms']['min']:.0f}, max {r['wall_ms']['max']:.0f}); daemon phases, median: "
          f"KEK provider incl. passphrase KDF {r['kek_provider_incl_kdf_ms']['median']:.0f} ms, "
          f"volume header {r['volume_header_ms']['median']:.0f} ms, "
          f"FUSE mount {r['fuse_mount_ms']['median']:.0f} ms; "
          f"mount excluding the KDF {r['daemon_total_excl_kdf_ms']['median']:.0f} ms "
          f"(max {r['daemon_total_excl_kdf_ms']['max']:.0f})")
    return r


def rss_kib(pid):
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0])
    return vals


def bench_rss(vol, seconds, size, file_rounds):
    vol.mount()
    try:
        pid = vol.pid()
        base = rss_kib(pid)["VmRSS"]
        path = os.path.join(vol.mnt, "big.img")
        sh(["fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1m", f"--size={size}",
            "--end_fsync=1", "--output-format=json"], stdout=subprocess.DEVNULL)
        after_fill = rss_kib(pid)["VmRSS"]
        samples = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    samples.append(rss_kib(pid)["VmRSS"])
                except OSError:
                    return
                time.sleep(0.2)

        th = threading.Thread(target=sample)
        th.start()
        sh(["fio", "--name=rand", f"--filename={path}", "--rw=randrw", "--rwmixread=70",
            "--bs=4k", f"--size={size}", "--numjobs=4", "--ioengine=psync", "--time_based",
            f"--runtime={seconds}", "--group_reporting", "--output-format=json"],
           stdout=subprocess.DEVNULL)
        stop.set()
        th.join()
        after_rand = rss_kib(pid)["VmRSS"]
        # Per-file state: many files created, stat'ed, deleted; twice, so memory that was
        # freed shows up as reused in later rounds rather than as growth.
        rounds = []
        for _ in range(file_rounds):
            top = os.path.join(vol.mnt, "many")
            os.mkdir(top)
            for i in range(20000):
                with open(os.path.join(top, f"f{i:05d}"), "wb") as f:
                    f.write(b"x" * 100)
            for nm in os.listdir(top):
                os.stat(os.path.join(top, nm))
            peak_files = rss_kib(pid)["VmRSS"]
            for nm in os.listdir(top):
                os.unlink(os.path.join(top, nm))
            os.rmdir(top)
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            time.sleep(0.5)
            rounds.append((peak_files, rss_kib(pid)["VmRSS"], len(os.listdir(f"/proc/{pid}/fd"))))
        end = rss_kib(pid)
        r = {"baseline_kib": base, "after_fill_kib": after_fill,
             "random_peak_kib": max(samples) if samples else after_rand,
             "after_random_kib": after_rand,
             "files_rounds": [{"with_20000_files_kib": a, "after_delete_kib": b, "open_fds": c}
                              for a, b, c in rounds],
             "hwm_kib": end["VmHWM"],
             "samples": len(samples), "size": size, "seconds": seconds}
        mib = lambda k: r[k] / 1024  # noqa: E731
        print(f"rss: idle {mib('baseline_kib'):.1f} MiB; after {size} fill {mib('after_fill_kib'):.1f}; "
              f"4-job randrw {seconds}s peak {mib('random_peak_kib'):.1f} ({len(samples)} samples), "
              f"after {mib('after_random_kib'):.1f}; "
              + "; ".join(f"20000 files round {i + 1}: {a / 1024:.1f} with them, "
                          f"{b / 1024:.1f} after delete ({c} fds open)"
                          for i, (a, b, c) in enumerate(rounds))
              + f"; VmHWM {r['hwm_kib'] / 1024:.1f} MiB (all in MiB)")
        return r
    finally:
        vol.unmount()


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def bench_cpu(vol, seconds):
    hz = os.sysconf("SC_CLK_TCK")
    base = vol.options
    out = {}
    for name, extra in [("default", ""), ("spin=0", "spin=0"), ("uring=off", "uring=off")]:
        vol.options = ",".join(o for o in (base, extra) if o)
        vol.mount()
        try:
            pid = vol.pid()
            path = os.path.join(vol.mnt, "cpu.dat")
            sh(["fio", "--name=prep", f"--filename={path}", "--size=256m", "--bs=1m",
                "--rw=write", "--end_fsync=1"], stdout=subprocess.DEVNULL)
            t0, c0 = time.monotonic(), cpu_ticks(pid)
            res = subprocess.run(["fio", "--name=qd1", f"--filename={path}", "--size=256m",
                                  "--bs=4k", "--rw=randread", "--direct=1", "--ioengine=psync",
                                  "--time_based", f"--runtime={seconds}", "--output-format=json"],
                                 check=True, capture_output=True, text=True)
            t1, c1 = time.monotonic(), cpu_ticks(pid)
            time.sleep(seconds)
            t2, c2 = time.monotonic(), cpu_ticks(pid)
            st = json.loads(subprocess.run([vol.bin, "status", vol.mnt, "--json"],
                                           capture_output=True, text=True).stdout or "{}")
            job = json.loads(res.stdout)["jobs"][0]["read"]
            ops = job["total_ios"]
            busy = (c1 - c0) / hz
            out[name] = {
                "transport": st.get("transport"),
                "iops": job["iops"],
                "daemon_cpu_per_s_loaded": busy / (t1 - t0),
                "daemon_cpu_us_per_request": busy / ops * 1e6 if ops else None,
                "daemon_cpu_per_s_idle": (c2 - c1) / hz / (t2 - t1),
            }
            print(f"cpu {name:10s} {out[name]['transport'] or '?':10s} "
                  f"{job['iops']:8.0f} IOPS, daemon {out[name]['daemon_cpu_per_s_loaded']:.2f} "
                  f"CPU-s/s loaded ({out[name]['daemon_cpu_us_per_request'] or 0:.1f} us/request), "
                  f"{out[name]['daemon_cpu_per_s_idle']:.3f} idle", flush=True)
        finally:
            vol.unmount()
    vol.options = base
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kekfs", required=True)
    ap.add_argument("--mounts", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--size", default="2g")
    ap.add_argument("--file-rounds", type=int, default=4)
    ap.add_argument("--cpu-seconds", type=int, default=8)
    ap.add_argument("--only", default="mount,rss,cpu", help="comma list of phases")
    ap.add_argument("--options", default="", help="extra -o options for kekfs")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (tmpfs and FUSE mounts)")
    with tempfile.TemporaryDirectory(prefix="kekfs-bench-daemon.") as work:
        sh(["mount", "-t", "tmpfs", "-o", "size=6g", "tmpfs", work])
        try:
            vol = Volume(a.kekfs, work, a.options)
            only = a.only.split(",")
            res = {}
            if "mount" in only:
                res["mount"] = bench_mount(vol, a.mounts)
            if "rss" in only:
                res["rss"] = bench_rss(vol, a.seconds, a.size, a.file_rounds)
            if "cpu" in only:
                res["cpu"] = bench_cpu(vol, a.cpu_seconds)
        finally:
            subprocess.run(["umount", "-l", os.path.join(work, "mnt")], capture_output=True)
            subprocess.run(["umount", work], check=False)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
