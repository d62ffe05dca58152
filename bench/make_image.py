#!/usr/bin/env python3
"""Build (and cache) the benchmark's workload images, and apply the 1% change.

Images, in WORK/images/<VERSION>/:
  allocated.img  2 GiB raw, FULLY ALLOCATED: first filled end to end with "earlier data"
                 (concatenated real files from /usr that are NOT in the file system), then
                 `mkfs.ext4 -F -E nodiscard,lazy_itable_init=0 -d SRC`, so free blocks still
                 hold old, semi-compressible bytes, as on a disk that has been in use.
  sparse.img     the same file system (same UUID, hash seed, timestamps, hence the same
                 blocks) made by mkfs on a fresh sparse file: unused space is holes.
  datamap.json   the data extents of sparse.img: where the file system has data.
  manifest.json  what was built (written last: its presence marks a complete cache).
SRC is ~1.1 GiB of real files copied from /usr/bin, /usr/share, /usr/lib (in sorted order,
symlinks kept as symlinks, unreadable and special files skipped); it is removed after the
build unless --keep-src.

change_image(path, seed): 320 writes of 64 KiB per 2 GiB (~1% of the image) at random 4 KiB
aligned, non-overlapping offsets, new semi-compressible content, os.pwrite in place.
Deterministic per seed. run.py passes the sparse image's data map to both images, so both
get the SAME offsets, all inside blocks the file system uses ("in file data", as the peers
were measured), and the sparse image's holes stay holes.

Usage:
  python3 bench/make_image.py [--work DIR] [--force] [--keep-src]
  python3 bench/make_image.py change IMG --seed N [--datamap FILE]
"""

from __future__ import annotations

import argparse
import bisect
import fcntl
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

# Bump when anything below changes the bytes of the images.
VERSION = "v1"
IMAGE_SIZE = 2 * bl.GiB
SRC_BYTES = int(1.1 * bl.GiB)
ROOTS = ["/usr/bin", "/usr/share", "/usr/lib"]
FS_UUID = "6c1d3e2a-0d6f-4b57-9a43-5b0d2c1e7f10"
HASH_SEED = "2f5b7a64-3c1e-4d8a-9b0f-7e6d5c4b3a21"
FAKE_TIME = "1700000000"  # E2FSPROGS_FAKE_TIME: deterministic superblock/inode times
MKFS_E = "nodiscard,lazy_itable_init=0,lazy_journal_init=0,hash_seed=" + HASH_SEED

CHANGE_WRITE = 64 * 1024
CHANGE_ALIGN = 4096
WRITES_PER_2GIB = 320


def cache_dir(work: str | Path) -> Path:
    return Path(work) / "images" / VERSION


def iter_usr(roots=ROOTS):
    """Yield (path, lstat) of regular files and symlinks (and directory symlinks) under roots,
    depth first in sorted order, never following symlinks."""
    def walk(d):
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from walk(e.path)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                yield e.path, st
    for r in roots:
        yield from walk(r)


def build_src(src: Path, it, budget: int) -> dict:
    """Copy files from the iterator into src until `budget` bytes of file data."""
    total = nfiles = nlinks = skipped = 0
    for path, st in it:
        dst = src / path.lstrip("/")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(path), dst)
                nlinks += 1
            else:
                shutil.copy2(path, dst, follow_symlinks=False)
                total += st.st_size
                nfiles += 1
        except OSError:
            skipped += 1
            continue
        if total >= budget:
            break
    return {"file_bytes": total, "files": nfiles, "symlinks": nlinks, "skipped": skipped}


def fill_earlier_data(img: Path, it, size: int) -> dict:
    """Write `size` bytes of concatenated real files into img. Uses the files the iterator
    has not handed out yet (so the old bytes do not duplicate the live files); if they run
    out, starts again over all of /usr with a byte permutation per pass (keeps the
    compressibility, defeats dedup)."""
    written = 0
    passes = 0
    used_files = 0
    buf = bytearray()
    table = None
    with open(img, "wb") as f:
        while written < size:
            for path, st in it:
                if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                    continue
                try:
                    with open(path, "rb") as g:
                        data = g.read(size - written - len(buf))
                except OSError:
                    continue
                if table is not None:
                    data = data.translate(table)
                buf += data
                used_files += 1
                if len(buf) >= 16 * bl.MiB:
                    f.write(buf)
                    written += len(buf)
                    buf = bytearray()
                if written + len(buf) >= size:
                    break
            if buf:
                f.write(buf)
                written += len(buf)
                buf = bytearray()
            if written < size:
                passes += 1
                perm = list(range(256))
                random.Random(passes).shuffle(perm)
                table = bytes(perm)
                it = iter_usr()
        f.truncate(size)
    return {"bytes": written, "files": used_files, "extra_passes": passes}


def pin_atimes(src: Path) -> None:
    """mkfs -d copies atime and ctime into the inodes. Reading the tree for the first image
    would update atimes (relatime) before the second, so both images would differ in
    their inode tables. Set every atime two days into the future, once: relatime then
    leaves them alone (atime newer than mtime and ctime, and not a day old)."""
    future = (int(time.time()) + 2 * 86400) * 1_000_000_000
    for root, dirs, names in os.walk(src):
        for n in dirs + names:
            p = os.path.join(root, n)
            st = os.lstat(p)
            os.utime(p, ns=(future, st.st_mtime_ns), follow_symlinks=False)
    st = os.lstat(src)
    os.utime(src, ns=(future, st.st_mtime_ns))


def mkfs(img: Path, src: Path) -> None:
    cmd = ["mkfs.ext4", "-F", "-q", "-b", "4096", "-L", "vmkeep-bench", "-U", FS_UUID,
           "-E", MKFS_E, "-d", str(src), str(img)]
    bl.run_quiet(cmd, env={"E2FSPROGS_FAKE_TIME": FAKE_TIME})


def fill_holes_with_zeros(img: Path) -> int:
    """mke2fs may zero ranges by punching holes; write real zeros there so the image stays
    fully allocated. Returns the bytes filled."""
    size = os.path.getsize(img)
    filled = 0
    data = bl.data_extents(img)
    holes = []
    pos = 0
    for off, length in data:
        if off > pos:
            holes.append((pos, off - pos))
        pos = off + length
    if pos < size:
        holes.append((pos, size - pos))
    if holes:
        fd = os.open(img, os.O_WRONLY)
        try:
            zeros = bytes(8 * bl.MiB)
            for off, length in holes:
                end = off + length
                while off < end:
                    n = min(len(zeros), end - off)
                    os.pwrite(fd, zeros[:n], off)
                    off += n
                    filled += n
            os.fsync(fd)
        finally:
            os.close(fd)
    return filled


def _block_differs(x: bytes, y: bytes) -> bool:
    """True if x (allocated image) differs from y (sparse image) before y's trailing zeros.
    Past them, x may keep earlier data: slack mkfs never wrote (the end of a file's last
    block, the rest of a block holding a backup superblock), not file-system content."""
    n = len(y.rstrip(b"\0"))
    return x[:n] != y[:n]


def compare_on_extents(a: Path, b: Path, extents) -> int:
    """Bytes (in 4 KiB blocks) where the file system content of a and b differs inside the
    given extents of b."""
    diff = 0
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        for off, length in extents:
            end = off + length
            while off < end:
                n = min(8 * bl.MiB, end - off)
                x, y = os.pread(fa, n, off), os.pread(fb, n, off)
                if x != y:
                    diff += sum(1 for i in range(0, n, 4096)
                                if x[i:i + 4096] != y[i:i + 4096] and _block_differs(x[i:i + 4096], y[i:i + 4096])) * 4096
                off += n
    finally:
        os.close(fa)
        os.close(fb)
    return diff


def fs_info(img: Path) -> dict:
    r = bl.run_quiet(["dumpe2fs", "-h", str(img)], check=False)
    info = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    try:
        bs = int(info["Block size"])
        used = (int(info["Block count"]) - int(info["Free blocks"])) * bs
        inodes = int(info["Inode count"]) - int(info["Free inodes"])
        return {"fs_used_bytes": used, "inodes_used": inodes}
    except (KeyError, ValueError):
        return {}


def build_images(work: str | Path, force: bool = False, keep_src: bool = False) -> dict:
    """Return the manifest of the cached images, building them first if needed. A lock
    file serialises concurrent builders."""
    cdir = cache_dir(work)
    cdir.parent.mkdir(parents=True, exist_ok=True)
    with open(cdir.parent / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        return _build_images_locked(work, cdir, force, keep_src)


def _build_images_locked(work, cdir: Path, force: bool, keep_src: bool) -> dict:
    man_path = cdir / "manifest.json"
    if man_path.exists() and not force:
        man = json.loads(man_path.read_text())
        if all((cdir / n).exists() for n in ("allocated.img", "sparse.img", "datamap.json")):
            return man
    for tool in ("mkfs.ext4", "dumpe2fs"):
        if not shutil.which(tool):
            bl.die(f"{tool} not found: run scripts/install-deps.sh bench (e2fsprogs)")
    bl.check_free_space(work, 8)
    t0 = time.time()
    bl.rmtree(cdir)
    cdir.mkdir(parents=True)
    src = cdir / "src"
    src.mkdir()
    alloc, sparse = cdir / "allocated.img", cdir / "sparse.img"

    it = iter_usr()
    bl.log(f"copying ~{SRC_BYTES / bl.GiB:.1f} GiB of real files from {', '.join(ROOTS)} to {src}")
    src_info = build_src(src, it, SRC_BYTES)
    bl.log(f"  {src_info['files']} files, {src_info['symlinks']} symlinks, "
           f"{src_info['file_bytes'] / bl.GiB:.2f} GiB")

    pin_atimes(src)
    bl.log(f"filling {alloc} ({IMAGE_SIZE / bl.GiB:.0f} GiB) with earlier data")
    fill_info = fill_earlier_data(alloc, it, IMAGE_SIZE)
    bl.log("mkfs.ext4 -d on the allocated image")
    mkfs(alloc, src)
    filled = fill_holes_with_zeros(alloc)

    bl.log("mkfs.ext4 -d on a sparse image")
    with open(sparse, "wb") as f:
        f.truncate(IMAGE_SIZE)
    mkfs(sparse, src)

    datamap = bl.data_extents(sparse)
    (cdir / "datamap.json").write_text(json.dumps(datamap))
    sparse_data = sum(length for _, length in datamap)
    mismatch = compare_on_extents(alloc, sparse, datamap)
    if mismatch:
        bl.log(f"WARNING: the two images differ in {mismatch} bytes of the sparse image's data")
    st_a, st_s = os.stat(alloc), os.stat(sparse)
    if not keep_src:
        bl.rmtree(src)
    man = {
        "version": VERSION,
        "work": str(Path(work).resolve()),
        "image_size": IMAGE_SIZE,
        "roots": ROOTS,
        "src": src_info,
        "earlier_data": fill_info,
        "mkfs": {"uuid": FS_UUID, "E": MKFS_E, "fake_time": FAKE_TIME},
        "fs": fs_info(sparse),
        "allocated": {"path": str(alloc), "disk_bytes": st_a.st_blocks * 512,
                      "holes_filled_with_zeros": filled},
        "sparse": {"path": str(sparse), "disk_bytes": st_s.st_blocks * 512,
                   "data_bytes": sparse_data, "extents": len(datamap)},
        "images_differ_in_fs_data_bytes": mismatch,
        "build_seconds": round(time.time() - t0, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    man_path.write_text(json.dumps(man, indent=1) + "\n")
    bl.log(f"images ready in {man['build_seconds']} s: {cdir}")
    return man


def load_datamap(work: str | Path):
    return json.loads((cache_dir(work) / "datamap.json").read_text())


def _change_block(rng: random.Random, words: list[bytes]) -> bytes:
    """64 KiB of new content: per 4 KiB, 1.5 KiB of random bytes and 2.5 KiB of text made
    of random words. zstd -1 gets it to roughly half; no two blocks are alike."""
    out = bytearray()
    while len(out) < CHANGE_WRITE:
        out += rng.randbytes(1536)
        text = bytearray()
        while len(text) < 2560:
            text += rng.choice(words)
            text += b" " if rng.random() < 0.9 else b"\n"
        out += text[:2560]
    return bytes(out[:CHANGE_WRITE])


def change_offsets(size: int, seed, data_map=None) -> list[int]:
    n = max(1, size * WRITES_PER_2GIB // (2 * bl.GiB))
    if data_map is None:
        data_map = [[0, size]]
    # usable 4 KiB-aligned start positions per extent (the whole 64 KiB inside the extent)
    starts, cum = [], []
    total = 0
    for off, length in data_map:
        a = -(-off // CHANGE_ALIGN) * CHANGE_ALIGN
        e = min(off + length, size) // CHANGE_ALIGN * CHANGE_ALIGN
        if e - a >= CHANGE_WRITE:
            cnt = (e - a - CHANGE_WRITE) // CHANGE_ALIGN + 1
            starts.append(a)
            total += cnt
            cum.append(total)
    if total == 0:
        raise ValueError("no room for 64 KiB writes in the data map")
    rng = random.Random(f"vmkeep-bench-offsets-{seed}")
    chosen: list[int] = []
    tries = 0
    while len(chosen) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError("could not place non-overlapping writes")
        r = rng.randrange(total)
        i = bisect.bisect_right(cum, r)
        base = cum[i - 1] if i else 0
        o = starts[i] + (r - base) * CHANGE_ALIGN
        if any(abs(o - c) < CHANGE_WRITE for c in chosen):
            continue
        chosen.append(o)
    return chosen


def change_image(path, seed, data_map=None) -> int:
    """Change ~1% of the image in place: 320 x 64 KiB per 2 GiB at random 4 KiB-aligned,
    non-overlapping offsets, chosen inside `data_map` ([[offset, length]...]; default:
    the file's own data extents, i.e. the whole file for an allocated image, or for a file
    that is nearly all holes). Same seed and
    map, same offsets and bytes. Returns the number of bytes changed (written)."""
    size = os.path.getsize(path)
    if data_map is None:
        data_map = bl.data_extents(path)
        if sum(length for _, length in data_map) < 16 * CHANGE_WRITE:
            data_map = [[0, size]]  # (nearly) all holes: place writes anywhere
    offsets = change_offsets(size, seed, data_map)
    rng = random.Random(f"vmkeep-bench-content-{seed}")
    letters = b"abcdefghijklmnopqrstuvwxyz"
    words = [bytes(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(600)]
    fd = os.open(path, os.O_WRONLY)
    try:
        for o in offsets:
            os.pwrite(fd, _change_block(rng, words), o)
    finally:
        os.close(fd)
    return len(offsets) * CHANGE_WRITE


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    ap.add_argument("--work", default=bl.DEFAULT_WORK, help="work dir (default %(default)s, env VMKEEP_BENCH_WORK)")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--keep-src", action="store_true", help="keep the source directory")
    ch = sub.add_parser("change", help="apply change_image to IMG")
    ch.add_argument("img")
    ch.add_argument("--seed", type=int, default=1)
    ch.add_argument("--datamap", help="JSON [[offset,length],...] to place writes in")
    a = ap.parse_args(argv)
    if a.cmd == "change":
        dm = json.loads(Path(a.datamap).read_text()) if a.datamap else None
        print(change_image(a.img, a.seed, dm))
        return
    man = build_images(a.work, force=a.force, keep_src=a.keep_src)
    print(json.dumps(man, indent=1))


if __name__ == "__main__":
    main()
