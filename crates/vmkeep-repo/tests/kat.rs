//! Known-answer repositories (docs/FORMAT.md §4, "Known-answer repositories"): two tiny
//! repositories in `tests/data/`, one plain and one encrypted, written once by the code and
//! committed with the ids they must yield. The normal suite opens them with the current code,
//! checks every id, restores every restore point and compares its bytes, and checks the data.
//! A change that alters how an existing repository is read fails here.
//!
//! `regenerate_known_answer_repositories` rewrites them; it is ignored because regenerating
//! replaces the vectors: run it only for a deliberate format change, and say so in the commit.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use vmkeep_core::keys::KdfParams;
use vmkeep_core::manifest::Manifest;
use vmkeep_core::object;
use vmkeep_core::tree::{self, Node, NodeStore};
use vmkeep_core::ObjectKind;
use vmkeep_core::{BlobId, SnapshotId};
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::restore::RestoreOptions;
use vmkeep_repo::{
    BackupOptions, CheckOptions, ImageBackupOptions, InitOptions, NoProgress, Repository,
};
use vmkeep_store::{Key, LocalStore, Store};

const CHUNK: usize = 64 << 10;
/// Five whole chunks and a short last one.
const DISK_SIZE: usize = 5 * CHUNK + 1000;
const PASSPHRASE: &str = "vmkeep known answer";
const VM: &str = "kat";
const DISK: &str = "vda";

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The repositories: (folder name, passphrase).
const REPOSITORIES: [(&str, Option<&str>); 2] =
    [("kat-plain", None), ("kat-encrypted", Some(PASSPHRASE))];

/// splitmix64 bytes: incompressible and reproducible.
fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A chunk of text that compresses well but is unique to `label`.
fn text(label: &str) -> Vec<u8> {
    let line = format!("vmkeep known-answer chunk {label}\n");
    line.bytes().cycle().take(CHUNK).collect()
}

/// The disk at restore point 1 and 2. Point 1: A, zeros, A again (a duplicate), B, C, and a
/// random short last chunk (incompressible: stored raw). Point 2 rewrites chunk 3 (D), zeroes
/// chunk 4, and changes the short last chunk.
fn disk(point: u8) -> Vec<u8> {
    let zeros = vec![0u8; CHUNK];
    let mut d = Vec::with_capacity(DISK_SIZE);
    d.extend(text("A"));
    d.extend(&zeros);
    d.extend(text("A"));
    if point == 1 {
        d.extend(text("B"));
        d.extend(text("C"));
        d.extend(random(1000, 1));
    } else {
        d.extend(text("D"));
        d.extend(&zeros);
        d.extend(random(1000, 2));
    }
    assert_eq!(d.len(), DISK_SIZE);
    d
}

/// Tree nodes read through the repository.
struct Nodes<'a> {
    repo: &'a Repository,
    index: &'a BlobIndex,
}

impl NodeStore for Nodes<'_> {
    fn load(&self, id: &BlobId) -> vmkeep_core::Result<Node> {
        let bytes =
            self.repo
                .read_blob(self.index, id)
                .map_err(|e| vmkeep_core::Error::Corrupt {
                    kind: "tree node",
                    reason: e.to_string(),
                })?;
        Node::decode(&bytes)
    }

    fn store(&mut self, _: &Node) -> vmkeep_core::Result<BlobId> {
        unreachable!("the known-answer test only reads")
    }
}

/// Every chunk id of a disk (ZERO included), in order.
fn chunk_ids(repo: &Repository, index: &BlobIndex, root: &BlobId, size: u64) -> Vec<String> {
    let chunks = size.div_ceil(CHUNK as u64);
    let mut ids = vec![BlobId::ZERO.to_hex(); chunks as usize];
    tree::for_each_chunk(&Nodes { repo, index }, root, chunks, &mut |i, id| {
        ids[i as usize] = id.to_hex();
        Ok(())
    })
    .unwrap();
    ids
}

fn open(root: &Path, passphrase: Option<&str>) -> Repository {
    let store: Arc<dyn Store> = Arc::new(LocalStore::open(root).unwrap());
    Repository::open(store, passphrase.map(str::as_bytes)).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn known_answer_repositories_read_back() {
    for (name, passphrase) in REPOSITORIES {
        let expected: Value = serde_json::from_slice(
            &std::fs::read(data_dir().join(name).join("expected.json"))
                .unwrap_or_else(|e| panic!("{name}/expected.json: {e}")),
        )
        .unwrap();
        assert_eq!(expected["passphrase"].as_str(), passphrase, "{name}");
        // A copy: opening and checking must not touch the committed files.
        let scratch = tempfile::tempdir().unwrap();
        let root = scratch.path().join(name);
        copy_dir(&data_dir().join(name).join("repository"), &root);
        let repo = open(&root, passphrase);
        assert_eq!(repo.config().id, expected["config_id"], "{name}");
        assert_eq!(repo.config().chunk_size as usize, CHUNK, "{name}");
        assert_eq!(repo.config().encrypted, passphrase.is_some(), "{name}");
        let index = BlobIndex::load(&repo).unwrap();

        let points = expected["snapshots"].as_array().unwrap();
        let listed: Vec<String> = repo
            .snapshots()
            .unwrap()
            .iter()
            .map(|m| m.id.to_hex())
            .collect();
        let want: Vec<&str> = points.iter().map(|p| p["id"].as_str().unwrap()).collect();
        assert_eq!(listed, want, "{name}: restore points, oldest first");

        for (n, point) in points.iter().enumerate() {
            let id: SnapshotId = point["id"].as_str().unwrap().parse().unwrap();
            let m = repo.load_manifest(&id).unwrap();
            assert_eq!(m.vm, VM);
            assert_eq!(
                m.parent.map(|p| p.to_hex()),
                point["parent"].as_str().map(str::to_string),
                "{name} point {n}: parent"
            );
            let d = m.disk(DISK).unwrap();
            let want_disk = &point["disks"][0];
            assert_eq!(d.size, want_disk["size"].as_u64().unwrap());
            assert_eq!(d.root.to_hex(), want_disk["root"], "{name} point {n}: root");
            let ids = chunk_ids(&repo, &index, &d.root, d.size);
            let want_ids: Vec<&str> = want_disk["chunks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
            assert_eq!(ids, want_ids, "{name} point {n}: chunk ids");
            assert_eq!(ids[1], BlobId::ZERO.to_hex(), "the zero chunk is ZERO");
            assert_eq!(ids[0], ids[2], "the duplicated chunk has one id");

            let target = scratch.path().join(format!("restore-{n}"));
            repo.restore(
                &m,
                &RestoreOptions {
                    target: target.clone(),
                    disk: None,
                },
                &NoProgress,
            )
            .unwrap();
            let bytes = std::fs::read(target.join(format!("{DISK}.raw"))).unwrap();
            assert_eq!(
                blake3::hash(&bytes).to_hex().as_str(),
                want_disk["blake3"],
                "{name} point {n}: restored bytes"
            );
            assert_eq!(
                bytes,
                disk(n as u8 + 1),
                "{name} point {n}: the generator's disk"
            );
            if passphrase.is_none() {
                // Plain chunk ids are BLAKE3 of the chunk (b3sum can check them).
                for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
                    if chunk.iter().any(|b| *b != 0) {
                        assert_eq!(blake3::hash(chunk).to_hex().as_str(), ids[i]);
                    }
                }
            }
        }
        let report = repo
            .check(&CheckOptions { read_data: true }, &NoProgress)
            .unwrap();
        assert!(report.ok, "{name}: {report:?}");
        assert!(report.warnings.is_empty(), "{name}: {report:?}");
        assert_eq!(report.snapshots_checked, points.len());
    }
}

#[test]
#[ignore = "regenerates the committed known-answer repositories: run only for a deliberate format change"]
fn regenerate_known_answer_repositories() {
    let scratch = tempfile::tempdir().unwrap();
    for (name, passphrase) in REPOSITORIES {
        let dir = data_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("repository");
        let store: Arc<dyn Store> = Arc::new(LocalStore::create(&root).unwrap());
        let repo = Repository::init(
            store.clone(),
            InitOptions {
                chunk_size: CHUNK as u32,
                passphrase: passphrase.map(|p| p.as_bytes().to_vec().into()),
                // Cheap: the test unlocks it on every run.
                kdf: KdfParams {
                    m_cost_kib: 64,
                    t_cost: 1,
                    p_cost: 1,
                },
            },
        )
        .unwrap();
        let mut points = Vec::new();
        for point in [1u8, 2] {
            let image = scratch.path().join(format!("{name}-{point}.raw"));
            std::fs::write(&image, disk(point)).unwrap();
            let m = repo
                .backup_image(
                    &ImageBackupOptions {
                        backup: BackupOptions {
                            vm: VM.into(),
                            ..Default::default()
                        },
                        disks: vec![(DISK.into(), image)],
                        full: false,
                    },
                    &NoProgress,
                )
                .unwrap();
            // No machine's name in the tree: the manifest names a fixed host.
            let m = Manifest {
                hostname: "kat-generator".into(),
                ..m
            };
            let key = Key::new(ObjectKind::Snapshot, m.id.to_hex()).unwrap();
            store
                .put(
                    &key,
                    &object::seal(repo.keys(), ObjectKind::Snapshot, &m.to_json()),
                )
                .unwrap();
            points.push(m);
        }
        store.flush().unwrap();
        let index = BlobIndex::load(&repo).unwrap();
        let snapshots: Vec<Value> = points
            .iter()
            .enumerate()
            .map(|(n, m)| {
                let d = m.disk(DISK).unwrap();
                json!({
                    "id": m.id.to_hex(),
                    "parent": m.parent.map(|p| p.to_hex()),
                    "disks": [{
                        "name": DISK,
                        "size": d.size,
                        "root": d.root.to_hex(),
                        "chunks": chunk_ids(&repo, &index, &d.root, d.size),
                        "blake3": blake3::hash(&disk(n as u8 + 1)).to_hex().to_string(),
                    }],
                })
            })
            .collect();
        let expected = json!({
            "passphrase": passphrase,
            "config_id": repo.config().id,
            "snapshots": snapshots,
        });
        let mut text = serde_json::to_vec_pretty(&expected).unwrap();
        text.push(b'\n');
        std::fs::write(dir.join("expected.json"), text).unwrap();
        // Only the objects of these formats: no lease or GC record (being redesigned).
        for kind in [ObjectKind::Lock, ObjectKind::GcRecord] {
            assert!(
                store.list(kind).unwrap().is_empty(),
                "{name}: {kind:?} objects"
            );
        }
        // Git keeps no empty folders; drop them here too, so the tree is what git stores.
        for e in std::fs::read_dir(&root).unwrap().flatten() {
            let _ = std::fs::remove_dir(e.path()); // fails (and is kept) unless empty
        }
    }
}
