//! Opening and creating repositories, and managing their keys.
use std::sync::Arc;
use std::time::Duration;

use vmkeep_core::config::RepoConfig;
use vmkeep_core::keys::{KdfParams, KeyFile, Keys, MasterKey};
use vmkeep_core::ObjectKind;
use vmkeep_store::{Key, Store};

use crate::error::{Error, Result};

/// Timing knobs of the concurrency protocol (docs/FORMAT.md "Concurrency and GC").
#[derive(Clone, Debug)]
pub struct Tuning {
    /// A lease not refreshed for this long belongs to a dead process.
    pub lease_timeout: Duration,
    /// How often a running operation refreshes its lease.
    pub lease_refresh: Duration,
    /// Allowed clock difference between hosts sharing a repository.
    pub clock_skew: Duration,
    /// Worker threads of the data path (hash, compress, encrypt / decrypt, verify).
    pub threads: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            lease_timeout: Duration::from_secs(15 * 60),
            lease_refresh: Duration::from_secs(60),
            clock_skew: Duration::from_secs(5 * 60),
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }
}

pub struct InitOptions {
    pub chunk_size: u32,
    /// Some(passphrase) creates an encrypted repository.
    pub passphrase: Option<Vec<u8>>,
    pub kdf: KdfParams,
}

impl std::fmt::Debug for InitOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitOptions")
            .field("chunk_size", &self.chunk_size)
            .field("encrypted", &self.passphrase.is_some())
            .finish()
    }
}

/// An open repository. Cheap to share across threads (`&Repository` is Sync).
pub struct Repository {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: RepoConfig,
    pub(crate) keys: Keys,
    pub(crate) tuning: Tuning,
    /// Name of the key file that unlocked this repository (None when plain).
    key_name: Option<String>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.store.location())
            .field("id", &self.config.id)
            .field("encrypted", &self.config.encrypted)
            .finish()
    }
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn random_name() -> String {
    hex::encode(vmkeep_core::SnapshotId::random().0)
}

impl Repository {
    /// Create a repository in an empty store. Writes the key file first and the config last, so
    /// a crash leaves either no repository or a complete one.
    pub fn init(store: Arc<dyn Store>, opts: InitOptions) -> Result<Repository> {
        RepoConfig::validate_chunk_size(opts.chunk_size)?;
        match store.get(&Key::config(), ObjectKind::Config.max_size()) {
            Ok(_) => {
                return Err(Error::AlreadyExists {
                    location: store.location(),
                })
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let config = RepoConfig::new(opts.chunk_size, opts.passphrase.is_some())?;
        let (keys, key_name) = match &opts.passphrase {
            None => (Keys::plain(), None),
            Some(pass) => {
                let master = MasterKey::generate();
                let kf = KeyFile::wrap(&master, pass, opts.kdf, &hostname())?;
                let name = random_name();
                store.put(&Key::new(ObjectKind::Key, name.clone())?, &kf.to_json())?;
                (Keys::encrypted(master), Some(name))
            }
        };
        store.flush()?;
        if !store.put_if_absent(&Key::config(), &config.to_json(&keys))? {
            return Err(Error::AlreadyExists {
                location: store.location(),
            });
        }
        store.flush()?;
        Ok(Repository {
            store,
            config,
            keys,
            tuning: Tuning::default(),
            key_name,
        })
    }

    /// Open a repository; `passphrase` is needed when it is encrypted.
    pub fn open(store: Arc<dyn Store>, passphrase: Option<&[u8]>) -> Result<Repository> {
        let location = store.location();
        let bytes = match store.get(&Key::config(), ObjectKind::Config.max_size()) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(Error::NotARepository { location }),
            Err(e) => return Err(e.into()),
        };
        let config = RepoConfig::parse(&bytes).map_err(|e| Error::ForeignRepository {
            location: location.clone(),
            reason: e.to_string(),
        })?;
        let (keys, key_name) = if config.encrypted {
            let pass = passphrase.ok_or(Error::PassphraseRequired)?;
            let (master, name) =
                unlock(store.as_ref(), pass)?.ok_or_else(|| Error::WrongPassphrase {
                    location: location.clone(),
                })?;
            (Keys::encrypted(master), Some(name))
        } else {
            (Keys::plain(), None)
        };
        config
            .verify(&keys)
            .map_err(|e| Error::corrupt("config", e))?;
        Ok(Repository {
            store,
            config,
            keys,
            tuning: Tuning::default(),
            key_name,
        })
    }

    pub fn with_tuning(mut self, tuning: Tuning) -> Repository {
        self.tuning = tuning;
        self
    }

    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn location(&self) -> String {
        self.store.location()
    }

    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    /// Re-wrap the master key under a new passphrase: the new key file is written before the old
    /// one is deleted, so a crash leaves both (each unlocking the repository), never neither.
    pub fn change_passphrase(&self, new_passphrase: &[u8], kdf: KdfParams) -> Result<()> {
        let (Some(master), Some(old)) = (self.keys.master(), &self.key_name) else {
            return Err(Error::Invalid {
                what: "operation",
                reason: "the repository is not encrypted; it has no passphrase".into(),
            });
        };
        let kf = KeyFile::wrap(master, new_passphrase, kdf, &hostname())?;
        self.store
            .put(&Key::new(ObjectKind::Key, random_name())?, &kf.to_json())?;
        self.store.flush()?;
        self.store
            .delete(&Key::new(ObjectKind::Key, old.clone())?)?;
        self.store.flush()?;
        Ok(())
    }

    /// The master key as a paper copy, or None for a plain repository.
    pub fn export_key(&self) -> Option<String> {
        self.keys.master().map(|m| m.export())
    }
}

/// Try every key file with the passphrase. Damaged key files are skipped (others may work).
fn unlock(store: &dyn Store, pass: &[u8]) -> Result<Option<(MasterKey, String)>> {
    for meta in store.list(ObjectKind::Key)? {
        let bytes = match store.get(&meta.key, ObjectKind::Key.max_size()) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue,
            Err(e) if e.is_too_large() => {
                tracing::warn!(key = %meta.key, error = %e, "skipping an unreadable key file");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let Ok(kf) = KeyFile::from_json(&bytes) else {
            tracing::warn!(key = %meta.key, "skipping an unreadable key file");
            continue;
        };
        match kf.unwrap_key(pass) {
            Ok(master) => return Ok(Some((master, meta.key.name.clone()))),
            Err(vmkeep_core::Error::WrongPassphrase) => continue,
            Err(e) => return Err(Error::corrupt(meta.key.to_string(), e)),
        }
    }
    Ok(None)
}
