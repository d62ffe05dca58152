//! The chunks that differ between two disk index trees of any sizes (`vmkeep diff`, rewind).
//!
//! Both trees are walked together from the top, descending only where the node ids differ: an
//! equal id means an identical subtree (a node's id covers its children's ids and count). So the
//! cost is the nodes on the paths to the differing chunks, whatever the disk's size and however
//! many restore points lie between the two, and a chunk that changed and changed back is
//! never reported (its id is the same again).
//!
//! Sizes may differ. The comparison is what a consumer sees after bringing an image of `from`
//! to `to`'s size (truncated, or grown with zeros): a chunk beyond `from`'s end counts as ZERO
//! there, chunks beyond `to`'s end are not compared. Trees of different depths are aligned by
//! treating the shallower one as a chain of virtual nodes above its root (slot 0 the tree,
//! the other slots beyond its disk). One chunk is compared by id where ids cannot say it all:
//! the one holding the smaller disk's end has a different length in each tree, so it is
//! reported even when the bytes a resized image holds are the same; `vmkeep-repo`'s diff
//! compares that chunk's content.

use super::{child_count, child_start, depth, load_checked, NodeStore};
use crate::error::Result;
use crate::id::BlobId;

/// A disk index tree: its root and its number of chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeRef {
    pub root: BlobId,
    pub chunks: u64,
}

/// Calls `f(index, to_id)` for every chunk of `to` whose id differs from `from`'s at the same
/// index, ascending; `to_id` is ZERO where the chunk reads as zeros in `to`. See the module
/// docs for sizes.
pub fn differing_chunks<S: NodeStore + ?Sized>(
    store: &S,
    from: TreeRef,
    to: TreeRef,
    f: &mut dyn FnMut(u64, BlobId) -> Result<()>,
) -> Result<()> {
    let (da, db) = (depth(from.chunks), depth(to.chunks));
    let top = da.max(db) - 1;
    let w = Walk { store, from, to };
    w.walk(
        top,
        0,
        Pos {
            id: from.root,
            level: da - 1,
        },
        Pos {
            id: to.root,
            level: db - 1,
        },
        f,
    )
}

/// A node of one tree: `id` at tree level `level`. Seen from a higher level it is virtual: a
/// node whose slot 0 is this one and whose other slots are ZERO.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Pos {
    id: BlobId,
    level: u8,
}

struct Walk<'a, S: ?Sized> {
    store: &'a S,
    from: TreeRef,
    to: TreeRef,
}

impl<S: NodeStore + ?Sized> Walk<'_, S> {
    fn walk(
        &self,
        level: u8,
        start: u64,
        a: Pos,
        b: Pos,
        f: &mut dyn FnMut(u64, BlobId) -> Result<()>,
    ) -> Result<()> {
        if a == b {
            return Ok(()); // identical subtrees (or both ZERO)
        }
        let cb = self.children(b, level, start, self.to.chunks)?;
        let ca = self.children(a, level, start, self.from.chunks)?;
        for (slot, &y) in cb.iter().enumerate() {
            let x = ca.get(slot).copied().unwrap_or(Pos {
                id: BlobId::ZERO,
                level: level.saturating_sub(1),
            });
            let cs = child_start(level, start, slot);
            if level == 0 {
                if x.id != y.id {
                    f(cs, y.id)?;
                }
            } else {
                self.walk(level - 1, cs, x, y, f)?;
            }
        }
        Ok(())
    }

    /// The children of `p` seen at (`level`, `start`) in a tree of `chunks` chunks, as
    /// positions one level down.
    fn children(&self, p: Pos, level: u8, start: u64, chunks: u64) -> Result<Vec<Pos>> {
        let below = level.saturating_sub(1);
        let zero = Pos {
            id: BlobId::ZERO,
            level: below,
        };
        let count = child_count(level, start, chunks);
        if p.id.is_zero() {
            return Ok(vec![zero; count]);
        }
        if p.level < level {
            // Virtual: the real node sits in slot 0, which is the only slot within the disk.
            let mut v = vec![zero; count];
            if let Some(first) = v.first_mut() {
                *first = p;
            }
            return Ok(v);
        }
        Ok(load_checked(self.store, &p.id, level, start, chunks)?
            .children
            .into_iter()
            .map(|id| Pos { id, level: below })
            .collect())
    }
}
