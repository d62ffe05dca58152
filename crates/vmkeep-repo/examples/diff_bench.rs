//! `vmkeep diff`'s tree walk against brute force, in one process on one repository
//! (bench/diff.py): `diff_bench REPO FROM TO [ROUNDS]` prints one JSON line with the median
//! milliseconds of `Repository::diff` and of a brute-force comparison (every chunk id of both
//! full indexes looked up, index by index), node loads excluded from neither, and whether the
//! two agree. The passphrase comes from VMKEEP_PASSWORD (none for a plain repository).
//! Key derivation, repository open and the blob index load happen once, before the timing.
use std::sync::Arc;
use std::time::Instant;

use vmkeep_core::tree::ChunkCursor;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::Repository;
use vmkeep_store::LocalStore;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: diff_bench REPO FROM TO [ROUNDS]");
        std::process::exit(2);
    }
    let rounds: usize = args.get(4).and_then(|r| r.parse().ok()).unwrap_or(5);
    let store = Arc::new(LocalStore::open(&args[1]).expect("open the store"));
    let pass = std::env::var("VMKEEP_PASSWORD").ok();
    let repo = Repository::open(store, pass.as_deref().map(str::as_bytes)).expect("open");
    let (a, b) = (
        repo.resolve(&args[2]).unwrap(),
        repo.resolve(&args[3]).unwrap(),
    );
    let index = BlobIndex::load(&repo).unwrap();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut tree_ms = Vec::new();
    let mut tree_extents = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let d = repo.diff(&a, &b, None).unwrap();
        tree_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        tree_extents = d.disks[0].extents.clone();
    }
    let (da, db) = (&a.disks[0], &b.disks[0]);
    let c = b.chunk_size as u64;
    let mut brute_ms = Vec::new();
    let mut brute_extents: Vec<(u64, u64)> = Vec::new();
    for _ in 0..rounds.min(3) {
        let t = Instant::now();
        let nodes = repo.node_reader(&index);
        let (ca, cb) = (a.chunks_of(da.size), b.chunks_of(db.size));
        let mut xa = ChunkCursor::new(da.root, ca);
        let mut xb = ChunkCursor::new(db.root, cb);
        let mut ext: Vec<(u64, u64)> = Vec::new();
        for i in 0..cb {
            let ia = if i < ca {
                xa.get(&nodes, i).unwrap()
            } else {
                vmkeep_core::BlobId::ZERO
            };
            let ib = xb.get(&nodes, i).unwrap();
            if ia != ib {
                let (off, end) = (i * c, ((i + 1) * c).min(db.size));
                match ext.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += end - off,
                    _ => ext.push((off, end - off)),
                }
            }
        }
        brute_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        brute_extents = ext;
    }
    println!(
        "{{\"tree_ms\": {:.3}, \"brute_ms\": {:.3}, \"chunks\": {}, \"extents\": {}, \"changed_bytes\": {}, \"agree\": {}}}",
        median(tree_ms),
        median(brute_ms),
        b.chunks_of(db.size),
        tree_extents.len(),
        tree_extents.iter().map(|e| e.1).sum::<u64>(),
        tree_extents == brute_extents
    );
}
