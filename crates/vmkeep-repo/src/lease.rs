//! Leases (`locks/<name>`): every backup, prune and forget announces itself with a lease it
//! refreshes while it runs. GC reads them to know which backups might still reference blobs it
//! wants to delete; prunes read them to exclude each other. No conditional writes needed: two
//! prunes that start together both write, both list, and the one with the larger (created, name)
//! steps back. FORMAT.md "Concurrency and GC".
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vmkeep_core::object::{self, ObjectKind};
use vmkeep_store::{Key, Kind};

use crate::error::{Error, Result};
use crate::repository::hostname;
use crate::Repository;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRecord {
    /// "backup", "prune", "forget"
    pub kind: String,
    pub host: String,
    pub pid: u32,
    pub created: DateTime<Utc>,
    pub refreshed: DateTime<Utc>,
}

impl LeaseRecord {
    pub fn alive(&self, now: DateTime<Utc>, timeout: Duration) -> bool {
        let age = now.signed_duration_since(self.refreshed);
        age.to_std().map(|a| a < timeout).unwrap_or(true)
    }

    pub fn describe(&self) -> String {
        format!(
            "{} by pid {} on {} since {}",
            self.kind,
            self.pid,
            self.host,
            self.created.to_rfc3339()
        )
    }
}

struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
    /// When the lease was last written successfully.
    last_ok: Mutex<Instant>,
}

/// A held lease; refreshed by a background thread until released or dropped.
pub struct Lease {
    key: Key,
    record: LeaseRecord,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    store: Arc<dyn vmkeep_store::Store>,
    timeout: Duration,
}

fn encode(repo_keys: &vmkeep_core::keys::Keys, rec: &LeaseRecord) -> Vec<u8> {
    object::seal(
        repo_keys,
        ObjectKind::Lock,
        &serde_json::to_vec(rec).expect("serialises"),
    )
}

impl Lease {
    pub fn acquire(repo: &Repository, kind: &str) -> Result<Lease> {
        let now = Utc::now();
        let record = LeaseRecord {
            kind: kind.into(),
            host: hostname(),
            pid: std::process::id(),
            created: now,
            refreshed: now,
        };
        let key = Key::new(Kind::Lock, hex::encode(vmkeep_core::SnapshotId::random().0))?;
        repo.store.put(&key, &encode(&repo.keys, &record))?;
        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            last_ok: Mutex::new(Instant::now()),
        });
        let thread = {
            let shared = shared.clone();
            let store = repo.store.clone();
            let keys = repo.keys.clone();
            let key = key.clone();
            let mut rec = record.clone();
            let every = repo.tuning.lease_refresh;
            std::thread::Builder::new()
                .name("vmkeep-lease".into())
                .spawn(move || loop {
                    let stop = shared.stop.lock().unwrap();
                    // Check before waiting: a stop signalled before this thread first waited
                    // would otherwise be missed, and release would block a whole period.
                    if *stop {
                        return;
                    }
                    let (stop, _) = shared.wake.wait_timeout(stop, every).unwrap();
                    if *stop {
                        return;
                    }
                    drop(stop);
                    rec.refreshed = Utc::now();
                    match store.put(&key, &encode(&keys, &rec)) {
                        Ok(()) => *shared.last_ok.lock().unwrap() = Instant::now(),
                        Err(e) => tracing::warn!(error = %e, "could not refresh lease"),
                    }
                })
                .map_err(|e| Error::Internal(format!("spawning the lease thread: {e}")))?
        };
        Ok(Lease {
            key,
            record,
            shared,
            thread: Some(thread),
            store: repo.store.clone(),
            timeout: repo.tuning.lease_timeout,
        })
    }

    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    pub fn name(&self) -> &str {
        &self.key.name
    }

    /// True when the lease may have expired in others' eyes: its last successful refresh is older
    /// than the timeout (the process was stopped, or the store unreachable).
    pub fn possibly_expired(&self) -> bool {
        self.shared.last_ok.lock().unwrap().elapsed() >= self.timeout
    }

    fn stop_thread(&mut self) {
        *self.shared.stop.lock().unwrap() = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn release(mut self) -> Result<()> {
        self.stop_thread();
        self.store.delete(&self.key)?;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_thread();
            let _ = self.store.delete(&self.key);
        }
    }
}

/// Every lease in the repository (unreadable ones are reported as alive "unknown" leases, so a
/// damaged lease can only make GC more careful, never less).
pub fn list(repo: &Repository) -> Result<Vec<(Key, LeaseRecord)>> {
    let mut out = Vec::new();
    for meta in repo.store.list(Kind::Lock)? {
        let bytes = match repo
            .store
            .get(&meta.key, ObjectKind::Lock.max_size() as u64)
        {
            Ok(b) => b,
            Err(e) if e.is_too_large() => Vec::new(), // unreadable: an "unknown" live lease
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let rec = object::open(&repo.keys, ObjectKind::Lock, &bytes)
            .ok()
            .and_then(|b| serde_json::from_slice::<LeaseRecord>(&b).ok())
            .unwrap_or_else(|| {
                let t: DateTime<Utc> = meta.modified.into();
                LeaseRecord {
                    kind: "unknown".into(),
                    host: "?".into(),
                    pid: 0,
                    created: t,
                    refreshed: t,
                }
            });
        out.push((meta.key, rec));
    }
    Ok(out)
}

/// Remove leases whose holder is gone: expired ones, and those of dead processes on this host.
pub fn remove_stale(repo: &Repository, all: bool) -> Result<Vec<LeaseRecord>> {
    let now = Utc::now();
    let me = hostname();
    let mut removed = Vec::new();
    for (key, rec) in list(repo)? {
        let dead_here = rec.host == me && rec.pid != 0 && !pid_alive(rec.pid);
        if all || dead_here || !rec.alive(now, repo.tuning.lease_timeout) {
            repo.store.delete(&key)?;
            removed.push(rec);
        }
    }
    Ok(removed)
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether the holder of a lease may still be running: refreshed within the timeout and, when it
/// is on this host, its process still exists.
pub fn holder_alive(rec: &LeaseRecord, now: DateTime<Utc>, timeout: Duration) -> bool {
    if rec.host == hostname() && rec.pid != 0 && !pid_alive(rec.pid) {
        return false;
    }
    rec.alive(now, timeout)
}
