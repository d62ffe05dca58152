//! Runs: every entry is found, in memory and spilled; damage is never believed.
use std::collections::HashSet;
use std::os::unix::fs::FileExt;

use vmkeep_core::keys::BlobKind;
use vmkeep_core::pack::PackEntry;
use vmkeep_core::{BlobId, PackId};

use super::build::RunBuilder;
use super::run::{Run, Source, ENTRY_LEN};
use super::table::Table;
use crate::Error;

fn id(n: u64, salt: u8) -> BlobId {
    let mut h = blake3::Hasher::new();
    h.update(&n.to_le_bytes());
    h.update(&[salt]);
    BlobId(*h.finalize().as_bytes())
}

fn entry(n: u64) -> PackEntry {
    PackEntry {
        kind: if n % 7 == 0 {
            BlobKind::Tree
        } else {
            BlobKind::Data
        },
        id: id(n, 0),
        offset: (n * 100) as u32,
        length: 100,
        raw_len: 65536,
    }
}

fn source(n: u8) -> Source {
    Source {
        name: [n; 32],
        size: 100 + n as u64,
        modified_ns: 7,
    }
}

fn build(dir: &std::path::Path, n: u64, spill_at: usize) -> Run {
    let mut b = RunBuilder::new(dir.join("parts")).spill_at(spill_at);
    let src = b.add_source(source(1));
    for i in 0..n {
        let pack = PackId(id(i / 50, 1).0);
        b.add_entry(pack, src, &entry(i)).unwrap();
    }
    let path = dir.join("run");
    b.finish(&path).unwrap();
    assert!(!dir.join("parts").exists(), "partition files are removed");
    Run::open(&path).unwrap()
}

fn check_all_found(run: &Run, n: u64) {
    for i in 0..n {
        let found = run.find(&id(i, 0)).unwrap();
        assert_eq!(found.len(), 1, "entry {i}");
        let loc = run.location(&found[0]);
        let e = entry(i);
        assert_eq!(
            (loc.pack, loc.offset, loc.length, loc.raw_len, loc.kind),
            (
                PackId(id(i / 50, 1).0),
                e.offset,
                e.length,
                e.raw_len,
                e.kind
            )
        );
    }
    for i in 0..100 {
        assert!(
            run.find(&id(i, 9)).unwrap().is_empty(),
            "absent ids are absent"
        );
    }
}

#[test]
fn every_entry_is_found_in_memory_and_when_spilled() {
    for (n, spill) in [(0u64, 10usize), (1, 10), (5000, 1 << 20), (5000, 333)] {
        let dir = tempfile::tempdir().unwrap();
        let run = build(dir.path(), n, spill);
        assert_eq!(run.entries, n);
        check_all_found(&run, n);
        let mut count = 0;
        run.for_each(|_| {
            count += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(count, n);
    }
}

#[test]
fn duplicates_are_all_returned_and_dead_sources_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = RunBuilder::new(dir.path().join("parts"));
    let (old, new) = (b.add_source(source(1)), b.add_source(source(2)));
    let e = entry(3);
    b.add_entry(PackId([7; 32]), old, &e).unwrap();
    b.add_entry(PackId([8; 32]), new, &e).unwrap();
    b.finish(&dir.path().join("run")).unwrap();
    let run = Run::open(&dir.path().join("run")).unwrap();
    assert_eq!(run.find(&e.id).unwrap().len(), 2);
    // Source 1 is listed again, but replaced (another size): its entries are dead too.
    let listed: HashSet<Source> = [
        source(2),
        Source {
            size: 1,
            ..source(1)
        },
    ]
    .into();
    let live = super::table::live_mask(&run, &listed);
    let table = Table {
        runs: vec![(run, live)],
    };
    let found = table.find(&e.id).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].pack,
        PackId([8; 32]),
        "only the listed source's entry"
    );
}

#[test]
fn a_flipped_bit_anywhere_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let n = 3000;
    let run = build(dir.path(), n, 1 << 20);
    let path = run.path.clone();
    let len = std::fs::metadata(&path).unwrap().len();
    drop(run);
    // In the header and directory: opening fails.
    for at in [10u64, 70, len - (n * ENTRY_LEN as u64) - 3] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
        assert!(
            matches!(Run::open(&path), Err(Error::CacheDamaged { .. })),
            "flip at {at} of {len}"
        );
        f.write_all_at(&b, at).unwrap();
    }
    // In an entry: the lookup of its bucket fails, others still work.
    let at = len - 10 * ENTRY_LEN as u64 + 5;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 1], at).unwrap();
    let run = Run::open(&path).unwrap();
    let failures = (0..n)
        .filter(|i| matches!(run.find(&id(*i, 0)), Err(Error::CacheDamaged { .. })))
        .count();
    assert!((1..200).contains(&failures), "{failures} lookups failed");
    // A truncated run does not open.
    f.set_len(len - 1).unwrap();
    assert!(matches!(Run::open(&path), Err(Error::CacheDamaged { .. })));
}
