#!/usr/bin/env python3
"""vmkeep chunk-size sweep on the allocated image.

For each chunk size (default 64K, 256K, 1M, 4M): fresh copy of the pristine allocated image,
`vmkeep --repo R init --encrypt --chunk-size SIZE --json`, full backup, the 1% change
(same seed and offsets as run.py), incremental backup. Reported per size:
  - full backup s and MB/s (2 GiB / seconds),
  - incremental s, and stored bytes per changed byte (growth of the bytes of the repository's
    files during the incremental / bytes changed),
  - metadata size: bytes of the repository's files outside the `packs` folder (--pack-dir to
    rename), and vmkeep's own `metadata_bytes` stat when its JSON stats carry one,
  - object count: number of files in the repository after the incremental,
  - repository size (bytes of its files) after the incremental,
  - peak RSS: vmkeep's own (GNU time), the higher of the two backups.

Usage: python3 bench/chunk_sizes.py [--sizes 64K,256K,1M,4M] [--reps 1] [--work DIR]
Writes bench/out/chunk-sizes-<timestamp>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
import make_image as mi  # noqa: E402
import run as rb  # noqa: E402


def one(tool: rb.Vmkeep, size: str, pristine: Path, args, datamap, rep: int) -> dict:
    rundir = Path(args.work) / "run"
    bl.rmtree(rundir)
    rundir.mkdir(parents=True)
    img, repo = rundir / f"{rb.DISK}.img", rundir / "repo"
    rec = {"chunk_size": size, "rep": rep, "ok": True, "errors": [], "steps": {},
           "loadavg_before": bl.loadavg()}
    bl.log(f"chunk size {size}, rep {rep + 1}")
    bl.copy_image(pristine, img)
    rb.sync()
    try:
        res = tool.init(repo, img, chunk_size=size)
        rec["init"] = rb.step_record(res, repo)
        if res["rc"] != 0:
            raise RuntimeError(f"init failed: {res['stderr'].strip()[-300:]}")
        for step in ("full", "incremental"):
            if step == "incremental":
                rec["changed_bytes"] = mi.change_image(img, args.seed, datamap)
            rb.sync()
            rb.settle(img)
            res = tool.backup(repo, img, step)
            rb.sync()
            rec["steps"][step] = rb.step_record(res, repo)
            if res["rc"] != 0:
                raise RuntimeError(f"{step} backup failed: {res['stderr'].strip()[-300:]}")
    except Exception as e:
        rec["ok"] = False
        rec["errors"].append(str(e))
        bl.log(f"FAIL chunk size {size}: {e}")
    finally:
        if not args.keep:
            bl.rmtree(rundir)
    return rec


def derive(rec: dict, pack_dir: str) -> dict:
    s = rec["steps"]
    d = {}
    full, inc = s.get("full"), s.get("incremental")
    d["full_s"] = full["seconds"] if full and full["rc"] == 0 else None
    d["incremental_s"] = inc["seconds"] if inc and inc["rc"] == 0 else None
    rss = [st["maxrss_kib"] for st in s.values() if st.get("maxrss_kib") is not None]
    d["peak_rss_kib"] = max(rss) if rss else None
    if full and inc and inc["rc"] == 0:
        ru = inc["repo"]
        d["stored_inc"] = ru["file_bytes"] - full["repo"]["file_bytes"]
        d["stored_per_changed"] = d["stored_inc"] / rec["changed_bytes"]
        d["repo_bytes"] = ru["file_bytes"]
        d["pack_bytes"] = ru["top_files"].get(pack_dir)
        d["non_pack_bytes"] = ru["file_bytes"] - (d["pack_bytes"] or 0) if d["pack_bytes"] is not None else None
        d["objects"] = ru["files"]
        md = None
        for step in ("incremental", "full"):
            j = s[step].get("json")
            st = j.get("stats") if isinstance(j, dict) else None
            if isinstance(st, dict) and st.get("metadata_bytes") is not None:
                md = st["metadata_bytes"]
                break
        d["metadata_bytes_stat"] = md
        for step in ("full", "incremental"):
            j = s[step].get("json")
            st = j.get("stats") if isinstance(j, dict) else None
            if isinstance(st, dict):
                for k in ("read_bytes", "new_bytes", "stored_bytes"):
                    d[f"{step}_{k}"] = st.get(k)
    return d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=bl.DEFAULT_WORK, help="work dir (default %(default)s, env VMKEEP_BENCH_WORK)")
    ap.add_argument("--vmkeep", default=bl.DEFAULT_VMKEEP, help="vmkeep binary (default %(default)s)")
    ap.add_argument("--sizes", default="64K,256K,1M,4M", help="comma list (default %(default)s)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions, medians shown (default 1)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the 1%% change (default 1)")
    ap.add_argument("--pack-dir", default="packs", help="repository folder holding pack data (default %(default)s)")
    ap.add_argument("--min-free-gib", type=float, default=20, help="free space required in --work (default 20)")
    ap.add_argument("--keep", action="store_true", help="keep the last run's work files (debugging)")
    args = ap.parse_args(argv)

    work = Path(args.work)
    tool = rb.Vmkeep(work, args.vmkeep)
    if (p := tool.check()):
        bl.die(p.replace(", or pass --skip-vmkeep", ""))
    bl.check_free_space(work, args.min_free_gib)
    man = mi.build_images(work)
    datamap = mi.load_datamap(work)
    pristine = Path(man["allocated"]["path"])
    sizes = [s for s in args.sizes.split(",") if s]

    runs = []
    for rep in range(args.reps):
        k = rep % len(sizes)
        for size in sizes[k:] + sizes[:k]:
            rec = one(tool, size, pristine, args, datamap, rep)
            rec["derived"] = derive(rec, args.pack_dir) if rec["ok"] else {}
            runs.append(rec)

    med = {}
    for size in sizes:
        ds = [r["derived"] for r in runs if r["chunk_size"] == size and r["ok"]]
        keys = sorted({k for d in ds for k in d})
        med[size] = {k: bl.median([d.get(k) for d in ds]) for k in keys}
        med[size]["failed_runs"] = sum(1 for r in runs if r["chunk_size"] == size and not r["ok"])

    size_b = man["image_size"]
    L = [f"## vmkeep chunk sizes, allocated image, {time.strftime('%Y-%m-%d %H:%M:%S %z')}", "",
         f"Medians of {args.reps} repetition(s). Change: {rb.mi.CHANGE_WRITE // 1024} KiB writes, "
         f"{len(mi.change_offsets(size_b, args.seed, datamap)) * mi.CHANGE_WRITE / bl.MiB:.0f} MiB in all.", "",
         "| chunk size | full s (MB/s) | incremental s | stored / changed | stored by incremental | "
         f"metadata (non-`{args.pack_dir}` bytes) | metadata_bytes stat | objects (files) | repo after incremental | peak RSS |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    failures = []
    for size in sizes:
        m = med[size]
        if m["failed_runs"]:
            failures.append(f"chunk size {size}: {m['failed_runs']} run(s) failed")
        fs = m.get("full_s")
        if fs is None:
            L.append(f"| {size} | **FAIL** | - | - | - | - | - | - | - | - |")
            continue
        L.append(
            f"| {size} | {fs:.2f} ({size_b / bl.MB / fs:,.0f}) | {bl.fmt_s(m.get('incremental_s'))} | "
            f"{m['stored_per_changed']:.2f}x | {bl.fmt_mb(m.get('stored_inc'))} MB | "
            f"{'no ' + args.pack_dir + '/ folder' if m.get('non_pack_bytes') is None else bl.fmt_bytes(m['non_pack_bytes'])} | "
            f"{bl.fmt_bytes(m.get('metadata_bytes_stat'))} | "
            f"{m['objects']:,.0f} | {bl.fmt_mb(m.get('repo_bytes'))} MB | {rb.fmt_mib(m.get('peak_rss_kib'))} MiB |")
    la = max((r["loadavg_before"] for r in runs if r.get("loadavg_before") is not None), default=None)
    if la is not None and la > 0.5 * (os.cpu_count() or 1):
        L += ["", f"**Warning:** 1-minute load average reached {la:.1f} before a measured run: "
              "other processes competed for the CPU; figures are inflated and noisy."]
    if failures:
        L += ["", "**FAILURES:**"] + [f"- **FAIL** {f}" for f in failures]
    L += ["", "MB = 10^6 bytes. Repository sizes count the bytes of its files (directory entries "
          "excluded). stored / changed = repository growth during the incremental / bytes "
          "changed. metadata = bytes of the repository's files outside the pack folder (indexes, "
          "manifests, keys, config); the metadata_bytes stat is vmkeep's own figure, when its backup "
          "JSON has one. peak RSS = vmkeep's own peak (GNU time), the higher of the two backups."]
    md = "\n".join(L) + "\n"
    jp, mp = bl.write_results("chunk-sizes", {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                                              "args": vars(args), "host": bl.host_info(),
                                              "version": tool.version(), "images": man, "runs": runs,
                                              "medians": med, "failures": failures}, md)
    print(md)
    bl.log(f"raw results: {jp}\ntable: {mp}")
    if failures:
        print("\n".join(f"FAIL: {f}" for f in failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
