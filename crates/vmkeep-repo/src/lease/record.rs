//! The lease object (`locks/<lease id>`), and how anyone judges whether its holder may still
//! be running (FORMAT.md §13).
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vmkeep_core::LeaseId;

use super::identity::{process_alive, HostIdentity};

pub const LEASE_VERSION: u32 = 1;

/// What a lease's holder is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseKind {
    /// A backup: GC must not reclaim what it may reference.
    Backup,
    /// Prune (forget by retention, then GC): exclusive.
    Prune,
    /// Forget: exclusive.
    Forget,
    /// `repair index`: exclusive.
    RepairIndex,
    /// A reader (restore, mount, recover, verify): GC must not reclaim what it reads, even
    /// when its restore point is forgotten meanwhile.
    Read,
}

impl LeaseKind {
    /// Maintenance operations exclude each other: at most one runs on a repository.
    pub fn exclusive(self) -> bool {
        !matches!(self, LeaseKind::Backup | LeaseKind::Read)
    }

    pub fn name(self) -> &'static str {
        match self {
            LeaseKind::Backup => "backup",
            LeaseKind::Prune => "prune",
            LeaseKind::Forget => "forget",
            LeaseKind::RepairIndex => "repair index",
            LeaseKind::Read => "read",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRecord {
    pub version: u32,
    pub kind: LeaseKind,
    pub host: HostIdentity,
    pub pid: u32,
    /// Start time of the holder process (clock ticks after boot), telling a reused pid apart.
    pub pid_start: Option<u64>,
    pub created: DateTime<Utc>,
    /// The holder's wall clock when it last wrote the lease.
    pub refreshed: DateTime<Utc>,
}

/// A lease as listed: its id and its record, or None when the object could not be read (then
/// only its store modification time is known).
#[derive(Clone, Debug)]
pub struct ListedLease {
    pub id: LeaseId,
    pub record: Option<LeaseRecord>,
    pub modified: DateTime<Utc>,
}

/// The judgement of a lease by another process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Its holder may still be running.
    Alive,
    /// Its holder is gone, or its lease expired: why.
    Dead(String),
}

impl Liveness {
    pub fn is_alive(&self) -> bool {
        matches!(self, Liveness::Alive)
    }
}

/// The rules every process applies to every other's lease:
/// - its process is gone: only looked up when it shares our kernel and PID namespace;
/// - otherwise it expired when it was not refreshed for `timeout`, plus `skew` when it was
///   written on another kernel (whose clock may differ from ours by up to `skew`);
/// - an unreadable lease counts from its modification time, with the skew margin.
pub fn judge(
    lease: &ListedLease,
    me: &HostIdentity,
    now: DateTime<Utc>,
    timeout: Duration,
    skew: Duration,
) -> Liveness {
    let skew = chrono::Duration::from_std(skew).unwrap_or(chrono::Duration::MAX);
    let timeout = chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    let Some(r) = &lease.record else {
        return if now - lease.modified >= timeout + skew {
            Liveness::Dead("unreadable, and not modified for the lease timeout".into())
        } else {
            Liveness::Alive
        };
    };
    if me.shares_pids_with(&r.host) && !process_alive(r.pid, r.pid_start) {
        return Liveness::Dead(format!("process {} no longer runs", r.pid));
    }
    let margin = if me.shares_clock_with(&r.host) {
        chrono::Duration::zero()
    } else {
        skew
    };
    let age = now - r.refreshed;
    if age >= timeout + margin {
        Liveness::Dead(format!(
            "not refreshed for {}s (timeout {}s)",
            age.num_seconds(),
            timeout.num_seconds()
        ))
    } else {
        Liveness::Alive
    }
}

impl LeaseRecord {
    pub fn describe(&self) -> String {
        format!(
            "{} by pid {} on {} since {}",
            self.kind.name(),
            self.pid,
            self.host.describe(),
            self.created
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
    }
}

impl ListedLease {
    pub fn describe(&self) -> String {
        match &self.record {
            Some(r) => r.describe(),
            None => format!("unreadable lease {}", self.id),
        }
    }

    pub fn kind(&self) -> Option<LeaseKind> {
        self.record.as_ref().map(|r| r.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkeep_core::HostId;

    const T: Duration = Duration::from_secs(900);
    const S: Duration = Duration::from_secs(300);

    fn lease(host: HostIdentity, pid: u32, start: Option<u64>, age_s: i64) -> ListedLease {
        let now = Utc::now();
        let t = now - chrono::Duration::seconds(age_s);
        ListedLease {
            id: LeaseId::random(),
            record: Some(LeaseRecord {
                version: LEASE_VERSION,
                kind: LeaseKind::Backup,
                host,
                pid,
                pid_start: start,
                created: t,
                refreshed: t,
            }),
            modified: t,
        }
    }

    #[test]
    fn a_lease_of_another_namespace_is_never_judged_by_our_process_table() {
        let me = HostIdentity::current().clone();
        let other_ns = HostIdentity {
            pid_ns: me.pid_ns + 1,
            ..me.clone()
        };
        // pid u32::MAX - 7 exists nowhere here: in our namespace that means dead...
        let l = lease(me.clone(), u32::MAX - 7, None, 1);
        assert!(!judge(&l, &me, Utc::now(), T, S).is_alive());
        // ...but the same pid in another namespace tells us nothing: alive until it expires.
        let l = lease(other_ns.clone(), u32::MAX - 7, None, 1);
        assert!(judge(&l, &me, Utc::now(), T, S).is_alive());
        // Same kernel: no skew margin.
        let l = lease(other_ns, u32::MAX - 7, None, 900);
        assert!(!judge(&l, &me, Utc::now(), T, S).is_alive());
    }

    #[test]
    fn other_machines_get_the_skew_margin() {
        let me = HostIdentity::current().clone();
        let other = HostIdentity {
            machine: HostId::random(),
            boot: "elsewhere".into(),
            pid_ns: me.pid_ns,
            name: me.name.clone(),
        };
        let l = lease(other.clone(), 1, None, 900 + 299);
        assert!(judge(&l, &me, Utc::now(), T, S).is_alive());
        let l = lease(other, 1, None, 900 + 301);
        assert!(!judge(&l, &me, Utc::now(), T, S).is_alive());
    }

    #[test]
    fn a_reused_pid_is_not_the_holder() {
        let me = HostIdentity::current().clone();
        let pid = std::process::id();
        let start = super::super::identity::process_start(pid).unwrap();
        let l = lease(me.clone(), pid, Some(start), 1);
        assert!(judge(&l, &me, Utc::now(), T, S).is_alive());
        let l = lease(me.clone(), pid, Some(start + 5), 1);
        assert!(!judge(&l, &me, Utc::now(), T, S).is_alive());
    }

    #[test]
    fn unreadable_leases_wait_for_timeout_and_skew() {
        let me = HostIdentity::current();
        let mut l = lease(me.clone(), 1, None, 1000);
        l.record = None;
        assert!(judge(&l, me, Utc::now(), T, S).is_alive());
        l.modified = Utc::now() - chrono::Duration::seconds(1201);
        assert!(!judge(&l, me, Utc::now(), T, S).is_alive());
    }
}
