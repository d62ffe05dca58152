//! Shared helpers of the repository-level integration tests: repositories in temporary folders
//! (with small packs), restore-and-compare, crash simulation. Test images and data come from the
//! shared test kit (crates/vmkeep-testkit).
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmkeep_core::keys::{BlobKind, KdfParams};
use vmkeep_core::{object, ObjectKind};
use vmkeep_core::{BlobId, SnapshotId};
use vmkeep_repo::{
    BackupOptions, CheckOptions, CheckReport, ImageBackupOptions, InitOptions, Manifest,
    NoProgress, Repository, RestoreOptions, Tuning,
};
use vmkeep_store::{Key, LocalStore, Store};
pub use vmkeep_testkit::data::Rng;
pub use vmkeep_testkit::image::{differing_chunks, Chunk, Spec};
pub use vmkeep_testkit::store::{is_injected, FaultStore, IgnoreConditionalStore, SlowStore};

pub const CS: u64 = vmkeep_testkit::image::CHUNK;
pub const PACK_SIZE: u32 = 1 << 20;
pub const PASS: &[u8] = b"correct horse battery staple";

pub fn kdf() -> KdfParams {
    KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
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

pub fn tuning(threads: usize) -> Tuning {
    Tuning {
        lease_timeout: Duration::from_secs(15 * 60),
        // No background refresh during a test: it would make write counts nondeterministic.
        lease_refresh: Duration::from_secs(3600),
        clock_skew: Duration::from_secs(5 * 60),
        threads,
        list_packs_up_to: 10_000,
        // Small, so every check and prune here sorts its referenced ids into several files
        // and merges them, as one of a large repository does.
        spill_ids: 1000,
    }
}

/// The local cache a test repository at `location` uses, as the command-line tool would:
/// `<location>.cache` beside it, removed with the test's folder. `VMKEEP_TEST_NO_CACHE=1` runs
/// the suite without one (every index object read into memory, as `--no-cache` does).
pub fn cache_for(location: &str) -> Option<vmkeep_repo::CacheOptions> {
    if std::env::var_os("VMKEEP_TEST_NO_CACHE").is_some_and(|v| v == "1") {
        return None;
    }
    let p = Path::new(location);
    p.is_absolute()
        .then(|| vmkeep_repo::CacheOptions::new(PathBuf::from(format!("{location}.cache"))))
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
    let cache = cache_for(&store.location());
    Repository::open(store, pass)
        .unwrap()
        .with_tuning(tuning(threads))
        .with_cache(cache.as_ref())
        .unwrap()
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

/// Open `root` through a SlowStore that delays every call by `delay` (until changed with
/// `SlowStore::set_delay`).
pub fn open_slow(
    root: &Path,
    encrypted: bool,
    delay: Duration,
    threads: usize,
) -> (Repository, Arc<SlowStore>) {
    let slow = Arc::new(SlowStore::new(
        Arc::new(LocalStore::open(root).unwrap()),
        delay,
    ));
    (open_store(slow.clone(), encrypted, threads), slow)
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
    for l in &leases {
        let mut rec = l.record.clone().expect("readable lease");
        rec.pid = pid;
        rec.pid_start = None;
        let body = serde_json::to_vec(&rec).unwrap();
        let key = Key::new(ObjectKind::Lock, l.id.to_hex()).unwrap();
        repo.store()
            .put(&key, &object::seal(repo.keys(), ObjectKind::Lock, &body))
            .unwrap();
    }
    leases.len()
}

pub fn count(repo: &Repository, kind: ObjectKind) -> usize {
    repo.store().list(kind).unwrap().len()
}

pub fn pack_bytes(repo: &Repository) -> u64 {
    repo.store()
        .list(ObjectKind::Pack)
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
        .list(ObjectKind::Pack)
        .unwrap()
        .into_iter()
        .map(|m| m.key.name)
        .collect();
    let mut out = Vec::new();
    for meta in repo.store().list(ObjectKind::Index).unwrap() {
        let bytes = repo.store().get(&meta.key, u64::MAX).unwrap();
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
