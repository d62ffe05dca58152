//! Streams: byte sequences without fixed geometry (memory and device state, VM configuration),
//! cut by content-defined chunking (FastCDC v2020) so an insertion shifts only nearby chunks.
//! FORMAT.md "Streams".
//!
//! A stream's index is a list of (chunk id, length) entries split into Tree blobs of at most
//! [`ENTRIES_PER_BLOB`] entries: magic "VMKS" || version u8 || count u32 || count*(id 32, len u32).
//! The manifest lists those blob ids in order.
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::BlobId;

pub const ENTRIES_PER_BLOB: usize = 4096;

/// Chunking parameters (bytes): min, average, max; all even, max <= 4 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdcParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl CdcParams {
    /// Memory state dedups best with small chunks (qemu-facts.md §8): 8 / 16 / 64 KiB.
    pub const MEMORY: CdcParams = CdcParams {
        min: 8 << 10,
        avg: 16 << 10,
        max: 64 << 10,
    };
    /// General streams (configuration, files): 64 KiB / 256 KiB / 1 MiB.
    pub const GENERAL: CdcParams = CdcParams {
        min: 64 << 10,
        avg: 256 << 10,
        max: 1 << 20,
    };
}

impl CdcParams {
    /// Check the parameters suit FastCDC v2020: all even, 64 <= min <= avg <= max,
    /// avg >= 256, max >= 1024, max <= 4 MiB.
    pub fn validate(&self) -> Result<()> {
        let CdcParams { min, avg, max } = *self;
        let ok = min % 2 == 0
            && avg % 2 == 0
            && max % 2 == 0
            && min >= fastcdc::v2020::MINIMUM_MIN as u32
            && avg >= fastcdc::v2020::AVERAGE_MIN as u32
            && max >= fastcdc::v2020::MAXIMUM_MIN as u32
            && min <= avg
            && avg <= max
            && max <= MAX_STREAM_CHUNK;
        if !ok {
            return Err(Error::Invalid {
                what: "chunking parameters",
                reason: format!(
                    "need even sizes with 64 <= min <= avg <= max <= 4 MiB, avg >= 256 and \
                     max >= 1024; got min {min}, avg {avg}, max {max}"
                ),
            });
        }
        Ok(())
    }
}

/// Largest stream chunk (and largest length a stream index entry may record).
pub const MAX_STREAM_CHUNK: u32 = 4 << 20;

/// Incremental content-defined chunker: feed bytes as they arrive, get back chunk boundaries.
/// Must produce exactly the cuts `fastcdc::v2020::FastCDC` produces over the whole stream.
pub struct StreamChunker {
    // implementation detail
    params: CdcParams,
    pending: Vec<u8>,
    masks: (u64, u64),
}

impl StreamChunker {
    ///
    /// Panics if `params` fail [`CdcParams::validate`] (the built-in sets pass).
    pub fn new(params: CdcParams) -> StreamChunker {
        if let Err(e) = params.validate() {
            panic!("{e}");
        }
        StreamChunker {
            params,
            pending: Vec::new(),
            masks: fastcdc::v2020::select_masks(
                params.avg as usize,
                fastcdc::v2020::Normalization::Level1,
            ),
        }
    }

    /// Length of the next chunk at the start of `data`, exactly as `FastCDC` (normalisation
    /// level 1) decides it when `data` is the rest of the stream. The decision reads at most
    /// `max` bytes, so it is final as soon as `data` holds `max` bytes.
    fn cut(&self, data: &[u8]) -> usize {
        let (mask_s, mask_l) = self.masks;
        let (_, len) = fastcdc::v2020::cut(
            data,
            self.params.min as usize,
            self.params.avg as usize,
            self.params.max as usize,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        len
    }

    /// Append data; returns the complete chunks now decidable (each a Vec of its bytes).
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        let max = self.params.max as usize;
        self.pending.extend_from_slice(data);
        let mut chunks = Vec::new();
        let mut pos = 0;
        while self.pending.len() - pos >= max {
            let len = self.cut(&self.pending[pos..]);
            chunks.push(self.pending[pos..pos + len].to_vec());
            pos += len;
        }
        self.pending.drain(..pos);
        chunks
    }

    /// End of stream: the remaining chunks.
    pub fn finish(self) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        let mut rest = &self.pending[..];
        while !rest.is_empty() {
            let len = self.cut(rest);
            chunks.push(rest[..len].to_vec());
            rest = &rest[len..];
        }
        chunks
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamEntry {
    pub id: BlobId,
    pub len: u32,
}

/// "VMKS"
pub const STREAM_INDEX_MAGIC: [u8; 4] = *b"VMKS";
pub const STREAM_INDEX_VERSION: u8 = 1;
/// magic(4) || version(1) || count(4)
const INDEX_HEADER: usize = 9;
/// id(32) || len(4)
const INDEX_ENTRY: usize = 36;

/// Panics if given more than [`ENTRIES_PER_BLOB`] entries (split the list first).
pub fn encode_index_blob(entries: &[StreamEntry]) -> Vec<u8> {
    assert!(
        entries.len() <= ENTRIES_PER_BLOB,
        "a stream index blob holds at most {ENTRIES_PER_BLOB} entries, got {}",
        entries.len()
    );
    let mut out = Vec::with_capacity(INDEX_HEADER + entries.len() * INDEX_ENTRY);
    out.extend_from_slice(&STREAM_INDEX_MAGIC);
    out.push(STREAM_INDEX_VERSION);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
    out
}

/// Bounded by ENTRIES_PER_BLOB; validates lengths (each <= 4 MiB).
pub fn decode_index_blob(bytes: &[u8]) -> Result<Vec<StreamEntry>> {
    let corrupt = |reason: String| Error::Corrupt {
        kind: "stream index",
        reason,
    };
    if bytes.len() < 4 || bytes[..4] != STREAM_INDEX_MAGIC {
        return Err(Error::BadMagic {
            kind: "stream index",
        });
    }
    if bytes.len() < INDEX_HEADER {
        return Err(corrupt(format!("truncated: {} bytes", bytes.len())));
    }
    if bytes[4] != STREAM_INDEX_VERSION {
        return Err(Error::UnsupportedVersion {
            kind: "stream index",
            version: bytes[4] as u32,
            supported: STREAM_INDEX_VERSION as u32,
        });
    }
    let count = u32::from_le_bytes(bytes[5..9].try_into().expect("4 bytes")) as usize;
    if count > ENTRIES_PER_BLOB {
        return Err(corrupt(format!(
            "{count} entries, at most {ENTRIES_PER_BLOB} allowed"
        )));
    }
    if bytes.len() != INDEX_HEADER + count * INDEX_ENTRY {
        return Err(corrupt(format!(
            "{count} entries do not match the length of {} bytes",
            bytes.len()
        )));
    }
    bytes[INDEX_HEADER..]
        .chunks_exact(INDEX_ENTRY)
        .map(|raw| {
            let id = BlobId(raw[..32].try_into().expect("32 bytes"));
            let len = u32::from_le_bytes(raw[32..].try_into().expect("4 bytes"));
            if len == 0 || len > MAX_STREAM_CHUNK {
                return Err(corrupt(format!(
                    "chunk {id} has length {len}, expected 1..={MAX_STREAM_CHUNK}"
                )));
            }
            Ok(StreamEntry { id, len })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Small parameters so tests see many cuts in little data.
    const SMALL: CdcParams = CdcParams {
        min: 64,
        avg: 256,
        max: 1024,
    };

    /// Pseudo-random but reproducible bytes with some repetition.
    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|i| {
                if (i / 4096) % 4 == 3 {
                    (i % 7) as u8 // a compressible, low-entropy stretch
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    fn one_shot(p: CdcParams, input: &[u8]) -> Vec<Vec<u8>> {
        fastcdc::v2020::FastCDC::new(input, p.min as usize, p.avg as usize, p.max as usize)
            .map(|c| input[c.offset..c.offset + c.length].to_vec())
            .collect()
    }

    fn incremental(p: CdcParams, input: &[u8], pieces: &[usize]) -> Vec<Vec<u8>> {
        let mut c = StreamChunker::new(p);
        let mut out = Vec::new();
        let mut rest = input;
        let mut sizes = pieces.iter().cycle();
        while !rest.is_empty() {
            let n = sizes.next().copied().unwrap_or(rest.len()).min(rest.len());
            out.extend(c.push(&rest[..n]));
            rest = &rest[n..];
            // Never more than `max` undecided bytes held back.
            assert!(c.pending.len() < p.max as usize);
        }
        out.extend(c.push(&[]));
        out.extend(c.finish());
        out
    }

    #[test]
    fn builtin_params_are_valid() {
        CdcParams::MEMORY.validate().unwrap();
        CdcParams::GENERAL.validate().unwrap();
        SMALL.validate().unwrap();
        for bad in [
            CdcParams {
                min: 63,
                avg: 256,
                max: 1024,
            },
            CdcParams {
                min: 64,
                avg: 256,
                max: 1023,
            },
            CdcParams {
                min: 512,
                avg: 256,
                max: 1024,
            },
            CdcParams {
                min: 64,
                avg: 2048,
                max: 1024,
            },
            CdcParams {
                min: 64,
                avg: 256,
                max: 8 << 20,
            },
            CdcParams {
                min: 0,
                avg: 0,
                max: 0,
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matches_one_shot_for_builtin_params() {
        let input = data(3 << 20, 1);
        for p in [CdcParams::MEMORY, CdcParams::GENERAL] {
            let expected = one_shot(p, &input);
            assert!(expected.len() > 2);
            for pieces in [
                &[1 << 20][..],
                &[4096],
                &[65536 + 1],
                &[3 << 20],
                &[7, 100_000, 1],
            ] {
                assert_eq!(incremental(p, &input, pieces), expected);
            }
        }
    }

    #[test]
    fn zeros_cut_at_max() {
        let input = vec![0u8; 200_000];
        let chunks = incremental(CdcParams::MEMORY, &input, &[10_000]);
        assert_eq!(chunks, one_shot(CdcParams::MEMORY, &input));
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.len() == 64 << 10));
    }

    #[test]
    fn empty_and_tiny_streams() {
        assert!(StreamChunker::new(SMALL).finish().is_empty());
        let mut c = StreamChunker::new(SMALL);
        assert!(c.push(b"abc").is_empty());
        assert_eq!(c.finish(), vec![b"abc".to_vec()]);
    }

    #[test]
    #[should_panic]
    fn invalid_params_panic() {
        StreamChunker::new(CdcParams {
            min: 1,
            avg: 3,
            max: 5,
        });
    }

    #[test]
    fn index_blob_round_trip() {
        let entries: Vec<StreamEntry> = (0..ENTRIES_PER_BLOB)
            .map(|i| StreamEntry {
                id: BlobId([(i % 251) as u8; 32]),
                len: (i as u32 % MAX_STREAM_CHUNK) + 1,
            })
            .collect();
        for n in [0, 1, 2, ENTRIES_PER_BLOB] {
            let bytes = encode_index_blob(&entries[..n]);
            assert_eq!(bytes.len(), 9 + 36 * n);
            assert_eq!(&bytes[..5], b"VMKS\x01");
            assert_eq!(decode_index_blob(&bytes).unwrap(), &entries[..n]);
        }
    }

    #[test]
    fn index_blob_errors() {
        let entries = [
            StreamEntry {
                id: BlobId([1; 32]),
                len: 10,
            },
            StreamEntry {
                id: BlobId::ZERO,
                len: MAX_STREAM_CHUNK,
            },
        ];
        let bytes = encode_index_blob(&entries);
        for n in 0..bytes.len() {
            assert!(decode_index_blob(&bytes[..n]).is_err());
        }
        assert!(decode_index_blob(&[&bytes[..], &[0]].concat()).is_err());
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode_index_blob(&bad),
            Err(Error::BadMagic { .. })
        ));
        let mut bad = bytes.clone();
        bad[4] = 2;
        assert!(matches!(
            decode_index_blob(&bad),
            Err(Error::UnsupportedVersion { .. })
        ));
        let mut bad = bytes.clone();
        bad[5..9].copy_from_slice(&(ENTRIES_PER_BLOB as u32 + 1).to_le_bytes());
        assert!(matches!(
            decode_index_blob(&bad),
            Err(Error::Corrupt { .. })
        ));
        for len in [0u32, MAX_STREAM_CHUNK + 1, u32::MAX] {
            let mut bad = bytes.clone();
            bad[9 + 32..9 + 36].copy_from_slice(&len.to_le_bytes());
            assert!(matches!(
                decode_index_blob(&bad),
                Err(Error::Corrupt { .. })
            ));
        }
    }

    #[test]
    #[should_panic(expected = "at most 4096")]
    fn encode_rejects_oversized_lists() {
        let e = StreamEntry {
            id: BlobId::ZERO,
            len: 1,
        };
        encode_index_blob(&vec![e; ENTRIES_PER_BLOB + 1]);
    }

    proptest! {
        #[test]
        fn prop_incremental_matches_one_shot(
            len in 0usize..20_000,
            seed in any::<u64>(),
            pieces in proptest::collection::vec(1usize..3000, 1..10),
        ) {
            let input = data(len, seed);
            let chunks = incremental(SMALL, &input, &pieces);
            prop_assert_eq!(&chunks, &one_shot(SMALL, &input));
            prop_assert_eq!(chunks.concat(), input);
            for c in &chunks {
                prop_assert!(!c.is_empty() && c.len() <= SMALL.max as usize);
            }
        }

        #[test]
        fn prop_incremental_matches_one_shot_memory_params(
            len in 0usize..400_000,
            seed in any::<u64>(),
            pieces in proptest::collection::vec(1usize..100_000, 1..5),
        ) {
            let input = data(len, seed);
            let chunks = incremental(CdcParams::MEMORY, &input, &pieces);
            prop_assert_eq!(chunks.concat(), input.clone());
            prop_assert_eq!(chunks, one_shot(CdcParams::MEMORY, &input));
        }

        #[test]
        fn prop_index_round_trip(raw in proptest::collection::vec((any::<[u8; 32]>(), 1..=MAX_STREAM_CHUNK), 0..100)) {
            let entries: Vec<StreamEntry> = raw.into_iter().map(|(id, len)| StreamEntry { id: BlobId(id), len }).collect();
            prop_assert_eq!(decode_index_blob(&encode_index_blob(&entries)).unwrap(), entries);
        }

        #[test]
        fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_index_blob(&bytes);
            let _ = decode_index_blob(&[&b"VMKS\x01"[..], &bytes].concat());
        }
    }
}
