"""The memfill test guest under QEMU for bench/memory_capture.py (Python 3.11 stdlib only).

QEMU (TCG) with the test guest of tests/guest/build.sh running vmkeep.workload=memfill: the
console in a file the harness follows, a control serial port (ttyS1: "on" / "off" resume and
pause the guest's writes), vmkeep's QMP socket and a second QMP monitor for the harness, which
records QEMU's events with their timestamps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import benchlib as bl

MB = bl.MB
MW = re.compile(r"^MW (\d+) (\d+) (\d+)$")


class Qmp:
    """A QMP connection kept open: a reader thread files events (with QEMU's timestamps and the
    host's arrival time) and hands replies to execute()."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())  # greeting
        self.events: list[dict] = []
        self.replies: list[dict] = []
        self.cv = threading.Condition()
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()
        self.execute("qmp_capabilities")

    def _lines(self):
        try:
            yield from self.f
        except OSError:  # QEMU quit: the connection is reset
            return

    def _read(self):
        for line in self._lines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.cv:
                if "event" in msg:
                    ts = msg.get("timestamp", {})
                    msg["qemu_t"] = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                    msg["host_t"] = time.time()
                    self.events.append(msg)
                else:
                    self.replies.append(msg)
                self.cv.notify_all()
        with self.cv:
            self.replies.append({"error": {"desc": "QMP connection closed"}})
            self.cv.notify_all()

    def execute(self, command: str, arguments: dict | None = None, timeout: float = 60):
        with self.cv:
            self.replies.clear()
            msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
            self.f.write(json.dumps(msg).encode() + b"\n")
            self.f.flush()
            if not self.cv.wait_for(lambda: self.replies, timeout):
                raise RuntimeError(f"QMP {command}: no reply in {timeout} s")
            r = self.replies.pop(0)
        if "error" in r:
            raise RuntimeError(f"QMP {command}: {r['error']}")
        return r.get("return")

    def wait_event(self, pred, since: int, timeout: float) -> dict:
        """The first event at index >= since matching pred."""
        with self.cv:
            end = time.monotonic() + timeout
            while True:
                for e in self.events[since:]:
                    if pred(e):
                        return e
                left = end - time.monotonic()
                if left <= 0:
                    raise RuntimeError("QMP: the awaited event did not come")
                self.cv.wait(left)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class SerialTail:
    """Follows a serial log file QEMU writes; stamps every complete line with its arrival
    (host time.time(), polled every 5 ms)."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        f, buf = None, b""
        while not self.stop.is_set():
            if f is None:
                try:
                    f = open(self.path, "rb")
                except FileNotFoundError:
                    time.sleep(0.005)
                    continue
            d = f.read()
            if d:
                now = time.time()
                buf += d
                *done, buf = buf.split(b"\n")
                with self.lock:
                    self.lines += [(now, ln.decode("utf-8", "replace").strip("\r")) for ln in done]
            else:
                time.sleep(0.005)
        if f:
            f.close()

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.lines)

    def wait_for(self, prefix: str, timeout: float, alive=lambda: True) -> tuple[float, str]:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for t, ln in self.snapshot():
                if "failed" in ln:
                    raise RuntimeError(f"guest: {ln}")
                if ln.startswith(prefix):
                    return t, ln
            if not alive():
                raise RuntimeError(f"QEMU exited waiting for {prefix!r}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.path} showed no {prefix!r} within {timeout:.0f} s")

    def close(self):
        self.stop.set()
        self.t.join(timeout=2)


def write_rate(lines, a: float, b: float) -> dict:
    """The guest's own write rate from its MW lines that arrived in (a, b]: KiB written over
    the guest's centiseconds those lines cover."""
    kib = cs = n = 0
    for t, ln in lines:
        m = MW.match(ln)
        if m and a < t <= b:
            n += 1
            cs += int(m.group(2))
            kib += int(m.group(3))
    return {"lines": n, "kib": kib, "cs": cs, "mbps": (kib * 1024 / MB) / (cs / 100) if cs else None}



class Guest:
    """The memfill test guest: QEMU (TCG) with vmkeep's QMP socket, a second QMP monitor for the
    harness, the console in a file and a control serial port (ttyS1)."""

    def __init__(self, d: Path, guest: Path, mib: int, fill: int, step: int):
        self.d = d
        self.qmp_path = d / "qmp.sock"      # vmkeep's
        self.watch_path = d / "watch.sock"  # the harness's
        self.ctl_path = d / "ctl.sock"
        self.serial_log = d / "serial.log"
        disk = d / "vda.qcow2"
        bl.run_quiet(["qemu-img", "create", "-f", "qcow2", str(disk), "32M"])
        self.cmd = ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none",
                    "-m", str(mib), "-no-reboot",
                    "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.gz"),
                    "-append", f"console=ttyS0 quiet panic=-1 vmkeep.workload=memfill "
                               f"vmkeep.fill={fill} vmkeep.step={step}",
                    "-serial", f"file:{self.serial_log}",
                    "-chardev", f"socket,id=ctl,path={self.ctl_path},server=on,wait=off",
                    "-serial", "chardev:ctl",
                    "-blockdev", f"driver=file,filename={disk},node-name=f0",
                    "-blockdev", "driver=qcow2,file=f0,node-name=disk0",
                    "-device", "virtio-blk-pci,drive=disk0,id=vd0",
                    "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                    "-qmp", f"unix:{self.watch_path},server=on,wait=off"]
        self.log = open(d / "qemu.log", "wb")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.serial = SerialTail(self.serial_log)
        self.qmp = self.ctl = None
        t0 = time.monotonic()
        while self.qmp is None or self.ctl is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({self.proc.returncode}): see {d / 'qemu.log'}")
            try:
                if self.ctl is None:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(str(self.ctl_path))
                    self.ctl = s
                if self.qmp is None:
                    self.qmp = Qmp(self.watch_path)
            except OSError:
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("QEMU's sockets did not appear")
                time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def writes(self, on: bool):
        """Pauses or resumes the guest's writer; waits for its acknowledgement."""
        word = "on" if on else "off"
        since = len(self.serial.snapshot())
        self.ctl.sendall(f"{word}\n".encode())
        t0 = time.monotonic()
        while not any(ln == f"MEMFILL {word}" for _, ln in self.serial.snapshot()[since:]):
            if time.monotonic() - t0 > 60 or not self.alive():
                raise RuntimeError(f"the guest did not acknowledge {word!r}")
            time.sleep(0.02)

    def kill(self):
        if self.proc.poll() is None and self.qmp:
            try:
                self.qmp.execute("quit", timeout=5)
                self.proc.wait(timeout=10)
            except Exception:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        for x in (self.qmp, self.ctl):
            if x:
                x.close()
        self.serial.close()
        self.log.close()


# QEMU's default max-bandwidth is 128 MiB/s; libvirt raises it to "unlimited" (INT64_MAX rounded
# to MiB) while it saves to a file (qemuMigrationSrcToFile), and so does the stop-and-save here.
UNLIMITED = (2**63 - 1) // bl.MiB * bl.MiB


def anon_huge_kib(pid: int) -> int | None:
    """The QEMU process's anonymous memory in transparent huge pages (background snapshot
    splits them: the next capture write-protects 4 KiB entries)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Bandwidth:
    """Sets QEMU's migration max-bandwidth for a block and puts the old value back."""

    def __init__(self, q: Qmp, value: int | None):
        self.q, self.value, self.old = q, value, None

    def __enter__(self):
        if self.value is not None:
            self.old = self.q.execute("query-migrate-parameters").get("max-bandwidth")
            self.q.execute("migrate-set-parameters", {"max-bandwidth": self.value})
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            self.q.execute("migrate-set-parameters", {"max-bandwidth": self.old})


def cont_when_finalized(q: Qmp, timeout: float = 30):
    """`cont` after a migration: QEMU sends MIGRATION completed while the runstate is still
    finish-migrate for a moment, and refuses `cont` until it moved on."""
    end = time.monotonic() + timeout
    while True:
        try:
            q.execute("cont")
            return
        except RuntimeError as e:
            if "not finalized" not in str(e) or time.monotonic() > end:
                raise
            time.sleep(0.001)
