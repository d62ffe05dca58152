//! Memory streams of a real QEMU guest (background snapshots through a pipe): stored and read
//! back byte for byte, a second capture of an idle guest stores at most 5% of the first, and a
//! capture read back into a pipe loads into a new QEMU, which runs on.
mod common;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use common::*;
use vmkeep_repo::{BackupOptions, Manifest, NoProgress, Repository};
use vmkeep_testkit::guest::{guest, make_filled_disks, two_disk_vm};
use vmkeep_testkit::migration;
use vmkeep_testkit::tools::make_qcow2;
use vmkeep_testkit::vm::{qemu_lock, Vm, VmBuilder};

/// Hashes what passes through.
struct Tee<'a> {
    inner: &'a mut dyn Read,
    hash: blake3::Hasher,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

struct Hash(blake3::Hasher);

impl std::io::Write for Hash {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One capture of `vm` straight from QEMU's pipe into a restore point; checks it reads back
/// identical to what QEMU wrote.
fn capture(repo: &Repository, vm: &Vm, dir: &Path) -> Manifest {
    let (m, want) = migration::capture(vm, dir, |pipe| {
        let mut s = repo
            .begin_backup(BackupOptions {
                vm: "guest".into(),
                ..Default::default()
            })
            .unwrap();
        let mut tee = Tee {
            inner: pipe,
            hash: blake3::Hasher::new(),
        };
        s.add_memory_stream("memory", &mut tee, &NoProgress)
            .unwrap();
        (s.commit().unwrap(), tee.hash.finalize())
    });
    let mut got = Hash(blake3::Hasher::new());
    repo.read_stream_to(&m, "memory", &mut got, &NoProgress)
        .unwrap();
    assert_eq!(got.0.finalize(), want, "the stream read back differs");
    let rec = &m.streams[0];
    let p = rec.pages.as_ref().expect("QEMU's pages in page images");
    println!(
        "capture: {} bytes, {} literal, {} page images; stored {} bytes ({} new plaintext)",
        rec.size,
        p.literal_size,
        p.images.len(),
        m.stats.stored_bytes,
        m.stats.new_bytes
    );
    assert!(
        p.literal_size < rec.size / 20,
        "most of the stream is pages: {} literal bytes of {}",
        p.literal_size,
        rec.size
    );
    m
}

#[test]
fn idle_guest_captures_deduplicate_and_load_back_into_qemu() {
    let _lock = qemu_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("repo");
    init_repo(&root, true);
    let repo = open_local(&root, true, 2);
    let disk = dir.join("d.qcow2");
    make_qcow2(&disk, "32M");
    let mut vm = VmBuilder::new(dir, "idle")
        .memory_mib(256)
        .idle(&guest())
        .blockdev_qcow2(&disk, "vd0")
        .boot();
    vm.wait_serial("IDLE");
    std::thread::sleep(Duration::from_secs(5)); // settled after boot
    let m1 = capture(&repo, &vm, dir);
    std::thread::sleep(Duration::from_secs(3));
    let m2 = capture(&repo, &vm, dir);
    let ratio = m2.stats.stored_bytes as f64 / m1.stats.stored_bytes as f64;
    println!(
        "the second capture stores {:.2}% of the first",
        ratio * 100.0
    );
    assert!(ratio <= 0.05, "second capture: {ratio:.4} of the first");
    assert_check_ok(&repo, "two captures");
    vm.quit();

    // The second capture, read from the repository into a pipe, loads into a new QEMU of the
    // same configuration, which then runs (the capture was taken while the guest ran).
    let restored = VmBuilder::new(dir, "restored")
        .memory_mib(256)
        .idle(&guest())
        .blockdev_qcow2(&disk, "vd0")
        .args(["-incoming", "defer"])
        .boot();
    let status = migration::load(&restored, dir, |pipe| {
        repo.read_stream_to(&m2, "memory", pipe, &NoProgress)
            .unwrap();
    });
    assert_eq!(status, "running");
    assert!(
        !restored.serial().contains("VMKEEP READY"),
        "the guest resumed, it did not boot again: {}",
        restored.serial()
    );
    restored.quit();
}

#[test]
fn busy_guest_captures_round_trip() {
    let _lock = qemu_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("repo");
    init_repo(&root, false);
    let repo = open_local(&root, false, 2);
    let disks = make_filled_disks(dir);
    let mut vm = two_disk_vm(dir, &disks, "busy")
        .memory_mib(256)
        .seqwrite(&guest(), None)
        .boot();
    vm.wait_progress(20);
    let m1 = capture(&repo, &vm, dir);
    std::thread::sleep(Duration::from_secs(3));
    let m2 = capture(&repo, &vm, dir);
    println!(
        "busy guest: the second capture stores {:.2}% of the first",
        100.0 * m2.stats.stored_bytes as f64 / m1.stats.stored_bytes as f64
    );
    assert_check_ok(&repo, "busy captures");
    vm.quit();
}
