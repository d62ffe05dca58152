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
use crate::error::Result;
use crate::id::BlobId;

pub const FANOUT: usize = 128;

/// A decoded tree node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub level: u8,
    pub children: Vec<BlobId>,
}

impl Node {
    pub fn encode(&self) -> Vec<u8> {
        todo!()
    }

    /// Bounded: at most FANOUT children, level <= 12, exact length.
    pub fn decode(bytes: &[u8]) -> Result<Node> {
        todo!()
    }
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
    todo!()
}

/// Builds the tree of a new restore point from a base tree (or an all-zero disk when `base` is
/// None) and the ids of chunks that were read, in strictly ascending chunk order. Chunks not
/// `set` keep the base's id. Loads only base nodes on paths to set chunks; memory O(depth*FANOUT).
/// Unchanged subtrees keep the base's node ids without being rewritten.
pub struct TreeBuilder<'s, S: NodeStore> {
    store: &'s mut S,
    // implementation detail
    _base: BlobId,
    _chunks: u64,
}

impl<'s, S: NodeStore> TreeBuilder<'s, S> {
    /// `base` must describe a disk of the same `chunks` count (the caller rescans otherwise).
    pub fn new(store: &'s mut S, base: Option<BlobId>, chunks: u64) -> TreeBuilder<'s, S> {
        todo!()
    }

    /// Set chunk `index` (strictly greater than the previous call's) to `id` (ZERO for zeros).
    /// Err(Invalid) for out-of-order or out-of-range indexes.
    pub fn set(&mut self, index: u64, id: BlobId) -> Result<()> {
        todo!()
    }

    /// The new root id (ZERO for an all-zero disk).
    pub fn finish(self) -> Result<BlobId> {
        todo!()
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
    todo!()
}

/// Visit every stored node id of the tree (for GC marking and check), parents before children.
pub fn for_each_node<S: NodeStore>(
    store: &S,
    root: &BlobId,
    chunks: u64,
    f: &mut dyn FnMut(&BlobId, &Node) -> Result<()>,
) -> Result<()> {
    todo!()
}

/// Chunk indexes whose ids differ between two trees of the same geometry, ascending. Descends only
/// where node ids differ, so the cost is proportional to the change, not the disk size.
pub fn changed_chunks<S: NodeStore>(
    store: &S,
    a: &BlobId,
    b: &BlobId,
    chunks: u64,
) -> Result<Vec<u64>> {
    todo!()
}

/// Id of chunk `index` (ZERO when zero); used by rewind/diff confirmation.
pub fn chunk_id<S: NodeStore>(store: &S, root: &BlobId, chunks: u64, index: u64) -> Result<BlobId> {
    todo!()
}
