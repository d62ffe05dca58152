//! Packs and pack indexes. FORMAT.md "Packs" and "Indexes".
//!
//! A pack is one object holding many encoded blobs back to back, then its header, then the
//! header's length:  blob_0 || ... || blob_n || header || header_len u32 LE
//! The header is `object::seal(Index kind bytes)`-like: magic "VMKP", version, count, entries, and
//! is AEAD-sealed in encrypted repositories (plain: BLAKE3 checksum), so a pack describes itself
//! and the repository index can be rebuilt from packs alone.
//! A pack's id (its object name) is BLAKE3 of all its bytes.
use serde::{Deserialize, Serialize};

use crate::blob::{MAX_BLOB_PLAINTEXT, MAX_BLOB_STORED};
use crate::error::{Error, Result};
use crate::id::{BlobId, PackId};
use crate::keys::{BlobKind, Keys};

/// Where one blob lives inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub kind: BlobKind,
    pub id: BlobId,
    /// byte offset of the encoded blob in the pack
    pub offset: u32,
    /// length of the encoded blob
    pub length: u32,
    /// length of the plaintext
    pub raw_len: u32,
}

/// Builds a pack in memory. The repository flushes it once `len()` reaches its target size.
#[derive(Default)]
pub struct PackBuilder {
    // implementation detail
    data: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new() -> PackBuilder {
        PackBuilder::default()
    }

    /// Append an already encoded blob.
    ///
    /// Panics if the pack would exceed 4 GiB (the repository flushes long before).
    pub fn add(&mut self, kind: BlobKind, id: BlobId, raw_len: u32, encoded: &[u8]) {
        let offset = u32::try_from(self.data.len()).expect("pack data exceeds 4 GiB");
        let length = u32::try_from(encoded.len()).expect("encoded blob exceeds 4 GiB");
        assert!(
            offset.checked_add(length).is_some(),
            "pack data exceeds 4 GiB"
        );
        self.data.extend_from_slice(encoded);
        self.entries.push(PackEntry {
            kind,
            id,
            offset,
            length,
            raw_len,
        });
    }

    /// True once the pack should be flushed: its data reached `target` bytes, or it holds
    /// [`MAX_PACK_BLOBS`] blobs (more would not fit a header [`read_header`] accepts).
    pub fn is_full(&self, target: usize) -> bool {
        self.data.len() >= target || self.entries.len() >= MAX_PACK_BLOBS
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn blob_count(&self) -> usize {
        self.entries.len()
    }

    /// Finish: returns (pack id, the pack's bytes, its entries).
    ///
    /// Panics if the pack holds more than [`MAX_PACK_BLOBS`] blobs (its header would exceed
    /// [`MAX_HEADER`] and the pack could not be read back): flush when [`PackBuilder::is_full`].
    pub fn finish(self, keys: &Keys) -> (PackId, Vec<u8>, Vec<PackEntry>) {
        assert!(
            self.entries.len() <= MAX_PACK_BLOBS,
            "a pack holds at most {MAX_PACK_BLOBS} blobs, got {}",
            self.entries.len()
        );
        let mut body = Vec::with_capacity(HEADER_FIXED + self.entries.len() * ENTRY_LEN);
        body.extend_from_slice(&PACK_MAGIC);
        body.push(PACK_VERSION);
        body.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            put_entry(&mut body, e);
        }
        let sealed = if keys.is_encrypted() {
            keys.seal(PACK_HEADER_AAD, &body)
        } else {
            let sum = blake3::hash(&body);
            body.extend_from_slice(sum.as_bytes());
            body
        };
        let mut bytes = self.data;
        bytes.reserve_exact(sealed.len() + 4);
        bytes.extend_from_slice(&sealed);
        bytes.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        let id = PackId(*blake3::hash(&bytes).as_bytes());
        (id, bytes, self.entries)
    }
}

/// Read the header from the tail of a pack (`tail` = the last bytes of the pack, at least the
/// header and its length; `pack_len` = total length) and validate every entry lies inside the
/// pack's blob area. Used by `check` and by index rebuilding.
pub fn read_header(keys: &Keys, pack_len: u64, tail: &[u8]) -> Result<Vec<PackEntry>> {
    let corrupt = |reason: String| Error::Corrupt {
        kind: "pack",
        reason,
    };
    if tail.len() as u64 > pack_len {
        return Err(corrupt(format!(
            "tail of {} bytes is longer than the pack ({pack_len} bytes)",
            tail.len()
        )));
    }
    if tail.len() < 4 {
        return Err(corrupt(format!("truncated: {pack_len} bytes")));
    }
    let (rest, len_bytes) = tail.split_at(tail.len() - 4);
    let sealed_len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
    if sealed_len > MAX_HEADER {
        return Err(Error::TooLarge {
            kind: "pack header",
            size: sealed_len as u64,
            max: MAX_HEADER as u64,
        });
    }
    if sealed_len as u64 + 4 > pack_len {
        return Err(corrupt(format!(
            "header length {sealed_len} exceeds the pack ({pack_len} bytes)"
        )));
    }
    if sealed_len > rest.len() {
        return Err(corrupt(format!(
            "header length {sealed_len} exceeds the {} tail bytes given",
            rest.len()
        )));
    }
    let sealed = &rest[rest.len() - sealed_len..];
    let body = open_header(keys, sealed)?;
    let data_end = pack_len - 4 - sealed_len as u64;

    let bad = |reason: String| Error::Corrupt {
        kind: "pack header",
        reason,
    };
    if body.len() < 4 || body[..4] != PACK_MAGIC {
        return Err(Error::BadMagic {
            kind: "pack header",
        });
    }
    if body.len() < HEADER_FIXED {
        return Err(bad(format!("truncated: {} bytes", body.len())));
    }
    if body[4] != PACK_VERSION {
        return Err(Error::UnsupportedVersion {
            kind: "pack header",
            version: body[4] as u32,
            supported: PACK_VERSION as u32,
        });
    }
    let count = u32::from_le_bytes(body[5..9].try_into().expect("4 bytes")) as u64;
    if count * ENTRY_LEN as u64 + HEADER_FIXED as u64 != body.len() as u64 {
        return Err(bad(format!(
            "{count} entries do not match the header length {}",
            body.len()
        )));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for raw in body[HEADER_FIXED..].chunks_exact(ENTRY_LEN) {
        let e = get_entry(raw).map_err(bad)?;
        if e.offset as u64 + e.length as u64 > data_end {
            return Err(bad(format!(
                "blob {} at {}+{} lies outside the pack's {data_end} data bytes",
                e.id, e.offset, e.length
            )));
        }
        entries.push(e);
    }
    Ok(entries)
}

/// Verify and strip the checksum (plain) or AEAD seal (encrypted) of a pack header.
fn open_header(keys: &Keys, sealed: &[u8]) -> Result<Vec<u8>> {
    let integrity = Error::Integrity {
        kind: "pack header",
    };
    if keys.is_encrypted() {
        return keys.open(PACK_HEADER_AAD, sealed).map_err(|_| integrity);
    }
    if sealed.len() < 32 {
        return Err(integrity);
    }
    let (body, sum) = sealed.split_at(sealed.len() - 32);
    // blake3::Hash compares in constant time.
    if blake3::hash(body) != blake3::Hash::from_bytes(sum.try_into().expect("32 bytes")) {
        return Err(integrity);
    }
    Ok(body.to_vec())
}

/// "VMKP"
pub const PACK_MAGIC: [u8; 4] = *b"VMKP";
pub const PACK_VERSION: u8 = 1;
/// "VMKI"
pub const INDEX_MAGIC: [u8; 4] = *b"VMKI";
pub const INDEX_VERSION: u8 = 1;
/// Associated data of an encrypted pack header.
const PACK_HEADER_AAD: &[u8] = b"vmkeep pack header";
/// magic(4) || version(1) || count(4)
const HEADER_FIXED: usize = 9;
/// kind(1) || id(32) || offset(4) || length(4) || raw_len(4)
const ENTRY_LEN: usize = 45;

/// The most blobs one pack may hold, so that its sealed header stays below [`MAX_HEADER`].
pub const MAX_PACK_BLOBS: usize = 150_000;
const _: () = assert!(HEADER_FIXED + MAX_PACK_BLOBS * ENTRY_LEN + 64 <= MAX_HEADER);

fn put_entry(out: &mut Vec<u8>, e: &PackEntry) {
    out.push(e.kind as u8);
    out.extend_from_slice(e.id.as_bytes());
    out.extend_from_slice(&e.offset.to_le_bytes());
    out.extend_from_slice(&e.length.to_le_bytes());
    out.extend_from_slice(&e.raw_len.to_le_bytes());
}

/// Parse one ENTRY_LEN-byte entry; the error is a reason for Error::Corrupt.
fn get_entry(raw: &[u8]) -> Result<PackEntry, String> {
    let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
    let kind = BlobKind::from_u8(raw[0]).map_err(|e| e.to_string())?;
    let id = BlobId(raw[1..33].try_into().expect("32 bytes"));
    let entry = PackEntry {
        kind,
        id,
        offset: u32_at(33),
        length: u32_at(37),
        raw_len: u32_at(41),
    };
    // Readers fetch `length` bytes: bound it before anyone allocates that much.
    if entry.length as usize > MAX_BLOB_STORED {
        return Err(format!(
            "blob {} claims {} stored bytes, at most {MAX_BLOB_STORED} allowed",
            entry.id, entry.length
        ));
    }
    if entry.raw_len as usize > MAX_BLOB_PLAINTEXT {
        return Err(format!(
            "blob {} claims {} bytes of plaintext, at most {MAX_BLOB_PLAINTEXT} allowed",
            entry.id, entry.raw_len
        ));
    }
    Ok(entry)
}

/// The largest header `read_header` accepts; callers fetch min(pack_len, this) tail bytes.
pub const MAX_HEADER: usize = 8 << 20;

/// The largest pack any writer produces, the bound of whole-pack reads: a pack is written once
/// its blobs reach the pack size (at most [`crate::config::MAX_PACK_SIZE`]), so the last blob
/// may overshoot it by one blob, followed by the header and its length.
pub const MAX_PACK_LEN: u64 =
    crate::config::MAX_PACK_SIZE as u64 + MAX_BLOB_STORED as u64 + MAX_HEADER as u64 + 4;

/// An index object (`index/<name>`): which blobs live in which packs. Body before sealing:
/// magic "VMKI" || version u8 || pack count u32, then per pack: pack id (32) || entry count u32 ||
/// entries (kind u8, id 32, offset u32, length u32, raw_len u32). Compact binary, bounded on read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexFile {
    pub packs: Vec<(PackId, Vec<PackEntry>)>,
}

impl IndexFile {
    pub fn encode(&self) -> Vec<u8> {
        let entries: usize = self.packs.iter().map(|(_, e)| e.len()).sum();
        let mut out =
            Vec::with_capacity(HEADER_FIXED + self.packs.len() * 36 + entries * ENTRY_LEN);
        out.extend_from_slice(&INDEX_MAGIC);
        out.push(INDEX_VERSION);
        let count = |n: usize| u32::try_from(n).expect("index counts fit in u32");
        out.extend_from_slice(&count(self.packs.len()).to_le_bytes());
        for (pack, entries) in &self.packs {
            out.extend_from_slice(pack.as_bytes());
            out.extend_from_slice(&count(entries.len()).to_le_bytes());
            for e in entries {
                put_entry(&mut out, e);
            }
        }
        out
    }

    pub fn decode(body: &[u8]) -> Result<IndexFile> {
        let bad = |reason: String| Error::Corrupt {
            kind: "index",
            reason,
        };
        if body.len() < 4 || body[..4] != INDEX_MAGIC {
            return Err(Error::BadMagic { kind: "index" });
        }
        if body.len() < HEADER_FIXED {
            return Err(bad(format!("truncated: {} bytes", body.len())));
        }
        if body[4] != INDEX_VERSION {
            return Err(Error::UnsupportedVersion {
                kind: "index",
                version: body[4] as u32,
                supported: INDEX_VERSION as u32,
            });
        }
        let read_u32 = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4"));
        let pack_count = read_u32(5) as usize;
        let mut pos = HEADER_FIXED;
        // Every pack takes at least 36 bytes: bound the allocation by what is really there.
        if pack_count > (body.len() - pos) / 36 {
            return Err(bad(format!(
                "{pack_count} packs cannot fit in {} bytes",
                body.len() - pos
            )));
        }
        let mut packs = Vec::with_capacity(pack_count);
        for _ in 0..pack_count {
            if body.len() - pos < 36 {
                return Err(bad("truncated pack record".into()));
            }
            let pack = PackId(body[pos..pos + 32].try_into().expect("32 bytes"));
            let n = read_u32(pos + 32) as usize;
            pos += 36;
            if n > (body.len() - pos) / ENTRY_LEN {
                return Err(bad(format!(
                    "pack {pack} claims {n} entries, only {} bytes remain",
                    body.len() - pos
                )));
            }
            let end = pos + n * ENTRY_LEN;
            let entries = body[pos..end]
                .chunks_exact(ENTRY_LEN)
                .map(get_entry)
                .collect::<Result<Vec<_>, String>>()
                .map_err(bad)?;
            pos = end;
            packs.push((pack, entries));
        }
        if pos != body.len() {
            return Err(bad(format!("{} trailing bytes", body.len() - pos)));
        }
        Ok(IndexFile { packs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob;
    use crate::keys::MasterKey;
    use proptest::prelude::*;

    fn both_keys() -> [Keys; 2] {
        [Keys::plain(), Keys::encrypted(MasterKey::generate())]
    }

    fn tail(bytes: &[u8]) -> &[u8] {
        &bytes[bytes.len().saturating_sub(MAX_HEADER + 4)..]
    }

    /// A pack of `n` real blobs; returns the plaintexts too.
    fn build(keys: &Keys, n: usize) -> (PackId, Vec<u8>, Vec<PackEntry>, Vec<Vec<u8>>) {
        let mut b = PackBuilder::new();
        assert!(b.is_empty());
        let mut plains = Vec::new();
        for i in 0..n {
            let plain: Vec<u8> = format!("blob number {i} ").repeat(i + 1).into_bytes();
            let kind = if i % 3 == 0 {
                BlobKind::Tree
            } else {
                BlobKind::Data
            };
            let id = keys.blob_id(kind, &plain);
            let enc = blob::encode(keys, kind, &id, &plain);
            b.add(kind, id, plain.len() as u32, &enc);
            plains.push(plain);
        }
        assert_eq!(b.blob_count(), n);
        let (id, bytes, entries) = b.finish(keys);
        (id, bytes, entries, plains)
    }

    #[test]
    fn build_and_read_back() {
        for keys in both_keys() {
            for n in [0, 1, 5, 50] {
                let (id, bytes, entries, plains) = build(&keys, n);
                assert_eq!(id.0, *blake3::hash(&bytes).as_bytes());
                assert_eq!(entries.len(), n);
                let read = read_header(&keys, bytes.len() as u64, tail(&bytes)).unwrap();
                assert_eq!(read, entries);
                let mut expected_offset = 0;
                for (e, plain) in entries.iter().zip(&plains) {
                    assert_eq!(e.offset, expected_offset);
                    expected_offset += e.length;
                    let stored = &bytes[e.offset as usize..(e.offset + e.length) as usize];
                    let back = blob::decode(&keys, e.kind, &e.id, e.raw_len, stored).unwrap();
                    assert_eq!(&back, plain);
                }
                // The exact tail (header + length) is enough.
                let hlen =
                    u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap()) as usize;
                let exact = &bytes[bytes.len() - hlen - 4..];
                assert_eq!(
                    read_header(&keys, bytes.len() as u64, exact).unwrap(),
                    entries
                );
                // One byte less is not.
                assert!(read_header(&keys, bytes.len() as u64, &exact[1..]).is_err());
            }
        }
    }

    #[test]
    fn plain_header_layout() {
        let keys = Keys::plain();
        let mut b = PackBuilder::new();
        let id = BlobId([5; 32]);
        b.add(BlobKind::Tree, id, 77, b"0123456789");
        assert_eq!(b.len(), 10);
        let (_, bytes, _) = b.finish(&keys);
        let hlen = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap()) as usize;
        assert_eq!(hlen, 9 + 45 + 32);
        let header = &bytes[10..10 + hlen];
        assert_eq!(&header[..4], b"VMKP");
        assert_eq!(header[4], 1);
        assert_eq!(&header[5..9], &1u32.to_le_bytes());
        assert_eq!(header[9], 1);
        assert_eq!(&header[10..42], &[5; 32]);
        assert_eq!(&header[42..46], &0u32.to_le_bytes());
        assert_eq!(&header[46..50], &10u32.to_le_bytes());
        assert_eq!(&header[50..54], &77u32.to_le_bytes());
        assert_eq!(&header[54..], blake3::hash(&header[..54]).as_bytes());
    }

    #[test]
    fn damage_is_detected() {
        for keys in both_keys() {
            let (_, bytes, _, _) = build(&keys, 3);
            let len = bytes.len() as u64;
            let hlen = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap()) as usize;
            // Every byte of the header.
            for i in bytes.len() - 4 - hlen..bytes.len() - 4 {
                let mut bad = bytes.clone();
                bad[i] ^= 0x10;
                assert!(matches!(
                    read_header(&keys, len, tail(&bad)),
                    Err(Error::Integrity { .. })
                ));
            }
            // The length field.
            for v in [
                0u32,
                1,
                hlen as u32 - 1,
                hlen as u32 + 1,
                len as u32,
                u32::MAX,
            ] {
                let mut bad = bytes.clone();
                let at = bad.len() - 4;
                bad[at..].copy_from_slice(&v.to_le_bytes());
                assert!(read_header(&keys, len, tail(&bad)).is_err(), "length {v}");
            }
            // Truncated packs and lying pack lengths.
            assert!(read_header(&keys, 3, &bytes[..3]).is_err());
            assert!(read_header(&keys, len - 1, tail(&bytes)).is_err());
        }
        // The other mode's keys.
        let (_, bytes, _, _) = build(&Keys::plain(), 2);
        let enc = Keys::encrypted(MasterKey::generate());
        assert!(read_header(&enc, bytes.len() as u64, &bytes).is_err());
        let (_, bytes, _, _) = build(&enc, 2);
        assert!(read_header(&Keys::plain(), bytes.len() as u64, &bytes).is_err());
    }

    /// Seal an arbitrary header body the way `finish` does, to test the parser's checks.
    fn pack_with_header(keys: &Keys, data: &[u8], body: &[u8]) -> Vec<u8> {
        let sealed = if keys.is_encrypted() {
            keys.seal(PACK_HEADER_AAD, body)
        } else {
            [body, blake3::hash(body).as_bytes()].concat()
        };
        [data, &sealed, &(sealed.len() as u32).to_le_bytes()].concat()
    }

    fn entry_bytes(kind: u8, offset: u32, length: u32, raw_len: u32) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&[1; 32]);
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&length.to_le_bytes());
        v.extend_from_slice(&raw_len.to_le_bytes());
        v
    }

    #[test]
    fn header_contents_are_validated() {
        for keys in both_keys() {
            let data = [0u8; 100];
            let head = |count: u32| [&b"VMKP\x01"[..], &count.to_le_bytes()].concat();
            let check = |body: Vec<u8>| {
                let p = pack_with_header(&keys, &data, &body);
                read_header(&keys, p.len() as u64, &p)
            };
            assert_eq!(
                check([head(1), entry_bytes(0, 0, 100, 5)].concat())
                    .unwrap()
                    .len(),
                1
            );
            assert!(check([head(1), entry_bytes(0, 1, 100, 5)].concat()).is_err());
            assert!(check([head(1), entry_bytes(0, u32::MAX, 2, 5)].concat()).is_err());
            assert!(check([head(1), entry_bytes(2, 0, 10, 5)].concat()).is_err());
            assert!(check([head(1), entry_bytes(0, 0, 10, u32::MAX)].concat()).is_err());
            // A length no blob can have is refused before anyone reads that many bytes.
            let too_long = MAX_BLOB_STORED as u32 + 1;
            assert!(check([head(1), entry_bytes(0, 0, too_long, 5)].concat()).is_err());
            assert!(check([head(2), entry_bytes(0, 0, 10, 5)].concat()).is_err());
            assert!(check([head(0), entry_bytes(0, 0, 10, 5)].concat()).is_err());
            assert!(check(head(u32::MAX)).is_err());
            assert!(matches!(
                check(b"VMKP\x02\0\0\0\0".to_vec()),
                Err(Error::UnsupportedVersion { .. })
            ));
            assert!(matches!(
                check(b"VMKX\x01\0\0\0\0".to_vec()),
                Err(Error::BadMagic { .. })
            ));
            assert!(check(b"VMKP".to_vec()).is_err());
            assert!(check(Vec::new()).is_err());
        }
    }

    #[test]
    fn is_full() {
        let mut b = PackBuilder::new();
        b.add(BlobKind::Data, BlobId([1; 32]), 10, &[0; 10]);
        assert!(!b.is_full(11));
        assert!(b.is_full(10));
    }

    #[test]
    fn max_pack_blobs_fits_a_header() {
        let keys = Keys::encrypted(MasterKey::generate());
        let mut b = PackBuilder::new();
        for i in 0..MAX_PACK_BLOBS {
            b.add(BlobKind::Data, BlobId([i as u8; 32]), 1, b"x");
        }
        assert!(b.is_full(usize::MAX));
        let (_, bytes, entries) = b.finish(&keys);
        assert_eq!(
            read_header(&keys, bytes.len() as u64, tail(&bytes)).unwrap(),
            entries
        );
    }

    #[test]
    fn index_file_round_trip_and_errors() {
        let (id, _, entries, _) = build(&Keys::plain(), 7);
        let index = IndexFile {
            packs: vec![
                (id, entries.clone()),
                (PackId([3; 32]), Vec::new()),
                (id, entries),
            ],
        };
        let body = index.encode();
        assert_eq!(&body[..5], b"VMKI\x01");
        assert_eq!(IndexFile::decode(&body).unwrap(), index);
        assert_eq!(
            IndexFile::decode(&IndexFile::default().encode()).unwrap(),
            IndexFile::default()
        );
        for n in 0..body.len() {
            assert!(IndexFile::decode(&body[..n]).is_err(), "prefix {n}");
        }
        assert!(IndexFile::decode(&[&body[..], b"x"].concat()).is_err());
        let mut bad = body.clone();
        bad[4] = 9;
        assert!(matches!(
            IndexFile::decode(&bad),
            Err(Error::UnsupportedVersion { .. })
        ));
        let mut bad = body.clone();
        bad[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            IndexFile::decode(&bad),
            Err(Error::Corrupt { .. })
        ));
        let mut bad = body.clone();
        bad[9 + 32..9 + 36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            IndexFile::decode(&bad),
            Err(Error::Corrupt { .. })
        ));
        // The first entry's stored length (after pack id, count, kind, id, offset) beyond any blob.
        let mut bad = body.clone();
        let at = 9 + 36 + 1 + 32 + 4;
        bad[at..at + 4].copy_from_slice(&(MAX_BLOB_STORED as u32 + 1).to_le_bytes());
        assert!(matches!(
            IndexFile::decode(&bad),
            Err(Error::Corrupt { .. })
        ));
        let mut bad = body;
        bad[9 + 36] = 7; // kind of the first entry
        assert!(matches!(
            IndexFile::decode(&bad),
            Err(Error::Corrupt { .. })
        ));
    }

    fn arb_entry() -> impl Strategy<Value = PackEntry> {
        (
            any::<bool>(),
            any::<[u8; 32]>(),
            any::<u32>(),
            0..=MAX_BLOB_STORED as u32,
            0..=MAX_BLOB_PLAINTEXT as u32,
        )
            .prop_map(|(tree, id, offset, length, raw_len)| PackEntry {
                kind: if tree { BlobKind::Tree } else { BlobKind::Data },
                id: BlobId(id),
                offset,
                length,
                raw_len,
            })
    }

    proptest! {
        #[test]
        fn prop_index_round_trip(packs in proptest::collection::vec(
            (any::<[u8; 32]>(), proptest::collection::vec(arb_entry(), 0..20)), 0..10)) {
            let index = IndexFile {
                packs: packs.into_iter().map(|(id, e)| (PackId(id), e)).collect(),
            };
            prop_assert_eq!(IndexFile::decode(&index.encode()).unwrap(), index);
        }

        #[test]
        fn prop_pack_round_trip(blobs in proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..20)) {
            for keys in both_keys() {
                let mut b = PackBuilder::new();
                for (tree, data) in &blobs {
                    let kind = if *tree { BlobKind::Tree } else { BlobKind::Data };
                    let id = keys.blob_id(kind, data);
                    b.add(kind, id, data.len() as u32, &blob::encode(&keys, kind, &id, data));
                }
                let (_, bytes, entries) = b.finish(&keys);
                let read = read_header(&keys, bytes.len() as u64, tail(&bytes)).unwrap();
                prop_assert_eq!(&read, &entries);
                for (e, (_, data)) in entries.iter().zip(&blobs) {
                    let stored = &bytes[e.offset as usize..(e.offset + e.length) as usize];
                    prop_assert_eq!(&blob::decode(&keys, e.kind, &e.id, e.raw_len, stored).unwrap(), data);
                }
            }
        }

        #[test]
        fn prop_index_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = IndexFile::decode(&bytes);
            let _ = IndexFile::decode(&[&b"VMKI\x01"[..], &bytes].concat());
        }

        #[test]
        fn prop_read_header_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                         extra in prop_oneof![Just(0u64), any::<u64>()]) {
            for keys in both_keys() {
                let len = (bytes.len() as u64).saturating_add(extra);
                let _ = read_header(&keys, len, &bytes);
                let _ = read_header(&keys, extra, &bytes);
            }
            // Valid checksum, arbitrary body.
            let keys = Keys::plain();
            let p = pack_with_header(&keys, &bytes, &[&b"VMKP\x01"[..], &bytes].concat());
            let _ = read_header(&keys, p.len() as u64, &p);
        }
    }
}
