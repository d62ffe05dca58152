#!/usr/bin/env python3
"""Live-VM benchmark of vmkeep (issue 3): a running QEMU guest on a 4 GiB raw disk.

Per repetition (fresh image, repositories and VM each time):
  boot the cached test guest (tests/guest/build.sh) with vmkeep.workload=randwrite, which
  waits for a line on its serial console;
  (1) vmkeep full backup of the running VM (`backup vm --qmp`), guest idle;
      then QMP `stop`, restic, rustic and borg first backups of the image file, `cont`;
  (2) the guest writes 1% of the disk as 64 KiB extents at random 64 KiB-aligned offsets
      (dd from /dev/urandom, fsync each), host waits for "RANDWRITE DONE";
  (3) vmkeep incremental backup of the running VM (change tracking, cbt "used" expected);
      then QMP `stop`, restic, rustic and borg second backups of the image file, `cont`.
  All four tools back up the same two states of the disk: before and after the change.
  The peers need the VM stopped for a consistent image, so their backup time is also
  the guest's pause.
Then once: (5) guest write throughput, idle vs during vmkeep `backup vm --full` (repeated to
cover the window), from the arrival rate of the seqwrite workload's `C i` serial lines.

Usage: python3 bench/live.py [--reps 1] [--work DIR] [--window 20]
Writes bench/out/live-<timestamp>.json (raw) and .md (the table printed on stdout).
Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
import run as brun  # noqa: E402  (Restic, Rustic, Borg drivers)

VM = "livebench"
DISK_SIZE = 4 * bl.GiB
EXTENT = 64 * 1024
LOCK = "/tmp/vmkeep-qemu-tests.lock"  # shared with the QEMU tests: one TCG guest at a time


# ---------------------------------------------------------------- image

PEERS = ("restic", "rustic", "borg")


def make_disk(path: Path, prefill: int, work: str) -> dict:
    """4 GiB raw file: the first `prefill` bytes real data, the rest a hole."""
    src = None
    imgs = sorted(Path(work, "images").glob("*/allocated.img"))
    if imgs and imgs[-1].stat().st_size >= prefill:
        src = ("image", str(imgs[-1]))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, DISK_SIZE)
        off = 0
        if src:
            with open(src[1], "rb") as f:
                while off < prefill:
                    buf = f.read(min(8 * bl.MiB, prefill - off))
                    if not buf:
                        break
                    os.pwrite(fd, buf, off)
                    off += len(buf)
        else:  # concatenated /usr files
            src = ("usr", "/usr/lib,/usr/share,/usr/bin")
            for top in ("/usr/lib", "/usr/share", "/usr/bin"):
                for root, dirs, names in os.walk(top):
                    dirs.sort()
                    for n in sorted(names):
                        p = os.path.join(root, n)
                        if off >= prefill or os.path.islink(p) or not os.path.isfile(p):
                            continue
                        try:
                            with open(p, "rb") as f:
                                while off < prefill:
                                    buf = f.read(min(8 * bl.MiB, prefill - off))
                                    if not buf:
                                        break
                                    os.pwrite(fd, buf, off)
                                    off += len(buf)
                        except OSError:
                            continue
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"path": str(path), "size": DISK_SIZE, "prefill_bytes": off, "prefill_source": src,
            "allocated_bytes": path.stat().st_blocks * 512}


def lcg_extents(count: int, seed: int, n_ext: int) -> list[int]:
    """The guest's offsets (in 64 KiB extents), same arithmetic as tests/guest/build.sh."""
    x, out = seed, []
    for _ in range(count):
        x = (x * 1103515245 + 12345) % 2147483648
        out.append((x >> 4) % n_ext)
    return out


# ---------------------------------------------------------------- QEMU

class Serial:
    """Reads the guest's serial console from a QEMU socket chardev; timestamps every line."""

    def __init__(self, path: Path, log: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.log = open(log, "ab")
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        buf = b""
        while True:
            try:
                d = self.sock.recv(65536)
            except OSError:
                return
            if not d:
                return
            now = time.monotonic()
            self.log.write(d)
            self.log.flush()
            buf += d
            *done, buf = buf.split(b"\n")
            with self.lock:
                for ln in done:
                    self.lines.append((now, ln.decode("utf-8", "replace").strip("\r")))

    def send(self, text: str):
        self.sock.sendall(text.encode())

    def snapshot(self):
        with self.lock:
            return list(self.lines)

    def wait_for(self, prefix: str, timeout: float, qemu: subprocess.Popen) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for _, ln in self.snapshot():
                if "failed" in ln:
                    raise RuntimeError(f"guest: {ln}")
                if ln.startswith(prefix):
                    return ln
            if qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited ({qemu.returncode}) waiting for {prefix!r}")
            time.sleep(0.05)
        raise RuntimeError(f"guest printed no {prefix!r} within {timeout:.0f} s")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.log.close()


def qmp(sock: Path, command: str, arguments: dict | None = None, timeout: float = 30):
    """One QMP command on a fresh connection (closed at once: vmkeep needs the socket free)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock))
    f = s.makefile("rwb")
    try:
        json.loads(f.readline())  # greeting
        for cmd in ({"execute": "qmp_capabilities"},
                    {"execute": command, **({"arguments": arguments} if arguments else {})}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "event" in msg:
                    continue
                if "error" in msg:
                    raise RuntimeError(f"QMP {cmd['execute']}: {msg['error']}")
                break
        return msg.get("return")
    finally:
        f.close()
        s.close()


class Vm:
    def __init__(self, d: Path, guest: Path, img: Path, append: str, tag: str):
        self.qmp = d / f"qmp-{tag}.sock"
        self.ser = d / f"serial-{tag}.sock"
        for p in (self.qmp, self.ser):
            p.unlink(missing_ok=True)
        self.serial_log = d / f"serial-{tag}.log"
        self.qemu_log = open(d / f"qemu-{tag}.log", "wb")
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none",
               "-no-reboot",
               "-chardev", f"socket,id=ser0,path={self.ser},server=on,wait=off",
               "-serial", "chardev:ser0",
               "-qmp", f"unix:{self.qmp},server=on,wait=off",
               "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.gz"),
               "-append", f"console=ttyS0 quiet panic=-1 {append}",
               "-blockdev", f"driver=file,filename={img},node-name=f0",
               "-blockdev", "driver=raw,file=f0,node-name=disk0",
               "-device", "virtio-blk-pci,drive=disk0,id=vd0"]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.qemu_log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.serial = None
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({self.proc.returncode}): see {self.qemu_log.name}")
            try:
                self.serial = Serial(self.ser, self.serial_log)
                break
            except OSError:
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("QEMU serial socket did not appear")
                time.sleep(0.05)
        while True:
            try:
                qmp(self.qmp, "query-status")
                break
            except OSError:
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("QEMU QMP socket did not appear")
                time.sleep(0.05)

    def stop(self):
        qmp(self.qmp, "stop")

    def cont(self):
        qmp(self.qmp, "cont")

    def kill(self):
        if self.proc.poll() is None:
            try:
                qmp(self.qmp, "quit", timeout=5)
                self.proc.wait(timeout=10)
            except Exception:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self.serial:
            self.serial.close()
        self.qemu_log.close()


# ---------------------------------------------------------------- tools

def vmkeep_backup(args, repo: Path, vm: Vm, full: bool, name: str = VM) -> dict:
    cmd = [args.vmkeep, "--repo", str(repo), "backup", "vm", "--qmp", str(vm.qmp), "--vm", name, "--json"]
    if full:
        cmd.insert(-1, "--full")
    os.sync()
    res = bl.run_timed(cmd, env={"VMKEEP_PASSWORD": bl.PASSWORD}, label="vmkeep backup vm")
    os.sync()
    return res


def record(res: dict, repo: Path | None) -> dict:
    rec = {k: res.get(k) for k in ("cmd", "rc", "seconds", "cpu_s", "maxrss_kib", "rchar", "wchar")}
    if res["rc"] != 0:
        rec["stderr"] = res["stderr"]
    doc = bl.parse_json_stdout(res)
    if doc is not None:
        rec["json"] = doc
    if repo is not None:
        rec["repo"] = bl.tree_usage(repo)
    return rec


def check(res: dict, what: str):
    if res["rc"] != 0:
        raise RuntimeError(f"{what} failed (exit {res['rc']}): {res['stderr'].strip()[-500:]}")


def file_backups(tools, repos, img: Path, step: str, vm: Vm, rec: dict, rep: int):
    """The peers back up the image file while the VM is stopped (order rotated per rep)."""
    k = rep % len(tools)
    order = tools[k:] + tools[:k]
    vm.stop()
    t_stop = time.perf_counter()
    try:
        for t in order:
            os.sync()
            res = t.backup(repos[t.name], img, step)
            os.sync()
            rec[t.name][step] = record(res, repos[t.name])
            check(res, f"{t.name} {step}")
    finally:
        vm.cont()
    rec["stopped_s_" + step] = time.perf_counter() - t_stop


def one_rep(args, guest: Path, rep: int) -> dict:
    d = Path(args.work) / "live"
    bl.rmtree(d)
    d.mkdir(parents=True)
    img = d / "disk0.raw"
    bl.log(f"rep {rep + 1}: making the 4 GiB disk image")
    rec = {"rep": rep, "ok": True, "errors": [], "loadavg_before": bl.loadavg(),
           "vmkeep": {}, **{p: {} for p in PEERS}}
    rec["disk"] = make_disk(img, int(args.prefill_gib * bl.GiB), args.work)
    n_ext = DISK_SIZE // EXTENT
    count = args.count or -(-DISK_SIZE // 100 // EXTENT)
    offs = lcg_extents(count, args.seed + rep, n_ext)
    rec["change"] = {"writes": count, "seed": args.seed + rep, "unique_extents": len(set(offs)),
                     "changed_bytes": len(set(offs)) * EXTENT}
    work = Path(args.work)
    tools = [brun.Restic(work), brun.Rustic(work, args.rustic), brun.Borg(work)]
    repos = {"vmkeep": d / "repo-vmkeep", **{p: d / f"repo-{p}" for p in PEERS}}
    for t in tools:
        t.reset_cache()
        check(t.init(repos[t.name], img), f"{t.name} init")
    check(bl.run_timed([args.vmkeep, "--repo", str(repos["vmkeep"]), "init", "--encrypt", "--json"],
                       env={"VMKEEP_PASSWORD": bl.PASSWORD}), "vmkeep init")
    vm = None
    try:
        vm = Vm(d, guest, img, f"vmkeep.workload=randwrite vmkeep.count={count} "
                f"vmkeep.seed={args.seed + rep}", f"r{rep}")
        t0 = time.monotonic()
        vm.serial.wait_for("RANDWRITE WAIT", 180, vm.proc)
        rec["boot_s"] = time.monotonic() - t0
        bl.log(f"rep {rep + 1}: guest up in {rec['boot_s']:.1f} s; vmkeep full backup")
        res = vmkeep_backup(args, repos["vmkeep"], vm, full=False)
        rec["vmkeep"]["full"] = record(res, repos["vmkeep"])
        check(res, "vmkeep full backup")
        bl.log(f"rep {rep + 1}: VM stopped; restic, rustic and borg first backups")
        file_backups(tools, repos, img, "full", vm, rec, rep)
        bl.log(f"rep {rep + 1}: guest writes {count} x 64 KiB")
        t0 = time.monotonic()
        while not any(ln.startswith("RANDWRITE START") for _, ln in vm.serial.snapshot()):
            vm.serial.send("go\n")
            if time.monotonic() - t0 > 60:
                raise RuntimeError("guest did not start the random writes")
            time.sleep(1)
        vm.serial.wait_for("RANDWRITE DONE", 1800, vm.proc)
        rec["guest_write_s"] = time.monotonic() - t0
        bl.log(f"rep {rep + 1}: written in {rec['guest_write_s']:.1f} s; vmkeep incremental backup")
        res = vmkeep_backup(args, repos["vmkeep"], vm, full=False)
        rec["vmkeep"]["incremental"] = record(res, repos["vmkeep"])
        check(res, "vmkeep incremental backup")
        bl.log(f"rep {rep + 1}: VM stopped; restic, rustic and borg second backups")
        file_backups(tools, repos, img, "incremental", vm, rec, rep)
    except Exception as e:
        rec["ok"] = False
        rec["errors"].append(str(e))
        bl.log(f"FAIL rep {rep + 1}: {e}")
    finally:
        if vm:
            vm.kill()
            rec["serial_tail"] = vm.serial_log.read_text(errors="replace")[-2000:]
        for t in tools:
            t.reset_cache()
    rec["derived"] = derive(rec)
    return rec


def throughput(args, guest: Path) -> dict:
    """Guest seqwrite rate (C lines/s): idle, during repeated vmkeep full backups, idle again."""
    d = Path(args.work) / "live"
    d.mkdir(parents=True, exist_ok=True)
    img = d / "disk0.raw"
    if not img.exists():
        make_disk(img, int(args.prefill_gib * bl.GiB), args.work)
    repo = d / "repo-throughput"
    bl.rmtree(repo)
    check(bl.run_timed([args.vmkeep, "--repo", str(repo), "init", "--encrypt", "--json"],
                       env={"VMKEEP_PASSWORD": bl.PASSWORD}), "vmkeep init")
    out = {"window_s": args.window, "backups": []}
    vm = None
    try:
        vm = Vm(d, guest, img, "vmkeep.workload=seqwrite", "tp")
        vm.serial.wait_for("C 20", 180, vm.proc)  # running steadily

        def count(a, b):
            return sum(1 for t, ln in vm.serial.snapshot() if a <= t < b and ln.startswith("C "))

        def idle(tag):
            a = time.monotonic()
            time.sleep(args.window)
            b = time.monotonic()
            time.sleep(0.5)  # let the last lines arrive
            out[tag] = {"seconds": b - a, "lines": count(a, b)}

        bl.log(f"throughput: idle {args.window:.0f} s")
        idle("idle_before")
        bl.log(f"throughput: vmkeep backup vm --full, repeated for {args.window:.0f} s")
        a = time.monotonic()
        while time.monotonic() - a < args.window:
            res = vmkeep_backup(args, repo, vm, full=True, name=VM + "-tp")
            out["backups"].append(record(res, None))
            check(res, "vmkeep backup (throughput)")
        b = time.monotonic()
        time.sleep(0.5)
        out["during_backup"] = {"seconds": b - a, "lines": count(a, b)}
        bl.log(f"throughput: idle {args.window:.0f} s")
        idle("idle_after")
        for k in ("idle_before", "during_backup", "idle_after"):
            out[k]["rate"] = out[k]["lines"] / out[k]["seconds"]
        il = out["idle_before"]["lines"] + out["idle_after"]["lines"]
        isec = out["idle_before"]["seconds"] + out["idle_after"]["seconds"]
        out["idle_rate"] = il / isec
        out["backup_rate"] = out["during_backup"]["rate"]
        out["ratio"] = out["backup_rate"] / out["idle_rate"] if out["idle_rate"] else None
        out["ok"] = True
    except Exception as e:
        out["ok"] = False
        out["error"] = str(e)
        bl.log(f"FAIL throughput: {e}")
    finally:
        if vm:
            vm.kill()
    return out


# ---------------------------------------------------------------- summary

def derive(rec: dict) -> dict:
    d = {}
    for tool in ("vmkeep",) + PEERS:
        for step in ("full", "incremental"):
            st = rec.get(tool, {}).get(step)
            ok = st is not None and st["rc"] == 0
            d[f"{tool}_{step}_s"] = st["seconds"] if ok else None
            d[f"{tool}_{step}_cpu_s"] = st["cpu_s"] if ok else None
            d[f"{tool}_{step}_rss_kib"] = st.get("maxrss_kib") if ok else None
            d[f"{tool}_{step}_rchar"] = st.get("rchar") if ok else None
            j = st.get("json") if ok else None
            if tool == "vmkeep" and isinstance(j, dict):
                s = j.get("stats") or {}
                for k in ("read_bytes", "new_bytes", "stored_bytes"):
                    d[f"{tool}_{step}_{k}"] = s.get(k)
                d[f"{tool}_{step}_pause_ms"] = j.get("pause_ms")
                d[f"{tool}_{step}_cbt"] = ",".join(f"{x.get('name')}:{x.get('cbt')}"
                                                  + (f"({x['reason']})" if x.get("reason") else "")
                                                  for x in j.get("disks", []))
            elif tool != "vmkeep" and ok:
                # measured: bytes its read() calls returned (image, repository, cache)
                d[f"{tool}_{step}_read_bytes"] = st.get("rchar")
                d[f"{tool}_{step}_pause_ms"] = st["seconds"] * 1000  # VM stopped for the backup
        rss = [d[f"{tool}_{step}_rss_kib"] for step in ("full", "incremental")
               if d[f"{tool}_{step}_rss_kib"] is not None]
        d[f"{tool}_peak_rss_kib"] = max(rss) if rss else None
        steps = rec.get(tool, {})
        f, i = steps.get("full", {}).get("repo"), steps.get("incremental", {}).get("repo")
        size = lambda u: u.get("file_bytes", u["apparent"])  # noqa: E731 (older results: apparent)
        d[f"{tool}_repo_full"] = size(f) if f else None
        d[f"{tool}_stored_inc"] = size(i) - size(f) if f and i else None
    d["changed_bytes"] = rec["change"]["changed_bytes"]
    return d


def ratio(a, b):
    return None if a is None or not b else a / b


def fr(x):
    return "-" if x is None else f"{x:.3g}x"


def fms(x):
    return "-" if x is None else f"{x:,.0f}"


def markdown(meta, med, tp, targets, failures) -> str:
    L = [f"## vmkeep live-VM benchmark, {meta['started']}", ""]
    h, dk = meta["host"], meta["disk"]
    L.append(f"Host: {h['nproc']} cores, {h['mem_bytes'] / bl.GiB:.0f} GiB RAM. Guest: QEMU TCG, 256 MiB, "
             f"virtio-blk on a 4 GiB raw image ({dk['prefill_bytes'] / bl.GiB:.2f} GiB of real data from "
             f"{dk['prefill_source'][0]}, rest sparse). Change: {meta['change']['writes']} guest writes of "
             f"64 KiB (dd from /dev/urandom, fsync) per repetition (seed {meta['change']['seed']} + rep), "
             f"{'/'.join(map(str, meta['unique_extents']))} distinct extents = "
             f"{'/'.join(f'{u * EXTENT / bl.MB:.1f}' for u in meta['unique_extents'])} MB. "
             f"Medians of {meta['args']['reps']} "
             f"repetition(s). vmkeep backs up the running VM; restic, rustic and borg back up the image file "
             f"with the VM stopped (QMP stop/cont), at the same two disk states.")
    L.append("Versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items() if v))
    L.append("")
    la = meta.get("max_loadavg")
    if la is not None and la > 0.5 * (h["nproc"] or 1):
        L.append(f"**Warning:** load average {la:.1f} before a run on {h['nproc']} cores: figures noisy.")
        L.append("")
    if failures:
        L.append("**FAILURES:**")
        L += [f"- **FAIL** {f}" for f in failures]
        L.append("")
    L.append("| tool | full s | incremental s | read by incremental | stored by incremental | pause_ms full / incremental | peak RSS |")
    L.append("|---|---|---|---|---|---|---|")
    labels = {"vmkeep": "vmkeep `backup vm` (live, --encrypt)", "restic": "restic (image file, VM stopped)",
              "rustic": "rustic (image file, VM stopped)",
              "borg": "borg repokey-blake2 (image file, VM stopped)"}
    for t in ("vmkeep",) + PEERS:
        g = lambda k: med.get(f"{t}_{k}")  # noqa: E731
        rss = g("peak_rss_kib")
        L.append(f"| {labels[t]} | {bl.fmt_s(g('full_s'))} | {bl.fmt_s(g('incremental_s'))} | "
                 f"{bl.fmt_bytes(g('incremental_read_bytes'))} | {bl.fmt_bytes(g('stored_inc'))} | "
                 f"{fms(g('full_pause_ms'))} / {fms(g('incremental_pause_ms'))} | "
                 f"{'-' if rss is None else f'{rss / 1024:.0f} MiB'} |")
    for o in PEERS:
        L.append(f"| **vmkeep/{o}** | {fr(ratio(med.get('vmkeep_full_s'), med.get(f'{o}_full_s')))} | "
                 f"{fr(ratio(med.get('vmkeep_incremental_s'), med.get(f'{o}_incremental_s')))} | "
                 f"{fr(ratio(med.get('vmkeep_incremental_read_bytes'), med.get(f'{o}_incremental_read_bytes')))} | "
                 f"{fr(ratio(med.get('vmkeep_stored_inc'), med.get(f'{o}_stored_inc')))} | | "
                 f"{fr(ratio(med.get('vmkeep_peak_rss_kib'), med.get(f'{o}_peak_rss_kib')))} |")
    L.append("")
    L.append("vmkeep's own stats (medians, MB) read / new / stored: full "
             + " / ".join(bl.fmt_mb(med.get(f"vmkeep_full_{k}")) for k in ("read_bytes", "new_bytes", "stored_bytes"))
             + "; incremental "
             + " / ".join(bl.fmt_mb(med.get(f"vmkeep_incremental_{k}")) for k in ("read_bytes", "new_bytes", "stored_bytes"))
             + f". Change tracking: full `{meta.get('cbt_full')}`, incremental `{meta.get('cbt_incremental')}`.")
    L.append("")
    if tp:
        L.append("Guest write throughput (seqwrite workload: 4 KiB write + fsync per `C i` line on the serial console):")
        L.append("")
        if tp.get("ok"):
            L.append("| state | seconds | writes | writes/s |")
            L.append("|---|---|---|---|")
            for k, lab in (("idle_before", "idle (before)"), ("during_backup",
                           f"during `backup vm --full` ({len(tp['backups'])} backups back to back)"),
                           ("idle_after", "idle (after)")):
                x = tp[k]
                L.append(f"| {lab} | {x['seconds']:.1f} | {x['lines']} | {x['rate']:.1f} |")
            L.append(f"| **during backup / idle** | | | **{tp['ratio']:.2f}x** |")
            bs = [b["seconds"] for b in tp["backups"] if b["rc"] == 0]
            pm = [b.get("json", {}).get("pause_ms") for b in tp["backups"]]
            L.append("")
            L.append(f"Backups in the window: {', '.join(f'{s:.1f} s' for s in bs)}; pause_ms {pm}.")
        else:
            L.append(f"**FAIL**: {tp.get('error')}")
        L.append("")
    L.append("Targets:")
    for t in targets:
        L.append(f"- {t['verdict']}: {t['what']} ({t['detail']})")
    L.append("")
    L.append("Columns: MB = 10^6 bytes. read by incremental: vmkeep's `stats.read_bytes` (disk bytes it "
             "read from QEMU over NBD); for the peers, the bytes their read() calls returned (rchar from "
             "/proc/PID/io: the image file, holes read as zeros, plus repository and cache reads). "
             "stored by incremental: growth of the bytes of the repository's files during the "
             "incremental. pause_ms: vmkeep's reported `pause_ms`; for the peers, their backup time "
             "(the VM must stay stopped while they read the image to get a consistent copy). peak RSS: "
             "the tool's own peak (GNU time), the higher of its two backups.")
    return "\n".join(L) + "\n"


def check_targets(med):
    out = []

    def add(what, val, limit, detail):
        if val is None or limit is None:
            out.append({"what": what, "verdict": "n/a", "detail": "not measured"})
        else:
            out.append({"what": what, "verdict": "PASS" if val <= limit else "MISS", "detail": detail,
                        "value": val, "limit": limit})

    v, r = med.get("vmkeep_incremental_s"), med.get("restic_incremental_s")
    add("vmkeep incremental <= 0.1x restic's second backup", v, None if r is None else 0.1 * r,
        f"vmkeep {bl.fmt_s(v)} s vs restic {bl.fmt_s(r)} s = {fr(ratio(v, r))}")
    for step in ("full", "incremental"):
        p = med.get(f"vmkeep_{step}_pause_ms")
        add(f"pause 0 ms for a disk-only capture ({step})", p, 0, f"pause_ms {p}")
    return out


def finish(meta, runs, tp):
    keys = sorted({k for r in runs for k in r["derived"]})
    med = {}
    for k in keys:
        vals = [r["derived"].get(k) for r in runs]
        if all(isinstance(v, (int, float)) or v is None for v in vals):
            med[k] = bl.median(vals)
        else:
            med[k] = vals[0]
    meta["unique_extents"] = [r["change"]["unique_extents"] for r in runs]
    meta["cbt_full"] = med.get("vmkeep_full_cbt")
    meta["cbt_incremental"] = med.get("vmkeep_incremental_cbt")
    meta["max_loadavg"] = max((r["loadavg_before"] for r in runs if r.get("loadavg_before") is not None),
                              default=None)
    targets = check_targets(med)
    failures = [f"rep {r['rep'] + 1}: {'; '.join(r['errors'])}" for r in runs if not r["ok"]]
    if tp and not tp.get("ok"):
        failures.append(f"throughput: {tp.get('error')}")
    inc_cbt = med.get("vmkeep_incremental_cbt") or ""
    if runs and all(r["ok"] for r in runs) and "used" not in inc_cbt:
        failures.append(f"vmkeep incremental did not use change tracking: {inc_cbt}")
    return med, targets, failures, markdown(meta, med, tp, targets, failures)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=bl.DEFAULT_WORK, help="work dir (default %(default)s); uses WORK/live/")
    ap.add_argument("--reps", type=int, default=1, help="repetitions, medians shown (default 1; 3 for less noise)")
    ap.add_argument("--vmkeep", default=bl.DEFAULT_VMKEEP, help="vmkeep binary (default %(default)s)")
    ap.add_argument("--rustic", default=brun.default_rustic(),
                    help="rustic binary (default %(default)s, built by scripts/install-deps.sh bench)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the guest's random writes (+rep)")
    ap.add_argument("--count", type=int, default=0, help="64 KiB guest writes (default: 1%% of the disk, 656)")
    ap.add_argument("--prefill-gib", type=float, default=1.5, help="real data at the start of the disk (default 1.5)")
    ap.add_argument("--window", type=float, default=20, help="seconds per throughput window (default 20; 0 skips)")
    ap.add_argument("--min-free-gib", type=float, default=10, help="free space required in --work (default 10)")
    ap.add_argument("--keep", action="store_true", help="keep WORK/live/ afterwards")
    ap.add_argument("--report", metavar="JSON", help="only print the table again from a raw results file")
    args = ap.parse_args(argv)
    if args.report:
        d = json.loads(Path(args.report).read_text())
        _, _, failures, md = finish(d, d["runs"], d.get("throughput"))
        print(md)
        return 1 if failures else 0

    problems = [f"{b} not found" for b in ("qemu-system-x86_64", "restic", "borg") if not bl.shutil.which(b)]
    problems += [p for p in (brun.Rustic(Path(args.work), args.rustic).check(), bl.gnu_time_problem()) if p]
    if not (os.path.isfile(args.vmkeep) and os.access(args.vmkeep, os.X_OK)):
        problems.append(f"vmkeep binary not found at {args.vmkeep}: cargo build --release -p vmkeep")
    if problems:
        bl.die("; ".join(problems))
    bl.check_free_space(args.work, args.min_free_gib)
    g = bl.run_quiet(["bash", str(bl.REPO_ROOT / "tests" / "guest" / "build.sh")])
    guest = Path(g.stdout.strip().splitlines()[-1])

    # SIGTERM unwinds like Ctrl-C, so the finally blocks kill QEMU.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lockf = open(LOCK, "w")
    try:
        fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        bl.log(f"waiting for {LOCK} (a QEMU test is running)")
        fcntl.flock(lockf, fcntl.LOCK_EX)

    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "args": vars(args), "host": bl.host_info(),
            "guest": str(guest),
            "versions": {"vmkeep": bl.tool_version([args.vmkeep, "--version"]),
                         "qemu": bl.tool_version(["qemu-system-x86_64", "--version"]),
                         "restic": bl.tool_version(["restic", "version"]),
                         "rustic": bl.tool_version([args.rustic, "--version"]),
                         "borg": bl.tool_version(["borg", "--version"])}}
    runs, tp = [], None
    try:
        for rep in range(args.reps):
            runs.append(one_rep(args, guest, rep))
        meta["disk"] = runs[0]["disk"]
        meta["change"] = runs[0]["change"]
        if args.window > 0:
            tp = throughput(args, guest)
    finally:
        if not args.keep:
            bl.rmtree(Path(args.work) / "live")
        lockf.close()
    med, targets, failures, md = finish(meta, runs, tp)
    jp, mp = bl.write_results("live", {**meta, "runs": runs, "throughput": tp, "medians": med,
                                       "targets": targets, "failures": failures}, md)
    print(md)
    bl.log(f"raw results: {jp}\ntable: {mp}")
    if failures:
        print("\n".join(f"FAIL: {f}" for f in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
