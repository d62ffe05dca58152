//! What the server verifies of uploads without the key (PROTOCOL.md §6): content-addressed
//! names always; in plain repositories also every blob of a pack and a manifest's id and VM.
//! Each check returns the reason an upload is refused (422).
use vmkeep_core::blob;
use vmkeep_core::keys::Keys;
use vmkeep_core::manifest::Manifest;
use vmkeep_core::object;
use vmkeep_core::pack;
use vmkeep_core::ObjectKind;

/// A pack's and an index object's name is the BLAKE3 of its bytes.
pub(crate) fn content_name(kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<(), String> {
    let hash = blake3::hash(bytes).to_hex();
    if hash.as_str() == name {
        Ok(())
    } else {
        Err(format!(
            "the {} is named {name} but its bytes hash to {hash}",
            kind.name()
        ))
    }
}

/// Plain repositories: the pack header's checksum holds and every blob it lists decodes and
/// matches its id (a chunk its BLAKE3, a tree node its keyed hash), as `check --read-data`.
pub(crate) fn plain_pack(bytes: &[u8]) -> Result<(), String> {
    let keys = Keys::plain();
    let entries = pack::read_header(&keys, bytes.len() as u64, bytes)
        .map_err(|e| format!("pack header: {e}"))?;
    for e in &entries {
        let start = e.offset as usize;
        let stored = start
            .checked_add(e.length as usize)
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(|| format!("blob {} lies outside the pack", e.id))?;
        blob::decode(&keys, e.kind, &e.id, e.raw_len, stored)
            .map_err(|err| format!("blob {}: {err}", e.id))?;
    }
    Ok(())
}

/// Plain repositories: the manifest opens, names itself `name`, and names `vm` (the VM of its
/// pack list) when there is one.
pub(crate) fn plain_manifest(bytes: &[u8], name: &str, vm: Option<&str>) -> Result<(), String> {
    let body = object::open(&Keys::plain(), ObjectKind::Snapshot, bytes)
        .map_err(|e| format!("manifest: {e}"))?;
    let m = Manifest::from_json(&body).map_err(|e| format!("manifest: {e}"))?;
    if m.id.to_hex() != name {
        return Err(format!("the manifest {name} names itself {}", m.id));
    }
    if let Some(vm) = vm {
        if m.vm != vm {
            return Err(format!(
                "the manifest {name} is of VM {:?}, its pack list of VM {vm:?}",
                m.vm
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkeep_core::keys::BlobKind;
    use vmkeep_core::pack::PackBuilder;

    fn pack_with(id_of: impl Fn(&Keys, &[u8]) -> vmkeep_core::BlobId) -> Vec<u8> {
        let keys = Keys::plain();
        let mut b = PackBuilder::new();
        for chunk in [&b"hello"[..], &[7u8; 5000][..]] {
            let id = id_of(&keys, chunk);
            let enc = blob::encode(&keys, BlobKind::Data, &id, chunk);
            b.add(BlobKind::Data, id, chunk.len() as u32, &enc);
        }
        b.finish(&keys).1
    }

    #[test]
    fn packs() {
        let good = pack_with(|k, c| k.blob_id(BlobKind::Data, c));
        assert!(plain_pack(&good).is_ok());
        let name = blake3::hash(&good).to_hex().to_string();
        assert!(content_name(ObjectKind::Pack, &name, &good).is_ok());
        assert!(content_name(ObjectKind::Pack, &"0".repeat(64), &good).is_err());
        let wrong = pack_with(|k, c| k.blob_id(BlobKind::Tree, c));
        assert!(plain_pack(&wrong).is_err());
        assert!(plain_pack(b"").is_err());
        assert!(plain_pack(&good[..good.len() - 1]).is_err());
    }
}
