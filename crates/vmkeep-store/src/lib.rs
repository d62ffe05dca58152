//! vmkeep-store: a small object-store interface (get, put, list, delete by typed key) and its
//! backends (a local folder, `vmkeep serve` over HTTPS, S3-compatible object storage). It
//! knows nothing about chunks or encryption; the repository protocol on top of it
//! (docs/FORMAT.md) relies only on what S3-compatible stores give: whole-object atomic puts,
//! strongly consistent list-after-write, and nothing else. In particular it does not rely on
//! directory renames, access times, POSIX locks, or on conditional writes being honoured.

mod error;
mod http;
mod key;
mod local;
pub mod s3;

pub use error::{Error, Result};
pub use http::{HttpOptions, HttpStore};
pub use key::Key;
pub use local::{LocalStore, TEMP_PREFIX};
pub use s3::{S3Options, S3Store};
/// The kinds of objects, defined with their framing in vmkeep-core.
pub use vmkeep_core::ObjectKind;

use std::time::{Duration, SystemTime};

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: Key,
    pub size: u64,
    pub modified: SystemTime,
    /// A token that differs whenever the object was replaced (S3's ETag; locally the file's
    /// inode, time and size), or None when the store cannot tell. Caches of objects that are
    /// rewritten in place (manifests) trust it; times alone are too coarse (S3: one second).
    pub version: Option<String>,
}

/// Longest version token believed from a remote store (an S3 ETag is 34 characters).
pub const MAX_VERSION_LEN: usize = 128;

/// A temporary object: one being written, or left by a writer killed before it published it
/// (the local store's `.tmp-*` files). Never listed as an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Temporary {
    /// Where it is, for messages (local: its path).
    pub location: String,
    pub size: u64,
    /// Its last write.
    pub modified: SystemTime,
}

/// What the credentials a store was opened with may do, where the store restricts it (a
/// `vmkeep serve` token): the VM globs it covers and its rights.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct TokenScope {
    pub vms: Vec<String>,
    pub rights: Vec<String>,
}

impl TokenScope {
    /// Whether these credentials may add restore points (`append` or `admin`).
    pub fn may_write(&self) -> bool {
        self.rights.iter().any(|r| r == "append" || r == "admin")
    }
}

/// What [`Store::remove_temporaries`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TemporariesRemoved {
    pub count: u64,
    pub bytes: u64,
}

/// The object-store interface. Implementations are Send + Sync and used from many threads.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Where this store is, for messages ("/srv/repo", "s3://bucket/prefix").
    fn location(&self) -> String;

    /// Whole object of at most `max_len` bytes. Bound first, then read: a larger object gives
    /// `Error::TooLarge` before anything is allocated or read (callers pass the bound of the
    /// object's kind), so a huge object planted in the store cannot exhaust memory.
    /// `Error::NotFound` when absent.
    fn get(&self, key: &Key, max_len: u64) -> Result<Vec<u8>>;

    /// `len` bytes at `offset`; `Error::Corrupt`-free: a short object gives `Error::ShortRead`.
    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>>;

    /// Size of an object, `Error::NotFound` when absent.
    fn size(&self, key: &Key) -> Result<u64>;

    /// Create or replace atomically: readers see the old object or the whole new one.
    fn put(&self, key: &Key, data: &[u8]) -> Result<()>;

    /// The scope of this store's credentials, where the store restricts them (None: anything
    /// the store allows at all). Asked before work that would fail half-way on a refusal.
    fn token_scope(&self) -> Result<Option<TokenScope>> {
        Ok(None)
    }

    /// [`put`](Store::put), handing the bytes over: a store that passes them to a network
    /// client keeps them without a copy (packs in flight would otherwise be held twice).
    fn put_owned(&self, key: &Key, data: Vec<u8>) -> Result<()> {
        self.put(key, &data)
    }

    /// Create only if absent; Ok(false) when it already existed. Stores that ignore conditional
    /// writes may return Ok(true) and overwrite: the protocol never depends on the answer for
    /// correctness, only for friendlier errors.
    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool>;

    /// All objects of a kind. Objects being written (temporary files) are never listed.
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectMeta>>;

    /// Remove; absent objects are not an error.
    fn delete(&self, key: &Key) -> Result<()>;

    /// Durability barrier: every put that returned before this call is durable when it returns
    /// (local: syncfs). The repository calls it before each commit point.
    fn flush(&self) -> Result<()>;

    /// How many requests this store serves well at once. 1 (a local folder: the disk is the
    /// bound) keeps writes inline and in order; stores with per-request latency say more, and
    /// the packer keeps that many uploads in flight and restores read that many ranges at once.
    fn concurrency(&self) -> usize {
        1
    }

    /// Whether writers must keep a pack list (`refs/<snapshot id>`, docs/PROTOCOL.md §5) beside
    /// each manifest: true for a store behind `vmkeep serve`, which scopes tokens with them.
    fn needs_pack_lists(&self) -> bool {
        false
    }

    /// Temporary objects present (see [`Temporary`]). Stores that write without temporaries
    /// (an S3 put is atomic by itself) have none: the default.
    fn list_temporaries(&self) -> Result<Vec<Temporary>> {
        Ok(Vec::new())
    }

    /// Remove the temporaries last written more than `older_than` ago. A writer whose temporary
    /// is removed fails its put (the publishing rename or link finds nothing): it never
    /// publishes a partial object. The caller chooses an age no live writer reaches.
    fn remove_temporaries(&self, older_than: Duration) -> Result<TemporariesRemoved> {
        let _ = older_than;
        Ok(TemporariesRemoved::default())
    }
}
