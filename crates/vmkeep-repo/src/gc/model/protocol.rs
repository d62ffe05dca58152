//! The lease / GC / forget / backup protocol of FORMAT.md §13 as a state machine, for the
//! explorer in [`super::explore`]. Each process step is one store operation (atomic and
//! linearizable: put, delete, list-and-read), in the order the real code issues them:
//! `backup/commit.rs`, `gc/`, `forget.rs`, `lease/`. When one of those changes, this changes.
//!
//! The world: blobs 1..=4 (0 is ZERO, never stored); packs (id, blobs, exists, indexed);
//! manifests (vm, two chunk positions, parent, change map, time); leases (created, refreshed,
//! in the writer's clock); GC records (condemned packs, the leases they wait for). Time is a
//! global tick; each host's clock is the tick plus its skew. A lease is dead for a judge when
//! `judge clock - refreshed >= TIMEOUT + margin` (margin = the skew allowance between hosts,
//! 0 on the same machine), or, on the same machine and PID namespace, when its holder process
//! is gone. Processes may crash (stop for good, leaving their lease) and stall (stop taking
//! steps and refreshing while time passes, then resume), and the store ignores nothing we rely
//! on: the protocol uses no conditional writes at all.
//!
//! Modelling assumptions (each is a rule the real code follows):
//! - a process checks its own lease (CLOCK_BOOTTIME since the last refresh) before each step,
//!   and the check and the step's store call happen without a stall between them;
//! - list-then-read of manifests is atomic: manifests change only under the exclusive
//!   maintenance lease (forget) or appear (backups), and a reader skips one deleted meanwhile.
use std::collections::BTreeMap;

use super::explore::Model;

pub const TIMEOUT: i8 = 2;
const POS: usize = 2;
/// Change map "null": every position counts as changed.
const ALL: u8 = 0xff;

/// Re-introduce the defects of the original protocol, one switch each, to show the checker
/// finds them.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct Variant {
    /// Defect 1: the sweep decides with the mark taken before the lease listing.
    pub stale_mark: bool,
    /// Defect 3: a record blocks on leases created before its time (taken before its put),
    /// with no margin on the same host, instead of on the leases listed after it landed.
    pub record_time_rule: bool,
    /// Defect 2: "lease lost" is not sticky: a refresh after a stall resets it.
    pub non_sticky_lost: bool,
    /// Defect 4: leases of the same hostname are judged by the local process table.
    pub hostname_identity: bool,
    /// A prune steps back only for a lease with a smaller (created, name).
    pub ordered_exclusion: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct Host {
    /// Clock offset in ticks.
    pub skew: i8,
    /// Machine (boot): same machine = same clock.
    pub machine: u8,
    /// Host name as `gethostname` says (containers share it).
    pub hostname: u8,
}

#[derive(Clone, Debug)]
pub struct BackupSpec {
    pub host: usize,
    pub vm: u8,
    pub content: [u8; POS],
}

#[derive(Clone, Debug)]
pub struct PruneSpec {
    pub host: usize,
    /// The restore point its retention forgets.
    pub forget: Option<u8>,
    pub repack: bool,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub hosts: Vec<Host>,
    pub backups: Vec<BackupSpec>,
    pub prunes: Vec<PruneSpec>,
    pub skew_allowance: i8,
    pub max_time: i8,
    pub crashes: bool,
    pub stalls: bool,
    pub variant: Variant,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Pack {
    blobs: u8,
    exists: bool,
    indexed: bool,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Manifest {
    vm: u8,
    content: [u8; POS],
    parent: Option<u8>,
    changes: u8,
    time: i8,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Lease {
    created: i8,
    refreshed: i8,
    maintenance: bool,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Record {
    condemned: u16,
    /// Leases listed after the record landed (None until sealed).
    waiting: Option<u8>,
    /// The prune's clock when it built the record (used only by `record_time_rule`).
    created: i8,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Status {
    Running,
    Stalled,
    Crashed,
    Done,
    /// Failed or stepped back (a backup whose reused data is gone, a prune that lost its
    /// lease or met another prune).
    Failed,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Pc {
    // Backup.
    BLease,
    BGc,
    BIndex,
    BDecide,
    BPack,
    BPackIndex,
    BCheckParent,
    BManifest,
    BRecheck,
    BUnlease,
    BRefresh,
    BRecoverGc,
    BVerify,
    // Prune.
    PLease,
    PExclusive,
    PStale,
    FList,
    FMerge,
    FDelete,
    FRelist,
    FFix,
    GRecords,
    GSealList,
    GSealPut,
    GMark,
    GCondemn,
    GRepackPack,
    GRepackIndex,
    GRecord,
    GWaitList,
    GSealNew,
    GSweepList,
    GMarkAgain,
    GDelete,
    GIndex,
    GDeleteRecords,
    PUnlease,
    End,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Proc {
    pc: Pc,
    status: Status,
    /// Tick of the last lease write that succeeded (CLOCK_BOOTTIME).
    t0: i8,
    lost: bool,
    stalled_once: bool,
    lease_created: i8,
    /// Backup: packs condemned by the records it read; prune: records it read.
    seen: u16,
    usable: u8,
    parent: Option<(u8, [u8; POS])>,
    writes: u8,
    referenced: u8,
    condemn: u16,
    repack: Option<(u8, u8)>,
    record_time: i8,
    waiting: u8,
    todo: u16,
    deleted: u16,
    exclusive: bool,
    /// Non-sticky variant: verified once after a stall, then commits without looking again.
    verified: bool,
    snapshot: BTreeMap<u8, Manifest>,
    target: Option<Manifest>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct State {
    now: i8,
    packs: Vec<Pack>,
    manifests: BTreeMap<u8, Manifest>,
    leases: BTreeMap<u8, Lease>,
    records: BTreeMap<u8, Record>,
    procs: Vec<Proc>,
}

#[derive(Clone, Copy, Debug)]
pub enum Action {
    Step(usize),
    /// The process stops (SIGSTOP, a suspended machine) and its lease refresh with it.
    Stall(usize),
    Resume(usize),
    Crash(usize),
    Tick,
}

pub struct Protocol {
    pub cfg: Config,
}

const PACK_OF_BACKUP: u8 = 1;
const PACK_OF_PRUNE: u8 = 4;
const LEASE_OF_PRUNE: u8 = 4;

fn bit(i: u8) -> u16 {
    1 << i
}

fn blobs_of(content: &[u8; POS]) -> u8 {
    content
        .iter()
        .filter(|&&b| b != 0)
        .fold(0, |acc, &b| acc | (1 << b))
}

fn diff(a: &[u8; POS], b: &[u8; POS]) -> u8 {
    (0..POS)
        .filter(|&i| a[i] != b[i])
        .fold(0, |m, i| m | 1 << i)
}

impl Protocol {
    fn nb(&self) -> usize {
        self.cfg.backups.len()
    }
    fn is_backup(&self, p: usize) -> bool {
        p < self.nb()
    }
    fn host_of(&self, p: usize) -> &Host {
        let h = if self.is_backup(p) {
            self.cfg.backups[p].host
        } else {
            self.cfg.prunes[p - self.nb()].host
        };
        &self.cfg.hosts[h]
    }
    fn host_index(&self, p: usize) -> usize {
        if self.is_backup(p) {
            self.cfg.backups[p].host
        } else {
            self.cfg.prunes[p - self.nb()].host
        }
    }
    fn lease_name(&self, p: usize) -> u8 {
        if self.is_backup(p) {
            p as u8
        } else {
            LEASE_OF_PRUNE + (p - self.nb()) as u8
        }
    }
    fn holder(&self, lease: u8) -> usize {
        if lease < LEASE_OF_PRUNE {
            lease as usize
        } else {
            self.nb() + (lease - LEASE_OF_PRUNE) as usize
        }
    }
    fn clock(&self, s: &State, p: usize) -> i8 {
        s.now + self.host_of(p).skew
    }

    /// Whether process `judge` considers lease `name` alive.
    fn alive(&self, s: &State, judge: usize, name: u8) -> bool {
        let Some(l) = s.leases.get(&name) else {
            return false;
        };
        let holder = self.holder(name);
        let (hj, hh) = (self.host_index(judge), self.host_index(holder));
        let same_identity = hj == hh;
        let gone = matches!(
            s.procs[holder].status,
            Status::Crashed | Status::Done | Status::Failed
        );
        if same_identity && gone {
            return false; // its pid no longer exists
        }
        let (a, b) = (self.host_of(judge), self.host_of(holder));
        if self.cfg.variant.hostname_identity && !same_identity && a.hostname == b.hostname {
            return false; // the old code looked for the pid in its own namespace: not found
        }
        let margin = if a.machine == b.machine {
            0
        } else {
            self.cfg.skew_allowance
        };
        self.clock(s, judge) - l.refreshed < TIMEOUT + margin
    }

    fn alive_others(&self, s: &State, judge: usize) -> u8 {
        let mine = self.lease_name(judge);
        s.leases
            .keys()
            .filter(|&&n| n != mine && self.alive(s, judge, n))
            .fold(0, |m, &n| m | 1 << n)
    }

    fn condemned_by_records(s: &State) -> u16 {
        s.records.values().fold(0, |m, r| m | r.condemned)
    }

    /// Packs where a reader finds blob `b`: existing and indexed.
    fn holders(s: &State, b: u8) -> u16 {
        s.packs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.exists && p.indexed && p.blobs & (1 << b) != 0)
            .fold(0, |m, (i, _)| m | bit(i as u8))
    }

    fn latest(s: &State, vm: u8, except: Option<u8>) -> Option<(u8, Manifest)> {
        s.manifests
            .iter()
            .filter(|(id, m)| m.vm == vm && Some(**id) != except)
            .max_by_key(|(id, m)| (m.time, **id))
            .map(|(id, m)| (*id, *m))
    }

    /// One step of backup `p` (its process state is worked on as a copy, then stored back).
    fn backup_step(&self, s: &mut State, p: usize) {
        let mut pr = s.procs[p].clone();
        self.backup_step_on(s, p, &mut pr);
        tidy(&mut pr);
        s.procs[p] = pr;
    }

    fn backup_step_on(&self, s: &mut State, p: usize, pr: &mut Proc) {
        let spec = &self.cfg.backups[p];
        let name = self.lease_name(p);
        let now = s.now;
        let clock = self.clock(s, p);
        let my_manifest = PACK_OF_BACKUP + p as u8;
        let my_pack = (PACK_OF_BACKUP + p as u8) as usize;
        match pr.pc {
            Pc::BLease => {
                s.leases.insert(
                    name,
                    Lease {
                        created: clock,
                        refreshed: clock,
                        maintenance: false,
                    },
                );
                pr.lease_created = clock;
                pr.t0 = now;
                pr.pc = Pc::BGc;
            }
            Pc::BGc => {
                pr.seen = Self::condemned_by_records(s);
                pr.pc = Pc::BIndex;
            }
            Pc::BIndex => {
                let seen = pr.seen;
                let mut usable = 0u8;
                for b in 1..=4u8 {
                    if Self::holders(s, b) & !seen != 0 {
                        usable |= 1 << b;
                    }
                }
                let parent =
                    Self::latest(s, spec.vm, Some(my_manifest)).map(|(i, m)| (i, m.content));
                pr.usable = usable;
                pr.parent = parent;
                pr.pc = Pc::BDecide;
            }
            Pc::BDecide => {
                pr.writes = blobs_of(&spec.content) & !pr.usable;
                pr.pc = if pr.writes != 0 {
                    Pc::BPack
                } else {
                    Pc::BCheckParent
                };
            }
            Pc::BPack => {
                s.packs[my_pack] = Pack {
                    blobs: pr.writes,
                    exists: true,
                    indexed: false,
                };
                pr.pc = Pc::BPackIndex;
            }
            Pc::BPackIndex => {
                s.packs[my_pack].indexed = true;
                pr.pc = Pc::BCheckParent;
            }
            Pc::BCheckParent => {
                if let Some((pid, _)) = pr.parent {
                    if !s.manifests.contains_key(&pid) {
                        let relinked = Self::latest(s, spec.vm, Some(my_manifest))
                            .map(|(i, m)| (i, m.content));
                        pr.parent = relinked;
                    }
                }
                pr.pc = Pc::BManifest;
            }
            Pc::BManifest => {
                let expired = now - pr.t0 >= TIMEOUT;
                if pr.lost || (self.cfg.variant.non_sticky_lost && expired && !pr.verified) {
                    pr.pc = Pc::BRefresh;
                    return;
                }
                let m = self.manifest_of(spec, pr.parent, now);
                s.manifests.insert(my_manifest, m);
                pr.pc = Pc::BRecheck;
            }
            Pc::BRecheck => {
                let dangling = pr
                    .parent
                    .is_some_and(|(pid, _)| !s.manifests.contains_key(&pid));
                if dangling {
                    let relinked =
                        Self::latest(s, spec.vm, Some(my_manifest)).map(|(i, m)| (i, m.content));
                    let m = self.manifest_of(spec, relinked, s.manifests[&my_manifest].time);
                    s.manifests.insert(my_manifest, m);
                    pr.parent = relinked;
                } else {
                    pr.pc = Pc::BUnlease;
                }
            }
            Pc::BUnlease => {
                s.leases.remove(&name);
                pr.pc = Pc::End;
                pr.status = Status::Done;
            }
            Pc::BRefresh => {
                if !self.cfg.variant.non_sticky_lost {
                    s.leases.insert(
                        name,
                        Lease {
                            created: pr.lease_created,
                            refreshed: clock,
                            maintenance: false,
                        },
                    );
                    pr.t0 = now;
                }
                pr.pc = Pc::BRecoverGc;
            }
            Pc::BRecoverGc => {
                pr.seen = Self::condemned_by_records(s);
                pr.pc = Pc::BVerify;
            }
            Pc::BVerify => {
                let seen = pr.seen;
                let ok = (1..=4u8)
                    .filter(|b| blobs_of(&spec.content) & (1 << b) != 0)
                    .all(|b| Self::holders(s, b) & !seen != 0);
                if !ok {
                    s.leases.remove(&name);
                    pr.status = Status::Failed;
                    pr.pc = Pc::End;
                } else if !self.cfg.variant.non_sticky_lost && now - pr.t0 >= TIMEOUT {
                    pr.pc = Pc::BRefresh; // stalled again during the recovery: again
                } else {
                    pr.lost = false;
                    pr.verified = true;
                    pr.pc = Pc::BManifest;
                }
            }
            _ => unreachable!("not a backup step"),
        }
    }

    fn manifest_of(
        &self,
        spec: &BackupSpec,
        parent: Option<(u8, [u8; POS])>,
        time: i8,
    ) -> Manifest {
        Manifest {
            vm: spec.vm,
            content: spec.content,
            parent: parent.map(|(i, _)| i),
            changes: parent.map_or(ALL, |(_, c)| diff(&c, &spec.content)),
            time,
        }
    }

    /// Steps that change the repository: a prune whose lease may have expired stops before
    /// each of them.
    fn destructive(pc: Pc) -> bool {
        matches!(
            pc,
            Pc::FMerge
                | Pc::FDelete
                | Pc::FFix
                | Pc::GSealPut
                | Pc::GRepackPack
                | Pc::GRepackIndex
                | Pc::GRecord
                | Pc::GSealNew
                | Pc::GDelete
                | Pc::GIndex
                | Pc::GDeleteRecords
        )
    }

    /// One step of prune `p` (its process state is worked on as a copy, then stored back).
    fn prune_step(&self, s: &mut State, p: usize) {
        let mut pr = s.procs[p].clone();
        self.prune_step_on(s, p, &mut pr);
        tidy(&mut pr);
        s.procs[p] = pr;
    }

    fn prune_step_on(&self, s: &mut State, p: usize, pr: &mut Proc) {
        let j = p - self.nb();
        let spec = &self.cfg.prunes[j];
        let v = self.cfg.variant;
        let name = self.lease_name(p);
        let now = s.now;
        let clock = self.clock(s, p);
        let my_record = j as u8;
        let my_pack = PACK_OF_PRUNE + j as u8;
        if pr.lost && Self::destructive(pr.pc) {
            s.leases.remove(&name);
            pr.status = Status::Failed;
            pr.pc = Pc::End;
            return;
        }
        match pr.pc {
            Pc::PLease => {
                s.leases.insert(
                    name,
                    Lease {
                        created: clock,
                        refreshed: clock,
                        maintenance: true,
                    },
                );
                pr.lease_created = clock;
                pr.t0 = now;
                pr.pc = Pc::PExclusive;
            }
            Pc::PExclusive => {
                let mine = (pr.lease_created, name);
                let blocked = s.leases.iter().any(|(&n, l)| {
                    n != name
                        && l.maintenance
                        && self.alive(s, p, n)
                        && (!v.ordered_exclusion || (l.created, n) < mine)
                });
                if blocked {
                    s.leases.remove(&name);
                    pr.status = Status::Failed;
                    pr.pc = Pc::End;
                } else {
                    pr.exclusive = true;
                    pr.pc = Pc::PStale;
                }
            }
            Pc::PStale => {
                let dead: Vec<u8> = s
                    .leases
                    .keys()
                    .copied()
                    .filter(|&n| n != name && !self.alive(s, p, n))
                    .collect();
                for n in dead {
                    s.leases.remove(&n);
                }
                pr.pc = if spec.forget.is_some() {
                    Pc::FList
                } else {
                    Pc::FRelist
                };
            }
            Pc::FList => {
                let target = spec.forget.expect("forget phase");
                let snapshot = s.manifests.clone();
                pr.target = snapshot.get(&target).copied();
                pr.todo = snapshot
                    .iter()
                    .filter(|(_, m)| m.parent == Some(target))
                    .fold(0, |a, (i, _)| a | bit(*i));
                pr.snapshot = snapshot;
                pr.pc = if pr.target.is_some() {
                    Pc::FMerge
                } else {
                    Pc::FRelist
                };
            }
            Pc::FMerge => {
                if pr.todo == 0 {
                    pr.pc = Pc::FDelete;
                    return;
                }
                let i = pr.todo.trailing_zeros() as u8;
                pr.todo &= !bit(i);
                let merged = merge(&pr.target.expect("target"), &pr.snapshot[&i]);
                s.manifests.insert(i, merged);
            }
            Pc::FDelete => {
                s.manifests.remove(&spec.forget.expect("forget phase"));
                pr.pc = Pc::FRelist;
            }
            Pc::FRelist => {
                // Also at every run's start: heals points a crashed forget left dangling.
                let snapshot = s.manifests.clone();
                pr.todo = snapshot
                    .iter()
                    .filter(|(_, m)| m.parent.is_some_and(|q| !snapshot.contains_key(&q)))
                    .fold(0, |a, (i, _)| a | bit(*i));
                pr.snapshot = snapshot;
                pr.pc = Pc::FFix;
            }
            Pc::FFix => {
                if pr.todo == 0 {
                    pr.pc = Pc::GRecords;
                    return;
                }
                let i = pr.todo.trailing_zeros() as u8;
                pr.todo &= !bit(i);
                let m = pr.snapshot[&i];
                let fixed = match pr.target {
                    Some(t) if m.parent == spec.forget => merge(&t, &m),
                    _ => {
                        // Unknown parent content: relink to the newest older point, exact diff.
                        let base = pr
                            .snapshot
                            .iter()
                            .filter(|(id, o)| **id != i && o.vm == m.vm && o.time <= m.time)
                            .max_by_key(|(id, o)| (o.time, **id))
                            .map(|(id, o)| (*id, o.content));
                        Manifest {
                            parent: base.map(|(id, _)| id),
                            changes: base.map_or(ALL, |(_, c)| diff(&c, &m.content)),
                            ..m
                        }
                    }
                };
                s.manifests.insert(i, fixed);
            }
            Pc::GRecords => {
                pr.todo = s
                    .records
                    .iter()
                    .filter(|(_, r)| r.waiting.is_none())
                    .fold(0, |a, (i, _)| a | bit(*i));
                pr.pc = if pr.todo != 0 && !v.record_time_rule {
                    Pc::GSealList
                } else {
                    Pc::GMark
                };
            }
            Pc::GSealList => {
                let w = self.alive_others(s, p);
                pr.waiting = w;
                pr.pc = Pc::GSealPut;
            }
            Pc::GSealPut => {
                let r = pr.todo.trailing_zeros() as u8;
                pr.todo &= !bit(r);
                let w = pr.waiting;
                pr.pc = if pr.todo != 0 {
                    Pc::GSealList
                } else {
                    Pc::GMark
                };
                if let Some(rec) = s.records.get_mut(&r) {
                    rec.waiting = Some(w);
                }
            }
            Pc::GMark => {
                let referenced = s
                    .manifests
                    .values()
                    .fold(0, |a, m| a | blobs_of(&m.content));
                pr.referenced = referenced;
                pr.pc = Pc::GCondemn;
            }
            Pc::GCondemn => {
                let pending = Self::condemned_by_records(s);
                let referenced = pr.referenced;
                // Home of each referenced blob: the first indexed, uncondemned pack holding it.
                let mut home: [Option<u8>; 5] = [None; 5];
                for b in 1..=4u8 {
                    if referenced & (1 << b) != 0 {
                        let h = Self::holders(s, b) & !pending;
                        if h != 0 {
                            home[b as usize] = Some(h.trailing_zeros() as u8);
                        }
                    }
                }
                let homed = |pack: u8| -> u8 {
                    (1..=4u8)
                        .filter(|&b| home[b as usize] == Some(pack))
                        .fold(0, |a, b| a | 1 << b)
                };
                let mut condemn = 0u16;
                let mut repack = None;
                for (i, pk) in s.packs.iter().enumerate() {
                    let i = i as u8;
                    if !pk.exists || pending & bit(i) != 0 {
                        continue;
                    }
                    let live = homed(i);
                    if live == 0 {
                        condemn |= bit(i);
                    } else if spec.repack && live != pk.blobs && repack.is_none() {
                        repack = Some((i, live));
                    }
                }
                pr.condemn = condemn;
                pr.repack = repack;
                pr.record_time = clock;
                pr.pc = if repack.is_some() {
                    Pc::GRepackPack
                } else {
                    Pc::GRecord
                };
            }
            Pc::GRepackPack => {
                let (_, live) = pr.repack.expect("repack");
                s.packs[my_pack as usize] = Pack {
                    blobs: live,
                    exists: true,
                    indexed: false,
                };
                pr.pc = Pc::GRepackIndex;
            }
            Pc::GRepackIndex => {
                s.packs[my_pack as usize].indexed = true;
                let (old, _) = pr.repack.expect("repack");
                pr.condemn |= bit(old);
                pr.pc = Pc::GRecord;
            }
            Pc::GRecord => {
                if pr.condemn != 0 {
                    s.records.insert(
                        my_record,
                        Record {
                            condemned: pr.condemn,
                            waiting: None,
                            created: pr.record_time,
                        },
                    );
                    pr.pc = if v.record_time_rule {
                        Pc::GSweepList
                    } else {
                        Pc::GWaitList
                    };
                } else {
                    pr.pc = Pc::GSweepList;
                }
            }
            Pc::GWaitList => {
                let w = self.alive_others(s, p);
                pr.waiting = w;
                pr.pc = Pc::GSealNew;
            }
            Pc::GSealNew => {
                let w = pr.waiting;
                if let Some(rec) = s.records.get_mut(&my_record) {
                    rec.waiting = Some(w);
                }
                pr.pc = Pc::GSweepList;
            }
            Pc::GSweepList => {
                let alive = self.alive_others(s, p);
                let mut sweep = 0u16;
                for (&r, rec) in &s.records {
                    let ok = if v.record_time_rule {
                        !s.leases.iter().any(|(&n, l)| {
                            if alive & (1 << n) == 0 {
                                return false;
                            }
                            let other =
                                self.host_of(self.holder(n)).machine != self.host_of(p).machine;
                            let margin = if other { self.cfg.skew_allowance } else { 0 };
                            l.created <= rec.created + margin
                        })
                    } else {
                        rec.waiting.is_some_and(|w| w & alive == 0)
                    };
                    if ok {
                        sweep |= bit(r);
                    }
                }
                pr.seen = sweep;
                pr.pc = Pc::GMarkAgain;
            }
            Pc::GMarkAgain => {
                let fresh = s
                    .manifests
                    .values()
                    .fold(0, |a, m| a | blobs_of(&m.content));
                let to_delete = s
                    .records
                    .iter()
                    .filter(|(r, _)| pr.seen & bit(**r) != 0)
                    .fold(0, |a, (_, rec)| a | rec.condemned);
                if !v.stale_mark {
                    pr.referenced = fresh;
                }
                pr.todo = to_delete;
                pr.deleted = 0;
                pr.pc = Pc::GDelete;
            }
            Pc::GDelete => {
                if pr.todo == 0 {
                    pr.pc = Pc::GIndex;
                    return;
                }
                let pk = pr.todo.trailing_zeros() as u8;
                let pending = Self::condemned_by_records(s);
                let needed = (1..=4u8).any(|b| {
                    pr.referenced & (1 << b) != 0
                        && s.packs[pk as usize].blobs & (1 << b) != 0
                        && Self::holders(s, b) & !pending & !pr.deleted & !bit(pk) == 0
                });
                if !needed {
                    s.packs[pk as usize].exists = false;
                }
                pr.todo &= !bit(pk);
                if !needed {
                    pr.deleted |= bit(pk);
                }
            }
            Pc::GIndex => {
                let swept = pr.seen;
                for (r, rec) in s.records.iter() {
                    if swept & bit(*r) == 0 {
                        continue;
                    }
                    for (i, pk) in s.packs.iter_mut().enumerate() {
                        if rec.condemned & bit(i as u8) != 0 && !pk.exists {
                            pk.indexed = false;
                        }
                    }
                }
                pr.pc = Pc::GDeleteRecords;
            }
            Pc::GDeleteRecords => {
                let swept = pr.seen;
                s.records.retain(|r, _| swept & bit(*r) == 0);
                pr.pc = Pc::PUnlease;
            }
            Pc::PUnlease => {
                s.leases.remove(&name);
                pr.status = Status::Done;
                pr.pc = Pc::End;
            }
            _ => unreachable!("not a prune step"),
        }
    }

    /// A lease refresh: "lost" becomes (and stays) true if the lease had expired; the lease is
    /// written again with its original creation time (recreated if a prune removed it).
    fn refresh(&self, s: &mut State, p: usize) {
        let name = self.lease_name(p);
        let clock = self.clock(s, p);
        let now = s.now;
        let pr = &mut s.procs[p];
        if !self.cfg.variant.non_sticky_lost && now - pr.t0 >= TIMEOUT {
            pr.lost = true;
        }
        pr.t0 = now;
        s.leases.insert(
            name,
            Lease {
                created: pr.lease_created,
                refreshed: clock,
                maintenance: !self.is_backup(p),
            },
        );
    }

    fn holds_lease(pc: Pc) -> bool {
        !matches!(pc, Pc::BLease | Pc::PLease | Pc::End)
    }
}

/// Forget what a process no longer needs at its current step, so that states differing only in
/// dead values are one state (this is what keeps the exploration small).
fn tidy(pr: &mut Proc) {
    use Pc::*;
    let pc = pr.pc;
    if !matches!(
        pc,
        BIndex | BVerify | GMarkAgain | GDelete | GIndex | GDeleteRecords
    ) {
        pr.seen = 0;
    }
    if pc != BDecide {
        pr.usable = 0;
    }
    if pc != BPack {
        pr.writes = 0;
    }
    if !matches!(
        pc,
        BDecide
            | BPack
            | BPackIndex
            | BCheckParent
            | BManifest
            | BRecheck
            | BRefresh
            | BRecoverGc
            | BVerify
    ) {
        pr.parent = None;
    }
    if !matches!(
        pc,
        GCondemn
            | GRepackPack
            | GRepackIndex
            | GRecord
            | GWaitList
            | GSealNew
            | GSweepList
            | GMarkAgain
            | GDelete
    ) {
        pr.referenced = 0;
    }
    if !matches!(pc, GRepackPack | GRepackIndex | GRecord) {
        pr.condemn = 0;
        pr.record_time = 0;
    }
    if !matches!(pc, GRepackPack | GRepackIndex) {
        pr.repack = None;
    }
    if !matches!(pc, GSealPut | GSealNew) {
        pr.waiting = 0;
    }
    if !matches!(pc, FMerge | FFix | GSealList | GSealPut | GDelete) {
        pr.todo = 0;
    }
    if pc != GDelete {
        pr.deleted = 0;
    }
    if !matches!(pc, FMerge | FFix) {
        pr.snapshot.clear();
    }
    if !matches!(pc, FMerge | FDelete | FRelist | FFix) {
        pr.target = None;
    }
    if pc == End {
        pr.t0 = 0;
        pr.lost = false;
        pr.lease_created = 0;
        pr.verified = false;
        pr.stalled_once = false;
    }
}

/// Forget `gone`, whose successor is `succ`: the successor takes its parent and the union of
/// both change maps.
fn merge(gone: &Manifest, succ: &Manifest) -> Manifest {
    Manifest {
        parent: gone.parent,
        changes: if gone.changes == ALL || succ.changes == ALL {
            ALL
        } else {
            gone.changes | succ.changes
        },
        ..*succ
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init(&self) -> State {
        let mut packs = vec![
            Pack {
                blobs: 0,
                exists: false,
                indexed: false,
            };
            8
        ];
        packs[0] = Pack {
            blobs: (1 << 1) | (1 << 2),
            exists: true,
            indexed: true,
        };
        let mut manifests = BTreeMap::new();
        manifests.insert(
            0,
            Manifest {
                vm: 0,
                content: [1, 2],
                parent: None,
                changes: ALL,
                time: 0,
            },
        );
        let proc0 = |pc| Proc {
            pc,
            status: Status::Running,
            t0: 0,
            lost: false,
            stalled_once: false,
            lease_created: 0,
            seen: 0,
            usable: 0,
            parent: None,
            writes: 0,
            referenced: 0,
            condemn: 0,
            repack: None,
            record_time: 0,
            waiting: 0,
            todo: 0,
            deleted: 0,
            exclusive: false,
            verified: false,
            snapshot: BTreeMap::new(),
            target: None,
        };
        let mut procs: Vec<Proc> = self.cfg.backups.iter().map(|_| proc0(Pc::BLease)).collect();
        procs.extend(self.cfg.prunes.iter().map(|_| proc0(Pc::PLease)));
        State {
            now: 0,
            packs,
            manifests,
            leases: BTreeMap::new(),
            records: BTreeMap::new(),
            procs,
        }
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        let mut any_running = false;
        for (p, pr) in s.procs.iter().enumerate() {
            match pr.status {
                Status::Running => {
                    any_running = true;
                    out.push(Action::Step(p));
                    if self.cfg.stalls && !pr.stalled_once && Self::holds_lease(pr.pc) {
                        out.push(Action::Stall(p));
                    }
                    if self.cfg.crashes {
                        out.push(Action::Crash(p));
                    }
                }
                Status::Stalled => {
                    any_running = true;
                    // A stall shorter than the lease timeout is just a slow step, which the
                    // interleavings already cover: resume only once the lease expired.
                    if s.now - pr.t0 >= TIMEOUT {
                        out.push(Action::Resume(p));
                    }
                }
                _ => {}
            }
        }
        if any_running && s.now < self.cfg.max_time {
            out.push(Action::Tick);
        }
    }

    fn next(&self, s: &State, a: &Action) -> State {
        let mut s = s.clone();
        match *a {
            Action::Tick => {
                // The refresh thread of every running process rewrites its lease each tick
                // (its period is well under the timeout).
                s.now += 1;
                for p in 0..s.procs.len() {
                    if s.procs[p].status == Status::Running && Self::holds_lease(s.procs[p].pc) {
                        self.refresh(&mut s, p);
                    }
                }
            }
            Action::Stall(p) => {
                s.procs[p].status = Status::Stalled;
                s.procs[p].stalled_once = true;
            }
            Action::Resume(p) => {
                // The refresh thread wakes first (the worst case for the holder): it finds the
                // lease expired and rewrites it.
                s.procs[p].status = Status::Running;
                self.refresh(&mut s, p);
            }
            Action::Crash(p) => s.procs[p].status = Status::Crashed,
            Action::Step(p) => {
                let now = s.now;
                let pr = &mut s.procs[p];
                if !self.cfg.variant.non_sticky_lost
                    && Self::holds_lease(pr.pc)
                    && now - pr.t0 >= TIMEOUT
                {
                    pr.lost = true;
                }
                if self.is_backup(p) {
                    self.backup_step(&mut s, p);
                } else {
                    self.prune_step(&mut s, p);
                }
            }
        }
        s
    }

    fn invariant(&self, s: &State) -> Result<(), String> {
        for (id, m) in &s.manifests {
            for &b in &m.content {
                if b != 0 && Self::holders(s, b) == 0 {
                    return Err(format!(
                        "restore point m{id} references blob {b}, which is in no existing indexed pack"
                    ));
                }
            }
        }
        let live: Vec<usize> = (self.nb()..s.procs.len())
            .filter(|&p| {
                let pr = &s.procs[p];
                pr.exclusive
                    && matches!(pr.status, Status::Running | Status::Stalled)
                    && !pr.lost
                    && s.now - pr.t0 < TIMEOUT
            })
            .collect();
        if live.len() > 1 {
            return Err(format!(
                "prunes {live:?} hold the maintenance lease at once"
            ));
        }
        Ok(())
    }

    fn terminal(&self, s: &State) -> Result<(), String> {
        let clean = s.procs.iter().all(|p| {
            matches!(p.status, Status::Done)
                || (p.status == Status::Failed && !p.exclusive && p.pc == Pc::End)
        });
        for (id, m) in &s.manifests {
            match m.parent {
                None => {
                    if m.changes != ALL {
                        return Err(format!("m{id} has no parent but a partial change map"));
                    }
                }
                Some(q) => match s.manifests.get(&q) {
                    None if clean => {
                        return Err(format!("m{id} names parent m{q}, which is gone"));
                    }
                    None => {}
                    Some(parent) => {
                        let d = diff(&parent.content, &m.content);
                        if m.changes != ALL && d & !m.changes != 0 {
                            return Err(format!(
                                "m{id}'s change map {:#b} misses positions {:#b} that differ from m{q}",
                                m.changes, d
                            ));
                        }
                    }
                },
            }
        }
        Ok(())
    }
}
