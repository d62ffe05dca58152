//! Every live entry of the cached blob index in blob-id order, all copies of an id together:
//! what `check` and `prune` read instead of holding the whole index in memory. Each run is read
//! bucket by bucket (every bucket verified against its checksum, as a lookup does), and the
//! runs are merged; memory is one bucket per run.
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use vmkeep_core::{BlobId, PackId};

use super::run::{Run, RunEntry, ENTRY_LEN};
use super::table::Table;
use crate::error::{Error, Result};
use crate::index::Location;

/// Reads one run's live entries in order.
struct Cursor<'t> {
    run: &'t Run,
    live: &'t [bool],
    next_bucket: usize,
    buf: Vec<u8>,
    at: usize,
}

impl Cursor<'_> {
    /// The next live entry, or None at the end.
    fn next(&mut self) -> Result<Option<RunEntry>> {
        loop {
            if self.at < self.buf.len() {
                let e = self.run.entry(&self.buf[self.at..self.at + ENTRY_LEN])?;
                self.at += ENTRY_LEN;
                if self.live[e.source as usize] {
                    return Ok(Some(e));
                }
                continue;
            }
            if self.next_bucket >= self.run.buckets() {
                return Ok(None);
            }
            self.buf = self.run.bucket(self.next_bucket)?;
            self.next_bucket += 1;
            self.at = 0;
        }
    }
}

/// The groups of a table: each blob id with all its live locations, ids ascending.
pub(crate) struct Groups<'t> {
    cursors: Vec<Cursor<'t>>,
    /// (id, cursor) of each cursor's current entry, smallest id first.
    heads: BinaryHeap<Reverse<(BlobId, usize)>>,
    current: Vec<Option<RunEntry>>,
    group: Vec<Location>,
    last: Option<BlobId>,
}

impl<'t> Groups<'t> {
    pub fn new(table: &'t Table) -> Result<Groups<'t>> {
        let mut g = Groups {
            cursors: table
                .runs
                .iter()
                .map(|(run, live)| Cursor {
                    run,
                    live,
                    next_bucket: 0,
                    buf: Vec::new(),
                    at: 0,
                })
                .collect(),
            heads: BinaryHeap::new(),
            current: Vec::new(),
            group: Vec::new(),
            last: None,
        };
        g.current = vec![None; g.cursors.len()];
        for i in 0..g.cursors.len() {
            g.advance(i)?;
        }
        Ok(g)
    }

    fn advance(&mut self, i: usize) -> Result<()> {
        let e = self.cursors[i].next()?;
        if let Some(e) = &e {
            self.heads.push(Reverse((e.id, i)));
        }
        self.current[i] = e;
        Ok(())
    }

    /// The next id (its locations then in [`Groups::copies`]), or None at the end.
    pub fn next_group(&mut self) -> Result<Option<BlobId>> {
        let Some(Reverse((id, _))) = self.heads.peek().copied() else {
            return Ok(None);
        };
        if self.last.is_some_and(|l| l >= id) {
            // Runs are sorted when written; one that is not was damaged after its checksum.
            return Err(Error::CacheDamaged {
                path: self.cursors[0].run.path.clone(),
                reason: "entries out of order".into(),
            });
        }
        self.last = Some(id);
        self.group.clear();
        while let Some(Reverse((head, i))) = self.heads.peek().copied() {
            if head != id {
                break;
            }
            self.heads.pop();
            let e = self.current[i].expect("a head has a current entry");
            let loc = self.cursors[i].run.location(&e);
            if !self
                .group
                .iter()
                .any(|l| l.pack == loc.pack && l.offset == loc.offset)
            {
                self.group.push(loc);
            }
            self.advance(i)?;
        }
        Ok(Some(id))
    }

    /// The locations of the id [`Groups::next_group`] gave last, each (pack, offset) once.
    pub fn copies(&self) -> &[Location] {
        &self.group
    }
}

impl Table {
    /// The names of the listed index objects the table holds.
    pub fn live_sources(&self) -> HashSet<[u8; 32]> {
        self.runs
            .iter()
            .flat_map(|(run, live)| {
                run.sources
                    .iter()
                    .zip(live.iter())
                    .filter(|(_, l)| **l)
                    .map(|(s, _)| s.name)
            })
            .collect()
    }

    /// Every live entry, run by run (not in id order across runs).
    pub fn for_each_live(&self, mut f: impl FnMut(BlobId, Location) -> Result<()>) -> Result<()> {
        for (run, live) in &self.runs {
            run.for_each(|e| {
                if live[e.source as usize] {
                    f(e.id, run.location(&e))?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Stop using the entries of these index objects (found damaged since they were cached).
    pub fn exclude(&mut self, names: &HashSet<[u8; 32]>) {
        for (run, live) in &mut self.runs {
            for (s, l) in run.sources.iter().zip(live.iter_mut()) {
                if names.contains(&s.name) {
                    *l = false;
                }
            }
        }
    }

    /// The names of the listed index objects that hold an entry of a pack in `packs` (which
    /// a sweep must rewrite without them).
    pub fn sources_naming(&self, packs: &HashSet<PackId>) -> Result<HashSet<[u8; 32]>> {
        let mut out = HashSet::new();
        for (run, live) in &self.runs {
            let wanted: Vec<bool> = run.packs.iter().map(|p| packs.contains(p)).collect();
            if !wanted.iter().any(|w| *w) {
                continue;
            }
            run.for_each(|e| {
                if wanted[e.pack as usize] && live[e.source as usize] {
                    out.insert(run.sources[e.source as usize].name);
                }
                Ok(())
            })?;
        }
        Ok(out)
    }
}
