//! Opening and creating repositories, and managing their keys.
use std::sync::Arc;
use std::time::Duration;

use vmkeep_core::config::RepoConfig;
use vmkeep_core::keys::{KdfParams, KeyFile, Keys, MasterKey};
use vmkeep_core::object;
use vmkeep_core::ObjectKind;
use vmkeep_store::{Key, Store};
use zeroize::Zeroizing;

use crate::cache::{Cache, CacheOptions};
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
    /// With a cache, a repository of at most this many packs has them listed by a backup;
    /// a larger one has them asked about one by one when a lookup needs to know.
    pub list_packs_up_to: usize,
    /// Referenced ids `check` and `prune` hold in memory before they sort them into a file
    /// (32 bytes each; `spill.rs`).
    pub spill_ids: usize,
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
            list_packs_up_to: 10_000,
            spill_ids: crate::spill::BUFFER_IDS,
        }
    }
}

pub struct InitOptions {
    pub chunk_size: u32,
    /// Some(passphrase) creates an encrypted repository. Wiped when the options are dropped.
    pub passphrase: Option<Zeroizing<Vec<u8>>>,
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
    /// The local cache (FORMAT.md §17), when one is used.
    pub(crate) cache: Option<Cache>,
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

fn random_name() -> String {
    hex::encode(vmkeep_core::SnapshotId::random().0)
}

impl Repository {
    /// Threads that read blobs at once (restore, check): one per core, or as many requests as
    /// the store serves well at once when that is more (a store with latency).
    pub(crate) fn reader_threads(&self) -> usize {
        self.tuning.threads.max(self.store.concurrency()).max(1)
    }

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
                let kf = KeyFile::wrap(&master, pass, opts.kdf)?;
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
            cache: None,
            key_name,
        })
    }

    /// A new repository at `store` that replicates `source` (`init --replica-of`): the same
    /// chunk and pack sizes and the same key material (the source's key files copied as they
    /// are, so the same passphrases open it and blobs copy between the two without
    /// re-encryption), its own id.
    pub fn init_replica(store: Arc<dyn Store>, source: &Repository) -> Result<Repository> {
        match store.get(&Key::config(), ObjectKind::Config.max_size()) {
            Ok(_) => {
                return Err(Error::AlreadyExists {
                    location: store.location(),
                })
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let mut config = RepoConfig::new(source.config.chunk_size, source.config.encrypted)?;
        config.pack_size = source.config.pack_size;
        for meta in source.store.list(ObjectKind::Key)? {
            let bytes = source.store.get(&meta.key, ObjectKind::Key.max_size())?;
            store.put(&meta.key, &bytes)?;
        }
        store.flush()?;
        if !store.put_if_absent(&Key::config(), &config.to_json(&source.keys))? {
            return Err(Error::AlreadyExists {
                location: store.location(),
            });
        }
        store.flush()?;
        Ok(Repository {
            store,
            config,
            keys: source.keys.clone(),
            tuning: Tuning::default(),
            cache: None,
            key_name: source.key_name.clone(),
        })
    }

    /// Open a repository; `passphrase` is needed when it is encrypted. A config that says
    /// "not encrypted" is refused when the repository shows otherwise, or when a passphrase is
    /// given ([`refuse_plain_if_encrypted`]): editing `config` must not switch encryption off.
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
        if !config.encrypted {
            refuse_plain_if_encrypted(store.as_ref(), &location, passphrase.is_some())?;
        }
        let (keys, key_name) = if config.encrypted {
            let pass = passphrase.ok_or(Error::PassphraseRequired)?;
            let (master, name) = unlock(store.as_ref(), pass)?;
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
            cache: None,
            key_name,
        })
    }

    pub fn with_tuning(mut self, tuning: Tuning) -> Repository {
        self.tuning = tuning;
        self
    }

    /// Use a local cache in `opts.dir` (a folder per repository inside it), or none.
    pub fn with_cache(mut self, opts: Option<&CacheOptions>) -> Result<Repository> {
        self.cache = match opts {
            Some(o) => Some(Cache::open(o, &self.config.id)?),
            None => None,
        };
        Ok(self)
    }

    /// A new set of referenced ids for check or prune (`spill.rs`), in the cache folder, or
    /// without one in the temporary folder (`TMPDIR`).
    pub(crate) fn new_spill(&self) -> Result<crate::spill::IdSpill> {
        crate::spill::IdSpill::with_buffer(&self.spill_parent(), self.tuning.spill_ids)
    }

    pub(crate) fn spill_parent(&self) -> std::path::PathBuf {
        match &self.cache {
            Some(c) => c.dir.clone(),
            None => std::env::temp_dir(),
        }
    }

    /// The local cache folder of this repository, if one is used.
    pub fn cache_dir(&self) -> Option<&std::path::Path> {
        self.cache.as_ref().map(|c| c.dir.as_path())
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

    /// Whether the repository answers at all (its config can be looked at): tells an outage
    /// (a share not mounted, a server down past its retries) from an error about one object.
    pub fn answers(&self) -> std::result::Result<(), vmkeep_store::Error> {
        self.store.size(&vmkeep_store::Key::config()).map(|_| ())
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
        let kf = KeyFile::wrap(master, new_passphrase, kdf)?;
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

/// A plain config is believed only when nothing says the repository is encrypted (FORMAT.md §3,
/// "Opening"): no key file exists, the caller has no passphrase (a user who configured one
/// expects encryption), and neither the first listed manifest nor the first listed index object
/// carries the encrypted flag in its header (8 bytes read from each). Someone who can write to
/// the store can forge those flags, but not the user's passphrase, which is what guards an
/// unattended backup against writing plaintext into a repository meant to be encrypted.
fn refuse_plain_if_encrypted(
    store: &dyn Store,
    location: &str,
    has_passphrase: bool,
) -> Result<()> {
    let tampered = |evidence: String| Error::PlainConfigTampered {
        location: location.to_string(),
        evidence,
    };
    if let Some(key) = store.list(ObjectKind::Key)?.into_iter().next() {
        return Err(tampered(format!("it has a key file ({})", key.key)));
    }
    for kind in [ObjectKind::Snapshot, ObjectKind::Index] {
        let Some(first) = store.list(kind)?.into_iter().next() else {
            continue;
        };
        let header = match store.get_range(&first.key, 0, object::HEADER_LEN as u64) {
            Ok(h) => h,
            // Gone or too short: not evidence either way (check reports damage).
            Err(e) if e.is_not_found() => continue,
            Err(vmkeep_store::Error::ShortRead { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if object::header_flags_encrypted(&header) == Some(true) {
            return Err(tampered(format!(
                "its objects are encrypted ({} is)",
                first.key
            )));
        }
    }
    if has_passphrase {
        return Err(Error::PassphraseForPlain {
            location: location.to_string(),
        });
    }
    Ok(())
}

/// Try every key file with the passphrase. A damaged key file (unparseable, failing its
/// checksum, from a newer vmkeep) does not stop the search, since another may unlock, but when
/// none does it is named: it may have been the one for this passphrase, and "wrong passphrase"
/// would send the user looking for the wrong thing.
fn unlock(store: &dyn Store, pass: &[u8]) -> Result<(MasterKey, String)> {
    let location = store.location();
    let mut damaged: Vec<String> = Vec::new();
    let mut found_any = false;
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
        found_any = true;
        match KeyFile::from_json(&bytes).and_then(|kf| kf.unwrap_key(pass)) {
            Ok(master) => {
                for d in &damaged {
                    tracing::warn!("{d}: it was skipped (the repository opened with another)");
                }
                return Ok((master, meta.key.name.clone()));
            }
            Err(vmkeep_core::Error::WrongPassphrase) => continue,
            // Reported in the error if nothing unlocks, as a warning otherwise.
            Err(e) => damaged.push(format!("key file {} is damaged ({e})", meta.key)),
        }
    }
    if !damaged.is_empty() {
        return Err(Error::KeyFileDamaged {
            location,
            damaged: damaged.join("; "),
        });
    }
    if !found_any {
        return Err(Error::NoKeyFile { location });
    }
    Err(Error::WrongPassphrase { location })
}
