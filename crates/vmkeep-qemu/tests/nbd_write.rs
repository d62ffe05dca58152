//! NBD writes: NBD_CMD_WRITE / NBD_CMD_FLUSH against a writable qemu-nbd export (read back
//! through NBD and through qemu-img), a read-only export (typed error, nothing sent), a
//! scripted server answering writes with errors and protocol violations, and `Qcow2Target`
//! (the restore target built on them).

mod common;
mod scripted_nbd;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use scripted_nbd::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vmkeep_qemu::nbd::proto::*;
use vmkeep_qemu::nbd::NbdClient;
use vmkeep_qemu::qcow2_target::{partial_path, Qcow2Target};
use vmkeep_qemu::Error;
use vmkeep_testkit::data::pattern;

const MIB: u64 = 1024 * 1024;

fn qemu_nbd(img: &Path, sock: &Path, read_only: bool) -> ChildGuard {
    let mut cmd = Command::new(require("qemu-nbd"));
    if read_only {
        cmd.arg("-r");
    }
    cmd.args([
        "-f",
        "qcow2",
        "-x",
        "disk",
        "-t",
        "-e",
        "4",
        "--cache=writeback",
        "-k",
    ])
    .arg(sock)
    .arg(img);
    let mut c = ChildGuard::spawn(&mut cmd);
    wait_for_socket(sock, &mut c);
    c
}

#[tokio::test]
async fn write_flush_and_read_back_through_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    make_qcow2(&img, "64M");
    let sock = dir.path().join("nbd.sock");
    let srv = qemu_nbd(&img, &sock, false);

    let c = NbdClient::connect_unix(&sock, "disk", &["base:allocation"])
        .await
        .unwrap();
    assert!(!c.is_read_only());
    assert!(c.can_flush(), "qemu-nbd advertises flush");
    let mut expected = vec![0u8; 64 * MIB as usize];
    // (offset, len): aligned chunk, unaligned small write, one write larger than a single
    // request (split and pipelined), a write ending exactly at the end of the export.
    let writes = [
        (0u64, 65536usize),
        (MIB + 7, 1000),
        (8 * MIB, 40 * MIB as usize),
        (64 * MIB - 4096, 4096),
    ];
    for (i, (o, l)) in writes.iter().enumerate() {
        let d = pattern(i as u64, *l);
        c.write(*o, &d).await.unwrap();
        expected[*o as usize..*o as usize + l].copy_from_slice(&d);
    }
    c.flush().await.unwrap();
    // Read back through NBD.
    let back = c.read(0, c.size()).await.unwrap();
    assert!(
        back == expected,
        "NBD read-back differs from what was written"
    );
    // Writes outside the export are refused locally.
    assert!(matches!(
        c.write(64 * MIB - 10, &[1; 20]).await,
        Err(Error::NbdInvalidRequest { .. })
    ));
    // Unwritten ranges are still holes.
    let map = c
        .block_status("base:allocation", 2 * MIB, MIB)
        .await
        .unwrap();
    assert!(map.iter().all(|e| e.flags & 1 == 1), "{map:?}");
    c.disconnect().await.unwrap();
    drop(srv);
    // And through qemu-img (the image file itself).
    assert!(raw_content(&img, dir.path()) == expected);
    run(Command::new(require("qemu-img")).arg("check").arg(&img));
}

#[tokio::test]
async fn concurrent_writers_share_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    make_qcow2(&img, "16M");
    let sock = dir.path().join("nbd.sock");
    let _srv = qemu_nbd(&img, &sock, false);
    let c = Arc::new(NbdClient::connect_unix(&sock, "disk", &[]).await.unwrap());
    let chunk = 64 * 1024usize;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            // Task t writes every 8th chunk, starting at chunk t.
            for i in (t..256).step_by(8) {
                c.write(i * chunk as u64, &pattern(i, chunk)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    c.flush().await.unwrap();
    let back = c.read(0, 16 * MIB).await.unwrap();
    for i in 0..256usize {
        assert!(
            back[i * chunk..(i + 1) * chunk] == pattern(i as u64, chunk)[..],
            "chunk {i}"
        );
    }
}

#[tokio::test]
async fn write_to_read_only_export_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    make_qcow2(&img, "4M");
    qemu_io(&img, &["write -P 0x5a 0 64k"]);
    let sock = dir.path().join("nbd.sock");
    let _srv = qemu_nbd(&img, &sock, true);
    let c = NbdClient::connect_unix(&sock, "disk", &[]).await.unwrap();
    assert!(c.is_read_only());
    match c.write(0, &[1; 4096]).await {
        Err(Error::NbdReadOnly { export }) => assert_eq!(export, "disk"),
        other => panic!("expected NbdReadOnly, got {other:?}"),
    }
    c.flush().await.unwrap();
    // Nothing was sent: the connection works and the data is unchanged.
    assert!(c.read(0, 4096).await.unwrap().iter().all(|b| *b == 0x5a));
}

// ------------------------------------------------------------------------------------------
// A scripted server: replies to writes that a real server only sends when things go wrong.

/// A correct handshake for a writable 1 MiB export with flush.
async fn handshake(s: &mut UnixStream) {
    greet(s).await;
    loop {
        let (opt, _) = read_option(s).await;
        match opt {
            OPT_STRUCTURED_REPLY => s.write_all(&opt_reply(opt, REP_ACK, &[])).await.unwrap(),
            OPT_GO => {
                let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&MIB.to_be_bytes());
                p.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
                s.write_all(&opt_reply(opt, REP_INFO, &p)).await.unwrap();
                s.write_all(&opt_reply(opt, REP_ACK, &[])).await.unwrap();
                return;
            }
            other => panic!("unexpected option {other}"),
        }
    }
}

/// Reads one request and its write payload: (command, cookie, offset, payload).
async fn read_request(s: &mut UnixStream) -> (u16, u64, u64, Vec<u8>) {
    let mut r = [0u8; 28];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(r[0..4].try_into().unwrap()),
        REQUEST_MAGIC
    );
    let cmd = u16::from_be_bytes(r[6..8].try_into().unwrap());
    let len = u32::from_be_bytes(r[24..28].try_into().unwrap());
    let mut payload = Vec::new();
    if cmd == CMD_WRITE {
        payload = vec![0; len as usize];
        s.read_exact(&mut payload).await.unwrap();
    }
    (
        cmd,
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
        u64::from_be_bytes(r[16..24].try_into().unwrap()),
        payload,
    )
}

fn chunk(flags: u16, t: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&t.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn simple(errno: u32, cookie: u64) -> Vec<u8> {
    let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

#[tokio::test]
async fn scripted_write_replies() {
    let (_d, p) = serve(|mut s| async move {
        handshake(&mut s).await;
        // 1: simple success, with the payload checked.
        let (cmd, cookie, off, data) = read_request(&mut s).await;
        assert_eq!((cmd, off), (CMD_WRITE, 4096));
        assert_eq!(data, vec![7u8; 512]);
        s.write_all(&simple(0, cookie)).await.unwrap();
        // 2: structured NONE success.
        let (_, cookie, _, _) = read_request(&mut s).await;
        s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[]))
            .await
            .unwrap();
        // 3: structured error (ENOSPC) with an offset.
        let (_, cookie, off, _) = read_request(&mut s).await;
        let mut e = 28u32.to_be_bytes().to_vec();
        e.extend_from_slice(&4u16.to_be_bytes());
        e.extend_from_slice(b"full");
        e.extend_from_slice(&(off + 100).to_be_bytes());
        s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, cookie, &e))
            .await
            .unwrap();
        // 4: simple error (EIO).
        let (_, cookie, _, _) = read_request(&mut s).await;
        s.write_all(&simple(5, cookie)).await.unwrap();
        // 5: flush, simple success.
        let (cmd, cookie, _, _) = read_request(&mut s).await;
        assert_eq!(cmd, CMD_FLUSH);
        s.write_all(&simple(0, cookie)).await.unwrap();
        // 6: a data chunk in reply to a write: protocol violation.
        let (_, cookie, off, _) = read_request(&mut s).await;
        let mut d = off.to_be_bytes().to_vec();
        d.extend_from_slice(&[0; 16]);
        let _ = s
            .write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, &d))
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let c = NbdClient::connect_unix_with(&p, "x", &[], opts())
        .await
        .unwrap();
    c.write(4096, &[7; 512]).await.unwrap();
    c.write(0, &[1; 100]).await.unwrap();
    match c.write(8192, &[2; 4096]).await {
        Err(Error::NbdServer {
            command,
            offset,
            errno,
            message,
        }) => {
            assert_eq!((command, offset, errno), ("NBD_CMD_WRITE", 8292, 28));
            assert_eq!(message, "full");
        }
        other => panic!("expected NbdServer, got {other:?}"),
    }
    match c.write(0, &[3; 10]).await {
        Err(Error::NbdServer { errno: 5, .. }) => {}
        other => panic!("expected NbdServer EIO, got {other:?}"),
    }
    c.flush().await.unwrap();
    match c.write(0, &[4; 10]).await {
        Err(Error::NbdProtocol { .. }) => {}
        other => panic!("expected NbdProtocol, got {other:?}"),
    }
    // The connection is closed after a protocol violation.
    assert!(matches!(
        c.write(0, &[5; 10]).await,
        Err(Error::NbdClosed { .. })
    ));
}

#[tokio::test]
async fn successful_simple_reply_to_read_is_still_a_violation() {
    let (_d, p) = serve(|mut s| async move {
        handshake(&mut s).await;
        let (_, cookie, _, _) = read_request(&mut s).await;
        let _ = s.write_all(&simple(0, cookie)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let c = NbdClient::connect_unix_with(&p, "x", &[], opts())
        .await
        .unwrap();
    assert!(matches!(
        c.read(0, 512).await,
        Err(Error::NbdProtocol { .. })
    ));
}

// ------------------------------------------------------------------------------------------
// Qcow2Target

#[test]
fn qcow2_target_written_from_threads_matches_and_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.qcow2");
    let size = 256 * MIB;
    let t = Qcow2Target::create(&path, size).unwrap();
    assert!(partial_path(&path).exists() && !path.exists());
    let chunk = 65536usize;
    // 64 chunks spread over the disk, written by 4 threads.
    let offsets: Vec<u64> = (0..64u64).map(|i| i * 3 * MIB + (i % 5) * 65536).collect();
    std::thread::scope(|s| {
        for w in 0..4 {
            let (t, offsets) = (&t, &offsets);
            s.spawn(move || {
                for (i, o) in offsets.iter().enumerate().skip(w).step_by(4) {
                    t.write_at(&pattern(i as u64, chunk), *o).unwrap();
                }
            });
        }
    });
    let out = t.commit().unwrap();
    assert_eq!(out, path);
    assert!(!partial_path(&path).exists());
    run(Command::new(require("qemu-img")).arg("check").arg(&path));
    let info = run(Command::new(require("qemu-img"))
        .args(["info", "--output=json"])
        .arg(&path));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], size);
    let used = info["actual-size"].as_u64().unwrap();
    assert!(used < 16 * MIB, "qcow2 uses {used} bytes for 4 MiB of data");
    let raw = raw_content(&path, dir.path());
    let mut expected = vec![0u8; size as usize];
    for (i, o) in offsets.iter().enumerate() {
        expected[*o as usize..*o as usize + chunk].copy_from_slice(&pattern(i as u64, chunk));
    }
    assert!(raw == expected);
}

#[test]
fn qcow2_target_dropped_uncommitted_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone.qcow2");
    let t = Qcow2Target::create(&path, 8 * MIB).unwrap();
    t.write_at(&[1; 4096], 0).unwrap();
    drop(t);
    assert!(!path.exists());
    assert!(!partial_path(&path).exists());
    // Writes beyond the size fail with a typed error (nothing reaches the image).
    let t = Qcow2Target::create(&path, MIB).unwrap();
    assert!(matches!(
        t.write_at(&[1; 4096], MIB),
        Err(Error::NbdInvalidRequest { .. })
    ));
}
