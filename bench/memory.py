#!/usr/bin/env python3
"""How QEMU memory streams deduplicate and how fast they go into a repository, per layout.

For each guest (the test guest of tests/guest/build.sh under QEMU 10, TCG): boot it, let it
settle, take two background snapshots (QMP migrate with background-snapshot, to a file) a few
seconds apart while it idles (or runs its seqwrite workload), and a third one through a pipe
straight into a repository (as `backup vm --memory` does), timed. Then, for each candidate layout,
a fresh encrypted repository stores capture 1, then capture 2 (deduplicating against 1), with
examples/stream_ingest (the library's real code path) and reads each back, compared with the
file. Candidates:
  memory-16K (vmkeep's choice), memory-4K, memory-64K: page images in chunks of that size,
      the rest (headers, device state) as a literal stream in 8/16/64 KiB content-defined chunks
  cdc-16K, cdc-4K, cdc-64K: the whole stream in content-defined chunks (avg size; min avg/2,
      max avg*4), no parsing
  disk: the stream file as a raw disk image (fixed 64 KiB chunks): the disk pipeline
Stored bytes = repository bytes written by the backup (packs, index objects, manifest: the
`stored_bytes` stat). MB/s = stream bytes / wall seconds of the whole backup (lease, read,
hash, compress, encrypt, pack, fsync, commit; no read back), median of --reps runs of capture 1
into a fresh repository (the timed layouts; the others once); "MB per CPU s" = stream bytes / CPU seconds (user + sys) of that run, the figure a
loaded machine disturbs least; "read MB/s" the same for reading the stream back (verified).

Usage: python3 bench/memory.py [--reps 3] [--guests idle-256,seqwrite-256,idle-1024] [--work DIR]
Needs: cargo build --release -p vmkeep-repo --example stream_ingest; qemu-system-x86_64.
Writes bench/out/memory-<timestamp>.json (raw) and .md (the table printed on stdout).
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

LOCK = "/tmp/vmkeep-qemu-tests.lock"
DEFAULT_INGEST = str(bl.REPO_ROOT / "target" / "release" / "examples" / "stream_ingest")
CANDIDATES = {
    "memory-16K": ["--mode", "memory", "--image-chunk", "16384"],
    "memory-4K": ["--mode", "memory", "--image-chunk", "4096"],
    "memory-64K": ["--mode", "memory", "--image-chunk", "65536"],
    "cdc-16K": ["--mode", "cdc", "--cdc", "8192,16384,65536"],
    "cdc-4K": ["--mode", "cdc", "--cdc", "2048,4096,16384"],
    "cdc-64K": ["--mode", "cdc", "--cdc", "32768,65536,262144"],
    "disk": ["--mode", "disk"],
}
# Layouts whose throughput is measured (--reps times).
TIMED = ("memory-16K", "cdc-16K", "disk")


def qmp(sock: Path, command: str, arguments: dict | None = None, timeout: float = 30):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock))
    f = s.makefile("rwb")
    try:
        json.loads(f.readline())
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


def pipe_capture(args, d: Path, sock: Path) -> dict:
    """A third capture the way `backup vm --memory` takes it: QEMU writes into a pipe that
    stream_ingest reads straight into a fresh repository. Returns QEMU's and vmkeep's times."""
    fifo = d / "pipe.fifo"
    os.mkfifo(fifo, 0o600)
    repo = d / "pipe-repo"
    cmd = [args.ingest, "--repo", str(repo), "--init", "--encrypt", "--mode", "memory", str(fifo)]
    with open(d / "pipe.out", "w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        t = time.monotonic()
        qmp(sock, "migrate", {"uri": f"exec:cat > {fifo}"})
        while True:
            st = qmp(sock, "query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        migrate_s = time.monotonic() - t
        if p.wait(timeout=120) != 0 or st["status"] != "completed":
            raise RuntimeError(f"pipe capture: {st}, stream_ingest exit {p.returncode}")
        out.seek(0)
        r = json.loads(out.read())
    bl.rmtree(repo)
    return {"migrate_s": round(migrate_s, 3), "ingest": r}


def take_captures(args, work: Path, guest: Path, workload: str, mib: int, settle: float,
                  gap: float) -> dict:
    """Boots the guest, waits until it runs its workload and `settle` seconds more, then takes
    two background snapshots `gap` seconds apart into files, and a third through a pipe into a
    repository. Returns their paths and timings."""
    d = work / f"{workload}-{mib}"
    bl.rmtree(d)
    d.mkdir(parents=True)
    sock, log, disk = d / "qmp.sock", d / "serial.log", d / "disk.qcow2"
    bl.run_quiet(["qemu-img", "create", "-f", "qcow2", str(disk), "64M"])
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", str(mib),
           "-no-reboot", "-qmp", f"unix:{sock},server=on,wait=off", "-serial", f"file:{log}",
           "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.gz"),
           "-append", f"console=ttyS0 quiet panic=-1 vmkeep.workload={workload}",
           "-blockdev", f"driver=file,filename={disk},node-name=f0",
           "-blockdev", "driver=qcow2,file=f0,node-name=disk0",
           "-device", "virtio-blk-pci,drive=disk0,id=vd0"]
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.monotonic()
        ready = "IDLE" if workload == "idle" else "C 20"
        while ready not in (log.read_text(errors="replace") if log.exists() else ""):
            if qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited ({qemu.returncode})")
            if time.monotonic() - t0 > 180:
                raise RuntimeError(f"the guest never printed {ready!r}")
            time.sleep(0.1)
        boot_s = time.monotonic() - t0
        time.sleep(settle)
        qmp(sock, "migrate-set-capabilities", {"capabilities": [
            {"capability": "background-snapshot", "state": True},
            {"capability": "events", "state": True}]})
        caps = []
        for i in (1, 2):
            out = d / f"capture{i}.bin"
            t = time.monotonic()
            qmp(sock, "migrate", {"uri": f"file:{out}"})
            while True:
                st = qmp(sock, "query-migrate")
                if st.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.01)
            if st["status"] != "completed":
                raise RuntimeError(f"capture {i}: {st}")
            caps.append({"path": str(out), "bytes": out.stat().st_size,
                         "seconds": round(time.monotonic() - t, 3)})
            if i == 1:
                time.sleep(gap)
        time.sleep(gap)
        pipe = pipe_capture(args, d, sock)
        lines = log.read_text(errors="replace").strip().splitlines()
        return {"guest": f"{workload}-{mib}", "boot_s": round(boot_s, 1), "captures": caps,
                "pipe": pipe, "serial_tail": lines[-1] if lines else ""}
    finally:
        qemu.kill()
        qemu.wait()


def ingest(args, repo: Path, flags: list, path: str, init: bool, verify: bool) -> dict:
    """One run of stream_ingest; its JSON plus the process's CPU seconds (user + sys)."""
    cmd = [args.ingest, "--repo", str(repo), "--encrypt", *flags, path]
    if init:
        cmd.insert(3, "--init")
    if verify:
        cmd.append("--verify")
    with open(Path(args.work) / "ingest.out", "w+") as out, open(Path(args.work) / "ingest.err", "w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {err.read().strip()}")
        r = json.loads(out.read())
    r["cpu_s"] = ru.ru_utime + ru.ru_stime
    return r


def measure(args, work: Path, cap: dict) -> dict:
    """Every candidate on one guest's two captures; then the timed layouts again, interleaved,
    so that a change of the machine's load hits them alike."""
    c1, c2 = (c["path"] for c in cap["captures"])
    out = {}
    repo = work / "repo"
    for name, flags in CANDIDATES.items():
        bl.log(f"{cap['guest']}: {name}")
        bl.rmtree(repo)
        verify = name != "disk"
        first = ingest(args, repo, flags, c1, True, verify)
        second = ingest(args, repo, flags, c2, False, verify)
        out[name] = {"first": first, "second": second, "ingest_mbps": [], "cpu_s": [],
                     "read_mbps": [first["read_back"]["mbps"]] if verify else [], "load": [bl.loadavg()]}
    # Throughput: capture 1 into a fresh repository, no read back (its CPU time would count).
    for rep in range(args.reps):
        for name in CANDIDATES if rep == 0 else TIMED:
            bl.log(f"{cap['guest']}: {name} timed ({rep + 1}/{args.reps})")
            bl.rmtree(repo)
            r = ingest(args, repo, CANDIDATES[name], c1, True, False)
            o = out[name]
            o["ingest_mbps"].append(r["mbps"])
            o["cpu_s"].append(r["cpu_s"])
            o["load"].append(bl.loadavg())
    bl.rmtree(repo)
    return out


def table(meta: dict, results: dict) -> str:
    lines = [
        "# Memory streams: stored bytes and throughput per layout",
        "",
        f"{meta['started']}, {meta['host']['nproc']} cores, {meta['host'].get('cpu')}, "
        f"{meta['versions']['qemu']}; reps {meta['args']['reps']} (MB/s: medians); "
        "repositories encrypted.",
        "",
        "| guest | layout | capture 1 stored | capture 2 stored | 2 / 1 | ingest MB/s | MB per CPU s | read MB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g, per in results.items():
        for name, r in per.items():
            s1 = r["first"]["stats"]["stored_bytes"]
            s2 = r["second"]["stats"]["stored_bytes"]
            rd = bl.median(r["read_mbps"])
            per_cpu = r["first"]["bytes"] / bl.median(r["cpu_s"]) / bl.MB
            lines.append(f"| {g} | {name} | {bl.fmt_bytes(s1)} | {bl.fmt_bytes(s2)} | "
                         f"{100 * s2 / s1:.2f}% | {bl.median(r['ingest_mbps']):.0f} | {per_cpu:.0f} | "
                         f"{'-' if rd is None else f'{rd:.0f}'} |")
    lines.append("")
    loads = [x for per in results.values() for r in per.values() for x in r["load"] if x is not None]
    if loads:
        lines.append(f"- load average during the runs: {min(loads):.1f} to {max(loads):.1f} "
                     f"(2 cores: above 2, other work took CPU and wall-clock MB/s drop)")
    for g, per in results.items():
        if "memory-16K" in per and "disk" in per:
            m = bl.median(per["memory-16K"]["ingest_mbps"])
            dk = bl.median(per["disk"]["ingest_mbps"])
            cm = bl.median(per["memory-16K"]["cpu_s"])
            cd = bl.median(per["disk"]["cpu_s"])
            lines.append(f"- {g}: memory-16K ingests at {m / dk:.2f}x the disk pipeline's MB/s "
                         f"({m:.0f} vs {dk:.0f}; target >= 0.80): {'PASS' if m >= 0.8 * dk else 'MISS'}; "
                         f"CPU seconds {cm:.2f} vs {cd:.2f} (per byte: {cd / cm:.2f}x the disk rate)")
        if g.startswith("idle") and "memory-16K" in per:
            r = per["memory-16K"]
            ratio = r["second"]["stats"]["stored_bytes"] / r["first"]["stats"]["stored_bytes"]
            lines.append(f"- {g}: the second capture stores {100 * ratio:.2f}% of the first "
                         f"(target <= 5%): {'PASS' if ratio <= 0.05 else 'MISS'}")
    for g, c in meta["captures"].items():
        sizes = ", ".join(f"{x['bytes'] / bl.MB:.1f} MB in {x['seconds']:.2f} s" for x in c["captures"])
        lines.append(f"- {g}: captures to a file {sizes}; serial: {c['serial_tail']!r}")
        p = c.get("pipe")
        if p:
            i = p["ingest"]
            lines.append(f"- {g}: a capture through a pipe straight into a fresh repository "
                         f"(memory-16K): {i['bytes'] / bl.MB:.1f} MB, QEMU's migration "
                         f"{p['migrate_s']:.2f} s, the backup {i['seconds']:.2f} s "
                         f"({i['mbps']:.0f} MB/s), stored {bl.fmt_bytes(i['stats']['stored_bytes'])}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path(bl.DEFAULT_WORK) / "memory"), help="work dir (default %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the timed layouts (default 3)")
    ap.add_argument("--guests", default="idle-256,seqwrite-256",
                    help="WORKLOAD-MIB,... (default %(default)s; e.g. add idle-1024)")
    ap.add_argument("--settle", type=float, default=5, help="seconds after the workload started (default 5)")
    ap.add_argument("--gap", type=float, default=3, help="seconds between the two captures (default 3)")
    ap.add_argument("--ingest", default=DEFAULT_INGEST, help="stream_ingest example (default %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the captures in --work")
    ap.add_argument("--report", metavar="JSON", help="only print the table again from a raw results file")
    args = ap.parse_args(argv)
    if args.report:
        d = json.loads(Path(args.report).read_text())
        print(table(d["meta"], d["results"]))
        return 0
    if not (os.path.isfile(args.ingest) and os.access(args.ingest, os.X_OK)):
        bl.die(f"{args.ingest} not found: cargo build --release -p vmkeep-repo --example stream_ingest")
    if not bl.shutil.which("qemu-system-x86_64"):
        bl.die("qemu-system-x86_64 not found (scripts/install-deps.sh)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bl.check_free_space(work, 4)
    g = bl.run_quiet(["bash", str(bl.REPO_ROOT / "tests" / "guest" / "build.sh")])
    guest = Path(g.stdout.strip().splitlines()[-1])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "args": vars(args), "host": bl.host_info(),
            "versions": {"qemu": bl.tool_version(["qemu-system-x86_64", "--version"])}, "captures": {}}
    results = {}
    try:
        with open(LOCK, "w") as lockf:
            bl.log(f"waiting for {LOCK} (no QEMU test may run meanwhile)")
            fcntl.flock(lockf, fcntl.LOCK_EX)
            for spec in args.guests.split(","):
                workload, mib = spec.rsplit("-", 1)
                bl.log(f"capturing {spec}")
                meta["captures"][spec] = take_captures(args, work, guest, workload, int(mib),
                                                       args.settle, args.gap)
        for spec, cap in meta["captures"].items():
            results[spec] = measure(args, work, cap)
    finally:
        if not args.keep:
            for spec in meta["captures"]:
                bl.rmtree(work / spec)
    md = table(meta, results)
    jp, mp = bl.write_results("memory", {"meta": meta, "results": results}, md)
    print(md)
    bl.log(f"raw results: {jp}\ntable: {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
