//! A slow store: every call (or the chosen ones) waits, as on a distant object store or a
//! repository large enough that listing and marking take minutes. Widens race windows.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmkeep_store::{Key, ObjectKind, ObjectMeta, Result, Store};

use super::{kind_of, Op};

/// Delays calls by a configurable [`Duration`] (changeable while in use, so a test can slow
/// down one phase only), optionally only for chosen operations and kinds. By default the
/// delay comes before the call is passed on; with [`SlowStore::answer_late`] it comes after,
/// so the answer describes the store as it was a delay ago.
#[derive(Debug)]
pub struct SlowStore {
    inner: Arc<dyn Store>,
    delay: Mutex<Duration>,
    ops: Option<BTreeSet<Op>>,
    kinds: Option<BTreeSet<ObjectKind>>,
    late: bool,
    delayed: AtomicU64,
}

impl SlowStore {
    /// Every call waits `delay`.
    pub fn new(inner: Arc<dyn Store>, delay: Duration) -> SlowStore {
        SlowStore {
            inner,
            delay: Mutex::new(delay),
            ops: None,
            kinds: None,
            late: false,
            delayed: AtomicU64::new(0),
        }
    }

    /// Only these operations wait.
    pub fn only_ops(mut self, ops: &[Op]) -> SlowStore {
        self.ops = Some(ops.iter().copied().collect());
        self
    }

    /// Only calls about these kinds wait (`flush`, which has no kind, then never waits).
    pub fn only_kinds(mut self, kinds: &[ObjectKind]) -> SlowStore {
        self.kinds = Some(kinds.iter().copied().collect());
        self
    }

    /// Wait after the inner call instead of before it.
    pub fn answer_late(mut self) -> SlowStore {
        self.late = true;
        self
    }

    /// The delay from now on (`Duration::ZERO`: none).
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    /// How many calls waited so far.
    pub fn delayed_calls(&self) -> u64 {
        self.delayed.load(Ordering::SeqCst)
    }

    fn wait(&self, op: Op, kind: Option<ObjectKind>) {
        let delay = *self.delay.lock().unwrap();
        let op_chosen = self.ops.as_ref().is_none_or(|s| s.contains(&op));
        let kind_chosen = match &self.kinds {
            None => true,
            Some(s) => kind.is_some_and(|k| s.contains(&k)),
        };
        if delay.is_zero() || !op_chosen || !kind_chosen {
            return;
        }
        self.delayed.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(delay);
    }

    fn call<T>(&self, op: Op, kind: Option<ObjectKind>, f: impl FnOnce() -> T) -> T {
        if !self.late {
            self.wait(op, kind);
        }
        let r = f();
        if self.late {
            self.wait(op, kind);
        }
        r
    }
}

impl Store for SlowStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn get(&self, key: &Key, max_len: u64) -> Result<Vec<u8>> {
        self.call(Op::Get, kind_of(Some(key), None), || {
            self.inner.get(key, max_len)
        })
    }
    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.call(Op::GetRange, kind_of(Some(key), None), || {
            self.inner.get_range(key, offset, len)
        })
    }
    fn size(&self, key: &Key) -> Result<u64> {
        self.call(Op::Size, kind_of(Some(key), None), || self.inner.size(key))
    }
    fn put(&self, key: &Key, data: &[u8]) -> Result<()> {
        self.call(Op::Put, kind_of(Some(key), None), || {
            self.inner.put(key, data)
        })
    }
    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool> {
        self.call(Op::PutIfAbsent, kind_of(Some(key), None), || {
            self.inner.put_if_absent(key, data)
        })
    }
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectMeta>> {
        self.call(Op::List, kind_of(None, Some(kind)), || {
            self.inner.list(kind)
        })
    }
    fn delete(&self, key: &Key) -> Result<()> {
        self.call(Op::Delete, kind_of(Some(key), None), || {
            self.inner.delete(key)
        })
    }
    fn flush(&self) -> Result<()> {
        self.call(Op::Flush, None, || self.inner.flush())
    }
    fn list_temporaries(&self) -> Result<Vec<vmkeep_store::Temporary>> {
        self.inner.list_temporaries()
    }
    fn remove_temporaries(
        &self,
        older_than: std::time::Duration,
    ) -> Result<vmkeep_store::TemporariesRemoved> {
        self.inner.remove_temporaries(older_than)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use vmkeep_store::LocalStore;

    const DELAY: Duration = Duration::from_millis(60);

    fn timed<T>(f: impl FnOnce() -> T) -> Duration {
        let t = Instant::now();
        f();
        t.elapsed()
    }

    #[test]
    fn only_the_chosen_operations_and_kinds_wait() {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Store> = Arc::new(LocalStore::create(dir.path().join("r")).unwrap());
        let s = SlowStore::new(local, DELAY)
            .only_ops(&[Op::List, Op::Put])
            .only_kinds(&[ObjectKind::Snapshot]);
        let snap = Key::new(ObjectKind::Snapshot, "a").unwrap();
        let lock = Key::new(ObjectKind::Lock, "b").unwrap();
        assert!(timed(|| s.put(&snap, b"x").unwrap()) >= DELAY);
        assert!(timed(|| s.list(ObjectKind::Snapshot).unwrap()) >= DELAY);
        assert_eq!(s.delayed_calls(), 2);
        s.put(&lock, b"y").unwrap();
        s.list(ObjectKind::Lock).unwrap();
        s.get(&snap, 1 << 20).unwrap();
        s.flush().unwrap();
        assert_eq!(
            s.delayed_calls(),
            2,
            "other kinds and operations pass at once"
        );
        s.set_delay(Duration::ZERO);
        s.put(&snap, b"z").unwrap();
        assert_eq!(s.delayed_calls(), 2, "no delay once set to zero");
    }

    #[test]
    fn a_late_answer_describes_the_store_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Store> = Arc::new(LocalStore::create(dir.path().join("r")).unwrap());
        let s = Arc::new(
            SlowStore::new(local.clone(), DELAY * 3)
                .only_ops(&[Op::List])
                .answer_late(),
        );
        let lister = {
            let s = s.clone();
            std::thread::spawn(move || s.list(ObjectKind::Snapshot).unwrap())
        };
        std::thread::sleep(DELAY);
        local
            .put(&Key::new(ObjectKind::Snapshot, "new").unwrap(), b"x")
            .unwrap();
        assert!(
            lister.join().unwrap().is_empty(),
            "listed before the put, answered after it"
        );
        assert_eq!(s.list(ObjectKind::Snapshot).unwrap().len(), 1);
    }
}
