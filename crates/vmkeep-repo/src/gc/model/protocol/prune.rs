//! The steps of a prune with its forget (`prune.rs`, `forget.rs`, `relink.rs`, `gc/`).
use super::*;

impl Protocol {
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
    pub(super) fn prune_step(&self, s: &mut State, p: usize) {
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
                pr.lease_created = clock;
                self.write_lease(s, p, pr);
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
}

/// Forget what a process no longer needs at its current step, so that states differing only in
/// dead values are one state (this is what keeps the exploration small).
pub(super) fn tidy(pr: &mut Proc) {
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
