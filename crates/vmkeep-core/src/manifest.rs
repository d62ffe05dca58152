//! Manifests: a restore point. FORMAT.md "Manifests". Stored as JSON inside an object of kind
//! Manifest at `snapshots/<id>`; writing it is the commit point of a backup.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::changes::ChangeMap;
use crate::config::RepoConfig;
use crate::error::{Error, Result};
use crate::id::{BlobId, SnapshotId};

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub id: SnapshotId,
    pub vm: String,
    pub time: DateTime<Utc>,
    /// The restore point of the same VM this one was compared against (change maps are relative
    /// to it); None for the first of a VM, or when every earlier one was forgotten.
    pub parent: Option<SnapshotId>,
    pub hostname: String,
    /// vmkeep version that wrote it.
    pub tool_version: String,
    pub chunk_size: u32,
    pub disks: Vec<DiskEntry>,
    #[serde(default)]
    pub streams: Vec<StreamRecord>,
    pub stats: BackupStats,
    /// Milliseconds the VM was paused for the capture (live backups); 0 for images.
    #[serde(default)]
    pub pause_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// Device id (or drive id) for live VMs, the user's name for images. [A-Za-z0-9._-]{1,64}
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Root of the disk index tree (ZERO for an all-zero disk).
    pub root: BlobId,
    /// Chunks whose id differs from the parent's disk of the same name; None when the parent had
    /// no such disk (or there is no parent): every chunk counts as changed.
    pub changes: Option<ChangeMap>,
    /// Bytes of non-zero data in this disk (sum of non-zero chunk lengths).
    #[serde(default)]
    pub data_bytes: u64,
    /// What change tracking did for this disk. Absent in the earliest manifests: `none`.
    #[serde(default)]
    pub cbt: ChangeTracking,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt_reason: Option<String>,
    /// QEMU checkpoint (dirty bitmap) started at this restore point, to prove the next backup's
    /// bitmap belongs to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// Image files only: "dev:inode:size:mtime_ns:ctime_ns" of the file, taken before it was
    /// read. An identical identity at the next backup means the file was not written since
    /// (ctime cannot be set by user tools), so its index is reused without reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
}

/// What change tracking (QEMU dirty bitmaps) did for a disk in a backup. Stored and printed as
/// `"used"`, `"rescan"` or `"none"` (FORMAT.md §9, cli-contract `backup vm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeTracking {
    /// The checkpoint bitmap was trusted: only the chunks it marks were read, the others came
    /// from the parent restore point's tree.
    Used,
    /// Change tracking could not be trusted (the reason says why): every allocated chunk was read.
    Rescan,
    /// No change tracking: the VM's first backup, `--full`, or an image backup.
    #[default]
    None,
}

impl ChangeTracking {
    /// The name stored in manifests and printed by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeTracking::Used => "used",
            ChangeTracking::Rescan => "rescan",
            ChangeTracking::None => "none",
        }
    }
}

impl std::fmt::Display for ChangeTracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub bitmap: String,
    pub node: String,
    pub granularity: u64,
    /// Identity of the image file or QEMU process the bitmap lives in.
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRecord {
    /// e.g. "memory", "vm-config"
    pub name: String,
    /// Bytes of the stream.
    pub size: u64,
    /// Stream index blobs, in order (see stream.rs): the whole stream, or with `pages` its
    /// literal bytes.
    pub index: Vec<BlobId>,
    /// A memory stream: the rest of its bytes are pages of page images, and an op stream says
    /// how the two interleave (FORMAT.md §11.1). Absent for plain streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<PageImages>,
}

/// How a memory stream is regenerated from its literal bytes and its page images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageImages {
    /// The whole regenerated stream must have this id (computed as a Data blob's id: BLAKE3,
    /// keyed in encrypted repositories).
    pub stream_id: BlobId,
    /// Bytes of the literal stream (the record's `index`).
    pub literal_size: u64,
    /// Bytes of a page (4096).
    pub page_size: u32,
    /// Chunk size of the page images (a power of two, 1 to 64 pages).
    pub chunk_size: u32,
    /// Bytes of the op stream and its stream index blobs.
    pub ops_size: u64,
    pub ops: Vec<BlobId>,
    /// The page images, in the order the ops number them: one or more (layers) per RAM block.
    pub images: Vec<PageImage>,
}

/// One page image: a RAM block's pages at their offsets, indexed like a disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageImage {
    /// QEMU's name of the RAM block (1-255 bytes, any characters).
    pub name: String,
    /// Bytes (a multiple of the page size).
    pub size: u64,
    /// Root of its index tree (chunks of `chunk_size`).
    pub root: BlobId,
}

impl PageImages {
    /// Chunks of an image of `size` bytes.
    pub fn chunks_of(&self, size: u64) -> u64 {
        size.div_ceil(self.chunk_size as u64)
    }

    fn validate(&self, size: u64) -> Result<()> {
        let invalid = |reason: String| Error::Invalid {
            what: "memory stream",
            reason,
        };
        if self.page_size != crate::memory::PAGE_SIZE {
            return Err(invalid(format!("page size {}", self.page_size)));
        }
        crate::memory::validate_image_chunk_size(self.chunk_size)?;
        if self.literal_size > size || (size - self.literal_size) % self.page_size as u64 != 0 {
            return Err(invalid(format!(
                "{} literal bytes in a stream of {size}",
                self.literal_size
            )));
        }
        if self.images.len() > crate::memory::assemble::MAX_IMAGES {
            return Err(invalid(format!("{} page images", self.images.len())));
        }
        for i in &self.images {
            if i.name.is_empty()
                || i.name.len() > 255
                || i.size == 0
                || i.size % self.page_size as u64 != 0
            {
                return Err(invalid(format!(
                    "page image {:?} of {} bytes",
                    i.name, i.size
                )));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupStats {
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Bytes in chunks whose id differs from the parent (the change).
    pub changed_bytes: u64,
    /// Plaintext bytes of blobs new to the repository.
    pub new_bytes: u64,
    /// Bytes those new blobs take in the repository after compression and encryption, plus new
    /// metadata (index nodes, manifest).
    pub stored_bytes: u64,
    /// Of stored_bytes, metadata (tree nodes, index objects, manifest).
    pub metadata_bytes: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub seconds: f64,
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serialises")
    }

    /// Validates: version, name syntax, unique disk names, chunk_size a power of two in
    /// [64 KiB, 4 MiB], change maps within each disk's chunk count.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() > MANIFEST_MAX {
            return Err(Error::TooLarge {
                kind: "manifest",
                size: bytes.len() as u64,
                max: MANIFEST_MAX as u64,
            });
        }
        let corrupt = |reason: String| Error::Corrupt {
            kind: "manifest",
            reason,
        };
        // The version first: a newer manifest may carry fields this build rejects.
        #[derive(Deserialize)]
        struct VersionProbe {
            version: u32,
        }
        if let Ok(probe) = serde_json::from_slice::<VersionProbe>(bytes) {
            if probe.version > MANIFEST_VERSION {
                return Err(Error::UnsupportedVersion {
                    kind: "manifest",
                    version: probe.version,
                    supported: MANIFEST_VERSION,
                });
            }
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        m.validate().map_err(|e| match e {
            Error::Invalid { what, reason } => corrupt(format!("{what}: {reason}")),
            other => other,
        })?;
        Ok(m)
    }

    /// The checks of [`Manifest::from_json`] on a manifest in memory (Err(Invalid)).
    pub fn validate(&self) -> Result<()> {
        if self.version != MANIFEST_VERSION {
            return Err(Error::Invalid {
                what: "manifest version",
                reason: format!("expected {MANIFEST_VERSION}, got {}", self.version),
            });
        }
        validate_name("VM name", &self.vm)?;
        RepoConfig::validate_chunk_size(self.chunk_size)?;
        let mut names = std::collections::HashSet::new();
        for d in &self.disks {
            validate_name("disk name", &d.name)?;
            if !names.insert(d.name.as_str()) {
                return Err(Error::Invalid {
                    what: "disk name",
                    reason: format!("{:?} appears twice", d.name),
                });
            }
            if let Some(changes) = &d.changes {
                changes
                    .validate(self.chunks_of(d.size))
                    .map_err(|e| Error::Invalid {
                        what: "change map",
                        reason: format!("disk {:?}: {e}", d.name),
                    })?;
            }
        }
        let mut names = std::collections::HashSet::new();
        for s in &self.streams {
            validate_name("stream name", &s.name)?;
            if !names.insert(s.name.as_str()) {
                return Err(Error::Invalid {
                    what: "stream name",
                    reason: format!("{:?} appears twice", s.name),
                });
            }
            if let Some(p) = &s.pages {
                p.validate(s.size).map_err(|e| Error::Invalid {
                    what: "stream",
                    reason: format!("{:?}: {e}", s.name),
                })?;
            }
        }
        Ok(())
    }

    /// Number of chunks of a disk of `size` bytes.
    pub fn chunks_of(&self, size: u64) -> u64 {
        size.div_ceil(self.chunk_size as u64)
    }

    pub fn disk(&self, name: &str) -> Option<&DiskEntry> {
        self.disks.iter().find(|d| d.name == name)
    }
}

/// Largest manifest `from_json` accepts.
const MANIFEST_MAX: usize = 64 << 20;

/// Disk, VM and stream names: 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let invalid = |reason: String| Err(Error::Invalid { what, reason });
    if name.is_empty() {
        return invalid("must not be empty".into());
    }
    if name.len() > 64 {
        return invalid(format!(
            "{:?}... is {} bytes long, at most 64 allowed",
            name.chars().take(16).collect::<String>(),
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return invalid(format!(
            "{name:?} contains {c:?}: only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    if name.starts_with(['.', '-']) {
        return invalid(format!("{name:?} must not start with '.' or '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            id: SnapshotId([7; 16]),
            vm: "web-01".into(),
            time: "2026-11-02T03:04:05.123456789Z".parse().unwrap(),
            parent: Some(SnapshotId([6; 16])),
            hostname: "host.example".into(),
            tool_version: "0.1.0".into(),
            chunk_size: 64 << 10,
            disks: vec![
                DiskEntry {
                    name: "drive-virtio-disk0".into(),
                    size: 10 << 30,
                    root: BlobId([1; 32]),
                    changes: Some(ChangeMap::from_sorted([0, 1, 2, 10, 163_839])),
                    data_bytes: 5 << 30,
                    cbt: ChangeTracking::Used,
                    cbt_reason: None,
                    checkpoint: Some(Checkpoint {
                        bitmap: "vmkeep-0707".into(),
                        node: "libvirt-1-format".into(),
                        granularity: 65536,
                        source: "qemu:1234".into(),
                    }),
                    source_identity: Some("2049:12:5368709120:1:2".into()),
                },
                DiskEntry {
                    name: "data.img".into(),
                    size: 12345,
                    root: BlobId::ZERO,
                    changes: None,
                    data_bytes: 0,
                    cbt: ChangeTracking::None,
                    cbt_reason: Some("image backup".into()),
                    checkpoint: None,
                    source_identity: None,
                },
            ],
            streams: vec![StreamRecord {
                name: "memory".into(),
                size: 1 << 30,
                index: vec![BlobId([2; 32]), BlobId([3; 32])],
                pages: Some(PageImages {
                    stream_id: BlobId([4; 32]),
                    literal_size: (1 << 30) - (100 << 12),
                    page_size: 4096,
                    chunk_size: 16384,
                    ops_size: 300,
                    ops: vec![BlobId([5; 32])],
                    images: vec![PageImage {
                        name: "/rom@etc/acpi/tables".into(),
                        size: 128 << 10,
                        root: BlobId([6; 32]),
                    }],
                }),
            }],
            stats: BackupStats {
                read_bytes: 1,
                changed_bytes: 2,
                new_bytes: 3,
                stored_bytes: 4,
                metadata_bytes: 5,
                chunks_new: 6,
                chunks_reused: 7,
                seconds: 1.5,
            },
            pause_ms: 12,
        }
    }

    fn edit(f: impl Fn(&mut Manifest)) -> Result<Manifest> {
        let mut m = sample();
        f(&mut m);
        Manifest::from_json(&m.to_json())
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let back = Manifest::from_json(&m.to_json()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.chunks_of(back.disks[0].size), 163_840);
        assert_eq!(back.chunks_of(12345), 1);
        assert_eq!(back.disk("data.img").unwrap().size, 12345);
        assert!(back.disk("nope").is_none());
    }

    /// The JSON contract: exactly "used", "rescan", "none"; anything else is refused.
    #[test]
    fn change_tracking_is_stored_as_lowercase_names() {
        for (state, name) in [
            (ChangeTracking::Used, "used"),
            (ChangeTracking::Rescan, "rescan"),
            (ChangeTracking::None, "none"),
        ] {
            assert_eq!(state.to_string(), name);
            let mut m = sample();
            m.disks[0].cbt = state;
            let v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
            assert_eq!(v["disks"][0]["cbt"], name);
            assert_eq!(
                Manifest::from_json(&m.to_json()).unwrap().disks[0].cbt,
                state
            );
        }
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        for bad in ["Used", "", "partial"] {
            v["disks"][0]["cbt"] = bad.into();
            assert!(Manifest::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
        }
    }

    #[test]
    fn defaults_for_optional_fields() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("streams");
        o.remove("pause_ms");
        for d in o["disks"].as_array_mut().unwrap() {
            let d = d.as_object_mut().unwrap();
            d.remove("data_bytes");
            d.remove("cbt");
            d.remove("cbt_reason");
            d.remove("checkpoint");
        }
        let m = Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(m.streams.is_empty());
        assert_eq!(m.pause_ms, 0);
        assert_eq!(m.disks[0].cbt, ChangeTracking::None);
        // A stream written before memory streams existed has no `pages`.
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["streams"][0].as_object_mut().unwrap().remove("pages");
        let m = Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(m.streams[0].pages.is_none());
        assert!(!String::from_utf8(m.to_json()).unwrap().contains("pages"));
    }

    #[test]
    fn validation() {
        assert!(matches!(
            edit(|m| m.version = 2),
            Err(Error::UnsupportedVersion { version: 2, .. })
        ));
        assert!(matches!(
            edit(|m| m.version = 0),
            Err(Error::Corrupt { .. })
        ));
        assert!(edit(|m| m.vm = "bad name".into()).is_err());
        assert!(edit(|m| m.vm = String::new()).is_err());
        assert!(edit(|m| m.disks[1].name = ".hidden".into()).is_err());
        assert!(edit(|m| m.disks[1].name = "drive-virtio-disk0".into()).is_err());
        assert!(edit(|m| m.streams[0].name = "a/b".into()).is_err());
        assert!(edit(|m| m.chunk_size = 1000).is_err());
        let dup = |m: &mut Manifest| {
            let s = m.streams[0].clone();
            m.streams.push(s);
        };
        assert!(edit(dup).is_err());
        let pages = |f: fn(&mut PageImages)| edit(move |m| f(m.streams[0].pages.as_mut().unwrap()));
        assert!(pages(|p| p.page_size = 8192).is_err());
        assert!(pages(|p| p.chunk_size = 3 << 12).is_err());
        assert!(pages(|p| p.chunk_size = 512 << 10).is_err());
        assert!(pages(|p| p.chunk_size = 4096).is_ok());
        assert!(pages(|p| p.literal_size = (1 << 30) + 1).is_err());
        assert!(pages(|p| p.literal_size -= 1).is_err());
        assert!(pages(|p| p.images[0].size = 1000).is_err());
        assert!(pages(|p| p.images[0].size = 0).is_err());
        assert!(pages(|p| p.images[0].name = String::new()).is_err());
        assert!(pages(|p| p.images[0].name = "x".repeat(256)).is_err());
        assert!(edit(|m| m.chunk_size = 8 << 20).is_err());
        // A change map beyond the disk's chunks.
        assert!(edit(|m| m.disks[1].changes = Some(ChangeMap::from_sorted([1]))).is_err());
        assert!(edit(|m| m.disks[1].changes = Some(ChangeMap::from_sorted([0]))).is_ok());
        assert!(edit(|m| m.disks.clear()).is_ok());
        let err = edit(|m| m.disks[1].name = "x y".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("disk name") && err.contains("' '"), "{err}");
        // A newer version may carry unknown fields: the version error wins.
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["version"] = 3.into();
        v["future"] = true.into();
        assert!(matches!(
            Manifest::from_json(&serde_json::to_vec(&v).unwrap()),
            Err(Error::UnsupportedVersion { version: 3, .. })
        ));
        v["version"] = 1.into();
        assert!(matches!(
            Manifest::from_json(&serde_json::to_vec(&v).unwrap()),
            Err(Error::Corrupt { .. })
        ));
        assert!(Manifest::from_json(b"").is_err());
        assert!(Manifest::from_json(b"{\"version\":1}").is_err());
    }

    #[test]
    fn size_bound() {
        let mut json = sample().to_json();
        json.extend(std::iter::repeat_n(b' ', 64 << 20));
        assert!(matches!(
            Manifest::from_json(&json),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn names() {
        for ok in [
            "a",
            "A0",
            "vm_1",
            "disk-0",
            "x.qcow2",
            "0",
            "a..b",
            &"a".repeat(64),
        ] {
            validate_name("disk name", ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            (&"a".repeat(65), "at most 64"),
            (".a", "start"),
            ("-a", "start"),
            ("a b", "' '"),
            ("a/b", "'/'"),
            ("é", "'é'"),
            ("a\n", "'\\n'"),
        ];
        for (bad, hint) in cases {
            let err = validate_name("VM name", bad).unwrap_err();
            assert!(matches!(
                err,
                Error::Invalid {
                    what: "VM name",
                    ..
                }
            ));
            assert!(err.to_string().contains(hint), "{bad:?}: {err}");
        }
    }

    proptest! {
        #[test]
        fn prop_round_trip(vm in "[A-Za-z0-9_][A-Za-z0-9._-]{0,63}",
                           sizes in proptest::collection::vec(0u64..(1 << 40), 0..4),
                           shift in 0u32..=6,
                           changed in proptest::collection::btree_set(0u64..64, 0..20)) {
            let chunk_size = (64u32 << 10) << shift;
            let mut m = sample();
            m.vm = vm;
            m.chunk_size = chunk_size;
            m.disks = sizes.iter().enumerate().map(|(i, &size)| {
                let chunks = size.div_ceil(chunk_size as u64);
                DiskEntry {
                    name: format!("disk{i}"),
                    size,
                    root: BlobId([i as u8; 32]),
                    changes: Some(ChangeMap::from_sorted(changed.iter().copied().filter(|&c| c < chunks))),
                    data_bytes: size / 2,
                    cbt: ChangeTracking::Rescan,
                    cbt_reason: None,
                    checkpoint: None,
                    source_identity: None,
                }
            }).collect();
            let back = Manifest::from_json(&m.to_json()).unwrap();
            prop_assert_eq!(back, m);
        }

        #[test]
        fn prop_validate_name_matches_the_rule(name in "[ -~]{0,70}") {
            let ok = (1..=64).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !name.starts_with(['.', '-']);
            prop_assert_eq!(validate_name("name", &name).is_ok(), ok);
        }

        #[test]
        fn prop_from_json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::from_json(&bytes);
        }

        #[test]
        fn prop_from_json_never_panics_on_mutations(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut json = sample().to_json();
            let i = at.index(json.len());
            json[i] = byte;
            let _ = Manifest::from_json(&json);
        }
    }
}
