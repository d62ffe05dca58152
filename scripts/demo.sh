#!/usr/bin/env bash
# The main job end to end on the embedded default (a local repository):
# make a disk image holding a real ext4 filesystem, back it up, change files in it, back it up
# again (only the change is stored), restore both restore points and verify them.
# Usage: scripts/demo.sh [WORKDIR]   (default: a new temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
scripts/install-deps.sh test >/dev/null || { echo "demo: install the dependencies first (see above)"; exit 1; }
echo "== building vmkeep (release)"
cargo build --release --locked -p vmkeep 2>&1 | tail -1
vmkeep="$root/target/release/vmkeep"
work=${1:-$(mktemp -d /var/tmp/vmkeep-demo.XXXXXX)}
mkdir -p "$work"; cd "$work"
export VMKEEP_REPO="$work/repo" VMKEEP_PASSWORD="demo passphrase"
rm -rf repo restored1 restored2 disk.raw disk-v1.raw files

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
echo "== demo finished; everything is in $work"
