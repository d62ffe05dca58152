//! Memory streams (QEMU migration streams) through the repository: pages into page images,
//! the rest literal; read back byte for byte; streams the parser cannot understand stored
//! anyway; damaged blobs fail reads and check; GC keeps every blob a memory stream uses.
mod common;

use std::io::Cursor;

use common::*;
use vmkeep_core::manifest::StreamRecord;
use vmkeep_core::stream::decode_index_blob;
use vmkeep_core::tree::{self, Node, NodeStore};
use vmkeep_core::BlobId;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::{BackupOptions, Manifest, NoProgress, Repository};
use vmkeep_testkit::data::random_bytes;
use vmkeep_testkit::migration::StreamBuilder;

const RAM_PAGES: u64 = 8192; // 32 MiB

/// The content of "RAM": zero, text-like or random pages, reproducible from `seed`.
fn ram(seed: u64) -> Vec<Option<Vec<u8>>> {
    let mut rng = Rng::new(seed);
    (0..RAM_PAGES)
        .map(|_| match rng.below(10) {
            0..=3 => None,
            4..=7 => Some(Chunk::Text(rng.next_u64()).bytes(4096)),
            _ => Some(Chunk::Random(rng.next_u64()).bytes(4096)),
        })
        .collect()
}

/// A background snapshot of `ram`: the scan starts at page `start` and wraps around, and the
/// pages in `ahead` are sent first (as pages the guest wrote during the capture are).
fn capture(ram: &[Option<Vec<u8>>], start: u64, ahead: &[u64], state: &[u8]) -> Vec<u8> {
    let mut b = StreamBuilder::new(&[("pc.ram", RAM_PAGES * 4096), ("pc.rom", 8 * 4096)]);
    b.part();
    for &p in ahead {
        b.page(0, p, ram[p as usize].as_deref().unwrap_or(&[7u8; 4096]));
    }
    for i in 0..RAM_PAGES {
        let p = (start + i) % RAM_PAGES;
        if ahead.contains(&p) {
            continue;
        }
        match &ram[p as usize] {
            None => b.zero(0, p),
            Some(d) => b.page(0, p, d),
        }
        if i == RAM_PAGES / 2 {
            b.end_part();
            b.part();
        }
    }
    for p in 0..8 {
        b.page(1, p, &Chunk::Text(p).bytes(4096));
    }
    b.end_part();
    b.finish(state)
}

fn device_state(seed: u64) -> Vec<u8> {
    let mut v = Chunk::Text(99).bytes(150_000);
    Rng::new(seed).fill(&mut v[70_000..70_064]);
    v
}

fn store_memory(repo: &Repository, vm: &str, stream: &[u8]) -> (Manifest, StreamRecord) {
    let mut s = repo
        .begin_backup(BackupOptions {
            vm: vm.into(),
            ..Default::default()
        })
        .unwrap();
    let rec = s
        .add_memory_stream("memory", &mut Cursor::new(stream), &NoProgress)
        .unwrap()
        .clone();
    (s.commit().unwrap(), rec)
}

fn read_back(repo: &Repository, m: &Manifest) -> vmkeep_repo::Result<Vec<u8>> {
    let mut out = Vec::new();
    let n = repo.read_stream_to(m, "memory", &mut out, &NoProgress)?;
    assert_eq!(n, out.len() as u64);
    Ok(out)
}

#[test]
fn memory_streams_round_trip_and_deduplicate() {
    for encrypted in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("repo");
        init_repo(&root, encrypted);
        let repo = open_local(&root, encrypted, 2);

        let ram1 = ram(5);
        let first = capture(&ram1, 0, &[], &device_state(1));
        let (m1, rec1) = store_memory(&repo, "vm", &first);
        let pages = rec1.pages.as_ref().expect("a paged stream");
        assert_eq!(rec1.size, first.len() as u64);
        assert!(
            pages.literal_size < 400_000,
            "headers and device state only: {}",
            pages.literal_size
        );
        assert!(read_back(&repo, &m1).unwrap() == first);

        // The guest changed 20 pages; QEMU's scan started elsewhere and sent 3 pages early.
        let mut ram2 = ram1.clone();
        let mut rng = Rng::new(6);
        for _ in 0..20 {
            let p = rng.below(RAM_PAGES) as usize;
            ram2[p] = Some(Chunk::Random(rng.next_u64()).bytes(4096));
        }
        let second = capture(&ram2, 5234, &[1900, 17, 640], &device_state(2));
        let (m2, rec2) = store_memory(&repo, "vm", &second);
        assert!(read_back(&repo, &m2).unwrap() == second);
        let ratio = m2.stats.stored_bytes as f64 / m1.stats.stored_bytes as f64;
        println!(
            "encrypted={encrypted}: first capture stored {} bytes, second {} ({:.1}%; {} new \
             plaintext bytes), {} page images",
            m1.stats.stored_bytes,
            m2.stats.stored_bytes,
            ratio * 100.0,
            m2.stats.new_bytes,
            rec2.pages.as_ref().unwrap().images.len()
        );
        // 20 changed pages cost 20 image chunks of 16 KiB; the device state, the scan order and
        // the headers around the moved pages a few literal and op chunks of at most 64 KiB.
        assert!(
            m2.stats.new_bytes < (20 << 14) + (8 << 16),
            "{}",
            m2.stats.new_bytes
        );
        assert!(
            ratio < 0.05,
            "the second capture stores {ratio:.3} of the first"
        );
        assert_check_ok(&repo, "two memory streams");

        // GC keeps everything the second capture uses: its page images, op and literal
        // streams live in the first capture's packs, which nothing else references now.
        repo.forget(&[m1.id]).unwrap();
        let plan = repo.prune_plan(&Default::default()).unwrap();
        let st = repo.prune(&plan, &NoProgress).unwrap();
        println!("prune after forgetting the first capture: {:?}", st.gc);
        assert_check_ok(&repo, "after prune");
        assert!(read_back(&repo, &m2).unwrap() == second);
    }
}

#[test]
fn streams_the_parser_cannot_understand_come_back_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    init_repo(&root, true);
    let repo = open_local(&root, true, 2);
    let good = capture(&ram(7), 300, &[5], &device_state(3));
    let page_start = good
        .windows(8)
        .position(|w| w == b"\x02\0\0\0\x01\0\0\0")
        .unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("random", random_bytes(3 << 20, 8)),
        ("zeros", vec![0u8; 1 << 20]),
        ("header only", good[..8].to_vec()),
        ("cut in the RAM setup", good[..40].to_vec()),
        ("cut mid-page", good[..page_start + 5000].to_vec()),
        (
            "cut mid-header",
            good[..page_start + 4096 * 300 + 4].to_vec(),
        ),
        (
            "cut in the device state",
            good[..good.len() - 1000].to_vec(),
        ),
    ];
    let mut garbled = good.clone();
    garbled[page_start + 4096 * 600..page_start + 4096 * 600 + 10].fill(0x42);
    cases.push(("garbled mid-stream", garbled));
    let mut inserted = good.clone();
    inserted.splice(
        page_start + 4096 * 900..page_start + 4096 * 900,
        random_bytes(777, 9),
    );
    cases.push(("bytes inserted", inserted));
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let (m, rec) = store_memory(&repo, &format!("vm{i}"), bytes);
        assert_eq!(rec.size, bytes.len() as u64, "{what}");
        let back = read_back(&repo, &m).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(back == *bytes, "{what}: read back differs");
        println!(
            "{what}: {} bytes, {} of them in page images",
            bytes.len(),
            rec.pages.as_ref().map_or(0, |p| rec.size - p.literal_size)
        );
        match *what {
            "empty" | "random" | "zeros" | "header only" | "cut in the RAM setup" => {
                assert!(rec.pages.is_none(), "{what}: nothing to page")
            }
            _ => assert!(rec.pages.is_some(), "{what}: pages before the damage"),
        }
    }
    assert_check_ok(&repo, "odd streams");
}

/// Index tree nodes read straight from the repository.
struct Nodes<'a>(&'a Repository, &'a BlobIndex);

impl NodeStore for Nodes<'_> {
    fn load(&self, id: &BlobId) -> vmkeep_core::Result<Node> {
        Node::decode(&self.0.read_blob(self.1, id).expect("node readable"))
    }
    fn store(&mut self, _: &Node) -> vmkeep_core::Result<BlobId> {
        unreachable!("read only")
    }
}

#[test]
fn a_damaged_memory_blob_fails_the_read_and_check() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    init_repo(&root, true);
    let repo = open_local(&root, true, 2);
    let stream = capture(&ram(11), 0, &[], &device_state(4));
    let (m, rec) = store_memory(&repo, "vm", &stream);
    let index = BlobIndex::load(&repo).unwrap();
    let p = rec.pages.as_ref().unwrap();
    let first_entry =
        |blob: &BlobId| decode_index_blob(&repo.read_blob(&index, blob).unwrap()).unwrap()[0].id;
    let mut image_chunk = None;
    let image = &p.images[0];
    tree::for_each_chunk(
        &Nodes(&repo, &index),
        &image.root,
        p.chunks_of(image.size),
        &mut |_, id| {
            image_chunk.get_or_insert(*id);
            Ok(())
        },
    )
    .unwrap();
    let victims = [
        ("page image chunk", image_chunk.unwrap()),
        ("page image tree node", image.root),
        ("op stream chunk", first_entry(&p.ops[0])),
        ("literal stream chunk", first_entry(&rec.index[0])),
    ];
    for (what, id) in victims {
        let loc = index.get(&id).unwrap();
        let at = loc.offset as u64 + loc.length as u64 / 2;
        flip_byte(&pack_path(&root, &loc.pack), at);
        // A cached copy of a tree node (verified by id) would hide the damage from a read.
        if let Some(dir) = repo.cache_dir() {
            let _ = std::fs::remove_dir_all(dir);
        }
        let err = read_back(&repo, &m).expect_err(what);
        assert!(err.is_damage(), "{what}: {err}");
        println!("{what}: {err}");
        let r = check(&repo);
        assert!(!r.ok, "{what}: check must fail");
        assert_eq!(r.damaged.len(), 1, "{what}: {:?}", r.damaged);
        assert_eq!(
            r.damaged[0].disk.as_deref(),
            Some("stream:memory"),
            "{what}"
        );
        assert_eq!(r.damaged[0].snapshot, m.id.to_hex(), "{what}");
        flip_byte(&pack_path(&root, &loc.pack), at); // repaired for the next case
        assert!(read_back(&repo, &m).unwrap() == stream, "{what}: repaired");
    }
    assert_check_ok(&repo, "repaired");
}

#[test]
fn stream_names_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    init_repo(&root, false);
    let repo = open_local(&root, false, 2);
    let mut s = repo
        .begin_backup(BackupOptions {
            vm: "vm".into(),
            ..Default::default()
        })
        .unwrap();
    s.add_memory_stream("memory", &mut Cursor::new(b"abc"), &NoProgress)
        .unwrap();
    assert!(s
        .add_memory_stream("memory", &mut Cursor::new(b"abc"), &NoProgress)
        .is_err());
    assert!(s
        .add_memory_stream("bad/name", &mut Cursor::new(b"abc"), &NoProgress)
        .is_err());
    let m = s.commit().unwrap();
    let mut out = Vec::new();
    let err = repo
        .read_stream_to(&m, "nope", &mut out, &NoProgress)
        .unwrap_err();
    assert!(
        err.to_string().contains("no stream named \"nope\""),
        "{err}"
    );
}
