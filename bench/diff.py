#!/usr/bin/env python3
"""`vmkeep diff` on a 1 TiB sparse disk with 50 restore points (issue 8).

A sparse raw image of --size (default 1 TiB) gets --points restore points (`vmkeep backup image`,
encrypted repository, 64 KiB chunks); before each one after the first, --change bytes (default
4 MiB) are rewritten, in two runs: `scattered` (64 KiB pieces at random chunk-aligned places, the
worst case for metadata: every piece its own index leaf) and `contiguous` (one run at a random
chunk-aligned place, as file systems mostly write). Then, per run:
  diff      `vmkeep diff P1 P50 --json`, wall time of the command (median of --rounds), and
            `examples/diff_bench` in one process: Repository::diff (the tree walk) against a
            brute-force comparison of the two full indexes (every chunk id of both looked up),
            medians, and whether they agree;
  metadata  per restore point: stats.metadata_bytes (manifest, tree nodes, index entries) of
            every backup after the first; target at most 1 MiB.
Target: the tree walk at least 100x faster than brute force.

Usage: python3 bench/diff.py [--size 1T] [--points 50] [--change 4M] [--rounds 5]
Needs: cargo build --release -p vmkeep && cargo build --release -p vmkeep-repo --example diff_bench
Writes bench/out/diff-<timestamp>.json and .md. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

CHUNK = 64 << 10
ENV = {"VMKEEP_PASSWORD": bl.PASSWORD}
DIFF_BENCH = bl.REPO_ROOT / "target" / "release" / "examples" / "diff_bench"


def size_arg(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def one_run(args, pattern: str) -> dict:
    d = Path(args.work) / "diff"
    bl.rmtree(d)
    d.mkdir(parents=True)
    repo, img = d / "repo", d / "disk.img"
    bl.run_quiet([args.vmkeep, "--repo", str(repo), "init", "--encrypt", "--json"], env=ENV)
    with open(img, "wb") as f:
        f.truncate(args.size)
    rng = random.Random(args.seed)
    chunks = args.size // CHUNK
    ids, meta = [], []
    t0 = time.monotonic()
    for p in range(args.points):
        with open(img, "r+b") as f:
            if pattern == "scattered" or p == 0:
                for _ in range(args.change // CHUNK if p > 0 else 16):
                    f.seek(rng.randrange(chunks) * CHUNK)
                    f.write(rng.randbytes(CHUNK))
            else:
                f.seek(rng.randrange(chunks - args.change // CHUNK) * CHUNK)
                f.write(rng.randbytes(args.change))
        res = bl.run_quiet([args.vmkeep, "--repo", str(repo), "backup", "image", "--vm", "big",
                            "--disk", f"vda={img}", "--json"], env=ENV)
        doc = json.loads(res.stdout)
        ids.append(doc["id"])
        meta.append(doc["stats"]["metadata_bytes"])
        if (p + 1) % 10 == 0:
            bl.log(f"{pattern}: {p + 1}/{args.points} restore points ({time.monotonic() - t0:.0f} s)")
    walls = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        res = bl.run_quiet([args.vmkeep, "--repo", str(repo), "diff", ids[0], ids[-1], "--json"], env=ENV)
        walls.append(time.perf_counter() - t)
    out = json.loads(res.stdout)
    bench = json.loads(bl.run_quiet([str(DIFF_BENCH), str(repo), ids[0], ids[-1], str(args.rounds)],
                                    env=ENV).stdout)
    bl.rmtree(d)
    return {"pattern": pattern, "diff_wall_s": bl.median(walls),
            "diff_changed_bytes": out["disks"][0]["changed_bytes"],
            "diff_extents": len(out["disks"][0]["extents"]), "bench": bench,
            "ratio": bench["brute_ms"] / max(bench["tree_ms"], 1e-6), "metadata_bytes": meta}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=size_arg, default=1 << 40)
    ap.add_argument("--points", type=int, default=50)
    ap.add_argument("--change", type=size_arg, default=4 << 20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default=bl.DEFAULT_WORK)
    ap.add_argument("--vmkeep", default=bl.DEFAULT_VMKEEP)
    ap.add_argument("--seed", type=int, default=8)
    args = ap.parse_args(argv)
    for p in (args.vmkeep, DIFF_BENCH):
        if not os.access(p, os.X_OK):
            bl.die(f"{p} missing: cargo build --release -p vmkeep && "
                   "cargo build --release -p vmkeep-repo --example diff_bench")
    rows = [one_run(args, pattern) for pattern in ("scattered", "contiguous")]
    md = [f"## vmkeep diff benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %z')}", "",
          f"Disk {bl.fmt_bytes(args.size)} sparse ({args.size // CHUNK} chunks of 64 KiB), "
          f"{args.points} restore points, {bl.fmt_bytes(args.change)} rewritten before each; "
          f"encrypted repository. Brute force: every chunk id of both full indexes looked up, "
          f"index by index (examples/diff_bench, same process, nodes decrypted as diff does).", "",
          f"| pattern | diff P1 -> P{args.points}: tree walk ms | brute force ms | ratio | agree | "
          f"`vmkeep diff` wall s | changed | extents | metadata per point median / max |",
          "|---|---|---|---|---|---|---|---|---|"]
    ok = True
    for r in rows:
        b = r["bench"]
        later = r["metadata_bytes"][1:]
        md.append(f"| {r['pattern']} | {b['tree_ms']:.2f} | {b['brute_ms']:.1f} | {r['ratio']:.0f}x | "
                  f"{b['agree']} | {r['diff_wall_s']:.3f} | {bl.fmt_bytes(r['diff_changed_bytes'])} | "
                  f"{r['diff_extents']} | {bl.fmt_bytes(bl.median(later))} / {bl.fmt_bytes(max(later))} |")
    md += ["", "Targets:"]
    for r in rows:
        later = r["metadata_bytes"][1:]
        checks = [(r["ratio"] >= 100, f"diff at least 100x faster than brute force ({r['ratio']:.0f}x)"),
                  (max(later) <= 1 << 20, f"metadata per restore point at most 1 MiB (max {bl.fmt_bytes(max(later))})"),
                  (r["bench"]["agree"], "the tree walk and brute force agree")]
        for good, what in checks:
            ok &= good
            md.append(f"- {'PASS' if good else 'MISS'} ({r['pattern']}): {what}")
    rec = {"args": vars(args), "runs": rows, "host": bl.host_info()}
    text = "\n".join(md)
    jp, mp = bl.write_results("diff", rec, text)
    print(text)
    bl.log(f"raw results: {jp}\ntable: {mp}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
