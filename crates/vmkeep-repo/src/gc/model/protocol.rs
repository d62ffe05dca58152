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

mod backup;
mod prune;

use prune::tidy;

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

    /// Write process `p`'s lease (created at `pr.lease_created`, refreshed now, recreated if a
    /// prune removed it); a successful write restarts its CLOCK_BOOTTIME count.
    fn write_lease(&self, s: &mut State, p: usize, pr: &mut Proc) {
        let clock = self.clock(s, p);
        s.leases.insert(
            self.lease_name(p),
            Lease {
                created: pr.lease_created,
                refreshed: clock,
                maintenance: !self.is_backup(p),
            },
        );
        pr.t0 = s.now;
    }

    /// A refresh by the lease thread: "lost" becomes (and stays) true if the lease had
    /// expired, then the lease is written again.
    fn refresh(&self, s: &mut State, p: usize) {
        let mut pr = s.procs[p].clone();
        if !self.cfg.variant.non_sticky_lost && s.now - pr.t0 >= TIMEOUT {
            pr.lost = true;
        }
        self.write_lease(s, p, &mut pr);
        s.procs[p] = pr;
    }

    /// The newest restore point of `vm` other than `me`, with its content: a backup's parent.
    fn newest_parent(s: &State, vm: u8, me: u8) -> Option<(u8, [u8; POS])> {
        Self::latest(s, vm, Some(me)).map(|(i, m)| (i, m.content))
    }

    fn holds_lease(pc: Pc) -> bool {
        !matches!(pc, Pc::BLease | Pc::PLease | Pc::End)
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
