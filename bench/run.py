#!/usr/bin/env python3
"""vmkeep benchmark: vmkeep vs restic vs rustic vs borg, with zstd -1 -T2 as the compression limit.

For each image (allocated, sparse) and repetition, every tool (order rotated by the
repetition index) gets a fresh copy of the pristine image and a fresh repository, then:
  full backup -> change_image (same seed for all tools) -> incremental backup ->
  backup with no change -> restore of the latest, verified byte-identical (cmp).
zstd only compresses the image to /dev/null (time only).
Measured per step: wall seconds, CPU seconds, the tool's own peak RSS (GNU time), bytes the
tool read (rchar) and repository size after the step (bytes of its files; `du -sb` and
on-disk bytes in the JSON). Everything stays in the page cache (nothing is dropped); the
machine is synced before each timed step so write-back of the previous step does not run
during it, and each backup starts at least SETTLE_S after the image's last change.

Usage: python3 bench/run.py [--reps 3] [--skip-vmkeep] [--work DIR] [--images allocated,sparse]
Writes bench/out/run-<timestamp>.json (raw) and .md (the table printed on stdout).
rustic is built once by `scripts/install-deps.sh bench` into a cache outside the checkout.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
import make_image as mi  # noqa: E402

VM = "bench"
DISK = "disk0"
STEPS = ("full", "incremental", "nochange")
ALL_TOOLS = ("vmkeep", "restic", "rustic", "borg", "zstd")
# "vmkeep-base": a second vmkeep binary (--vmkeep-base PATH, e.g. built from an older commit),
# measured in the same rotation so that the new/old ratio comes from one run under one load.
EXTRA_TOOLS = ("vmkeep-base",)
PEERS = ("restic", "rustic", "vmkeep-base")  # vmkeep/<peer> ratio rows (when measured)
# A backup starts only when the image's last change (ctime) is this old. vmkeep (like git's
# "racy clean" rule) records a file's identity for the next backup's unchanged-file check only
# when its ctime is over 1 s old at backup start; without the pause, whether the no-change
# backup read the image would depend on how long the sync before the incremental took.
# Real backups of a stopped VM do not start within a second of its last write.
SETTLE_S = 1.5


class Tool:
    name = ""
    label = ""
    binary = ""

    def __init__(self, work: Path):
        self.work = work

    def env(self) -> dict:
        return {}

    def check(self) -> str | None:
        return None if shutil.which(self.binary) else f"{self.binary} not found (scripts/install-deps.sh bench)"

    def version(self) -> str | None:
        return bl.tool_version([self.binary, "--version"])

    def reset_cache(self) -> None:
        pass


class Restic(Tool):
    name, label, binary = "restic", "restic (encrypted)", "restic"

    def env(self):
        return {"RESTIC_PASSWORD": bl.PASSWORD, "RESTIC_CACHE_DIR": str(self.work / "cache" / "restic")}

    def version(self):
        return bl.tool_version(["restic", "version"])

    def reset_cache(self):
        bl.rmtree(self.work / "cache" / "restic")

    def init(self, repo, img, chunk_size=None):
        return bl.run_timed(["restic", "-r", repo, "init"], env=self.env(), label="restic init")

    def backup(self, repo, img, step):
        return bl.run_timed(["restic", "-r", repo, "backup", "--host", "vmkeep-bench", "-q", img],
                            env=self.env(), label=f"restic backup ({step})")

    def restore(self, repo, img, dest, last):
        res = bl.run_timed(["restic", "-r", repo, "restore", "latest", "--target", dest, "-q"],
                           env=self.env(), label="restic restore")
        return res, Path(dest) / str(img).lstrip("/")


def default_rustic() -> str:
    cached = bl.BENCH_CACHE / "rustic" / "bin" / "rustic"
    if cached.exists():
        return str(cached)
    return shutil.which("rustic") or str(cached)


class Rustic(Tool):
    """rustic, the Rust implementation of restic's repository format. Only the benchmark's own
    (empty) profile is read: `-P /abs/path.toml` replaces the default `rustic` profile that
    rustic would otherwise merge from ~/.config/rustic, /etc/rustic and the working dir."""

    name, label = "rustic", "rustic (encrypted)"

    def __init__(self, work, binary):
        super().__init__(work)
        self.binary = binary
        self.profile = work / "cache" / "rustic-profile" / "vmkeep-bench.toml"

    def check(self):
        if not (os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)):
            return (f"rustic not found at {self.binary}: `scripts/install-deps.sh bench` builds it "
                    f"once into {bl.BENCH_CACHE / 'rustic'} (or pass --rustic PATH, or --tools without rustic)")
        return None

    def env(self):
        return {"RUSTIC_PASSWORD": bl.PASSWORD, "RUSTIC_CACHE_DIR": str(self.work / "cache" / "rustic")}

    def base(self, repo):
        if not self.profile.exists():
            self.profile.parent.mkdir(parents=True, exist_ok=True)
            self.profile.write_text("# vmkeep benchmark: the only rustic profile read (settings are "
                                    "on the command line and in RUSTIC_* variables)\n")
        return [self.binary, "-P", str(self.profile), "--no-progress", "--log-level", "warn", "-r", repo]

    def reset_cache(self):
        bl.rmtree(self.work / "cache" / "rustic")

    def init(self, repo, img, chunk_size=None):
        return bl.run_timed(self.base(repo) + ["init"], env=self.env(), label="rustic init")

    def backup(self, repo, img, step):
        return bl.run_timed(self.base(repo) + ["backup", "--host", "vmkeep-bench", img],
                            env=self.env(), label=f"rustic backup ({step})")

    def restore(self, repo, img, dest, last):
        res = bl.run_timed(self.base(repo) + ["restore", "latest", dest], env=self.env(),
                           label="rustic restore")
        return res, Path(dest) / str(img).lstrip("/")


class Borg(Tool):
    name, label, binary = "borg", "borg (repokey-blake2)", "borg"

    def env(self):
        return {"BORG_PASSPHRASE": bl.PASSWORD, "BORG_BASE_DIR": str(self.work / "cache" / "borg"),
                "BORG_DISPLAY_PASSPHRASE": "no", "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def reset_cache(self):
        bl.rmtree(self.work / "cache" / "borg")

    def init(self, repo, img, chunk_size=None):
        return bl.run_timed(["borg", "init", "-e", "repokey-blake2", repo], env=self.env(), label="borg init")

    def backup(self, repo, img, step):
        return bl.run_timed(["borg", "create", f"{repo}::{step}", img], env=self.env(),
                            label=f"borg create ({step})")

    def restore(self, repo, img, dest, last):
        res = bl.run_timed(["borg", "extract", f"{repo}::{last}"], env=self.env(), cwd=dest,
                           label="borg extract")
        return res, Path(dest) / str(img).lstrip("/")


class Vmkeep(Tool):
    name, label = "vmkeep", "vmkeep (--encrypt)"

    def __init__(self, work, binary, name=None, label=None):
        super().__init__(work)
        self.binary = binary
        if name:
            self.name = name
        if label:
            self.label = label

    def env(self):
        return {"VMKEEP_PASSWORD": bl.PASSWORD}

    def check(self):
        if not (os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)):
            return (f"vmkeep binary not found at {self.binary}: build it with "
                    f"`cargo build --release -p vmkeep`, or pass --skip-vmkeep")
        return None

    def init(self, repo, img, chunk_size=None):
        cmd = [self.binary, "--repo", repo, "init", "--encrypt"]
        if chunk_size:
            cmd += ["--chunk-size", chunk_size]
        return bl.run_timed(cmd + ["--json"], env=self.env(), label="vmkeep init")

    def backup(self, repo, img, step):
        return bl.run_timed([self.binary, "--repo", repo, "backup", "image", "--vm", VM,
                             "--disk", f"{DISK}={img}", "--json"], env=self.env(),
                            label=f"vmkeep backup ({step})")

    def restore(self, repo, img, dest, last):
        snap = last or f"{VM}@latest"
        res = bl.run_timed([self.binary, "--repo", repo, "restore", snap, "--target", dest, "--json"],
                           env=self.env(), label="vmkeep restore")
        path = Path(dest) / f"{DISK}.raw"
        doc = bl.parse_json_stdout(res)
        try:
            path = Path(doc["disks"][0]["path"])
        except (TypeError, KeyError, IndexError):
            pass
        return res, path


BASE_LABEL = "vmkeep base binary (--encrypt)"


class Zstd(Tool):
    name, label, binary = "zstd", "zstd -1 -T2 (limit)", "zstd"

    def run(self, img):
        return bl.run_timed(["zstd", "-1", "-T2", "-q", "-c", img], stdout_to_null=True, label="zstd")


def step_record(res: dict, repo: Path | None) -> dict:
    rec = {k: res.get(k) for k in ("cmd", "rc", "seconds", "cpu_s", "maxrss_kib", "harness_maxrss_kib",
                                   "rchar", "wchar")}
    if res["rc"] != 0:
        rec["stderr"] = res["stderr"]
    doc = bl.parse_json_stdout(res)
    if doc is not None:
        rec["json"] = doc
    if repo is not None:
        rec["repo"] = bl.tree_usage(repo)
    return rec


def sync() -> float:
    """Flush every dirty page; return the seconds it took (untimed for the step itself)."""
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def settle(img: Path) -> float:
    """Wait (untimed) until the image's last change is SETTLE_S old; return the seconds waited."""
    st = os.stat(img)
    wait = st.st_ctime_ns / 1e9 + SETTLE_S - time.time()
    if wait > 0:
        time.sleep(wait)
    return max(wait, 0.0)


def run_tool(tool: Tool, image: str, pristine: Path, rep: int, args, datamap) -> dict:
    rundir = Path(args.work) / "run"
    bl.rmtree(rundir)
    rundir.mkdir(parents=True)
    img = rundir / f"{DISK}.img"
    repo = rundir / "repo"
    dest = rundir / "restore"
    rec = {"tool": tool.name, "image": image, "rep": rep, "ok": True, "errors": [], "steps": {},
           "loadavg_before": bl.loadavg()}
    bl.log(f"{image} rep {rep + 1}: {tool.name}")
    bl.copy_image(pristine, img)
    sync()
    try:
        if isinstance(tool, Zstd):
            res = tool.run(img)
            rec["steps"]["full"] = step_record(res, None)
            if res["rc"] != 0:
                raise RuntimeError(f"zstd exited {res['rc']}")
            return rec
        tool.reset_cache()
        res = tool.init(repo, img)
        rec["init"] = step_record(res, repo)
        if res["rc"] != 0:
            raise RuntimeError(f"init failed: {res['stderr'].strip()[-300:]}")
        last_id = None
        for step in STEPS:
            if step == "incremental":
                rec["changed_bytes"] = mi.change_image(img, args.seed, datamap)
            sync()
            waited = settle(img)
            res = tool.backup(repo, img, step)
            synced = sync()
            rec["steps"][step] = step_record(res, repo)
            rec["steps"][step]["sync_after_s"] = synced
            rec["steps"][step]["settle_wait_s"] = waited
            if res["rc"] != 0:
                raise RuntimeError(f"{step} backup failed: {res['stderr'].strip()[-300:]}")
            doc = rec["steps"][step].get("json")
            if isinstance(doc, dict) and doc.get("id"):
                last_id = doc["id"]
            elif tool.name == "borg":
                last_id = step
        dest.mkdir()
        sync()
        res, path = tool.restore(repo, img, dest, last_id)
        synced = sync()
        rec["steps"]["restore"] = step_record(res, None)
        # Write-back the tool left to the OS: a tool that fsyncs its output (vmkeep's restore
        # since its durability fix) pays it inside its timed step, one that does not leaves it
        # here; restore seconds + this is the like-for-like "restored and on disk" time.
        rec["steps"]["restore"]["sync_after_s"] = synced
        if res["rc"] != 0:
            raise RuntimeError(f"restore failed: {res['stderr'].strip()[-300:]}")
        ok = bl.files_identical(path, img)
        rec["restore_ok"] = ok
        rec["restored"] = {"path": str(path), "exists": path.exists(),
                           "disk_bytes": path.stat().st_blocks * 512 if path.exists() else None}
        if not ok:
            raise RuntimeError(f"restored image {path} is NOT byte-identical to the backed-up image")
    except Exception as e:  # record and go on with the next tool
        rec["ok"] = False
        rec["errors"].append(str(e))
        bl.log(f"FAIL {tool.name} on {image} (rep {rep + 1}): {e}")
    finally:
        if not args.keep:
            bl.rmtree(rundir)
            tool.reset_cache()
    return rec


# ---------------------------------------------------------------- summarising

def derive(rec: dict) -> dict:
    """Per-run figures used in the table."""
    s = rec["steps"]
    d = {}
    for step in ("full", "incremental", "nochange", "restore"):
        st = s.get(step)
        ok = bool(st) and st["rc"] == 0
        d[f"{step}_s"] = st["seconds"] if ok else None
        d[f"{step}_cpu_s"] = st.get("cpu_s") if ok else None
        d[f"{step}_rss_kib"] = st.get("maxrss_kib") if ok else None
        d[f"{step}_rchar"] = st.get("rchar") if ok else None
    r = s.get("restore")
    d["restore_sync_s"] = (r["seconds"] + r["sync_after_s"]
                           if r and r["rc"] == 0 and r.get("sync_after_s") is not None else None)
    rss = [st.get("maxrss_kib") for st in s.values() if st and st.get("maxrss_kib") is not None]
    d["peak_rss_kib"] = max(rss) if rss else None

    def size(step):  # bytes of the repository's files after a successful step
        st = s.get(step)
        if not st or st["rc"] != 0 or "repo" not in st:
            return None
        u = st["repo"]
        return u.get("file_bytes", u["apparent"])  # older results: apparent only

    full, inc, nc = size("full"), size("incremental"), size("nochange")
    d["repo_full"] = full
    d["repo_full_disk"] = s["full"]["repo"]["disk"] if full is not None else None
    d["stored_inc"] = inc - full if inc is not None and full is not None else None
    d["stored_nochange"] = nc - inc if nc is not None and inc is not None else None
    d["changed_bytes"] = rec.get("changed_bytes")
    for step in STEPS:
        j = s.get(step, {}).get("json")
        st = j.get("stats") if isinstance(j, dict) else None
        if isinstance(st, dict):
            for k in ("read_bytes", "new_bytes", "stored_bytes"):
                d[f"{step}_{k}"] = st.get(k)
    return d


def summarise(runs, tools, images):
    med = {}
    for image in images:
        for t in tools:
            rs = [r for r in runs if r["image"] == image and r["tool"] == t]
            if not rs:
                continue
            ds = [r["derived"] for r in rs]
            keys = sorted({k for d in ds for k in d})
            m = {k: bl.median([d.get(k) for d in ds]) for k in keys}
            m["runs"] = len(rs)
            m["failed_runs"] = sum(1 for r in rs if not r["ok"])
            m["restore_verified"] = all(r.get("restore_ok") for r in rs) if t != "zstd" else None
            med[f"{image}/{t}"] = m
    return med


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def fmt_mib(kib) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def markdown(meta, med, tools, images, image_size, targets, failures) -> str:
    labels = {"vmkeep": Vmkeep.label, "restic": Restic.label, "rustic": Rustic.label, "borg": Borg.label,
              "zstd": Zstd.label, "vmkeep-base": BASE_LABEL}
    steps4 = ("full", "incremental", "nochange", "restore")
    L = []
    L.append(f"## vmkeep benchmark, {meta['started']}")
    L.append("")
    h = meta["host"]
    L.append(f"Host: {h['nproc']} cores, {h['mem_bytes'] / bl.GiB:.0f} GiB RAM, kernel {h['kernel']}. "
             f"Image {image_size / bl.GiB:.0f} GiB ext4 with {meta['images']['src']['files']:,} real files "
             f"({meta['images']['fs'].get('fs_used_bytes', 0) / bl.GiB:.2f} GiB used); incremental after "
             f"{meta['changed_bytes'] / bl.MiB:.0f} MiB changed as 64 KiB writes. "
             f"Medians of {meta['args']['reps']} repetition(s); image and repository in page cache.")
    L.append("Versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items() if v))
    la = meta.get("loadavg")
    if la:
        L.append(f"1-minute load average before the measured runs: min {la['min']:.1f}, median "
                 f"{la['median']:.1f}, max {la['max']:.1f} ({h['nproc']} cores).")
    L.append("")
    mx = meta.get("max_loadavg")
    if mx is not None and mx > 0.5 * (h["nproc"] or 1):
        L.append(f"**Warning:** the 1-minute load average reached {mx:.1f} before a measured run on "
                 f"{h['nproc']} cores: other processes competed for the CPU, absolute figures are "
                 f"inflated and noisy; compare ratios within this run only.")
        L.append("")
    if failures:
        L.append("**FAILURES:**")
        for f in failures:
            L.append(f"- **FAIL** {f}")
        L.append("")
    L.append("| tool | image | full s (MB/s) | incremental s | no-change s | restore s | stored by incremental | repo after full | peak RSS |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for image in images:
        for t in tools:
            m = med.get(f"{image}/{t}")
            if not m:
                continue
            fs = m.get("full_s")
            full = "-" if fs is None else f"{fs:.2f} ({image_size / bl.MB / fs:,.0f})"
            rss = m.get("peak_rss_kib")
            rss_s = "-" if rss is None else f"{rss / 1024:.0f} MiB"
            if t == "zstd":
                L.append(f"| {labels[t]} | {image} | {full} | - | - | - | - | - | {rss_s} |")
                continue
            rest = bl.fmt_s(m.get("restore_s"))
            if m.get("restore_verified") is False:
                rest += " **FAIL**"
            si, ch = m.get("stored_inc"), m.get("changed_bytes")
            stored = "-" if si is None else f"{si / bl.MB:,.1f} MB ({si / ch:.1f}x)" if ch else f"{si / bl.MB:,.1f} MB"
            rf = m.get("repo_full")
            L.append(f"| {labels[t]} | {image} | {full} | {bl.fmt_s(m.get('incremental_s'))} | "
                     f"{bl.fmt_s(m.get('nochange_s'))} | {rest} | {stored} | "
                     f"{'-' if rf is None else f'{rf / bl.MB:,.0f} MB'} | {rss_s} |")
    for image in images:
        for peer in PEERS:
            v, r = med.get(f"{image}/vmkeep"), med.get(f"{image}/{peer}")
            if not (v and r):
                continue
            cols = [ratio(v.get(k), r.get(k)) for k in
                    ("full_s", "incremental_s", "nochange_s", "restore_s", "stored_inc", "repo_full", "peak_rss_kib")]
            L.append(f"| **vmkeep/{peer}** | {image} | " + " | ".join(fmt_ratio(c) for c in cols) + " |")
    rs = [(f"{t} {image}", med[f"{image}/{t}"].get("restore_sync_s")) for image in images for t in tools
          if t != "zstd" and med.get(f"{image}/{t}")]
    if any(v is not None for _, v in rs):
        L.append("")
        L.append("Restore until on disk (restore s + the untimed sync after it, medians; vmkeep fsyncs "
                 "its restored file inside the restore, the peers leave the write-back to that sync): "
                 + "; ".join(f"{k} {bl.fmt_s(v)}" for k, v in rs) + ".")
    L.append("")
    L.append("Per step (medians), full / incremental / no-change / restore: bytes the tool's processes "
             "read (rchar: read() calls, page-cache hits included; image, repository and cache), "
             "its own peak RSS, and its CPU seconds (user + sys; less sensitive to competing load "
             "than wall time, blind to waiting).")
    L.append("")
    L.append("| tool | image | read MB | peak RSS MiB | CPU s |")
    L.append("|---|---|---|---|---|")
    for image in images:
        for t in tools:
            m = med.get(f"{image}/{t}")
            if not m:
                continue
            sts = ("full",) if t == "zstd" else steps4
            L.append(f"| {labels[t]} | {image} | "
                     + " / ".join(bl.fmt_mb(m.get(f"{st}_rchar")) for st in sts) + " | "
                     + " / ".join(fmt_mib(m.get(f"{st}_rss_kib")) for st in sts) + " | "
                     + " / ".join(bl.fmt_s(m.get(f"{st}_cpu_s")) for st in sts) + " |")
    L.append("")
    L.append("Targets:")
    for t in targets:
        L.append(f"- {t['verdict']}: {t['what']} ({t['detail']})")
    vm_rows = [(image, med.get(f"{image}/vmkeep")) for image in images if med.get(f"{image}/vmkeep")]
    if any("full_read_bytes" in m for _, m in vm_rows):
        L.append("")
        L.append("vmkeep's own stats (medians, MB): read / new / stored")
        L.append("")
        L.append("| image | full | incremental | no-change |")
        L.append("|---|---|---|---|")
        for image, m in vm_rows:
            cells = []
            for step in STEPS:
                cells.append(" / ".join(bl.fmt_mb(m.get(f"{step}_{k}")) for k in ("read_bytes", "new_bytes", "stored_bytes")))
            L.append(f"| {image} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("Columns: MB = 10^6 bytes; MB/s = image size (2 GiB, holes included) / full backup seconds; "
             "stored by incremental = growth of the bytes of the repository's files during the "
             "incremental, and that growth / the bytes changed; repo after full = bytes of the "
             "repository's files after the full backup; peak RSS = the highest of the tool's own peak "
             "RSS (GNU time) over the four steps; vmkeep/peer = vmkeep's median / the peer's median "
             "(< 1: vmkeep faster or smaller). Each backup starts at least "
             f"{SETTLE_S} s after the image's last change. borg runs with repokey-blake2 encryption "
             "(the peers table measured it without).")
    return "\n".join(L) + "\n"


def check_targets(med, images):
    out = []

    def add(what, val, limit, detail):
        if val is None or limit is None:
            out.append({"what": what, "verdict": "n/a", "detail": "not measured"})
        else:
            out.append({"what": what, "verdict": "PASS" if val <= limit else "MISS", "detail": detail,
                        "value": val, "limit": limit})

    v, r = med.get("allocated/vmkeep", {}), med.get("allocated/restic", {})
    vf, rf = v.get("full_s"), r.get("full_s")
    add("full backup vmkeep <= 0.5x restic, allocated image",
        vf, None if rf is None else 0.5 * rf,
        f"vmkeep {bl.fmt_s(vf)} s vs restic {bl.fmt_s(rf)} s = {fmt_ratio(ratio(vf, rf))}")
    for image in images:
        v = med.get(f"{image}/vmkeep", {})
        add(f"vmkeep restore <= vmkeep full backup, {image} image", v.get("restore_s"), v.get("full_s"),
            f"restore {bl.fmt_s(v.get('restore_s'))} s vs full {bl.fmt_s(v.get('full_s'))} s")
    for image in images:
        v, z = med.get(f"{image}/vmkeep", {}), med.get(f"{image}/zstd", {})
        zf = z.get("full_s")
        add(f"vmkeep full backup within 2x of zstd -1 -T2, {image} image", v.get("full_s"),
            None if zf is None else 2 * zf,
            f"vmkeep {bl.fmt_s(v.get('full_s'))} s vs zstd {bl.fmt_s(zf)} s = {fmt_ratio(ratio(v.get('full_s'), zf))}")
    return out


def finish(meta, runs, tools, images, image_size):
    for r in runs:
        r["derived"] = derive(r)
    las = [r["loadavg_before"] for r in runs if r.get("loadavg_before") is not None]
    meta["max_loadavg"] = max(las, default=None)
    meta["loadavg"] = {"min": min(las), "median": bl.median(las), "max": max(las)} if las else None
    med = summarise(runs, tools, images)
    targets = check_targets(med, images) if "vmkeep" in tools else [
        {"what": "vmkeep targets", "verdict": "n/a", "detail": "vmkeep skipped"}]
    failures = [f"{r['tool']} on {r['image']} (rep {r['rep'] + 1}): {'; '.join(r['errors'])}"
                for r in runs if not r["ok"]]
    md = markdown(meta, med, tools, images, image_size, targets, failures)
    return med, targets, failures, md


def report(path):
    import json
    d = json.loads(Path(path).read_text())
    tools = [t for t in ALL_TOOLS + EXTRA_TOOLS if any(r["tool"] == t for r in d["runs"])]
    images = [i for i in ("allocated", "sparse") if any(r["image"] == i for r in d["runs"])]
    _, _, failures, md = finish(d, d["runs"], tools, images, d["images"]["image_size"])
    print(md)
    return 1 if failures else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=bl.DEFAULT_WORK, help="work dir (default %(default)s, env VMKEEP_BENCH_WORK)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the table shows medians (default 3)")
    ap.add_argument("--skip-vmkeep", action="store_true", help="measure only the peers and zstd")
    ap.add_argument("--vmkeep", default=bl.DEFAULT_VMKEEP, help="vmkeep binary (default %(default)s)")
    ap.add_argument("--rustic", default=default_rustic(),
                    help="rustic binary (default %(default)s, built by scripts/install-deps.sh bench)")
    ap.add_argument("--vmkeep-base", metavar="PATH",
                    help="a second vmkeep binary (e.g. an older commit's), measured as tool "
                         "'vmkeep-base' in the same rotation; adds a vmkeep/vmkeep-base ratio row")
    ap.add_argument("--tools", default=",".join(ALL_TOOLS),
                    help="comma list (default %(default)s; vmkeep-base is added after vmkeep "
                         "when --vmkeep-base is given)")
    ap.add_argument("--images", default="allocated,sparse", help="comma list (default %(default)s)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the 1%% change (default 1)")
    ap.add_argument("--min-free-gib", type=float, default=20, help="free space required in --work (default 20)")
    ap.add_argument("--keep", action="store_true", help="keep the last run's work files (debugging)")
    ap.add_argument("--report", metavar="JSON", help="only print the table again from a raw results file")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report)

    work = Path(args.work)
    tools = [t for t in args.tools.split(",") if t]
    if args.skip_vmkeep:
        tools = [t for t in tools if t not in ("vmkeep", "vmkeep-base")]
    if args.vmkeep_base and not args.skip_vmkeep and "vmkeep-base" not in tools:
        at = tools.index("vmkeep") + 1 if "vmkeep" in tools else len(tools)
        tools.insert(at, "vmkeep-base")
    if "vmkeep-base" in tools and not args.vmkeep_base:
        bl.die("tool vmkeep-base needs --vmkeep-base PATH", 2)
    images = [i for i in args.images.split(",") if i]
    for i in images:
        if i not in ("allocated", "sparse"):
            bl.die(f"unknown image {i!r} (allocated, sparse)", 2)
    known = {"vmkeep": lambda: Vmkeep(work, args.vmkeep), "restic": lambda: Restic(work),
             "rustic": lambda: Rustic(work, args.rustic), "borg": lambda: Borg(work),
             "zstd": lambda: Zstd(work),
             "vmkeep-base": lambda: Vmkeep(work, args.vmkeep_base, "vmkeep-base", BASE_LABEL)}
    for t in tools:
        if t not in known:
            bl.die(f"unknown tool {t!r} ({', '.join(known)})", 2)
    objs = {t: known[t]() for t in tools}
    problems = [p for p in (o.check() for o in objs.values()) if p]
    for tool in ("cmp",):
        if not shutil.which(tool):
            problems.append(f"{tool} not found")
    if (p := bl.gnu_time_problem()):
        problems.append(p)
    if problems:
        bl.die("; ".join(problems))

    bl.check_free_space(work, args.min_free_gib)
    man = mi.build_images(work)
    datamap = mi.load_datamap(work)
    pristine = {"allocated": Path(man["allocated"]["path"]), "sparse": Path(man["sparse"]["path"])}
    changed = len(mi.change_offsets(man["image_size"], args.seed, datamap)) * mi.CHANGE_WRITE

    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "args": vars(args),
        "host": bl.host_info(),
        "versions": {t: o.version() for t, o in objs.items()},
        "images": man,
        "changed_bytes": changed,
    }
    runs = []
    for image in images:
        for rep in range(args.reps):
            k = rep % len(tools)
            order = tools[k:] + tools[:k]
            for pos, t in enumerate(order):
                rec = run_tool(objs[t], image, pristine[image], rep, args, datamap)
                rec["order"] = pos
                runs.append(rec)

    # The harness's own peak: what every tool's peak RSS used to read (see benchlib's docstring).
    meta["harness_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    med, targets, failures, md = finish(meta, runs, tools, images, man["image_size"])
    jp, mp = bl.write_results("run", {**meta, "runs": runs, "medians": med, "targets": targets,
                                      "failures": failures}, md)
    print(md)
    bl.log(f"raw results: {jp}\ntable: {mp}")
    if failures:
        print("\n".join(f"FAIL: {f}" for f in failures), file=sys.stderr)
        print(f"*** {len(failures)} run(s) FAILED, see above ***", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
