//! The NBD client against real servers: qemu-nbd (unix and TCP) and qemu-storage-daemon,
//! with nbdinfo and qemu-img as the reference for content, allocation and dirty bitmaps.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use vmkeep_qemu::nbd::{dirty_bitmap_context, NbdClient, STATE_DIRTY};
use vmkeep_qemu::Error;

const MIB: u64 = 1024 * 1024;

/// An 8 MiB qcow2 with data at 0 and 1M, bitmap bm0 added, then writes at 4M and 6M (zeroes)
/// that bm0 records.
fn fixture(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("d.qcow2");
    make_qcow2(&img, "8M");
    qemu_io(&img, &["write -P 0xab 0 64k", "write -P 0x11 1M 128k"]);
    run(Command::new(require("qemu-img"))
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("bm0"));
    qemu_io(
        &img,
        &[
            "write -P 0x22 4M 64k",
            "write -z 6M 64k",
            "write -P 0x33 7M 4k",
        ],
    );
    img
}

fn qemu_nbd(img: &Path, sock: &Path) -> ChildGuard {
    let mut c = ChildGuard::spawn(
        Command::new(require("qemu-nbd"))
            .args([
                "-r", "-f", "qcow2", "-x", "disk", "-B", "bm0", "-t", "-e", "4", "-k",
            ])
            .arg(sock)
            .arg(img),
    );
    wait_for_socket(sock, &mut c);
    c
}

#[tokio::test]
async fn qemu_nbd_unix_read_and_block_status_match_reference() {
    let dir = tempfile::tempdir().unwrap();
    let img = fixture(dir.path());
    let expected = raw_content(&img, dir.path());
    let sock = dir.path().join("nbd.sock");
    let _srv = qemu_nbd(&img, &sock);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());

    let ctx = dirty_bitmap_context("bm0");
    let c = NbdClient::connect_unix(&sock, "disk", &["base:allocation", &ctx])
        .await
        .unwrap();
    assert_eq!(c.size(), 8 * MIB);
    assert!(c.is_read_only());
    assert_eq!(c.can_multi_conn(), nbdinfo_flag(&uri, "can_multi_conn"));
    assert_eq!(c.contexts().len(), 2);

    // Whole-disk read (split into pipelined requests) equals the image content.
    let all = c.read(0, c.size()).await.unwrap();
    assert_eq!(all.len(), expected.len());
    assert!(all == expected, "NBD content differs from qemu-img convert");
    // Unaligned small read in the middle of the data.
    let part = c.read(MIB + 7, 1000).await.unwrap();
    assert_eq!(part, &expected[(MIB + 7) as usize..(MIB + 1007) as usize]);
    // Sparse read reports holes, and they read as zeros.
    let sp = c.read_sparse(0, 2 * MIB).await.unwrap();
    assert!(!sp.holes.is_empty());
    for (o, l) in &sp.holes {
        assert!(expected[*o as usize..(*o + *l) as usize]
            .iter()
            .all(|b| *b == 0));
    }

    // Block status equals nbdinfo's map, for allocation and the dirty bitmap.
    let alloc = c
        .block_status("base:allocation", 0, c.size())
        .await
        .unwrap();
    assert_eq!(with_offsets(0, &alloc), nbdinfo_map(&uri, None));
    let dirty = c.block_status(&ctx, 0, c.size()).await.unwrap();
    assert_eq!(with_offsets(0, &dirty), nbdinfo_map(&uri, Some(&ctx)));
    let dirty_ranges: Vec<(u64, u64)> = with_offsets(0, &dirty)
        .into_iter()
        .filter(|e| e.2 & STATE_DIRTY != 0)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(
        dirty_ranges,
        vec![
            (4 * MIB, 64 * 1024),
            (6 * MIB, 64 * 1024),
            (7 * MIB, 64 * 1024)
        ]
    );
    // A sub-range query starting mid-extent.
    let sub = c.block_status(&ctx, 4 * MIB + 4096, 8192).await.unwrap();
    assert_eq!(
        with_offsets(4 * MIB + 4096, &sub),
        vec![(4 * MIB + 4096, 8192, 1)]
    );

    // Concurrent requests on one connection (pipelined by cookie).
    let (a, b, s) = tokio::join!(
        c.read(0, 64 * 1024),
        c.read(MIB, 128 * 1024),
        c.block_status("base:allocation", 0, MIB)
    );
    assert_eq!(a.unwrap(), &expected[..65536]);
    assert_eq!(b.unwrap(), &expected[MIB as usize..(MIB + 131072) as usize]);
    assert!(!s.unwrap().is_empty());

    // Client-side validation: beyond the end, zero length, unknown context.
    assert!(matches!(
        c.read(8 * MIB - 10, 20).await,
        Err(Error::NbdInvalidRequest { .. })
    ));
    assert!(matches!(
        c.read(0, 0).await,
        Err(Error::NbdInvalidRequest { .. })
    ));
    assert!(matches!(
        c.block_status("qemu:dirty-bitmap:nope", 0, 512).await,
        Err(Error::NbdContextUnavailable(_))
    ));
    // Still usable after client-side rejections.
    assert_eq!(c.read(0, 4).await.unwrap(), vec![0xab; 4]);

    // A second connection works too (the caller decides whether multi-conn is safe).
    let c2 = NbdClient::connect_unix(&sock, "disk", &[]).await.unwrap();
    assert_eq!(c2.read(7 * MIB, 4096).await.unwrap(), vec![0x33; 4096]);
    c2.disconnect().await.unwrap();
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn qemu_nbd_handshake_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let img = fixture(dir.path());
    let sock = dir.path().join("nbd.sock");
    let _srv = qemu_nbd(&img, &sock);

    let e = NbdClient::connect_unix(&sock, "no-such-export", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NbdOptionRejected { .. }), "{e}");
    let e = NbdClient::connect_unix(&sock, "disk", &["qemu:dirty-bitmap:missing"])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NbdContextUnavailable(_)), "{e}");
    let e = NbdClient::connect_unix(dir.path().join("absent.sock"), "disk", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    // The server is still fine.
    let c = NbdClient::connect_unix(&sock, "disk", &[]).await.unwrap();
    assert_eq!(c.read(0, 1).await.unwrap(), vec![0xab]);
}

#[tokio::test]
async fn qemu_nbd_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let img = fixture(dir.path());
    let expected = raw_content(&img, dir.path());
    // Pick a free port, then hand it to qemu-nbd.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _srv = ChildGuard::spawn(
        Command::new(require("qemu-nbd"))
            .args([
                "-r",
                "-f",
                "qcow2",
                "-x",
                "disk",
                "-t",
                "-e",
                "4",
                "-b",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .arg(&img),
    );
    let addr = format!("127.0.0.1:{port}");
    let start = std::time::Instant::now();
    let c = loop {
        match NbdClient::connect_tcp(&addr, "disk", &["base:allocation"]).await {
            Ok(c) => break c,
            Err(e) if start.elapsed().as_secs() < 10 => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("qemu-nbd on {addr}: {e}"),
        }
    };
    assert_eq!(c.read(0, c.size()).await.unwrap(), expected);
    let uri = format!("nbd://{addr}/disk");
    let alloc = c
        .block_status("base:allocation", 0, c.size())
        .await
        .unwrap();
    assert_eq!(with_offsets(0, &alloc), nbdinfo_map(&uri, None));
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn qemu_storage_daemon_export() {
    let dir = tempfile::tempdir().unwrap();
    let img = fixture(dir.path());
    let expected = raw_content(&img, dir.path());
    let sock = dir.path().join("qsd.sock");
    let mut qsd = ChildGuard::spawn(
        Command::new(require("qemu-storage-daemon"))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f0,read-only=on",
                img.display()
            ))
            .args([
                "--blockdev",
                "driver=qcow2,file=f0,node-name=disk0,read-only=on",
            ])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", sock.display()))
            .args([
                "--export",
                "type=nbd,id=e0,node-name=disk0,name=backup,writable=off,bitmaps.0=bm0",
            ]),
    );
    wait_for_socket(&sock, &mut qsd);
    let uri = format!("nbd+unix:///backup?socket={}", sock.display());
    let ctx = dirty_bitmap_context("bm0");
    let c = NbdClient::connect_unix(&sock, "backup", &["base:allocation", &ctx])
        .await
        .unwrap();
    assert_eq!(c.can_multi_conn(), nbdinfo_flag(&uri, "can_multi_conn"));
    assert_eq!(c.read(0, c.size()).await.unwrap(), expected);
    let dirty = c.block_status(&ctx, 0, c.size()).await.unwrap();
    assert_eq!(with_offsets(0, &dirty), nbdinfo_map(&uri, Some(&ctx)));
    let alloc = c
        .block_status("base:allocation", 0, c.size())
        .await
        .unwrap();
    assert_eq!(with_offsets(0, &alloc), nbdinfo_map(&uri, None));
    c.disconnect().await.unwrap();
}
