#!/usr/bin/env python3
"""Recompute docs/FORMAT.md's known-answer vectors with independent code (Python's blake3 and
cryptography packages, not vmkeep's Rust), as a second implementation would, and compare them
with the table in FORMAT.md. Needs: pip install blake3 cryptography (>= 44, for Argon2id).
Run from anywhere: python3 scripts/format_vectors.py"""
import pathlib, sys
import blake3, struct, datetime
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
m = bytes(range(64)); idk, dk = m[:32], m[32:]
P = b"vmkeep test vector"
out = {}
out["data blob id, plain"] = blake3.blake3(P).hexdigest()
out["data blob id, encrypted"] = blake3.blake3(P, key=idk).hexdigest()
node = b"\x00" + struct.pack("<H", 2) + blake3.blake3(P).digest() + b"\x00"*32
out["tree node id, plain"] = blake3.blake3(node, derive_key_context="vmkeep 2026-11 tree node v1").hexdigest()
tk = blake3.blake3(idk, derive_key_context="vmkeep 2026-11 tree id key v1").digest()
out["tree node id, encrypted"] = blake3.blake3(node, key=tk).hexdigest()
ts = int(datetime.datetime(2026,11,2,3,4,5,tzinfo=datetime.timezone.utc).timestamp())
inp = b"vmkeep 2026-11 config v2" + struct.pack("<I", 2) + bytes(range(16)) + struct.pack("<IBI", 65536, 1, 16<<20) + struct.pack("<qI", ts, 123456789)
out["config mac input"] = inp.hex()
mk = blake3.blake3(m, derive_key_context="vmkeep 2026-11 config mac v1").digest()
out["config mac"] = blake3.blake3(inp, key=mk).hexdigest()
nonce = bytes(range(0x40, 0x58))
def seal(aad, pt):
    sub = blake3.blake3(nonce[:16], key=dk).digest()
    return (nonce + AESGCM(sub).encrypt(nonce[16:] + b"\0"*4, pt, aad)).hex()
out['sealed (aad "vmkeep aad")'] = seal(b"vmkeep aad", P)
out["stored data blob"] = seal(b"\x00" + blake3.blake3(P, key=idk).digest(), b"\x00" + P)
salt = bytes(range(0x60, 0x70)); wn = bytes(range(0x70, 0x7c))
kek = Argon2id(salt=salt, length=32, iterations=1, lanes=1, memory_cost=64).derive(b"correct horse battery staple")
out["key-encryption key"] = kek.hex()
aad = b"vmkeep 2026-11 key wrap v2" + b"\x13" + struct.pack("<III", 64, 1, 1) + salt
out["key wrap aad"] = aad.hex()
wrapped = wn + AESGCM(kek).encrypt(wn, m, aad)
out["wrapped"] = wrapped.hex()
out["key file checksum"] = blake3.blake3(aad + wrapped).hexdigest()

fmt = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md").read_text()
table = fmt.split("<!-- known-answer vectors: begin -->")[1].split("<!-- known-answer vectors: end -->")[0]
doc = {}
for line in table.splitlines():
    cells = [c.strip().strip("`") for c in line.split("|")]
    if len(cells) == 4 and line.startswith("| `"):
        doc[cells[1]] = cells[2]
bad = [k for k, v in out.items() if doc.get(k) != v]
for k in bad:
    print(f"MISMATCH {k}:\n  FORMAT.md {doc.get(k)}\n  computed  {out[k]}")
print(f"{len(out) - len(bad)} of {len(out)} vectors match FORMAT.md")
sys.exit(1 if bad else 0)
