#!/usr/bin/env python3
"""Whole-VM capture with memory (`vmkeep backup vm --memory`) against stop-and-save (issue 7).

For each RAM size (default 256 MiB, 1 GiB, 4 GiB) one test guest (tests/guest/build.sh, QEMU 10,
TCG) boots with vmkeep.workload=memfill: it fills --fill-frac of its RAM with /dev/urandom data
(distinct non-zero pages in a tmpfs), then keeps rewriting those pages (a dd loop that reports
its own write rate, "MW n cs KiB", about every 100 ms on the serial console). Then, on that one
guest:
  idle      the guest's write rate for --idle-window s with nothing else running on it;
  busy      --captures x `vmkeep backup vm --memory --json` into one encrypted repository while
            the guest writes: pause_ms (median), wall time, stored bytes of the first and the
            second capture (stats and the repository's growth), vmkeep's peak RSS, the guest's
            write rate during each capture, the memory stream's size and rate;
  idle      a second idle window;
  quiet     the writes paused (a line "off" on the guest's second serial port), two captures
            into a fresh repository: what the second stores when the guest does little;
  save      --saves x stop-and-save as `virsh save` does it: QMP stop, migrate to file:PATH,
            wait for completion, cont (pause from QEMU's STOP/RESUME event timestamps);
  disk      `vmkeep backup image` of the saved state file (a raw image of the stream's size and
            content) into a fresh repository: the disk pipeline's MB/s, measured in the same run
            (and, if built, examples/stream_ingest --mode memory / --mode disk on that file);
  recover   the guest is shut down, then `vmkeep recover LAST --target DIR --accel tcg --json`:
            seconds from its start to the first new line on the recovered VM's serial console.
A second QMP monitor on the guest (vmkeep owns the first) records QEMU's events (STOP, RESUME,
MIGRATION with QEMU's timestamps) and query-migrate after each capture.

Usage: python3 bench/memory_capture.py [--sizes 256,1024,4096] [--captures 5] [--saves 3]
Needs: cargo build --release -p vmkeep; qemu-system-x86_64 (10.x); GNU time.
Writes bench/out/memory_capture-<timestamp>.json (raw) and .md (the tables printed on stdout).
Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from memfill_guest import (UNLIMITED, Bandwidth, Guest, SerialTail, anon_huge_kib,  # noqa: E402
                           cont_when_finalized, write_rate)

# Shared with the QEMU tests (crates/vmkeep-testkit/src/vm.rs qemu_lock): one TCG guest at a time.
LOCK = "/tmp/vmkeep-qemu-tests.lock"
DEFAULT_INGEST = str(bl.REPO_ROOT / "target" / "release" / "examples" / "stream_ingest")
ENV = {"VMKEEP_PASSWORD": bl.PASSWORD}
MB = bl.MB


# ---------------------------------------------------------------- measurements

def init_repo(args, repo: Path):
    r = bl.run_timed([args.vmkeep, "--repo", str(repo), "init", "--encrypt", "--json"], env=ENV)
    if r["rc"] != 0:
        raise RuntimeError(f"vmkeep init: {r['stderr'][-500:]}")


def repo_bytes(repo: Path) -> int:
    return bl.tree_usage(repo)["file_bytes"]


def capture(args, g: Guest, repo: Path, name: str, bandwidth: int | None = None) -> dict:
    """One `vmkeep backup vm --memory` with QEMU's view of it (events, query-migrate).
    bandwidth: QEMU's max-bandwidth set by the harness for this capture (None: as it is)."""
    before = repo_bytes(repo)
    ev0 = len(g.qmp.events)
    rec = {"loadavg_before": bl.loadavg(), "anon_huge_kib": anon_huge_kib(g.proc.pid),
           "max_bandwidth": bandwidth}
    os.sync()
    with Bandwidth(g.qmp, bandwidth):
        t0 = time.time()
        res = bl.run_timed([args.vmkeep, "--repo", str(repo), "backup", "vm", "--memory", "--qmp",
                            str(g.qmp_path), "--vm", name, "--json"], env=ENV,
                           label="backup vm --memory")
        t1 = time.time()
    rec.update({k: res[k] for k in ("rc", "seconds", "cpu_s", "maxrss_kib")})
    rec["t0"], rec["t1"] = t0, t1
    if res["rc"] != 0:
        raise RuntimeError(f"vmkeep backup vm --memory failed: {res['stderr'][-800:]}")
    doc = bl.parse_json_stdout(res) or {}
    rec["id"] = doc.get("id")
    rec["pause_ms"] = doc.get("pause_ms")
    rec["stats"] = doc.get("stats")
    rec["repo_growth"] = repo_bytes(repo) - before
    time.sleep(0.05)  # the last events are on their way
    evs = [e for e in g.qmp.events[ev0:]]
    rec["events"] = [{"event": e["event"], "qemu_t": e["qemu_t"], "data": e.get("data")} for e in evs]
    stops = [e["qemu_t"] for e in evs if e["event"] == "STOP"]
    resumes = [e["qemu_t"] for e in evs if e["event"] == "RESUME"]
    mig = {}
    for e in evs:
        if e["event"] == "MIGRATION":
            mig.setdefault(e["data"]["status"], e["qemu_t"])
    rec["qemu_pause_ms"] = (resumes[0] - stops[0]) * 1000 if stops and resumes else None
    rec["stop_count"] = len(stops)
    rec["migration"] = mig
    # Where the pause goes: vmkeep's steps before `migrate` (disk cut), QEMU's migration setup
    # (setup -> active), then device state, write-protection and vmkeep's wait until `cont`.
    if stops and resumes and "setup" in mig and "active" in mig:
        rec["pause_parts_ms"] = {"stop_to_migrate": (mig["setup"] - stops[0]) * 1000,
                                 "qemu_setup": (mig["active"] - mig["setup"]) * 1000,
                                 "active_to_resume": (resumes[0] - mig["active"]) * 1000}
    info = g.qmp.execute("query-migrate")
    rec["query_migrate"] = info
    ram = info.get("ram", {})
    rec["stream_bytes"] = ram.get("transferred")
    rec["touched_bytes"] = ram.get("normal", 0) * ram.get("page-size", 4096)
    if "setup" in mig and "completed" in mig:
        rec["memory_s"] = mig["completed"] - mig["setup"]
        win = (mig["setup"], mig["completed"])
    else:  # QEMU's own figure
        rec["memory_s"] = info.get("total-time", 0) / 1000 or None
        win = (t0, t1)
    if rec["stream_bytes"] and rec["memory_s"]:
        rec["memory_mbps"] = rec["stream_bytes"] / MB / rec["memory_s"]
    # The guest's rate: while its memory was write-protected, and over the whole command.
    time.sleep(0.3)  # let the line that covers the end arrive
    lines = g.serial.snapshot()
    rec["rate_memory_phase"] = write_rate(lines, win[0], win[1] + 0.15)
    rec["rate_command"] = write_rate(lines, t0, t1 + 0.15)
    return rec


def idle_window(g: Guest, seconds: float) -> dict:
    a = time.time()
    time.sleep(seconds)
    b = time.time()
    time.sleep(0.3)
    return {"seconds": b - a, **write_rate(g.serial.snapshot(), a, b)}


def stop_and_save(g: Guest, path: Path, bandwidth: int | None = UNLIMITED) -> dict:
    """As `virsh save`: stop, migrate to a file (max-bandwidth unlimited, as libvirt sets it
    for a file; None: QEMU's setting as it is), wait for completion, cont."""
    q = g.qmp
    q.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "background-snapshot", "state": False},
        {"capability": "events", "state": True}]})
    path.unlink(missing_ok=True)
    ev0 = len(q.events)
    la = bl.loadavg()
    os.sync()
    with Bandwidth(q, bandwidth):
        t0 = time.perf_counter()
        q.execute("stop")
        q.execute("migrate", {"uri": f"file:{path}"})
        done = q.wait_event(lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in
                            ("completed", "failed", "cancelled"), ev0, 1800)
        cont_when_finalized(q)
        total = time.perf_counter() - t0
    if done["data"]["status"] != "completed":
        raise RuntimeError(f"stop-and-save: migration {done['data']['status']}")
    resume = q.wait_event(lambda e: e["event"] == "RESUME", ev0, 10)
    stop = next(e for e in q.events[ev0:] if e["event"] == "STOP")
    info = q.execute("query-migrate")
    return {"loadavg_before": la, "max_bandwidth": bandwidth or info.get("max-bandwidth"),
            "pause_ms": (resume["qemu_t"] - stop["qemu_t"]) * 1000,
            "total_s": total, "file_bytes": path.stat().st_size,
            "migration_total_ms": info.get("total-time"), "query_migrate": info}


def disk_pipeline(args, state: Path, d: Path) -> dict:
    """`vmkeep backup image` of the saved state file as a raw image into a fresh repository."""
    repo = d / "repo-disk"
    bl.rmtree(repo)
    init_repo(args, repo)
    time.sleep(1.5)  # settled (see bench/README.md: racy-clean ctime)
    os.sync()
    la = bl.loadavg()
    res = bl.run_timed([args.vmkeep, "--repo", str(repo), "backup", "image", "--vm", "state",
                        "--disk", f"state={state}", "--json"], env=ENV, label="backup image")
    if res["rc"] != 0:
        raise RuntimeError(f"vmkeep backup image: {res['stderr'][-800:]}")
    doc = bl.parse_json_stdout(res) or {}
    st = doc.get("stats") or {}
    out = {"loadavg_before": la, "seconds": res["seconds"], "cpu_s": res["cpu_s"],
           "maxrss_kib": res["maxrss_kib"], "stats": st, "bytes": state.stat().st_size}
    if st.get("seconds"):
        out["mbps"] = st["read_bytes"] / MB / st["seconds"]
    out["wall_mbps"] = out["bytes"] / MB / res["seconds"]
    bl.rmtree(repo)
    return out


def ingest_pair(args, state: Path, d: Path) -> dict | None:
    """examples/stream_ingest on the saved state: the memory pipeline and the disk pipeline on
    the same bytes, no QEMU involved."""
    if not (args.ingest and os.access(args.ingest, os.X_OK)):
        return None
    out = {}
    for mode in ("memory", "disk"):
        repo = d / f"repo-ingest-{mode}"
        bl.rmtree(repo)
        os.sync()
        res = bl.run_timed([args.ingest, "--repo", str(repo), "--init", "--encrypt", "--mode", mode,
                            str(state)], label=f"stream_ingest {mode}")
        doc = bl.parse_json_stdout(res) if res["rc"] == 0 else None
        out[mode] = {"rc": res["rc"], "mbps": doc and doc.get("mbps"), "seconds": doc and doc.get("seconds"),
                     "cpu_s": res["cpu_s"], "bytes": doc and doc.get("bytes"),
                     "stderr": res["stderr"][-300:] if res["rc"] else None}
        bl.rmtree(repo)
    return out


def recover(args, repo: Path, snap: str, target: Path) -> dict:
    """`vmkeep recover` and the first line the recovered guest prints."""
    bl.rmtree(target)
    tail = SerialTail(target / "serial.log")
    os.sync()
    la = bl.loadavg()
    t0 = time.time()
    res = bl.run_timed([args.vmkeep, "--repo", str(repo), "recover", snap, "--target", str(target),
                        "--accel", "tcg", "--json"], env={**ENV, "VMKEEP_LOG": "info"},
                       label="recover")
    t1 = time.time()
    out = {"loadavg_before": la, "rc": res["rc"], "seconds": res["seconds"],
           "maxrss_kib": res["maxrss_kib"]}
    doc = bl.parse_json_stdout(res) or {}
    pid = doc.get("pid")
    try:
        if res["rc"] != 0:
            raise RuntimeError(f"vmkeep recover: {res['stderr'][-800:]}")
        out["log"] = [ln for ln in res["stderr"].splitlines() if " INFO " in ln][-6:]
        m = re.search(r"state loaded.*?bytes=(\d+).*?seconds=([0-9.]+)", res["stderr"])
        if m:
            out["state_bytes"] = int(m.group(1))
            out["state_load_s"] = float(m.group(2))
        m = re.search(r"^(\S+)\s+INFO QEMU started", res["stderr"], re.M)
        if m:  # RFC 3339 UTC timestamp of the log line
            when = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
            out["qemu_started_s"] = when - t0
        deadline = time.monotonic() + 120
        while not tail.snapshot():
            if time.monotonic() > deadline:
                raise RuntimeError("the recovered VM printed nothing within 120 s")
            time.sleep(0.005)
        first_t, first = tail.snapshot()[0]
        out["first_line_s"] = first_t - t0
        out["after_vmkeep_s"] = first_t - t1
        out["first_line"] = first
        time.sleep(1)
        text = [ln for _, ln in tail.snapshot()]
        out["resumed"] = doc.get("resumed")
        out["booted_again"] = any("VMKEEP READY" in ln for ln in text)
        out["lines_1s"] = len(text)
    finally:
        if pid:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
            t = time.monotonic()
            while Path(f"/proc/{pid}").exists() and time.monotonic() - t < 10:
                time.sleep(0.05)
        tail.close()
    return out


# ---------------------------------------------------------------- one size

def one_size(args, guest_dir: Path, mib: int) -> dict:
    d = Path(args.work) / "memcap" / str(mib)
    bl.rmtree(d)
    d.mkdir(parents=True)
    step = args.step
    fill = max(step, int(mib * args.fill_frac) // step * step)
    rec = {"ram_mib": mib, "fill_mib": fill, "ok": True, "errors": [], "loadavg_before": bl.loadavg(),
           "captures": [], "quiet": [], "saves": [], "unlimited": None}
    g = None
    try:
        bl.log(f"{mib} MiB: booting, filling {fill} MiB")
        t0 = time.monotonic()
        g = Guest(d, guest_dir, mib, fill, step)
        g.serial.wait_for("VMKEEP READY", 180, g.alive)
        rec["boot_s"] = time.monotonic() - t0
        _, done = g.serial.wait_for("MEMFILL DONE", 1800, g.alive)
        rec["fill_line"] = done
        rec["fill_s"] = time.monotonic() - t0 - rec["boot_s"]
        time.sleep(2)
        rec["idle_before"] = idle_window(g, args.idle_window)
        # Captures 1 and 2 share a repository (what the second stores); every later one goes
        # into a fresh repository, the previous one removed: the writing guest changes most of
        # its filled RAM between captures, and 5 full copies of a 4 GiB guest would not fit.
        busy = d / "repo-busy-1"
        init_repo(args, busy)
        for i in range(args.captures):
            if i >= 2:
                bl.rmtree(busy)
                busy = d / f"repo-busy-{i + 1}"
                init_repo(args, busy)
            bl.log(f"{mib} MiB: capture {i + 1}/{args.captures} (guest writing)")
            rec["captures"].append(capture(args, g, busy, f"memcap{mib}"))
            c = rec["captures"][-1]
            bl.log(f"  pause {c['pause_ms']} ms, {c['seconds']:.1f} s, stored {bl.fmt_bytes(c['stats'].get('stored_bytes'))}")
            time.sleep(1)
        if args.unlimited_capture:
            bl.log(f"{mib} MiB: one more capture with QEMU's max-bandwidth raised by the harness")
            free = d / "repo-unlimited"
            init_repo(args, free)
            rec["unlimited"] = capture(args, g, free, f"unlimited{mib}", bandwidth=UNLIMITED)
            bl.rmtree(free)
            time.sleep(1)
        rec["idle_after"] = idle_window(g, args.idle_window)
        bl.log(f"{mib} MiB: guest writes paused; two captures into a fresh repository")
        g.writes(False)
        time.sleep(1)
        quiet = d / "repo-quiet"
        init_repo(args, quiet)
        for i in range(2):
            rec["quiet"].append(capture(args, g, quiet, f"quiet{mib}"))
            time.sleep(1)
        bl.rmtree(quiet)
        g.writes(True)
        time.sleep(1)
        state = d / "state.bin"
        for i in range(args.saves):
            bl.log(f"{mib} MiB: stop-and-save {i + 1}/{args.saves}")
            rec["saves"].append(stop_and_save(g, state))
            time.sleep(1)
        if args.default_bandwidth_save:
            bl.log(f"{mib} MiB: stop-and-save at QEMU's default max-bandwidth")
            rec["save_default"] = stop_and_save(g, d / "state-default.bin", bandwidth=None)
            (d / "state-default.bin").unlink(missing_ok=True)
            time.sleep(1)
        bl.log(f"{mib} MiB: disk pipeline on the saved state ({bl.fmt_bytes(state.stat().st_size)})")
        rec["disk"] = disk_pipeline(args, state, d)
        rec["ingest"] = ingest_pair(args, state, d)
        state.unlink(missing_ok=True)
        g.kill()
        g = None
        bl.log(f"{mib} MiB: recover")
        rec["recover"] = recover(args, busy, rec["captures"][-1]["id"], d / "recovered")
    except Exception as e:
        rec["ok"] = False
        rec["errors"].append(str(e))
        bl.log(f"FAIL {mib} MiB: {e}")
    finally:
        if g:
            g.kill()
        rec["serial_tail"] = (d / "serial.log").read_text(errors="replace")[-1500:] \
            if (d / "serial.log").exists() else ""
        if not args.keep:
            bl.rmtree(d)
    rec["derived"] = derive(rec)
    return rec


def derive(rec: dict) -> dict:
    caps = [c for c in rec["captures"] if c.get("rc") == 0]
    med = bl.median
    out = {"ram_mib": rec["ram_mib"]}
    pauses = [c["pause_ms"] for c in caps if c.get("pause_ms") is not None]
    out["pause_ms"] = med(pauses)
    out["pause_min"] = min(pauses) if pauses else None
    out["pause_max"] = max(pauses) if pauses else None
    out["qemu_pause_ms"] = med([c.get("qemu_pause_ms") for c in caps])
    out["pause_first"] = caps[0].get("pause_ms") if caps else None
    out["pause_later"] = med([c.get("pause_ms") for c in caps[1:]])
    out["thp_first_kib"] = caps[0].get("anon_huge_kib") if caps else None
    out["thp_later_kib"] = med([c.get("anon_huge_kib") for c in caps[1:]])
    for part in ("stop_to_migrate", "qemu_setup", "active_to_resume"):
        out[f"part_{part}"] = med([(c.get("pause_parts_ms") or {}).get(part) for c in caps])
    un = rec.get("unlimited") or {}
    out["unlimited_mbps"] = un.get("memory_mbps")
    out["unlimited_pause_ms"] = un.get("pause_ms")
    out["unlimited_capture_s"] = un.get("seconds")
    out["unlimited_rate"] = (un.get("rate_memory_phase") or {}).get("mbps")
    quiet = [c.get("pause_ms") for c in rec.get("quiet", []) if c.get("rc") == 0]
    out["quiet_pause_ms"] = "/".join(str(p) for p in quiet) or None
    loads = [c.get("loadavg_before") for c in rec["captures"] + rec.get("quiet", [])
             + rec.get("saves", []) if c.get("loadavg_before") is not None]
    out["loadavg_min"] = min(loads) if loads else None
    out["loadavg_max"] = max(loads) if loads else None
    out["capture_s"] = med([c["seconds"] for c in caps])
    out["peak_rss_kib"] = max((c["maxrss_kib"] or 0 for c in caps), default=None)
    out["touched_bytes"] = caps[0].get("touched_bytes") if caps else None
    out["stream_bytes"] = med([c.get("stream_bytes") for c in caps])
    out["memory_mbps"] = med([c.get("memory_mbps") for c in caps])
    out["memory_s"] = med([c.get("memory_s") for c in caps])
    for tag, lst in (("busy", caps), ("quiet", rec.get("quiet", []))):
        for i in (0, 1):
            c = lst[i] if len(lst) > i else None
            out[f"{tag}{i + 1}_stored"] = c["stats"].get("stored_bytes") if c and c.get("stats") else None
            out[f"{tag}{i + 1}_growth"] = c.get("repo_growth") if c else None
    idle = [rec.get(k) for k in ("idle_before", "idle_after") if rec.get(k)]
    kib = sum(x["kib"] for x in idle)
    cs = sum(x["cs"] for x in idle)
    out["idle_mbps"] = (kib * 1024 / MB) / (cs / 100) if cs else None
    for key in ("rate_memory_phase", "rate_command"):
        k = sum(c[key]["kib"] for c in caps if c.get(key))
        s = sum(c[key]["cs"] for c in caps if c.get(key))
        out[key] = (k * 1024 / MB) / (s / 100) if s else None
    out["slowdown"] = out["rate_memory_phase"] / out["idle_mbps"] \
        if out["rate_memory_phase"] and out["idle_mbps"] else None
    saves = rec.get("saves", [])
    out["save_pause_ms"] = med([s["pause_ms"] for s in saves])
    out["save_total_s"] = med([s["total_s"] for s in saves])
    out["save_bytes"] = med([s["file_bytes"] for s in saves])
    out["save_default_pause_ms"] = (rec.get("save_default") or {}).get("pause_ms")
    out["pause_ratio"] = out["save_pause_ms"] / out["pause_ms"] \
        if out["save_pause_ms"] and out["pause_ms"] else None
    dk = rec.get("disk") or {}
    out["disk_mbps"] = dk.get("mbps")
    out["memory_vs_disk"] = out["memory_mbps"] / out["disk_mbps"] \
        if out["memory_mbps"] and out["disk_mbps"] else None
    # The first capture with the guest's writes paused: all its pages new to the repository, as
    # in the busy captures, but no TCG guest taking a core and no write-protect faults.
    q = rec.get("quiet", [])
    out["quiet_memory_mbps"] = q[0].get("memory_mbps") if q and q[0].get("rc") == 0 else None
    out["quiet_vs_disk"] = out["quiet_memory_mbps"] / out["disk_mbps"] \
        if out["quiet_memory_mbps"] and out["disk_mbps"] else None
    ing = rec.get("ingest") or {}
    im, idk = (ing.get("memory") or {}).get("mbps"), (ing.get("disk") or {}).get("mbps")
    out["ingest_memory_mbps"], out["ingest_disk_mbps"] = im, idk
    out["ingest_ratio"] = im / idk if im and idk else None
    for mode in ("memory", "disk"):  # MB per CPU second: the figure load disturbs least
        x = ing.get(mode) or {}
        out[f"ingest_{mode}_mb_per_cpu_s"] = x["bytes"] / MB / x["cpu_s"] \
            if x.get("bytes") and x.get("cpu_s") else None
    rv = rec.get("recover") or {}
    for k in ("first_line_s", "seconds", "state_load_s", "qemu_started_s", "first_line", "booted_again",
              "maxrss_kib"):
        out[f"recover_{k}"] = rv.get(k)
    return out


# ---------------------------------------------------------------- report

def f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def mib(kib):
    return "-" if kib is None else f"{kib / 1024:.0f} MiB"


def verdict(ok) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def check_targets(rows: list[dict]) -> list[dict]:
    t = []
    for r in rows:
        ratio = r.get("pause_ratio")
        t.append({"what": f"pause >= 20x shorter than stop-and-save at {r['ram_mib']} MiB",
                  "verdict": verdict(None if ratio is None else ratio >= 20),
                  "detail": f"{f(r.get('save_pause_ms'), '{:.0f}')} ms / {f(r.get('pause_ms'), '{:.0f}')} ms "
                            f"= {f(ratio, '{:.1f}')}x"})
    by = {r["ram_mib"]: r for r in rows}
    g = by.get(1024, {})
    p = g.get("pause_ms")
    t.append({"what": "pause under 25 ms at 1 GiB", "verdict": verdict(None if p is None else p < 25),
              "detail": f"median {f(p, '{:.0f}')} ms; first capture {f(g.get('pause_first'), '{:.0f}')} ms, "
                        f"later ones {f(g.get('pause_later'), '{:.0f}')} ms"})
    rs = g.get("recover_first_line_s")
    t.append({"what": "recover to running under 2 s at 1 GiB",
              "verdict": verdict(None if rs is None else rs < 2 and not g.get("recover_booted_again")),
              "detail": f"first new serial line after {f(rs)} s"})
    for r in rows:
        x = r.get("memory_vs_disk")
        t.append({"what": f"memory stream >= 80% of the disk pipeline's MB/s at {r['ram_mib']} MiB "
                          f"(in the capture vs `backup image`)",
                  "verdict": verdict(None if x is None else x >= 0.8),
                  "detail": f"{f(r.get('memory_mbps'), '{:.0f}')} / {f(r.get('disk_mbps'), '{:.0f}')} MB/s "
                            f"= {f(x, '{:.2f}')}x"})
    for r in rows:
        x = r.get("quiet_vs_disk")
        if x is not None:
            t.append({"what": f"(guest writes paused: first capture, every page new) memory stream "
                              f">= 80% of the disk pipeline's MB/s at {r['ram_mib']} MiB",
                      "verdict": verdict(x >= 0.8),
                      "detail": f"{f(r.get('quiet_memory_mbps'), '{:.0f}')} / "
                                f"{f(r.get('disk_mbps'), '{:.0f}')} MB/s = {x:.2f}x"})
    for r in rows:
        x = r.get("ingest_ratio")
        if x is not None:
            t.append({"what": f"(pipeline only, stream_ingest on the saved state) memory >= 80% of disk "
                              f"at {r['ram_mib']} MiB",
                      "verdict": verdict(x >= 0.8),
                      "detail": f"{f(r.get('ingest_memory_mbps'), '{:.0f}')} / "
                                f"{f(r.get('ingest_disk_mbps'), '{:.0f}')} MB/s = {x:.2f}x"})
    return t


def markdown(meta: dict, runs: list[dict], targets: list[dict], failures: list[str]) -> str:
    rows = [r["derived"] for r in runs]
    h = meta["host"]
    a = meta["args"]
    L = [f"## vmkeep memory capture benchmark, {meta['started']}", ""]
    loads = ", ".join(f"{r['ram_mib']} MiB {f(r.get('loadavg_min'), '{:.1f}')}-{f(r.get('loadavg_max'), '{:.1f}')}"
                      for r in rows)
    L.append(f"Host: {h['nproc']} cores, {h['mem_bytes'] / bl.GiB:.0f} GiB RAM, load average (1 min) before "
             f"each capture or save, min-max per size: {loads}. Guest: the test guest, QEMU TCG, memfill "
             f"workload (fills {a['fill_frac']:.0%} of RAM with random pages, then rewrites them in "
             f"{a['step']} MiB steps). {a['captures']} captures per size (medians), {a['saves']} "
             f"stop-and-saves. Encrypted repositories.")
    L.append("Versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items() if v))
    L.append("")
    if failures:
        L += ["**FAILURES:**"] + [f"- **FAIL** {x}" for x in failures] + [""]
    L.append("| RAM | touched | pause_ms median (min-max) | capture s | memory stream | "
             "stored 1st / 2nd (writing) | repo growth 1st / 2nd | stored 1st / 2nd (writes paused) | "
             "pause_ms (writes paused) | peak RSS |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        L.append(f"| {r['ram_mib']} MiB | {bl.fmt_bytes(r.get('touched_bytes'))} | "
                 f"{f(r.get('pause_ms'), '{:.0f}')} ({f(r.get('pause_min'), '{:.0f}')}-{f(r.get('pause_max'), '{:.0f}')}) | "
                 f"{f(r.get('capture_s'))} | "
                 f"{bl.fmt_bytes(r.get('stream_bytes'))} in {f(r.get('memory_s'))} s | "
                 f"{bl.fmt_bytes(r.get('busy1_stored'))} / {bl.fmt_bytes(r.get('busy2_stored'))} | "
                 f"{bl.fmt_bytes(r.get('busy1_growth'))} / {bl.fmt_bytes(r.get('busy2_growth'))} | "
                 f"{bl.fmt_bytes(r.get('quiet1_stored'))} / {bl.fmt_bytes(r.get('quiet2_stored'))} | "
                 f"{r.get('quiet_pause_ms') or '-'} | {mib(r.get('peak_rss_kib'))} |")
    L.append("")
    L.append("How the pause scales with RAM. vmkeep: stop, disk cut, `migrate` (background snapshot), "
             "QEMU's setup, device state and write-protection of the RAM, vmkeep's wait until RAM "
             "iteration has begun, cont; the parts are medians of the QEMU event spans. Stop-and-save: "
             "the whole state written while stopped.")
    L.append("")
    L.append("| RAM | 1st capture pause ms (huge pages) | later captures ms (huge pages) | STOP->migrate | "
             "QEMU setup | active->RESUME | median ms per GiB | stop-and-save pause ms | ms per GiB | "
             "stop-and-save / vmkeep | save total s | state file | stop-and-save at QEMU's default "
             "max-bandwidth, pause ms |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gib = r["ram_mib"] / 1024
        L.append(f"| {r['ram_mib']} MiB | {f(r.get('pause_first'), '{:.0f}')} ({mib(r.get('thp_first_kib'))}) | "
                 f"{f(r.get('pause_later'), '{:.0f}')} ({mib(r.get('thp_later_kib'))}) | "
                 f"{f(r.get('part_stop_to_migrate'), '{:.1f}')} | {f(r.get('part_qemu_setup'), '{:.1f}')} | "
                 f"{f(r.get('part_active_to_resume'), '{:.1f}')} | "
                 f"{f(r['pause_ms'] / gib if r.get('pause_ms') is not None else None, '{:.1f}')} | "
                 f"{f(r.get('save_pause_ms'), '{:.0f}')} | "
                 f"{f(r['save_pause_ms'] / gib if r.get('save_pause_ms') is not None else None, '{:.0f}')} | "
                 f"{f(r.get('pause_ratio'), '{:.0f}x')} | {f(r.get('save_total_s'))} | "
                 f"{bl.fmt_bytes(r.get('save_bytes'))} | {f(r.get('save_default_pause_ms'), '{:.0f}')} |")
    L.append("")
    L.append("Guest's own memory-write rate (MW lines: KiB / guest centiseconds):")
    L.append("")
    L.append("| RAM | idle MB/s | during the memory stream MB/s | during the whole command MB/s | "
             "slowdown (stream / idle) | during the stream, max-bandwidth raised |")
    L.append("|---|---|---|---|---|---|")
    for r in rows:
        L.append(f"| {r['ram_mib']} MiB | {f(r.get('idle_mbps'), '{:.1f}')} | {f(r.get('rate_memory_phase'), '{:.1f}')} | "
                 f"{f(r.get('rate_command'), '{:.1f}')} | {f(r.get('slowdown'), '{:.2f}x')} | "
                 f"{f(r.get('unlimited_rate'), '{:.1f}')} |")
    L.append("")
    L.append("Memory stream vs disk pipeline:")
    L.append("")
    L.append("| RAM | memory stream in the capture MB/s | `backup image` of the saved state MB/s | memory / disk | "
             "capture with max-bandwidth raised: stream MB/s, pause ms, capture s | "
             "stream_ingest memory / disk MB/s | stream_ingest MB per CPU s memory / disk |")
    L.append("|---|---|---|---|---|---|---|")
    for r in rows:
        ing = (f"{f(r.get('ingest_memory_mbps'), '{:.0f}')} / {f(r.get('ingest_disk_mbps'), '{:.0f}')} "
               f"({f(r.get('ingest_ratio'), '{:.2f}x')})") if r.get("ingest_ratio") else "-"
        cpu = (f"{f(r.get('ingest_memory_mb_per_cpu_s'), '{:.0f}')} / "
               f"{f(r.get('ingest_disk_mb_per_cpu_s'), '{:.0f}')}") if r.get("ingest_ratio") else "-"
        L.append(f"| {r['ram_mib']} MiB | {f(r.get('memory_mbps'), '{:.0f}')} | {f(r.get('disk_mbps'), '{:.0f}')} | "
                 f"{f(r.get('memory_vs_disk'), '{:.2f}x')} | {f(r.get('unlimited_mbps'), '{:.0f}')}, "
                 f"{f(r.get('unlimited_pause_ms'), '{:.0f}')}, {f(r.get('unlimited_capture_s'))} | {ing} | {cpu} |")
    L.append("")
    L.append("Recovery (`vmkeep recover` of the last capture taken while the guest wrote):")
    L.append("")
    L.append("| RAM | first new serial line s | recover command s | QEMU started at s | state load s | first line |")
    L.append("|---|---|---|---|---|---|")
    for r in rows:
        first = r.get("recover_first_line")
        L.append(f"| {r['ram_mib']} MiB | {f(r.get('recover_first_line_s'))} | {f(r.get('recover_seconds'))} | "
                 f"{f(r.get('recover_qemu_started_s'))} | {f(r.get('recover_state_load_s'))} | "
                 f"`{first if first is not None else '-'}`{' (BOOTED AGAIN)' if r.get('recover_booted_again') else ''} |")
    L.append("")
    L.append("Targets:")
    L += [f"- {t['verdict']}: {t['what']} ({t['detail']})" for t in targets]
    L.append("")
    L.append("Columns (MB = 10^6 bytes): touched = non-zero pages QEMU sent in the first capture (ram.normal x "
             "page size). pause_ms = vmkeep's reported pause (QEMU STOP to RESUME events, ms). huge pages = "
             "QEMU's AnonHugePages before the capture (background snapshot splits them). capture s = wall "
             "time of `backup vm --memory` (repository open and key derivation included). memory stream = "
             "QEMU's ram.transferred and the MIGRATION setup->completed span; its MB/s is the first over the "
             "second. stored = stats.stored_bytes; repo growth = growth of the repository's file bytes. "
             "stop-and-save = QMP stop, migrate to file: with max-bandwidth unlimited (as libvirt), "
             "completion, cont (page cache, no fsync). `backup image` MB/s = stats.read_bytes / stats.seconds "
             "(session time, key derivation excluded). recover = from the start of `vmkeep recover` to the "
             "first complete line in the recovered VM's serial log (polled every 5 ms). See bench/README.md.")
    return "\n".join(L) + "\n"


def finish(meta, runs):
    targets = check_targets([r["derived"] for r in runs])
    failures = [f"{r['ram_mib']} MiB: {'; '.join(r['errors'])}" for r in runs if not r["ok"]]
    for r in runs:
        d = r["derived"]
        if d.get("touched_bytes") is not None and d["touched_bytes"] < r["ram_mib"] * bl.MiB / 2:
            failures.append(f"{r['ram_mib']} MiB: the guest touched only {bl.fmt_bytes(d['touched_bytes'])} "
                            f"(less than half its RAM)")
        if d.get("recover_booted_again"):
            failures.append(f"{r['ram_mib']} MiB: the recovered VM booted again instead of resuming")
        for c in r["captures"] + r["quiet"]:
            if c.get("stop_count", 1) > 1:
                failures.append(f"{r['ram_mib']} MiB: a capture saw {c['stop_count']} STOP events")
    return targets, failures, markdown(meta, runs, targets, failures)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024,4096", help="guest RAM sizes in MiB (default %(default)s)")
    ap.add_argument("--captures", type=int, default=5, help="captures per size while the guest writes (default 5)")
    ap.add_argument("--saves", type=int, default=3,
                    help="stop-and-saves per size, max-bandwidth unlimited as libvirt sets it (default 3)")
    ap.add_argument("--fill-frac", type=float, default=0.55, help="part of RAM the guest fills (default 0.55)")
    ap.add_argument("--step", type=int, default=4, help="MiB per guest write (default 4)")
    ap.add_argument("--unlimited-capture", action=argparse.BooleanOptionalAction, default=True,
                    help="one more capture per size with QEMU's max-bandwidth raised (default on)")
    ap.add_argument("--default-bandwidth-save", action=argparse.BooleanOptionalAction, default=True,
                    help="one more stop-and-save per size at QEMU's default max-bandwidth (default on)")
    ap.add_argument("--idle-window", type=float, default=5, help="seconds per idle rate window (default 5)")
    ap.add_argument("--work", default=bl.DEFAULT_WORK, help="work dir (default %(default)s); uses WORK/memcap/")
    ap.add_argument("--vmkeep", default=bl.DEFAULT_VMKEEP, help="vmkeep binary (default %(default)s)")
    ap.add_argument("--ingest", default=DEFAULT_INGEST,
                    help="examples/stream_ingest binary, skipped when absent (default %(default)s)")
    ap.add_argument("--min-free-gib", type=float, default=12, help="free space required in --work (default 12)")
    ap.add_argument("--keep", action="store_true", help="keep WORK/memcap/ afterwards")
    ap.add_argument("--report", metavar="JSON", help="only print the tables again from a raw results file")
    args = ap.parse_args(argv)
    if args.report:
        d = json.loads(Path(args.report).read_text())
        for r in d["runs"]:
            r["derived"] = derive(r)
        _, failures, md = finish(d, d["runs"])
        print(md)
        return 1 if failures else 0
    if args.captures < 2:
        bl.die("--captures must be at least 2 (the second capture's stored bytes are reported)")
    problems = [] if bl.shutil.which("qemu-system-x86_64") else ["qemu-system-x86_64 not found"]
    if p := bl.gnu_time_problem():
        problems.append(p)
    if not (os.path.isfile(args.vmkeep) and os.access(args.vmkeep, os.X_OK)):
        problems.append(f"vmkeep binary not found at {args.vmkeep}: cargo build --release -p vmkeep")
    if problems:
        bl.die("; ".join(problems))
    sizes = [int(s) for s in args.sizes.split(",") if s]
    bl.check_free_space(args.work, args.min_free_gib)
    g = bl.run_quiet(["bash", str(bl.REPO_ROOT / "tests" / "guest" / "build.sh")])
    guest = Path(g.stdout.strip().splitlines()[-1])

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the finally blocks stop QEMU
    lockf = open(LOCK, "w")
    try:
        fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        bl.log(f"waiting for {LOCK} (a QEMU test is running)")
        fcntl.flock(lockf, fcntl.LOCK_EX)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "args": vars(args), "host": bl.host_info(),
            "guest": str(guest),
            "versions": {"vmkeep": bl.tool_version([args.vmkeep, "--version"]),
                         "qemu": bl.tool_version(["qemu-system-x86_64", "--version"])}}
    runs = []
    try:
        for mib_ in sizes:
            runs.append(one_size(args, guest, mib_))
    finally:
        lockf.close()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    targets, failures, md = finish(meta, runs)
    jp, mp = bl.write_results("memory_capture", {**meta, "runs": runs, "targets": targets,
                                                 "failures": failures}, md)
    print(md)
    bl.log(f"raw results: {jp}\ntable: {mp}")
    if failures:
        print("\n".join(f"FAIL: {x}" for x in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
