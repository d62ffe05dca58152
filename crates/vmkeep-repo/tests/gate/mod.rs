//! A store wrapper that stops chosen operations until the test lets them go: deterministic
//! interleavings of real repository operations without sleeps or production hooks.
//!
//! A gate matches an operation (`put`, `delete`, `list`, `get`) on a kind of object. The n-th
//! matching call blocks before it reaches the inner store (`Before`) or after it returned
//! (`After`), reports that it arrived, and waits until the test releases it. Calls that match
//! no armed gate pass straight through.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use vmkeep_store::{Key, ObjectKind, ObjectMeta, Result, Store};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Delete,
    List,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Before,
    After,
}

struct Armed {
    op: Op,
    kind: ObjectKind,
    when: When,
    /// Matching calls to let through before this gate closes.
    skip: usize,
    arrived: Sender<()>,
    release: Receiver<()>,
}

#[derive(Default)]
struct Gates(Vec<Armed>);

/// The test's handle on one gate.
pub struct Gate {
    arrived: Receiver<()>,
    release: Sender<()>,
}

impl Gate {
    /// Wait until the gated call arrives (panics after a minute: the interleaving broke).
    pub fn wait(&self) {
        self.arrived
            .recv_timeout(Duration::from_secs(60))
            .expect("the gated store call never arrived");
    }

    pub fn release(&self) {
        let _ = self.release.send(());
    }
}

impl Drop for Gate {
    /// A test that fails between arming and releasing must not leave a thread blocked forever.
    fn drop(&mut self) {
        let _ = self.release.try_send(());
    }
}

#[derive(Debug)]
pub struct GateStore {
    inner: Arc<dyn Store>,
    gates: Mutex<Gates>,
}

impl std::fmt::Debug for Gates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} gates", self.0.len())
    }
}

impl GateStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<GateStore> {
        Arc::new(GateStore {
            inner,
            gates: Mutex::new(Gates::default()),
        })
    }

    /// Stop the `skip+1`-th call of `op` on `kind` at `when`.
    pub fn arm(&self, op: Op, kind: ObjectKind, when: When, skip: usize) -> Gate {
        let (atx, arx) = bounded(1);
        let (rtx, rrx) = bounded(1);
        self.gates.lock().unwrap().0.push(Armed {
            op,
            kind,
            when,
            skip,
            arrived: atx,
            release: rrx,
        });
        Gate {
            arrived: arx,
            release: rtx,
        }
    }

    fn pass(&self, op: Op, kind: ObjectKind, when: When) {
        let hit = {
            let mut g = self.gates.lock().unwrap();
            let pos =
                g.0.iter()
                    .position(|a| a.op == op && a.kind == kind && a.when == when);
            match pos {
                Some(i) if g.0[i].skip > 0 => {
                    g.0[i].skip -= 1;
                    None
                }
                Some(i) => Some(g.0.remove(i)),
                None => None,
            }
        };
        if let Some(a) = hit {
            let _ = a.arrived.send(());
            let _ = a.release.recv();
        }
    }

    fn around<T>(&self, op: Op, kind: ObjectKind, f: impl FnOnce() -> T) -> T {
        self.pass(op, kind, When::Before);
        let r = f();
        self.pass(op, kind, When::After);
        r
    }
}

impl Store for GateStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn get(&self, key: &Key, max_len: u64) -> Result<Vec<u8>> {
        self.around(Op::Get, key.kind, || self.inner.get(key, max_len))
    }
    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.around(Op::Get, key.kind, || self.inner.get_range(key, offset, len))
    }
    fn size(&self, key: &Key) -> Result<u64> {
        self.inner.size(key)
    }
    fn put(&self, key: &Key, data: &[u8]) -> Result<()> {
        self.around(Op::Put, key.kind, || self.inner.put(key, data))
    }
    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool> {
        self.around(Op::Put, key.kind, || self.inner.put_if_absent(key, data))
    }
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectMeta>> {
        self.around(Op::List, kind, || self.inner.list(kind))
    }
    fn delete(&self, key: &Key) -> Result<()> {
        self.around(Op::Delete, key.kind, || self.inner.delete(key))
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}
