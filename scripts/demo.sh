#!/usr/bin/env bash
# The main job end to end on the embedded default (a local repository):
# part 1: make a disk image holding a real ext4 filesystem, back it up, change files in it, back
# it up again (only the change is stored), restore both restore points and verify them;
# part 2: boot a small test VM under QEMU (TCG) that writes continuously, back it up live twice
# (the second through change tracking, with its RAM and device state), restore the latest
# restore point and prove it is an exact point-in-time image of the disk;
# part 3: the VM is gone; recover it from the restore point into a new folder: it resumes and
# continues counting exactly where it was captured; then again with --instant: it runs on the
# restore point served from the repository within about a second while its disk copies in;
# part 4: what differs between the two live restore points, a rewind of the restored image to
# the first one writing only that, and a DR site served over HTTPS (`vmkeep serve`) filled by
# replicate with an append token that cannot delete anything there.
# Usage: scripts/demo.sh [WORKDIR]   (default: a new temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
scripts/install-deps.sh test >/dev/null || { echo "demo: install the dependencies first (see above)"; exit 1; }
echo "== building vmkeep (release)"
cargo build --release --locked -p vmkeep 2>&1 | tail -1
vmkeep="${CARGO_TARGET_DIR:-$root/target}/release/vmkeep"
work=${1:-$(mktemp -d /var/tmp/vmkeep-demo.XXXXXX)}
mkdir -p "$work"; cd "$work"
export VMKEEP_REPO="$work/repo" VMKEEP_PASSWORD="demo passphrase"
rm -rf repo dr dr-site dr-site.tokens serve.out restored-first restored1 restored2 disk.raw disk-v1.raw files guest vm restored-vm recovered recovered-instant instant.json
qemu_pid=
recovered_pid=
serve_pid=
cleanup() {
  [ -z "$serve_pid" ] || kill "$serve_pid" 2>/dev/null || true
  [ -z "$qemu_pid" ] || kill -9 "$qemu_pid" 2>/dev/null || true
  [ -z "$recovered_pid" ] || kill -9 "$recovered_pid" 2>/dev/null || true
}
trap cleanup EXIT

echo "== making a 512 MiB disk image with an ext4 filesystem full of real files (/usr/share)"
mkdir files && cp -r /usr/share/doc /usr/share/man files/ 2>/dev/null || true
truncate -s 512M disk.raw
mkfs.ext4 -q -F -E nodiscard -d files disk.raw
cp --sparse=always disk.raw disk-v1.raw

echo "== vmkeep init --encrypt"
"$vmkeep" init --encrypt
echo "== first backup"
"$vmkeep" backup image --vm demo --disk vda=disk.raw

echo "== changing the filesystem: adding a file and deleting a folder (debugfs, no mount needed)"
head -c 8M /usr/bin/* 2>/dev/null | head -c 8M > newfile || true
debugfs -w -R "write newfile newfile" disk.raw >/dev/null 2>&1
debugfs -w -R "rmdir /doc/bash" disk.raw >/dev/null 2>&1 || true
echo "== second backup (reads the image, stores only what changed)"
"$vmkeep" backup image --vm demo --disk vda=disk.raw
"$vmkeep" snapshots

echo "== restoring both restore points and verifying them"
first=$("$vmkeep" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
"$vmkeep" restore "$first" --target restored1
"$vmkeep" restore demo@latest --target restored2
cmp restored1/vda.raw disk-v1.raw && echo "first restore point: byte-identical to the original image"
cmp restored2/vda.raw disk.raw && echo "latest restore point: byte-identical to the changed image"
e2fsck -fn restored2/vda.raw >/dev/null && echo "restored filesystem checks clean (e2fsck)"
debugfs -R "stat newfile" restored2/vda.raw 2>/dev/null | grep -q "Size: 8388608" && echo "the new file is in the restored filesystem"
"$vmkeep" check --read-data

echo
echo "== part 2: a running VM. Building the test guest (Debian kernel + busybox initramfs, cached)"
tests_guest="$root/tests/guest/build.sh"
bash "$tests_guest" "$work/guest" >/dev/null
mkdir -p vm
qemu-img create -q -f qcow2 vm/web1.qcow2 64M
qemu-io -f qcow2 -c "write -q -P 0x5a 0 64M" vm/web1.qcow2 >/dev/null  # old data: every byte 0x5a
echo "== booting it under QEMU (TCG) on a 64 MiB qcow2 disk full of old data (0x5a); the guest"
echo "   writes 4 KiB blocks 'SEQ i' to block (i*97) mod 16384, one after the other, each fsynced"
qemu-system-x86_64 -accel tcg -m 256 -nodefaults -display none -no-reboot \
  -serial file:vm/serial.log \
  -kernel guest/vmlinuz -initrd guest/initrd.gz \
  -append "console=ttyS0 quiet panic=-1 vmkeep.workload=seqwrite" \
  -blockdev driver=file,filename=vm/web1.qcow2,node-name=f0 \
  -blockdev driver=qcow2,file=f0,node-name=disk0 \
  -device virtio-blk-pci,drive=disk0,id=vd0 \
  -qmp unix:vm/qmp.sock,server=on,wait=off </dev/null >/dev/null &
qemu_pid=$!
# The guest prints "C i" after its write i.
progress() { { grep -o '^C [0-9]*' vm/serial.log 2>/dev/null || true; } | tail -1 | cut -c3-; }
wait_writes() { # wait until the guest has done write number $1
  local n=0
  while [ "$(progress)" = "" ] || [ "$(progress)" -lt "$1" ]; do
    kill -0 "$qemu_pid" 2>/dev/null || { echo "demo: QEMU exited"; cat vm/serial.log; exit 1; }
    n=$((n+1)); [ $n -lt 1800 ] || { echo "demo: the guest does not write"; cat vm/serial.log; exit 1; }
    sleep 0.1
  done
}
wait_writes 20
echo "   guest booted and writing (write $(progress) done)"

echo "== live backup 1 of the running VM (paused for milliseconds; the first backup reads the whole disk)"
"$vmkeep" backup vm --qmp vm/qmp.sock --vm web1
at=$(progress); wait_writes $((at + 40))
echo "== live backup 2 while it keeps writing, with its RAM and device state (--memory; change"
echo "   tracking reads only the chunks written since)"
"$vmkeep" backup vm --qmp vm/qmp.sock --vm web1 --memory --json > vm/backup2.json
python3 - vm/backup2.json <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))
for d in b["disks"]:
    print(f"   disk {d['name']}: change tracking {d['cbt']}, {d['changed_chunks']} changed chunks")
print(f"   read {b['stats']['read_bytes']} bytes (memory and changed chunks), VM paused {b['pause_ms']} ms")
EOF
echo "   the guest went on writing after the cut: write $(progress) done"
echo "== stopping the VM (QMP stop)"
python3 - vm/qmp.sock <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()  # greeting
for cmd in ("qmp_capabilities", "stop"):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while "return" not in (r := json.loads(f.readline())):
        if "error" in r: sys.exit(f"QMP {cmd}: {r}")
EOF
"$vmkeep" snapshots --vm web1

echo "== restoring web1@latest as a qcow2 image and checking it"
"$vmkeep" restore web1@latest --target restored-vm --format qcow2
qemu-img check -q restored-vm/vd0.qcow2 && echo "   restored-vm/vd0.qcow2 is a clean qcow2 image"
qemu-img convert -O raw restored-vm/vd0.qcow2 restored-vm/vd0.raw
qemu-img convert -U -O raw vm/web1.qcow2 vm/live-now.raw
python3 - restored-vm/vd0.raw vm/live-now.raw <<'EOF'
import sys
BLOCKS = 16384
def seqs(path):
    data = open(path, "rb").read()
    assert len(data) == BLOCKS * 4096, f"{path}: size {len(data)}"
    seen = set()
    for b in range(BLOCKS):
        blk = data[b * 4096:(b + 1) * 4096]
        if blk == b"\x5a" * 4096:
            continue  # old data
        head = blk[:15].decode("ascii", "replace")
        if not (head.startswith("SEQ ") and head.endswith("\n") and head[4:14].isdigit()):
            sys.exit(f"{path}: block {b} is neither old data nor a SEQ block: {head!r}")
        j = int(head[4:14])
        if (j * 97) % BLOCKS != b or any(blk[15:]):
            sys.exit(f"{path}: SEQ {j} found in block {b}")
        seen.add(j)
    return seen
restored = seqs(sys.argv[1])
k = len(restored) - 1
if restored != set(range(k + 1)):
    missing = sorted(set(range(max(restored) + 1)) - restored)
    sys.exit(f"restored disk: SEQ blocks with a gap (max {max(restored)}, missing {missing[:10]})")
live = seqs(sys.argv[2])
print(f"   restored disk holds SEQ 0..{k}, every one, nothing newer: K = {k}")
print(f"   (the VM's own disk has gone on to SEQ {max(live)} since the cut)")
print("   restored disk is an exact point-in-time image")
open("restored-vm/k", "w").write(str(k))
EOF
kill -9 "$qemu_pid" 2>/dev/null || true; wait "$qemu_pid" 2>/dev/null || true; qemu_pid=

echo
echo "== part 3: the VM is gone. vmkeep recover web1@latest --target recovered"
echo "   (disks, boot files and definition into a new folder, QEMU started in the background,"
echo "   RAM and device state streamed from the repository; no network unless --network)"
"$vmkeep" recover web1@latest --target recovered --accel tcg --json > recovered.json
recovered_pid=$(python3 -c 'import json; print(json.load(open("recovered.json"))["pid"])')
n=0
until [ "$(grep -c '^C ' recovered/serial.log 2>/dev/null || true)" -ge 3 ]; do
  n=$((n+1)); [ $n -lt 600 ] || { echo "demo: the recovered VM prints nothing"; cat recovered/qemu.log; exit 1; }
  sleep 0.1
done
python3 - recovered/serial.log restored-vm/k <<'EOF'
import sys
log = open(sys.argv[1]).read()
k = int(open(sys.argv[2]).read())
first = int([l for l in log.splitlines() if l.startswith("C ")][0][2:])
print(f"   the captured disk holds SEQ 0..{k}; the recovered VM's first line is 'C {first}'")
assert first in (k, k + 1), "it does not continue from the capture"
assert "VMKEEP READY" not in log, "it booted instead of resuming"
print("   it resumed where it was captured (no boot banner) and keeps writing")
EOF
kill -9 "$recovered_pid" 2>/dev/null || true; recovered_pid=

echo "== vmkeep recover web1@latest --target recovered-instant --instant: QEMU resumes at once on"
echo "   the restore point served from the repository (NBD); the disks copy into the folder meanwhile"
t0=$(date +%s.%N)
"$vmkeep" recover web1@latest --target recovered-instant --accel tcg --instant --json > instant.json &
instant_cmd=$!
n=0
until [ "$(cat recovered-instant/serial.log 2>/dev/null | grep -c '^C ')" -ge 1 ]; do
  n=$((n+1)); [ $n -lt 1200 ] || { echo "demo: the instantly recovered VM prints nothing"; exit 1; }
  sleep 0.05
done
t1=$(date +%s.%N)
recovered_pid=$(head -1 instant.json | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["pid"])')
wait "$instant_cmd"
t2=$(date +%s.%N)
python3 - "$t0" "$t1" "$t2" <<'PY'
import sys
t0, t1, t2 = map(float, sys.argv[1:])
print(f"   the guest's first serial line {t1 - t0:.2f} s after the command; disks copied after {t2 - t0:.2f} s")
PY
qemu-img info -U recovered-instant/vd0.qcow2 | grep -q "backing file" \
  && { echo "demo: the copied disk still has a backing file"; exit 1; }
echo "   recovered-instant/vd0.qcow2 is a standalone local disk now; the VM runs on without vmkeep"
kill -9 "$recovered_pid" 2>/dev/null || true; recovered_pid=

echo
echo "== part 4: what changed between the two live restore points, a rewind, a DR replica"
read -r first last < <("$vmkeep" snapshots --vm web1 --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s[0]["id"], s[-1]["id"])')
"$vmkeep" diff "$first" "$last" --disk vd0 --json | python3 -c 'import json,sys
d = json.load(sys.stdin)["disks"][0]
print("   vmkeep diff: %d bytes in %d extents differ on vd0 (exact, from the two indexes)" % (d["changed_bytes"], len(d["extents"])))'
echo "   vmkeep restore $first --disk vd0 --onto restored-vm/vd0.qcow2 (rewind in place)"
"$vmkeep" restore "$first" --disk vd0 --onto restored-vm/vd0.qcow2 --json | python3 -c 'import json,sys
r = json.load(sys.stdin)
how = "it held the later point, so only the difference was written" if r["from"] else "compared chunk by chunk"
print("   read %d bytes of the image, wrote %d (%s)" % (r["bytes_read"], r["bytes_written"], how))'
"$vmkeep" restore "$first" --target restored-first --format qcow2 >/dev/null
qemu-img compare -q restored-vm/vd0.qcow2 restored-first/vd0.qcow2 \
  && echo "   the rewound image is identical to a full restore of $first"
echo "== a DR site: vmkeep serve over HTTPS (self-signed certificate, pinned by fingerprint)"
"$vmkeep" --json serve --listen 127.0.0.1:0 --dir "$work/dr-site" --tokens "$work/dr-site.tokens" >serve.out 2>serve.log &
serve_pid=$!
for _ in $(seq 100); do [ -s serve.out ] && break; sleep 0.1; done
read -r addr fp < <(python3 -c 'import json; s=json.load(open("serve.out")); print(s["listen"], s["fingerprint"])')
echo "   listening on https://$addr, certificate fingerprint $fp"
admin=$("$vmkeep" token add --tokens "$work/dr-site.tokens" --vms '*' --rights admin 2>/dev/null)
push=$("$vmkeep" token add --tokens "$work/dr-site.tokens" --vms web1 --rights append 2>/dev/null)
dr="https://$addr/dr"
VMKEEP_TOKEN=$admin "$vmkeep" --repo "$dr" --tls-fingerprint "$fp" init --replica-of "$work/repo" >/dev/null
echo "   the DR site's admin made the replica; this host pushes with an append token for web1 only"
export VMKEEP_TLS_FINGERPRINT=$fp
VMKEEP_TOKEN=$push "$vmkeep" replicate --to "$dr" --vm web1 --dry-run | tail -1 | sed 's/^/   before: /'
VMKEEP_TOKEN=$push "$vmkeep" replicate --to "$dr" --vm web1 | sed 's/^/   /'
VMKEEP_TOKEN=$push "$vmkeep" replicate --to "$dr" --vm web1 | sed 's/^/   again: /'
if VMKEEP_TOKEN=$push "$vmkeep" --repo "$dr" forget "$first" 2>forget.err; then
  echo "   ERROR: an append token deleted a restore point at the DR site"; exit 1
fi
echo "   an append token cannot delete: $(cat forget.err)"
VMKEEP_TOKEN=$admin "$vmkeep" --repo "$dr" check | sed 's/^/   DR site: /'
unset VMKEEP_TLS_FINGERPRINT
"$vmkeep" check
echo "== demo finished; everything is in $work"
