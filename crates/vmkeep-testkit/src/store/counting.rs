//! A store that counts calls by operation and kind, to bound what an operation reads or writes.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use vmkeep_store::{Key, ObjectKind, ObjectMeta, Result, Store};

use super::{kind_of, Op};

/// Passes every call on and counts it (successful or not) by operation and kind (`None` for
/// `flush`), with the bytes read and written.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn Store>,
    counts: Mutex<Counts>,
}

/// What a [`CountingStore`] saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub calls: BTreeMap<(Op, Option<ObjectKind>), u64>,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl Counts {
    /// Calls of `op` about `kind`.
    pub fn of(&self, op: Op, kind: ObjectKind) -> u64 {
        self.calls.get(&(op, Some(kind))).copied().unwrap_or(0)
    }

    /// Calls of `op`, any kind.
    pub fn of_op(&self, op: Op) -> u64 {
        self.calls
            .iter()
            .filter(|((o, _), _)| *o == op)
            .map(|(_, n)| n)
            .sum()
    }

    /// Calls that change the store.
    pub fn mutations(&self) -> u64 {
        Op::ALL
            .iter()
            .filter(|o| o.mutates())
            .map(|o| self.of_op(*o))
            .sum()
    }
}

impl CountingStore {
    pub fn new(inner: Arc<dyn Store>) -> CountingStore {
        CountingStore {
            inner,
            counts: Mutex::new(Counts::default()),
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        self.counts.lock().unwrap().clone()
    }

    /// The counts so far, and start again from zero.
    pub fn take(&self) -> Counts {
        std::mem::take(&mut *self.counts.lock().unwrap())
    }

    fn count(&self, op: Op, kind: Option<ObjectKind>, read: u64, written: u64) {
        let mut c = self.counts.lock().unwrap();
        *c.calls.entry((op, kind)).or_default() += 1;
        c.bytes_read += read;
        c.bytes_written += written;
    }
}

fn len_of(r: &Result<Vec<u8>>) -> u64 {
    r.as_ref().map_or(0, |v| v.len() as u64)
}

impl Store for CountingStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn get(&self, key: &Key, max_len: u64) -> Result<Vec<u8>> {
        let r = self.inner.get(key, max_len);
        self.count(Op::Get, kind_of(Some(key), None), len_of(&r), 0);
        r
    }
    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>> {
        let r = self.inner.get_range(key, offset, len);
        self.count(Op::GetRange, kind_of(Some(key), None), len_of(&r), 0);
        r
    }
    fn size(&self, key: &Key) -> Result<u64> {
        self.count(Op::Size, kind_of(Some(key), None), 0, 0);
        self.inner.size(key)
    }
    fn put(&self, key: &Key, data: &[u8]) -> Result<()> {
        self.count(Op::Put, kind_of(Some(key), None), 0, data.len() as u64);
        self.inner.put(key, data)
    }
    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool> {
        self.count(
            Op::PutIfAbsent,
            kind_of(Some(key), None),
            0,
            data.len() as u64,
        );
        self.inner.put_if_absent(key, data)
    }
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectMeta>> {
        self.count(Op::List, kind_of(None, Some(kind)), 0, 0);
        self.inner.list(kind)
    }
    fn delete(&self, key: &Key) -> Result<()> {
        self.count(Op::Delete, kind_of(Some(key), None), 0, 0);
        self.inner.delete(key)
    }
    fn flush(&self) -> Result<()> {
        self.count(Op::Flush, None, 0, 0);
        self.inner.flush()
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
    use super::*;
    use vmkeep_store::LocalStore;

    #[test]
    fn counts_calls_and_bytes_by_operation_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Store> = Arc::new(LocalStore::create(dir.path().join("r")).unwrap());
        let s = CountingStore::new(local);
        let k = Key::new(ObjectKind::Index, "ab").unwrap();
        s.put(&k, b"12345").unwrap();
        s.get(&k, 1 << 20).unwrap();
        s.get_range(&k, 1, 2).unwrap();
        assert!(s
            .get(&Key::new(ObjectKind::Index, "cd").unwrap(), 1 << 20)
            .is_err());
        s.list(ObjectKind::Pack).unwrap();
        s.delete(&k).unwrap();
        s.flush().unwrap();
        let c = s.take();
        assert_eq!(
            c.of(Op::Get, ObjectKind::Index),
            2,
            "failed calls count too"
        );
        assert_eq!(c.of(Op::List, ObjectKind::Pack), 1);
        assert_eq!(c.of_op(Op::Flush), 1);
        assert_eq!(c.mutations(), 2);
        assert_eq!((c.bytes_read, c.bytes_written), (7, 5));
        assert_eq!(s.counts(), Counts::default(), "take starts again");
    }
}
