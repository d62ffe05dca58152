//! What the server keeps: the served repositories (one `LocalStore` per name, opened once), their
//! pack-list caches, the packs each token uploaded, and the owners of leases (persisted in
//! `DIR/.vmkeep-serve/owners/<repo>/<lock name>`, content: the token id).
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use vmkeep_core::config::RepoConfig;
use vmkeep_store::{Key, LocalStore, Store};

use crate::packlists::PackLists;
use crate::tokens::TokenStore;

/// Name of the server's own folder in DIR (never a repository: names cannot start with '.').
pub(crate) const STATE_DIR: &str = ".vmkeep-serve";

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A repository name: 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'.
pub(crate) fn valid_repo_name(name: &str) -> bool {
    vmkeep_core::manifest::validate_name("repository name", name).is_ok()
}

#[derive(Debug)]
pub(crate) struct App {
    pub dir: PathBuf,
    pub tokens: TokenStore,
    /// Requests answered, for `/metrics`.
    pub requests: crate::metrics::Requests,
    repos: Mutex<HashMap<String, Arc<Repo>>>,
}

#[derive(Debug)]
pub(crate) struct Repo {
    pub store: LocalStore,
    /// Whether the config says encrypted; cached once read (a config is never replaced).
    encrypted: OnceLock<bool>,
    pub pack_lists: Mutex<PackLists>,
    /// Token id -> packs it uploaded since the server started.
    uploaded: Mutex<HashMap<String, HashSet<String>>>,
    /// Serialises the check-then-write decisions on refs, snapshots and locks.
    pub writes: Mutex<()>,
    owners: PathBuf,
}

impl App {
    pub(crate) fn new(dir: PathBuf, tokens: TokenStore) -> App {
        App {
            dir,
            tokens,
            requests: Default::default(),
            repos: Mutex::new(HashMap::new()),
        }
    }

    fn make(&self, name: &str, store: LocalStore) -> Arc<Repo> {
        Arc::new(Repo {
            store,
            encrypted: OnceLock::new(),
            pack_lists: Mutex::new(PackLists::default()),
            uploaded: Mutex::new(HashMap::new()),
            writes: Mutex::new(()),
            owners: self.dir.join(STATE_DIR).join("owners").join(name),
        })
    }

    /// The repository `name` (already validated), None when its folder does not exist.
    pub(crate) fn repo(&self, name: &str) -> Option<Arc<Repo>> {
        let path = self.dir.join(name);
        let is_dir = fs::metadata(&path).is_ok_and(|m| m.is_dir());
        let mut repos = lock(&self.repos);
        if !is_dir {
            repos.remove(name);
            return None;
        }
        if let Some(r) = repos.get(name) {
            return Some(r.clone());
        }
        let store = LocalStore::open(&path).ok()?;
        let r = self.make(name, store);
        repos.insert(name.to_string(), r.clone());
        Some(r)
    }

    /// The repository `name`, created (an empty store) when its folder does not exist.
    pub(crate) fn create_repo(&self, name: &str) -> vmkeep_store::Result<Arc<Repo>> {
        if let Some(r) = self.repo(name) {
            return Ok(r);
        }
        let mut repos = lock(&self.repos);
        if let Some(r) = repos.get(name) {
            return Ok(r.clone());
        }
        let store = LocalStore::create(self.dir.join(name))?;
        tracing::info!("created repository {name}");
        let r = self.make(name, store);
        repos.insert(name.to_string(), r.clone());
        Ok(r)
    }
}

impl Repo {
    /// Whether the repository is encrypted, from its config. None when the config is missing
    /// or does not parse (the caller refuses what it cannot verify then).
    pub(crate) fn encrypted(&self) -> vmkeep_store::Result<Option<bool>> {
        if let Some(e) = self.encrypted.get() {
            return Ok(Some(*e));
        }
        let bytes = match self
            .store
            .get(&Key::config(), vmkeep_store::ObjectKind::Config.max_size())
        {
            Ok(b) => b,
            Err(e) if e.is_not_found() || e.is_too_large() => return Ok(None),
            Err(e) => return Err(e),
        };
        match RepoConfig::parse(&bytes) {
            Ok(c) => Ok(Some(*self.encrypted.get_or_init(|| c.encrypted))),
            Err(_) => Ok(None),
        }
    }

    pub(crate) fn mark_uploaded(&self, token: &str, pack: &str) {
        lock(&self.uploaded)
            .entry(token.to_string())
            .or_default()
            .insert(pack.to_string());
    }

    pub(crate) fn uploaded(&self, token: &str, pack: &str) -> bool {
        lock(&self.uploaded)
            .get(token)
            .is_some_and(|s| s.contains(pack))
    }

    fn owner_path(&self, lock_name: &str) -> PathBuf {
        self.owners.join(lock_name)
    }

    /// The token id that created lease `lock_name` through the server, if any.
    pub(crate) fn owner(&self, lock_name: &str) -> std::io::Result<Option<String>> {
        match fs::read(self.owner_path(lock_name)) {
            Ok(b) if b.len() <= 64 => Ok(Some(String::from_utf8_lossy(&b).trim().to_string())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn set_owner(&self, lock_name: &str, token: &str) -> std::io::Result<()> {
        fs::create_dir_all(&self.owners)?;
        write_atomic(&self.owner_path(lock_name), token.as_bytes())
    }

    pub(crate) fn remove_owner(&self, lock_name: &str) -> std::io::Result<()> {
        match fs::remove_file(self.owner_path(lock_name)) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut r = [0u8; 8];
    getrandom::getrandom(&mut r).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = path.with_file_name(format!(".tmp-{}", hex::encode(r)));
    let res = fs::write(&tmp, bytes)
        .and_then(|()| fs::File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}
