//! Disk index trees. FORMAT.md "Disk indexes".
//!
//! A disk of `n` chunks is indexed by a hash tree of fan-out [`FANOUT`]: leaves (level 0) hold
//! the chunk ids of up to FANOUT consecutive chunks, a node of level k the ids of up to FANOUT
//! nodes of level k-1. The depth is the smallest number of levels whose capacity FANOUT^levels
//! covers `n` (at least one level: a disk of <= FANOUT chunks has a single leaf as root).
//! A subtree whose chunks are all zero has id [`BlobId::ZERO`] and is not stored; a chunk that
//! is all zero has id ZERO. Nodes are blobs of kind Tree; unchanged subtrees keep their id, so a
//! new restore point only stores the nodes on paths to changed chunks.
//!
//! Node plaintext: level u8 || count u16 LE || count * id(32); a node's children are positions
//! [i*cap, (i+1)*cap) of its range; trailing positions beyond the disk are absent (count < FANOUT
//! only at the right edge). A node with all children ZERO is never stored (its id is ZERO).
//!
//! Every reader here validates each loaded node against the geometry: its level must be the one
//! expected at that depth, its child count the one the disk size implies at that position, and
//! it must not be all ZERO (such a node is never stored, so one found in a tree is corruption).
//! Levels strictly decrease on the way down, so a corrupt or malicious tree can cause an
//! [`Error::Corrupt`] but never a panic, an unbounded recursion or a loop.
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::id::BlobId;

pub const FANOUT: usize = 128;

/// Highest level [`Node::decode`] accepts. A u64 chunk count needs at most 10 levels.
pub const MAX_LEVEL: u8 = 12;

/// Size of the encoded header (level u8 || count u16 LE).
const HEADER: usize = 3;

/// A decoded tree node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub level: u8,
    pub children: Vec<BlobId>,
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        kind: "index node",
        reason,
    }
}

impl Node {
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.children.len() <= FANOUT);
        let mut out = Vec::with_capacity(encoded_len(self.children.len()));
        out.push(self.level);
        out.extend_from_slice(&(self.children.len() as u16).to_le_bytes());
        for c in &self.children {
            out.extend_from_slice(c.as_bytes());
        }
        out
    }

    /// Bounded: at most FANOUT children, level <= 12, exact length.
    pub fn decode(bytes: &[u8]) -> Result<Node> {
        if bytes.len() < HEADER {
            return Err(corrupt(format!(
                "{} bytes, shorter than the header",
                bytes.len()
            )));
        }
        let level = bytes[0];
        if level > MAX_LEVEL {
            return Err(corrupt(format!("level {level} exceeds {MAX_LEVEL}")));
        }
        let count = u16::from_le_bytes([bytes[1], bytes[2]]) as usize;
        if count == 0 || count > FANOUT {
            return Err(corrupt(format!("{count} children, expected 1..={FANOUT}")));
        }
        let want = encoded_len(count);
        if bytes.len() != want {
            return Err(corrupt(format!(
                "{} bytes for {count} children, expected {want}",
                bytes.len()
            )));
        }
        let children = bytes[HEADER..]
            .chunks_exact(BlobId::LEN)
            .map(|c| BlobId(c.try_into().expect("chunks_exact yields 32 bytes")))
            .collect();
        Ok(Node { level, children })
    }
}

/// Encoded size of a node with `count` children.
pub fn encoded_len(count: usize) -> usize {
    HEADER + count * BlobId::LEN
}

/// How nodes are loaded and stored; the repository implements it over its packs, tests over a map.
/// `store` receives a node that is not all-ZERO and returns its id (computed with
/// `Keys::blob_id(BlobKind::Tree, &node.encode())`); it deduplicates as it sees fit.
pub trait NodeStore {
    fn load(&self, id: &BlobId) -> Result<Node>;
    fn store(&mut self, node: &Node) -> Result<BlobId>;
}

/// Number of levels for a disk of `chunks` chunks (>= 1).
pub fn depth(chunks: u64) -> u8 {
    let mut levels = 1u8;
    let mut cap = FANOUT as u128;
    while cap < chunks as u128 {
        levels += 1;
        cap *= FANOUT as u128;
    }
    levels
}

/// Chunks covered by one child of a node at `level` (FANOUT^level). u128: never overflows for
/// levels reachable from a u64 chunk count (at most 9, and MAX_LEVEL 12 gives 2^84).
fn child_cap(level: u8) -> u128 {
    (FANOUT as u128).pow(level as u32)
}

/// Chunks covered by a node at `level` (FANOUT^(level+1)).
fn node_cap(level: u8) -> u128 {
    child_cap(level) * FANOUT as u128
}

/// Number of children of the node at `level` whose range starts at chunk `start` (0 when the
/// node lies wholly beyond the disk, which no valid tree references).
fn child_count(level: u8, start: u64, chunks: u64) -> usize {
    if start >= chunks {
        return 0;
    }
    let rest = (chunks - start) as u128;
    let cap = child_cap(level);
    rest.div_ceil(cap).min(FANOUT as u128) as usize
}

/// Loads the node `id` expected at `level` with range starting at `start`, checking it against
/// the geometry. `id` must not be ZERO.
fn load_checked<S: NodeStore + ?Sized>(
    store: &S,
    id: &BlobId,
    level: u8,
    start: u64,
    chunks: u64,
) -> Result<Node> {
    debug_assert!(!id.is_zero());
    let node = store.load(id)?;
    check_node(id, &node, level, start, chunks)?;
    Ok(node)
}

fn check_node(id: &BlobId, node: &Node, level: u8, start: u64, chunks: u64) -> Result<()> {
    if node.level != level {
        return Err(corrupt(format!(
            "node {id:#} at chunk {start} has level {}, expected {level}",
            node.level
        )));
    }
    let want = child_count(level, start, chunks);
    if node.children.len() != want || want == 0 {
        return Err(corrupt(format!(
            "node {id:#} (level {level}, chunk {start}) has {} children, the disk of {chunks} \
             chunks implies {want}",
            node.children.len()
        )));
    }
    if node.children.iter().all(BlobId::is_zero) {
        return Err(corrupt(format!(
            "node {id:#} (level {level}, chunk {start}) is stored but all its children are zero"
        )));
    }
    Ok(())
}

/// Children of the node `id` at (`level`, `start`): loaded and checked, or all ZERO when `id`
/// is ZERO.
fn children_of<S: NodeStore + ?Sized>(
    store: &S,
    id: &BlobId,
    level: u8,
    start: u64,
    chunks: u64,
) -> Result<Vec<BlobId>> {
    if id.is_zero() {
        Ok(vec![BlobId::ZERO; child_count(level, start, chunks)])
    } else {
        Ok(load_checked(store, id, level, start, chunks)?.children)
    }
}

/// Start chunk of child `slot` of a node at (`level`, `start`). Only called for slots that exist
/// (so the result is < chunks and fits in u64).
fn child_start(level: u8, start: u64, slot: usize) -> u64 {
    (start as u128 + slot as u128 * child_cap(level)) as u64
}

/// One partially built node of the [`TreeBuilder`]'s stack.
struct Frame {
    level: u8,
    start: u64,
    /// The base tree's id for this subtree (ZERO when the base has zeros here).
    base_id: BlobId,
    /// Current children: the base's, with updates applied.
    children: Vec<BlobId>,
    /// Some child differs from the base's.
    changed: bool,
}

impl Frame {
    fn covers(&self, index: u64) -> bool {
        index >= self.start && ((index - self.start) as u128) < node_cap(self.level)
    }

    fn slot(&self, index: u64) -> usize {
        ((index - self.start) as u128 / child_cap(self.level)) as usize
    }
}

/// Builds the tree of a new restore point from a base tree (or an all-zero disk when `base` is
/// None) and the ids of chunks that were read, in strictly ascending chunk order. Chunks not
/// `set` keep the base's id. Loads only base nodes on paths to set chunks; memory O(depth*FANOUT).
/// Unchanged subtrees keep the base's node ids without being rewritten.
///
/// A node none of whose children changed (including one whose chunks were all `set` to the ids
/// they already had) keeps the base's id and is not stored again. A rejected `set` (bad index)
/// has no effect; after a load or store failure the builder is poisoned: every later call fails.
pub struct TreeBuilder<'s, S: NodeStore> {
    store: &'s mut S,
    base: BlobId,
    chunks: u64,
    depth: u8,
    /// Open nodes from the root (index 0) down; each covers the last set index.
    stack: Vec<Frame>,
    last: Option<u64>,
    poisoned: bool,
}

impl<'s, S: NodeStore> TreeBuilder<'s, S> {
    /// `base` must describe a disk of the same `chunks` count (the caller rescans otherwise).
    pub fn new(store: &'s mut S, base: Option<BlobId>, chunks: u64) -> TreeBuilder<'s, S> {
        let depth = depth(chunks);
        TreeBuilder {
            store,
            base: base.unwrap_or(BlobId::ZERO),
            chunks,
            depth,
            stack: Vec::with_capacity(depth as usize),
            last: None,
            poisoned: false,
        }
    }

    /// Set chunk `index` (strictly greater than the previous call's) to `id` (ZERO for zeros).
    /// Err(Invalid) for out-of-order or out-of-range indexes.
    pub fn set(&mut self, index: u64, id: BlobId) -> Result<()> {
        self.check_poison()?;
        if index >= self.chunks {
            return Err(Error::Invalid {
                what: "chunk index",
                reason: format!("{index} is beyond the disk's {} chunks", self.chunks),
            });
        }
        if let Some(last) = self.last {
            if index <= last {
                return Err(Error::Invalid {
                    what: "chunk index",
                    reason: format!("{index} is not after the previous index {last}"),
                });
            }
        }
        match self.place(index, id) {
            Ok(()) => {
                self.last = Some(index);
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// The new root id (ZERO for an all-zero disk).
    pub fn finish(mut self) -> Result<BlobId> {
        self.check_poison()?;
        let mut root = self.base;
        while !self.stack.is_empty() {
            root = self.pop()?;
        }
        Ok(root)
    }

    fn check_poison(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Invalid {
                what: "tree builder use",
                reason: "an earlier call failed".into(),
            });
        }
        Ok(())
    }

    fn place(&mut self, index: u64, id: BlobId) -> Result<()> {
        // Close the nodes the index has moved past. The root covers every valid index.
        while self.stack.last().is_some_and(|f| !f.covers(index)) {
            self.pop()?;
        }
        if self.stack.is_empty() {
            let level = self.depth - 1;
            let children = children_of(&*self.store, &self.base, level, 0, self.chunks)?;
            self.stack.push(Frame {
                level,
                start: 0,
                base_id: self.base,
                children,
                changed: false,
            });
        }
        // Open nodes down to the leaf holding the index.
        loop {
            let top = self.stack.last().expect("stack is not empty");
            if top.level == 0 {
                break;
            }
            let slot = top.slot(index);
            let base_id = top.children[slot];
            let level = top.level - 1;
            let start = child_start(top.level, top.start, slot);
            let children = children_of(&*self.store, &base_id, level, start, self.chunks)?;
            self.stack.push(Frame {
                level,
                start,
                base_id,
                children,
                changed: false,
            });
        }
        let leaf = self.stack.last_mut().expect("stack is not empty");
        let slot = leaf.slot(index);
        if leaf.children[slot] != id {
            leaf.children[slot] = id;
            leaf.changed = true;
        }
        Ok(())
    }

    /// Finalizes the bottom open node, records its id in its parent, and returns the id.
    fn pop(&mut self) -> Result<BlobId> {
        let frame = self.stack.pop().expect("pop on a non-empty stack");
        let id = if !frame.changed {
            frame.base_id
        } else if frame.children.iter().all(BlobId::is_zero) {
            BlobId::ZERO
        } else {
            let node = Node {
                level: frame.level,
                children: frame.children,
            };
            match self.store.store(&node) {
                Ok(id) => id,
                Err(e) => {
                    self.poisoned = true;
                    return Err(e);
                }
            }
        };
        if let Some(parent) = self.stack.last_mut() {
            let slot = parent.slot(frame.start);
            if parent.children[slot] != id {
                parent.children[slot] = id;
                parent.changed = true;
            }
        }
        Ok(id)
    }
}

/// Visit every chunk whose id is not ZERO, in ascending order, skipping ZERO subtrees.
/// Validates node levels and counts against the geometry (a corrupt tree is an error, not a panic).
pub fn for_each_chunk<S: NodeStore>(
    store: &S,
    root: &BlobId,
    chunks: u64,
    f: &mut dyn FnMut(u64, &BlobId) -> Result<()>,
) -> Result<()> {
    fn walk<S: NodeStore>(
        store: &S,
        id: &BlobId,
        level: u8,
        start: u64,
        chunks: u64,
        f: &mut dyn FnMut(u64, &BlobId) -> Result<()>,
    ) -> Result<()> {
        let node = load_checked(store, id, level, start, chunks)?;
        for (slot, child) in node.children.iter().enumerate() {
            if child.is_zero() {
                continue;
            }
            let cs = child_start(level, start, slot);
            if level == 0 {
                f(cs, child)?;
            } else {
                walk(store, child, level - 1, cs, chunks, f)?;
            }
        }
        Ok(())
    }
    if root.is_zero() {
        return Ok(());
    }
    walk(store, root, depth(chunks) - 1, 0, chunks, f)
}

/// Visit every stored node id of the tree (for GC marking and check), parents before children.
///
/// Each distinct node is visited once: a subtree whose id was already visited (identical content
/// elsewhere on the disk) is not descended into again, so the cost is proportional to the number
/// of distinct nodes. A repeated id is still checked against the geometry of every position it
/// appears at.
pub fn for_each_node<S: NodeStore>(
    store: &S,
    root: &BlobId,
    chunks: u64,
    f: &mut dyn FnMut(&BlobId, &Node) -> Result<()>,
) -> Result<()> {
    struct Walk<'a, S> {
        store: &'a S,
        chunks: u64,
        /// Visited node id -> (level, child count).
        seen: HashMap<BlobId, (u8, usize)>,
    }
    impl<S: NodeStore> Walk<'_, S> {
        fn walk(
            &mut self,
            id: &BlobId,
            level: u8,
            start: u64,
            f: &mut dyn FnMut(&BlobId, &Node) -> Result<()>,
        ) -> Result<()> {
            if let Some(&(l, count)) = self.seen.get(id) {
                if l != level || count != child_count(level, start, self.chunks) {
                    return Err(corrupt(format!(
                        "node {id:#} (level {l}, {count} children) also appears at level \
                         {level}, chunk {start}, where it does not fit"
                    )));
                }
                return Ok(());
            }
            let node = load_checked(self.store, id, level, start, self.chunks)?;
            self.seen.insert(*id, (level, node.children.len()));
            f(id, &node)?;
            if level > 0 {
                for (slot, child) in node.children.iter().enumerate() {
                    if !child.is_zero() {
                        self.walk(child, level - 1, child_start(level, start, slot), f)?;
                    }
                }
            }
            Ok(())
        }
    }
    if root.is_zero() {
        return Ok(());
    }
    let mut w = Walk {
        store,
        chunks,
        seen: HashMap::new(),
    };
    w.walk(root, depth(chunks) - 1, 0, f)
}

/// Chunk indexes whose ids differ between two trees of the same geometry, ascending. Descends only
/// where node ids differ, so the cost is proportional to the change, not the disk size.
pub fn changed_chunks<S: NodeStore>(
    store: &S,
    a: &BlobId,
    b: &BlobId,
    chunks: u64,
) -> Result<Vec<u64>> {
    fn walk<S: NodeStore>(
        store: &S,
        a: &BlobId,
        b: &BlobId,
        level: u8,
        start: u64,
        chunks: u64,
        out: &mut Vec<u64>,
    ) -> Result<()> {
        if a == b {
            return Ok(());
        }
        let ca = children_of(store, a, level, start, chunks)?;
        let cb = children_of(store, b, level, start, chunks)?;
        // Both have the geometry's count (checked, or built so for ZERO).
        for (slot, (x, y)) in ca.iter().zip(cb.iter()).enumerate() {
            if x == y {
                continue;
            }
            let cs = child_start(level, start, slot);
            if level == 0 {
                out.push(cs);
            } else {
                walk(store, x, y, level - 1, cs, chunks, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(store, a, b, depth(chunks) - 1, 0, chunks, &mut out)?;
    Ok(out)
}

/// Id of chunk `index` (ZERO when zero); used by rewind/diff confirmation.
pub fn chunk_id<S: NodeStore>(store: &S, root: &BlobId, chunks: u64, index: u64) -> Result<BlobId> {
    if index >= chunks {
        return Err(Error::Invalid {
            what: "chunk index",
            reason: format!("{index} is beyond the disk's {chunks} chunks"),
        });
    }
    let mut id = *root;
    let mut level = depth(chunks) - 1;
    let mut start = 0u64;
    loop {
        if id.is_zero() {
            return Ok(BlobId::ZERO);
        }
        let node = load_checked(store, &id, level, start, chunks)?;
        let slot = ((index - start) as u128 / child_cap(level)) as usize;
        id = node.children[slot];
        if level == 0 {
            return Ok(id);
        }
        start = child_start(level, start, slot);
        level -= 1;
    }
}

/// What storing a tree cost: see [`metadata_cost`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeCost {
    /// Nodes passed to [`NodeStore::store`].
    pub nodes: u64,
    /// Sum of their encoded (plaintext) sizes.
    pub bytes: u64,
}

/// A [`NodeStore`] wrapper counting what is stored through it.
pub struct CountingStore<'a, S: NodeStore> {
    pub inner: &'a mut S,
    pub cost: TreeCost,
}

impl<S: NodeStore> NodeStore for CountingStore<'_, S> {
    fn load(&self, id: &BlobId) -> Result<Node> {
        self.inner.load(id)
    }

    fn store(&mut self, node: &Node) -> Result<BlobId> {
        self.cost.nodes += 1;
        self.cost.bytes += encoded_len(node.children.len()) as u64;
        self.inner.store(node)
    }
}

/// Metadata cost of a restore point: builds the tree over `base` with `changes` (ascending
/// (index, id) pairs) and returns the new root with the number and plaintext size of the nodes
/// stored.
pub fn metadata_cost<S: NodeStore>(
    store: &mut S,
    base: Option<BlobId>,
    chunks: u64,
    changes: impl IntoIterator<Item = (u64, BlobId)>,
) -> Result<(BlobId, TreeCost)> {
    let mut counting = CountingStore {
        inner: store,
        cost: TreeCost::default(),
    };
    let mut b = TreeBuilder::new(&mut counting, base, chunks);
    for (i, id) in changes {
        b.set(i, id)?;
    }
    let root = b.finish()?;
    Ok((root, counting.cost))
}

#[cfg(test)]
mod tests {
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
}
