#!/usr/bin/env python3
"""An HTTP/1.1 proxy in front of an S3 server (Garage, moto) that makes it a worse network:
it adds latency to every request, answers some with `503 SlowDown` (S3's throttling reply)
without passing them on, and cuts some replies off half-way. It counts requests and bytes, so
benchmarks can report what a tool sent. Signatures stay valid: requests are passed on byte for
byte, Host header included (path-style addressing).

Usage: s3-fault-proxy.py --listen PORT --upstream HOST:PORT [--delay-ms 20] [--jitter-ms 0]
                         [--fail-rate 0.0] [--cut-rate 0.0] [--fail-every N] [--cut-every N]
                         [--seed 1] [--stats FILE]
(--fail-every N answers every Nth request 503, --cut-every N cuts every Nth reply that has a
body: deterministic faults for tests, besides the random rates.)
It prints "listening PORT" once ready. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time

SLOWDOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
            b"<Message>Please reduce your request rate. (s3-fault-proxy)</Message></Error>")


class Stats:
    def __init__(self, path: str | None):
        self.path = path
        self.lock = threading.Lock()
        self.data = {"requests": 0, "by_method": {}, "bytes_up": 0, "bytes_down": 0,
                     "answered_503": 0, "cut": 0}
        self.last_write = 0.0
        self.seen = 0
        self.bodies = 0

    def next_request(self) -> int:
        with self.lock:
            self.seen += 1
            return self.seen

    def next_body(self) -> int:
        with self.lock:
            self.bodies += 1
            return self.bodies

    def add(self, method: str, up: int, down: int, failed=False, cut=False):
        with self.lock:
            d = self.data
            d["requests"] += 1
            d["by_method"][method] = d["by_method"].get(method, 0) + 1
            d["bytes_up"] += up
            d["bytes_down"] += down
            d["answered_503"] += failed
            d["cut"] += cut
            self.write_locked()

    def write_locked(self):
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


def read_head(f) -> bytes | None:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = f.readline(65537)
        if not line:
            return None if not head else head
        head += line
        if len(head) > 1 << 20:
            raise ValueError("header too large")
    return head


def headers_of(head: bytes) -> dict:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            out[k.strip().lower().decode()] = v.strip().decode()
    return out


def read_body(f, h: dict, *, response_to_head=False, status=0, until_close_ok=False) -> tuple[bytes, bool]:
    """The body as it came (chunked bodies verbatim); and whether the connection must close."""
    if response_to_head or status in (204, 304) or 100 <= status < 200:
        return b"", False
    if h.get("transfer-encoding", "").lower() == "chunked":
        raw = b""
        while True:
            size_line = f.readline(1024)
            raw += size_line
            n = int(size_line.split(b";")[0].strip() or b"0", 16)
            if n == 0:
                while True:  # trailers, then the empty line
                    t = f.readline(65537)
                    raw += t
                    if t in (b"\r\n", b""):
                        return raw, False
            raw += f.read(n + 2)
    if "content-length" in h:
        return f.read(int(h["content-length"])), False
    if until_close_ok:
        return f.read(), True
    return b"", False


def serve(client: socket.socket, args, stats: Stats, rng: random.Random, rng_lock: threading.Lock):
    host, port = args.upstream.rsplit(":", 1)
    up = None
    cf = client.makefile("rb")
    try:
        while True:
            head = read_head(cf)
            if not head:
                return
            h = headers_of(head)
            method = head.split(b" ", 1)[0].decode()
            body, _ = read_body(cf, h)
            with rng_lock:
                delay = (args.delay_ms + rng.uniform(0, args.jitter_ms)) / 1000
                fail = rng.random() < args.fail_rate
                cut = rng.random() < args.cut_rate
            n = stats.next_request()
            fail = fail or (args.fail_every > 0 and n % args.fail_every == 0)
            time.sleep(delay)
            if fail:
                reply = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                         b"Content-Length: " + str(len(SLOWDOWN)).encode() + b"\r\n\r\n" + SLOWDOWN)
                client.sendall(reply)
                stats.add(method, len(head) + len(body), len(reply), failed=True)
                continue
            if up is None:
                up = socket.create_connection((host, int(port)))
                uf = up.makefile("rb")
            up.sendall(head + body)
            rhead = read_head(uf)
            if not rhead:
                return
            status = int(rhead.split(b" ", 2)[1])
            rh = headers_of(rhead)
            rbody, close = read_body(uf, rh, response_to_head=(method == "HEAD"), status=status,
                                     until_close_ok=True)
            if len(rbody) > 1 and args.cut_every > 0 and stats.next_body() % args.cut_every == 0:
                cut = True
            if cut and len(rbody) > 1:
                client.sendall(rhead + rbody[: len(rbody) // 2])
                stats.add(method, len(head) + len(body), len(rhead) + len(rbody) // 2, cut=True)
                return
            client.sendall(rhead + rbody)
            stats.add(method, len(head) + len(body), len(rhead) + len(rbody))
            if close or rh.get("connection", "").lower() == "close" \
                    or h.get("connection", "").lower() == "close":
                return
    except (OSError, ValueError):
        return
    finally:
        client.close()
        if up is not None:
            up.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=int, default=0)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--delay-ms", type=float, default=20)
    ap.add_argument("--jitter-ms", type=float, default=0)
    ap.add_argument("--fail-rate", type=float, default=0.0)
    ap.add_argument("--cut-rate", type=float, default=0.0)
    ap.add_argument("--fail-every", type=int, default=0)
    ap.add_argument("--cut-every", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stats")
    args = ap.parse_args()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.listen))
    srv.listen(256)
    stats = Stats(args.stats)
    with stats.lock:
        stats.write_locked()
    rng, rng_lock = random.Random(args.seed), threading.Lock()
    print(f"listening {srv.getsockname()[1]}", flush=True)
    while True:
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(c, args, stats, rng, rng_lock), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
