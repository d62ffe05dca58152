//! What the NBD server tests share: an in-memory `ServedDisk` that counts reads and can fail
//! a chosen range, a server running on a Unix socket in a temporary folder, and a blocking
//! raw client that speaks the protocol by hand (`raw.rs`, for the hostile tests).
#![allow(dead_code)]

mod raw;

pub use raw::Raw;

use std::io::{self, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmkeep_io::{ServedDisk, ServedExtent};
use vmkeep_qemu::nbd::proto::*;
use vmkeep_qemu::nbd::{Listen, NbdServer, ServeOptions};

/// Granularity of the in-memory disk's extents.
pub const BLOCK: u64 = 64 * 1024;
/// Export name the tests serve.
pub const NAME: &str = "disk";
/// The in-memory disk answers `extents` with at most this many, so the server must ask again.
const EXTENTS_PER_CALL: usize = 3;

/// A disk in memory: 64 KiB blocks that are all zeros are zero extents.
pub struct MemDisk {
    data: Vec<u8>,
    reads: AtomicUsize,
    fail: Mutex<Option<Range<u64>>>,
}

impl MemDisk {
    pub fn new(data: Vec<u8>) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data,
            reads: AtomicUsize::new(0),
            fail: Mutex::new(None),
        })
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// `read_at` calls so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// Makes every `read_at` touching `range` fail with an I/O error (None: none fail).
    pub fn fail(&self, range: Option<Range<u64>>) {
        *self.fail.lock().unwrap() = range;
    }

    fn block_is_zero(&self, i: u64) -> bool {
        let start = (i * BLOCK) as usize;
        let end = (start + BLOCK as usize).min(self.data.len());
        self.data[start..end].iter().all(|b| *b == 0)
    }

    /// `base:allocation` as `(offset, length, flags)`, equal neighbours merged: what
    /// `nbdinfo --map` and `NbdClient::block_status` must report.
    pub fn expected_map(&self) -> Vec<(u64, u64, u32)> {
        let size = self.data.len() as u64;
        let mut v: Vec<(u64, u64, u32)> = Vec::new();
        let mut o = 0;
        while o < size {
            let l = BLOCK.min(size - o);
            let f = if self.block_is_zero(o / BLOCK) { 3 } else { 0 };
            match v.last_mut() {
                Some(last) if last.2 == f => last.1 += l,
                _ => v.push((o, l, f)),
            }
            o += l;
        }
        v
    }
}

impl ServedDisk for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let end = offset + buf.len() as u64;
        assert!(
            end <= self.size(),
            "read_at past the end: {offset}+{}",
            buf.len()
        );
        if let Some(f) = &*self.fail.lock().unwrap() {
            if offset < f.end && f.start < end {
                return Err(io::Error::other(format!("injected failure at {}", f.start)));
            }
        }
        buf.copy_from_slice(&self.data[offset as usize..end as usize]);
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<ServedExtent>> {
        let end = offset + len;
        assert!(
            len > 0 && end <= self.size(),
            "extents out of range: {offset}+{len}"
        );
        let mut v: Vec<ServedExtent> = Vec::new();
        let mut o = offset;
        while o < end {
            let l = ((o / BLOCK + 1) * BLOCK).min(end) - o;
            let zero = self.block_is_zero(o / BLOCK);
            let full = v.len() == EXTENTS_PER_CALL;
            match v.last_mut() {
                Some(last) if last.zero == zero => last.len += l,
                _ if full => break,
                _ => v.push(ServedExtent { len: l, zero }),
            }
            o += l;
        }
        Ok(v)
    }

    fn block_size(&self) -> u32 {
        BLOCK as u32
    }
}

/// `blocks` blocks of 64 KiB plus `tail` bytes: data, zero blocks, and a block of zeros
/// ending in one data byte (data, not a hole).
pub fn image(blocks: usize, tail: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(blocks * BLOCK as usize + tail);
    for i in 0..blocks {
        match i % 7 {
            1 | 2 | 5 => v.resize(v.len() + BLOCK as usize, 0),
            3 => {
                v.resize(v.len() + BLOCK as usize - 1, 0);
                v.push(0x5a);
            }
            _ => v.extend(vmkeep_testkit::data::pattern(i as u64 + 1, BLOCK as usize)),
        }
    }
    v.extend(vmkeep_testkit::data::pattern(999, tail));
    v
}

/// Options the tests serve with: the export name [`NAME`], defaults otherwise.
pub fn opts() -> ServeOptions {
    ServeOptions {
        export_name: NAME.into(),
        description: Some("vmkeep test disk".into()),
        ..Default::default()
    }
}

/// A server running on its own thread; stopped (and checked) when dropped.
pub struct Served {
    pub server: Arc<NbdServer>,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<vmkeep_qemu::Result<()>>>,
}

impl Served {
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// Stops the accept loop and returns its result.
    pub fn stop(mut self) -> vmkeep_qemu::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `disk` on a Unix socket in a new temporary folder.
pub fn serve(disk: Arc<dyn ServedDisk>, opts: ServeOptions) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    serve_on(Listen::Unix(sock.clone()), disk, opts, dir, sock)
}

/// Serves `disk` on `listen`.
pub fn serve_on(
    listen: Listen,
    disk: Arc<dyn ServedDisk>,
    opts: ServeOptions,
    dir: tempfile::TempDir,
    sock: PathBuf,
) -> Served {
    let server = Arc::new(NbdServer::bind(&listen, disk, opts).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (server.clone(), stop.clone());
    let thread = std::thread::spawn(move || s.run(&st));
    Served {
        server,
        dir,
        sock,
        stop,
        thread: Some(thread),
    }
}

/// A fresh client gets correct bytes and extents: the server survived whatever came before.
pub fn assert_serving(path: &Path, disk: &MemDisk) {
    check_client(Raw::start(path, true, true), disk);
}

/// Reads and block status on a client in transmission, then disconnects it.
pub fn check_client(mut c: Raw, disk: &MemDisk) {
    let len = (4 * BLOCK).min(disk.size()) as u32;
    assert_eq!(c.read(7, 0, len).unwrap(), &disk.data()[..len as usize]);
    c.request(0, CMD_BLOCK_STATUS, 8, 0, len);
    let r = c.reply_chunks(8);
    assert_eq!(r[0].chunk_type, REPLY_TYPE_BLOCK_STATUS);
    c.request(0, CMD_DISC, 9, 0, 0);
    assert!(c.closed());
}

/// A connection the server accepted (greeting read), retrying while it refuses connections
/// (a closed connection's place is freed when its thread ends, a moment after it closes).
pub fn accepted(path: &Path) -> Raw {
    for _ in 0..100 {
        let mut c = Raw::connect(path);
        let mut g = [0u8; 18];
        if c.s.read_exact(&mut g).is_ok() {
            assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
            return c;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the server accepts no connection");
}
