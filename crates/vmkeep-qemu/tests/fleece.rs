//! Pause-free fleecing (qemu-facts §1B/§7) driven through the QMP client, read back through
//! the NBD client: the export shows the disk as of the transaction even though the device
//! keeps writing, and the frozen bitmap lists exactly the writes before the cut.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;
use vmkeep_qemu::nbd::{dirty_bitmap_context, NbdClient, STATE_DIRTY};
use vmkeep_qemu::qmp::{BitmapRef, NbdExport, QmpClient, TransactionAction};

const MIB: u64 = 1024 * 1024;
const K64: u64 = 65536;

#[tokio::test]
async fn pause_free_fleece_export_and_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Disk: data at 0 and 1M, then checkpoint bm0, then a write at 4M (recorded by bm0).
    let disk = d.join("disk.qcow2");
    make_qcow2(&disk, "16M");
    qemu_io(&disk, &["write -P 0xaa 0 64k", "write -P 0xbb 1M 64k"]);
    run(Command::new(require("qemu-img"))
        .args(["bitmap", "--add"])
        .arg(&disk)
        .arg("bm0"));
    qemu_io(&disk, &["write -P 0xcc 4M 64k"]);
    let before = raw_content(&disk, d);
    let fl = d.join("fl.qcow2");
    make_qcow2(&fl, "16M");

    let _lock = qemu_lock();
    let mut vm = VmBuilder::new(d, "")
        .memory_mib(64)
        .args(["-machine", "pc"])
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=none,id=drive0",
            disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=drive0,id=vd0"])
        .boot();
    let sock = vm.qmp.clone();
    let qmp = QmpClient::connect(&sock).await.unwrap();

    // -drive configuration (§7): find the drive's auto-generated root node.
    let blocks = qmp.query_block().await.unwrap();
    let drive = blocks.iter().find(|b| b.device == "drive0").unwrap();
    let root = drive.inserted.as_ref().unwrap().node_name.clone().unwrap();
    let root = root.as_str();

    // Fleecing node backed by the live disk, then the atomic cut.
    qmp.blockdev_add(json!({
        "driver": "qcow2", "node-name": "fl2-tmp",
        "file": {"driver": "file", "filename": fl},
        "backing": root
    }))
    .await
    .unwrap();
    let t0 = std::time::Instant::now();
    qmp.transaction(&[
        TransactionAction::fleece("drive0", "fl2-tmp", "fleece2"),
        TransactionAction::bitmap_add(root, "bm1", true),
        TransactionAction::bitmap_disable(root, "bm0"),
    ])
    .await
    .unwrap();
    let cut = t0.elapsed();

    // The device writes after the cut: over old data and into fresh areas.
    for cmd in ["write -P 0xdd 0 64k", "write -P 0xee 8M 64k"] {
        let out = qmp
            .execute(
                "human-monitor-command",
                json!({"command-line": format!("qemu-io drive0 \"{cmd}\"")}),
            )
            .await
            .unwrap();
        assert!(
            !out.as_str().unwrap_or_default().contains("rror"),
            "qemu-io: {out}"
        );
    }

    // Bitmap state: bm0 frozen with the pre-cut write, bm1 recording the post-cut ones.
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let disk0 = nodes.iter().find(|n| n.node_name == root).unwrap();
    let bm = |n: &str| {
        disk0
            .dirty_bitmaps
            .iter()
            .find(|b| b.name == n)
            .unwrap()
            .clone()
    };
    assert!(!bm("bm0").recording);
    assert_eq!(bm("bm0").count, K64);
    assert!(bm("bm1").recording);
    assert_eq!(bm("bm1").count, 2 * K64);

    // Export the fleecing node with the frozen bitmap; read it through our client.
    let nbd_sock = d.join("nbd.sock");
    qmp.nbd_server_start_unix(&nbd_sock).await.unwrap();
    qmp.block_export_add_nbd(&NbdExport {
        id: "exp2".into(),
        node_name: "fl2-tmp".into(),
        name: "backup".into(),
        writable: false,
        bitmaps: vec![BitmapRef::name("bm0")],
    })
    .await
    .unwrap();
    let ctx = dirty_bitmap_context("bm0");
    let nbd = NbdClient::connect_unix(&nbd_sock, "backup", &["base:allocation", &ctx])
        .await
        .unwrap();
    assert_eq!(nbd.size(), 16 * MIB);
    let image = nbd.read(0, nbd.size()).await.unwrap();
    assert!(
        image == before,
        "fleeced image is not the disk as of the cut"
    );
    let dirty = nbd.block_status(&ctx, 0, nbd.size()).await.unwrap();
    let mut o = 0;
    let mut dirty_ranges = Vec::new();
    for e in &dirty {
        if e.flags & STATE_DIRTY != 0 {
            dirty_ranges.push((o, e.length));
        }
        o += e.length;
    }
    assert_eq!(dirty_ranges, vec![(4 * MIB, K64)]);
    let uri = format!("nbd+unix:///backup?socket={}", nbd_sock.display());
    nbd.disconnect().await.unwrap();
    let mut ext_o = 0;
    let ours: Vec<(u64, u64, u32)> = dirty
        .iter()
        .map(|e| {
            let r = (ext_o, e.length, e.flags);
            ext_o += e.length;
            r
        })
        .collect();
    assert_eq!(ours, nbdinfo_map(&uri, Some(&ctx)));

    // Teardown in the documented order, waiting for the completion events.
    let mut events = qmp.events();
    qmp.block_export_del("exp2").await.unwrap();
    events
        .wait_for(
            "BLOCK_EXPORT_DELETED",
            |e| e.data["id"] == "exp2",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    qmp.block_job_cancel("fleece2", false).await.unwrap();
    events
        .wait_for(
            "BLOCK_JOB_CANCELLED",
            |e| e.data["device"] == "fleece2",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    qmp.blockdev_del("fl2-tmp").await.unwrap();
    qmp.nbd_server_stop().await.unwrap();
    assert!(!qmp.query_status().await.unwrap().running); // -S: never ran; nothing paused us
    qmp.quit().await.unwrap();
    let _ = vm.qemu.0.wait();

    // The live disk has the post-cut writes; the bitmaps persisted.
    let after = raw_content(&disk, d);
    assert_eq!(&after[..K64 as usize], &vec![0xdd; K64 as usize][..]);
    assert_eq!(
        &after[(8 * MIB) as usize..(8 * MIB + K64) as usize],
        &vec![0xee; K64 as usize][..]
    );
    let info = run(Command::new(require("qemu-img"))
        .args(["info", "-U"])
        .arg(&disk));
    assert!(info.contains("bm0") && info.contains("bm1"), "{info}");
    eprintln!("fleece transaction took {cut:?}");
}
