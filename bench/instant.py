#!/usr/bin/env python3
"""Instant recovery benchmark: `vmkeep recover --instant` against `vmkeep recover` (full restore,
then start), on a running QEMU guest's 4 GiB raw disk holding ~1.5 GiB of real data (prepared
as bench/live.py does).

Once: boot the cached test guest (tests/guest/build.sh) with vmkeep.workload=seqwrite (a 4 KiB
write + fsync, then a `C i` line on the serial console, forever), and take two restore points
of the running VM: `backup vm` (disks only: recovered with --cold, the guest boots) and
`backup vm --memory` (RAM and device state too: the guest resumes). The VM is then killed.
Per repetition and per restore point (with memory, without):
  (1) `recover --instant --json`: seconds from the command to its start line, to the
      recovered guest's first serial line, and to the final line (background copy complete);
      the guest's counter lines during the copy;
  (2) `recover --json` (disks restored to qcow2 first, then QEMU started): seconds to its
      exit and to the guest's first serial line;
  (2b) `recover --instant` again with the guest paused (QMP `stop`) as soon as the start line
      comes: the background copy alone, without the guest competing for the 2 cores;
  (3) `restore --format qcow2` of the same point: the plain restore time, to compare (1)'s
      copy with.
Then once per repetition, on the point without memory:
  (4) the guest's own boot time: QEMU (started by the harness) booting the disk restored in (3),
      from the QEMU start to its first serial line;
  (5) read throughput of the restore point served from the repository (`vmkeep mount --socket`,
      NBD over a Unix socket; straight, and through a local qcow2 overlay backed by it as
      --instant builds it) against the restored local qcow2: `qemu-img bench`, sequential 1 MiB
      reads over the data-holding first --prefill-gib, queue depth 1 and 16 (the local file
      also with O_DIRECT). The test guest has no read workload, so this is measured on the host
      with QEMU's block layer, not inside the guest. And `qemu-img convert -O qcow2` of the
      served point into a local file: the copy without a guest or a block job.

Usage: python3 bench/instant.py [--reps 1] [--work DIR]
Writes bench/out/instant-<timestamp>.json (raw) and .md (the table printed on stdout).
Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
import live as blive  # noqa: E402  (make_disk, Vm, qmp, record, check)
from memfill_guest import SerialTail  # noqa: E402

VM = "instantbench"
LOCK = blive.LOCK  # shared with the QEMU tests: one TCG guest at a time
ENV = {"VMKEEP_PASSWORD": bl.PASSWORD, "VMKEEP_LOG": "info"}
CASES = ("memory", "cold")  # restore point with memory (resumes), without (boots: --cold)
DEPTHS = (1, 16)


def vk(args, repo: Path, *rest) -> list:
    return [args.vmkeep, "--repo", str(repo), *map(str, rest)]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, or a process that is gone, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_qemu(pid: int | None, qmp_sock: str | None):
    """Ends a QEMU that vmkeep started (not our child): QMP quit, then SIGKILL."""
    if not pid:
        return
    if qmp_sock and alive(pid):
        try:
            blive.qmp(Path(qmp_sock), "quit", timeout=5)
        except Exception:
            pass
        t = time.monotonic()
        while alive(pid) and time.monotonic() - t < 10:
            time.sleep(0.05)
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        t = time.monotonic()
        while alive(pid) and time.monotonic() - t < 10:
            time.sleep(0.05)


def first_line(tail: SerialTail, t0: float, timeout: float, pid: int | None, marker: str = "") -> dict:
    """Seconds from t0 (time.time()) to the first complete serial line starting with `marker`."""
    deadline = time.monotonic() + timeout
    while True:
        for t, ln in tail.snapshot():
            if ln.strip() and ln.startswith(marker):
                return {"s": t - t0, "line": ln}
        if pid and not alive(pid):
            raise RuntimeError(f"the recovered QEMU (pid {pid}) exited before printing {marker or 'a line'!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the recovered guest printed no {marker or 'line'!r} within {timeout:.0f} s")
        time.sleep(0.005)


def state_load(stderr: str) -> dict:
    """vmkeep's own "state loaded" log line (VMKEEP_LOG=info)."""
    m = re.search(r"state loaded.*?bytes=(\d+).*?seconds=([0-9.]+)", stderr)
    return {"state_bytes": int(m.group(1)), "state_load_s": float(m.group(2))} if m else {}


# ---------------------------------------------------------------- the restore points

def prepare(args, guest: Path, d: Path) -> dict:
    """The disk, the repository and both restore points of the running seqwrite guest."""
    img = d / "disk0.raw"
    repo = d / "repo"
    bl.log("making the 4 GiB disk image")
    out = {"disk": blive.make_disk(img, int(args.prefill_gib * bl.GiB), args.work), "repo": str(repo)}
    blive.check(bl.run_timed(vk(args, repo, "init", "--encrypt", "--json"), env=ENV), "vmkeep init")
    vm = None
    try:
        vm = blive.Vm(d, guest, img, "vmkeep.workload=seqwrite", "src")
        t0 = time.monotonic()
        vm.serial.wait_for("C 5", 300, vm.proc)
        out["source_boot_s"] = time.monotonic() - t0
        for case in ("cold", "memory"):
            bl.log(f"guest counting after {out['source_boot_s']:.1f} s; vmkeep backup vm"
                   + (" --memory" if case == "memory" else ""))
            cmd = vk(args, repo, "backup", "vm", "--qmp", vm.qmp, "--vm", VM, "--json")
            if case == "memory":
                cmd.insert(-1, "--memory")
            os.sync()
            res = bl.run_timed(cmd, env=ENV, label=f"vmkeep backup vm ({case})")
            os.sync()
            rec = blive.record(res, repo)
            blive.check(res, f"vmkeep backup vm ({case})")
            out[f"backup_{case}"] = rec
            out[f"snap_{case}"] = rec["json"]["id"]
        out["source_serial_tail"] = [ln for _, ln in vm.serial.snapshot()][-3:]
    finally:
        if vm:
            vm.kill()
    return out


# ---------------------------------------------------------------- the measurements

def instant(args, repo: Path, snap: str, target: Path, cold: bool, pause: bool = False) -> dict:
    """`recover --instant`: start line, first serial line, copy complete. `pause`: the guest is
    stopped (QMP `stop`) as soon as the start line comes, so the copy runs alone."""
    bl.rmtree(target)
    tail = SerialTail(target / "serial.log")
    cmd = vk(args, repo, "--json", "recover", snap, "--instant", "--accel", "tcg", "--target", target)
    if cold:
        cmd.append("--cold")
    out = {"cmd": cmd}
    pid = qmp_sock = None
    errf = open(target.parent / f"{target.name}.stderr", "w+b")
    tf = tempfile.NamedTemporaryFile(prefix="vmkeep-bench-time-")
    p = None
    try:
        os.sync()
        la = bl.loadavg()
        t0 = time.time()
        p = subprocess.Popen([bl.GNU_TIME, "-f", "%M", "-o", tf.name, "--", *map(str, cmd)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf,
                             env=bl.tool_env(ENV), start_new_session=True)
        line = p.stdout.readline()
        t_start = time.time()
        out["loadavg_before"] = la
        try:
            start = json.loads(line)
        except ValueError:
            p.wait()
            errf.seek(0)
            raise RuntimeError(f"no start line (exit {p.returncode}): {line!r} "
                               f"{errf.read().decode(errors='replace')[-800:]}")
        out["start"] = start
        out["start_line_s"] = t_start - t0
        pid, qmp_sock = start.get("pid"), start.get("qmp")
        if Path(start.get("serial", "")) != target / "serial.log":
            tail.close()
            tail = SerialTail(Path(start["serial"]))
        if pause:
            blive.qmp(Path(qmp_sock), "stop")
            out["paused_s"] = time.time() - t0
        else:
            fl = first_line(tail, t0, 300, pid, "")
            out["first_line_s"], out["first_line"] = fl["s"], fl["line"]
            if cold:
                r = first_line(tail, t0, 300, pid, "VMKEEP READY")
                out["ready_s"] = r["s"]
        rest = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        t_end = time.time()
        p.returncode = os.waitstatus_to_exitcode(status)
        out["rc"] = p.returncode
        out["cpu_s"] = ru.ru_utime + ru.ru_stime
        tf.seek(0)
        timed = tf.read().decode().split()
        out["maxrss_kib"] = int(timed[-1]) if timed and timed[-1].isdigit() else None
        errf.seek(0)
        err = errf.read().decode(errors="replace")
        out.update(state_load(err))
        if p.returncode != 0:
            out["stderr"] = err[-2000:]
            raise RuntimeError(f"recover --instant exited {p.returncode}: {err[-800:]}")
        lines = [ln for ln in rest.decode(errors="replace").splitlines() if ln.strip()]
        final = json.loads(lines[-1]) if lines else {}
        out["final"] = final
        out["copied_s"] = t_end - t0
        if not final.get("copied"):
            raise RuntimeError(f"recover --instant ended without copied=true: {lines}")
        snap_lines = tail.snapshot()
        out["counter_lines_during_copy"] = sum(1 for t, ln in snap_lines
                                               if t_start <= t <= t_end and ln.startswith("C "))
        out["lines_during_copy"] = sum(1 for t, _ in snap_lines if t_start <= t <= t_end)
        out["guest_alive_after"] = alive(pid)
        time.sleep(1)
        text = [ln for _, ln in tail.snapshot()]
        out["guest_failed_lines"] = [ln for ln in text if "failed" in ln][:5]
        out["booted"] = any("VMKEEP READY" in ln for ln in text)
        image = Path(start["target"]) / "vd0.qcow2"
        if image.exists():
            info = bl.run_quiet(["qemu-img", "info", "-U", "--output=json", str(image)], check=False)
            try:
                out["backing_after"] = json.loads(info.stdout).get("backing-filename")
            except ValueError:
                pass
        out["serial_tail"] = text[-3:]
    finally:
        kill_qemu(pid, qmp_sock)
        if p and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        tail.close()
        errf.close()
        tf.close()
    return out


def plain_recover(args, repo: Path, snap: str, target: Path, cold: bool) -> dict:
    """`recover` without --instant: restore to qcow2, start QEMU, one JSON object, exit."""
    bl.rmtree(target)
    tail = SerialTail(target / "serial.log")
    cmd = vk(args, repo, "--json", "recover", snap, "--accel", "tcg", "--target", target)
    if cold:
        cmd.append("--cold")
    pid = qmp_sock = None
    os.sync()
    out = {"loadavg_before": bl.loadavg()}
    try:
        t0 = time.time()
        res = bl.run_timed(cmd, env=ENV, label="vmkeep recover")
        out.update(blive.record(res, None))
        out["exit_s"] = res["seconds"]
        out.update(state_load(res["stderr"]))
        blive.check(res, "vmkeep recover")
        doc = out.get("json") or {}
        pid, qmp_sock = doc.get("pid"), doc.get("qmp")
        if doc.get("serial") and Path(doc["serial"]) != target / "serial.log":
            tail.close()
            tail = SerialTail(Path(doc["serial"]))
        fl = first_line(tail, t0, 300, pid, "")
        out["first_line_s"], out["first_line"] = fl["s"], fl["line"]
        if cold:
            out["ready_s"] = first_line(tail, t0, 300, pid, "VMKEEP READY")["s"]
        time.sleep(1)
        text = [ln for _, ln in tail.snapshot()]
        out["booted"] = any("VMKEEP READY" in ln for ln in text)
        out["serial_tail"] = text[-3:]
    finally:
        kill_qemu(pid, qmp_sock)
        tail.close()
    return out


def plain_restore(args, repo: Path, snap: str, target: Path) -> dict:
    bl.rmtree(target)
    os.sync()
    res = bl.run_timed(vk(args, repo, "--json", "restore", snap, "--target", target, "--format", "qcow2"),
                       env=ENV, label="vmkeep restore")
    os.sync()
    rec = blive.record(res, None)
    blive.check(res, "vmkeep restore --format qcow2")
    return rec


def boot_local(guest: Path, image: Path, d: Path) -> dict:
    """The guest's own boot time: QEMU booting the restored local qcow2, to its first line."""
    log = d / "serial-boot.log"
    log.unlink(missing_ok=True)
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none",
           "-no-reboot", "-serial", f"file:{log}",
           "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.gz"),
           "-append", "console=ttyS0 quiet panic=-1 vmkeep.workload=seqwrite",
           "-blockdev", f"driver=file,filename={image},node-name=f0",
           "-blockdev", "driver=qcow2,file=f0,node-name=disk0",
           "-device", "virtio-blk-pci,drive=disk0,id=vd0"]
    tail = SerialTail(log)
    t0 = time.time()
    q = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        fl = first_line(tail, t0, 300, q.pid, "")
        ready = first_line(tail, t0, 300, q.pid, "VMKEEP READY")
        return {"first_line_s": fl["s"], "first_line": fl["line"], "ready_s": ready["s"]}
    finally:
        try:
            os.killpg(q.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        q.wait()
        tail.close()


def qemu_bench(fmt: str, target: str, nbytes: int, depth: int, direct: bool = False) -> dict:
    """Sequential 1 MiB reads of the first `nbytes` with `qemu-img bench` (`direct`: O_DIRECT,
    past the page cache)."""
    count = max(1, nbytes // bl.MiB)
    res = bl.run_timed(["qemu-img", "bench", "-f", fmt, "-c", str(count), "-s", "1M", "-S", "1M",
                        "-d", str(depth), *(["-t", "none"] if direct else []), target],
                       label="qemu-img bench")
    m = re.search(r"Run completed in ([0-9.]+) seconds", res["stdout"])
    sec = float(m.group(1)) if m else None
    return {"rc": res["rc"], "bytes": count * bl.MiB, "seconds": sec, "wall_s": res["seconds"],
            "mbps": count * bl.MiB / sec / bl.MB if sec else None,
            "stderr": res["stderr"][-500:] if res["rc"] else None}


def throughput(args, repo: Path, snap: str, local: Path, d: Path) -> dict:
    """Reads of the served restore point (straight, and through a qcow2 overlay as --instant
    makes it) and of the restored local qcow2."""
    nbytes = int(args.prefill_gib * bl.GiB)
    out = {"bytes": nbytes}
    sock = d / "mount.sock"
    sock.unlink(missing_ok=True)
    errf = open(d / "mount.stderr", "w+b")
    m = subprocess.Popen(vk(args, repo, "--json", "mount", snap, "--socket", sock),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf,
                         env=bl.tool_env(ENV), start_new_session=True)
    try:
        line = m.stdout.readline()
        try:
            start = json.loads(line)
        except ValueError:
            m.wait()
            errf.seek(0)
            raise RuntimeError(f"vmkeep mount: no start line (exit {m.returncode}): "
                               f"{errf.read().decode(errors='replace')[-800:]}")
        uri = start["uri"]
        out["uri"] = uri
        overlay = d / "overlay.qcow2"
        overlay.unlink(missing_ok=True)
        bl.run_quiet(["qemu-img", "create", "-f", "qcow2", "-b", uri, "-F", "raw", str(overlay)])
        # Served first: the local qcow2 was just written, so it is in the page cache either way.
        for depth in DEPTHS:
            bl.log(f"throughput: served, queue depth {depth}")
            out[f"served_d{depth}"] = qemu_bench("raw", uri, nbytes, depth)
            bl.log(f"throughput: served through a qcow2 overlay, queue depth {depth}")
            out[f"overlay_d{depth}"] = qemu_bench("qcow2", str(overlay), nbytes, depth)
            bl.log(f"throughput: local qcow2, queue depth {depth}")
            out[f"local_d{depth}"] = qemu_bench("qcow2", str(local), nbytes, depth)
            bl.log(f"throughput: local qcow2 with O_DIRECT, queue depth {depth}")
            out[f"direct_d{depth}"] = qemu_bench("qcow2", str(local), nbytes, depth, direct=True)
        # The copy alone, no guest and no block job: the served point into a local qcow2.
        bl.log("throughput: qemu-img convert of the served point into a local qcow2")
        conv = d / "convert.qcow2"
        conv.unlink(missing_ok=True)
        os.sync()
        res = bl.run_timed(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(conv)],
                           label="qemu-img convert")
        os.sync()
        out["convert"] = {k: res.get(k) for k in ("rc", "seconds", "cpu_s")}
        if res["rc"]:
            out["convert"]["stderr"] = res["stderr"][-500:]
        conv.unlink(missing_ok=True)
    finally:
        if m.poll() is None:
            m.send_signal(signal.SIGINT)
            try:
                rest, _ = m.communicate(timeout=30)
                lines = [ln for ln in rest.decode(errors="replace").splitlines() if ln.strip()]
                try:
                    out["mount_stop"] = json.loads("\n".join(lines))
                except ValueError:
                    out["mount_stop_text"] = lines[-3:]
            except subprocess.TimeoutExpired:
                os.killpg(m.pid, signal.SIGKILL)
                m.wait()
        errf.close()
    return out


def one_rep(args, guest: Path, src: dict, rep: int) -> dict:
    d = Path(args.work) / "instant"
    repo = Path(src["repo"])
    rec = {"rep": rep, "ok": True, "errors": [], "loadavg_before": bl.loadavg()}
    # Alternate which goes first, so the page cache favours neither over the repetitions.
    for case in CASES:
        snap = src[f"snap_{case}"]
        cold = case == "cold"
        r = rec[case] = {}
        steps = [("instant", lambda: instant(args, repo, snap, d / f"t-{case}-instant", cold)),
                 ("recover", lambda: plain_recover(args, repo, snap, d / f"t-{case}-recover", cold))]
        if rep % 2:
            steps.reverse()
        steps.append(("paused", lambda: instant(args, repo, snap, d / f"t-{case}-paused", cold, pause=True)))
        steps.append(("restore", lambda: plain_restore(args, repo, snap, d / f"t-{case}-restore")))
        for name, fn in steps:
            bl.log(f"rep {rep + 1}: {case}: {name}")
            try:
                r[name] = fn()
            except Exception as e:
                rec["ok"] = False
                rec["errors"].append(f"{case} {name}: {e}")
                bl.log(f"FAIL rep {rep + 1} {case} {name}: {e}")
            for t in ("instant", "recover", "paused"):
                bl.rmtree(d / f"t-{case}-{t}")
    local = d / "t-cold-restore" / "vd0.qcow2"
    if local.exists():
        try:
            bl.log(f"rep {rep + 1}: read throughput")
            rec["throughput"] = throughput(args, repo, src["snap_cold"], local, d)
        except Exception as e:
            rec["ok"] = False
            rec["errors"].append(f"throughput: {e}")
            bl.log(f"FAIL rep {rep + 1} throughput: {e}")
        try:
            bl.log(f"rep {rep + 1}: the guest's own boot time (local restored qcow2)")
            rec["boot"] = boot_local(guest, local, d)
        except Exception as e:
            rec["ok"] = False
            rec["errors"].append(f"boot: {e}")
            bl.log(f"FAIL rep {rep + 1} boot: {e}")
    for case in CASES:
        bl.rmtree(d / f"t-{case}-restore")
    rec["derived"] = derive(rec)
    return rec


# ---------------------------------------------------------------- summary

def derive(rec: dict) -> dict:
    d = {}
    for case in CASES:
        r = rec.get(case, {})
        i, c, s = r.get("instant") or {}, r.get("recover") or {}, r.get("restore") or {}
        pz = r.get("paused") or {}
        d[f"{case}_paused_copied_s"] = pz.get("copied_s") if pz.get("rc") == 0 else None
        d[f"{case}_paused_copy_seconds"] = (pz.get("final") or {}).get("copy_seconds")
        d[f"{case}_paused_ratio"] = ratio(d[f"{case}_paused_copied_s"], s.get("seconds") if s.get("rc") == 0 else None)
        d[f"{case}_instant_start_s"] = i.get("start_line_s")
        d[f"{case}_instant_first_s"] = i.get("first_line_s")
        d[f"{case}_instant_ready_s"] = i.get("ready_s")
        d[f"{case}_instant_copied_s"] = i.get("copied_s") if i.get("rc") == 0 else None
        d[f"{case}_instant_copy_seconds"] = (i.get("final") or {}).get("copy_seconds")
        d[f"{case}_instant_bytes_fetched"] = (i.get("final") or {}).get("bytes_fetched")
        d[f"{case}_instant_counter_lines"] = i.get("counter_lines_during_copy")
        d[f"{case}_instant_cpu_s"] = i.get("cpu_s")
        d[f"{case}_instant_rss_kib"] = i.get("maxrss_kib")
        d[f"{case}_instant_state_load_s"] = i.get("state_load_s")
        d[f"{case}_recover_exit_s"] = c.get("exit_s") if c.get("rc") == 0 else None
        d[f"{case}_recover_first_s"] = c.get("first_line_s")
        d[f"{case}_recover_ready_s"] = c.get("ready_s")
        d[f"{case}_recover_state_load_s"] = c.get("state_load_s")
        d[f"{case}_restore_s"] = s.get("seconds") if s.get("rc") == 0 else None
        d[f"{case}_restore_rss_kib"] = s.get("maxrss_kib") if s.get("rc") == 0 else None
        d[f"{case}_copy_ratio"] = ratio(d[f"{case}_instant_copied_s"], d[f"{case}_restore_s"])
    b = rec.get("boot") or {}
    d["boot_first_s"] = b.get("first_line_s")
    d["boot_ready_s"] = b.get("ready_s")
    tp = rec.get("throughput") or {}
    for k, v in tp.items():
        if isinstance(v, dict) and "mbps" in v:
            d[f"tp_{k}_mbps"] = v["mbps"]
    cv = tp.get("convert") or {}
    d["convert_s"] = cv.get("seconds") if cv.get("rc") == 0 else None
    return d


def ratio(a, b):
    return None if a is None or not b else a / b


def fr(x):
    return "-" if x is None else f"{x:.2f}x"


def fmbps(x):
    return "-" if x is None else f"{x:,.0f}"


def check_targets(med) -> list[dict]:
    out = []

    def add(what, val, limit, detail):
        if val is None or limit is None:
            out.append({"what": what, "verdict": "n/a", "detail": "not measured"})
        else:
            out.append({"what": what, "verdict": "PASS" if val <= limit else "FAIL", "detail": detail,
                        "value": val, "limit": limit})

    v = med.get("memory_instant_first_s")
    add("with memory: first serial line of `recover --instant` within 3 s", v, 3.0, f"{bl.fmt_s(v)} s")
    v, b = med.get("cold_instant_first_s"), med.get("boot_first_s")
    add("without memory: first serial line of `recover --instant --cold` within the guest's own boot "
        "time + 2 s", v, None if b is None else b + 2,
        f"{bl.fmt_s(v)} s vs boot {bl.fmt_s(b)} s + 2")
    for case in CASES:
        r = med.get(f"{case}_copy_ratio")
        add(f"{case}: background copy complete within 1.3x of a plain `restore --format qcow2`", r, 1.3,
            f"{bl.fmt_s(med.get(f'{case}_instant_copied_s'))} s vs {bl.fmt_s(med.get(f'{case}_restore_s'))} s"
            f" = {fr(r)}")
    return out


def markdown(meta, med, targets, failures) -> str:
    L = [f"## vmkeep instant recovery benchmark, {meta['started']}", ""]
    h, dk = meta["host"], meta["source"]["disk"]
    L.append(f"Host: {h['nproc']} cores, {(h['mem_bytes'] or 0) / bl.GiB:.0f} GiB RAM. Guest: QEMU TCG, "
             f"256 MiB, virtio-blk on a 4 GiB raw image ({dk['prefill_bytes'] / bl.GiB:.2f} GiB of real "
             f"data from {dk['prefill_source'][0]}, rest sparse), seqwrite workload (`C i` lines). Restore "
             f"points of the running VM: `backup vm` (disks only, recovered with `--cold`: boots) and "
             f"`backup vm --memory` (resumes). Encrypted local repository. Medians of "
             f"{meta['args']['reps']} repetition(s); seconds from the command's start.")
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
    g = med.get
    L.append("| restore point | command | start line s | first serial line s | `VMKEEP READY` s | "
             "disks local s | copy / restore | fetched |")
    L.append("|---|---|---|---|---|---|---|---|")
    for case in CASES:
        lab = "with memory (resume)" if case == "memory" else "without memory (`--cold`, boots)"
        ready = lambda k: bl.fmt_s(g(k)) if case == "cold" else ""  # noqa: E731
        L.append(f"| {lab} | `recover --instant` | {bl.fmt_s(g(f'{case}_instant_start_s'))} | "
                 f"**{bl.fmt_s(g(f'{case}_instant_first_s'))}** | {ready(f'{case}_instant_ready_s')} | "
                 f"{bl.fmt_s(g(f'{case}_instant_copied_s'))} (copy {bl.fmt_s(g(f'{case}_instant_copy_seconds'))}) | "
                 f"**{fr(g(f'{case}_copy_ratio'))}** | {bl.fmt_bytes(g(f'{case}_instant_bytes_fetched'))} |")
        L.append(f"| | `recover` (restore, then start) | {bl.fmt_s(g(f'{case}_recover_exit_s'))} | "
                 f"{bl.fmt_s(g(f'{case}_recover_first_s'))} | {ready(f'{case}_recover_ready_s')} | "
                 f"{bl.fmt_s(g(f'{case}_recover_exit_s'))} | | |")
        L.append(f"| | `recover --instant`, guest paused at once (the copy alone) | | | | "
                 f"{bl.fmt_s(g(f'{case}_paused_copied_s'))} (copy {bl.fmt_s(g(f'{case}_paused_copy_seconds'))}) | "
                 f"{fr(g(f'{case}_paused_ratio'))} | |")
        L.append(f"| | `restore --format qcow2` | | | | {bl.fmt_s(g(f'{case}_restore_s'))} | 1.00x | |")
    L.append(f"| guest's own boot (QEMU on the restored local qcow2) | | | {bl.fmt_s(g('boot_first_s'))} | "
             f"{bl.fmt_s(g('boot_ready_s'))} | | | |")
    L.append("")
    extra = []
    for case in CASES:
        n = g(f"{case}_instant_counter_lines")
        if n is not None:
            extra.append(f"{case}: {n:.0f} `C` lines while the copy ran")
    if extra:
        L.append("The guest ran during the background copy: " + "; ".join(extra) + ".")
        L.append("")
    sl = [f"{case} {bl.fmt_s(g(f'{case}_{w}_state_load_s'))} s ({w})" for case in ("memory",)
          for w in ("instant", "recover") if g(f"{case}_{w}_state_load_s") is not None]
    if sl:
        L.append("Memory state load (vmkeep's `state loaded` log): " + ", ".join(sl) + ".")
        L.append("")
    L.append(f"Read throughput, MB/s (`qemu-img bench`, sequential 1 MiB reads of the first "
             f"{meta['args']['prefill_gib']:g} GiB, on the host: the test guest has no read workload):")
    L.append("")
    L.append("| source | " + " | ".join(f"queue depth {q}" for q in DEPTHS) + " |")
    L.append("|---|" + "---|" * len(DEPTHS))
    for k, lab in (("served", "restore point served (`vmkeep mount --socket`, NBD)"),
                   ("overlay", "local qcow2 overlay backed by it (as `--instant` runs)"),
                   ("local", "restored local qcow2 (page cache warm)"),
                   ("direct", "restored local qcow2, O_DIRECT (`-t none`: from the disk)")):
        L.append(f"| {lab} | " + " | ".join(fmbps(g(f"tp_{k}_d{q}_mbps")) for q in DEPTHS) + " |")
    L.append("| **overlay / local O_DIRECT** | " + " | ".join(
        fr(ratio(g(f"tp_overlay_d{q}_mbps"), g(f"tp_direct_d{q}_mbps"))) for q in DEPTHS) + " |")
    L.append("")
    cv = g("convert_s")
    if cv is not None:
        L.append(f"The copy without a guest or a block job (`qemu-img convert -O qcow2` of the served point "
                 f"into a local file): {bl.fmt_s(cv)} s, against {bl.fmt_s(g('cold_instant_copy_seconds'))} s "
                 f"for `--instant`'s copy (fill and stream) of the same point while the guest runs and "
                 f"{bl.fmt_s(g('cold_restore_s'))} s for `restore --format qcow2`.")
        L.append("")
    L.append("Targets:")
    for t in targets:
        L.append(f"- {t['verdict']}: {t['what']} ({t['detail']})")
    L.append("")
    L.append("Columns: start line: `recover --instant` printed its start line (QEMU running); for "
             "`recover`, its exit (one JSON object after the restore and the start). first serial "
             "line: the recovered guest's first complete line in its serial log (with memory a `C i` "
             "counter; without, the booting guest's first line). disks local: `--instant`'s final "
             "line (background copy complete; in parentheses its own `copy_seconds`), `recover`'s "
             "exit, the restore's exit. copy / restore: disks local of `--instant` over the plain "
             "restore's time. fetched: `bytes_fetched` of the final line. The guest's own boot: "
             "the harness starts QEMU on the disk `restore --format qcow2` wrote.")
    return "\n".join(L) + "\n"


def finish(meta, runs):
    keys = sorted({k for r in runs for k in r["derived"]})
    med = {k: bl.median([r["derived"].get(k) for r in runs]) for k in keys}
    meta["max_loadavg"] = max((r["loadavg_before"] for r in runs if r.get("loadavg_before") is not None),
                              default=None)
    targets = check_targets(med)
    failures = [f"rep {r['rep'] + 1}: {'; '.join(r['errors'])}" for r in runs if not r["ok"]]
    for r in runs:
        for case in CASES:
            i = (r.get(case) or {}).get("instant") or {}
            if i.get("guest_failed_lines"):
                failures.append(f"rep {r['rep'] + 1} {case}: guest I/O errors: {i['guest_failed_lines']}")
            if i.get("backing_after"):
                failures.append(f"rep {r['rep'] + 1} {case}: the copied disk still has a backing file "
                                f"{i['backing_after']}")
            if case == "memory" and i.get("booted"):
                failures.append(f"rep {r['rep'] + 1}: the instant recovery with memory booted instead of resuming")
    return med, targets, failures, markdown(meta, med, targets, failures)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=bl.DEFAULT_WORK, help="work dir (default %(default)s); uses WORK/instant/")
    ap.add_argument("--reps", type=int, default=1, help="repetitions, medians shown (default 1)")
    ap.add_argument("--vmkeep", default=bl.DEFAULT_VMKEEP, help="vmkeep binary (default %(default)s)")
    ap.add_argument("--prefill-gib", type=float, default=1.5, help="real data at the start of the disk (default 1.5)")
    ap.add_argument("--min-free-gib", type=float, default=16, help="free space required in --work (default 16)")
    ap.add_argument("--keep", action="store_true", help="keep WORK/instant/ afterwards")
    ap.add_argument("--report", metavar="JSON", help="only print the table again from a raw results file")
    args = ap.parse_args(argv)
    if args.report:
        d = json.loads(Path(args.report).read_text())
        _, _, failures, md = finish(d, d["runs"])
        print(md)
        return 1 if failures else 0

    problems = [f"{b} not found" for b in ("qemu-system-x86_64", "qemu-img") if not bl.shutil.which(b)]
    problems += [p for p in (bl.gnu_time_problem(),) if p]
    if not (os.path.isfile(args.vmkeep) and os.access(args.vmkeep, os.X_OK)):
        problems.append(f"vmkeep binary not found at {args.vmkeep}: cargo build --release -p vmkeep")
    if problems:
        bl.die("; ".join(problems))
    bl.check_free_space(args.work, args.min_free_gib)
    g = bl.run_quiet(["bash", str(bl.REPO_ROOT / "tests" / "guest" / "build.sh")])
    guest = Path(g.stdout.strip().splitlines()[-1])

    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop QEMU and vmkeep.
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
                         "qemu": bl.tool_version(["qemu-system-x86_64", "--version"])}}
    runs = []
    d = Path(args.work) / "instant"
    try:
        bl.rmtree(d)
        d.mkdir(parents=True)
        meta["source"] = prepare(args, guest, d)
        for rep in range(args.reps):
            runs.append(one_rep(args, guest, meta["source"], rep))
    finally:
        if not args.keep:
            bl.rmtree(d)
        lockf.close()
    med, targets, failures, md = finish(meta, runs)
    jp, mp = bl.write_results("instant", {**meta, "runs": runs, "medians": med, "targets": targets,
                                          "failures": failures}, md)
    print(md)
    bl.log(f"raw results: {jp}\ntable: {mp}")
    if failures:
        print("\n".join(f"FAIL: {f}" for f in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
