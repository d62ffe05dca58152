"""Shared helpers of the vmkeep benchmark harness (Python 3.11 standard library only).

Measuring: every timed command runs under GNU time (`/usr/bin/time -f %M`), started by the
harness; wall time is time.perf_counter() around the start and os.wait4(), CPU time the user +
sys time in the rusage wait4 returns (the tool's, reaped by GNU time, plus GNU time's own few
milliseconds). stdout/stderr go to files, never pipes, so a chatty tool cannot block on a full
pipe while being timed.

Peak RSS comes from GNU time, not from the harness's own wait4: on Linux, exec() records the
peak RSS of the memory image it replaces in the new program's ru_maxrss. A child forked (or
vforked) by this Python harness therefore reports at least the harness's own peak (310 MiB
in the run issue 6 quotes), whatever the tool used; a child of the tiny GNU time process starts
from ~1-2 MiB. ru_maxrss is the peak of one process (or of one of the helpers it reaped), not
the sum of processes running at once: the tools measured here run as one process each (checked
with `strace -f`, see bench/README.md).

Bytes read and written (rchar / wchar of /proc/PID/io: every read()/write()-family call,
page cache hits included, of the tool and the helpers it reaped) are taken from the exited
GNU time process before it is reaped (waitid WNOWAIT keeps it a zombie whose counters still
hold the reaped tool's totals).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20
MB = 1_000_000

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
DEFAULT_WORK = os.environ.get("VMKEEP_BENCH_WORK", "/var/tmp/vmkeep-bench")
DEFAULT_VMKEEP = str(REPO_ROOT / "target" / "release" / "vmkeep")
# Tools the benchmark builds itself (rustic) live outside the checkout and survive it.
BENCH_CACHE = Path(os.environ.get("VMKEEP_BENCH_CACHE")
                   or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmkeep-bench")
PASSWORD = "vmkeep-bench-passphrase"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg: str, code: int = 1) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def check_free_space(path: str | Path, need_gib: float) -> None:
    """Exit with a clear message unless the file system holding `path` has `need_gib` free."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(p).free
    if free < need_gib * GiB:
        die(
            f"not enough free disk space in {p}: {free / GiB:.1f} GiB free, the benchmark needs "
            f"about {need_gib:g} GiB (two 2 GiB images, a working copy, a restore and the "
            f"repositories).\nPoint --work (or VMKEEP_BENCH_WORK) at a bigger file system, "
            f"or pass --min-free-gib to override."
        )


GNU_TIME = "/usr/bin/time"
# Peers' settings a developer may have exported; the harness sets what each tool needs.
SCRUBBED_ENV_PREFIXES = ("RESTIC_", "RUSTIC_", "BORG_")


def tool_env(env: dict | None) -> dict:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_ENV_PREFIXES)}
    if env:
        full_env.update(env)
    return full_env


def gnu_time_problem() -> str | None:
    """None when GNU time can measure a command's own peak RSS here."""
    if not os.access(GNU_TIME, os.X_OK):
        return f"{GNU_TIME} (GNU time) not found: scripts/install-deps.sh bench (Debian package `time`)"
    return None


def _proc_io(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f if ":" in line)}
    except (OSError, ValueError):
        return {}


def run_timed(cmd, *, env=None, cwd=None, stdout_to_null=False, label="") -> dict:
    """Run cmd under GNU time; return {cmd, rc, seconds, cpu_s, maxrss_kib, rchar, wchar,
    stdout, stderr}. maxrss_kib is the tool's own peak RSS (see the module docstring);
    harness_maxrss_kib is what the harness's own wait4 reports, kept to show the difference."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(prefix="vmkeep-bench-time-") as tf:
        stdout = subprocess.DEVNULL if stdout_to_null else out
        wrapped = [GNU_TIME, "-f", "%M", "-o", tf.name, "--", *map(str, cmd)]
        t0 = time.perf_counter()
        p = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err,
                             env=tool_env(env), cwd=cwd)
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        seconds = time.perf_counter() - t0
        io = _proc_io(p.pid)  # still a zombie: its counters include the reaped tool's
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        o = out.read().decode("utf-8", "replace")
        e = err.read().decode("utf-8", "replace")
        tf.seek(0)
        timed = tf.read().decode("utf-8", "replace").split()
    # GNU time writes "Command exited with non-zero status N" (or "terminated by signal")
    # before the format's output: the peak is the last word.
    maxrss = int(timed[-1]) if timed and timed[-1].isdigit() else None
    res = {
        "cmd": [str(c) for c in cmd],
        "rc": p.returncode,
        "seconds": seconds,
        "maxrss_kib": maxrss,
        "harness_maxrss_kib": ru.ru_maxrss,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "rchar": io.get("rchar"),
        "wchar": io.get("wchar"),
        "stdout": o if len(o) < 20000 else o[:20000] + "...(cut)",
        "stderr": e[-4000:],
    }
    if p.returncode != 0:
        log(f"FAIL {label or cmd[0]}: exit {p.returncode}: {' '.join(res['cmd'])}\n{e[-2000:]}")
    return res


def run_quiet(cmd, *, env=None, cwd=None, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=tool_env(env), cwd=cwd, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def tree_usage(path: str | Path) -> dict:
    """Bytes of a repository directory:
    - file_bytes: apparent size of its files (what the tool wrote and kept; directory
      entries not counted), and top_files: the same per top-level entry;
    - apparent: as `du -sb` (directories' own sizes included, the top one excepted),
      disk: allocated bytes as `du -sB1`, files: number of files."""
    path = Path(path)
    apparent = disk = files = file_bytes = 0
    top: dict[str, int] = {}
    top_files: dict[str, int] = {}
    if not path.exists():
        return {"apparent": 0, "disk": 0, "files": 0, "file_bytes": 0, "top": {}, "top_files": {}}
    seen = set()
    for root, dirs, names in os.walk(path):
        rel = os.path.relpath(root, path)
        topname = None if rel == "." else rel.split(os.sep)[0]
        for n in names + dirs:
            fp = os.path.join(root, n)
            try:
                st = os.lstat(fp)
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            t = topname or n
            if n in names:
                files += 1
                file_bytes += st.st_size
                top_files[t] = top_files.get(t, 0) + st.st_size
            apparent += st.st_size
            disk += st.st_blocks * 512
            top[t] = top.get(t, 0) + st.st_size
    return {"apparent": apparent, "disk": disk, "files": files, "file_bytes": file_bytes,
            "top": top, "top_files": top_files}


def data_extents(path: str | Path) -> list[list[int]]:
    """[[offset, length], ...] of the allocated (non-hole) parts of a file."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append([d, h - d])
            off = h
    finally:
        os.close(fd)
    return out


def copy_image(src: str | Path, dst: str | Path, bufsize: int = 8 * MiB) -> None:
    """Copy keeping holes where the source has them (and nowhere else), through the page
    cache of the destination, so the copy is cached and as sparse as the source."""
    tmp = str(dst) + ".tmp"
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = os.fstat(sfd).st_size
        os.ftruncate(dfd, size)
        for off, length in data_extents(src):
            end = off + length
            while off < end:
                n = min(bufsize, end - off)
                buf = os.pread(sfd, n, off)
                if not buf:
                    raise RuntimeError(f"short read from {src} at {off}")
                os.pwrite(dfd, buf, off)
                off += len(buf)
    finally:
        os.close(sfd)
        os.close(dfd)
    os.replace(tmp, dst)


def files_identical(a: str | Path, b: str | Path) -> bool:
    if not (os.path.isfile(a) and os.path.isfile(b)):
        return False
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def rmtree(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def host_info() -> dict:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "mem_bytes": mem, "cpu": cpu,
            "python": platform.python_version()}


def loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def tool_version(cmd) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except Exception:
        return None


def write_results(prefix: str, data: dict, markdown: str) -> tuple[Path, Path]:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jp = OUT_DIR / f"{prefix}-{stamp}.json"
    mp = OUT_DIR / f"{prefix}-{stamp}.md"
    jp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    mp.write_text(markdown)
    return jp, mp


def parse_json_stdout(res: dict):
    try:
        return json.loads(res["stdout"])
    except (ValueError, KeyError):
        return None


def fmt_mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / MB:,.1f}"


def fmt_bytes(n) -> str:
    """Decimal units, small figures kept readable."""
    if n is None:
        return "-"
    if abs(n) >= 10 * MB:
        return f"{n / MB:,.0f} MB"
    if abs(n) >= MB:
        return f"{n / MB:.1f} MB"
    return f"{n / 1000:,.1f} kB"


def fmt_s(sec) -> str:
    return "-" if sec is None else f"{sec:.2f}"
