//! Boots the cached test guest (tests/guest/build.sh) under TCG with two virtio-blk disks and
//! checks the seqwrite workload: progress on the serial console, and SEQ blocks on both disks.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const COUNT: usize = 12;
const DISK_BLOCKS: usize = 16384; // 64 MiB / 4 KiB

fn guest() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/guest/build.sh");
    for bin in ["busybox", "cpio", "dpkg-deb", "apt-get"] {
        require(bin);
    }
    let out = run(Command::new("bash").arg(&script));
    PathBuf::from(
        out.lines()
            .last()
            .expect("build.sh printed the guest dir")
            .trim(),
    )
}

#[test]
fn guest_boots_and_writes_sequence_blocks() {
    let started = Instant::now();
    let g = guest();
    let built = started.elapsed();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = [d.join("a.qcow2"), d.join("b.qcow2")];
    for disk in &disks {
        make_qcow2(disk, "64M");
    }
    let log = d.join("serial.log");

    let _lock = qemu_lock();
    let boot = Instant::now();
    let mut cmd = Command::new(require("qemu-system-x86_64"));
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "256",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
    .arg("-kernel")
    .arg(g.join("vmlinuz"))
    .arg("-initrd")
    .arg(g.join("initrd.gz"))
    .arg("-append")
    .arg(format!(
        "console=ttyS0 quiet panic=-1 vmkeep.workload=seqwrite vmkeep.count={COUNT}"
    ));
    for (i, disk) in disks.iter().enumerate() {
        cmd.arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f{i}",
                disk.display()
            ))
            .arg("-blockdev")
            .arg(format!("driver=qcow2,file=f{i},node-name=disk{i}"))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive=disk{i},id=vd{i}"));
    }
    let mut qemu = ChildGuard::spawn(&mut cmd);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("DONE") {
            break text;
        }
        if let Ok(Some(st)) = qemu.0.try_wait() {
            panic!("QEMU exited ({st}); serial log:\n{text}");
        }
        assert!(
            boot.elapsed() < Duration::from_secs(90),
            "guest did not finish in 90 s; serial log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let ran = boot.elapsed();
    drop(qemu); // SIGKILL: the workload fsynced every block

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
