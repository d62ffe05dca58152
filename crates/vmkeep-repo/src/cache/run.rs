//! One run of the cached blob index: an immutable file of index entries sorted by blob id,
//! split into buckets by the id's leading bits, each bucket checksummed (FORMAT.md §17).
//!
//! ```text
//! header  64 bytes: "VMKR" | version u8 | bucket_bits u8 | 0u16 | entries u64 | packs u32 |
//!                   sources u32 | BLAKE3(header[0..24] || packs || sources || directory) | 0u64
//! packs   packs × 32 bytes      pack ids, referenced by ordinal
//! sources sources × 48 bytes    the index objects the entries came from: name 32 | size u64 |
//!                               modified u64 (ns since the epoch, as listed when read)
//! directory (2^bits + 1) × u64  first entry of each bucket, then the end
//!           2^bits × u64        first 8 bytes of BLAKE3 of each bucket's entries
//! entries entries × 53 bytes    id 32 | pack u32 | source u32 | offset u32 | length u32 |
//!                               raw_len u32 | kind u8
//! ```
//! Opening reads and verifies everything but the entries (about 8 bytes per entry in all);
//! a lookup reads one bucket (about 64 entries) with `pread` and verifies its checksum, so
//! memory does not grow with the entries and a damaged cache is never believed.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmkeep_core::keys::BlobKind;
use vmkeep_core::{BlobId, PackId};

use crate::index::Location;
use crate::Error;

pub(crate) const MAGIC: [u8; 4] = *b"VMKR";
pub(crate) const VERSION: u8 = 1;
pub(crate) const HEADER_LEN: u64 = 64;
pub(crate) const ENTRY_LEN: usize = 53;
pub(crate) const SOURCE_LEN: usize = 48;
/// Buckets hold about this many entries on average.
const BUCKET_TARGET: u64 = 64;
const MAX_BUCKET_BITS: u8 = 26;

/// A record as stored: the fixed-width entry of the format above.
pub(crate) type Record = [u8; ENTRY_LEN];

/// An index object as listed when its entries were read: a listing that shows another size or
/// time for the name (the object was replaced) makes the cache read it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Source {
    pub name: [u8; 32],
    pub size: u64,
    pub modified_ns: u64,
}

impl Source {
    pub fn encode(&self) -> [u8; SOURCE_LEN] {
        let mut r = [0u8; SOURCE_LEN];
        r[..32].copy_from_slice(&self.name);
        r[32..40].copy_from_slice(&self.size.to_le_bytes());
        r[40..48].copy_from_slice(&self.modified_ns.to_le_bytes());
        r
    }

    fn decode(b: &[u8]) -> Source {
        Source {
            name: b[..32].try_into().expect("32"),
            size: u64::from_le_bytes(b[32..40].try_into().expect("8")),
            modified_ns: u64::from_le_bytes(b[40..48].try_into().expect("8")),
        }
    }
}

/// One entry of a run, its pack and source resolved to ordinals of that run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunEntry {
    pub id: BlobId,
    pub pack: u32,
    pub source: u32,
    pub offset: u32,
    pub length: u32,
    pub raw_len: u32,
    pub kind: BlobKind,
}

impl RunEntry {
    pub fn encode(&self) -> Record {
        let mut r = [0u8; ENTRY_LEN];
        r[..32].copy_from_slice(&self.id.0);
        r[32..36].copy_from_slice(&self.pack.to_le_bytes());
        r[36..40].copy_from_slice(&self.source.to_le_bytes());
        r[40..44].copy_from_slice(&self.offset.to_le_bytes());
        r[44..48].copy_from_slice(&self.length.to_le_bytes());
        r[48..52].copy_from_slice(&self.raw_len.to_le_bytes());
        r[52] = self.kind as u8;
        r
    }

    pub fn decode(r: &[u8]) -> Result<RunEntry, String> {
        let u32_at = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().expect("4 bytes"));
        let kind = BlobKind::from_u8(r[52]).map_err(|e| e.to_string())?;
        Ok(RunEntry {
            id: BlobId(r[..32].try_into().expect("32 bytes")),
            pack: u32_at(32),
            source: u32_at(36),
            offset: u32_at(40),
            length: u32_at(44),
            raw_len: u32_at(48),
            kind,
        })
    }
}

/// Buckets for `entries` entries: a power of two giving about [`BUCKET_TARGET`] per bucket.
pub(crate) fn bucket_bits_for(entries: u64) -> u8 {
    let mut bits = 0u8;
    while bits < MAX_BUCKET_BITS && (entries >> bits) > BUCKET_TARGET {
        bits += 1;
    }
    bits
}

/// The bucket of an id: its leading `bits` bits.
pub(crate) fn bucket_of(id: &[u8], bits: u8) -> usize {
    if bits == 0 {
        return 0;
    }
    let lead = u64::from_be_bytes(id[..8].try_into().expect("8 bytes"));
    (lead >> (64 - bits as u32)) as usize
}

pub(crate) fn bucket_sum(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(
        blake3::hash(bytes).as_bytes()[..8]
            .try_into()
            .expect("8 bytes"),
    )
}

/// An open run.
pub(crate) struct Run {
    pub path: PathBuf,
    file: File,
    bits: u8,
    pub entries: u64,
    pub packs: Vec<PackId>,
    pub sources: Vec<Source>,
    starts: Vec<u64>,
    sums: Vec<u64>,
    entries_at: u64,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("path", &self.path)
            .field("entries", &self.entries)
            .finish()
    }
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], at: u64) -> Result<(), Error> {
    file.read_exact_at(buf, at)
        .map_err(|e| Error::cache_io(path, "read", e))
}

impl Run {
    /// Open and verify everything but the entries.
    pub fn open(path: &Path) -> Result<Run, Error> {
        let damaged = |reason: String| Error::CacheDamaged {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| Error::cache_io(path, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::cache_io(path, "stat", e))?
            .len();
        if len < HEADER_LEN {
            return Err(damaged(format!("{len} bytes, shorter than its header")));
        }
        let mut h = [0u8; HEADER_LEN as usize];
        read_exact_at(&file, path, &mut h, 0)?;
        if h[..4] != MAGIC || h[4] != VERSION {
            return Err(damaged("not a vmkeep index run of this version".into()));
        }
        let bits = h[5];
        let entries = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        let packs = u32::from_le_bytes(h[16..20].try_into().expect("4")) as u64;
        let sources = u32::from_le_bytes(h[20..24].try_into().expect("4")) as u64;
        if bits > MAX_BUCKET_BITS {
            return Err(damaged(format!("{bits} bucket bits")));
        }
        let buckets = 1u64 << bits;
        let meta_len = packs * 32 + sources * SOURCE_LEN as u64 + (2 * buckets + 1) * 8;
        let expected = HEADER_LEN + meta_len + entries * ENTRY_LEN as u64;
        if len != expected {
            return Err(damaged(format!(
                "{len} bytes where its header says {expected}"
            )));
        }
        let mut meta = vec![0u8; meta_len as usize];
        read_exact_at(&file, path, &mut meta, HEADER_LEN)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&h[..24]);
        hasher.update(&meta);
        if hasher.finalize().as_bytes()[..] != h[24..56] {
            return Err(damaged("its header checksum does not match".into()));
        }
        let (pack_bytes, rest) = meta.split_at((packs * 32) as usize);
        let (source_bytes, dir) = rest.split_at((sources * SOURCE_LEN as u64) as usize);
        let words: Vec<u64> = dir
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect();
        let (starts, sums) = words.split_at(buckets as usize + 1);
        if starts.windows(2).any(|w| w[0] > w[1])
            || starts[0] != 0
            || starts[buckets as usize] != entries
        {
            return Err(damaged("its bucket directory is not ordered".into()));
        }
        Ok(Run {
            path: path.to_path_buf(),
            file,
            bits,
            entries,
            packs: pack_bytes
                .chunks_exact(32)
                .map(|c| PackId(c.try_into().expect("32")))
                .collect(),
            sources: source_bytes
                .chunks_exact(SOURCE_LEN)
                .map(Source::decode)
                .collect(),
            starts: starts.to_vec(),
            sums: sums.to_vec(),
            entries_at: HEADER_LEN + meta_len,
        })
    }

    pub fn buckets(&self) -> usize {
        self.sums.len()
    }

    /// The verified records of bucket `b`.
    pub fn bucket(&self, b: usize) -> Result<Vec<u8>, Error> {
        let (start, end) = (self.starts[b], self.starts[b + 1]);
        let mut buf = vec![0u8; ((end - start) as usize) * ENTRY_LEN];
        read_exact_at(
            &self.file,
            &self.path,
            &mut buf,
            self.entries_at + start * ENTRY_LEN as u64,
        )?;
        if bucket_sum(&buf) != self.sums[b] {
            return Err(Error::CacheDamaged {
                path: self.path.clone(),
                reason: format!("bucket {b} does not match its checksum"),
            });
        }
        Ok(buf)
    }

    /// Decode one record of a verified bucket, checking its ordinals.
    pub fn entry(&self, rec: &[u8]) -> Result<RunEntry, Error> {
        let damaged = |reason| Error::CacheDamaged {
            path: self.path.clone(),
            reason,
        };
        let e = RunEntry::decode(rec).map_err(damaged)?;
        if e.pack as usize >= self.packs.len() || e.source as usize >= self.sources.len() {
            return Err(damaged(
                "an entry names a pack or source it does not have".into(),
            ));
        }
        Ok(e)
    }

    /// Every entry for `id` (several copies are possible).
    pub fn find(&self, id: &BlobId) -> Result<Vec<RunEntry>, Error> {
        let buf = self.bucket(bucket_of(&id.0, self.bits))?;
        let n = buf.len() / ENTRY_LEN;
        let rec = |i: usize| &buf[i * ENTRY_LEN..(i + 1) * ENTRY_LEN];
        // First record whose id is >= `id`.
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if rec(mid)[..32] < id.0[..] {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut out = Vec::new();
        while lo < n && rec(lo)[..32] == id.0[..] {
            out.push(self.entry(rec(lo))?);
            lo += 1;
        }
        Ok(out)
    }

    /// Every entry, in order, verified bucket by bucket (for merging runs).
    pub fn for_each(&self, mut f: impl FnMut(RunEntry) -> Result<(), Error>) -> Result<(), Error> {
        for b in 0..self.buckets() {
            let buf = self.bucket(b)?;
            for r in buf.chunks_exact(ENTRY_LEN) {
                f(self.entry(r)?)?;
            }
        }
        Ok(())
    }

    /// The location an entry of this run gives.
    pub fn location(&self, e: &RunEntry) -> Location {
        Location {
            pack: self.packs[e.pack as usize],
            offset: e.offset,
            length: e.length,
            raw_len: e.raw_len,
            kind: e.kind,
        }
    }
}
