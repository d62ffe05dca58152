//! `NbdDisk` spreads reads over two connections when the server advertises multi-conn, and
//! concurrent `read_at` calls from several threads (the pipeline's reader threads) return the
//! same bytes as the image.

mod common;

use std::process::Command;

use common::*;
use vmkeep_qemu::disk_reader::NbdDisk;
use vmkeep_repo::DiskReader;

#[test]
fn reads_over_several_connections_match_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    make_qcow2(&img, "16M");
    qemu_io(
        &img,
        &[
            "write -P 0xab 0 3M",
            "write -P 0x5c 5M 1M",
            "write -P 0x17 9M 4M",
        ],
    );
    let sock = dir.path().join("nbd.sock");
    let mut c = ChildGuard::spawn(
        Command::new(require("qemu-nbd"))
            .args(["-r", "-f", "qcow2", "-x", "disk", "-t", "-e", "4", "-k"])
            .arg(&sock)
            .arg(&img),
    );
    wait_for_socket(&sock, &mut c);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let multi = nbdinfo_flag(&uri, "can_multi_conn");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let disk =
        NbdDisk::connect_unix(rt.handle().clone(), &sock, "disk", None, "test disk").unwrap();
    assert_eq!(
        disk.connections(),
        if multi { 2 } else { 1 },
        "multi-conn advertised: {multi}"
    );
    assert!(disk.parallel_reads() >= 2);

    let expect = raw_content(&img, dir.path());
    let size = disk.size();
    assert_eq!(size, expect.len() as u64);
    // Four threads each read every fourth MiB, as the pipeline's readers do.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let disk = &disk;
            let expect = &expect;
            s.spawn(move || {
                let mut off = t << 20;
                while off < size {
                    let mut buf = vec![0u8; 1 << 20];
                    disk.read_at(&mut buf, off).unwrap();
                    assert!(
                        buf == expect[off as usize..(off as usize + (1 << 20))],
                        "MiB at {off}"
                    );
                    off += 4 << 20;
                }
            });
        }
    });
    disk.disconnect().unwrap();
}
