//! Boots the cached test guest (tests/guest/build.sh) under TCG with two virtio-blk disks and
//! checks the seqwrite workload: progress on the serial console, and SEQ blocks on both disks.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use vmkeep_testkit::guest::{guest, SEQWRITE};

const COUNT: usize = 12;
const DISK_BLOCKS: usize = 16384; // 64 MiB / 4 KiB

/// The guest, with the tools its build needs checked first (a clear message, never a skip).
fn built_guest() -> PathBuf {
    for bin in ["busybox", "cpio", "dpkg-deb", "apt-get"] {
        require(bin);
    }
    guest()
}

#[test]
fn guest_boots_and_writes_sequence_blocks() {
    let started = Instant::now();
    let g = built_guest();
    let built = started.elapsed();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = [d.join("a.qcow2"), d.join("b.qcow2")];
    for disk in &disks {
        make_qcow2(disk, "64M");
    }

    let _lock = qemu_lock();
    let boot = Instant::now();
    let mut vm = VmBuilder::new(d, "").kernel(
        &g.join("vmlinuz"),
        &g.join("initrd.gz"),
        &format!("{SEQWRITE} vmkeep.count={COUNT}"),
    );
    for (i, disk) in disks.iter().enumerate() {
        vm = vm.blockdev_qcow2(disk, &format!("vd{i}"));
    }
    let mut vm = vm.boot();
    let text = loop {
        let text = vm.serial();
        if text.contains("DONE") {
            break text;
        }
        if let Ok(Some(st)) = vm.qemu.0.try_wait() {
            panic!("QEMU exited ({st}); serial log:\n{text}");
        }
        assert!(
            boot.elapsed() < Duration::from_secs(90),
            "guest did not finish in 90 s; serial log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let ran = boot.elapsed();
    drop(vm); // SIGKILL: the workload fsynced every block

    assert!(
        text.contains("VMKEEP READY workload=seqwrite disks=vda vdb"),
        "{text}"
    );
    assert!(!text.contains("failed"), "{text}");
    let progress: Vec<usize> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("C ").and_then(|n| n.parse().ok()))
        .collect();
    assert_eq!(progress, (0..COUNT).collect::<Vec<_>>(), "{text}");

    for disk in &disks {
        let raw = raw_content(disk, d);
        for i in 0..COUNT {
            let blk = (i * 97) % DISK_BLOCKS;
            let b = &raw[blk * 4096..(blk + 1) * 4096];
            let want = format!("SEQ {i:010}\n");
            assert_eq!(
                &b[..want.len()],
                want.as_bytes(),
                "{} block {blk}",
                disk.display()
            );
            assert!(b[want.len()..].iter().all(|x| *x == 0));
        }
    }
    eprintln!("guest: build/cache {built:?}, boot+{COUNT} writes x2 disks {ran:?}");
}
