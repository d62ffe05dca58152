#!/usr/bin/env python3
"""What a backup costs as the repository grows to 10 TiB (issue 9, "memory and start-up cost
that do not grow with the repository").

A plain repository gets a real full backup of a 2 GiB image of random data, then synthetic
index entries up to each --scales point (TiB of unique data at 64 KiB chunks: 16 Mi entries
per TiB; `examples/synthetic_index` writes index objects exactly as a backup does, for packs
that are never written). At each scale, with the local cache in --work:
  cold       `backup image` of the unchanged image right after the growth: the cache reads the
             new index objects into a run (once per host); nothing is read from the image
  start-up   the same again, warm: listing, cache catalog, GC records, lease, manifest
  1% change  20 MiB rewritten at scattered 64 KiB places, then `backup image`: the whole image
             is read and every chunk looked up in the 10 TiB index
  check      `check` (every index object read again and verified, every restore point walked,
             the index joined with the referenced ids in id order from the cache's runs)
  prune      `prune --dry-run` (mark, then the condemn and sweep passes over the same join),
             then `prune` itself (the same passes, and a GC record written and swept)
and, at the first scale only (it loads every index entry into memory, so at 10 TiB it would
need ~60 GB): the warm unchanged backup with `--no-cache`.
The first --referenced-tib TiB of synthetic entries (default 1: 16 Mi chunks) are also a
restore point's disk (their packs sparse files, the disk's index tree real), so check and prune
walk and join a referenced set of that size.
Targets: backup < 512 MiB peak RSS and < 5 s start-up at 10 TiB; check and prune --dry-run
< 4 GiB peak RSS at 10 TiB (and prune itself).

Usage: python3 bench/scale.py [--scales 1,10] [--work DIR]
Needs: cargo build --release -p vmkeep && cargo build --release -p vmkeep-repo --example synthetic_index
Writes bench/out/scale-<timestamp>.json and .md. Python 3.11 standard library only.
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
ENTRIES_PER_TIB = (1 << 40) // CHUNK
SYNTH = bl.REPO_ROOT / "target" / "release" / "examples" / "synthetic_index"


def vmkeep(args, repo, *rest, cache=True):
    cmd = [args.vmkeep, "--repo", str(repo), "--quiet"]
    cmd += ["--cache-dir", str(Path(args.work) / "scale" / "cache")] if cache else ["--no-cache"]
    return cmd + list(rest)


def timed(args, repo, *rest, cache=True, label=""):
    r = bl.run_timed(vmkeep(args, repo, *rest, cache=cache), label=label)
    if r["rc"] != 0:
        bl.die(f"{label} failed: {r['stderr'][-1500:]}")
    return {"seconds": r["seconds"], "maxrss_mib": r["maxrss_kib"] / 1024, "cpu_s": r["cpu_s"]}


def change_image(img: Path, rng: random.Random, fraction: float) -> None:
    size = img.stat().st_size
    with open(img, "r+b") as f:
        for _ in range(int(size * fraction) // CHUNK):
            f.seek(rng.randrange(size // CHUNK) * CHUNK)
            f.write(rng.randbytes(CHUNK))


def cache_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1,10", help="TiB of unique data, ascending")
    ap.add_argument("--image-gib", type=int, default=2)
    ap.add_argument("--work", default=bl.DEFAULT_WORK)
    ap.add_argument("--vmkeep", default=bl.DEFAULT_VMKEEP)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--referenced-tib", type=float, default=1.0,
                    help="TiB of the synthetic entries a restore point references (at most the first scale)")
    args = ap.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    for p in (args.vmkeep, SYNTH):
        if not os.access(p, os.X_OK):
            bl.die(f"{p} missing: cargo build --release -p vmkeep && "
                   "cargo build --release -p vmkeep-repo --example synthetic_index")
    if (problem := bl.gnu_time_problem()):
        bl.die(problem)
    # Index objects ~46 B/entry, a run 53 B/entry, its partitions as much again while built.
    bl.check_free_space(args.work, max(scales) * ENTRIES_PER_TIB * 160 / bl.GiB + 3 * args.image_gib + 4)
    d = Path(args.work) / "scale"
    bl.rmtree(d)
    d.mkdir(parents=True)
    repo, img = d / "repo", d / "disk.img"
    rng = random.Random(args.seed)
    bl.run_quiet([args.vmkeep, "--repo", str(repo), "init", "--json"])
    bl.log(f"writing a {args.image_gib} GiB image of random data")
    with open(img, "wb") as f:
        for _ in range(args.image_gib * 1024):
            f.write(rng.randbytes(1 << 20))
    backup = ["backup", "image", "--vm", "bench", "--disk", f"vda={img}", "--json"]
    full = timed(args, repo, *backup, label="full backup")
    bl.log(f"full backup: {full['seconds']:.1f} s")
    rows, have = [], 0
    for i, tib in enumerate(scales):
        want = int(tib * ENTRIES_PER_TIB)
        t = time.perf_counter()
        synth = [str(SYNTH), str(repo), str(want - have), str(args.seed * 1000 + i)]
        if i == 0:
            synth.append(str(int(min(args.referenced_tib, tib) * ENTRIES_PER_TIB)))
        out = bl.run_quiet(synth).stdout
        bl.log(f"{tib:g} TiB: {out.strip()} in {time.perf_counter() - t:.0f} s")
        have = want
        row = {"tib": tib, "entries": want,
               "index_bytes": bl.tree_usage(repo / "index")["file_bytes"]}
        row["cold"] = timed(args, repo, *backup, label="cold")
        bl.log(f"{tib:g} TiB cold: {row['cold']}")
        row["startup"] = timed(args, repo, *backup, label="start-up")
        change_image(img, rng, 0.01)
        row["changed"] = timed(args, repo, *backup, label="1% change")
        bl.log(f"{tib:g} TiB start-up {row['startup']}, 1% change {row['changed']}")
        row["cache_bytes"] = cache_bytes(d / "cache")
        if i == 0:
            row["no_cache"] = timed(args, repo, *backup, cache=False, label="no cache")
            bl.log(f"{tib:g} TiB no cache {row['no_cache']}")
        row["check"] = timed(args, repo, "check", "--json", label="check")
        row["prune_dry_run"] = timed(args, repo, "prune", "--keep-last", "100", "--dry-run",
                                     "--json", label="prune --dry-run")
        row["prune"] = timed(args, repo, "prune", "--keep-last", "100", "--json", label="prune")
        bl.log(f"{tib:g} TiB check {row['check']}, prune --dry-run {row['prune_dry_run']}, "
               f"prune {row['prune']}")
        rows.append(row)
    bl.rmtree(d)

    def cell(m):
        return f"{m['seconds']:.2f} s, {m['maxrss_mib']:.0f} MiB" if m else "-"

    md = [f"## Backup cost as the repository grows, {time.strftime('%Y-%m-%d %H:%M:%S %z')}", "",
          f"Plain repository, 64 KiB chunks, local cache; a {args.image_gib} GiB image of random data "
          f"(full backup {full['seconds']:.1f} s, {full['maxrss_mib']:.0f} MiB); synthetic index entries "
          f"(16 Mi per TiB of unique data), of which {args.referenced_tib:g} TiB "
          f"({int(args.referenced_tib * ENTRIES_PER_TIB / 1e6)} M chunks) are referenced by a "
          f"synthetic restore point. Each cell: wall time, peak RSS (GNU time).", "",
          "| unique data | index entries | index objects | cache on disk | cold (cache update) | "
          "start-up (unchanged, warm) | 1% changed | unchanged, --no-cache | check | prune --dry-run | "
          "prune |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['tib']:g} TiB | {r['entries'] / 1e6:.0f} M | {bl.fmt_bytes(r['index_bytes'])} | "
                  f"{bl.fmt_bytes(r['cache_bytes'])} | {cell(r['cold'])} | {cell(r['startup'])} | "
                  f"{cell(r['changed'])} | {cell(r.get('no_cache'))} | {cell(r.get('check'))} | "
                  f"{cell(r.get('prune_dry_run'))} | {cell(r.get('prune'))} |")
    last = rows[-1]
    checks = [(last["changed"]["maxrss_mib"] < 512,
               f"backup at {last['tib']:g} TiB under 512 MiB ({last['changed']['maxrss_mib']:.0f} MiB)"),
              (last["startup"]["seconds"] < 5,
               f"start-up at {last['tib']:g} TiB under 5 s ({last['startup']['seconds']:.2f} s)"),
              (last["check"]["maxrss_mib"] < 4096,
               f"check at {last['tib']:g} TiB under 4 GiB ({last['check']['maxrss_mib']:.0f} MiB)"),
              (last["prune_dry_run"]["maxrss_mib"] < 4096,
               f"prune --dry-run at {last['tib']:g} TiB under 4 GiB "
               f"({last['prune_dry_run']['maxrss_mib']:.0f} MiB)"),
              (last["prune"]["maxrss_mib"] < 4096,
               f"prune at {last['tib']:g} TiB under 4 GiB ({last['prune']['maxrss_mib']:.0f} MiB)")]
    md += ["", "Targets:"] + [f"- {'PASS' if ok else 'MISS'}: {what}" for ok, what in checks]
    text = "\n".join(md)
    jp, mp = bl.write_results("scale", {"args": vars(args), "full": full, "rows": rows,
                                        "host": bl.host_info()}, text)
    print(text)
    bl.log(f"raw results: {jp}\ntable: {mp}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
