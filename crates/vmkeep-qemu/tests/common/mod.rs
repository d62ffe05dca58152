//! What the vmkeep-qemu integration tests use from the shared test kit (crates/vmkeep-testkit:
//! required programs, children that die with the test, the one-QEMU-at-a-time lock, test VMs,
//! qemu-img / qemu-io / nbdinfo), plus these tests' repositories and NBD extent arithmetic.
#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::sync::Arc;

use vmkeep_core::manifest::Manifest;
use vmkeep_repo::{InitOptions, NoProgress, Repository, RestoreOptions};
use vmkeep_store::LocalStore;

pub use vmkeep_testkit::process::{require, run, wait_for_socket, ChildGuard};
pub use vmkeep_testkit::tools::{make_qcow2, nbdinfo_flag, nbdinfo_map, qemu_io, raw_content};
pub use vmkeep_testkit::vm::{qemu_lock, QemuLock, Vm, VmBuilder};

/// Turns extents into `(offset, length, flags)` starting at `start`.
pub fn with_offsets(start: u64, ext: &[vmkeep_qemu::nbd::Extent]) -> Vec<(u64, u64, u32)> {
    let mut o = start;
    ext.iter()
        .map(|e| {
            let r = (o, e.length, e.flags);
            o += e.length;
            r
        })
        .collect()
}

/// A new unencrypted repository at `path` with 64 KiB chunks.
pub fn plain_repo(path: &Path) -> Repository {
    let store = Arc::new(LocalStore::create(path).unwrap());
    Repository::init(
        store,
        InitOptions {
            chunk_size: 65536,
            passphrase: None,
            kdf: Default::default(),
        },
    )
    .unwrap()
}

/// Restores every disk of `m` into `dir`; returns each disk's name and bytes.
pub fn restore_disks(repo: &Repository, m: &Manifest, dir: &Path) -> Vec<(String, Vec<u8>)> {
    let stats = repo
        .restore(
            m,
            &RestoreOptions {
                target: dir.to_path_buf(),
                disk: None,
            },
            &NoProgress,
        )
        .unwrap();
    stats
        .disks
        .iter()
        .map(|d| (d.name.clone(), std::fs::read(&d.path).unwrap()))
        .collect()
}
