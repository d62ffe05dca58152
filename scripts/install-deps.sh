#!/usr/bin/env bash
# Installs what vmkeep's demo, tests and benchmarks need on Debian 12 (bookworm).
# QEMU 10 comes from bookworm-backports (qemu-utils 10 is already on the machine image);
# the backports source reuses the URI of the existing bookworm entry, never a hard-coded host.
# `bench` also builds rustic (the Rust implementation of restic's repository format) once with
# `cargo install`, into a cache outside the checkout that later runs reuse:
#   ${VMKEEP_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmkeep-bench}/rustic/bin/rustic
# (build files in .../rustic/build; RUSTIC_VERSION pins the version, default below).
# `servers` (and `bench`, `all`) provides the two S3 servers the object-storage tests and
# benchmarks run against, cached outside the checkout so later runs start them in seconds:
#   Garage (a real distributed store; `cargo install garage`, ~12 min once):
#     ${VMKEEP_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmkeep-test}/garage/bin/garage
#   moto[server] (an S3 imitation with correct conditional writes; a Python venv, ~1 min once):
#     .../vmkeep-test/moto/bin/moto_server
# Usage: scripts/install-deps.sh [test|servers|bench|all]   (default: test)
set -euo pipefail
what="${1:-test}"
rustic_version="${RUSTIC_VERSION:-0.11.4}"
garage_version="${GARAGE_VERSION:-2.5.0}"
moto_version="${MOTO_VERSION:-5.2.5}"
bench_cache="${VMKEEP_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmkeep-bench}"
test_cache="${VMKEEP_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmkeep-test}"

# Builds Garage into the test cache unless that version is already there.
install_garage() {
  local root="$test_cache/garage"
  if [ -x "$root/bin/garage" ] && "$root/bin/garage" --version 2>/dev/null | grep -qF ":$garage_version "; then
    echo "install-deps: garage $garage_version present in $root"
    return 0
  fi
  command -v cargo >/dev/null || { echo "install-deps: cargo not found; garage is built with cargo install" >&2; exit 1; }
  echo "install-deps: building garage $garage_version into $root (once; about 12 minutes on 2 cores)"
  mkdir -p "$root"
  CARGO_TARGET_DIR="$root/build" nice -n 10 cargo install garage --locked --version "$garage_version" --root "$root"
  rm -rf "$root/build"
}

# moto's S3 server in its own virtual environment in the test cache.
install_moto() {
  local root="$test_cache/moto"
  if [ -x "$root/bin/moto_server" ] && "$root/bin/python" -c "import moto,sys; sys.exit(moto.__version__ != '$moto_version')" 2>/dev/null; then
    echo "install-deps: moto $moto_version present in $root"
    return 0
  fi
  echo "install-deps: installing moto[server] $moto_version into $root"
  rm -rf "$root"
  python3 -m venv "$root"
  "$root/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$moto_version"
}

install_servers() {
  case "$what" in servers|bench|all) ;; *) return 0 ;; esac
  install_garage
  install_moto
}

# Builds rustic into the cache unless that version is already there (no root needed).
install_rustic() {
  case "$what" in bench|all) ;; *) return 0 ;; esac
  local root="$bench_cache/rustic"
  if [ -x "$root/bin/rustic" ] && "$root/bin/rustic" --version 2>/dev/null | grep -qF " $rustic_version"; then
    echo "install-deps: rustic $rustic_version present in $root"
    return 0
  fi
  command -v cargo >/dev/null || { echo "install-deps: cargo not found; rustic is built with cargo install" >&2; exit 1; }
  echo "install-deps: building rustic $rustic_version into $root (once; several minutes)"
  mkdir -p "$root"
  CARGO_TARGET_DIR="$root/build" nice -n 10 cargo install rustic-rs --locked --version "$rustic_version" --root "$root"
}
# libvirt (9.0 from bookworm; the daemons are started by the libvirt tests themselves, since
# machines without systemd never start them): the `backup vm --libvirt` tests and benchmark.
pkgs=(e2fsprogs cpio busybox-static libnbd-bin qemu-utils zstd python3 python3-venv strace iproute2 systemd
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu)
case "$what" in
  test) ;;
  servers) install_servers; exit 0 ;;
  bench|all) pkgs+=(restic borgbackup time virtnbdbackup) ;;
  *) echo "usage: $0 [test|servers|bench|all]" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
need_qemu=0
if ! command -v qemu-system-x86_64 >/dev/null || ! qemu-system-x86_64 --version | grep -q "version 10"; then need_qemu=1; fi

if [ ${#missing[@]} -eq 0 ] && [ $need_qemu -eq 0 ]; then echo "install-deps: packages present"; install_rustic; install_servers; exit 0; fi

src=/etc/apt/sources.list.d/debian.sources
bpo=/etc/apt/sources.list.d/vmkeep-backports.sources
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: not root; run as root:" >&2
  echo "  sudo $0 $what" >&2
  echo "  (needs: ${missing[*]} ${need_qemu:+qemu-system-x86 from bookworm-backports})" >&2
  exit 1
fi
if [ $need_qemu -eq 1 ] && [ ! -f "$bpo" ]; then
  uri=$(awk '/^URIs:/{u=$2} /^Suites:/{ for(i=2;i<=NF;i++) if ($i=="bookworm") {print u; exit} }' "$src" 2>/dev/null || true)
  if [ -z "$uri" ]; then uri=$(awk '$1=="deb" && $3=="bookworm"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true); fi
  [ -n "$uri" ] || { echo "install-deps: cannot find the bookworm apt source to derive a backports entry from" >&2; exit 1; }
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" > "$bpo"
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
[ ${#missing[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${missing[@]}"
[ $need_qemu -eq 0 ] || apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
install_rustic
install_servers
echo "install-deps: done"
