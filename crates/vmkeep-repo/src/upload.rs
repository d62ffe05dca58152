//! Pack uploads in flight while the packer fills the next pack: on a store with per-request
//! latency (S3, `vmkeep serve`), one upload at a time would leave the hashing and compressing
//! threads waiting on the network. `Store::concurrency()` says how many uploads run at once;
//! 1 (a local folder) uploads inline, in the order written, exactly as before.
//!
//! Ordering: the packer calls [`Uploads::wait`] before it writes an index object, so an index
//! object never names a pack that is not stored yet (FORMAT.md "Write ordering"). Memory: at
//! most `concurrency` packs uploading plus one queued.
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender};
use vmkeep_store::{Key, Store};

use crate::error::{Error, Result};

#[derive(Default)]
struct State {
    in_flight: usize,
    /// The first failure; later uploads are skipped once one failed.
    error: Option<Error>,
    failed: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

pub(crate) struct Uploads {
    store: Arc<dyn Store>,
    tx: Option<Sender<(Key, Vec<u8>)>>,
    threads: Vec<JoinHandle<()>>,
    state: Shared,
}

impl Uploads {
    pub(crate) fn start(store: Arc<dyn Store>) -> Result<Uploads> {
        let n = store.concurrency().max(1);
        let state: Shared = Arc::default();
        let mut uploads = Uploads {
            store: store.clone(),
            tx: None,
            threads: Vec::new(),
            state: state.clone(),
        };
        if n == 1 {
            return Ok(uploads);
        }
        let (tx, rx) = bounded::<(Key, Vec<u8>)>(1);
        for i in 0..n {
            let (rx, store, state) = (rx.clone(), store.clone(), state.clone());
            let t = std::thread::Builder::new()
                .name(format!("vmkeep-upload-{i}"))
                .spawn(move || {
                    for (key, bytes) in rx {
                        let skip = state.0.lock().unwrap().failed;
                        let r = if skip {
                            Ok(())
                        } else {
                            store.put_owned(&key, bytes)
                        };
                        let mut s = state.0.lock().unwrap();
                        if let Err(e) = r {
                            if !s.failed {
                                s.failed = true;
                                s.error = Some(e.into());
                            }
                        }
                        s.in_flight -= 1;
                        state.1.notify_all();
                    }
                })
                .map_err(|e| Error::Internal(format!("spawning an uploader: {e}")))?;
            uploads.threads.push(t);
        }
        uploads.tx = Some(tx);
        Ok(uploads)
    }

    /// Stores `bytes` under `key`, now (inline) or soon (in flight). An earlier upload's
    /// failure is returned here or by [`wait`](Self::wait).
    pub(crate) fn put(&self, key: Key, bytes: Vec<u8>) -> Result<()> {
        let Some(tx) = &self.tx else {
            return Ok(self.store.put(&key, &bytes)?);
        };
        {
            let mut s = self.state.0.lock().unwrap();
            if s.failed {
                return Err(take_error(&mut s));
            }
            s.in_flight += 1;
        }
        if tx.send((key, bytes)).is_err() {
            return Err(Error::Internal("the uploaders stopped".into()));
        }
        Ok(())
    }

    /// Returns when every upload handed to [`put`](Self::put) is stored, or with the first
    /// failure.
    pub(crate) fn wait(&self) -> Result<()> {
        let mut s = self.state.0.lock().unwrap();
        while s.in_flight > 0 {
            s = self.state.1.wait(s).unwrap();
        }
        if s.failed {
            return Err(take_error(&mut s));
        }
        Ok(())
    }
}

fn take_error(s: &mut State) -> Error {
    s.error
        .take()
        .unwrap_or_else(|| Error::Internal("an earlier pack upload failed".into()))
}

impl Drop for Uploads {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
