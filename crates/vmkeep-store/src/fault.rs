//! Test wrappers: a store that fails chosen writes (to simulate a crash or an I/O error at every
//! possible instant), and a store that ignores conditional writes (as Garage and s3rver do).
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::key::{Key, Kind};
use crate::{ObjectMeta, Store, TemporariesRemoved, Temporary};

/// Counts mutating operations (put, put_if_absent, delete; 1-based) and fails from the
/// `fail_from`-th on: the first failing one and every later one, as if the process had died
/// there. A `fail_from` of 0 never fails. Reads always pass through.
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn Store>,
    writes: AtomicU64,
    fail_from: AtomicU64,
}

impl FaultStore {
    pub fn new(inner: Arc<dyn Store>) -> FaultStore {
        FaultStore {
            inner,
            writes: AtomicU64::new(0),
            fail_from: AtomicU64::new(0),
        }
    }

    pub fn fail_from(&self, n: u64) {
        self.writes.store(0, Ordering::SeqCst);
        self.fail_from.store(n, Ordering::SeqCst);
    }

    /// Mutating operations attempted since the last `fail_from`.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    fn gate(&self) -> Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let f = self.fail_from.load(Ordering::SeqCst);
        if f != 0 && n >= f {
            return Err(Error::Injected { n });
        }
        Ok(())
    }
}

impl Store for FaultStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn get(&self, key: &Key, max_len: u64) -> Result<Vec<u8>> {
        self.inner.get(key, max_len)
    }
    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn size(&self, key: &Key) -> Result<u64> {
        self.inner.size(key)
    }
    fn put(&self, key: &Key, data: &[u8]) -> Result<()> {
        self.gate()?;
        self.inner.put(key, data)
    }
    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool> {
        self.gate()?;
        self.inner.put_if_absent(key, data)
    }
    fn list(&self, kind: Kind) -> Result<Vec<ObjectMeta>> {
        self.inner.list(kind)
    }
    fn delete(&self, key: &Key) -> Result<()> {
        self.gate()?;
        self.inner.delete(key)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    // Temporaries are outside the repository protocol (no object depends on them), so they
    // are forwarded, never counted or failed.
    fn list_temporaries(&self) -> Result<Vec<Temporary>> {
        self.inner.list_temporaries()
    }
    fn remove_temporaries(&self, older_than: Duration) -> Result<TemporariesRemoved> {
        self.inner.remove_temporaries(older_than)
    }
}

/// A store whose conditional create silently overwrites and always reports success.
#[derive(Debug)]
pub struct IgnoreConditionalStore {
    inner: Arc<dyn Store>,
}

impl IgnoreConditionalStore {
    pub fn new(inner: Arc<dyn Store>) -> IgnoreConditionalStore {
        IgnoreConditionalStore { inner }
    }
}

impl Store for IgnoreConditionalStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn get(&self, key: &Key, max_len: u64) -> Result<Vec<u8>> {
        self.inner.get(key, max_len)
    }
    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn size(&self, key: &Key) -> Result<u64> {
        self.inner.size(key)
    }
    fn put(&self, key: &Key, data: &[u8]) -> Result<()> {
        self.inner.put(key, data)
    }
    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool> {
        self.inner.put(key, data)?;
        Ok(true)
    }
    fn list(&self, kind: Kind) -> Result<Vec<ObjectMeta>> {
        self.inner.list(kind)
    }
    fn delete(&self, key: &Key) -> Result<()> {
        self.inner.delete(key)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    // Temporaries are outside the repository protocol (no object depends on them), so they
    // are forwarded, never counted or failed.
    fn list_temporaries(&self) -> Result<Vec<Temporary>> {
        self.inner.list_temporaries()
    }
    fn remove_temporaries(&self, older_than: Duration) -> Result<TemporariesRemoved> {
        self.inner.remove_temporaries(older_than)
    }
}
