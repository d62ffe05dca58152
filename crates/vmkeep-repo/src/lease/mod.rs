//! Leases (`locks/<lease id>`): every backup, prune, forget and index repair announces itself
//! with a lease it refreshes while it runs. GC reads them to know which backups might still
//! reference blobs it wants to delete; maintenance operations read them to exclude each other.
//! No conditional writes are needed. FORMAT.md §13; the protocol's model is `gc/model`.
//!
//! The holder's side: a lease is good only while it keeps being refreshed. When the process
//! was stopped (SIGSTOP, a suspended machine) or the store unreachable for the lease timeout,
//! others may have judged it dead and acted on that, so the holder marks it **lost** and the
//! mark stays: a later refresh does not undo it. The time is measured with CLOCK_BOOTTIME, which
//! keeps counting while the machine sleeps. Operations check the lease before each step that
//! depends on it ([`Lease::check`]); a backup whose lease was lost verifies what it references
//! before it may commit (`backup/commit.rs`).
mod identity;
mod record;

pub use identity::HostIdentity;
pub use record::{judge, LeaseKind, LeaseRecord, ListedLease, Liveness, LEASE_VERSION};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use vmkeep_core::LeaseId;
use vmkeep_core::{object, ObjectKind};
use vmkeep_store::Key;

use crate::error::{Error, Result};
use crate::Repository;

/// Time since boot, counting suspend (CLOCK_BOOTTIME).
pub fn boot_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(
        r, 0,
        "CLOCK_BOOTTIME is available on every supported kernel"
    );
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

pub(crate) fn lease_key(id: &LeaseId) -> Key {
    Key::new(ObjectKind::Lock, id.to_hex()).expect("hex names are valid keys")
}

struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
    /// Boot time at which the last successful write of the lease started.
    written_at: Mutex<Duration>,
    /// Sticky: the lease may have expired in others' eyes at some point.
    lost: AtomicBool,
    timeout: Duration,
}

impl Shared {
    /// Mark lost if the last good write is older than the timeout; true when lost.
    fn lost_now(&self) -> bool {
        let expired = boot_time().saturating_sub(*self.written_at.lock().unwrap()) >= self.timeout;
        if expired && !self.lost.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "this process's lease was not refreshed for the lease timeout (stopped, \
                 suspended or cut off from the repository); others may have acted on it"
            );
        }
        self.lost.load(Ordering::SeqCst)
    }
}

/// A held lease; refreshed by a background thread until released or dropped.
pub struct Lease {
    id: LeaseId,
    /// Writes the lease object (the refresh thread has its own clone).
    writer: Writer,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn encode(repo_keys: &vmkeep_core::keys::Keys, rec: &LeaseRecord) -> Vec<u8> {
    object::seal(
        repo_keys,
        ObjectKind::Lock,
        &serde_json::to_vec(rec).expect("a lease serialises"),
    )
}

impl Lease {
    pub fn acquire(repo: &Repository, kind: LeaseKind) -> Result<Lease> {
        let now = Utc::now();
        let pid = std::process::id();
        let record = LeaseRecord {
            version: LEASE_VERSION,
            kind,
            host: HostIdentity::current().clone(),
            pid,
            pid_start: identity::process_start(pid),
            created: now,
            refreshed: now,
        };
        let id = LeaseId::random();
        let writer = Writer {
            key: lease_key(&id),
            record,
            store: repo.store.clone(),
            keys: repo.keys.clone(),
        };
        let started = boot_time();
        writer
            .store
            .put(&writer.key, &encode(&writer.keys, &writer.record))?;
        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            written_at: Mutex::new(started),
            lost: AtomicBool::new(false),
            timeout: repo.tuning.lease_timeout,
        });
        let mut lease = Lease {
            id,
            writer,
            shared,
            thread: None,
        };
        let spawned = {
            let shared = lease.shared.clone();
            let every = repo.tuning.lease_refresh;
            let writer = lease.writer.clone();
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
                    // After a stall, this runs first: the lease is marked lost before it is
                    // written again, and stays lost.
                    shared.lost_now();
                    if let Err(e) = writer.write(&shared) {
                        tracing::warn!(error = %e, "could not refresh the lease");
                    }
                })
        };
        match spawned {
            Ok(t) => lease.thread = Some(t),
            Err(e) => {
                let _ = lease.writer.delete();
                return Err(Error::Internal(format!("spawning the lease thread: {e}")));
            }
        }
        Ok(lease)
    }

    pub fn record(&self) -> &LeaseRecord {
        &self.writer.record
    }

    pub fn id(&self) -> &LeaseId {
        &self.id
    }

    /// Ok while the lease has been refreshed within the timeout; Err(LeaseLost) from the first
    /// time it was not, for good. Call it right before each step that relies on the lease.
    pub fn check(&self) -> Result<()> {
        if self.shared.lost_now() {
            Err(Error::LeaseLost {
                kind: self.writer.record.kind,
            })
        } else {
            Ok(())
        }
    }

    pub fn is_lost(&self) -> bool {
        self.shared.lost_now()
    }

    /// Write the lease now (it may have been removed as stale) and return the boot time at
    /// which the write started. The lost mark stays.
    pub fn refresh_now(&self) -> Result<Duration> {
        self.shared.lost_now();
        self.writer.write(&self.shared)
    }

    /// After a lost lease was written again at `since` and everything it protects was
    /// verified: clear the mark, unless the lease expired again meanwhile.
    pub fn recovered(&self, since: Duration) -> bool {
        if boot_time().saturating_sub(since) >= self.shared.timeout {
            return false;
        }
        self.shared.lost.store(false, Ordering::SeqCst);
        true
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
        self.writer.delete()
    }
}

/// The lease object's key and body, and the store it lives in.
#[derive(Clone)]
struct Writer {
    key: Key,
    record: LeaseRecord,
    store: Arc<dyn vmkeep_store::Store>,
    keys: vmkeep_core::keys::Keys,
}

impl Writer {
    fn write(&self, shared: &Shared) -> Result<Duration> {
        let started = boot_time();
        let mut rec = self.record.clone();
        rec.refreshed = Utc::now();
        self.store.put(&self.key, &encode(&self.keys, &rec))?;
        *shared.written_at.lock().unwrap() = started;
        Ok(started)
    }

    fn delete(&self) -> Result<()> {
        self.store.delete(&self.key)?;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_thread();
            let _ = self.writer.delete();
        }
    }
}

/// Every lease in the repository. Unreadable ones are listed without a record, so a damaged
/// lease can only make GC more careful, never less.
pub fn list(repo: &Repository) -> Result<Vec<ListedLease>> {
    let mut out = Vec::new();
    for meta in repo.store.list(ObjectKind::Lock)? {
        let Ok(id) = meta.key.name.parse::<LeaseId>() else {
            tracing::warn!(object = %meta.key, "ignoring a lock object whose name is not a lease id");
            continue;
        };
        let bytes = match repo.store.get(&meta.key, ObjectKind::Lock.max_size()) {
            Ok(b) => b,
            Err(e) if e.is_too_large() => Vec::new(), // unreadable: judged by its time
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let record = object::open(&repo.keys, ObjectKind::Lock, &bytes)
            .ok()
            .and_then(|b| serde_json::from_slice::<LeaseRecord>(&b).ok());
        out.push(ListedLease {
            id,
            record,
            modified: meta.modified.into(),
        });
    }
    Ok(out)
}

impl Repository {
    /// How this process judges `lease` now.
    pub fn judge_lease(&self, lease: &ListedLease, now: DateTime<Utc>) -> Liveness {
        judge(
            lease,
            HostIdentity::current(),
            now,
            self.tuning.lease_timeout,
            self.tuning.clock_skew,
        )
    }

    /// Ids of the leases other than `mine` whose holders may still run.
    pub(crate) fn live_leases_except(&self, mine: &LeaseId) -> Result<Vec<LeaseId>> {
        self.live_leases(Some(mine))
    }

    /// Ids of the leases (other than `except`) whose holders may still run.
    pub(crate) fn live_leases(&self, except: Option<&LeaseId>) -> Result<Vec<LeaseId>> {
        let now = Utc::now();
        Ok(list(self)?
            .into_iter()
            .filter(|l| Some(&l.id) != except && self.judge_lease(l, now).is_alive())
            .map(|l| l.id)
            .collect())
    }

    /// A reader's lease (restore, mount, recover, verify): packs condemned while it is held
    /// wait for it, so what it reads stays readable even if its restore point is forgotten
    /// and pruned meanwhile. A repository that does not let this process write a lease (a
    /// read-only token or folder) is read without one, with a warning: a prune may then
    /// remove what it reads (reads fail, never return other data).
    pub fn read_lease(&self) -> Option<Lease> {
        match Lease::acquire(self, LeaseKind::Read) {
            Ok(lease) => Some(lease),
            Err(e) => {
                tracing::warn!(
                    "reading without a lease ({e}): a prune running meanwhile may remove data \
                     this reads"
                );
                None
            }
        }
    }

    /// Take the exclusive maintenance lease (prune, forget, repair index): write ours, then
    /// list; if any other live exclusive lease exists, step back. Two that start together may
    /// both step back (each then says "another ... is running"); two can never both go on,
    /// whatever their clocks say, because each looks only after its own lease landed.
    pub(crate) fn maintenance_lease(&self, kind: LeaseKind) -> Result<Lease> {
        debug_assert!(kind.exclusive());
        let lease = Lease::acquire(self, kind)?;
        let now = Utc::now();
        for other in list(self)? {
            self.warn_if_clock_off(&other, other.id == lease.id);
            if other.id == lease.id {
                continue;
            }
            // An unreadable lease might be a maintenance lease: it blocks too.
            if other.kind().is_some_and(|k| !k.exclusive()) {
                continue;
            }
            if self.judge_lease(&other, now).is_alive() {
                let holder = other.describe();
                drop(lease);
                return Err(Error::Locked {
                    what: kind.name(),
                    holder,
                });
            }
        }
        Ok(lease)
    }
}

impl Repository {
    /// GC tolerates clocks that differ by up to the skew allowance (FORMAT.md §13.2). A lease's
    /// record says when its holder wrote it, by the holder's clock; the store says when the
    /// write landed, by its own: a difference beyond the allowance means that host's clock
    /// (or ours, for our own lease) is off, and the allowance no longer covers it.
    fn warn_if_clock_off(&self, lease: &ListedLease, mine: bool) {
        let Some(r) = &lease.record else { return };
        let off = (lease.modified - r.refreshed).abs();
        let allowed =
            chrono::Duration::from_std(self.tuning.clock_skew).unwrap_or(chrono::Duration::MAX);
        if off <= allowed {
            return;
        }
        let whose = if mine {
            "this host's clock".to_string()
        } else {
            format!("the clock of {}", r.host.describe())
        };
        tracing::warn!(
            "{whose} differs from the repository store's by about {} s, more than the {} s \
             the protocol allows (or that write was held up that long): set the clocks right \
             (NTP); until then a lease may be judged expired early or late",
            off.num_seconds(),
            allowed.num_seconds()
        );
    }
}

/// Remove leases whose holders are gone (or all of them with `all`, for `unlock --remove-all`
/// when the operator knows nothing runs). Returns what was removed, and what was kept (holders
/// that may still run: a process seen running, or one on another host or in another PID
/// namespace, whose lease counts until it expires).
pub fn remove_stale(repo: &Repository, all: bool) -> Result<(Vec<ListedLease>, Vec<ListedLease>)> {
    let now = Utc::now();
    let (mut removed, mut kept) = (Vec::new(), Vec::new());
    for l in list(repo)? {
        if all || !repo.judge_lease(&l, now).is_alive() {
            repo.store.delete(&lease_key(&l.id))?;
            removed.push(l);
        } else {
            kept.push(l);
        }
    }
    Ok((removed, kept))
}
