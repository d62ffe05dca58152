//! Test images described chunk by chunk: holes, written zeros, compressible text, random bytes,
//! and one-byte edits of those, so a test knows exactly what each chunk of a disk holds.
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::data::Rng;

/// The chunk size of the test repositories these images are made for (64 KiB).
pub const CHUNK: u64 = 64 << 10;

/// What one chunk of a test image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Never written: a hole in the sparse file (reads as zeros).
    Hole,
    /// Written, but all zeros (the filesystem reports it as data).
    Zeros,
    /// Repeated text with random words: compressible.
    Text(u64),
    /// Random bytes: incompressible.
    Random(u64),
    /// The content of `Text(seed)` (text) or `Random(seed)` with the byte at `pos` flipped.
    Flipped { seed: u64, text: bool, pos: u32 },
    /// Zeros but for one byte at `pos`.
    Byte(u32),
}

const WORDS: &[&str] = &[
    "virtual",
    "machine",
    "disk",
    "image",
    "backup",
    "restore",
    "chunk",
    "pack",
    "index",
    "manifest",
    "kernel",
    "block",
    "sector",
    "qemu",
    "lease",
    "prune",
    "forget",
    "zstd",
    "blake3",
    "repository",
    "snapshot",
    "sparse",
    "hole",
    "bitrot",
];

impl Chunk {
    /// The chunk's bytes (`len` <= CHUNK; shorter for a disk's last partial chunk).
    pub fn bytes(self, len: usize) -> Vec<u8> {
        match self {
            Chunk::Hole | Chunk::Zeros => vec![0u8; len],
            Chunk::Random(seed) => {
                let mut v = vec![0u8; len];
                Rng::new(seed).fill(&mut v);
                v
            }
            Chunk::Flipped { seed, text, pos } => {
                let base = if text {
                    Chunk::Text(seed)
                } else {
                    Chunk::Random(seed)
                };
                let mut v = base.bytes(len);
                v[pos as usize % len] ^= 1;
                v
            }
            Chunk::Byte(pos) => {
                let mut v = vec![0u8; len];
                v[pos as usize % len] = 1;
                v
            }
            Chunk::Text(seed) => {
                let mut rng = Rng::new(seed);
                let mut v = Vec::with_capacity(len + 64);
                while v.len() < len {
                    if rng.below(8) == 0 {
                        v.extend_from_slice(format!("{:016x} ", rng.next_u64()).as_bytes());
                    } else {
                        v.extend_from_slice(
                            WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes(),
                        );
                        v.push(b' ');
                    }
                }
                v.truncate(len);
                v
            }
        }
    }

    pub fn is_zero(self) -> bool {
        matches!(self, Chunk::Hole | Chunk::Zeros)
    }

    /// The same content with one byte changed.
    pub fn flip(self, pos: u32) -> Chunk {
        match self {
            Chunk::Hole | Chunk::Zeros => Chunk::Byte(pos),
            Chunk::Text(seed) => Chunk::Flipped {
                seed,
                text: true,
                pos,
            },
            Chunk::Random(seed) => Chunk::Flipped {
                seed,
                text: false,
                pos,
            },
            Chunk::Flipped { seed, text, .. } => Chunk::Flipped { seed, text, pos },
            Chunk::Byte(_) => Chunk::Byte(pos),
        }
    }
}

/// A test image: its size and what each chunk holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub size: u64,
    pub chunks: Vec<Chunk>,
}

impl Spec {
    pub fn chunk_count(size: u64) -> usize {
        size.div_ceil(CHUNK) as usize
    }

    /// A semi-compressible image: ~10 % holes, ~5 % written zeros, ~45 % text, ~40 % random.
    pub fn mixed(size: u64, rng: &mut Rng) -> Spec {
        let chunks = (0..Spec::chunk_count(size))
            .map(|_| random_chunk(rng))
            .collect();
        Spec { size, chunks }
    }

    /// Every chunk random (incompressible, distinct).
    pub fn random(size: u64, rng: &mut Rng) -> Spec {
        let chunks = (0..Spec::chunk_count(size))
            .map(|_| Chunk::Random(rng.next_u64()))
            .collect();
        Spec { size, chunks }
    }

    /// A copy with about `percent` % of the chunks replaced by fresh content.
    pub fn mutate(&self, percent: u64, rng: &mut Rng) -> Spec {
        let mut s = self.clone();
        for c in s.chunks.iter_mut() {
            if rng.below(100) < percent {
                *c = random_chunk(rng);
            }
        }
        s
    }

    /// A copy with the chunks in `range` replaced by fresh random content.
    pub fn rewrite(&self, range: std::ops::Range<usize>, rng: &mut Rng) -> Spec {
        let mut s = self.clone();
        for c in &mut s.chunks[range] {
            *c = Chunk::Random(rng.next_u64());
        }
        s
    }

    pub fn chunk_len(&self, i: usize) -> usize {
        (self.size - i as u64 * CHUNK).min(CHUNK) as usize
    }

    pub fn chunk_bytes(&self, i: usize) -> Vec<u8> {
        self.chunks[i].bytes(self.chunk_len(i))
    }

    /// Write the image as a sparse file: holes are never written.
    pub fn write(&self, path: &Path) -> PathBuf {
        let f = File::create(path).unwrap();
        f.set_len(self.size).unwrap();
        for (i, c) in self.chunks.iter().enumerate() {
            if *c != Chunk::Hole {
                f.write_all_at(&self.chunk_bytes(i), i as u64 * CHUNK)
                    .unwrap();
            }
        }
        f.sync_all().ok();
        path.to_path_buf()
    }

    /// Distinct non-zero chunk contents.
    pub fn distinct_data_chunks(&self) -> usize {
        let mut set = std::collections::HashSet::new();
        for i in 0..self.chunks.len() {
            let b = self.chunk_bytes(i);
            if b.iter().any(|&x| x != 0) {
                set.insert(blake3::hash(&b));
            }
        }
        set.len()
    }
}

fn random_chunk(rng: &mut Rng) -> Chunk {
    match rng.below(100) {
        0..=9 => Chunk::Hole,
        10..=14 => Chunk::Zeros,
        15..=59 => Chunk::Text(rng.next_u64()),
        _ => Chunk::Random(rng.next_u64()),
    }
}

/// Chunk indexes whose content differs between two images of the same size (zero chunks, holes
/// or written zeros, count as equal).
pub fn differing_chunks(old: &Path, new: &Path) -> Vec<u64> {
    let a = fs::read(old).unwrap();
    let b = fs::read(new).unwrap();
    assert_eq!(a.len(), b.len(), "same size");
    a.chunks(CHUNK as usize)
        .zip(b.chunks(CHUNK as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}
