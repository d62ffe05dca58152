//! Peak memory of a memory stream's way in and out is bounded: a generated QEMU stream of
//! 1 GiB of RAM (never stored anywhere) is not held, and costs little more than one of 256 MiB
//! (only the per-blob bookkeeping every backup has grows: the session's set of blobs written
//! and the repository's index, about 100 bytes per 16 KiB chunk). Its own test binary, so the
//! process's peak (VmHWM) is this test's alone.
mod common;

use std::io::Read;

use common::*;
use vmkeep_repo::{BackupOptions, NoProgress};
use vmkeep_testkit::migration::StreamBuilder;

/// A background snapshot of `pages` pages of RAM, generated as it is read: the scan starts in
/// the middle and wraps around, every 64th page was written by the guest during the capture
/// and comes early (in bursts of 100), every 7th page is a zero page. Page contents are
/// distinct and compressible (cheap to store, nothing deduplicates).
struct Generated {
    pages: u64,
    next: u64,
    buf: Vec<u8>,
    at: usize,
    done: bool,
    b: Option<StreamBuilder>,
}

impl Generated {
    fn new(pages: u64) -> Generated {
        let mut b = StreamBuilder::new(&[("pc.ram", pages * 4096)]);
        b.part();
        Generated {
            pages,
            next: 0,
            buf: std::mem::take(&mut b.out),
            at: 0,
            done: false,
            b: Some(b),
        }
    }

    fn content(p: u64) -> Vec<u8> {
        let mut v = vec![0u8; 4096];
        for (i, c) in v.chunks_mut(8).enumerate() {
            c.copy_from_slice(&(p * 512 + i as u64 / 64).to_le_bytes());
        }
        v
    }

    fn refill(&mut self) {
        let pages = self.pages;
        let scan_page = |i: u64| (pages / 2 + i) % pages;
        let b = self.b.as_mut().expect("not finished");
        let end = (self.next + 256).min(self.pages);
        for i in self.next..end {
            let p = scan_page(i);
            if i % 6400 == 0 {
                // A burst of pages the guest wrote, ahead of the scan.
                for k in 1..=100 {
                    let q = scan_page(i + k * 64 + 1024);
                    if q % 64 == 0 && i + k * 64 + 1024 < self.pages {
                        b.page(0, q, &Self::content(q));
                    }
                }
            }
            if p % 64 == 0 && i >= 1024 {
                continue; // sent early (or was not: a page QEMU never sent)
            }
            if p % 7 == 0 {
                b.zero(0, p);
            } else {
                b.page(0, p, &Self::content(p));
            }
        }
        self.next = end;
        if self.next == self.pages {
            let mut b = self.b.take().unwrap();
            b.end_part();
            self.buf = b.finish(&[1u8; 10_000]);
            self.done = true;
        } else {
            self.buf = std::mem::take(&mut b.out);
        }
        self.at = 0;
    }
}

impl Read for Generated {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            self.refill();
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Peak resident memory of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib / 1024.0
}

/// A `Write` that hashes.
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

#[test]
fn peak_memory_does_not_grow_with_the_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    init_repo(&root, true);
    let repo = open_local(&root, true, 2);
    let start = peak_rss_mib();
    let mut peaks = Vec::new();
    for (vm, mib) in [("small", 256u64), ("large", 1024)] {
        let pages = mib << 8;
        let mut s = repo
            .begin_backup(BackupOptions {
                vm: vm.into(),
                ..Default::default()
            })
            .unwrap();
        let rec = s
            .add_memory_stream("memory", &mut Generated::new(pages), &NoProgress)
            .unwrap()
            .clone();
        let m = s.commit().unwrap();
        let p = rec.pages.as_ref().unwrap();
        assert!(
            p.literal_size < pages * 20 + 100_000,
            "pages in images: {} literal bytes of {}",
            p.literal_size,
            rec.size
        );
        let after_in = peak_rss_mib();
        let mut want = blake3::Hasher::new();
        std::io::copy(&mut Generated::new(pages), &mut want).unwrap();
        let mut got = Hash(blake3::Hasher::new());
        repo.read_stream_to(&m, "memory", &mut got, &NoProgress)
            .unwrap();
        assert_eq!(got.0.finalize(), want.finalize(), "{vm}: read back differs");
        let after_out = peak_rss_mib();
        println!(
            "{vm}: {} MiB stream ({} page images, {} literal bytes): peak RSS {start:.0} MiB \
             before, {after_in:.0} MiB after storing, {after_out:.0} MiB after reading back",
            rec.size >> 20,
            p.images.len(),
            p.literal_size
        );
        peaks.push(after_out);
    }
    // Bounded: the page assembler's 16 MiB, a few 1 MiB batches per thread, the packer's
    // pack, the reader's read-ahead; not the stream (882 MiB for the large one).
    assert!(
        peaks[1] - start < 100.0,
        "1 GiB of RAM: peak grew by {:.0} MiB",
        peaks[1] - start
    );
    // 4 times the stream: ~40,000 more blobs of bookkeeping (~5 MiB) plus allocator noise.
    assert!(
        peaks[1] - peaks[0] < 40.0,
        "a stream 4 times larger raised the peak from {:.0} to {:.0} MiB",
        peaks[0],
        peaks[1]
    );
}
