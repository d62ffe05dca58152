"""Shared helpers of the vmkeep benchmark harness (Python 3.11 standard library only).

Measuring: every timed command runs as a child whose wall time is taken with
time.perf_counter() around fork/exec and os.wait4(), and whose peak RSS is ru_maxrss
from the rusage wait4 returns (KiB on Linux). stdout/stderr go to files, never pipes,
so a chatty tool cannot block on a full pipe while being timed.
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


def run_timed(cmd, *, env=None, cwd=None, stdout_to_null=False, label="") -> dict:
    """Run cmd, return {cmd, rc, seconds, maxrss_kib, stdout, stderr}."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdout = subprocess.DEVNULL if stdout_to_null else out
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err,
                             env=full_env, cwd=cwd)
        _, status, ru = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        o = out.read().decode("utf-8", "replace")
        e = err.read().decode("utf-8", "replace")
    res = {
        "cmd": [str(c) for c in cmd],
        "rc": p.returncode,
        "seconds": seconds,
        "maxrss_kib": ru.ru_maxrss,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "stdout": o if len(o) < 20000 else o[:20000] + "...(cut)",
        "stderr": e[-4000:],
    }
    if p.returncode != 0:
        log(f"FAIL {label or cmd[0]}: exit {p.returncode}: {' '.join(res['cmd'])}\n{e[-2000:]}")
    return res


def run_quiet(cmd, *, env=None, cwd=None, check=True) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    r = subprocess.run(cmd, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def tree_usage(path: str | Path) -> dict:
    """Apparent bytes (as `du -sb`, directories included), on-disk bytes (as `du -sB1`),
    file count and the apparent bytes of each top-level entry. The top directory itself
    is not counted (du counts it: a few KiB difference)."""
    path = Path(path)
    apparent = disk = files = 0
    top: dict[str, int] = {}
    if not path.exists():
        return {"apparent": 0, "disk": 0, "files": 0, "top": {}}
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
            isfile = n in names
            if isfile:
                files += 1
            apparent += st.st_size
            disk += st.st_blocks * 512
            t = topname or n
            top[t] = top.get(t, 0) + st.st_size
    return {"apparent": apparent, "disk": disk, "files": files, "top": top}


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
