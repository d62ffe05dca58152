#!/usr/bin/env bash
# Runs vmkeep's whole test suite: installs what the tests need (QEMU 10, qemu-utils, nbdinfo,
# busybox, cpio, e2fsprogs, libvirt; Garage and moto for the object-storage tests), checks formatting and lints (rustfmt, clippy with warnings as
# errors), builds, then runs every test. Prints the time of each phase.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { printf '\n=== %s ===\n' "$1"; PHASE_START=$(date +%s); }
done_phase() { echo "=== $1 took $(( $(date +%s) - PHASE_START )) s ==="; }

phase "install"
scripts/install-deps.sh test
done_phase "install"

phase "S3 test servers (Garage, moto: built once, then cached)"
scripts/install-deps.sh servers
done_phase "S3 test servers"

phase "lint"
# rustup's minimal profile has neither tool; the default profile has both.
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
done_phase "lint"

phase "build"
cargo build --workspace --all-targets --locked
done_phase "build"

phase "test"
# Test binaries run one after another; tests that start a QEMU guest serialise themselves.
cargo test --workspace --locked -- "$@"
done_phase "test"
