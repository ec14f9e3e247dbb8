#!/usr/bin/env python3
"""Run the same fio jobs on several filesystems in one run and compare them.

Targets: plain (the tmpfs backing itself), bindfs, gocryptfs, securefs, kekfs. Every
job runs --reps times per target; the report gives median, min and max, writes CSV and
JSON, plots a PNG with gnuplot, and prints ratios kekfs/gocryptfs, kekfs/securefs and
kekfs/bindfs. Timings are benchmark figures, never pass/fail tests.
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PASS = "bench-passphrase"


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def drop_caches():
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - report only
        return "unknown"


class Target:
    """A filesystem under test: setup() returns the directory to run jobs in."""

    def __init__(self, name, work):
        self.name = name
        self.work = os.path.join(work, name)
        self.backing = os.path.join(self.work, "backing")
        self.mnt = os.path.join(self.work, "mnt")
        os.makedirs(self.backing)
        os.makedirs(self.mnt)
        self.direct_ok = True

    def setup(self):
        return self.backing

    def teardown(self):
        pass

    def version(self):
        return ""


class Plain(Target):
    def version(self):
        return "tmpfs " + os.uname().release


class FuseTarget(Target):
    def setup(self):
        self.mount()
        for _ in range(100):
            if os.path.ismount(self.mnt):
                return self.mnt
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not mount")

    def teardown(self):
        if os.path.ismount(self.mnt):
            r = subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.mnt], check=False)


class Bindfs(FuseTarget):
    def mount(self):
        sh(["bindfs", "--multithreaded", self.backing, self.mnt])

    def version(self):
        return version(["bindfs", "--version"])


class Gocryptfs(FuseTarget):
    def mount(self):
        ext = f"echo {PASS}"
        if not os.path.exists(os.path.join(self.backing, "gocryptfs.conf")):
            sh(["gocryptfs", "-init", "-q", "-extpass", ext, self.backing], stdout=subprocess.DEVNULL)
        sh(["gocryptfs", "-q", "-nosyslog", "-extpass", ext, self.backing, self.mnt])

    def version(self):
        return version(["gocryptfs", "-version"])


class Securefs(FuseTarget):
    def mount(self):
        if not os.listdir(self.backing):
            sh(["securefs", "create", "--pass", PASS, self.backing], stdout=subprocess.DEVNULL)
        sh(["securefs", "mount", "--background", "--pass", PASS, self.backing, self.mnt],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def version(self):
        return version(["securefs", "version"])


class Kekfs(FuseTarget):
    def __init__(self, name, work, binary, options):
        super().__init__(name, work)
        self.bin = binary
        self.options = options
        self.ks = os.path.join(self.work, "keystore")
        self.passfile = os.path.join(self.work, "pass")
        with open(self.passfile, "w") as f:
            f.write(PASS + "\n")
        self.k(["keystore", "init"])
        self.k(["key", "create", "bench"])
        os.rmdir(self.backing)
        self.k(["init", self.backing, "--kek", "soft:bench"])

    def k(self, args):
        sh([self.bin, "--keystore", self.ks, "--passfile", self.passfile] + args,
           stdout=subprocess.DEVNULL)

    def mount(self):
        args = ["mount", self.backing, self.mnt, "--log", os.path.join(self.work, "daemon.log")]
        if self.options:
            args += ["-o", self.options]
        self.k(args)

    def teardown(self):
        if os.path.ismount(self.mnt):
            st = subprocess.run([self.bin, "status", self.mnt, "--json"],
                                capture_output=True, text=True)
            try:
                self.transport = json.loads(st.stdout).get("transport") or self.transport
            except ValueError:
                pass
            subprocess.run([self.bin, "unmount", self.mnt], capture_output=True)
        super().teardown()

    def version(self):
        return version([self.bin, "--version"])


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_ticks():
    """(steal, total) clock ticks of all CPUs so far, from /proc/stat; (0, 0) if unreadable.
    Steal is time the hypervisor ran something else while this VM wanted the CPU."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_pct(before, after):
    """Share (%) of the CPU time between two `cpu_ticks` samples that was stolen."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else 0.0


def fio_job(name, rw, bs, size, extra, runtime):
    job = {"name": name, "rw": rw, "bs": bs, "size": size, "extra": extra}
    if runtime:
        job["runtime"] = runtime
    return job


def jobs(quick):
    seq = "128m" if quick else "512m"
    rnd = "64m" if quick else "256m"
    rt = "3" if quick else "8"
    j = [
        fio_job("seq-write-1M", "write", "1m", seq, ["--end_fsync=1"], None),
        fio_job("seq-read-1M", "read", "1m", seq, [], None),
        fio_job("rand-read-4k", "randread", "4k", rnd, [], rt),
        fio_job("rand-write-4k", "randwrite", "4k", rnd, [], rt),
        fio_job("randrw-70-30-4k-2jobs", "randrw", "4k", rnd, ["--rwmixread=70", "--numjobs=2"], rt),
        fio_job("direct-seq-write-1M", "write", "1m", seq, ["--direct=1", "--end_fsync=1"], None),
        fio_job("direct-rand-read-4k", "randread", "4k", rnd, ["--direct=1"], rt),
        fio_job("direct-rand-write-4k", "randwrite", "4k", rnd, ["--direct=1"], rt),
    ]
    return j


def run_fio(d, job):
    """Returns (value, unit) — MiB/s for 1M jobs, IOPS for 4k jobs — or None."""
    fname = os.path.join(d, "fio-" + job["name"].replace("direct-", "") + ".dat")
    args = [
        "fio", "--name=" + job["name"], "--filename=" + fname, "--rw=" + job["rw"],
        "--bs=" + job["bs"], "--size=" + job["size"], "--ioengine=psync", "--iodepth=1",
        "--output-format=json", "--group_reporting", "--verify=0",
    ] + job["extra"]
    if "runtime" in job:
        args += ["--time_based", "--runtime=" + job["runtime"]]
    try:
        if job["rw"] in ("read", "randread") or "rw" in job["rw"]:
            # Lay the file out first, then drop caches so reads are not served from RAM.
            lay = subprocess.run(
                ["fio", "--name=layout", "--filename=" + fname, "--rw=write", "--bs=1m",
                 "--size=" + job["size"], "--output-format=json"] +
                [e for e in job["extra"] if e.startswith("--direct")],
                capture_output=True, text=True)
            if lay.returncode != 0:
                return fio_failed(job, fname, "laying out the file", lay)
            drop_caches()
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            return fio_failed(job, fname, "the run", r)
        try:
            out = json.loads(r.stdout[r.stdout.index("{"):])
        except (ValueError, json.JSONDecodeError):
            return fio_failed(job, fname, "reading its JSON output", r)
    finally:
        # Each repetition starts from a fresh file, and the files of earlier jobs do not
        # pile up in the tmpfs (the full-size jobs of five targets would not fit).
        try:
            os.remove(fname)
        except OSError:
            pass
    jb = out["jobs"][0]
    bw = jb["read"]["bw"] + jb["write"]["bw"]  # KiB/s
    iops = jb["read"]["iops"] + jb["write"]["iops"]
    if job["bs"] == "1m":
        return bw / 1024.0, "MiB/s"
    return iops, "IOPS"


def fio_failed(job, fname, step, proc):
    """Say on stderr why a fio job failed (the target then shows n/a); returns None."""
    tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
    print(f"  {job['name']} on {fname}: fio failed in {step} (exit {proc.returncode}): {tail}",
          file=sys.stderr, flush=True)
    return None


def small_files(d, n):
    """Create n 4 KiB files, read them back, delete them: files/s for the whole cycle."""
    top = os.path.join(d, "small")
    os.makedirs(top, exist_ok=True)
    data = os.urandom(4096)
    t = time.perf_counter()
    for i in range(n):
        with open(os.path.join(top, f"f{i:06d}"), "wb") as f:
            f.write(data)
    for i in range(n):
        with open(os.path.join(top, f"f{i:06d}"), "rb") as f:
            if f.read() != data:
                raise RuntimeError("small-file content mismatch")
    for i in range(n):
        os.unlink(os.path.join(top, f"f{i:06d}"))
    el = time.perf_counter() - t
    os.rmdir(top)
    return n / el, "files/s"


def metadata(d, n):
    """stat every entry of an n-entry directory and list it: entries/s."""
    top = os.path.join(d, "meta")
    if not os.path.isdir(top):
        os.makedirs(top)
        for i in range(n):
            open(os.path.join(top, f"e{i:06d}"), "wb").close()
    drop_caches()
    t = time.perf_counter()
    names = os.listdir(top)
    for nm in names:
        os.stat(os.path.join(top, nm))
    el = time.perf_counter() - t
    if len(names) != n:
        raise RuntimeError("metadata listing incomplete")
    return n / el, "entries/s"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kekfs", required=True, help="path of the kekfs binary")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, shorter runs")
    ap.add_argument("--only", default="", help="comma list of targets")
    ap.add_argument("--jobs", default="", help="comma list of job names (default: all)")
    ap.add_argument("--kekfs-options", default="", help="extra -o options for kekfs")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    out = a.out or os.path.join("bench-results", stamp)
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="kekfs-fio-")
    sh(["mount", "-t", "tmpfs", "-o", "size=6g", "tmpfs", work])
    names = ["plain", "bindfs", "gocryptfs", "securefs", "kekfs"]
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    targets = []
    try:
        for n in names:
            if n == "plain":
                targets.append(Plain(n, work))
            elif n == "bindfs":
                targets.append(Bindfs(n, work))
            elif n == "gocryptfs":
                targets.append(Gocryptfs(n, work))
            elif n == "securefs":
                targets.append(Securefs(n, work))
            elif n == "kekfs":
                targets.append(Kekfs(n, work, a.kekfs, a.kekfs_options))
        all_jobs = jobs(a.quick) + [{"name": "small-files-4k"}, {"name": "metadata-stat-readdir"}]
        if a.jobs:
            wanted = a.jobs.split(",")
            unknown = set(wanted) - {j["name"] for j in all_jobs}
            if unknown:
                sys.exit(f"unknown job(s): {', '.join(sorted(unknown))}; "
                         f"jobs: {', '.join(j['name'] for j in all_jobs)}")
            all_jobs = [j for j in all_jobs if j["name"] in wanted]
        results = {}  # job -> target -> [values]
        units = {}
        # Repetitions are interleaved: each round runs every target once, in an order
        # rotated from round to round, so a noisy spell of this shared machine lands on
        # all targets alike instead of on whichever one was running through it.
        for job in all_jobs:
            vals = {t.name: [] for t in targets}
            steal = {t.name: [] for t in targets}
            failed = set()
            for rep in range(a.reps):
                k = rep % len(targets)
                for t in targets[k:] + targets[:k]:
                    if t.name in failed:
                        continue
                    d = t.setup()
                    ticks = cpu_ticks()
                    try:
                        if job["name"] == "small-files-4k":
                            v = small_files(d, 500 if a.quick else 2000)
                        elif job["name"] == "metadata-stat-readdir":
                            v = metadata(d, 2000 if a.quick else 5000)
                        else:
                            v = run_fio(d, job)
                    finally:
                        t.teardown()
                    if v is None:
                        failed.add(t.name)
                        continue
                    vals[t.name].append(v[0])
                    # Measured around the whole repetition (layout and cache drop included).
                    steal[t.name].append(steal_pct(ticks, cpu_ticks()))
                    units[job["name"]] = v[1]
            for t in targets:
                results.setdefault(job["name"], {})[t.name] = (vals[t.name], steal[t.name])
                shown = (f"{statistics.median(vals[t.name]):10.0f}" if vals[t.name]
                         else "   n/a")
                st = (f"  (CPU steal {min(steal[t.name]):.1f}-{max(steal[t.name]):.1f} %)"
                      if steal[t.name] else "")
                print(f"{job['name']:26s} {t.name:10s} {shown} {units.get(job['name'], ''):9s}{st}",
                      flush=True)
        report = {
            "date": stamp,
            "machine": {"kernel": os.uname().release, "cpus": os.cpu_count(),
                        "fuse_enable_uring": read_text(
                            "/sys/module/fuse/parameters/enable_uring")},
            "versions": {t.name: t.version() for t in targets},
            "kekfs_transport": next((getattr(t, "transport", None) for t in targets
                                     if t.name == "kekfs"), None),
            "reps": a.reps,
            "quick": a.quick,
            "units": units,
            "results": {
                j: {t: ({"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v,
                         "steal_pct": [round(x, 2) for x in st]}
                        if v else None) for t, (v, st) in r.items()}
                for j, r in results.items()
            },
        }
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out, "results.csv"), "w") as f:
            f.write("job,unit,target,median,min,max,max_steal_pct\n")
            for j, r in report["results"].items():
                for t, s in r.items():
                    if s:
                        f.write(f"{j},{units.get(j, '')},{t},{s['median']:.1f},{s['min']:.1f},"
                                f"{s['max']:.1f},{max(s['steal_pct'], default=0):.1f}\n")
        print_ratios(report)
        plot(report, out)
        print(f"results in {out}/ (results.json, results.csv, results.png)")
    finally:
        for t in targets:
            t.teardown()
        subprocess.run(["umount", "-l", work], check=False)
        shutil.rmtree(work, ignore_errors=True)


def print_ratios(report):
    print("\nratios (median; >1 means kekfs is faster)")
    print(f"{'job':26s} {'vs gocryptfs':>13s} {'vs securefs':>12s} {'vs bindfs':>10s}")
    for j, r in report["results"].items():
        k = r.get("kekfs")
        if not k:
            continue
        cells = []
        for peer in ("gocryptfs", "securefs", "bindfs"):
            p = r.get(peer)
            cells.append(f"{k['median'] / p['median']:.2f}x" if p and p["median"] else "n/a")
        print(f"{j:26s} {cells[0]:>13s} {cells[1]:>12s} {cells[2]:>10s}")


def plot(report, out):
    if not shutil.which("gnuplot"):
        print("gnuplot missing: no plot", file=sys.stderr)
        return
    # plain tmpfs is an order of magnitude faster than any FUSE filesystem; it is in the
    # CSV/JSON, and the plot compares the FUSE filesystems with each other.
    targets = ["bindfs", "gocryptfs", "securefs", "kekfs"]
    rows = []
    for j, r in report["results"].items():
        base = max(((r.get(t) or {}).get("median", 0) for t in targets), default=0) or 1
        vals = [(r.get(t) or {}).get("median", 0) / base for t in targets]
        rows.append((j, vals))
    dat = os.path.join(out, "plot.dat")
    with open(dat, "w") as f:
        f.write("job " + " ".join(targets) + "\n")
        for j, vals in rows:
            f.write(j + " " + " ".join(f"{v:.4f}" for v in vals) + "\n")
    script = f"""
set terminal pngcairo size 1400,700 noenhanced
set output '{os.path.join(out, "results.png")}'
set title 'fio on tmpfs backing, median of {report["reps"]} runs, relative to the best FUSE filesystem per job ({report["date"]})'
set style data histograms
set style histogram cluster gap 1
set style fill solid border -1
set ylabel 'relative throughput (best = 1)'
set yrange [0:1.1]
set xtics rotate by -30
set key outside right
plot for [i=2:5] '{dat}' using i:xtic(1) title columnheader
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=False)


if __name__ == "__main__":
    main()
