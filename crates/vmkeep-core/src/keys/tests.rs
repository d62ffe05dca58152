use super::file::{wrap_aad, SALT_LEN, WRAPPED_LEN};
use super::*;
use proptest::prelude::*;

/// Cheap KDF parameters for tests.
const FAST: KdfParams = KdfParams {
    m_cost_kib: 64,
    t_cost: 1,
    p_cost: 1,
};

fn encrypted() -> Keys {
    Keys::encrypted(MasterKey::generate())
}

#[test]
fn generate_is_random() {
    let a = MasterKey::generate();
    let b = MasterKey::generate();
    assert_ne!(a.to_bytes()[..], b.to_bytes()[..]);
    assert_ne!(a.id_key, a.data_key);
}

#[test]
fn export_import_round_trip() {
    let key = MasterKey::generate();
    let text = key.export();
    assert!(text.starts_with("vmkeep master key v1\n"));
    assert_eq!(text.lines().count(), 6, "{text}");
    let back = MasterKey::import(&text).unwrap();
    assert_eq!(back.to_bytes()[..], key.to_bytes()[..]);
}

#[test]
fn import_is_tolerant_of_whitespace_and_case() {
    let key = MasterKey::generate();
    let text = key.export();
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let squashed = text
        .lines()
        .map(|l| l.replace(' ', ""))
        .collect::<Vec<_>>()
        .join("\r\n");
    let spaced = format!("\n\n   {}\t\n\n", text.replace('\n', "\n\t  "));
    let upper = text.to_uppercase();
    let colon_apart = text.replace("checksum: ", "checksum : ");
    for variant in [one_line, squashed, spaced, upper, colon_apart] {
        let back = MasterKey::import(&variant).unwrap_or_else(|e| panic!("{variant:?}: {e}"));
        assert_eq!(back.to_bytes()[..], key.to_bytes()[..]);
    }
}

#[test]
fn import_rejects_damage() {
    let key = MasterKey::generate();
    let text = key.export();
    // One mistyped digit in the key: the checksum catches it.
    let line1 = text.lines().nth(1).unwrap();
    let first = line1.chars().next().unwrap();
    let other = if first == '0' { '1' } else { '0' };
    let typo = text.replacen(line1, &format!("{other}{}", &line1[1..]), 1);
    assert!(matches!(
        MasterKey::import(&typo),
        Err(Error::Invalid { what: "master key", ref reason }) if reason.contains("checksum")
    ));
    // A wrong checksum.
    let sum = text.lines().last().unwrap();
    let bad_sum = text.replace(sum, "checksum: 00000000");
    if sum != "checksum: 00000000" {
        assert!(MasterKey::import(&bad_sum).is_err());
    }
    // Missing pieces.
    let no_header = text.replacen("vmkeep master key v1", "", 1);
    let no_sum = text.replace(sum, "");
    let short = text.replacen(line1, "", 1);
    let junk = text.replacen(line1, "zz", 1);
    for bad in [
        no_header,
        no_sum,
        short,
        junk,
        String::new(),
        "vmkeep".into(),
    ] {
        assert!(
            matches!(MasterKey::import(&bad), Err(Error::Invalid { .. })),
            "{bad:?}"
        );
    }
    let extra = format!("{text} trailing");
    assert!(MasterKey::import(&extra).is_err());
}

#[test]
fn debug_prints_no_key_material() {
    let key = MasterKey::generate();
    let bytes = key.to_bytes();
    let keys = Keys::encrypted(key.clone());
    let outputs = [
        format!("{key:?}"),
        format!("{key:#?}"),
        format!("{keys:?}"),
        format!("{keys:#?}"),
    ];
    let derived = DerivedKeys::new(&key);
    let secrets: Vec<&[u8]> = vec![
        &bytes[..32],
        &bytes[32..],
        &derived.tree_id_key,
        &derived.config_mac_key,
    ];
    for out in &outputs {
        assert!(out.contains("redacted"), "{out}");
        for secret in &secrets {
            // No 4-byte window of any secret, in hex or as decimal bytes.
            for w in secret.windows(4) {
                assert!(!out.contains(&hex::encode(w)), "{out}");
                assert!(!out.contains(&format!("{}, {}, {}, {}", w[0], w[1], w[2], w[3])));
            }
        }
    }
}

#[test]
fn key_file_wrap_unwrap() {
    let key = MasterKey::generate();
    let file = KeyFile::wrap(&key, b"correct horse", FAST).unwrap();
    assert_eq!(file.version, 2);
    assert_eq!(file.kdf, "argon2id");
    assert_eq!(file.hostname, None, "key files do not name the host");
    assert_eq!(file.checksum.as_ref().map(String::len), Some(64));
    assert_eq!(file.salt.len(), 32);
    assert_eq!(file.wrapped.len(), 2 * WRAPPED_LEN);
    let back = file.unwrap_key(b"correct horse").unwrap();
    assert_eq!(back.to_bytes()[..], key.to_bytes()[..]);
    assert!(matches!(
        file.unwrap_key(b"correct horsf"),
        Err(Error::WrongPassphrase)
    ));
    assert!(matches!(file.unwrap_key(b""), Err(Error::WrongPassphrase)));
    // The same key wrapped twice: different salt and nonce.
    let again = KeyFile::wrap(&key, b"correct horse", FAST).unwrap();
    assert_ne!(again.salt, file.salt);
    assert_ne!(again.wrapped, file.wrapped);
    let json = String::from_utf8(file.to_json()).unwrap();
    assert!(!json.contains("hostname"), "{json}");
}

/// The version 2 checksum over (AAD || wrapped).
fn fix_checksum(file: &mut KeyFile) {
    let mut salt = [0u8; SALT_LEN];
    hex::decode_to_slice(&file.salt, &mut salt).unwrap();
    let aad = wrap_aad(file.version, &file.params, &salt);
    let wrapped = hex::decode(&file.wrapped).unwrap();
    file.checksum = Some(
        blake3::Hasher::new()
            .update(&aad)
            .update(&wrapped)
            .finalize()
            .to_hex()
            .to_string(),
    );
}

/// Damage is reported as damage (the checksum), never as a wrong passphrase. Someone who edits
/// a field and recomputes the checksum gets "wrong passphrase": the AEAD, keyed by the
/// passphrase and binding the parameters, refuses.
#[test]
fn key_file_damage_and_tampering_are_detected() {
    let key = MasterKey::generate();
    let file = KeyFile::wrap(&key, b"pw", FAST).unwrap();
    let mut flipped = file.clone();
    let mut w = hex::decode(&flipped.wrapped).unwrap();
    w[30] ^= 1;
    flipped.wrapped = hex::encode(w);
    let mut salted = file.clone();
    salted.salt = hex::encode([7u8; 16]);
    let mut costlier = file.clone();
    costlier.params.t_cost = 2;
    let mut no_sum = file.clone();
    no_sum.checksum = None;
    let mut hosted = file.clone();
    hosted.hostname = Some("h".into());
    for damaged in [&flipped, &salted, &costlier, &no_sum, &hosted] {
        let err = damaged.unwrap_key(b"pw").unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(KeyFile::from_json(&damaged.to_json()).is_err());
    }
    for mut forged in [flipped, salted, costlier] {
        fix_checksum(&mut forged);
        KeyFile::from_json(&forged.to_json()).unwrap();
        assert!(matches!(
            forged.unwrap_key(b"pw"),
            Err(Error::WrongPassphrase)
        ));
    }
    let mut short = file;
    short.wrapped.truncate(20);
    assert!(matches!(
        short.unwrap_key(b"pw"),
        Err(Error::Corrupt { .. })
    ));
}

/// A version 1 key file (empty AAD, plaintext hostname, no checksum) as earlier builds wrote.
fn version_1_file(key: &MasterKey, pass: &[u8]) -> KeyFile {
    let salt = [3u8; SALT_LEN];
    let nonce = [9u8; 12];
    let kek = FAST.derive(pass, &salt).unwrap();
    let mut buf = key.to_bytes().to_vec();
    WipedAesKey::new(&kek)
        .get()
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::empty(),
            &mut buf,
        )
        .unwrap();
    KeyFile {
        version: 1,
        kdf: "argon2id".into(),
        params: FAST,
        salt: hex::encode(salt),
        wrapped: hex::encode([&nonce[..], &buf].concat()),
        created: "2026-11-02T03:04:05Z".parse().unwrap(),
        hostname: Some("old-host".into()),
        checksum: None,
    }
}

#[test]
fn version_1_key_files_still_unlock() {
    let key = MasterKey::generate();
    let v1 = version_1_file(&key, b"pw");
    let json = v1.to_json();
    assert!(String::from_utf8_lossy(&json).contains("old-host"));
    let back = KeyFile::from_json(&json).unwrap();
    assert_eq!(back, v1);
    assert_eq!(
        back.unwrap_key(b"pw").unwrap().to_bytes()[..],
        key.to_bytes()[..]
    );
    assert!(matches!(
        back.unwrap_key(b"px"),
        Err(Error::WrongPassphrase)
    ));
    // Without the hostname too (it was never required to read one).
    let mut nameless = v1.clone();
    nameless.hostname = None;
    assert!(nameless.unwrap_key(b"pw").is_ok());
    // A version 1 file with a checksum is not a version 1 file.
    let mut odd = v1;
    odd.checksum = Some("00".repeat(32));
    assert!(KeyFile::from_json(&odd.to_json()).is_err());
}

#[test]
fn key_file_json_round_trip_and_validation() {
    let key = MasterKey::generate();
    let file = KeyFile::wrap(&key, b"pw", FAST).unwrap();
    let json = file.to_json();
    let back = KeyFile::from_json(&json).unwrap();
    assert_eq!(back, file);
    assert_eq!(
        back.unwrap_key(b"pw").unwrap().to_bytes()[..],
        key.to_bytes()[..]
    );

    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        f(&mut v);
        KeyFile::from_json(&serde_json::to_vec(&v).unwrap())
    };
    for v in [0, 3] {
        assert!(matches!(
            edit(&|j| j["version"] = v.into()),
            Err(Error::UnsupportedVersion { version, supported: 2, .. }) if version == v
        ));
    }
    // Version 1 rules on a version 2 body: refused (a v1 file carries no checksum).
    assert!(edit(&|v| v["version"] = 1.into()).is_err());
    assert!(edit(&|v| v["kdf"] = "scrypt".into()).is_err());
    assert!(edit(&|v| v["params"]["m_cost_kib"] = (4u32 * 1024 * 1024 + 1).into()).is_err());
    assert!(edit(&|v| v["params"]["m_cost_kib"] = 4.into()).is_err());
    assert!(edit(&|v| v["params"]["t_cost"] = 101.into()).is_err());
    assert!(edit(&|v| v["params"]["t_cost"] = 0.into()).is_err());
    assert!(edit(&|v| v["params"]["p_cost"] = 65.into()).is_err());
    assert!(edit(&|v| v["params"]["p_cost"] = 0.into()).is_err());
    assert!(edit(&|v| v["salt"] = "00".into()).is_err());
    assert!(edit(&|v| v["wrapped"] = "zz".into()).is_err());
    assert!(edit(&|v| v["checksum"] = "zz".into()).is_err());
    assert!(edit(&|v| v["extra"] = 1.into()).is_err());
    // Within bounds but not what was wrapped: the checksum says the file is damaged.
    assert!(matches!(
        edit(&|v| v["params"]["m_cost_kib"] = (4u32 * 1024 * 1024).into()),
        Err(Error::Corrupt { .. })
    ));
    // Whitespace and field order are free: the checksum covers decoded values.
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    KeyFile::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();

    let mut big = json.clone();
    big.extend(std::iter::repeat_n(b' ', 64 * 1024));
    assert!(matches!(
        KeyFile::from_json(&big),
        Err(Error::TooLarge { .. })
    ));
    assert!(KeyFile::from_json(b"not json").is_err());
}

#[test]
fn default_kdf_params_are_valid() {
    KdfParams::default().validate().unwrap();
}

#[test]
fn blob_kind_from_u8() {
    assert_eq!(BlobKind::from_u8(0).unwrap(), BlobKind::Data);
    assert_eq!(BlobKind::from_u8(1).unwrap(), BlobKind::Tree);
    assert!(matches!(BlobKind::from_u8(2), Err(Error::Corrupt { .. })));
}

#[test]
fn blob_ids_by_domain() {
    let data = b"some chunk";
    let plain = Keys::plain();
    let key = MasterKey::generate();
    let enc = Keys::encrypted(key.clone());
    let enc2 = encrypted();
    assert_eq!(
        plain.blob_id(BlobKind::Data, data).0,
        *blake3::hash(data).as_bytes()
    );
    assert_eq!(
        enc.blob_id(BlobKind::Data, data).0,
        *blake3::keyed_hash(&key.id_key, data).as_bytes()
    );
    let mut h = blake3::Hasher::new_derive_key("vmkeep 2026-11 tree node v1");
    h.update(data);
    assert_eq!(
        plain.blob_id(BlobKind::Tree, data).0,
        *h.finalize().as_bytes()
    );
    let tree_key = blake3::derive_key("vmkeep 2026-11 tree id key v1", &key.id_key);
    assert_eq!(
        enc.blob_id(BlobKind::Tree, data).0,
        *blake3::keyed_hash(&tree_key, data).as_bytes()
    );
    let ids = [
        plain.blob_id(BlobKind::Data, data),
        plain.blob_id(BlobKind::Tree, data),
        enc.blob_id(BlobKind::Data, data),
        enc.blob_id(BlobKind::Tree, data),
        enc2.blob_id(BlobKind::Data, data),
        enc2.blob_id(BlobKind::Tree, data),
    ];
    for (i, a) in ids.iter().enumerate() {
        assert!(!a.is_zero());
        for b in &ids[i + 1..] {
            assert_ne!(a, b);
        }
    }
    // Deterministic, and zero data does not hash to ZERO.
    assert_eq!(enc.blob_id(BlobKind::Data, data), ids[2]);
    assert!(!plain.blob_id(BlobKind::Data, &[0u8; 4096]).is_zero());
}

#[test]
fn seal_open_round_trip() {
    let keys = encrypted();
    for len in [0usize, 1, 15, 16, 17, 1000, 70_000] {
        let msg: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let sealed = keys.seal(b"aad", &msg);
        assert_eq!(sealed.len(), len + SEAL_OVERHEAD);
        assert_eq!(keys.open(b"aad", &sealed).unwrap(), msg);
        // Random nonces: sealing twice differs.
        assert_ne!(keys.seal(b"aad", &msg), sealed);
    }
}

#[test]
fn open_rejects_tampering() {
    let keys = encrypted();
    let sealed = keys.seal(b"aad", b"hello world");
    for i in 0..sealed.len() {
        let mut bad = sealed.clone();
        bad[i] ^= 0x80;
        assert!(matches!(
            keys.open(b"aad", &bad),
            Err(Error::Integrity {
                kind: "sealed data"
            })
        ));
    }
    assert!(matches!(
        keys.open(b"aae", &sealed),
        Err(Error::Integrity { .. })
    ));
    assert!(matches!(
        keys.open(b"", &sealed),
        Err(Error::Integrity { .. })
    ));
    assert!(matches!(
        encrypted().open(b"aad", &sealed),
        Err(Error::Integrity { .. })
    ));
    for n in 0..SEAL_OVERHEAD {
        assert!(matches!(
            keys.open(b"aad", &sealed[..n]),
            Err(Error::Integrity { .. })
        ));
    }
    assert!(keys.open(b"aad", &sealed[..sealed.len() - 1]).is_err());
    assert!(matches!(
        Keys::plain().open(b"aad", &sealed),
        Err(Error::Corrupt { .. })
    ));
}

/// Pins the construction: a message sealed by hand with ring opens with Keys::open.
#[test]
fn seal_construction_matches_the_spec() {
    let key = MasterKey::generate();
    let keys = Keys::encrypted(key.clone());
    let nonce: [u8; 24] = std::array::from_fn(|i| i as u8 * 3 + 1);
    let subkey = blake3::keyed_hash(&key.data_key, &nonce[..16]);
    let mut gcm_nonce = [0u8; 12];
    gcm_nonce[..8].copy_from_slice(&nonce[16..]);
    let mut buf = b"by hand".to_vec();
    WipedAesKey::new(subkey.as_bytes())
        .get()
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(gcm_nonce),
            aead::Aad::from(b"ad"),
            &mut buf,
        )
        .unwrap();
    let sealed = [&nonce[..], &buf].concat();
    assert_eq!(keys.open(b"ad", &sealed).unwrap(), b"by hand");
}

#[test]
#[should_panic(expected = "plain repository")]
fn seal_panics_when_plain() {
    Keys::plain().seal(b"", b"x");
}

#[test]
fn config_mac() {
    let key = MasterKey::generate();
    let keys = Keys::encrypted(key.clone());
    assert_eq!(Keys::plain().config_mac(b"x"), None);
    let mac = keys.config_mac(b"config").unwrap();
    let mut material = [0u8; 64];
    material[..32].copy_from_slice(&key.id_key);
    material[32..].copy_from_slice(&key.data_key);
    let mac_key = blake3::derive_key("vmkeep 2026-11 config mac v1", &material);
    assert_eq!(mac, *blake3::keyed_hash(&mac_key, b"config").as_bytes());
    assert_ne!(keys.config_mac(b"config2").unwrap(), mac);
    assert_ne!(encrypted().config_mac(b"config").unwrap(), mac);
}

#[test]
fn keys_are_send_sync_and_cheap_to_clone() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Keys>();
    let keys = encrypted();
    let clone = keys.clone();
    assert!(std::ptr::eq(
        keys.master().unwrap(),
        clone.master().unwrap()
    ));
}

proptest! {
    #[test]
    fn prop_seal_open(aad in proptest::collection::vec(any::<u8>(), 0..64),
                      msg in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let keys = encrypted();
        let sealed = keys.seal(&aad, &msg);
        prop_assert_eq!(keys.open(&aad, &sealed).unwrap(), msg);
    }

    #[test]
    fn prop_open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let keys = encrypted();
        prop_assert!(keys.open(b"x", &bytes).is_err());
        prop_assert!(Keys::plain().open(b"x", &bytes).is_err());
    }

    #[test]
    fn prop_import_never_panics(text in ".{0,300}") {
        let _ = MasterKey::import(&text);
    }

    #[test]
    fn prop_import_never_panics_near_valid(noise in "[0-9a-fA-F :\n]{0,200}") {
        let text = format!("vmkeep master key v1\n{noise}");
        let _ = MasterKey::import(&text);
    }

    #[test]
    fn prop_key_file_from_json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = KeyFile::from_json(&bytes);
    }

    #[test]
    fn prop_blob_kind_from_u8(v in any::<u8>()) {
        prop_assert_eq!(BlobKind::from_u8(v).is_ok(), v <= 1);
    }
}

/// Throughput of seal and open (a per-message key schedule each), for judging changes to the
/// key handling. Ignored: it measures, it cannot fail. Run it optimised:
/// `cargo test -p vmkeep-core --release --lib seal_open_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "a micro-benchmark; prints MB/s and messages/s"]
fn seal_open_throughput() {
    let keys = encrypted();
    for size in [64usize, 4096, 65536] {
        let plain = vec![0x5au8; size];
        let rounds = (256usize << 20) / size.max(4096) * if size < 4096 { 1 } else { 4 };
        let start = std::time::Instant::now();
        let mut sealed = Vec::new();
        for _ in 0..rounds {
            sealed = keys.seal(b"aad", &plain);
        }
        let seal_s = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            assert_eq!(keys.open(b"aad", &sealed).unwrap().len(), size);
        }
        let open_s = start.elapsed().as_secs_f64();
        let mb = (rounds * size) as f64 / 1e6;
        println!(
            "{size:>6} B: seal {:>8.0} MB/s {:>9.0} msg/s | open {:>8.0} MB/s {:>9.0} msg/s",
            mb / seal_s,
            rounds as f64 / seal_s,
            mb / open_s,
            rounds as f64 / open_s
        );
    }
    // What the wipe adds per message: building a key schedule with and without it.
    let key = [7u8; 32];
    let n = 200_000;
    let start = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(&aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, &key).unwrap(),
        ));
    }
    let plain_ns = start.elapsed().as_nanos() as f64 / n as f64;
    let start = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(&WipedAesKey::new(&key));
    }
    let wiped_ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "key schedule ({} bytes): {plain_ns:.0} ns, with the wipe {wiped_ns:.0} ns",
        std::mem::size_of::<aead::LessSafeKey>()
    );
}

#[test]
fn data_hasher_gives_the_data_blob_id() {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    for keys in [Keys::plain(), encrypted()] {
        let mut h = keys.data_hasher();
        for piece in data.chunks(7777) {
            h.update(piece);
        }
        assert_eq!(h.finish(), keys.blob_id(BlobKind::Data, &data));
        assert_eq!(format!("{h:?}"), "DataHasher(<redacted>)");
    }
}
