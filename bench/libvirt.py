#!/usr/bin/env python3
"""vmkeep through libvirt's backup API against virtnbdbackup, on the same running libvirt domain.

The domain: the cached test guest (tests/guest/build.sh, idle workload, TCG) on one 2 GiB qcow2
disk whose first ~1 GiB holds real data (files of /usr, as bench/live.py makes them), defined
and started under the system's libvirt (libvirtd started here, without /dev/kvm, if none runs).

Per repetition, for each tool in turn (the order rotates each repetition), from a domain with
no checkpoints:
  full backup; 1% of the disk rewritten (328 pieces of 64 KiB of random data at random
  offsets, through QEMU's qemu-io via libvirt's monitor passthrough; fresh data for every run,
  the same amount for every tool); incremental; restore of the latest
  point to qcow2; the restored image compared with the live disk (`qemu-img compare -U`).
Tools: `vmkeep backup vm --libvirt` (a fresh unencrypted repository, zstd; `restore --format
qcow2`), `virtnbdbackup -l full|inc` and `virtnbdrestore` (default), and the same with `-z`.

Measured per step: wall seconds; CPU seconds (user + sys of the tool and the children it
reaped); peak RSS of the whole process tree (the sum of VmRSS over the tool and every
descendant, qemu-nbd included, sampled every 10 ms); the disk bytes vmkeep read (its own
count; virtnbdbackup reads the same dirty extents, see peers.md); bytes stored (the
repository or output folder's growth, in allocated blocks); the guest pause (vmkeep's `pause_ms`; libvirt's pull
backup does not pause, for either tool).

Usage: python3 bench/libvirt.py [--reps 3] [--work DIR] [--keep]
Writes bench/out/libvirt-<timestamp>.json (raw) and .md (the table printed on stdout).
Targets (issue 11): every vmkeep time at most 0.5x virtnbdbackup's (default), stored at most
0.8x of `-z`. Needs root, libvirt (scripts/install-deps.sh), virtnbdbackup (Debian package
virtnbdbackup; scripts/install-deps.sh bench). Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
import live as blive  # noqa: E402  (make_disk)

DOMAIN = "vmkeep-bench-libvirt"
URI = "qemu:///system"
DISK_SIZE = 2 << 30
PREFILL = 1 << 30
WRITES = 328  # 64 KiB each: 1% of 2 GiB
TOOLS = ("vmkeep", "virtnbdbackup", "virtnbdbackup-z")


def virsh(*args, check=True) -> str:
    r = subprocess.run(["virsh", "-c", URI, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "LC_ALL": "C"})
    if check and r.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r.stdout


def ensure_libvirtd() -> list[int]:
    """Starts virtlogd and libvirtd when none answers (see vmkeep-testkit's libvirt.rs for why
    /dev/kvm is hidden from libvirtd); returns the pids started, to stop at the end."""
    if subprocess.run(["virsh", "-c", URI, "version"], capture_output=True).returncode == 0:
        return []
    started = []
    for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
        cmd = [f"/usr/sbin/{daemon}", "--daemon", "--pid-file", pidfile]
        if daemon == "libvirtd" and os.path.exists("/dev/kvm"):
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind /dev/null /dev/kvm && exec "$0" "$@"', *cmd]
        subprocess.run(cmd, check=True)
        started.append(int(Path(pidfile).read_text().strip()))
    t0 = time.time()
    while subprocess.run(["virsh", "-c", URI, "version"], capture_output=True).returncode != 0:
        if time.time() - t0 > 60:
            bl.die("libvirtd never answered")
        time.sleep(0.1)
    return started


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd, env=None) -> dict:
    """Runs cmd: wall seconds; CPU seconds of the tool and the children it reaped (the
    harness's RUSAGE_CHILDREN before and after); peak RSS of the whole tree, sampled."""
    peak = [0]
    before = os.times()
    p = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **(env or {})})
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sum(rss_kib(q) for q in tree_pids(p.pid)))
            done.wait(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    out, err = p.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    after = os.times()
    res = {"cmd": [str(c) for c in cmd], "rc": p.returncode, "seconds": seconds,
           "cpu_s": (after.children_user - before.children_user)
           + (after.children_system - before.children_system),
           "peak_rss_kib": peak[0],
           "stdout": out.decode(errors="replace")[-20000:],
           "stderr": err.decode(errors="replace")[-4000:]}
    if p.returncode != 0:
        bl.log(f"FAIL {' '.join(res['cmd'])}: exit {p.returncode}\n{res['stderr'][-2000:]}")
    return res


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
    return total


def delete_checkpoints():
    names = [n.strip() for n in virsh("checkpoint-list", DOMAIN, "--name").splitlines() if n.strip()]
    for n in reversed(names):
        if subprocess.run(["virsh", "-c", URI, "checkpoint-delete", DOMAIN, n], capture_output=True).returncode:
            virsh("checkpoint-delete", DOMAIN, n, "--metadata")


QDEV = "/machine/peripheral/virtio-disk0/virtio-backend"


def hmp_qemu_io(command: str) -> str:
    """qemu-io on the guest's disk device through libvirt's monitor passthrough. HMP reports
    errors as text with success, so any output but qemu-io's own is an error here."""
    out = virsh("qemu-monitor-command", DOMAIN, "--hmp", f'qemu-io -d {QDEV} "{command}"').strip()
    if "rror" in out or "conflict" in out or "failed" in out or "not found" in out:
        raise RuntimeError(f"qemu-io {command}: {out}")
    return out


def random_writes(seed: int, work: Path):
    """1% of the disk rewritten with random data in 64 KiB pieces at random offsets, through
    QEMU's qemu-io (monitor passthrough) reading each piece from a file (`write -s`), so the
    change is as incompressible and unique as real data."""
    rng = random.Random(seed)
    src = work / "writes"
    src.mkdir(exist_ok=True)
    os.chmod(src, 0o755)
    for i in range(WRITES):
        off = rng.randrange(DISK_SIZE // 65536) * 65536
        piece = src / f"{i}.bin"
        piece.write_bytes(rng.randbytes(65536))
        os.chmod(piece, 0o644)  # QEMU runs as libvirt's user
        hmp_qemu_io(f"write -s {piece} {off} 64k")


def define_domain(work: Path, guest: Path, disk: Path):
    for f in ("vmlinuz", "initrd.gz"):
        shutil.copy(guest / f, work / f)
    os.chmod(work, 0o711)
    xml = f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{work}/vmlinuz</kernel><initrd>{work}/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 vmkeep.workload=idle</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{work}/serial.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""
    (work / "domain.xml").write_text(xml)
    virsh("destroy", DOMAIN, check=False)
    virsh("undefine", DOMAIN, "--checkpoints-metadata", check=False)
    virsh("define", work / "domain.xml")
    virsh("start", DOMAIN)
    serial = work / "serial.log"
    t0 = time.time()
    while not (serial.exists() and "IDLE" in serial.read_text(errors="replace")):
        if time.time() - t0 > 180:
            bl.die("the guest never printed IDLE")
        time.sleep(0.2)


def same_as_live(restored: Path, live: Path) -> bool:
    # QEMU keeps qcow2 metadata (new clusters' L2 entries) in its cache: without a flush, a
    # reader of the image file beside it (-U) sees the new clusters as holes.
    hmp_qemu_io("flush")
    r = subprocess.run(["qemu-img", "compare", "-U", str(restored), str(live)], capture_output=True, text=True)
    if r.returncode != 0:
        bl.log(f"MISMATCH {restored}: {r.stdout.strip()} {r.stderr.strip()}")
    return r.returncode == 0


def one_tool(args, tool: str, rep: int, work: Path, live: Path) -> dict:
    base = work / f"{tool}-{rep}"
    bl.rmtree(base)
    base.mkdir(parents=True)
    delete_checkpoints()
    rec: dict = {"tool": tool, "rep": rep}
    if tool == "vmkeep":
        repo = base / "repo"
        env = {"VMKEEP_CACHE_DIR": str(base / "cache")}
        bl.run_quiet([args.vmkeep, "--repo", repo, "init", "-q"], env=env)
        vk = [args.vmkeep, "--repo", repo, "--json", "-q"]
        steps = {
            "full": vk + ["backup", "vm", "--libvirt", DOMAIN],
            "incremental": vk + ["backup", "vm", "--libvirt", DOMAIN],
            "restore": vk + ["restore", f"{DOMAIN}@latest", "--format", "qcow2", "--target", base / "restored"],
        }
        stored_dir = repo
        restored = base / "restored" / "vda.qcow2"
    else:
        out = base / "backup"
        z = ["-z"] if tool.endswith("-z") else []
        env = {}
        steps = {
            "full": ["virtnbdbackup", "-U", URI, "-d", DOMAIN, "-l", "full", "-o", out, *z],
            "incremental": ["virtnbdbackup", "-U", URI, "-d", DOMAIN, "-l", "inc", "-o", out, *z],
            "restore": ["virtnbdrestore", "-U", URI, "-i", out, "-o", base / "restored"],
        }
        stored_dir = out
        restored = base / "restored" / "vda"
    for step, cmd in steps.items():
        if step == "incremental":
            # Fresh data for every run: the same seed for two tools of a repetition would
            # rewrite the second one's disk with bytes its full backup already holds.
            random_writes(1000 + 10 * rep + TOOLS.index(tool), work)
        before = dir_bytes(stored_dir) if stored_dir.exists() else 0
        r = run_measured(cmd, env=env)
        r["stored_bytes"] = (dir_bytes(stored_dir) - before) if step != "restore" else None
        if tool == "vmkeep" and step != "restore" and r["rc"] == 0:
            j = json.loads(r["stdout"])
            r["read_bytes"] = j["stats"]["read_bytes"]
            r["pause_ms"] = j["pause_ms"]
            r["cbt"] = [d["cbt"] for d in j["disks"]]
        if tool == "vmkeep" and step == "incremental" and r["rc"] == 0 and not r.get("read_bytes"):
            r["rc"] = -1
            r["stderr"] += "\nthe incremental read nothing: the random writes did not land"
        rec[step] = r
        if r["rc"] != 0:
            rec["failed"] = step
            return rec
    if tool != "vmkeep" and not restored.exists():
        cands = sorted((base / "restored").glob("vda*"))
        restored = cands[0] if cands else restored
    rec["identical"] = same_as_live(restored, live)
    if not args.keep:
        bl.rmtree(base)
    return rec


def table(runs: list[dict]) -> tuple[str, dict, list[str]]:
    med: dict = {}
    for tool in TOOLS:
        for step in ("full", "incremental", "restore"):
            rs = [r[step] for r in runs if r["tool"] == tool and step in r and r[step]["rc"] == 0]
            med[(tool, step)] = {
                k: bl.median([x.get(k) for x in rs])
                for k in ("seconds", "cpu_s", "peak_rss_kib", "stored_bytes", "read_bytes", "pause_ms")
            }
    lines = ["| tool | step | seconds | CPU s | peak RSS (tree) | stored | read (vmkeep) |",
             "|---|---|---|---|---|---|---|"]
    for tool in TOOLS:
        for step in ("full", "incremental", "restore"):
            m = med[(tool, step)]
            rss = "-" if m["peak_rss_kib"] is None else f"{m['peak_rss_kib'] / 1024:.0f} MiB"
            lines.append(f"| {tool} | {step} | {bl.fmt_s(m['seconds'])} | {bl.fmt_s(m['cpu_s'])} | {rss} | "
                         f"{bl.fmt_bytes(m['stored_bytes'])} | {bl.fmt_bytes(m['read_bytes'])} |")
    ratios, misses = [], []
    for step in ("full", "incremental", "restore"):
        a, b = med[("vmkeep", step)]["seconds"], med[("virtnbdbackup", step)]["seconds"]
        if a and b:
            ratios.append(f"- {step}: vmkeep {a:.2f} s = {a / b:.2f}x virtnbdbackup's {b:.2f} s (target <= 0.5x)")
            if a / b > 0.5:
                misses.append(f"{step} time {a / b:.2f}x")
    sa = (med[("vmkeep", "full")]["stored_bytes"] or 0) + (med[("vmkeep", "incremental")]["stored_bytes"] or 0)
    sz = (med[("virtnbdbackup-z", "full")]["stored_bytes"] or 0) + (med[("virtnbdbackup-z", "incremental")]["stored_bytes"] or 0)
    if sz:
        ratios.append(f"- stored (full + incremental): vmkeep {bl.fmt_bytes(sa)} = {sa / sz:.2f}x virtnbdbackup -z's {bl.fmt_bytes(sz)} (target <= 0.8x)")
        if sa / sz > 0.8:
            misses.append(f"stored {sa / sz:.2f}x")
    bad = [f"{r['tool']} rep {r['rep']}: " + ("failed at " + r["failed"] if "failed" in r else "restore differs from the live disk")
           for r in runs if "failed" in r or not r.get("identical")]
    md = "\n".join(lines) + "\n\n" + "\n".join(ratios) + "\n"
    return md, {f"{t}/{s}": v for (t, s), v in med.items()}, misses + bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default=bl.DEFAULT_WORK)
    ap.add_argument("--vmkeep", default=bl.DEFAULT_VMKEEP)
    ap.add_argument("--keep", action="store_true", help="keep every repository and restore")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        bl.die("run as root (libvirt's system daemon)")
    for t in ("virsh", "virtnbdbackup", "virtnbdrestore", "qemu-img"):
        if not shutil.which(t):
            bl.die(f"{t} not found: scripts/install-deps.sh bench")
    work = Path(args.work) / "libvirt"
    bl.rmtree(work)
    work.mkdir(parents=True)
    bl.check_free_space(work, 8)
    guest = Path(bl.run_quiet(["bash", str(bl.REPO_ROOT / "tests" / "guest" / "build.sh")]).stdout.split()[-1])
    lockf = open(blive.LOCK, "w")
    fcntl.flock(lockf, fcntl.LOCK_EX)
    started = ensure_libvirtd()
    raw = work / "data.raw"
    saved = blive.DISK_SIZE
    blive.DISK_SIZE = DISK_SIZE
    try:
        prep = blive.make_disk(raw, PREFILL, args.work)
    finally:
        blive.DISK_SIZE = saved
    live = work / "vda.qcow2"
    bl.run_quiet(["qemu-img", "convert", "-O", "qcow2", raw, live])
    raw.unlink()
    runs = []
    try:
        define_domain(work, guest, live)
        for rep in range(args.reps):
            order = TOOLS[rep % 3:] + TOOLS[:rep % 3]
            for tool in order:
                bl.log(f"rep {rep + 1}/{args.reps}: {tool}")
                runs.append(one_tool(args, tool, rep, work, live))
    finally:
        virsh("destroy", DOMAIN, check=False)
        virsh("undefine", DOMAIN, "--checkpoints-metadata", check=False)
        for pid in reversed(started):
            try:
                os.kill(pid, 15)
            except OSError:
                pass
    md, med, misses = table(runs)
    meta = {"host": bl.host_info(), "loadavg": bl.loadavg(), "prefill": prep,
            "virtnbdbackup": bl.tool_version(["virtnbdbackup", "--version"]),
            "libvirt": bl.tool_version(["virsh", "--version"]), "reps": args.reps}
    head = (f"# vmkeep --libvirt vs virtnbdbackup ({time.strftime('%Y-%m-%d %H:%M')}, medians of {args.reps}, "
            f"load {meta['loadavg']})\n\nDomain: 2 GiB qcow2, {bl.fmt_bytes(prep.get('prefill_bytes'))} of data; "
            f"incremental after {WRITES} x 64 KiB writes of random data; virtnbdbackup {meta['virtnbdbackup']}, libvirt {meta['libvirt']}.\n\n")
    tail = "\n" + ("Targets missed: " + "; ".join(misses) if misses else "All targets met; every restore equals the live disk.") + "\n"
    print(head + md + tail)
    bl.write_results("libvirt", {"meta": meta, "runs": runs, "medians": med, "misses": misses}, head + md + tail)
    return 1 if any("rep" in m for m in misses) else 0


if __name__ == "__main__":
    sys.exit(main())
