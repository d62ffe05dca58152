//! Blob framing: how one blob (chunk or tree node) is stored inside a pack. FORMAT.md "Blobs".
//!
//! plain repository:     flags(u8) || payload
//! encrypted repository: seal(aad = kind(u8) || id(32), flags(u8) || payload)
//! flags bit 0: payload is zstd-compressed (level 1); otherwise raw (stored raw when zstd does not
//! shrink it by at least 1/32).
//! Every decode verifies the plaintext against the id it is stored under.
use std::cell::RefCell;

use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::keys::{BlobKind, Keys};

/// Largest plaintext of any blob: 4 MiB chunks (the largest chunk size) plus slack for nodes.
pub const MAX_BLOB_PLAINTEXT: usize = 4 * 1024 * 1024 + 4096;

/// Largest stored blob: flags byte, the plaintext stored raw (compression is kept only when it
/// shrinks), and the AEAD nonce and tag of an encrypted repository.
pub const MAX_BLOB_STORED: usize = 1 + MAX_BLOB_PLAINTEXT + crate::keys::SEAL_OVERHEAD;

/// flags bit 0: the payload is zstd-compressed.
const FLAG_ZSTD: u8 = 1;
/// zstd level used for every blob.
const ZSTD_LEVEL: i32 = 1;

thread_local! {
    /// Reused per thread: creating a zstd context per blob costs more than compressing a small one.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// The associated data binding a sealed blob to its kind and id: kind(u8) || id(32).
fn blob_aad(kind: BlobKind, id: &BlobId) -> [u8; 33] {
    let mut aad = [0u8; 33];
    aad[0] = kind as u8;
    aad[1..].copy_from_slice(id.as_bytes());
    aad
}

/// flags || payload: compressed when zstd saves at least 1/32 of the plaintext, else raw.
fn frame(plaintext: &[u8]) -> Vec<u8> {
    // Room for the plaintext: compressed output that does not fit is not worth keeping.
    let mut out = Vec::with_capacity(1 + plaintext.len());
    out.push(FLAG_ZSTD);
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        let Some(c) = c.as_mut() else { return false };
        let mut cursor = std::io::Cursor::new(&mut out);
        cursor.set_position(1);
        c.compress_to_buffer(plaintext, &mut cursor).is_ok()
    });
    let clen = out.len().saturating_sub(1);
    if !(compressed && out.len() > 1 && clen + clen / 32 < plaintext.len()) {
        out.clear();
        out.push(0);
        out.extend_from_slice(plaintext);
    }
    out
}

/// Encode a blob whose id the caller already computed with `keys.blob_id(kind, plaintext)`.
pub fn encode(keys: &Keys, kind: BlobKind, id: &BlobId, plaintext: &[u8]) -> Vec<u8> {
    let framed = frame(plaintext);
    if keys.is_encrypted() {
        keys.seal(&blob_aad(kind, id), &framed)
    } else {
        framed
    }
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        kind: "blob",
        reason,
    }
}

fn decompress(payload: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| corrupt(format!("cannot create a zstd context: {e}")))?,
            );
        }
        let d = d.as_mut().expect("set above");
        d.decompress(payload, raw_len)
            .map_err(|e| corrupt(format!("zstd: {e}")))
    })
}

/// Decode and verify. `raw_len` is the plaintext length recorded in the pack header (a bound for
/// decompression). Errors: Integrity (AEAD), Corrupt (framing / zstd), BlobMismatch (hash).
pub fn decode(
    keys: &Keys,
    kind: BlobKind,
    id: &BlobId,
    raw_len: u32,
    stored: &[u8],
) -> Result<Vec<u8>> {
    if raw_len as usize > MAX_BLOB_PLAINTEXT {
        return Err(Error::TooLarge {
            kind: "blob",
            size: raw_len as u64,
            max: MAX_BLOB_PLAINTEXT as u64,
        });
    }
    let opened;
    let framed: &[u8] = if keys.is_encrypted() {
        opened = keys
            .open(&blob_aad(kind, id), stored)
            .map_err(|e| match e {
                Error::Integrity { .. } => Error::Integrity { kind: "blob" },
                other => other,
            })?;
        &opened
    } else {
        stored
    };
    let (&flags, payload) = framed
        .split_first()
        .ok_or_else(|| corrupt("empty blob (no flags byte)".into()))?;
    let plain = match flags {
        0 => {
            if payload.len() != raw_len as usize {
                return Err(corrupt(format!(
                    "raw payload is {} bytes, the pack header says {raw_len}",
                    payload.len()
                )));
            }
            payload.to_vec()
        }
        FLAG_ZSTD => {
            let plain = decompress(payload, raw_len as usize)?;
            if plain.len() != raw_len as usize {
                return Err(corrupt(format!(
                    "decompressed to {} bytes, the pack header says {raw_len}",
                    plain.len()
                )));
            }
            plain
        }
        other => return Err(corrupt(format!("unknown flags {other:#04x}"))),
    };
    let actual = keys.blob_id(kind, &plain);
    if actual != *id {
        return Err(Error::BlobMismatch { id: *id, actual });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;
    use proptest::prelude::*;

    fn both_keys() -> [Keys; 2] {
        [Keys::plain(), Keys::encrypted(MasterKey::generate())]
    }

    /// Text-like data that zstd shrinks well.
    fn compressible(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog 0123456789 "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    fn random(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        getrandom::getrandom(&mut v).unwrap();
        v
    }

    fn round_trip(keys: &Keys, kind: BlobKind, plain: &[u8]) -> Vec<u8> {
        let id = keys.blob_id(kind, plain);
        let stored = encode(keys, kind, &id, plain);
        let back = decode(keys, kind, &id, plain.len() as u32, &stored).unwrap();
        assert_eq!(back, plain);
        stored
    }

    #[test]
    fn compressible_data_is_compressed() {
        let plain = compressible(64 << 10);
        let keys = Keys::plain();
        let stored = round_trip(&keys, BlobKind::Data, &plain);
        assert_eq!(stored[0], FLAG_ZSTD);
        assert!(stored.len() < plain.len() / 10);
        let enc = Keys::encrypted(MasterKey::generate());
        let sealed = round_trip(&enc, BlobKind::Tree, &plain);
        assert!(sealed.len() < plain.len() / 10);
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let plain = random(64 << 10);
        let stored = round_trip(&Keys::plain(), BlobKind::Data, &plain);
        assert_eq!(stored[0], 0);
        assert_eq!(&stored[1..], &plain[..]);
        let enc = Keys::encrypted(MasterKey::generate());
        let sealed = round_trip(&enc, BlobKind::Data, &plain);
        assert_eq!(sealed.len(), 1 + plain.len() + crate::keys::SEAL_OVERHEAD);
    }

    #[test]
    fn compression_must_save_a_32nd() {
        // Half random, half constant: compresses to about half. Kept.
        let mut plain = random(32 << 10);
        plain.extend(std::iter::repeat_n(7u8, 32 << 10));
        assert_eq!(
            round_trip(&Keys::plain(), BlobKind::Data, &plain)[0],
            FLAG_ZSTD
        );
        // 1/64 constant: saves less than 1/32. Stored raw.
        let mut plain = random(63 << 10);
        plain.extend(std::iter::repeat_n(7u8, 1 << 10));
        assert_eq!(round_trip(&Keys::plain(), BlobKind::Data, &plain)[0], 0);
    }

    #[test]
    fn edge_sizes() {
        for keys in both_keys() {
            for len in [0usize, 1, 2, 31, 32, 33, 100, 4096] {
                round_trip(&keys, BlobKind::Data, &compressible(len));
                round_trip(&keys, BlobKind::Tree, &random(len));
            }
            round_trip(&keys, BlobKind::Data, &vec![0u8; 1 << 20]);
            round_trip(&keys, BlobKind::Data, &random(MAX_BLOB_PLAINTEXT));
        }
    }

    #[test]
    fn decode_detects_mismatch_and_damage() {
        for keys in both_keys() {
            let plain = compressible(10_000);
            let id = keys.blob_id(BlobKind::Data, &plain);
            let stored = encode(&keys, BlobKind::Data, &id, &plain);
            let len = plain.len() as u32;
            // Stored under another id.
            let other = keys.blob_id(BlobKind::Data, b"other");
            let err = decode(&keys, BlobKind::Data, &other, len, &stored).unwrap_err();
            if keys.is_encrypted() {
                // The id is bound into the AEAD.
                assert!(matches!(err, Error::Integrity { kind: "blob" }), "{err}");
            } else {
                assert!(
                    matches!(err, Error::BlobMismatch { id, actual } if id == other && actual == keys.blob_id(BlobKind::Data, &plain)),
                    "{err}"
                );
            }
            // Wrong kind.
            assert!(decode(&keys, BlobKind::Tree, &id, len, &stored).is_err());
            // Wrong raw length.
            assert!(matches!(
                decode(&keys, BlobKind::Data, &id, len - 1, &stored),
                Err(Error::Corrupt { .. })
            ));
            assert!(matches!(
                decode(&keys, BlobKind::Data, &id, len + 1, &stored),
                Err(Error::Corrupt { .. })
            ));
            assert!(matches!(
                decode(
                    &keys,
                    BlobKind::Data,
                    &id,
                    MAX_BLOB_PLAINTEXT as u32 + 1,
                    &stored
                ),
                Err(Error::TooLarge { .. })
            ));
            // Every flipped byte is caught.
            for i in 0..stored.len() {
                let mut bad = stored.clone();
                bad[i] ^= 1;
                assert!(
                    decode(&keys, BlobKind::Data, &id, len, &bad).is_err(),
                    "byte {i}"
                );
            }
            assert!(decode(&keys, BlobKind::Data, &id, len, &[]).is_err());
        }
    }

    #[test]
    fn plain_framing_errors() {
        let keys = Keys::plain();
        let plain = b"abc";
        let id = keys.blob_id(BlobKind::Data, plain);
        assert!(matches!(
            decode(&keys, BlobKind::Data, &id, 3, b"\x02abc"),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            decode(&keys, BlobKind::Data, &id, 3, b"\x01abc"),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(
            decode(&keys, BlobKind::Data, &id, 3, b"\x00abc").unwrap(),
            plain
        );
        // A raw body that is wrong but the right length: the hash catches it.
        assert!(matches!(
            decode(&keys, BlobKind::Data, &id, 3, b"\x00abd"),
            Err(Error::BlobMismatch { .. })
        ));
        // A zstd frame that expands beyond raw_len.
        let bomb = zstd::bulk::compress(&[0u8; 100_000], 1).unwrap();
        let mut stored = vec![FLAG_ZSTD];
        stored.extend_from_slice(&bomb);
        assert!(matches!(
            decode(&keys, BlobKind::Data, &id, 3, &stored),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn plain_and_encrypted_do_not_mix() {
        let plain_keys = Keys::plain();
        let enc = Keys::encrypted(MasterKey::generate());
        let data = compressible(1000);
        let id = plain_keys.blob_id(BlobKind::Data, &data);
        let stored = encode(&plain_keys, BlobKind::Data, &id, &data);
        assert!(decode(&enc, BlobKind::Data, &id, 1000, &stored).is_err());
        let id = enc.blob_id(BlobKind::Data, &data);
        let sealed = encode(&enc, BlobKind::Data, &id, &data);
        assert!(decode(&plain_keys, BlobKind::Data, &id, 1000, &sealed).is_err());
    }

    /// Throughput of encode/decode on 64 KiB chunks of semi-compressible data (half random,
    /// half text). Run: cargo test --release -p vmkeep-core --lib blob::tests::throughput
    /// -- --ignored --nocapture
    #[test]
    #[ignore = "benchmark: run in release mode"]
    fn throughput() {
        const CHUNK: usize = 64 << 10;
        const TOTAL: usize = 128 << 20;
        let words: Vec<&[u8]> = b"the of and vmkeep backup chunk qemu disk block index tree \
            restore snapshot config key 0 1 2 3 4 5 6 7 8 9 lorem ipsum dolor sit amet"
            .split(|&b| b == b' ')
            .filter(|w| !w.is_empty())
            .collect();
        let mut rnd = random(TOTAL);
        // Every other 4 KiB block becomes text, chosen by the random bytes.
        for (i, block) in rnd.chunks_mut(4096).enumerate() {
            if i % 2 == 1 {
                let picks = block.to_vec();
                let mut text = Vec::with_capacity(4200);
                for p in picks {
                    text.extend_from_slice(words[p as usize % words.len()]);
                    text.push(b' ');
                    if text.len() >= 4096 {
                        break;
                    }
                }
                block.copy_from_slice(&text[..4096]);
            }
        }
        let mb = TOTAL as f64 / 1e6;
        let t = std::time::Instant::now();
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        let z: usize = rnd
            .chunks(CHUNK)
            .map(|ch| c.compress(ch).unwrap().len())
            .sum();
        println!(
            "reference: zstd -1 alone {:.0} MB/s (ratio {:.2})",
            mb / t.elapsed().as_secs_f64(),
            TOTAL as f64 / z as f64
        );
        for keys in [both_keys(), both_keys()].concat() {
            let mode = if keys.is_encrypted() {
                "encrypted"
            } else {
                "plain"
            };
            let t = std::time::Instant::now();
            let ids: Vec<BlobId> = rnd
                .chunks(CHUNK)
                .map(|c| keys.blob_id(BlobKind::Data, c))
                .collect();
            let hash = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            let stored: Vec<Vec<u8>> = rnd
                .chunks(CHUNK)
                .zip(&ids)
                .map(|(c, id)| encode(&keys, BlobKind::Data, id, c))
                .collect();
            let enc = t.elapsed().as_secs_f64();
            let out: usize = stored.iter().map(Vec::len).sum();
            let t = std::time::Instant::now();
            for (s, id) in stored.iter().zip(&ids) {
                decode(&keys, BlobKind::Data, id, CHUNK as u32, s).unwrap();
            }
            let dec = t.elapsed().as_secs_f64();
            println!(
                "{mode:>9}: blob_id {:.0} MB/s, encode {:.0} MB/s, decode+verify {:.0} MB/s, \
                 ratio {:.2}",
                mb / hash,
                mb / enc,
                mb / dec,
                TOTAL as f64 / out as f64
            );
        }
    }

    proptest! {
        #[test]
        fn prop_round_trip(data in proptest::collection::vec(0u8..4, 0..20_000), tree in any::<bool>()) {
            let kind = if tree { BlobKind::Tree } else { BlobKind::Data };
            for keys in both_keys() {
                round_trip(&keys, kind, &data);
            }
        }

        #[test]
        fn prop_decode_never_panics(stored in proptest::collection::vec(any::<u8>(), 0..512),
                                   raw_len in prop_oneof![0u32..1024, any::<u32>()],
                                   id in any::<[u8; 32]>()) {
            for keys in both_keys() {
                let _ = decode(&keys, BlobKind::Data, &BlobId(id), raw_len, &stored);
            }
            // Arbitrary bytes behind a valid zstd flag.
            let mut z = vec![FLAG_ZSTD];
            z.extend_from_slice(&stored);
            let _ = decode(&Keys::plain(), BlobKind::Tree, &BlobId(id), raw_len, &z);
        }
    }
}
