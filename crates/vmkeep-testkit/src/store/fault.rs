//! Injected write failures, and a store that ignores conditional writes.
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmkeep_store::{
    Error, Key, ObjectKind, ObjectMeta, Result, Store, TemporariesRemoved, Temporary,
};

/// The `op` of the I/O error a [`FaultStore`] returns, so a test can tell it from a real one.
pub const INJECTED: &str = "injected fault at";

/// Whether `e` is a failure a [`FaultStore`] injected.
pub fn is_injected(e: &Error) -> bool {
    matches!(e, Error::Io { op, .. } if *op == INJECTED)
}

/// Counts mutating operations (put, put_if_absent, delete; 1-based) and fails from the
/// `fail_from`-th on: the first failing one and every later one, as if the process had died
/// there. A `fail_from` of 0 never fails. Reads always pass through. A failure is an I/O error
/// ([`is_injected`]), as a real store gives when a disk or network fails.
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

    /// Restarts the count; writes from the `n`-th on fail (0: none).
    pub fn fail_from(&self, n: u64) {
        self.writes.store(0, Ordering::SeqCst);
        self.fail_from.store(n, Ordering::SeqCst);
    }

    /// Mutating operations attempted since the last `fail_from`.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    fn gate(&self, key: &Key) -> Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let f = self.fail_from.load(Ordering::SeqCst);
        if f != 0 && n >= f {
            return Err(Error::Io {
                op: INJECTED,
                path: PathBuf::from(key.to_string()),
                cause: std::io::Error::other(format!("write #{n} fails (from #{f} on)")),
            });
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
        self.gate(key)?;
        self.inner.put(key, data)
    }
    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool> {
        self.gate(key)?;
        self.inner.put_if_absent(key, data)
    }
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectMeta>> {
        self.inner.list(kind)
    }
    fn delete(&self, key: &Key) -> Result<()> {
        self.gate(key)?;
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
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectMeta>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmkeep_store::LocalStore;

    fn key(name: &str) -> Key {
        Key::new(ObjectKind::Snapshot, name).unwrap()
    }

    #[test]
    fn writes_fail_from_the_chosen_one_on_and_reads_pass() {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalStore::create(dir.path().join("r")).unwrap());
        let s = FaultStore::new(local);
        s.fail_from(3);
        s.put(&key("a1"), b"1").unwrap();
        assert!(s.put_if_absent(&key("a2"), b"2").unwrap());
        let e = s.delete(&key("a1")).unwrap_err();
        assert!(is_injected(&e), "{e}");
        assert!(is_injected(&s.put(&key("a3"), b"3").unwrap_err()));
        assert_eq!(s.writes(), 4);
        assert_eq!(
            s.get(&key("a1"), 1 << 20).unwrap(),
            b"1",
            "the failed delete did nothing"
        );
        assert_eq!(s.list(ObjectKind::Snapshot).unwrap().len(), 2);
        s.fail_from(0);
        s.put(&key("a3"), b"3").unwrap();
        assert_eq!(s.writes(), 1);
    }

    #[test]
    fn ignoring_conditional_writes_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalStore::create(dir.path().join("r")).unwrap());
        let s = IgnoreConditionalStore::new(local.clone());
        assert!(local.put_if_absent(&key("b"), b"old").unwrap());
        assert!(!local.put_if_absent(&key("b"), b"new").unwrap());
        assert!(s.put_if_absent(&key("b"), b"new").unwrap());
        assert_eq!(local.get(&key("b"), 1 << 20).unwrap(), b"new");
    }
}
