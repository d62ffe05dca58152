//! Helpers of the live-backup tests: the two-disk seqwrite guest of the test kit
//! (vmkeep_testkit::guest), backed up and restored through this crate's library.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

use crate::common::{backup_vm, VmBackupOptions};
use crate::common::{plain_repo, restore_disks};
use vmkeep_core::manifest::Manifest;
use vmkeep_repo::{NoProgress, Repository};
use vmkeep_testkit::guest::{check_two_disk_cut, two_disk_vm};
pub use vmkeep_testkit::guest::{guest, make_filled_disks as make_disks, DISK_MIB};
pub use vmkeep_testkit::vm::Vm;

pub const MIB: u64 = 1 << 20;
/// The chunk size of [`plain_repo`].
pub const CS: u64 = 65536;

/// Boots the guest on the two disks (vda: -blockdev, device id `vd0`; vdb: -drive `drive1`,
/// anonymous device). `guest: None` starts QEMU paused with no kernel (just the block layer).
pub fn boot(d: &Path, disks: &[PathBuf; 2], run_id: usize, guest_dir: Option<&Path>) -> Vm {
    boot_with(d, disks, run_id, None, guest_dir, &[])
}

/// [`boot`] with another initrd (None: the guest's own) and extra QEMU arguments.
pub fn boot_with(
    d: &Path,
    disks: &[PathBuf; 2],
    run_id: usize,
    initrd: Option<&Path>,
    guest_dir: Option<&Path>,
    extra: &[String],
) -> Vm {
    let mut b = two_disk_vm(d, disks, &run_id.to_string()).args(extra);
    if let Some(g) = guest_dir {
        b = b.seqwrite(g, initrd);
    }
    b.boot()
}

pub fn repo(d: &Path) -> Repository {
    plain_repo(&d.join("repo"))
}

pub fn backup(repo: &Repository, vm: &Vm, full: bool) -> Manifest {
    backup_vm(
        repo,
        &VmBackupOptions {
            qmp: vm.qmp.clone(),
            vm: "guest".into(),
            full,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap()
}

pub fn restore(repo: &Repository, m: &Manifest, dir: &Path) -> Vec<(String, Vec<u8>)> {
    restore_disks(repo, m, dir)
}

/// Both disks of a restore point: each a prefix, vdb's K equal to vda's or one less.
pub fn check_cut(repo: &Repository, m: &Manifest, dir: &Path) -> (i64, i64) {
    let disks = restore(repo, m, dir);
    let get = |n: &str| {
        &disks
            .iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("disk {n} in {:?}", m.disks))
            .1
    };
    check_two_disk_cut(get("vd0"), get("drive1"))
}

pub fn cbt(m: &Manifest) -> Vec<(String, String, Option<String>)> {
    m.disks
        .iter()
        .map(|d| (d.name.clone(), d.cbt.to_string(), d.cbt_reason.clone()))
        .collect()
}
