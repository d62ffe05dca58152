#!/usr/bin/env python3
"""vmkeep on S3-compatible object storage against a local folder and against restic (issue 9).

A 3-node Garage cluster on loopback (replication factor 3, from scripts/install-deps.sh
servers) holds one bucket per run. On the benchmark's 2 GiB allocated image (make_image.py),
each target gets, in one run: init, a full backup, the 1% change and an incremental backup,
a backup of the unchanged image, and a restore of the latest point. Targets:
  vmkeep local     a folder on the same disk as Garage's data
  vmkeep garage    s3://BUCKET, straight to Garage
  restic garage    s3:http://.../BUCKET, straight to Garage
and the two Garage targets again through scripts/s3-fault-proxy.py adding --latency-ms to
every request (the proxy also counts requests and bytes: those columns come from there).
Both tools encrypt. Targets: vmkeep to Garage within 1.5x of vmkeep to a folder, at most 0.5x
restic's time to the same store; the unchanged backup under 100 requests.

Usage: python3 bench/s3.py [--latency-ms 20] [--work DIR]
Needs: cargo build --release -p vmkeep; scripts/install-deps.sh bench (restic, Garage).
Writes bench/out/s3-<timestamp>.json and .md. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
import make_image as mi  # noqa: E402

KEY_ID = "GK0123456789abcdef01234567"
SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
TEST_CACHE = Path(os.environ.get("VMKEEP_TEST_CACHE")
                  or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmkeep-test")
GARAGE = TEST_CACHE / "garage" / "bin" / "garage"
PROXY = bl.REPO_ROOT / "scripts" / "s3-fault-proxy.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    t = time.monotonic()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() - t > 30:
                bl.die(f"{what} did not start")
            time.sleep(0.05)


class Garage:
    """Three nodes on loopback, as crates/vmkeep-testkit/src/s3.rs lays them out."""

    def __init__(self, root: Path, nodes: int = 3):
        self.root, self.procs, self.configs = root, [], []
        secret = hashlib.sha256(str(root).encode()).hexdigest()
        ports = []
        for i in range(nodes):
            d = root / f"node{i}"
            d.mkdir(parents=True)
            rpc, s3, admin = free_port(), free_port(), free_port()
            ports.append((rpc, s3))
            cfg = d / "garage.toml"
            cfg.write_text(
                f'metadata_dir = "{d}/meta"\ndata_dir = "{d}/data"\ndb_engine = "sqlite"\n'
                f'replication_factor = {nodes}\nconsistency_mode = "consistent"\n'
                f'metadata_fsync = false\ndata_fsync = false\n'
                f'rpc_bind_addr = "127.0.0.1:{rpc}"\nrpc_public_addr = "127.0.0.1:{rpc}"\n'
                f'rpc_secret = "{secret}"\nbootstrap_peers = []\n\n[s3_api]\ns3_region = "garage"\n'
                f'api_bind_addr = "127.0.0.1:{s3}"\nroot_domain = ".s3.garage.localhost"\n\n'
                f'[admin]\napi_bind_addr = "127.0.0.1:{admin}"\n')
            self.configs.append(cfg)
            log = open(d / "garage.log", "ab")
            p = subprocess.Popen([GARAGE, "-c", cfg, "server"], stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=log, env={**os.environ, "RUST_LOG": "garage=warn"})
            self.procs.append(p)
            wait_port(s3, p, "garage")
        self.port = ports[0][1]
        ids = [self.cli("node", "id", "-q", node=i).strip().split("@")[0] for i in range(nodes)]
        for i in range(1, nodes):
            self.cli("node", "connect", f"{ids[i]}@127.0.0.1:{ports[i][0]}")
        for i, nid in enumerate(ids):
            self.cli("layout", "assign", "-z", f"z{i}", "-c", "10G", nid[:16])
        self.cli("layout", "apply", "--version", "1")
        self.cli("key", "import", "--yes", "-n", "bench", KEY_ID, SECRET)

    def cli(self, *args, node=0) -> str:
        t = time.monotonic()
        while True:
            r = subprocess.run([GARAGE, "-c", self.configs[node], *args], capture_output=True, text=True)
            if r.returncode == 0:
                return r.stdout
            if time.monotonic() - t > 30:
                bl.die(f"garage {' '.join(args)}: {r.stderr}")
            time.sleep(0.3)

    def bucket(self, name: str) -> None:
        self.cli("bucket", "create", name)
        self.cli("bucket", "allow", "--read", "--write", "--owner", name, "--key", "bench")

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


class Proxy:
    def __init__(self, upstream_port: int, latency_ms: float, stats: Path):
        self.stats_path = stats
        self.proc = subprocess.Popen([sys.executable, PROXY, "--upstream", f"127.0.0.1:{upstream_port}",
                                      "--delay-ms", str(latency_ms), "--stats", stats],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        self.port = int(line.split()[1])

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def s3_env(port: int) -> dict:
    return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "garage",
            "AWS_DEFAULT_REGION": "garage", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}


def run_target(args, work: Path, name: str, tool: str, repo: str, env: dict, img: Path,
               datamap, proxy: Proxy | None) -> dict:
    """init, full, 1% change + incremental, unchanged, restore: seconds (and proxy counts)."""
    bl.copy_image(args.image, img)
    out = work / f"restore-{name}"
    steps = {}

    def step(label, cmd):
        before = proxy.stats() if proxy else None
        r = bl.run_timed(cmd, env=env, label=f"{name} {label}")
        if r["rc"] != 0:
            bl.die(f"{name} {label} failed: {r['stderr'][-1500:]}")
        rec = {"seconds": r["seconds"], "maxrss_mib": r["maxrss_kib"] / 1024}
        if proxy:
            after = proxy.stats()
            rec["requests"] = after["requests"] - before["requests"]
            rec["bytes_up"] = after["bytes_up"] - before["bytes_up"]
            rec["bytes_down"] = after["bytes_down"] - before["bytes_down"]
        steps[label] = rec
        bl.log(f"{name} {label}: {rec}")

    if tool == "vmkeep":
        base = [args.vmkeep, "--repo", repo, "--quiet"]
        backup = base + ["backup", "image", "--vm", "bench", "--disk", f"vda={img}", "--json"]
        step("init", base + ["init", "--encrypt", "--json"])
        step("full", backup)
        mi.change_image(img, args.seed, datamap)
        step("incremental", backup)
        step("unchanged", backup)
        step("restore", base + ["restore", "bench@latest", "--target", out, "--json"])
        restored = out / "vda.raw"
    else:
        base = ["restic", "-r", repo]
        backup = base + ["backup", "--host", "bench", "-q", img]
        step("init", base + ["init"])
        step("full", backup)
        mi.change_image(img, args.seed, datamap)
        step("incremental", backup)
        step("unchanged", backup)
        step("restore", base + ["restore", "latest", "--target", out, "-q"])
        restored = next(p for p in out.rglob(img.name))
    steps["exact"] = bl.files_identical(restored, img)
    bl.rmtree(out)
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--work", default=bl.DEFAULT_WORK)
    ap.add_argument("--vmkeep", default=bl.DEFAULT_VMKEEP)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    for p, hint in ((args.vmkeep, "cargo build --release -p vmkeep"),
                    (str(GARAGE), "scripts/install-deps.sh servers")):
        if not os.access(p, os.X_OK):
            bl.die(f"{p} missing: {hint}")
    if (problem := bl.gnu_time_problem()):
        bl.die(problem)
    work = Path(args.work) / "s3"
    bl.rmtree(work)
    work.mkdir(parents=True)
    bl.check_free_space(work, 20)
    man = mi.build_images(args.work)
    datamap = mi.load_datamap(args.work)
    args.image = Path(man["allocated"]["path"])
    garage = Garage(work / "garage")
    rows = {}
    try:
        secrets = {"VMKEEP_PASSWORD": bl.PASSWORD, "RESTIC_PASSWORD": bl.PASSWORD}
        img = work / "disk.img"
        plans = [("vmkeep local", "vmkeep", None), ("vmkeep garage", "vmkeep", 0),
                 ("restic garage", "restic", 0),
                 (f"vmkeep garage +{args.latency_ms:g} ms", "vmkeep", args.latency_ms),
                 (f"restic garage +{args.latency_ms:g} ms", "restic", args.latency_ms)]
        for i, (name, tool, latency) in enumerate(plans):
            env = {**secrets, "VMKEEP_CACHE_DIR": str(work / f"cache-{i}"),
                   "RESTIC_CACHE_DIR": str(work / f"restic-cache-{i}")}
            proxy = None
            if latency is None:
                repo = str(work / "local-repo")
            else:
                bucket = f"bench-{i}"
                garage.bucket(bucket)
                port = garage.port
                if latency:
                    proxy = Proxy(garage.port, latency, work / f"proxy-{i}.json")
                    port = proxy.port
                env.update(s3_env(port))
                repo = f"s3://{bucket}" if tool == "vmkeep" else f"s3:http://127.0.0.1:{port}/{bucket}"
            try:
                rows[name] = run_target(args, work, f"t{i}", tool, repo, env, img, datamap, proxy)
            finally:
                if proxy:
                    proxy.stop()
    finally:
        garage.stop()
    bl.rmtree(work)

    def cell(r, k):
        s = r[k]
        extra = f", {s['requests']} req, {bl.fmt_bytes(s['bytes_up'])} sent" if "requests" in s else ""
        return f"{s['seconds']:.2f} s{extra}"

    md = [f"## vmkeep on object storage, {time.strftime('%Y-%m-%d %H:%M:%S %z')}", "",
          "2 GiB allocated benchmark image, 1% change (make_image.py); Garage 2.5.0, 3 nodes on "
          "loopback, replication factor 3; both tools encrypted; one run. Requests and bytes sent "
          "are counted by the latency proxy.", "",
          "| target | full | incremental (1%) | unchanged | restore | restore exact |",
          "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {cell(r, 'full')} | {cell(r, 'incremental')} | {cell(r, 'unchanged')} | "
                  f"{cell(r, 'restore')} | {r['exact']} |")
    lat = f" +{args.latency_ms:g} ms"

    def ratio(a, b, k):
        return rows[a][k]["seconds"] / rows[b][k]["seconds"]

    checks = []
    for k in ("full", "incremental", "restore"):
        x = ratio("vmkeep garage", "vmkeep local", k)
        checks.append((x <= 1.5, f"{k}: vmkeep to Garage {x:.2f}x of vmkeep to a folder (target <= 1.5x)"))
        for suffix in ("", lat):
            y = ratio("vmkeep garage" + suffix, "restic garage" + suffix, k)
            checks.append((y <= 0.5, f"{k}{suffix}: vmkeep {y:.2f}x of restic's time to Garage (target <= 0.5x)"))
    req = rows["vmkeep garage" + lat]["unchanged"]["requests"]
    checks.append((req < 100, f"unchanged 2 GiB backup: {req} requests (target < 100)"))
    checks.append((all(r["exact"] for r in rows.values()), "every restore is exact"))
    md += ["", "Targets:"] + [f"- {'PASS' if ok else 'MISS'}: {what}" for ok, what in checks]
    text = "\n".join(md)
    jp, mp = bl.write_results("s3", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                     "host": bl.host_info()}, text)
    print(text)
    bl.log(f"raw results: {jp}\ntable: {mp}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
