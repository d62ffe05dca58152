//! Grows a plain local repository's index by synthetic entries, for bench/scale.py: index
//! objects exactly as a backup writes them (8 packs of 256 64-KiB chunks each, sealed, named by
//! their hash), for packs that do not exist (their data is never written: the benchmark
//! measures what the index costs, and a blob of a missing pack is never reused).
//!
//! Usage: cargo run --release --example synthetic_index -- REPO_DIR ENTRIES [SEED]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmkeep_core::keys::{BlobKind, Keys};
use vmkeep_core::pack::{IndexFile, PackEntry};
use vmkeep_core::{object, BlobId, ObjectKind, PackId};
use vmkeep_store::{Key, LocalStore, Store};

const PACKS_PER_INDEX: u64 = 8;
const BLOBS_PER_PACK: u64 = 256;
const CHUNK: u32 = 65536;

/// splitmix64: a fast stream of well-mixed words (ids must be uniform, like hashes).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn id32(seed: u64, n: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&mix(seed ^ mix(n.wrapping_mul(4).wrapping_add(i as u64))).to_le_bytes());
    }
    out
}

fn index_object(seed: u64, n: u64) -> IndexFile {
    let packs = (0..PACKS_PER_INDEX)
        .map(|p| {
            let pack_no = n * PACKS_PER_INDEX + p;
            let entries = (0..BLOBS_PER_PACK)
                .map(|b| PackEntry {
                    kind: BlobKind::Data,
                    id: BlobId(id32(seed, pack_no * BLOBS_PER_PACK + b)),
                    offset: b as u32 * (CHUNK + 40),
                    length: CHUNK + 40,
                    raw_len: CHUNK,
                })
                .collect();
            (PackId(id32(seed ^ 0x5eed, pack_no)), entries)
        })
        .collect();
    IndexFile { packs }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: synthetic_index REPO_DIR ENTRIES [SEED]");
        std::process::exit(2);
    }
    let store: Arc<dyn Store> = Arc::new(LocalStore::open(&args[1]).expect("a local repository"));
    let entries: u64 = args[2].parse().expect("ENTRIES is a number");
    let seed: u64 = args
        .get(3)
        .map_or(1, |s| s.parse().expect("SEED is a number"));
    let per_object = PACKS_PER_INDEX * BLOBS_PER_PACK;
    let objects = entries.div_ceil(per_object);
    let keys = Keys::plain();
    let next = AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= objects {
                    return;
                }
                let sealed =
                    object::seal(&keys, ObjectKind::Index, &index_object(seed, n).encode());
                let name = blake3::hash(&sealed).to_hex().to_string();
                store
                    .put(&Key::new(ObjectKind::Index, name).unwrap(), &sealed)
                    .expect("writing an index object");
            });
        }
    });
    store.flush().expect("flush");
    println!(
        "{} index objects, {} entries",
        objects,
        objects * per_object
    );
}
