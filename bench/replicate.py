#!/usr/bin/env python3
"""`vmkeep replicate` to a local replica and to a `vmkeep serve` replica over loopback HTTPS,
against `restic copy` and vmkeep's own backup rate (issue 8).

On the benchmark's cached 2 GiB fully allocated image (make_image.py, shared with run.py):
  full      `vmkeep backup image` into an encrypted repository (the local backup rate), then
            `init --replica-of` and `replicate --to` of that restore point: seconds, bytes sent,
            and the replication's speed over the backup's (target >= 0.8);
  change    the 1% change of make_image.py, a backup, and `replicate` of that one restore
            point: bytes sent over what the backup stored (target <= 1.1);
  https     the same two replications to a replica served by `vmkeep serve` on 127.0.0.1
            (self-signed certificate pinned by fingerprint, an append token);
  restic    the same two steps with restic: `backup` into repository A, `copy` to B
            (`--from-repo`), both encrypted; seconds of each copy.

Usage: python3 bench/replicate.py [--work DIR]
Needs: cargo build --release -p vmkeep; restic. Writes bench/out/replicate-<timestamp>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
import make_image  # noqa: E402

ENV = {"VMKEEP_PASSWORD": bl.PASSWORD}


def vk(args, repo, label):
    res = bl.run_timed([args.vmkeep, "--repo", str(repo), *label[1:], "--json"], env=ENV, label=label[0])
    if res["rc"] != 0:
        raise RuntimeError(f"{label[0]} failed")
    return res, bl.parse_json_stdout(res)


def restic(repo, cmd, label, extra_env=None):
    env = {"RESTIC_PASSWORD": bl.PASSWORD, "RESTIC_CACHE_DIR": str(Path(repo).parent / "cache"),
           **(extra_env or {})}
    res = bl.run_timed(["restic", "-r", str(repo), *cmd], env=env, label=label)
    if res["rc"] != 0:
        raise RuntimeError(f"{label} failed")
    return res


class Server:
    """`vmkeep serve` on 127.0.0.1 (any port) for the HTTPS runs; stopped by close()."""

    def __init__(self, vmkeep, d):
        self.vmkeep, self.tokens = vmkeep, d / "tokens.json"
        self.proc = subprocess.Popen([vmkeep, "--json", "serve", "--listen", "127.0.0.1:0", "--dir",
                                      str(d / "srv"), "--tokens", str(self.tokens)],
                                     stdout=subprocess.PIPE, text=True)
        start = json.loads(self.proc.stdout.readline())
        self.addr, self.fingerprint = start["listen"], start["fingerprint"]

    def token(self, vms, rights):
        out = subprocess.run([self.vmkeep, "--json", "token", "add", "--tokens", str(self.tokens),
                              "--vms", vms, "--rights", rights], check=True, capture_output=True, text=True)
        return json.loads(out.stdout)["token"]

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=bl.DEFAULT_WORK)
    ap.add_argument("--vmkeep", default=bl.DEFAULT_VMKEEP)
    args = ap.parse_args(argv)
    if not shutil.which("restic"):
        bl.die("restic not found (scripts/install-deps.sh bench)")
    built = make_image.build_images(args.work)
    src_img = Path(make_image.cache_dir(args.work)) / "allocated.img"
    d = Path(args.work) / "replicate"
    bl.rmtree(d)
    d.mkdir(parents=True)
    img = d / "disk.img"
    bl.copy_image(src_img, img)
    size = img.stat().st_size
    src, dst = d / "src", d / "dst"
    vk(args, src, ["init", "init", "--encrypt"])
    b1, j1 = vk(args, src, ["backup", "backup", "image", "--vm", "bench", "--disk", f"vda={img}"])
    vk(args, dst, ["init replica", "init", "--replica-of", str(src)])
    r1, k1 = vk(args, src, ["replicate full", "replicate", "--to", str(dst)])
    # The same replications to a served replica over loopback HTTPS (append token).
    srv = Server(args.vmkeep, d)
    try:
        url = f"https://{srv.addr}/dst"
        pin = ["--tls-fingerprint", srv.fingerprint]
        ENV["VMKEEP_TOKEN"] = srv.token("*", "admin")
        vk(args, url, ["https init replica", *pin, "init", "--replica-of", str(src)])
        ENV["VMKEEP_TOKEN"] = srv.token("*", "append")
        h1, hk1 = vk(args, src, ["https replicate full", *pin, "replicate", "--to", url])
        make_image.change_image(img, 1)
        ENV.pop("VMKEEP_TOKEN")
        b2, j2 = vk(args, src, ["backup (1%)", "backup", "image", "--vm", "bench", "--disk", f"vda={img}"])
        r2, k2 = vk(args, src, ["replicate 1%", "replicate", "--to", str(dst)])
        ENV["VMKEEP_TOKEN"] = srv.token("*", "append")
        h2, hk2 = vk(args, src, ["https replicate 1%", *pin, "replicate", "--to", url])
    finally:
        ENV.pop("VMKEEP_TOKEN", None)
        srv.close()

    # restic: the same data, backup then copy between two local repositories.
    rimg = d / "restic.img"
    bl.copy_image(src_img, rimg)
    ra, rb = d / "restic-a", d / "restic-b"
    restic(ra, ["init"], "restic init A")
    restic(rb, ["init"], "restic init B")
    from_env = {"RESTIC_FROM_PASSWORD": bl.PASSWORD}
    rs1 = restic(ra, ["backup", "-q", "--host", "bench", str(rimg)], "restic backup")
    rc1 = restic(rb, ["copy", "--from-repo", str(ra), "-q"], "restic copy full", from_env)
    make_image.change_image(rimg, 1)
    rs2 = restic(ra, ["backup", "-q", "--host", "bench", str(rimg)], "restic backup (1%)")
    rc2 = restic(rb, ["copy", "--from-repo", str(ra), "-q"], "restic copy 1%", from_env)

    speed = b1["seconds"] / r1["seconds"]
    hspeed = b1["seconds"] / h1["seconds"]
    ratio = k2["bytes_sent"] / j2["stats"]["stored_bytes"]
    hratio = hk2["bytes_sent"] / j2["stats"]["stored_bytes"]
    rec = {"size": size, "image": built, "vmkeep": {
        "backup_s": b1["seconds"], "replicate_s": r1["seconds"], "bytes_sent_full": k1["bytes_sent"],
        "backup2_s": b2["seconds"], "replicate2_s": r2["seconds"], "bytes_sent_1pct": k2["bytes_sent"],
        "stored_1pct": j2["stats"]["stored_bytes"], "speed_vs_backup": speed, "sent_vs_stored": ratio,
        "https_replicate_s": h1["seconds"], "https_bytes_sent_full": hk1["bytes_sent"],
        "https_replicate2_s": h2["seconds"], "https_bytes_sent_1pct": hk2["bytes_sent"],
        "https_speed_vs_backup": hspeed, "https_sent_vs_stored": hratio},
        "restic": {"backup_s": rs1["seconds"], "copy_s": rc1["seconds"], "backup2_s": rs2["seconds"],
                   "copy2_s": rc2["seconds"]},
        "host": bl.host_info()}
    mb = lambda b: b / 1e6  # noqa: E731
    md = [f"## vmkeep replicate benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %z')}", "",
          f"2 GiB fully allocated image (make_image.py), encrypted repositories, local folders, "
          f"load {bl.loadavg()}.", "",
          "| | backup s | replicate / copy s | MB/s of the image | sent | 1% change: backup s | replicate / copy s | sent |",
          "|---|---|---|---|---|---|---|---|",
          f"| vmkeep | {b1['seconds']:.2f} | {r1['seconds']:.2f} | {mb(size) / r1['seconds']:.0f} | "
          f"{mb(k1['bytes_sent']):.0f} MB | {b2['seconds']:.2f} | {r2['seconds']:.2f} | "
          f"{mb(k2['bytes_sent']):.1f} MB (the backup stored {mb(j2['stats']['stored_bytes']):.1f} MB) |",
          f"| vmkeep over HTTPS (loopback) | | {h1['seconds']:.2f} | {mb(size) / h1['seconds']:.0f} | "
          f"{mb(hk1['bytes_sent']):.0f} MB | | {h2['seconds']:.2f} | {mb(hk2['bytes_sent']):.1f} MB |",
          f"| restic {(bl.tool_version(['restic', 'version']) or '').split(' compiled')[0].removeprefix('restic ')} | {rs1['seconds']:.2f} | "
          f"{rc1['seconds']:.2f} | {mb(size) / rc1['seconds']:.0f} | | {rs2['seconds']:.2f} | "
          f"{rc2['seconds']:.2f} | |", "",
          "Targets:",
          f"- {'PASS' if speed >= 0.8 else 'MISS'}: replication of a full point at >= 80% of local "
          f"backup speed, local ({speed:.2f}x: backup {b1['seconds']:.2f} s, replicate {r1['seconds']:.2f} s)",
          f"- {'PASS' if hspeed >= 0.8 else 'MISS'}: the same over loopback HTTPS ({hspeed:.2f}x: "
          f"replicate {h1['seconds']:.2f} s; `restic copy` between local folders {rc1['seconds']:.2f} s, "
          f"{rc1['seconds'] / h1['seconds']:.1f}x slower)",
          f"- {'PASS' if ratio <= 1.1 else 'MISS'}: after a 1% change, bytes sent <= 1.1x what the "
          f"backup stored, local ({ratio:.2f}x) and over HTTPS ({hratio:.2f}x)"]
    text = "\n".join(md)
    jp, mp = bl.write_results("replicate", rec, text)
    print(text)
    bl.log(f"raw results: {jp}\ntable: {mp}")
    bl.rmtree(d)
    return 0 if min(speed, hspeed) >= 0.8 and max(ratio, hratio) <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
