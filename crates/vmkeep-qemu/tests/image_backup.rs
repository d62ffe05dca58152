//! Stopped VMs: qcow2 images backed up through qemu-storage-daemon, with persistent
//! checkpoint bitmaps so the second backup reads only what changed.

mod common;

use std::path::Path;

use common::backup_images;
use common::*;
use vmkeep_repo::{BackupOptions, NoProgress, Repository};

const K64: u64 = 65536;

fn restored(repo: &Repository, m: &vmkeep_core::manifest::Manifest, dir: &Path) -> Vec<u8> {
    restore_disks(repo, m, dir).remove(0).1
}

#[test]
fn qcow2_image_incremental_through_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.qcow2");
    make_qcow2(&img, "16M");
    qemu_io(&img, &["write -P 0xaa 0 1M", "write -P 0xbb 8M 64k"]);
    let repo = plain_repo(&d.join("repo"));
    let opts = BackupOptions {
        vm: "off".into(),
        ..Default::default()
    };
    let disks = vec![("sda".to_string(), img.clone())];

    let m1 = backup_images(&repo, opts.clone(), &disks, false, &NoProgress).unwrap();
    assert_eq!(m1.disks[0].cbt.as_str(), "none");
    assert_eq!(
        m1.stats.read_bytes,
        1024 * 1024 + K64,
        "only allocated data read"
    );
    assert_eq!(restored(&repo, &m1, &d.join("r1")), raw_content(&img, d));
    let cp1 = m1.disks[0].checkpoint.clone().unwrap();
    assert!(cp1.source.starts_with("qcow2:"), "{cp1:?}");

    // The image changes offline through qemu-io, which opens it with its bitmaps: the enabled
    // persistent checkpoint records the writes.
    qemu_io(&img, &["write -P 0xcc 4M 64k", "write -P 0xdd 0 4k"]);
    let info = run(std::process::Command::new(require("qemu-img"))
        .args(["info"])
        .arg(&img));
    assert!(info.contains(&cp1.bitmap), "checkpoint persisted: {info}");

    let m2 = backup_images(&repo, opts.clone(), &disks, false, &NoProgress).unwrap();
    assert_eq!(
        m2.disks[0].cbt.as_str(),
        "used",
        "{:?}",
        m2.disks[0].cbt_reason
    );
    assert_eq!(
        m2.stats.read_bytes,
        2 * K64,
        "only the two dirty chunks read"
    );
    assert_eq!(restored(&repo, &m2, &d.join("r2")), raw_content(&img, d));

    // --full equivalent: same content, every allocated chunk read, tracking rotates.
    let m3 = backup_images(&repo, opts, &disks, true, &NoProgress).unwrap();
    assert_eq!(m3.disks[0].cbt.as_str(), "none");
    assert_eq!(m3.disks[0].root, m2.disks[0].root);
    let info = run(std::process::Command::new(require("qemu-img"))
        .args(["info"])
        .arg(&img));
    let cp3 = &m3.disks[0].checkpoint.as_ref().unwrap().bitmap;
    assert!(info.contains(cp3.as_str()), "{info}");
    assert!(
        !info.contains(&cp1.bitmap)
            && !info.contains(&m2.disks[0].checkpoint.as_ref().unwrap().bitmap),
        "consumed checkpoints removed: {info}"
    );
}
