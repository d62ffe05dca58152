//! Known-answer vectors of the primitives, checked against the table in docs/FORMAT.md
//! ("Known-answer vectors"), so the document a second implementation reads and the code agree.
//! Every value is computed here from the fixed inputs the table states; a mismatch prints the
//! whole table as this code computes it.
use std::collections::BTreeMap;

use crate::config::RepoConfig;
use crate::keys::file::{wrap_aad, SALT_LEN, WRAP_NONCE_LEN};
use crate::keys::{seal_with_nonce, BlobKind, KdfParams, KeyFile, Keys, MasterKey, SEAL_NONCE_LEN};
use crate::BlobId;

const FORMAT_MD: &str = include_str!("../../../docs/FORMAT.md");
const BEGIN: &str = "<!-- known-answer vectors: begin -->";
const END: &str = "<!-- known-answer vectors: end -->";

/// Bytes `start`, `start + 1`, ... (the fixed inputs of the table).
fn counting<const N: usize>(start: u8) -> [u8; N] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

/// Every vector, by the name the table uses, as lowercase hex.
fn computed() -> BTreeMap<&'static str, String> {
    let mut v = BTreeMap::new();
    let master_bytes: [u8; 64] = counting(0);
    let master = MasterKey::from_bytes(&master_bytes);
    let keys = Keys::encrypted(master.clone());
    let plain = Keys::plain();
    let p: &[u8] = b"vmkeep test vector";
    v.insert("plaintext", hex::encode(p));

    let data_plain = plain.blob_id(BlobKind::Data, p);
    let data_keyed = keys.blob_id(BlobKind::Data, p);
    v.insert("data blob id, plain", data_plain.to_hex());
    v.insert("data blob id, encrypted", data_keyed.to_hex());

    // A leaf of a disk index tree: level 0, two chunks (P and an all-zero chunk).
    let mut node = vec![0u8];
    node.extend_from_slice(&2u16.to_le_bytes());
    node.extend_from_slice(data_plain.as_bytes());
    node.extend_from_slice(BlobId::ZERO.as_bytes());
    v.insert("tree node", hex::encode(&node));
    v.insert(
        "tree node id, plain",
        plain.blob_id(BlobKind::Tree, &node).to_hex(),
    );
    v.insert(
        "tree id key",
        hex::encode(blake3::derive_key(
            "vmkeep 2026-11 tree id key v1",
            &master_bytes[..32],
        )),
    );
    v.insert(
        "tree node id, encrypted",
        keys.blob_id(BlobKind::Tree, &node).to_hex(),
    );

    let config = RepoConfig {
        magic: "vmkeep-repository".into(),
        version: 2,
        id: hex::encode(counting::<16>(0)),
        chunk_size: 65536,
        encrypted: true,
        pack_size: 16 << 20,
        created: "2026-11-02T03:04:05.123456789Z".parse().unwrap(),
        mac: None,
    };
    let input = config.mac_input();
    v.insert("config mac input", hex::encode(&input));
    v.insert(
        "config mac key",
        hex::encode(blake3::derive_key(
            "vmkeep 2026-11 config mac v1",
            &master_bytes,
        )),
    );
    v.insert(
        "config mac",
        hex::encode(keys.config_mac(&input).expect("encrypted keys")),
    );

    let nonce: [u8; SEAL_NONCE_LEN] = counting(0x40);
    v.insert(
        "sealed (aad \"vmkeep aad\")",
        hex::encode(seal_with_nonce(&master, &nonce, b"vmkeep aad", p)),
    );
    // The stored form of P as a Data blob: flags 0 (P is too short to compress) || P, sealed
    // with aad = kind || id.
    let mut blob_aad = vec![BlobKind::Data as u8];
    blob_aad.extend_from_slice(data_keyed.as_bytes());
    let framed = [&[0u8][..], p].concat();
    v.insert(
        "stored data blob",
        hex::encode(seal_with_nonce(&master, &nonce, &blob_aad, &framed)),
    );

    let params = KdfParams {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };
    let pass = b"correct horse battery staple";
    let salt: [u8; SALT_LEN] = counting(0x60);
    let wrap_nonce: [u8; WRAP_NONCE_LEN] = counting(0x70);
    v.insert(
        "key-encryption key",
        hex::encode(*params.derive(pass, &salt).unwrap()),
    );
    v.insert("key wrap aad", hex::encode(wrap_aad(2, &params, &salt)));
    let file = KeyFile::wrap_with(&master, pass, params, salt, wrap_nonce).unwrap();
    v.insert("wrapped", file.wrapped.clone());
    v.insert("key file checksum", file.checksum.clone().unwrap());
    assert_eq!(
        file.unwrap_key(pass).unwrap().export(),
        master.export(),
        "the vector unwraps"
    );
    v
}

/// The table between the markers: rows "| `name` | `hex` |".
fn documented() -> BTreeMap<String, String> {
    let start = FORMAT_MD
        .find(BEGIN)
        .expect("FORMAT.md has the vector table")
        + BEGIN.len();
    let end = FORMAT_MD.find(END).expect("the vector table ends");
    FORMAT_MD[start..end]
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            match cells.as_slice() {
                ["", name, value, ""] if name.starts_with('`') && value.starts_with('`') => Some((
                    name.trim_matches('`').to_string(),
                    value.trim_matches('`').to_string(),
                )),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn format_md_vectors_match_the_code() {
    let want = computed();
    let doc = documented();
    let table: String = want
        .iter()
        .map(|(k, v)| format!("| `{k}` | `{v}` |\n"))
        .collect();
    let names: Vec<&str> = want.keys().copied().collect();
    let doc_names: Vec<&str> = doc.keys().map(String::as_str).collect();
    assert_eq!(
        doc_names, names,
        "FORMAT.md's vector names differ; the table as computed:\n{table}"
    );
    for (name, value) in &want {
        assert_eq!(
            &doc[*name], value,
            "vector {name:?} differs; the table as computed:\n{table}"
        );
    }
}
