//! Object framing for every repository object except packs, config and key files.
//! FORMAT.md §8 "Object framing".
//!
//! header: magic "VMKO"(4) || version u8 (=1) || kind u8 || flags u8 (bit0 encrypted) || reserved u8
//! body:   plain: body || BLAKE3(header || body) (32)   encrypted: seal(aad = header, body)
//! The kind byte is [`ObjectKind::frame_byte`].
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::kind::ObjectKind;

/// "VMKO"
pub const OBJECT_MAGIC: [u8; 4] = *b"VMKO";
pub const OBJECT_VERSION: u8 = 1;
/// Length of the framing header; [`header_flags_encrypted`] needs only these bytes.
pub const HEADER_LEN: usize = 8;
const FLAG_ENCRYPTED: u8 = 1;

/// The kind byte of a kind that is framed.
///
/// # Panics
/// For config, key and pack, which are never framed: a caller that seals one is a programming
/// error, not a property of any input.
fn kind_byte(kind: ObjectKind) -> u8 {
    match kind.frame_byte() {
        Some(b) => b,
        None => panic!("{} objects are not framed", kind.name()),
    }
}

fn header(keys: &Keys, kind: ObjectKind) -> [u8; HEADER_LEN] {
    let flags = if keys.is_encrypted() {
        FLAG_ENCRYPTED
    } else {
        0
    };
    let m = OBJECT_MAGIC;
    [
        m[0],
        m[1],
        m[2],
        m[3],
        OBJECT_VERSION,
        kind_byte(kind),
        flags,
        0,
    ]
}

/// Whether an object's header (its first [`HEADER_LEN`] bytes) carries the encrypted flag.
/// None when the bytes are not a header of this format version. Unauthenticated: a hint for
/// spotting a tampered config cheaply, never a reason to trust the object.
pub fn header_flags_encrypted(header: &[u8]) -> Option<bool> {
    if header.len() < HEADER_LEN || header[..4] != OBJECT_MAGIC || header[4] != OBJECT_VERSION {
        return None;
    }
    Some(header[6] & FLAG_ENCRYPTED != 0)
}

/// Frames `body` as an object of `kind` (a framed kind, see [`kind_byte`]).
pub fn seal(keys: &Keys, kind: ObjectKind, body: &[u8]) -> Vec<u8> {
    let header = header(keys, kind);
    if keys.is_encrypted() {
        let sealed = keys.seal(&header, body);
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&sealed);
        out
    } else {
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + 32);
        out.extend_from_slice(&header);
        out.extend_from_slice(body);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }
}

/// Bounded by kind.max_size(); checks magic, version, kind, checksum or AEAD tag.
pub fn open(keys: &Keys, kind: ObjectKind, bytes: &[u8]) -> Result<Vec<u8>> {
    let expected_kind = kind_byte(kind);
    let name = kind.name();
    let corrupt = |reason: String| Error::Corrupt { kind: name, reason };
    if bytes.len() as u64 > kind.max_size() {
        return Err(Error::TooLarge {
            kind: name,
            size: bytes.len() as u64,
            max: kind.max_size(),
        });
    }
    if bytes.len() < 4 || bytes[..4] != OBJECT_MAGIC {
        return Err(Error::BadMagic { kind: name });
    }
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!("truncated header ({} bytes)", bytes.len())));
    }
    let (header, rest) = bytes.split_at(HEADER_LEN);
    let (version, found_kind, flags, reserved) = (header[4], header[5], header[6], header[7]);
    if version != OBJECT_VERSION {
        return Err(Error::UnsupportedVersion {
            kind: name,
            version: version as u32,
            supported: OBJECT_VERSION as u32,
        });
    }
    if found_kind != expected_kind {
        let found = ObjectKind::from_frame_byte(found_kind).map_or("unknown", |k| k.name());
        return Err(corrupt(format!(
            "kind byte {found_kind} ({found}) where {expected_kind} ({name}) was expected"
        )));
    }
    if flags & !FLAG_ENCRYPTED != 0 || reserved != 0 {
        return Err(corrupt(format!(
            "unknown header flags {flags:#04x} / reserved byte {reserved:#04x}"
        )));
    }
    let encrypted = flags & FLAG_ENCRYPTED != 0;
    match (encrypted, keys.is_encrypted()) {
        (true, false) => Err(corrupt(
            "the object is encrypted but the repository is not".into(),
        )),
        (false, true) => Err(corrupt(
            "the object is not encrypted but the repository is (refusing unauthenticated data)"
                .into(),
        )),
        (true, true) => keys.open(header, rest).map_err(|e| match e {
            Error::Integrity { .. } => Error::Integrity { kind: name },
            other => other,
        }),
        (false, false) => {
            if rest.len() < 32 {
                return Err(corrupt(format!(
                    "truncated: {} bytes, no room for the checksum",
                    bytes.len()
                )));
            }
            let (body, sum) = rest.split_at(rest.len() - 32);
            let expected = blake3::hash(&bytes[..bytes.len() - 32]);
            // blake3::Hash compares in constant time.
            if expected != blake3::Hash::from_bytes(sum.try_into().expect("32 bytes")) {
                return Err(Error::Integrity { kind: name });
            }
            Ok(body.to_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;
    use proptest::prelude::*;

    const KINDS: [ObjectKind; 4] = [
        ObjectKind::Snapshot,
        ObjectKind::Index,
        ObjectKind::GcRecord,
        ObjectKind::Lock,
    ];

    fn both_keys() -> [Keys; 2] {
        [Keys::plain(), Keys::encrypted(MasterKey::generate())]
    }

    #[test]
    fn round_trip_every_kind() {
        for keys in both_keys() {
            for kind in KINDS {
                for body in [&b""[..], b"x", &[9u8; 10_000]] {
                    let sealed = seal(&keys, kind, body);
                    assert_eq!(&sealed[..4], b"VMKO");
                    assert_eq!(sealed[4], 1);
                    assert_eq!(Some(sealed[5]), kind.frame_byte());
                    assert_eq!(sealed[6], keys.is_encrypted() as u8);
                    assert_eq!(sealed[7], 0);
                    assert_eq!(
                        header_flags_encrypted(&sealed[..HEADER_LEN]),
                        Some(keys.is_encrypted())
                    );
                    assert_eq!(open(&keys, kind, &sealed).unwrap(), body);
                }
            }
        }
    }

    #[test]
    fn header_probe_refuses_what_is_not_a_header() {
        assert_eq!(header_flags_encrypted(b"VMKO\x01\x01\x01"), None);
        assert_eq!(header_flags_encrypted(b"VMKX\x01\x01\x01\x00"), None);
        assert_eq!(header_flags_encrypted(b"VMKO\x02\x01\x01\x00"), None);
        assert_eq!(header_flags_encrypted(b"VMKO\x01\x02\x00\x00"), Some(false));
    }

    #[test]
    fn plain_layout() {
        let sealed = seal(&Keys::plain(), ObjectKind::Lock, b"body");
        assert_eq!(sealed.len(), 8 + 4 + 32);
        assert_eq!(&sealed[8..12], b"body");
        assert_eq!(&sealed[12..], blake3::hash(&sealed[..12]).as_bytes());
    }

    #[test]
    fn errors() {
        for keys in both_keys() {
            let sealed = seal(&keys, ObjectKind::Snapshot, b"{\"a\":1}");
            let err = open(&keys, ObjectKind::Index, &sealed).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Corrupt {
                        kind: "index object",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(
                err.to_string()
                    .contains("kind byte 1 (manifest) where 2 (index object) was expected"),
                "{err}"
            );
            let mut bad = sealed.clone();
            bad[0] = b'X';
            assert!(matches!(
                open(&keys, ObjectKind::Snapshot, &bad),
                Err(Error::BadMagic { .. })
            ));
            let mut bad = sealed.clone();
            bad[4] = 2;
            assert!(matches!(
                open(&keys, ObjectKind::Snapshot, &bad),
                Err(Error::UnsupportedVersion { version: 2, .. })
            ));
            let mut bad = sealed.clone();
            bad[7] = 1;
            assert!(matches!(
                open(&keys, ObjectKind::Snapshot, &bad),
                Err(Error::Corrupt { .. })
            ));
            for i in 8..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 4;
                assert!(matches!(
                    open(&keys, ObjectKind::Snapshot, &bad),
                    Err(Error::Integrity { kind: "manifest" })
                ));
            }
            for n in 0..sealed.len() {
                assert!(open(&keys, ObjectKind::Snapshot, &sealed[..n]).is_err());
            }
            let huge = vec![0u8; ObjectKind::Lock.max_size() as usize + 1];
            assert!(matches!(
                open(&keys, ObjectKind::Lock, &huge),
                Err(Error::TooLarge { .. })
            ));
        }
    }

    #[test]
    #[should_panic(expected = "pack objects are not framed")]
    fn sealing_an_unframed_kind_is_a_programming_error() {
        seal(&Keys::plain(), ObjectKind::Pack, b"x");
    }

    #[test]
    fn plain_and_encrypted_do_not_mix() {
        let plain = Keys::plain();
        let enc = Keys::encrypted(MasterKey::generate());
        let p = seal(&plain, ObjectKind::Snapshot, b"hello");
        let e = seal(&enc, ObjectKind::Snapshot, b"hello");
        let err = open(&enc, ObjectKind::Snapshot, &p).unwrap_err();
        assert!(err.to_string().contains("not encrypted"), "{err}");
        let err = open(&plain, ObjectKind::Snapshot, &e).unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
        // Flipping the flag in an encrypted object breaks the AEAD (the header is the aad).
        let mut forged = e.clone();
        forged[6] = 0;
        assert!(open(&enc, ObjectKind::Snapshot, &forged).is_err());
        // Another key cannot open it.
        let other = Keys::encrypted(MasterKey::generate());
        assert!(matches!(
            open(&other, ObjectKind::Snapshot, &e),
            Err(Error::Integrity { .. })
        ));
    }

    proptest! {
        #[test]
        fn prop_round_trip(body in proptest::collection::vec(any::<u8>(), 0..4096), k in 0usize..4) {
            for keys in both_keys() {
                let sealed = seal(&keys, KINDS[k], &body);
                prop_assert_eq!(open(&keys, KINDS[k], &sealed).unwrap(), body.clone());
            }
        }

        #[test]
        fn prop_open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), k in 0usize..4) {
            let mut with_magic = b"VMKO\x01".to_vec();
            with_magic.extend_from_slice(&bytes);
            for keys in both_keys() {
                let _ = open(&keys, KINDS[k], &bytes);
                let _ = open(&keys, KINDS[k], &with_magic);
            }
        }
    }
}
