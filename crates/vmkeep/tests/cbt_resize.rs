//! Change tracking that the disk's allocation contradicts (issue 7, defect 3), with the real
//! binary against a real QEMU (started paused, no kernel: just the block layer; data written
//! through HMP `qemu-io`, the disk resized with QMP `block_resize`).
//!
//! Shrinking a disk and growing it back marks nothing dirty in QEMU's bitmaps, yet the area cut
//! off now reads as zeros: an incremental trusting the bitmap would restore the old data there.
//! The same for a stopped VM's qcow2 resized offline with `qemu-img` (`backup image`).

mod common;
#[path = "common/qemu.rs"]
mod qemu;

use std::path::Path;

use common::*;
use qemu::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// One qemu-io command on disk vd0 through the monitor, as the guest's device would write
/// (its block backend, so the write reaches the dirty bitmaps like a guest write). HMP prints
/// the command's own output on QEMU's stdout and returns only errors.
fn qemu_io(vm: &Vm, cmd: &str) {
    let out = vm.execute(
        "human-monitor-command",
        json!({ "command-line": format!("qemu-io -d /machine/peripheral/vd0/virtio-backend \"{cmd}\"") }),
    );
    assert_eq!(out, json!(""), "qemu-io {cmd}");
}

fn resize(vm: &Vm, size: u64) {
    vm.execute(
        "block_resize",
        json!({ "node-name": "disk0", "size": size }),
    );
}

/// The live disk's guest-visible content: QEMU's caches flushed into the image, then the image
/// read beside the running QEMU (`qemu-img convert -U`).
fn live_disk(vm: &Vm, image: &Path, dir: &Path) -> Vec<u8> {
    qemu_io(vm, "flush");
    vmkeep_testkit::tools::raw_content(image, dir)
}

fn backup_vm(repo: &Path, vm: &Vm) -> Value {
    json(
        vmkeep(repo)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    )
}

/// `(cbt, reason)` of the only disk.
fn cbt(b: &Value) -> (String, String) {
    let d = &b["disks"][0];
    (
        d["cbt"].as_str().expect("disk cbt").to_string(),
        d["reason"].as_str().unwrap_or_default().to_string(),
    )
}

/// Bytes read of the disk: `changed_bytes` (read_bytes also counts the VM's definition,
/// which a live capture stores beside the disk).
fn read_bytes(b: &Value) -> u64 {
    b["stats"]["changed_bytes"]
        .as_u64()
        .expect("stats.changed_bytes")
}

/// Restores `b` and compares it with `want`, byte for byte.
fn assert_restored(repo: &Path, b: &Value, want: &[u8], dir: &Path, what: &str) {
    let target = dir.join(format!("restore-{what}"));
    restore(repo, &id_of(b), &target);
    let got = std::fs::read(target.join("vd0.raw")).expect("restored vd0.raw");
    assert_eq!(got.len(), want.len(), "{what}: restored size");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: the restore differs from the live disk from byte {at} (chunk {}): \
             restored {:#04x}, live {:#04x}",
            at as u64 / 65536,
            got[at],
            want[at]
        );
    }
}

#[test]
fn shrink_and_regrow_between_backups_rescans() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let image = d.join("vda.qcow2");
    vmkeep_testkit::tools::make_qcow2(&image, "64M");
    let _lock = qemu_lock();
    let vm = VmBuilder::new(d, "").blockdev_qcow2(&image, "vd0").boot();

    qemu_io(&vm, "write -P 0x11 1M 1M");
    qemu_io(&vm, "write -P 0x33 40M 1M");
    let b1 = backup_vm(&repo, &vm);
    assert_eq!(cbt(&b1).0, "none", "{b1}");

    // Shrink below the data at 40 MiB and grow back: QEMU records no write.
    resize(&vm, 32 * MIB);
    resize(&vm, 64 * MIB);
    qemu_io(&vm, "write -P 0x22 2M 64k"); // one ordinary write the bitmap does record
    let live2 = live_disk(&vm, &image, d);
    assert!(
        live2[(40 * MIB) as usize..(41 * MIB) as usize]
            .iter()
            .all(|&b| b == 0),
        "the live disk reads zeros where the shrink cut its data off"
    );
    let b2 = backup_vm(&repo, &vm);
    let (cbt2, reason2) = cbt(&b2);
    assert_eq!(cbt2, "rescan", "the bitmap missed the shrink: {b2}");
    assert!(
        reason2.contains("reads zeros where its last restore point has data"),
        "the reason says why: {b2}"
    );
    // The rescan reads what is allocated: the 16 chunks at 1 MiB and the one at 2 MiB.
    assert_eq!(read_bytes(&b2), 17 * 65536, "{b2}");
    assert_restored(&repo, &b2, &live2, d, "after the regrow");

    // An ordinary incremental stays incremental: one written chunk, one zeroed chunk (a write
    // of zeros the bitmap records, so it contradicts nothing), nothing else read.
    qemu_io(&vm, "write -P 0x44 5M 64k");
    qemu_io(&vm, "write -z 1M 64k");
    let live3 = live_disk(&vm, &image, d);
    let b3 = backup_vm(&repo, &vm);
    assert_eq!(cbt(&b3).0, "used", "{b3}");
    assert!(
        read_bytes(&b3) > 0 && read_bytes(&b3) <= 2 * 65536,
        "the incremental read only the dirty chunks: {b3}"
    );
    assert_restored(&repo, &b3, &live3, d, "ordinary incremental");
    vm.quit();
}

/// The same through `backup image` of a stopped VM's qcow2 (read by a qemu-storage-daemon
/// vmkeep starts, its persistent bitmap kept in the image), resized offline with `qemu-img`.
#[test]
fn an_image_shrunk_and_regrown_offline_rescans() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let image = d.join("vd0.qcow2");
    vmkeep_testkit::tools::make_qcow2(&image, "64M");
    vmkeep_testkit::tools::qemu_io(&image, &["write -P 0x33 40M 1M"]);
    let backup = || {
        json(
            vmkeep(&repo)
                .args(["backup", "image", "--vm", "img", "--disk"])
                .arg(format!("vd0={}", image.display())),
        )
    };
    let b1 = backup();
    assert_eq!(cbt(&b1).0, "none", "{b1}");
    for (size, extra) in [("32M", &["--shrink"][..]), ("64M", &[][..])] {
        let out = std::process::Command::new("qemu-img")
            .args(["resize", "-q", "-f", "qcow2"])
            .args(extra)
            .arg(&image)
            .arg(size)
            .output()
            .expect("qemu-img resize");
        assert!(out.status.success(), "{}", describe(&out));
    }
    let b2 = backup();
    let (cbt2, reason2) = cbt(&b2);
    assert_eq!(cbt2, "rescan", "{b2}");
    assert!(
        reason2.contains("reads zeros where its last restore point has data"),
        "{b2}"
    );
    let live = vmkeep_testkit::tools::raw_content(&image, d);
    assert_restored(&repo, &b2, &live, d, "offline regrow");
}
