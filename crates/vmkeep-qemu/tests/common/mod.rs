//! What the vmkeep-qemu integration tests use from the shared test kit (crates/vmkeep-testkit:
//! required programs, children that die with the test, the one-QEMU-at-a-time lock, test VMs,
//! qemu-img / qemu-io / nbdinfo), plus NBD extent arithmetic of these tests.
#![allow(dead_code, unused_imports)]

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
