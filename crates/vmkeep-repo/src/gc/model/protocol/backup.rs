//! The backup's steps (`backup/mod.rs`, `backup/commit.rs`): lease, GC records, index, reuse
//! decisions, pack and index, parent check, manifest (lost lease: recovery), parent re-check.
use super::*;

impl Protocol {
    /// One step of backup `p` (its process state is worked on as a copy, then stored back).
    pub(super) fn backup_step(&self, s: &mut State, p: usize) {
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
                pr.lease_created = clock;
                self.write_lease(s, p, pr);
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
                let parent = Self::newest_parent(s, spec.vm, my_manifest);
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
                        let relinked = Self::newest_parent(s, spec.vm, my_manifest);
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
                    let relinked = Self::newest_parent(s, spec.vm, my_manifest);
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
                    self.write_lease(s, p, pr);
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
}
