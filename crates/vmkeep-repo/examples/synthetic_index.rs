//! Grows a plain local repository's index by synthetic entries, for bench/scale.py: index
//! objects exactly as a backup writes them (8 packs of 256 64-KiB chunks each, sealed, named by
//! their hash), for packs that do not exist (their data is never written: the benchmark
//! measures what the index costs, and a blob of a missing pack is never reused).
//!
//! With REFERENCED > 0, the first REFERENCED of these entries also become a restore point's
//! disk, so check and prune walk and join a referenced set of that size: their packs are made
//! as sparse files of the size the index gives (check without --read-data and prune only list
//! them), the disk's index tree is built and stored in real packs with their index object, and
//! a manifest (VM `synthetic`, disk `big`) is written.
//!
//! Usage: cargo run --release --example synthetic_index -- REPO_DIR ENTRIES [SEED [REFERENCED]]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmkeep_core::keys::{BlobKind, Keys};
use vmkeep_core::manifest::{DiskEntry, Manifest, MANIFEST_VERSION};
use vmkeep_core::pack::{IndexFile, PackBuilder, PackEntry};
use vmkeep_core::tree::{Node, NodeStore, TreeBuilder};
use vmkeep_core::{blob, object, BlobId, ObjectKind, PackId, SnapshotId};
use vmkeep_store::{Key, LocalStore, Store};

const PACKS_PER_INDEX: u64 = 8;
const BLOBS_PER_PACK: u64 = 256;
const CHUNK: u32 = 65536;

/// splitmix64: a fast stream of well-mixed words (ids must be uniform, like hashes).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn id32(seed: u64, n: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&mix(seed ^ mix(n.wrapping_mul(4).wrapping_add(i as u64))).to_le_bytes());
    }
    out
}

fn index_object(seed: u64, n: u64) -> IndexFile {
    let packs = (0..PACKS_PER_INDEX)
        .map(|p| {
            let pack_no = n * PACKS_PER_INDEX + p;
            let entries = (0..BLOBS_PER_PACK)
                .map(|b| PackEntry {
                    kind: BlobKind::Data,
                    id: BlobId(id32(seed, pack_no * BLOBS_PER_PACK + b)),
                    offset: b as u32 * (CHUNK + 40),
                    length: CHUNK + 40,
                    raw_len: CHUNK,
                })
                .collect();
            (PackId(id32(seed ^ 0x5eed, pack_no)), entries)
        })
        .collect();
    IndexFile { packs }
}

/// Tree nodes written into real packs (16 MiB), as a backup's packer would.
struct Nodes<'a> {
    store: &'a dyn Store,
    keys: &'a Keys,
    builder: PackBuilder,
    written: Vec<(PackId, Vec<PackEntry>)>,
}

impl Nodes<'_> {
    fn write_pack(&mut self) {
        if self.builder.is_empty() {
            return;
        }
        let (id, bytes, entries) = std::mem::take(&mut self.builder).finish(self.keys);
        let key = Key::new(ObjectKind::Pack, id.to_hex()).unwrap();
        self.store.put(&key, &bytes).expect("writing a pack");
        self.written.push((id, entries));
    }
}

impl NodeStore for Nodes<'_> {
    fn load(&self, _: &BlobId) -> vmkeep_core::Result<Node> {
        Err(vmkeep_core::Error::Invalid {
            what: "synthetic tree",
            reason: "a tree built from nothing reads no node".into(),
        })
    }

    fn store(&mut self, node: &Node) -> vmkeep_core::Result<BlobId> {
        let bytes = node.encode();
        let id = self.keys.blob_id(BlobKind::Tree, &bytes);
        let data = blob::encode(self.keys, BlobKind::Tree, &id, &bytes);
        self.builder
            .add(BlobKind::Tree, id, bytes.len() as u32, &data);
        if self.builder.is_full(16 << 20) {
            self.write_pack();
        }
        Ok(id)
    }
}

/// Make the first `chunks` synthetic entries a restore point's disk (see the module doc).
fn reference(root: &std::path::Path, store: &dyn Store, keys: &Keys, seed: u64, chunks: u64) {
    let packs = chunks.div_ceil(BLOBS_PER_PACK);
    for pack_no in 0..packs {
        let key = Key::new(
            ObjectKind::Pack,
            PackId(id32(seed ^ 0x5eed, pack_no)).to_hex(),
        )
        .unwrap();
        let path = root.join(key.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = std::fs::File::create(&path).expect("creating a sparse pack");
        f.set_len(BLOBS_PER_PACK * (CHUNK as u64 + 40)).unwrap();
    }
    let mut nodes = Nodes {
        store,
        keys,
        builder: PackBuilder::default(),
        written: Vec::new(),
    };
    let mut tree = TreeBuilder::new(&mut nodes, None, chunks);
    for i in 0..chunks {
        tree.set(i, BlobId(id32(seed, i))).expect("a tree entry");
    }
    let root_id = tree.finish().expect("the tree");
    nodes.write_pack();
    let tree_packs = nodes.written.len();
    for group in nodes.written.chunks(PACKS_PER_INDEX as usize) {
        let sealed = object::seal(
            keys,
            ObjectKind::Index,
            &IndexFile {
                packs: group.to_vec(),
            }
            .encode(),
        );
        let name = blake3::hash(&sealed).to_hex().to_string();
        store
            .put(&Key::new(ObjectKind::Index, name).unwrap(), &sealed)
            .expect("writing the tree's index object");
    }
    let m = Manifest {
        version: MANIFEST_VERSION,
        id: SnapshotId::random(),
        vm: "synthetic".into(),
        time: chrono::Utc::now(),
        parent: None,
        hostname: "bench".into(),
        tool_version: "synthetic_index".into(),
        chunk_size: CHUNK,
        disks: vec![DiskEntry {
            name: "big".into(),
            size: chunks * CHUNK as u64,
            root: root_id,
            changes: None,
            data_bytes: chunks * CHUNK as u64,
            cbt: Default::default(),
            cbt_reason: None,
            checkpoint: None,
            source_identity: None,
        }],
        streams: Vec::new(),
        stats: Default::default(),
        pause_ms: 0,
    };
    let sealed = object::seal(keys, ObjectKind::Snapshot, &m.to_json());
    store
        .put(
            &Key::new(ObjectKind::Snapshot, m.id.to_hex()).unwrap(),
            &sealed,
        )
        .expect("writing the manifest");
    println!(
        "restore point {} references {chunks} chunks in {packs} sparse packs ({tree_packs} tree packs)",
        m.id
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: synthetic_index REPO_DIR ENTRIES [SEED]");
        std::process::exit(2);
    }
    let store: Arc<dyn Store> = Arc::new(LocalStore::open(&args[1]).expect("a local repository"));
    let entries: u64 = args[2].parse().expect("ENTRIES is a number");
    let seed: u64 = args
        .get(3)
        .map_or(1, |s| s.parse().expect("SEED is a number"));
    let per_object = PACKS_PER_INDEX * BLOBS_PER_PACK;
    let objects = entries.div_ceil(per_object);
    let keys = Keys::plain();
    let next = AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= objects {
                    return;
                }
                let sealed =
                    object::seal(&keys, ObjectKind::Index, &index_object(seed, n).encode());
                let name = blake3::hash(&sealed).to_hex().to_string();
                store
                    .put(&Key::new(ObjectKind::Index, name).unwrap(), &sealed)
                    .expect("writing an index object");
            });
        }
    });
    let referenced: u64 = args
        .get(4)
        .map_or(0, |s| s.parse().expect("REFERENCED is a number"));
    if referenced > 0 {
        // Whole packs only: a partly referenced sparse pack would be repacked by prune, which
        // would read its (absent) data.
        let n = referenced.min(objects * per_object) / BLOBS_PER_PACK * BLOBS_PER_PACK;
        reference(std::path::Path::new(&args[1]), &*store, &keys, seed, n);
    }
    store.flush().expect("flush");
    println!(
        "{} index objects, {} entries",
        objects,
        objects * per_object
    );
}
