//! Shared helpers of the repository-level integration tests: deterministic test images,
//! repositories in temporary folders (with small packs), restore-and-compare, crash simulation.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmkeep_core::keys::{BlobKind, KdfParams};
use vmkeep_core::object::{self, ObjectKind};
use vmkeep_core::{BlobId, SnapshotId};
use vmkeep_repo::{
    BackupOptions, CheckOptions, CheckReport, ImageBackupOptions, InitOptions, Manifest,
    NoProgress, Repository, RestoreOptions, Tuning,
};
use vmkeep_store::{FaultStore, IgnoreConditionalStore, Key, Kind, LocalStore, Store};

pub const CS: u64 = 64 << 10;
pub const PACK_SIZE: u32 = 1 << 20;
pub const PASS: &[u8] = b"correct horse battery staple";

pub fn kdf() -> KdfParams {
    KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    }
}

/// Deterministic pseudo-random numbers (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// What one chunk of a test image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Never written: a hole in the sparse file (reads as zeros).
    Hole,
    /// Written, but all zeros (the filesystem reports it as data).
    Zeros,
    /// Repeated text with random words: compressible.
    Text(u64),
    /// Random bytes: incompressible.
    Random(u64),
    /// The content of `Text(seed)` (text) or `Random(seed)` with the byte at `pos` flipped.
    Flipped { seed: u64, text: bool, pos: u32 },
    /// Zeros but for one byte at `pos`.
    Byte(u32),
}

const WORDS: &[&str] = &[
    "virtual",
    "machine",
    "disk",
    "image",
    "backup",
    "restore",
    "chunk",
    "pack",
    "index",
    "manifest",
    "kernel",
    "block",
    "sector",
    "qemu",
    "lease",
    "prune",
    "forget",
    "zstd",
    "blake3",
    "repository",
    "snapshot",
    "sparse",
    "hole",
    "bitrot",
];

impl Chunk {
    /// The chunk's bytes (`len` <= CS; shorter for a disk's last partial chunk).
    pub fn bytes(self, len: usize) -> Vec<u8> {
        match self {
            Chunk::Hole | Chunk::Zeros => vec![0u8; len],
            Chunk::Random(seed) => {
                let mut v = vec![0u8; len];
                Rng::new(seed).fill(&mut v);
                v
            }
            Chunk::Flipped { seed, text, pos } => {
                let base = if text {
                    Chunk::Text(seed)
                } else {
                    Chunk::Random(seed)
                };
                let mut v = base.bytes(len);
                v[pos as usize % len] ^= 1;
                v
            }
            Chunk::Byte(pos) => {
                let mut v = vec![0u8; len];
                v[pos as usize % len] = 1;
                v
            }
            Chunk::Text(seed) => {
                let mut rng = Rng::new(seed);
                let mut v = Vec::with_capacity(len + 64);
                while v.len() < len {
                    if rng.below(8) == 0 {
                        v.extend_from_slice(format!("{:016x} ", rng.next_u64()).as_bytes());
                    } else {
                        v.extend_from_slice(
                            WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes(),
                        );
                        v.push(b' ');
                    }
                }
                v.truncate(len);
                v
            }
        }
    }

    pub fn is_zero(self) -> bool {
        matches!(self, Chunk::Hole | Chunk::Zeros)
    }

    /// The same content with one byte changed.
    pub fn flip(self, pos: u32) -> Chunk {
        match self {
            Chunk::Hole | Chunk::Zeros => Chunk::Byte(pos),
            Chunk::Text(seed) => Chunk::Flipped {
                seed,
                text: true,
                pos,
            },
            Chunk::Random(seed) => Chunk::Flipped {
                seed,
                text: false,
                pos,
            },
            Chunk::Flipped { seed, text, .. } => Chunk::Flipped { seed, text, pos },
            Chunk::Byte(_) => Chunk::Byte(pos),
        }
    }
}

/// A test image: its size and what each chunk holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub size: u64,
    pub chunks: Vec<Chunk>,
}

impl Spec {
    pub fn chunk_count(size: u64) -> usize {
        size.div_ceil(CS) as usize
    }

    /// A semi-compressible image: ~10 % holes, ~5 % written zeros, ~45 % text, ~40 % random.
    pub fn mixed(size: u64, rng: &mut Rng) -> Spec {
        let chunks = (0..Spec::chunk_count(size))
            .map(|_| random_chunk(rng))
            .collect();
        Spec { size, chunks }
    }

    /// Every chunk random (incompressible, distinct).
    pub fn random(size: u64, rng: &mut Rng) -> Spec {
        let chunks = (0..Spec::chunk_count(size))
            .map(|_| Chunk::Random(rng.next_u64()))
            .collect();
        Spec { size, chunks }
    }

    /// A copy with about `percent` % of the chunks replaced by fresh content.
    pub fn mutate(&self, percent: u64, rng: &mut Rng) -> Spec {
        let mut s = self.clone();
        for c in s.chunks.iter_mut() {
            if rng.below(100) < percent {
                *c = random_chunk(rng);
            }
        }
        s
    }

    /// A copy with the chunks in `range` replaced by fresh random content.
    pub fn rewrite(&self, range: std::ops::Range<usize>, rng: &mut Rng) -> Spec {
        let mut s = self.clone();
        for c in &mut s.chunks[range] {
            *c = Chunk::Random(rng.next_u64());
        }
        s
    }

    pub fn chunk_len(&self, i: usize) -> usize {
        (self.size - i as u64 * CS).min(CS) as usize
    }

    pub fn chunk_bytes(&self, i: usize) -> Vec<u8> {
        self.chunks[i].bytes(self.chunk_len(i))
    }

    /// Write the image as a sparse file: holes are never written.
    pub fn write(&self, path: &Path) -> PathBuf {
        let f = File::create(path).unwrap();
        f.set_len(self.size).unwrap();
        for (i, c) in self.chunks.iter().enumerate() {
            if *c != Chunk::Hole {
                f.write_all_at(&self.chunk_bytes(i), i as u64 * CS).unwrap();
            }
        }
        f.sync_all().ok();
        path.to_path_buf()
    }

    /// The chunk ids a repository with `repo`'s keys gives this image (ZERO for zero chunks).
    pub fn chunk_ids(&self, repo: &Repository) -> Vec<BlobId> {
        (0..self.chunks.len())
            .map(|i| chunk_id(repo, &self.chunk_bytes(i)))
            .collect()
    }

    /// Distinct non-zero chunk contents.
    pub fn distinct_data_chunks(&self) -> usize {
        let mut set = std::collections::HashSet::new();
        for i in 0..self.chunks.len() {
            let b = self.chunk_bytes(i);
            if b.iter().any(|&x| x != 0) {
                set.insert(blake3::hash(&b));
            }
        }
        set.len()
    }
}

fn random_chunk(rng: &mut Rng) -> Chunk {
    match rng.below(100) {
        0..=9 => Chunk::Hole,
        10..=14 => Chunk::Zeros,
        15..=59 => Chunk::Text(rng.next_u64()),
        _ => Chunk::Random(rng.next_u64()),
    }
}

/// The id of a disk chunk's content (ZERO for all-zero content), as the backup computes it.
pub fn chunk_id(repo: &Repository, data: &[u8]) -> BlobId {
    if data.iter().all(|&b| b == 0) {
        BlobId::ZERO
    } else {
        repo.keys().blob_id(BlobKind::Data, data)
    }
}

/// Chunk indexes whose content differs between two images of the same size (zero chunks, holes
/// or written zeros, count as equal).
pub fn differing_chunks(old: &Path, new: &Path) -> Vec<u64> {
    let a = fs::read(old).unwrap();
    let b = fs::read(new).unwrap();
    assert_eq!(a.len(), b.len(), "same size");
    a.chunks(CS as usize)
        .zip(b.chunks(CS as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

pub fn tuning(threads: usize) -> Tuning {
    Tuning {
        lease_timeout: Duration::from_secs(15 * 60),
        // No background refresh during a test: it would make write counts nondeterministic.
        lease_refresh: Duration::from_secs(3600),
        clock_skew: Duration::from_secs(5 * 60),
        threads,
    }
}

/// Create a repository in `root` (which must not exist or be empty) with 64 KiB chunks and 1 MiB
/// packs. InitOptions has no pack size, so the config is rewritten right after init, before any
/// data, through the public API (a valid config, MAC'd with the repository's own keys).
pub fn init_repo(root: &Path, encrypted: bool) {
    let store: Arc<dyn Store> = Arc::new(LocalStore::create(root).unwrap());
    let repo = Repository::init(
        store.clone(),
        InitOptions {
            chunk_size: CS as u32,
            passphrase: encrypted.then(|| PASS.to_vec().into()),
            kdf: kdf(),
        },
    )
    .unwrap();
    let mut config = repo.config().clone();
    vmkeep_core::config::RepoConfig::validate_pack_size(PACK_SIZE).unwrap();
    config.pack_size = PACK_SIZE;
    store
        .put(&Key::config(), &config.to_json(repo.keys()))
        .unwrap();
    store.flush().unwrap();
    let reopened = open_store(store, encrypted, 1);
    assert_eq!(reopened.config().pack_size, PACK_SIZE);
}

pub fn open_store(store: Arc<dyn Store>, encrypted: bool, threads: usize) -> Repository {
    let pass = encrypted.then_some(PASS);
    Repository::open(store, pass)
        .unwrap()
        .with_tuning(tuning(threads))
}

pub fn open_local(root: &Path, encrypted: bool, threads: usize) -> Repository {
    open_store(
        Arc::new(LocalStore::open(root).unwrap()),
        encrypted,
        threads,
    )
}

/// How the fault-injecting store is stacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// FaultStore(LocalStore)
    Fault,
    /// IgnoreConditionalStore(FaultStore(LocalStore))
    IgnoreConditional,
}

/// Open `root` through a FaultStore (optionally under an IgnoreConditionalStore).
pub fn open_faulty(
    root: &Path,
    encrypted: bool,
    stack: Stack,
    threads: usize,
) -> (Repository, Arc<FaultStore>) {
    let fault = Arc::new(FaultStore::new(Arc::new(LocalStore::open(root).unwrap())));
    let top: Arc<dyn Store> = match stack {
        Stack::Fault => fault.clone(),
        Stack::IgnoreConditional => Arc::new(IgnoreConditionalStore::new(fault.clone())),
    };
    (open_store(top, encrypted, threads), fault)
}

pub type Disks = Vec<(String, PathBuf)>;

pub fn disks(list: &[(&str, &Path)]) -> Disks {
    list.iter()
        .map(|(n, p)| (n.to_string(), p.to_path_buf()))
        .collect()
}

pub fn backup(repo: &Repository, vm: &str, disks: &Disks) -> vmkeep_repo::Result<Manifest> {
    backup_with(
        repo,
        BackupOptions {
            vm: vm.into(),
            ..Default::default()
        },
        disks,
    )
}

pub fn backup_with(
    repo: &Repository,
    opts: BackupOptions,
    disks: &Disks,
) -> vmkeep_repo::Result<Manifest> {
    repo.backup_image(
        &ImageBackupOptions {
            backup: opts,
            disks: disks.clone(),
            full: false,
        },
        &NoProgress,
    )
}

/// Restore `m` into a fresh folder and compare every disk with its reference image.
pub fn assert_restores(repo: &Repository, m: &Manifest, refs: &Disks) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out");
    repo.restore(
        m,
        &RestoreOptions {
            target: target.clone(),
            disk: None,
        },
        &NoProgress,
    )
    .unwrap_or_else(|e| panic!("restore of {} failed: {e}", m.id));
    assert_eq!(m.disks.len(), refs.len(), "disks of {}", m.id);
    for (name, reference) in refs {
        let got = fs::read(target.join(format!("{name}.raw"))).unwrap();
        let want = fs::read(reference).unwrap();
        assert!(
            got == want,
            "restore point {} disk {name} differs from {}",
            m.id,
            reference.display()
        );
    }
}

pub fn check(repo: &Repository) -> CheckReport {
    repo.check(&CheckOptions { read_data: true }, &NoProgress)
        .expect("check runs")
}

pub fn assert_check_ok(repo: &Repository, context: &str) -> CheckReport {
    let r = check(repo);
    assert!(r.ok, "{context}: check failed: {:#?}", r.damaged);
    r
}

/// Reference images of restore points.
#[derive(Clone, Debug, Default)]
pub struct Refs(pub BTreeMap<SnapshotId, Disks>);

impl Refs {
    pub fn add(&mut self, m: &Manifest, disks: &Disks) {
        self.0.insert(m.id, disks.clone());
    }

    /// Every restore point in the repository is known and restores to its reference images.
    /// Returns how many were verified.
    pub fn verify_all(&self, repo: &Repository, context: &str) -> usize {
        let all = repo.snapshots().unwrap();
        for m in &all {
            let refs = self
                .0
                .get(&m.id)
                .unwrap_or_else(|| panic!("{context}: unknown restore point {}", m.id));
            assert_restores(repo, m, refs);
        }
        all.len()
    }
}

/// Copy a folder tree (a repository) to `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// A process id that does not exist on this host.
fn dead_pid() -> u32 {
    (u32::MAX / 2..)
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap()
}

/// After an injected fault the test process lives on, but the operation it interrupted stands
/// for a process killed at that instant: rewrite the leases it left to name a dead process, as a
/// rerun on this host would find them.
pub fn simulate_death(repo: &Repository) -> usize {
    let pid = dead_pid();
    let leases = vmkeep_repo::lease::list(repo).unwrap();
    for (key, mut rec) in leases.iter().cloned() {
        rec.pid = pid;
        let body = serde_json::to_vec(&rec).unwrap();
        repo.store()
            .put(&key, &object::seal(repo.keys(), ObjectKind::Lock, &body))
            .unwrap();
    }
    leases.len()
}

pub fn count(repo: &Repository, kind: Kind) -> usize {
    repo.store().list(kind).unwrap().len()
}

pub fn pack_bytes(repo: &Repository) -> u64 {
    repo.store()
        .list(Kind::Pack)
        .unwrap()
        .iter()
        .map(|m| m.size)
        .sum()
}

/// Path of a pack file in a local repository.
pub fn pack_path(root: &Path, pack: &vmkeep_core::PackId) -> PathBuf {
    let hex = pack.to_hex();
    root.join("packs").join(&hex[..2]).join(hex)
}

pub fn snapshot_path(root: &Path, id: &SnapshotId) -> PathBuf {
    root.join("snapshots").join(id.to_hex())
}

/// Flip one byte of a file.
pub fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
}

/// Packs named by index objects that do not exist (an index entry pointing nowhere).
pub fn dangling_index_packs(repo: &Repository) -> Vec<String> {
    let packs: std::collections::HashSet<String> = repo
        .store()
        .list(Kind::Pack)
        .unwrap()
        .into_iter()
        .map(|m| m.key.name)
        .collect();
    let mut out = Vec::new();
    for meta in repo.store().list(Kind::Index).unwrap() {
        let bytes = repo.store().get(&meta.key).unwrap();
        let body = object::open(repo.keys(), ObjectKind::Index, &bytes).unwrap();
        let file = vmkeep_core::pack::IndexFile::decode(&body).unwrap();
        for (p, _) in file.packs {
            if !packs.contains(&p.to_hex()) {
                out.push(p.to_hex());
            }
        }
    }
    out
}
