//! vmkeep-store: a small object-store interface (get, put, list, delete by typed key) and its
//! backends. It knows nothing about chunks or encryption; the repository protocol on top of it
//! (docs/FORMAT.md) relies only on what S3-compatible stores give: whole-object atomic puts,
//! strongly consistent list-after-write, and nothing else. In particular it does not rely on
//! directory renames, access times, POSIX locks, or on conditional writes being honoured.

mod error;
mod key;
mod local;

pub use error::{Error, Result};
pub use key::{Key, Kind};
pub use local::LocalStore;

use std::time::SystemTime;

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: Key,
    pub size: u64,
    pub modified: SystemTime,
}

/// The object-store interface. Implementations are Send + Sync and used from many threads.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Where this store is, for messages ("/srv/repo", "s3://bucket/prefix").
    fn location(&self) -> String;

    /// Whole object. `Error::NotFound` when absent.
    fn get(&self, key: &Key) -> Result<Vec<u8>>;

    /// `len` bytes at `offset`; `Error::Corrupt`-free: a short object gives `Error::ShortRead`.
    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>>;

    /// Size of an object, `Error::NotFound` when absent.
    fn size(&self, key: &Key) -> Result<u64>;

    /// Create or replace atomically: readers see the old object or the whole new one.
    fn put(&self, key: &Key, data: &[u8]) -> Result<()>;

    /// Create only if absent; Ok(false) when it already existed. Stores that ignore conditional
    /// writes may return Ok(true) and overwrite: the protocol never depends on the answer for
    /// correctness, only for friendlier errors.
    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool>;

    /// All objects of a kind. Objects being written (temporary files) are never listed.
    fn list(&self, kind: Kind) -> Result<Vec<ObjectMeta>>;

    /// Remove; absent objects are not an error.
    fn delete(&self, key: &Key) -> Result<()>;

    /// Durability barrier: every put that returned before this call is durable when it returns
    /// (local: syncfs). The repository calls it before each commit point.
    fn flush(&self) -> Result<()>;
}
