use super::*;
use proptest::prelude::*;
use std::cell::Cell;
use std::collections::HashSet;

/// Node store over a map; ids are plain BLAKE3 of the encoding (not Keys::blob_id).
#[derive(Default)]
struct MapStore {
    nodes: HashMap<BlobId, Node>,
    stores: u64,
    loads: Cell<u64>,
}

fn node_id(node: &Node) -> BlobId {
    BlobId(*blake3::hash(&node.encode()).as_bytes())
}

impl MapStore {
    /// Insert an arbitrary (possibly invalid) node under an arbitrary id.
    fn put(&mut self, id: BlobId, node: Node) {
        self.nodes.insert(id, node);
    }
}

impl NodeStore for MapStore {
    fn load(&self, id: &BlobId) -> Result<Node> {
        assert!(!id.is_zero(), "ZERO must never be loaded");
        self.loads.set(self.loads.get() + 1);
        self.nodes.get(id).cloned().ok_or_else(|| Error::Corrupt {
            kind: "index node",
            reason: format!("missing {id:#}"),
        })
    }

    fn store(&mut self, node: &Node) -> Result<BlobId> {
        assert!(
            !node.children.iter().all(BlobId::is_zero),
            "an all-ZERO node must never be stored"
        );
        assert!(!node.children.is_empty() && node.children.len() <= FANOUT);
        self.stores += 1;
        let id = node_id(node);
        self.nodes.insert(id, node.clone());
        Ok(id)
    }
}

/// Chunk id alphabet: 0 is ZERO, others are fixed non-zero ids.
fn cid(v: u32) -> BlobId {
    if v == 0 {
        BlobId::ZERO
    } else {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&v.to_le_bytes());
        b[31] = 0xa5;
        BlobId(b)
    }
}

/// Independent oracle: the canonical tree of `ids`, built bottom-up level by level.
fn reference_root(store: &mut MapStore, ids: &[BlobId]) -> BlobId {
    if ids.is_empty() {
        return BlobId::ZERO;
    }
    let d = depth(ids.len() as u64);
    let mut cur = ids.to_vec();
    for level in 0..d {
        cur = cur
            .chunks(FANOUT)
            .map(|c| {
                if c.iter().all(BlobId::is_zero) {
                    BlobId::ZERO
                } else {
                    store
                        .store(&Node {
                            level,
                            children: c.to_vec(),
                        })
                        .unwrap()
                }
            })
            .collect();
    }
    assert_eq!(cur.len(), 1);
    cur[0]
}

fn build(
    store: &mut MapStore,
    base: Option<BlobId>,
    chunks: u64,
    sets: impl IntoIterator<Item = (u64, BlobId)>,
) -> Result<BlobId> {
    let mut b = TreeBuilder::new(store, base, chunks);
    for (i, id) in sets {
        b.set(i, id)?;
    }
    b.finish()
}

fn all_chunks(store: &MapStore, root: &BlobId, chunks: u64) -> Result<Vec<(u64, BlobId)>> {
    let mut out = Vec::new();
    for_each_chunk(store, root, chunks, &mut |i, id| {
        out.push((i, *id));
        Ok(())
    })?;
    Ok(out)
}

fn all_nodes(store: &MapStore, root: &BlobId, chunks: u64) -> Result<Vec<(BlobId, Node)>> {
    let mut out = Vec::new();
    for_each_node(store, root, chunks, &mut |id, n| {
        out.push((*id, n.clone()));
        Ok(())
    })?;
    Ok(out)
}

fn is_corrupt<T: std::fmt::Debug>(r: Result<T>) -> bool {
    matches!(r, Err(Error::Corrupt { .. }))
}

fn is_invalid<T: std::fmt::Debug>(r: Result<T>) -> bool {
    matches!(r, Err(Error::Invalid { .. }))
}

// ---- encoding ----

#[test]
fn encode_layout() {
    let n = Node {
        level: 3,
        children: vec![cid(1), BlobId::ZERO],
    };
    let e = n.encode();
    assert_eq!(e.len(), 3 + 64);
    assert_eq!(&e[..3], &[3, 2, 0]);
    assert_eq!(&e[3..35], cid(1).as_bytes());
    assert_eq!(&e[35..], &[0u8; 32]);
    assert_eq!(Node::decode(&e).unwrap(), n);
    let full = Node {
        level: MAX_LEVEL,
        children: vec![cid(7); FANOUT],
    };
    let e = full.encode();
    assert_eq!(e.len(), encoded_len(FANOUT));
    assert_eq!(e.len(), 4099);
    assert_eq!(&e[1..3], &[128, 0]);
    assert_eq!(Node::decode(&e).unwrap(), full);
}

#[test]
fn decode_rejects_malformed() {
    let good = Node {
        level: 1,
        children: vec![cid(1); 3],
    }
    .encode();
    assert!(is_corrupt(Node::decode(&[])));
    assert!(is_corrupt(Node::decode(&[0, 1])));
    // Header only: count 0.
    assert!(is_corrupt(Node::decode(&[0, 0, 0])));
    // Truncated / extended.
    assert!(is_corrupt(Node::decode(&good[..good.len() - 1])));
    let mut long = good.clone();
    long.push(0);
    assert!(is_corrupt(Node::decode(&long)));
    // Level 13.
    let mut bad = good.clone();
    bad[0] = 13;
    assert!(is_corrupt(Node::decode(&bad)));
    bad[0] = 255;
    assert!(is_corrupt(Node::decode(&bad)));
    // Count not matching the length, count > FANOUT.
    let mut bad = good.clone();
    bad[1] = 2;
    assert!(is_corrupt(Node::decode(&bad)));
    let mut big = vec![0u8, 129, 0];
    big.extend(std::iter::repeat_n(1u8, 129 * 32));
    assert!(is_corrupt(Node::decode(&big)));
    let mut huge = vec![0u8, 0xff, 0xff];
    huge.extend(std::iter::repeat_n(1u8, 0xffff * 32));
    assert!(is_corrupt(Node::decode(&huge)));
    let e = Node::decode(&[0, 0, 0]).unwrap_err().to_string();
    assert!(e.starts_with("corrupt index node:"), "{e}");
}

// ---- geometry ----

#[test]
fn depth_values() {
    assert_eq!(depth(0), 1);
    assert_eq!(depth(1), 1);
    assert_eq!(depth(128), 1);
    assert_eq!(depth(129), 2);
    assert_eq!(depth(16384), 2);
    assert_eq!(depth(16385), 3);
    assert_eq!(depth(1 << 21), 3);
    assert_eq!(depth((1 << 21) + 1), 4);
    assert_eq!(depth(1 << 24), 4);
    assert_eq!(depth(1 << 28), 4);
    assert_eq!(depth((1 << 28) + 1), 5);
    assert_eq!(depth(1 << 63), 9);
    assert_eq!(depth(u64::MAX), 10);
    for chunks in [0u64, 1, 5, 127, 128, 129, 16384, 16385, 1 << 24, u64::MAX] {
        let d = depth(chunks) as u32;
        assert!((FANOUT as u128).pow(d) >= chunks as u128);
        if d > 1 {
            assert!((FANOUT as u128).pow(d - 1) < chunks as u128);
        }
    }
}

#[test]
fn child_counts() {
    assert_eq!(child_count(0, 0, 1), 1);
    assert_eq!(child_count(0, 0, 128), 128);
    assert_eq!(child_count(0, 128, 129), 1);
    assert_eq!(child_count(1, 0, 129), 2);
    assert_eq!(child_count(1, 0, 16384), 128);
    assert_eq!(child_count(2, 0, 16385), 2);
    assert_eq!(child_count(1, 16384, 16385), 1);
    assert_eq!(child_count(0, 16384, 16385), 1);
    assert_eq!(child_count(3, 0, 1 << 24), 8);
    assert_eq!(child_count(0, 5, 5), 0);
    assert_eq!(child_count(9, 0, u64::MAX), 2);
}

// ---- builder ----

#[test]
fn empty_and_zero_disks_cost_nothing() {
    let mut s = MapStore::default();
    assert_eq!(build(&mut s, None, 0, []).unwrap(), BlobId::ZERO);
    assert_eq!(build(&mut s, None, 1 << 24, []).unwrap(), BlobId::ZERO);
    let zeros = (0..1000).map(|i| (i * 7, BlobId::ZERO));
    assert_eq!(build(&mut s, None, 1 << 24, zeros).unwrap(), BlobId::ZERO);
    assert_eq!(s.stores, 0);
    assert_eq!(s.loads.get(), 0);
    assert!(all_chunks(&s, &BlobId::ZERO, 1 << 24).unwrap().is_empty());
    assert!(all_nodes(&s, &BlobId::ZERO, 1 << 24).unwrap().is_empty());
    assert_eq!(chunk_id(&s, &BlobId::ZERO, 10, 9).unwrap(), BlobId::ZERO);
    assert!(changed_chunks(&s, &BlobId::ZERO, &BlobId::ZERO, 0)
        .unwrap()
        .is_empty());
}

#[test]
fn set_rejects_out_of_range_and_order() {
    let mut s = MapStore::default();
    let mut b = TreeBuilder::new(&mut s, None, 10);
    assert!(is_invalid(b.set(10, cid(1))));
    let mut b = TreeBuilder::new(&mut s, None, 10);
    b.set(3, cid(1)).unwrap();
    assert!(is_invalid(b.set(3, cid(2))));
    let mut b = TreeBuilder::new(&mut s, None, 10);
    b.set(5, cid(1)).unwrap();
    assert!(is_invalid(b.set(4, cid(2))));
    // A rejected set has no effect.
    b.set(6, cid(2)).unwrap();
    let r = b.finish().unwrap();
    assert_eq!(
        all_chunks(&s, &r, 10).unwrap(),
        vec![(5, cid(1)), (6, cid(2))]
    );
    let mut b = TreeBuilder::new(&mut s, None, 0);
    assert!(is_invalid(b.set(0, cid(1))));
    let mut b = TreeBuilder::new(&mut s, None, u64::MAX);
    assert!(is_invalid(b.set(u64::MAX, cid(1))));
}

#[test]
fn no_set_returns_base_untouched() {
    let mut s = MapStore::default();
    let ids: Vec<_> = (0..300).map(|i| cid(i % 5)).collect();
    let root = reference_root(&mut s, &ids);
    let (stores, loads) = (s.stores, s.loads.get());
    assert_eq!(build(&mut s, Some(root), 300, []).unwrap(), root);
    // Setting chunks to the ids they already have stores nothing.
    let same = (0..300).step_by(3).map(|i| (i, ids[i as usize]));
    assert_eq!(build(&mut s, Some(root), 300, same).unwrap(), root);
    assert_eq!(s.stores, stores);
    assert!(s.loads.get() > loads);
}

#[test]
fn single_chunk_and_edges() {
    let mut s = MapStore::default();
    let r = build(&mut s, None, 1, [(0, cid(1))]).unwrap();
    assert_eq!(
        s.nodes[&r],
        Node {
            level: 0,
            children: vec![cid(1)]
        }
    );
    assert_eq!(chunk_id(&s, &r, 1, 0).unwrap(), cid(1));
    let r2 = build(&mut s, Some(r), 1, [(0, BlobId::ZERO)]).unwrap();
    assert_eq!(r2, BlobId::ZERO);
    assert_eq!(changed_chunks(&s, &r, &r2, 1).unwrap(), vec![0]);
    assert!(is_invalid(chunk_id(&s, &r, 1, 1)));
}

/// chunks = 128, 129, 16384, 16385: a full disk of distinct ids, then edits at the edges.
#[test]
fn fanout_boundaries() {
    for chunks in [128u64, 129, 16384, 16385] {
        let mut s = MapStore::default();
        let ids: Vec<_> = (0..chunks as u32).map(|i| cid(i + 1)).collect();
        let scratch = build(
            &mut s,
            None,
            chunks,
            ids.iter().enumerate().map(|(i, id)| (i as u64, *id)),
        )
        .unwrap();
        assert_eq!(scratch, reference_root(&mut s, &ids), "chunks {chunks}");
        let root = &s.nodes[&scratch];
        assert_eq!(root.level, depth(chunks) - 1);
        let want_root_count = match chunks {
            128 => 128,
            129 => 2,
            16384 => 128,
            16385 => 2,
            _ => unreachable!(),
        };
        assert_eq!(root.children.len(), want_root_count);
        let got = all_chunks(&s, &scratch, chunks).unwrap();
        assert_eq!(got.len() as u64, chunks);
        assert!(got.iter().all(|(i, id)| ids[*i as usize] == *id));
        for i in [0, 1, 126, 127, 128, 16383, 16384] {
            if i < chunks {
                assert_eq!(chunk_id(&s, &scratch, chunks, i).unwrap(), ids[i as usize]);
            }
        }
        // Nodes: full leaves, with a partial rightmost one when chunks isn't a multiple.
        let nodes = all_nodes(&s, &scratch, chunks).unwrap();
        let leaves = nodes.iter().filter(|(_, n)| n.level == 0).count() as u64;
        assert_eq!(leaves, chunks.div_ceil(128));
        // Edit the last chunk and the first chunk.
        let last = chunks - 1;
        let mut new_ids = ids.clone();
        new_ids[last as usize] = cid(999_999);
        new_ids[0] = BlobId::ZERO;
        let edited = build(
            &mut s,
            Some(scratch),
            chunks,
            [(0, BlobId::ZERO), (last, cid(999_999))],
        )
        .unwrap();
        assert_eq!(edited, reference_root(&mut s, &new_ids));
        assert_eq!(
            changed_chunks(&s, &scratch, &edited, chunks).unwrap(),
            vec![0, last]
        );
        assert_eq!(chunk_id(&s, &edited, chunks, last).unwrap(), cid(999_999));
        // Zero the whole disk but the last chunk: a single path remains.
        let zs = (0..last).map(|i| (i, BlobId::ZERO));
        let lone = build(&mut s, Some(edited), chunks, zs).unwrap();
        let nodes = all_nodes(&s, &lone, chunks).unwrap();
        assert_eq!(nodes.len(), depth(chunks) as usize);
        assert_eq!(
            all_chunks(&s, &lone, chunks).unwrap(),
            vec![(last, cid(999_999))]
        );
    }
}

/// 10 sets on a 1 TiB disk (2^24 chunks at 64 KiB) do O(10*depth) work.
#[test]
fn sparse_sets_on_huge_disk_are_cheap() {
    let chunks = 1u64 << 24;
    let d = depth(chunks) as u64;
    assert_eq!(d, 4);
    let mut s = MapStore::default();
    let sets: Vec<(u64, BlobId)> = (0..10u64)
        .map(|k| (k * 1_677_721 + 13, cid(k as u32 + 1)))
        .collect();
    let base = build(&mut s, None, chunks, sets.iter().copied()).unwrap();
    assert!(s.stores <= 10 * d, "{} stores", s.stores);
    // No base nodes to load when the base is all zeros.
    assert_eq!(s.loads.get(), 0);
    assert_eq!(all_chunks(&s, &base, chunks).unwrap(), sets);

    // 10 more changes on top of that base.
    let (stores0, loads0) = (s.stores, s.loads.get());
    let sets2: Vec<(u64, BlobId)> = (0..10u64)
        .map(|k| (k * 1_500_000 + 7, cid(100 + k as u32)))
        .collect();
    let next = build(&mut s, Some(base), chunks, sets2.iter().copied()).unwrap();
    assert!(
        s.stores - stores0 <= 10 * d,
        "{} stores",
        s.stores - stores0
    );
    assert!(
        s.loads.get() - loads0 <= 10 * d,
        "{} loads",
        s.loads.get() - loads0
    );
    let mut want: Vec<u64> = sets.iter().chain(&sets2).map(|(i, _)| *i).collect();
    want.sort_unstable();
    assert_eq!(changed_chunks(&s, &base, &next, chunks).unwrap(), {
        let mut w: Vec<u64> = sets2.iter().map(|(i, _)| *i).collect();
        w.sort_unstable();
        w
    });
    let got: Vec<u64> = all_chunks(&s, &next, chunks)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(got, want);
    // The last chunk of the disk works too.
    let last = build(&mut s, Some(next), chunks, [(chunks - 1, cid(5))]).unwrap();
    assert_eq!(chunk_id(&s, &last, chunks, chunks - 1).unwrap(), cid(5));
    assert_eq!(
        changed_chunks(&s, &next, &last, chunks).unwrap(),
        vec![chunks - 1]
    );
}

/// Metadata cost of a restore point of a 1 TiB disk (2^24 chunks of 64 KiB) with 64
/// scattered changed chunks. The cost does not depend on how full the base is: every node on
/// a path to a changed chunk is rewritten with its full geometric child count either way.
#[test]
fn metadata_cost_of_64_changes_on_1tib() {
    let chunks = 1u64 << 24;
    let mut s = MapStore::default();
    // A base with one non-zero chunk in every leaf-sized block of 4096 chunks (4096 leaves).
    let base_sets = (0..chunks)
        .step_by(4096)
        .map(|i| (i + 1, cid(1 + (i / 4096) as u32)));
    let base = build(&mut s, None, chunks, base_sets).unwrap();
    // 64 scattered changes (deterministic pseudo-random positions).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut idx: Vec<u64> = (0..64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % chunks
        })
        .collect();
    idx.sort_unstable();
    idx.dedup();
    assert_eq!(idx.len(), 64);
    let changes = idx
        .iter()
        .enumerate()
        .map(|(k, &i)| (i, cid(1_000_000 + k as u32)));
    let (root, cost) = metadata_cost(&mut s, Some(base), chunks, changes).unwrap();
    println!(
        "metadata cost: 2^24 chunks (1 TiB at 64 KiB), 64 scattered changes: {} nodes, \
         {} bytes ({:.3} MiB) of node plaintext",
        cost.nodes,
        cost.bytes,
        cost.bytes as f64 / (1 << 20) as f64
    );
    // 64 leaves + at most 64 level-1 + at most 8 level-2 + 1 root.
    assert!(
        (64 + 8 + 1..=64 + 64 + 8 + 1).contains(&cost.nodes),
        "{cost:?}"
    );
    assert!(cost.bytes <= (64 + 64 + 8) * 4099 + 259, "{cost:?}");
    assert_eq!(changed_chunks(&s, &base, &root, chunks).unwrap(), idx);
}

#[test]
fn for_each_node_parents_first_and_dedup() {
    let mut s = MapStore::default();
    // 1000 chunks all the same id: leaves 0..6 identical, the 8th partial.
    let ids = vec![cid(3); 1000];
    let root = reference_root(&mut s, &ids);
    let nodes = all_nodes(&s, &root, 1000).unwrap();
    // Root, one distinct full leaf, one partial leaf.
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[0].0, root);
    let mut seen = HashSet::new();
    for (id, n) in &nodes {
        assert_eq!(node_id(n), *id);
        assert!(seen.insert(*id));
    }
    // Every chunk is still visited by for_each_chunk.
    assert_eq!(all_chunks(&s, &root, 1000).unwrap().len(), 1000);
}

// ---- corruption ----

/// Every reader on (root, chunks) fails with Corrupt (or at least an error), never panics.
fn assert_all_readers_fail(s: &MapStore, root: &BlobId, chunks: u64) {
    assert!(is_corrupt(all_chunks(s, root, chunks)), "for_each_chunk");
    assert!(is_corrupt(all_nodes(s, root, chunks)), "for_each_node");
    assert!(
        is_corrupt(changed_chunks(s, &BlobId::ZERO, root, chunks)),
        "changed_chunks"
    );
    assert!(
        is_corrupt(changed_chunks(s, root, &BlobId::ZERO, chunks)),
        "changed_chunks"
    );
    let any_err = (0..chunks.min(300)).any(|i| chunk_id(s, root, chunks, i).is_err());
    assert!(any_err, "chunk_id");
    let mut cursor = ChunkCursor::new(*root, chunks);
    let any_err = (0..chunks.min(300)).any(|i| cursor.get(s, i).is_err());
    assert!(any_err, "ChunkCursor");
}

#[test]
fn chunk_cursor_agrees_with_chunk_id_and_loads_each_node_once() {
    let chunks = 128 * 128 * 3 + 5;
    let mut s = MapStore::default();
    let ids: Vec<_> = (0..chunks as u32)
        .map(|i| if i % 1000 < 300 { cid(0) } else { cid(i + 1) })
        .collect();
    let root = build(
        &mut s,
        None,
        chunks,
        ids.iter().enumerate().map(|(i, id)| (i as u64, *id)),
    )
    .unwrap();
    let nodes = all_nodes(&s, &root, chunks).unwrap().len() as u64;
    let mut cursor = ChunkCursor::new(root, chunks);
    s.loads.set(0);
    for i in 0..chunks {
        assert_eq!(cursor.get(&s, i).unwrap(), ids[i as usize], "chunk {i}");
    }
    assert_eq!(
        s.loads.get(),
        nodes,
        "ascending lookups load each node once"
    );
    // Jumps back and forth give the same answers.
    for i in [chunks - 1, 0, 20_000, 5, 128 * 128, 128 * 128 - 1, 49_000] {
        assert_eq!(cursor.get(&s, i).unwrap(), ids[i as usize], "chunk {i}");
    }
    assert!(is_invalid(cursor.get(&s, chunks)));
    let mut zero = ChunkCursor::new(BlobId::ZERO, 10);
    assert_eq!(zero.get(&s, 9).unwrap(), BlobId::ZERO);
}

#[test]
fn corrupt_trees_are_errors() {
    let fake = |b: u8| BlobId([b; 32]);
    // Wrong level at the root.
    let mut s = MapStore::default();
    s.put(
        fake(1),
        Node {
            level: 1,
            children: vec![cid(1); 10],
        },
    );
    assert_all_readers_fail(&s, &fake(1), 10);
    // Wrong count at the root (disk of 200 chunks: root level 1 with 2 children).
    s.put(
        fake(2),
        Node {
            level: 0,
            children: vec![cid(1); 128],
        },
    );
    s.put(
        fake(3),
        Node {
            level: 1,
            children: vec![fake(2)],
        },
    );
    assert_all_readers_fail(&s, &fake(3), 200);
    s.put(
        fake(4),
        Node {
            level: 1,
            children: vec![fake(2); 3],
        },
    );
    assert_all_readers_fail(&s, &fake(4), 200);
    // Right root, wrong count in the partial right leaf (200 chunks: 72 in the 2nd leaf).
    s.put(
        fake(5),
        Node {
            level: 0,
            children: vec![cid(1); 128],
        },
    );
    s.put(
        fake(6),
        Node {
            level: 1,
            children: vec![fake(2), fake(5)],
        },
    );
    assert!(is_corrupt(all_chunks(&s, &fake(6), 200)));
    assert!(is_corrupt(all_nodes(&s, &fake(6), 200)));
    assert!(is_corrupt(chunk_id(&s, &fake(6), 200, 150)));
    assert_eq!(chunk_id(&s, &fake(6), 200, 5).unwrap(), cid(1));
    // A cycle: a node that is its own child. Level checks stop it.
    s.put(
        fake(7),
        Node {
            level: 1,
            children: vec![fake(7), fake(7)],
        },
    );
    assert_all_readers_fail(&s, &fake(7), 200);
    // Child level too high.
    s.put(
        fake(8),
        Node {
            level: 1,
            children: vec![fake(6), fake(6)],
        },
    );
    assert_all_readers_fail(&s, &fake(8), 200);
    // A stored all-ZERO node.
    s.put(
        fake(9),
        Node {
            level: 0,
            children: vec![BlobId::ZERO; 10],
        },
    );
    assert_all_readers_fail(&s, &fake(9), 10);
    // A missing node.
    assert!(is_corrupt(all_chunks(&s, &fake(10), 10)));
    // Non-zero root for an empty disk.
    s.put(
        fake(11),
        Node {
            level: 0,
            children: vec![cid(1)],
        },
    );
    assert!(is_corrupt(all_chunks(&s, &fake(11), 0)));
    assert!(is_corrupt(all_nodes(&s, &fake(11), 0)));
    assert!(is_corrupt(changed_chunks(&s, &fake(11), &BlobId::ZERO, 0)));
    // An id reused at a position where it does not fit (same level, other count).
    let leaf72 = Node {
        level: 0,
        children: vec![cid(1); 72],
    };
    s.put(fake(12), leaf72.clone());
    s.put(
        fake(13),
        Node {
            level: 1,
            children: vec![fake(12), fake(12)],
        },
    );
    assert!(is_corrupt(all_nodes(&s, &fake(13), 200)));
    assert!(is_corrupt(all_chunks(&s, &fake(13), 200)));
    // Builder over a corrupt base: error, then poisoned.
    let mut b = TreeBuilder::new(&mut s, Some(fake(3)), 200);
    assert!(is_corrupt(b.set(0, cid(2))));
    assert!(b.set(1, cid(2)).is_err());
    assert!(b.finish().is_err());
    // Builder over a base of another geometry.
    let mut s2 = MapStore::default();
    let ids: Vec<_> = (0..300).map(|i| cid(i + 1)).collect();
    let r300 = reference_root(&mut s2, &ids);
    assert!(is_corrupt(build(&mut s2, Some(r300), 100, [(0, cid(5))])));
    assert!(is_corrupt(build(&mut s2, Some(r300), 20000, [(0, cid(5))])));
}

/// A store whose `store` fails: the error surfaces and the builder is poisoned.
#[test]
fn store_failure_propagates() {
    struct Failing;
    impl NodeStore for Failing {
        fn load(&self, _: &BlobId) -> Result<Node> {
            unreachable!()
        }
        fn store(&mut self, _: &Node) -> Result<BlobId> {
            Err(Error::Invalid {
                what: "test",
                reason: "full".into(),
            })
        }
    }
    let mut f = Failing;
    let mut b = TreeBuilder::new(&mut f, None, 1000);
    b.set(0, cid(1)).unwrap();
    assert!(b.set(500, cid(1)).is_err()); // closes the first leaf
    assert!(b.finish().is_err());
    let mut b = TreeBuilder::new(&mut f, None, 1000);
    b.set(0, cid(1)).unwrap();
    assert!(b.finish().is_err());
}

/// `first_nonzero_in` over a 1 TiB disk: an empty area costs nothing however long; an area over
/// data answers after one path; a run in a leaf that also holds data loads that path.
#[test]
fn first_nonzero_in_costs_the_run_edges() {
    let chunks = 1u64 << 24;
    let d = depth(chunks) as u64;
    let mut s = MapStore::default();
    // 200 chunks of data from chunk 2^20: one full leaf, one partly.
    let data: Vec<(u64, BlobId)> = (0..200u64).map(|k| (1 << 20 | k, cid(1))).collect();
    let root = build(&mut s, None, chunks, data.iter().copied()).unwrap();
    let loads = |s: &MapStore, runs: &[(u64, u64)]| {
        let l0 = s.loads.get();
        let r = first_nonzero_in(s, &root, chunks, runs).unwrap();
        (r, s.loads.get() - l0)
    };
    // Zeros everywhere but the data: the path to the partly filled leaf, and that leaf.
    let around = [(0, 1 << 20), ((1 << 20) + 200, chunks - (1 << 20) - 200)];
    assert_eq!(loads(&s, &around), (None, d));
    assert_eq!(loads(&s, &[(0, chunks)]), (Some(1 << 20), d));
    assert_eq!(
        loads(&s, &[(5, 3), ((1 << 20) + 100, 1)]).0,
        Some((1 << 20) + 100)
    );
    assert_eq!(loads(&s, &[]), (None, 0));
    assert_eq!(
        first_nonzero_in(&s, &BlobId::ZERO, chunks, &[(0, chunks)]).unwrap(),
        None
    );
}

// ---- properties ----

/// A disk described by painted segments over zeros: (start, len, value, noisy).
type Segs = Vec<(usize, usize, u32, bool)>;

fn paint(disk: &mut [u32], segs: &Segs) {
    let n = disk.len();
    for &(s, l, v, noisy) in segs {
        let s = s % n;
        for (i, c) in disk.iter_mut().enumerate().take((s + l).min(n)).skip(s) {
            *c = if noisy {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(v * 97) >> 7) % 5
            } else {
                v
            };
        }
    }
}

fn segs() -> impl Strategy<Value = Segs> {
    prop::collection::vec((0usize..5000, 1usize..700, 0u32..5, any::<bool>()), 0..8)
}

fn ids_of(disk: &[u32]) -> Vec<BlobId> {
    disk.iter().map(|&v| cid(v)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// base tree + set(read chunks) == tree built from scratch of the new content.
    #[test]
    fn incremental_equals_scratch(
        n in 1usize..5000,
        old_segs in segs(),
        new_segs in segs(),
        points in prop::collection::vec((0usize..5000, 0u32..6), 0..20),
        extra in prop::collection::vec(0usize..5000, 0..40),
    ) {
        let chunks = n as u64;
        let mut old = vec![0u32; n];
        paint(&mut old, &old_segs);
        let mut new = old.clone();
        paint(&mut new, &new_segs);
        for &(i, v) in &points {
            new[i % n] = v;
        }
        let (old_ids, new_ids) = (ids_of(&old), ids_of(&new));
        let mut s = MapStore::default();
        let old_ref = reference_root(&mut s, &old_ids);
        let new_ref = reference_root(&mut s, &new_ids);

        // From scratch, setting every chunk / only non-zero chunks.
        let all = (0..chunks).map(|i| (i, new_ids[i as usize]));
        let scratch = build(&mut s, None, chunks, all).unwrap();
        prop_assert_eq!(scratch, new_ref);
        let nz = (0..chunks).filter(|&i| !new_ids[i as usize].is_zero());
        let scratch_nz = build(&mut s, None, chunks, nz.map(|i| (i, new_ids[i as usize])))
            .unwrap();
        prop_assert_eq!(scratch_nz, new_ref);
        // Deterministic.
        let again = build(&mut s, None, chunks, (0..chunks).map(|i| (i, new_ids[i as usize])))
            .unwrap();
        prop_assert_eq!(again, scratch);

        // Incremental: changed chunks plus some unchanged ones that were re-read.
        let diff: Vec<u64> = (0..chunks).filter(|&i| old[i as usize] != new[i as usize])
            .collect();
        let mut read: Vec<u64> = diff.clone();
        read.extend(extra.iter().map(|&e| (e % n) as u64));
        read.sort_unstable();
        read.dedup();
        let stores0 = s.stores;
        let inc = build(&mut s, Some(old_ref), chunks,
            read.iter().map(|&i| (i, new_ids[i as usize]))).unwrap();
        prop_assert_eq!(inc, new_ref);
        // Only paths to changed chunks are stored.
        prop_assert!(s.stores - stores0 <= diff.len() as u64 * depth(chunks) as u64);
        if diff.is_empty() {
            prop_assert_eq!(inc, old_ref);
        }

        // changed_chunks == naive comparison, both ways.
        prop_assert_eq!(&changed_chunks(&s, &old_ref, &new_ref, chunks).unwrap(), &diff);
        prop_assert_eq!(&changed_chunks(&s, &new_ref, &old_ref, chunks).unwrap(), &diff);
        prop_assert!(changed_chunks(&s, &new_ref, &new_ref, chunks).unwrap().is_empty());
        let nz_new: Vec<u64> = (0..chunks).filter(|&i| new[i as usize] != 0).collect();
        prop_assert_eq!(&changed_chunks(&s, &BlobId::ZERO, &new_ref, chunks).unwrap(), &nz_new);

        // for_each_chunk yields exactly the non-zero ids, ascending.
        let got = all_chunks(&s, &new_ref, chunks).unwrap();
        let want: Vec<(u64, BlobId)> = nz_new.iter().map(|&i| (i, new_ids[i as usize]))
            .collect();
        prop_assert_eq!(got, want);

        // first_nonzero_in == the first non-zero chunk inside the runs (some of `points`).
        let mut runs: Vec<(u64, u64)> = points.iter().map(|&(i, v)| ((i % n) as u64, v as u64 + 1))
            .collect();
        runs.sort_unstable();
        let mut disjoint: Vec<(u64, u64)> = Vec::new();
        for (f, c) in runs {
            let c = c.min(chunks - f);
            match disjoint.last() {
                Some(&(pf, pc)) if pf + pc > f => {}
                _ => disjoint.push((f, c)),
            }
        }
        let naive = disjoint.iter().flat_map(|&(f, c)| f..f + c)
            .find(|&i| new[i as usize] != 0);
        prop_assert_eq!(first_nonzero_in(&s, &new_ref, chunks, &disjoint).unwrap(), naive);

        // chunk_id at a few positions.
        for &(i, _) in points.iter().take(5) {
            let i = (i % n) as u64;
            prop_assert_eq!(chunk_id(&s, &new_ref, chunks, i).unwrap(), new_ids[i as usize]);
        }
        prop_assert_eq!(chunk_id(&s, &new_ref, chunks, chunks - 1).unwrap(), new_ids[n - 1]);

        // for_each_node: distinct stored nodes, parents first, ids match content.
        let nodes = all_nodes(&s, &new_ref, chunks).unwrap();
        let mut seen = HashSet::new();
        for (k, (id, node)) in nodes.iter().enumerate() {
            prop_assert_eq!(node_id(node), *id);
            prop_assert!(!id.is_zero());
            if k == 0 {
                prop_assert_eq!(*id, new_ref);
            } else {
                let parent_seen = nodes[..k].iter().any(|(_, p)| p.children.contains(id));
                prop_assert!(parent_seen);
            }
            prop_assert!(seen.insert(*id));
        }
        prop_assert_eq!(nodes.is_empty(), new_ref.is_zero());
    }

    /// Arbitrary (possibly garbage) nodes in the store: readers return, never panic or loop.
    #[test]
    fn garbage_trees_never_panic(
        chunks in 0u64..40000,
        nodes in prop::collection::vec(
            (0u8..=13, 0usize..=130, prop::collection::vec(0u8..6, 1..8)), 1..6),
        index in 0u64..40000,
    ) {
        let fake = |b: u8| if b == 0 { BlobId::ZERO } else { BlobId([b; 32]) };
        let mut s = MapStore::default();
        for (k, (level, count, kids)) in nodes.iter().enumerate() {
            let children = (0..*count).map(|c| fake(kids[c % kids.len()])).collect();
            s.put(fake(k as u8 + 1), Node { level: *level, children });
        }
        let root = fake(1);
        let _ = all_chunks(&s, &root, chunks);
        let _ = all_nodes(&s, &root, chunks);
        let _ = changed_chunks(&s, &root, &fake(2), chunks);
        let _ = chunk_id(&s, &root, chunks, index);
        let mut b = TreeBuilder::new(&mut s, Some(root), chunks);
        let _ = b.set(index, cid(1)).and_then(|_| b.finish());
    }

    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(n) = Node::decode(&bytes) {
            prop_assert_eq!(n.encode(), bytes);
        }
    }

    #[test]
    fn encode_decode_round_trip(level in 0u8..=12, kids in prop::collection::vec(0u32..9, 1..=128)) {
        let n = Node { level, children: ids_of(&kids) };
        prop_assert_eq!(Node::decode(&n.encode()).unwrap(), n);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// differing_chunks == a chunk-by-chunk comparison of two disks of any sizes (depths 1-3;
    /// beyond `from`'s end counts as zeros), and loads only nodes on differing paths.
    #[test]
    fn differing_chunks_equals_brute_force(
        na in 0usize..20_000,
        nb in 0usize..20_000,
        old_segs in segs(),
        new_segs in segs(),
        points in prop::collection::vec((0usize..20_000, 0u32..6), 0..20),
        same_base in any::<bool>(),
    ) {
        let mut old = vec![0u32; na];
        paint(&mut old, &old_segs);
        // Often the new disk starts from the old one (small diffs, some changed back).
        let mut new: Vec<u32> = if same_base {
            (0..nb).map(|i| old.get(i).copied().unwrap_or(0)).collect()
        } else {
            vec![0u32; nb]
        };
        paint(&mut new, &new_segs);
        for &(i, v) in &points {
            if nb > 0 {
                new[i % nb] = v;
            }
        }
        let mut s = MapStore::default();
        let a = TreeRef { root: reference_root(&mut s, &ids_of(&old)), chunks: na as u64 };
        let b = TreeRef { root: reference_root(&mut s, &ids_of(&new)), chunks: nb as u64 };
        let expected: Vec<(u64, BlobId)> = (0..nb)
            .filter(|&i| old.get(i).copied().unwrap_or(0) != new[i])
            .map(|i| (i as u64, cid(new[i])))
            .collect();
        s.loads.set(0);
        let mut got = Vec::new();
        differing_chunks(&s, a, b, &mut |i, id| {
            got.push((i, id));
            Ok(())
        })
        .unwrap();
        prop_assert_eq!(&got, &expected);
        let d = depth(na as u64).max(depth(nb as u64)) as u64;
        prop_assert!(s.loads.get() <= 2 * d * (expected.len() as u64 + 2),
            "{} loads for {} differing chunks", s.loads.get(), expected.len());
    }
}

#[test]
fn differing_chunks_cost_follows_the_change_not_the_size() {
    // 2^24 chunks (1 TiB of 64 KiB chunks), 3 chunks differ far apart.
    let chunks = 1u64 << 24;
    let mut s = MapStore::default();
    let a = build(&mut s, None, chunks, [(5, cid(1)), (9_000_000, cid(2))]).unwrap();
    let b = build(
        &mut s,
        Some(a),
        chunks,
        [(5, cid(3)), (7_000_000, cid(4)), (16_000_000, BlobId::ZERO)],
    )
    .unwrap();
    let b2 = build(&mut s, Some(b), chunks, [(16_000_000, cid(5))]).unwrap();
    s.loads.set(0);
    let mut got = Vec::new();
    let (ta, tb) = (TreeRef { root: a, chunks }, TreeRef { root: b2, chunks });
    differing_chunks(&s, ta, tb, &mut |i, id| {
        got.push((i, id));
        Ok(())
    })
    .unwrap();
    assert_eq!(
        got,
        vec![(5, cid(3)), (7_000_000, cid(4)), (16_000_000, cid(5))]
    );
    assert!(s.loads.get() <= 24, "{} loads", s.loads.get());
    // A chunk changed and changed back in between is not a difference.
    let back = build(&mut s, Some(b2), chunks, [(5, cid(1))]).unwrap();
    got.clear();
    differing_chunks(&s, ta, TreeRef { root: back, chunks }, &mut |i, _| {
        got.push((i, BlobId::ZERO));
        Ok(())
    })
    .unwrap();
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        vec![7_000_000, 16_000_000]
    );
}
