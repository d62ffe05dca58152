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
    for_each_new_node(store, root, chunks, &mut HashMap::new(), f)
}

/// Nodes already visited by [`for_each_new_node`]: node id -> (level, child count).
pub type SeenNodes = HashMap<BlobId, (u8, usize)>;

/// [`for_each_node`] over several trees: nodes in `seen` (visited in an earlier call, in this
/// tree or another) are not visited or descended into again, so walking every restore point of
/// a repository costs the number of distinct nodes, not the sum of the trees' sizes.
pub fn for_each_new_node<S: NodeStore>(
    store: &S,
    root: &BlobId,
    chunks: u64,
    seen: &mut SeenNodes,
    f: &mut dyn FnMut(&BlobId, &Node) -> Result<()>,
) -> Result<()> {
    struct Walk<'a, S> {
        store: &'a S,
        chunks: u64,
        /// Visited node id -> (level, child count).
        seen: &'a mut SeenNodes,
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
        seen,
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

/// The first chunk inside `runs` (ascending, disjoint, non-empty `(first, count)` within the
/// disk) whose id is not ZERO, or None when they are all ZERO.
///
/// Descends only into non-ZERO subtrees overlapping a run; a non-ZERO subtree lying wholly
/// inside a run answers without looking further than the path to its first chunk. So the cost
/// is the nodes at the runs' edges (bounded by the stored nodes), not the runs' length: an
/// empty area of a 1 TiB disk costs nothing, however long.
pub fn first_nonzero_in<S: NodeStore>(
    store: &S,
    root: &BlobId,
    chunks: u64,
    runs: &[(u64, u64)],
) -> Result<Option<u64>> {
    /// The first non-ZERO chunk of the non-ZERO subtree `id` at (`level`, `start`).
    fn first_chunk<S: NodeStore>(
        store: &S,
        id: &BlobId,
        level: u8,
        start: u64,
        chunks: u64,
    ) -> Result<u64> {
        let (mut id, mut level, mut start) = (*id, level, start);
        loop {
            let node = load_checked(store, &id, level, start, chunks)?;
            // A stored node has a non-ZERO child (load_checked refuses one that has none).
            let slot = node
                .children
                .iter()
                .position(|c| !c.is_zero())
                .ok_or_else(|| corrupt(format!("node {id:#} has no non-zero child")))?;
            start = child_start(level, start, slot);
            if level == 0 {
                return Ok(start);
            }
            id = node.children[slot];
            level -= 1;
        }
    }
    fn walk<S: NodeStore>(
        store: &S,
        id: &BlobId,
        level: u8,
        start: u64,
        chunks: u64,
        runs: &[(u64, u64)],
    ) -> Result<Option<u64>> {
        let node = load_checked(store, id, level, start, chunks)?;
        for (slot, child) in node.children.iter().enumerate() {
            if child.is_zero() {
                continue;
            }
            let cs = child_start(level, start, slot);
            let ce = (cs as u128 + child_cap(level)).min(chunks as u128) as u64;
            // The first run ending after `cs`; none means no run is left anywhere.
            let i = runs.partition_point(|&(f, n)| f + n <= cs);
            let Some(&(f, n)) = runs.get(i) else {
                return Ok(None);
            };
            if f >= ce {
                continue;
            }
            if level == 0 {
                return Ok(Some(cs));
            }
            if f <= cs && f + n >= ce {
                return first_chunk(store, child, level - 1, cs, chunks).map(Some);
            }
            if let Some(x) = walk(store, child, level - 1, cs, chunks, runs)? {
                return Ok(Some(x));
            }
        }
        Ok(None)
    }
    if root.is_zero() || runs.is_empty() {
        return Ok(None);
    }
    walk(store, root, depth(chunks) - 1, 0, chunks, runs)
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

/// Looks up chunk ids by index, keeping the nodes on the path to the last chunk it looked up:
/// lookups near one another (a memory stream's pages, mostly ascending) load each node once.
/// Nodes are checked against the geometry as [`chunk_id`] checks them.
pub struct ChunkCursor {
    root: BlobId,
    chunks: u64,
    /// (level, start, children) from the root down.
    path: Vec<(u8, u64, Vec<BlobId>)>,
}

impl ChunkCursor {
    pub fn new(root: BlobId, chunks: u64) -> ChunkCursor {
        ChunkCursor {
            root,
            chunks,
            path: Vec::new(),
        }
    }

    /// Id of chunk `index` (ZERO when zero).
    pub fn get<S: NodeStore + ?Sized>(&mut self, store: &S, index: u64) -> Result<BlobId> {
        if index >= self.chunks {
            return Err(Error::Invalid {
                what: "chunk index",
                reason: format!("{index} is beyond the disk's {} chunks", self.chunks),
            });
        }
        while self.path.last().is_some_and(|(level, start, _)| {
            index < *start || (index - start) as u128 >= node_cap(*level)
        }) {
            self.path.pop();
        }
        if self.path.is_empty() {
            if self.root.is_zero() {
                return Ok(BlobId::ZERO);
            }
            let level = depth(self.chunks) - 1;
            let node = load_checked(store, &self.root, level, 0, self.chunks)?;
            self.path.push((level, 0, node.children));
        }
        loop {
            let (level, start, children) = self.path.last().expect("not empty");
            let (level, start) = (*level, *start);
            let slot = ((index - start) as u128 / child_cap(level)) as usize;
            let id = children[slot];
            if level == 0 || id.is_zero() {
                return Ok(id);
            }
            let start = child_start(level, start, slot);
            let node = load_checked(store, &id, level - 1, start, self.chunks)?;
            self.path.push((level - 1, start, node.children));
        }
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

mod diff;
pub use diff::{differing_chunks, TreeRef};

#[cfg(test)]
mod tests;
