#!/usr/bin/env bash
# Builds vmkeep's tiny test guest: a Debian cloud kernel + a busybox initramfs whose /init
# loads the virtio modules and runs a workload chosen on the kernel command line.
#
# Usage: tests/guest/build.sh [OUTDIR]
#   Prints the directory holding `vmlinuz` and `initrd.gz`. The result is cached in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/vmkeep-guest/<hash of this script>/ so reruns are instant;
#   with OUTDIR the two files are also copied there.
#
# Kernel command line (besides console=ttyS0):
#   vmkeep.workload=seqwrite  loop i=0,1,2...: write a 4 KiB block "SEQ %010d" (zero padded)
#                             to block (i*97) mod N of /dev/vda, then (if present) of /dev/vdb,
#                             each with dd conv=sync,fsync; then print "C i" to the console.
#                             N = blocks of the smaller disk. Point-in-time images must contain
#                             SEQ 0..K without gaps, and vdb's K is vda's K or one less.
#   vmkeep.workload=idle      print "IDLE" and sleep.
#   vmkeep.count=M            stop seqwrite after M writes and print "DONE" (default: forever).
#   vmkeep.workload=randwrite prints "RANDWRITE WAIT", waits for a line on /dev/ttyS0 (the host
#                             sends one through a socket chardev), then writes M (vmkeep.count,
#                             default 16) 64 KiB extents of /dev/urandom data to /dev/vda at
#                             64 KiB-aligned offsets x>>4 mod (extents of vda), x from the LCG
#                             x = (x*1103515245 + 12345) mod 2^31 started at vmkeep.seed (default
#                             1), each with dd conv=notrunc,fsync; prints "RANDWRITE START" after
#                             the line and "RANDWRITE DONE M" at the end.
#   vmkeep.workload=memfill   fills RAM for the memory benchmark (bench/memory_capture.py):
#                             mounts a tmpfs on /fill and writes vmkeep.fill MiB (default: half
#                             of MemTotal) of /dev/urandom data to /fill/data (distinct, non-zero
#                             pages), prints "MEMFILL DONE fill=F cs=T" (T: centiseconds it
#                             took), then rewrites that file forever, vmkeep.step MiB (default 1)
#                             at a time, sweeping it from start to end: each step copies the
#                             data one page (4 KiB) further on over it (dd), so the pages stay
#                             non-zero and (but for one more copy of the last page per sweep)
#                             distinct, while every page of the fill is written again each
#                             sweep. Every >= 10 cs of /proc/uptime it prints "MW n cs KiB": line
#                             number, centiseconds since the previous line, KiB written
#                             meanwhile (the guest's own memory-write rate). A line "off" on the
#                             second serial port (/dev/ttyS1, when the VM has one) pauses the
#                             writes (the guest then only sleeps), "on" resumes them; each is
#                             acknowledged with "MEMFILL off" / "MEMFILL on" on the console.
#   vmkeep.workload=diskboot  boots from the disk as firmware would: the first 4 KiB block of
#                             /dev/vda must start with "#!vmkeep-boot"; the block (up to its
#                             NUL bytes removed) then runs as a shell script, after "VMKEEP BOOT
#                             vda". Otherwise it prints "VMKEEP BOOT FAILED: no boot record on
#                             /dev/vda" and stops there (sleeps), as a PC without a bootable
#                             disk would.
# Every workload prints "VMKEEP READY" once the disks are visible.
# A guest-agent stand-in answers on the virtio-serial port org.qemu.guest_agent.0 when the VM
# has one: "guest-sync" (with its id) and "guest-ping", one JSON command per line, as
# qemu-guest-agent would; anything else gets a CommandNotFound error.
#
# Needs: apt-get (download only, no root), dpkg-deb, busybox-static, cpio, gzip, sha256sum.
set -euo pipefail

script="$(readlink -f "${BASH_SOURCE[0]}")"
hash="$(sha256sum "$script" | cut -c1-16)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vmkeep-guest/$hash"
out="${1:-}"

publish() {
  if [ -n "$out" ]; then
    mkdir -p "$out"
    cp "$cache/vmlinuz" "$cache/initrd.gz" "$out/"
  fi
  echo "$cache"
}

if [ -f "$cache/vmlinuz" ] && [ -f "$cache/initrd.gz" ]; then
  publish
  exit 0
fi

for tool in apt-get dpkg-deb cpio gzip; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool missing: run scripts/install-deps.sh" >&2; exit 1; }
done
busybox="$(command -v busybox || true)"
if [ -z "$busybox" ] || ! { ldd "$busybox" 2>&1 || true; } | grep -q "not a dynamic executable"; then
  echo "build.sh: a static busybox is needed (package busybox-static): run scripts/install-deps.sh" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Kernel: the package linux-image-cloud-amd64 depends on.
resolve() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
pkg="$(resolve)"
if [ -z "$pkg" ] && [ "$(id -u)" -eq 0 ]; then
  # A fresh machine may have no package index yet.
  apt-get update -qq >/dev/null 2>&1 || true
  pkg="$(resolve)"
fi
[ -n "$pkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
if ! (cd "$work" && apt-get download "$pkg" >"$work/apt.log" 2>&1); then
  cat "$work/apt.log" >&2
  echo "build.sh: apt-get download $pkg failed" >&2
  exit 1
fi
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/k"
kver="$(ls "$work/k/lib/modules")"
moddir="$work/k/lib/modules/$kver/kernel"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules,tmp}
cp "$busybox" "$root/bin/busybox"

# Modules in load order (virtio_ring before virtio: the other order fails with "Unknown symbol").
mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
      scsi_common scsi_mod virtio_scsi virtio_console"
: > "$root/lib/modules/order"
for m in $mods; do
  f="$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -1)"
  if [ -z "$f" ]; then
    # Built into this kernel: nothing to load.
    continue
  fi
  case "$f" in
    *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
  echo "$m" >> "$root/lib/modules/order"
done

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || echo "VMKEEP insmod $m failed"
done
workload=idle
count=-1
seed=1
fill=
step=1
for a in $(cat /proc/cmdline); do
  case "$a" in
    vmkeep.workload=*) workload="${a#vmkeep.workload=}" ;;
    vmkeep.count=*) count="${a#vmkeep.count=}" ;;
    vmkeep.seed=*) seed="${a#vmkeep.seed=}" ;;
    vmkeep.fill=*) fill="${a#vmkeep.fill=}" ;;
    vmkeep.step=*) step="${a#vmkeep.step=}" ;;
  esac
done
# Wait (briefly) for the first disk.
n=0
while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
echo "VMKEEP READY workload=$workload disks=$(ls /sys/block | tr '\n' ' ')"

# The guest-agent stand-in (no udev: the port's name is in sysfs).
for port in /sys/class/virtio-ports/*; do
  [ -f "$port/name" ] && [ "$(cat "$port/name")" = org.qemu.guest_agent.0 ] || continue
  dev="/dev/${port##*/}"
  # One open for both directions: a port can be open only once.
  ( while true; do
      { while read -r line <&3; do
          case "$line" in
            *guest-sync*)
              id="$(echo "$line" | sed -n 's/.*"id" *: *\([0-9]*\).*/\1/p')"
              echo "{\"return\": ${id:-0}}" >&3 ;;
            *guest-ping*) echo '{"return": {}}' >&3 ;;
            *) echo '{"error": {"class": "CommandNotFound", "desc": "vmkeep test agent"}}' >&3 ;;
          esac
        done; } 3<>"$dev"
      sleep 0.2
    done ) &
done

blocks_of() { echo $(( $(cat /sys/block/$1/size) / 8 )); }

case "$workload" in
  seqwrite)
    disks=vda
    [ -b /dev/vdb ] && disks="vda vdb"
    nblk=$(blocks_of vda)
    if [ -b /dev/vdb ] && [ "$(blocks_of vdb)" -lt "$nblk" ]; then nblk=$(blocks_of vdb); fi
    i=0
    while [ "$count" -lt 0 ] || [ "$i" -lt "$count" ]; do
      blk=$(( (i * 97) % nblk ))
      for d in $disks; do
        printf 'SEQ %010d\n' "$i" | dd of=/dev/$d bs=4096 seek=$blk conv=sync,fsync 2>/dev/null \
          || echo "VMKEEP write $d $i failed"
      done
      echo "C $i"
      i=$((i+1))
    done
    echo "DONE"
    ;;
  randwrite)
    [ "$count" -lt 0 ] && count=16
    next=$(( $(cat /sys/block/vda/size) / 128 ))
    echo "RANDWRITE WAIT count=$count seed=$seed extents=$next"
    read -r go < /dev/ttyS0
    echo "RANDWRITE START"
    x=$seed
    i=0
    while [ "$i" -lt "$count" ]; do
      x=$(( (x * 1103515245 + 12345) % 2147483648 ))
      off=$(( (x >> 4) % next ))
      dd if=/dev/urandom of=/dev/vda bs=65536 count=1 seek=$off conv=notrunc,fsync 2>/dev/null \
        || echo "VMKEEP randwrite $i failed"
      i=$((i+1))
    done
    echo "RANDWRITE DONE $count"
    ;;
  memfill)
    # Centiseconds of uptime (/proc/uptime: "12345.67 ..."; "1${x}-100" keeps "05" decimal),
    # read without a subshell: a fork costs milliseconds under TCG.
    now_cs() { read -r up _ < /proc/uptime; cs=$(( ${up%.*} * 100 + 1${up#*.} - 100 )); }
    [ -n "$fill" ] || fill=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 2048 ))
    mkdir -p /fill
    mount -t tmpfs -o size=$(( fill + 4 ))m tmpfs /fill
    now_cs
    t0=$cs
    dd if=/dev/urandom of=/fill/data bs=1M count="$fill" 2>/dev/null || echo "VMKEEP memfill failed"
    now_cs
    echo on > /tmp/memfill.ctl
    if [ -c /dev/ttyS1 ]; then
      stty -F /dev/ttyS1 -echo 2>/dev/null
      ( while read -r c; do
          case "$c" in on|off) echo "$c" > /tmp/memfill.ctl; echo "MEMFILL $c" ;; esac
        done < /dev/ttyS1 ) &
    fi
    echo "MEMFILL DONE fill=$fill cs=$(( cs - t0 ))"
    n=0
    at=0
    kib=0
    last=$cs
    while true; do
      read -r mode < /tmp/memfill.ctl
      if [ "$mode" = off ]; then
        sleep 0.2
        now_cs
        last=$cs
        kib=0
        continue
      fi
      dd if=/fill/data of=/fill/data bs=$(( step * 1048576 )) count=1 seek=$(( at / step )) \
        skip=$(( at * 1048576 + 4096 )) iflag=skip_bytes conv=notrunc 2>/dev/null \
        || echo "VMKEEP memfill write failed"
      at=$(( at + step ))
      [ "$at" -lt "$fill" ] || at=0
      kib=$(( kib + step * 1024 ))
      now_cs
      if [ $(( cs - last )) -ge 10 ]; then
        n=$(( n + 1 ))
        echo "MW $n $(( cs - last )) $kib"
        last=$cs
        kib=0
      fi
    done
    ;;
  diskboot)
    head -c 4096 /dev/vda | tr -d '\000' > /tmp/boot.sh
    if [ "$(head -c 13 /tmp/boot.sh)" = "#!vmkeep-boot" ]; then
      echo "VMKEEP BOOT vda"
      sh /tmp/boot.sh
    else
      echo "VMKEEP BOOT FAILED: no boot record on /dev/vda"
    fi
    ;;
  idle)
    echo "IDLE"
    ;;
  *)
    echo "VMKEEP unknown workload $workload"
    ;;
esac
while true; do sleep 3600; done
INIT
chmod +x "$root/init"

mkdir -p "$cache.tmp.$$"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$cache.tmp.$$/initrd.gz"
cp "$work/k/boot/vmlinuz-$kver" "$cache.tmp.$$/vmlinuz"
echo "$kver" > "$cache.tmp.$$/kernel-version"
cp "$root/lib/modules/order" "$cache.tmp.$$/modules"
mkdir -p "$(dirname "$cache")"
rm -rf "$cache"
mv "$cache.tmp.$$" "$cache"
publish
