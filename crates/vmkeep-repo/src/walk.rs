//! The one walker of what a restore point references: for every disk its index tree nodes and
//! chunks, for every stream its index blobs and chunks, and for a memory stream also its op
//! stream's index blobs and chunks and its page images' tree nodes and chunks. GC's mark,
//! `check`, a stalled backup's verification and (next) replication all see restore points
//! through it, so none of them can forget a kind of blob.
//!
//! One [`Walker`] visits each distinct tree node and stream index blob once, over all the
//! restore points it walks: a subtree shared by many restore points (the common case: unchanged
//! parts of a disk) costs one visit, so walking a whole repository costs its distinct metadata,
//! not the sum of its disks' sizes.
use std::collections::HashSet;

use vmkeep_core::keys::BlobKind;
use vmkeep_core::manifest::Manifest;
use vmkeep_core::tree::{self, SeenNodes};
use vmkeep_core::BlobId;

use crate::error::{Error, Result};
use crate::index::BlobIndex;
use crate::nodes::RepoNodes;
use crate::Repository;

/// Which part of a restore point a blob belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner<'m> {
    Disk(&'m str),
    Stream(&'m str),
}

impl std::fmt::Display for Owner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Disk(d) => f.write_str(d),
            Owner::Stream(s) => write!(f, "stream:{s}"),
        }
    }
}

/// One referenced blob.
#[derive(Clone, Copy, Debug)]
pub struct Ref<'m> {
    pub id: BlobId,
    /// Tree: an index node or a stream index blob (read by the walker); Data: a chunk.
    pub kind: BlobKind,
    pub owner: Owner<'m>,
}

/// Walks restore points, remembering what it visited. The index to read blobs through is
/// given per walk (a long-running walker, like GC's mark, reloads it between walks).
pub struct Walker<'r> {
    repo: &'r Repository,
    nodes: SeenNodes,
    stream_indexes: HashSet<BlobId>,
}

impl<'r> Walker<'r> {
    pub fn new(repo: &'r Repository) -> Walker<'r> {
        Walker {
            repo,
            nodes: SeenNodes::new(),
            stream_indexes: HashSet::new(),
        }
    }

    /// Visit every blob `m` references that this walker has not visited before (each visited
    /// tree node stands for its whole subtree). Tree blobs are visited after they were read
    /// and verified; an unreadable one ends the walk of its disk or stream with its error
    /// (typed: damage, or a store error). `visit` may stop the walk by returning an error.
    pub fn walk<'m>(
        &mut self,
        index: &BlobIndex,
        m: &'m Manifest,
        visit: &mut dyn FnMut(&Ref<'m>) -> Result<()>,
    ) -> Result<()> {
        for d in &m.disks {
            self.walk_disk(index, m, d, visit)?;
        }
        for s in &m.streams {
            self.walk_stream(index, s, visit)?;
        }
        Ok(())
    }

    /// The walk of one disk only (check reports damage per disk).
    pub fn walk_disk<'m>(
        &mut self,
        index: &BlobIndex,
        m: &Manifest,
        d: &'m vmkeep_core::manifest::DiskEntry,
        visit: &mut dyn FnMut(&Ref<'m>) -> Result<()>,
    ) -> Result<()> {
        let chunks = d.size.div_ceil(self.repo.config.chunk_size as u64);
        self.walk_tree(index, &d.root, chunks, Owner::Disk(&d.name), visit, || {
            format!("index of restore point {} disk {}", m.id, d.name)
        })
    }

    /// The nodes and chunks of one index tree (a disk's or a page image's).
    fn walk_tree<'m>(
        &mut self,
        index: &BlobIndex,
        root: &BlobId,
        chunks: u64,
        owner: Owner<'m>,
        visit: &mut dyn FnMut(&Ref<'m>) -> Result<()>,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let nodes = RepoNodes::new(self.repo, index);
        // The visitor's own error travels through the core walk as a stand-in and comes back.
        let mut stopped: Option<Error> = None;
        let r = tree::for_each_new_node(&nodes, root, chunks, &mut self.nodes, &mut |id, node| {
            let mut each = |id: BlobId, kind| {
                visit(&Ref { id, kind, owner }).map_err(|e| {
                    stopped = Some(e);
                    vmkeep_core::Error::Invalid {
                        what: "walk",
                        reason: "stopped by its visitor".into(),
                    }
                })
            };
            each(*id, BlobKind::Tree)?;
            if node.level == 0 {
                for c in node.children.iter().filter(|c| !c.is_zero()) {
                    each(*c, BlobKind::Data)?;
                }
            }
            Ok(())
        });
        if let Some(e) = stopped {
            return Err(e);
        }
        nodes.typed(r, what)
    }

    /// The walk of one stream only: its index blobs and chunks, and for a memory stream also
    /// its op stream (index blobs and chunks) and its page images (tree nodes and chunks).
    pub fn walk_stream<'m>(
        &mut self,
        index: &BlobIndex,
        s: &'m vmkeep_core::manifest::StreamRecord,
        visit: &mut dyn FnMut(&Ref<'m>) -> Result<()>,
    ) -> Result<()> {
        let owner = Owner::Stream(&s.name);
        self.walk_stream_index(index, &s.index, owner, visit)?;
        let Some(p) = &s.pages else {
            return Ok(());
        };
        self.walk_stream_index(index, &p.ops, owner, visit)?;
        for image in &p.images {
            self.walk_tree(
                index,
                &image.root,
                p.chunks_of(image.size),
                owner,
                visit,
                || format!("index of stream {} page image {:?}", s.name, image.name),
            )?;
        }
        Ok(())
    }

    fn walk_stream_index<'m>(
        &mut self,
        index: &BlobIndex,
        blobs: &[BlobId],
        owner: Owner<'m>,
        visit: &mut dyn FnMut(&Ref<'m>) -> Result<()>,
    ) -> Result<()> {
        for id in blobs {
            if !self.stream_indexes.insert(*id) {
                continue;
            }
            let bytes = self.repo.read_blob(index, id)?;
            let entries = vmkeep_core::stream::decode_index_blob(&bytes)
                .map_err(|e| Error::corrupt(format!("stream index {id}"), e))?;
            visit(&Ref {
                id: *id,
                kind: BlobKind::Tree,
                owner,
            })?;
            for e in &entries {
                visit(&Ref {
                    id: e.id,
                    kind: BlobKind::Data,
                    owner,
                })?;
            }
        }
        Ok(())
    }
}
