//! The NBD server against real clients: the crate's own NbdClient, nbdinfo, qemu-img and
//! nbdcopy, over a Unix socket and TCP, reading an in-memory disk that counts and fails reads.

mod served_disk;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use served_disk::*;
use vmkeep_qemu::nbd::{proto, Listen, NbdClient, NbdServer, ServeOptions};
use vmkeep_qemu::Error;
use vmkeep_testkit::process::{require, run};
use vmkeep_testkit::tools::nbdinfo_map;

/// `(offset, length, flags)` from NbdClient extents.
fn with_offsets(ext: &[vmkeep_qemu::nbd::Extent]) -> Vec<(u64, u64, u32)> {
    let mut o = 0;
    ext.iter()
        .map(|e| {
            o += e.length;
            (o - e.length, e.length, e.flags)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn own_client_reads_everything_and_the_allocation_map() {
    // 40 blocks and a tail that is not block- (or sector-) aligned.
    let disk = MemDisk::new(image(40, 12_345));
    let srv = serve(disk.clone(), opts());
    let c = NbdClient::connect_unix(&srv.sock, NAME, &["base:allocation"])
        .await
        .unwrap();
    assert_eq!(c.size(), disk.data().len() as u64);
    assert!(c.is_read_only());
    assert!(c.can_multi_conn());
    let bs = c.block_size().expect("block size advertised");
    assert_eq!((bs.minimum, bs.preferred, bs.maximum), (1, 65536, 32 << 20));

    let all = c.read_sparse(0, c.size()).await.unwrap();
    assert!(all.data == disk.data(), "bytes differ");
    // Holes are exactly the zero blocks.
    let holes: Vec<(u64, u64)> = disk
        .expected_map()
        .iter()
        .filter(|e| e.2 == 3)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(all.holes, holes);

    let map = c
        .block_status("base:allocation", 0, c.size())
        .await
        .unwrap();
    assert_eq!(with_offsets(&map), disk.expected_map());

    // A read of zero blocks only is answered from the extents, without reading.
    let before = disk.reads();
    let z = c.read(BLOCK, 2 * BLOCK).await.unwrap();
    assert!(z.iter().all(|b| *b == 0));
    assert_eq!(disk.reads(), before, "a hole must not be read");
    c.disconnect().await.unwrap();

    // The default export name opens the same export; no meta context is needed to read.
    let c = NbdClient::connect_unix(&srv.sock, "", &[]).await.unwrap();
    assert_eq!(
        c.read(12_000, 100_000).await.unwrap(),
        &disk.data()[12_000..112_000]
    );
    c.disconnect().await.unwrap();
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_clients_get_their_own_bytes() {
    let disk = MemDisk::new(image(64, 0));
    let srv = serve(disk.clone(), opts());
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let (sock, disk) = (srv.sock.clone(), disk.clone());
        tasks.push(tokio::spawn(async move {
            let c = NbdClient::connect_unix(&sock, NAME, &[]).await.unwrap();
            for k in 0..8u64 {
                let off = ((i * 7 + k * 13) % 60) * BLOCK + i * 511;
                let len = 3 * BLOCK + k;
                let got = c.read(off, len).await.unwrap();
                assert!(got == disk.data()[off as usize..(off + len) as usize]);
            }
            c.disconnect().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_range_is_an_error_never_wrong_data() {
    let disk = MemDisk::new(image(16, 0));
    let srv = serve(disk.clone(), opts());
    disk.fail(Some(4 * BLOCK + 100..4 * BLOCK + 200));
    let c = NbdClient::connect_unix(&srv.sock, NAME, &["base:allocation"])
        .await
        .unwrap();
    match c.read(3 * BLOCK, 3 * BLOCK).await {
        Err(Error::NbdServer { errno, offset, .. }) => {
            assert_eq!(errno, proto::EIO);
            assert_eq!(offset, 3 * BLOCK);
        }
        other => panic!("expected an EIO, got {other:?}"),
    }
    // The connection and other ranges still work.
    assert_eq!(
        c.read(0, 4 * BLOCK).await.unwrap(),
        &disk.data()[..4 * BLOCK as usize]
    );
    assert_eq!(
        c.read(5 * BLOCK, 3 * BLOCK).await.unwrap(),
        &disk.data()[5 * BLOCK as usize..8 * BLOCK as usize]
    );

    // qemu-img sees an I/O error (exit status 2 and up), not a difference or a match.
    let raw = write_raw(srv.dir.path(), disk.data());
    let out = Command::new(require("qemu-img"))
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&raw)
        .arg(srv.uri())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(c) if c >= 2),
        "{:?}: {stderr}",
        out.status
    );
    assert!(stderr.contains("Input/output error"), "{stderr}");
    disk.fail(None);
    qemu_img_compare(&raw, &srv.uri());
    c.disconnect().await.unwrap();
}

fn write_raw(dir: &Path, data: &[u8]) -> std::path::PathBuf {
    let p = dir.join("expected.raw");
    std::fs::write(&p, data).unwrap();
    p
}

fn qemu_img_compare(raw: &Path, uri: &str) {
    run(Command::new(require("qemu-img"))
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(raw)
        .arg(uri));
}

#[test]
fn nbdinfo_qemu_img_and_nbdcopy_agree() {
    let disk = MemDisk::new(image(48, 0));
    let srv = serve(disk.clone(), opts());
    let uri = srv.uri();
    assert!(uri.starts_with("nbd+unix:///disk?socket=/"), "{uri}");

    assert_eq!(nbdinfo_map(&uri, None), disk.expected_map());
    let size = run(Command::new(require("nbdinfo")).arg("--size").arg(&uri));
    assert_eq!(size.trim(), disk.data().len().to_string());
    let info = run(Command::new(require("nbdinfo")).arg(&uri));
    assert!(info.contains("vmkeep test disk"), "{info}");
    assert!(info.contains("is_read_only: true"), "{info}");

    let raw = write_raw(srv.dir.path(), disk.data());
    qemu_img_compare(&raw, &uri);

    let converted = srv.dir.path().join("converted.raw");
    run(Command::new(require("qemu-img"))
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&converted));
    assert!(std::fs::read(&converted).unwrap() == disk.data());

    match which("nbdcopy") {
        Some(nbdcopy) => {
            let copied = srv.dir.path().join("copied.raw");
            run(Command::new(nbdcopy).arg(&uri).arg(&copied));
            assert!(std::fs::read(&copied).unwrap() == disk.data());
        }
        None => println!("nbdcopy is not installed (libnbd-bin): the nbdcopy check is skipped"),
    }
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_on_a_free_port() {
    let disk = MemDisk::new(image(20, 0));
    let dir = tempfile::tempdir().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let srv = serve_on(
        Listen::Tcp(any),
        disk.clone(),
        opts(),
        dir,
        Default::default(),
    );
    let addr = srv.server.address();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    assert_eq!(srv.uri(), format!("nbd://{addr}/disk"));

    let uri = srv.uri();
    let map = tokio::task::spawn_blocking(move || nbdinfo_map(&uri, None))
        .await
        .unwrap();
    assert_eq!(map, disk.expected_map());
    let c = NbdClient::connect_tcp(&addr, NAME, &[]).await.unwrap();
    assert!(c.read(0, c.size()).await.unwrap() == disk.data());
    c.disconnect().await.unwrap();
}

#[test]
fn socket_lifecycle() {
    let disk = MemDisk::new(image(2, 0));
    let srv = serve(disk.clone(), opts());
    let sock = srv.sock.clone();
    assert_eq!(srv.server.address(), sock.display().to_string());
    // A second server on the same path is refused with a clear error.
    match NbdServer::bind(&Listen::Unix(sock.clone()), disk.clone(), opts()) {
        Err(e @ Error::NbdSocketExists { .. }) => assert!(e.to_string().contains("already exists")),
        other => panic!("expected NbdSocketExists, got {other:?}"),
    }
    let t = Instant::now();
    srv.stop().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(!sock.exists(), "the socket file must be removed");

    // Options that cannot work are refused up front.
    let dir = tempfile::tempdir().unwrap();
    let bad = ServeOptions {
        workers_per_connection: 0,
        ..opts()
    };
    let l = Listen::Unix(dir.path().join("s"));
    assert!(matches!(
        NbdServer::bind(&l, disk.clone(), bad),
        Err(Error::NbdServeOptions(_))
    ));
    let tiny = ServeOptions {
        max_request: 4096,
        ..opts()
    };
    assert!(matches!(
        NbdServer::bind(&l, disk.clone(), tiny),
        Err(Error::NbdServeOptions(_))
    ));
    // Bound but never run: dropping it removes the socket.
    let s = NbdServer::bind(&l, disk as Arc<dyn vmkeep_io::ServedDisk>, opts()).unwrap();
    assert!(dir.path().join("s").exists());
    drop(s);
    assert!(!dir.path().join("s").exists());
}

#[test]
fn connection_limit_and_handshake_timeout() {
    let disk = MemDisk::new(image(4, 0));
    let o = ServeOptions {
        max_connections: 1,
        handshake_timeout: Duration::from_millis(300),
        ..opts()
    };
    let srv = serve(disk.clone(), o);
    let mut first = Raw::start(&srv.sock, true, true);
    // The second connection is closed at once, without a greeting.
    let mut second = Raw::connect(&srv.sock);
    assert!(
        second.closed(),
        "a connection over the limit must be closed"
    );
    assert_eq!(first.read(1, 0, 1000).unwrap(), &disk.data()[..1000]);
    first.request(0, proto::CMD_DISC, 2, 0, 0);
    assert!(first.closed());

    // A silent client is dropped after the handshake timeout, freeing its place.
    let mut silent = accepted(&srv.sock);
    let t = Instant::now();
    assert!(silent.closed());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let mut c = accepted(&srv.sock);
    c.send(&(proto::CLIENT_FIXED_NEWSTYLE).to_be_bytes());
    c.negotiate(true, true);
    check_client(c, &disk);
}
