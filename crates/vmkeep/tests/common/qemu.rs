//! A real QEMU guest for the command-line tests of `backup vm`, from the shared test kit
//! (crates/vmkeep-testkit): the test guest of tests/guest/build.sh on one 32 MiB qcow2 disk
//! (`-blockdev` + virtio-blk-pci id `vd0`) running the seqwrite workload, the blocking QMP
//! client, and the point-in-time check of a restored disk. One QEMU at a time machine-wide.
#![allow(dead_code, unused_imports)]

use std::path::Path;

pub use vmkeep_testkit::guest::{guest, BLOCKS, DISK_MIB};
pub use vmkeep_testkit::qmp::Qmp;
pub use vmkeep_testkit::vm::{qemu_lock, QemuLock, Vm, VmBuilder};

/// Boots QEMU (TCG) on a fresh [`DISK_MIB`] qcow2 disk in `d`. `seqwrite`: the guest kernel
/// with the seqwrite workload; otherwise QEMU starts paused with no kernel, just the block
/// layer.
pub fn boot(d: &Path, seqwrite: bool) -> Vm {
    let disk = d.join("vda.qcow2");
    vmkeep_testkit::tools::make_qcow2(&disk, &format!("{DISK_MIB}M"));
    let mut vm = VmBuilder::new(d, "").blockdev_qcow2(&disk, "vd0");
    if seqwrite {
        vm = vm.seqwrite(&guest(), None);
    }
    vm.boot()
}

/// The K of a point-in-time image of the seqwrite guest's disk (never written blocks are zero):
/// see [`vmkeep_testkit::guest::prefix_k`].
pub fn prefix_k(img: &[u8], what: &str) -> i64 {
    vmkeep_testkit::guest::prefix_k(img, 0, what)
}
