//! `-drive` configurations without a guest: `if=virtio` (no device id: named by the drive id
//! `virtio0`) and a raw image on `scsi-hd` with a device id; the capture names them, reads
//! them through the fleecing export and restores them byte for byte. A monitor held by another
//! client gives a clear error, not a hang.

mod common;

use std::process::Command;

use crate::common::{backup_vm, VmBackupOptions};
use common::*;
use vmkeep_qemu::qmp::QmpClient;
use vmkeep_repo::NoProgress;

#[test]
fn virtio_drive_and_scsi_hd_are_captured_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("a.qcow2");
    make_qcow2(&a, "8M");
    qemu_io(&a, &["write -P 0x11 0 64k", "write -P 0x22 5M 128k"]);
    let b = d.join("b.raw");
    std::fs::write(&b, vec![0u8; 4 << 20]).unwrap();
    run(Command::new(require("qemu-io"))
        .args(["-f", "raw", "-c", "write -P 0x33 1M 4k"])
        .arg(&b));
    let want_a = raw_content(&a, d);
    let want_b = std::fs::read(&b).unwrap();

    let repo = plain_repo(&d.join("repo"));

    let _lock = qemu_lock();
    let mut vm = VmBuilder::new(d, "")
        .memory_mib(64)
        .arg("-drive")
        .arg(format!("file={},format=qcow2,if=virtio", a.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=drive1", b.display()))
        .args(["-device", "virtio-scsi-pci,id=scsi0"])
        .args(["-device", "scsi-hd,drive=drive1,id=sd0"])
        .boot();
    let sock = vm.qmp.clone();
    let opts = VmBackupOptions {
        qmp: sock.clone(),
        vm: "cfg".into(),
        ..Default::default()
    };

    // Another client holds the monitor: a clear error.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let holder = rt.block_on(QmpClient::connect(&sock)).unwrap();
    let err = backup_vm(&repo, &opts, &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("held by another client"), "{err}");
    rt.block_on(holder.close());

    let m = backup_vm(&repo, &opts, &NoProgress).unwrap();
    let mut names: Vec<&str> = m.disks.iter().map(|x| x.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["sd0", "virtio0"]);
    let sources: Vec<&str> = m
        .disks
        .iter()
        .map(|x| x.checkpoint.as_ref().unwrap().source.as_str())
        .collect();
    assert!(
        sources.iter().any(|s| s.starts_with("qcow2:")),
        "{sources:?}"
    );
    assert!(
        sources.iter().any(|s| s.starts_with("qemu-pid:")),
        "{sources:?}"
    );
    // Only allocated data read: 64k + 128k of the qcow2, the raw file's data extents.
    assert!(m.stats.read_bytes < 6 << 20, "{}", m.stats.read_bytes);

    // Second backup: both use tracking (the raw disk's bitmap lives in this QEMU process).
    let m2 = backup_vm(&repo, &opts, &NoProgress).unwrap();
    assert!(
        m2.disks.iter().all(|x| x.cbt.as_str() == "used"),
        "{:?}",
        m2.disks
    );
    // Of the disks (read_bytes also counts the VM's definition stored beside them).
    assert_eq!(m2.stats.changed_bytes, 0, "nothing changed");

    for (name, got) in restore_disks(&repo, &m2, &d.join("r")) {
        let want = if name == "virtio0" { &want_a } else { &want_b };
        assert!(&got == want, "disk {name} differs");
    }
    rt.block_on(async {
        let c = QmpClient::connect(&sock).await.unwrap();
        assert!(
            !c.query_status().await.unwrap().running,
            "-S: still never ran"
        );
        let _ = c.quit().await;
    });
    let _ = vm.qemu.0.wait();
}

/// `--freeze`: the agent channel is found through QMP; nobody answers on it (no agent runs in
/// a VM that never started), so `on` fails clearly and `auto` backs up without freezing. A VM
/// without the channel: `on` says so.
#[test]
fn freeze_on_needs_an_answering_agent_auto_goes_on_without() {
    use vmkeep_qemu::capture::Freeze;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("a.qcow2");
    make_qcow2(&a, "4M");
    let repo = plain_repo(&d.join("repo"));
    let _lock = qemu_lock();
    for with_channel in [true, false] {
        let qga = d.join(format!("qga-{with_channel}.sock"));
        let mut b = VmBuilder::new(d, &format!("-{with_channel}"))
            .memory_mib(64)
            .arg("-drive")
            .arg(format!("file={},format=qcow2,if=virtio", a.display()));
        if with_channel {
            b = b
                .args(["-device", "virtio-serial-pci,id=vser0"])
                .arg("-chardev")
                .arg(format!(
                    "socket,path={},server=on,wait=off,id=qga0",
                    qga.display()
                ))
                .args([
                    "-device",
                    "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
                ]);
        }
        let mut vm = b.boot();
        let sock = vm.qmp.clone();
        let opts = |freeze| VmBackupOptions {
            qmp: sock.clone(),
            vm: format!("fz{with_channel}"),
            freeze,
            ..Default::default()
        };
        let err = backup_vm(&repo, &opts(Freeze::On), &NoProgress)
            .unwrap_err()
            .to_string();
        let want = if with_channel {
            "does not answer"
        } else {
            "no guest agent channel"
        };
        assert!(err.contains(want), "{err}");
        let m = backup_vm(&repo, &opts(Freeze::Auto), &NoProgress).unwrap();
        assert_eq!(m.disks.len(), 1);
        // The refused attempt left nothing behind: the second backup is the VM's first.
        assert_eq!(m.disks[0].cbt.as_str(), "none");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = QmpClient::connect(&sock).await.unwrap();
            let nodes = c.query_named_block_nodes().await.unwrap();
            assert!(nodes.iter().all(|n| !n.node_name.starts_with("vmkeep")));
            let _ = c.quit().await;
        });
        let _ = vm.qemu.0.wait();
    }
}

/// A qcow2 v2 (compat=0.10) image cannot store persistent bitmaps: the cut falls back to a
/// non-persistent checkpoint instead of failing, and tracking works while QEMU runs.
#[test]
fn qcow2_v2_image_falls_back_to_a_non_persistent_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("v2.qcow2");
    run(Command::new(require("qemu-img"))
        .args(["create", "-q", "-f", "qcow2", "-o", "compat=0.10"])
        .arg(&a)
        .arg("4M"));
    qemu_io(&a, &["write -P 0x44 64k 64k"]);
    let want = raw_content(&a, d);
    let repo = plain_repo(&d.join("repo"));
    let _lock = qemu_lock();
    let vm = VmBuilder::new(d, "")
        .memory_mib(64)
        .blockdev_qcow2(&a, "vd0")
        .boot();
    let sock = vm.qmp.clone();
    let opts = VmBackupOptions {
        qmp: sock.clone(),
        vm: "v2".into(),
        ..Default::default()
    };
    let m1 = backup_vm(&repo, &opts, &NoProgress).unwrap();
    let cp = m1.disks[0].checkpoint.as_ref().unwrap();
    assert!(cp.source.starts_with("qemu-pid:"), "{cp:?}");
    let m2 = backup_vm(&repo, &opts, &NoProgress).unwrap();
    assert_eq!(
        m2.disks[0].cbt.as_str(),
        "used",
        "{:?}",
        m2.disks[0].cbt_reason
    );
    let restored = restore_disks(&repo, &m2, &d.join("r"));
    assert!(restored[0].1 == want);
}
