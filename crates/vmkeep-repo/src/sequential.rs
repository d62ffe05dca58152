//! Telling sequential readers apart when they share one disk (`mount`): an instant recovery's
//! copy reads the disk from start to end while the guest reads here and there, on the same NBD
//! connection. With a single "next expected chunk", every guest read broke the copy's run and
//! its read-ahead stopped: the copy took 6.5-10 s instead of 3.7-4.0 s (bench/instant.py,
//! 1.5 GiB of data). So a few runs are followed at once, as Linux follows each open file:
//! a read continues the run whose end is nearest to where it starts, if that is not far before
//! (readers in flight finish out of order: 16 readers of 1 MiB are 256 chunks of 64 KiB
//! apart) nor far after (a copy skips what it need not read); otherwise it starts a new run in
//! place of the one used least recently. A read behind a run's end never moves it back: read
//! ahead goes on from the end, so nothing already read is fetched again.
use std::sync::Mutex;

/// Runs followed at once.
const RUNS: usize = 4;
/// Chunks before a run's end a read may start and still continue it.
const BEHIND: u64 = 1024;

#[derive(Clone, Copy)]
struct Run {
    /// The chunk after the last one read.
    next: u64,
    /// When it was last continued (a counter).
    used: u64,
    /// When it started (the same counter): tells it from a run that took its place.
    born: u64,
}

/// A run a read continued, to ask where it ends later ([`SequentialReads::end`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunRef {
    slot: usize,
    born: u64,
}

/// The runs of sequential reads of one disk; see the module docs.
pub(crate) struct SequentialReads {
    runs: Mutex<([Option<Run>; RUNS], u64)>,
    /// Chunks after a run's end a read may start and still continue it.
    ahead: u64,
}

impl SequentialReads {
    /// `ahead`: how far past a run's end a read still continues it (the read-ahead distance).
    pub(crate) fn new(ahead: u64) -> SequentialReads {
        SequentialReads {
            runs: Mutex::new(([None; RUNS], 0)),
            ahead,
        }
    }

    /// Records a read of chunks `first..=last`. When it continues a run at or past its end,
    /// returns that run: once the read is done, read ahead from its end ([`Self::end`]: by
    /// then other readers may have moved it). `None` for a read that starts a run or comes
    /// behind one's end.
    pub(crate) fn read(&self, first: u64, last: u64) -> Option<RunRef> {
        let mut guard = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let (runs, clock) = &mut *guard;
        *clock += 1;
        let now = *clock;
        let continued = runs
            .iter_mut()
            .enumerate()
            .filter_map(|(slot, r)| r.as_mut().map(|r| (slot, r)))
            .filter(|(_, r)| first + BEHIND >= r.next && first <= r.next.saturating_add(self.ahead))
            .min_by_key(|(_, r)| r.next.abs_diff(first));
        if let Some((slot, run)) = continued {
            // Behind the end: readers in flight finishing late. The run's end stays, and
            // the read that reached it read ahead already (reading ahead again for every
            // late one fetched 7% more than a 16-reader copy read, chunks that were read
            // and dropped from the cache meanwhile).
            let behind = first < run.next;
            run.next = run.next.max(last + 1);
            run.used = now;
            return (!behind).then_some(RunRef {
                slot,
                born: run.born,
            });
        }
        let slot = match runs.iter().position(Option::is_none) {
            Some(free) => free,
            None => runs
                .iter()
                .enumerate()
                .min_by_key(|(_, r)| r.map_or(0, |r| r.used))
                .map_or(0, |(i, _)| i),
        };
        runs[slot] = Some(Run {
            next: last + 1,
            used: now,
            born: now,
        });
        None
    }

    /// Where `run` ends now; `None` once another run took its place.
    pub(crate) fn end(&self, run: RunRef) -> Option<u64> {
        let guard = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        guard.0[run.slot]
            .filter(|r| r.born == run.born)
            .map(|r| r.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl SequentialReads {
        /// [`Self::read`], then the run's end right away.
        fn read_end(&self, first: u64, last: u64) -> Option<u64> {
            self.read(first, last).and_then(|r| self.end(r))
        }
    }

    #[test]
    fn a_run_survives_reads_elsewhere() {
        let s = SequentialReads::new(32);
        assert_eq!(s.read_end(0, 0), None, "the first read starts a run");
        assert_eq!(s.read_end(1, 1), Some(2));
        assert_eq!(
            s.read_end(900, 900),
            None,
            "a read elsewhere starts another"
        );
        assert_eq!(s.read_end(2, 3), Some(4), "the first run goes on");
        assert_eq!(s.read_end(901, 901), Some(902), "and so does the second");
    }

    #[test]
    fn a_read_continues_the_nearest_run() {
        let s = SequentialReads::new(32);
        s.read_end(0, 0);
        s.read_end(100, 100);
        assert_eq!(
            s.read_end(101, 101),
            Some(102),
            "not the run at 1, also in reach"
        );
        assert_eq!(s.read_end(1, 1), Some(2));
    }

    #[test]
    fn reads_out_of_order_or_skipping_continue_a_run() {
        let s = SequentialReads::new(32);
        s.read_end(0, 9);
        assert_eq!(s.read_end(12, 12), Some(13), "a skip forward");
        assert_eq!(
            s.read_end(10, 11),
            None,
            "a read finishing late: no read-ahead"
        );
        assert_eq!(s.read_end(13, 13), Some(14), "the run stayed ahead");
        assert_eq!(
            s.read_end(14 + 33, 14 + 33),
            None,
            "too far ahead: a new run"
        );
        let s = SequentialReads::new(32);
        s.read_end(0, 999);
        assert_eq!(s.read_end(0, 0), None, "far behind, within reach");
        assert_eq!(s.read_end(1000, 1000), Some(1001), "the end stayed");
    }

    #[test]
    fn the_least_recently_used_run_makes_room() {
        let s = SequentialReads::new(0);
        for start in [0, 10_000, 20_000, 30_000] {
            s.read_end(start, start);
        }
        s.read_end(1, 1); // run 0 used again
        s.read_end(50_000, 50_000); // replaces the run at 10,000, the oldest
        assert_eq!(
            s.read_end(10_001, 10_001),
            None,
            "the run at 10,000 is gone"
        );
        assert_eq!(s.read_end(2, 2), Some(3), "the run at 0 stays");
    }
}
