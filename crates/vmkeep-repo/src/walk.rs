//! The one walker of what a restore point references: for every disk its index tree nodes and
//! chunks, for every stream its index blobs and chunks. GC's mark, `check`, a stalled backup's
//! verification and (next) replication all see restore points through it, so none of them can
//! forget a kind of blob.
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
        let nodes = RepoNodes::new(self.repo, index);
        let chunks = d.size.div_ceil(self.repo.config.chunk_size as u64);
        let owner = Owner::Disk(&d.name);
        // The visitor's own error travels through the core walk as a stand-in and comes back.
        let mut stopped: Option<Error> = None;
        let r =
            tree::for_each_new_node(&nodes, &d.root, chunks, &mut self.nodes, &mut |id, node| {
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
        nodes.typed(r, || {
            format!("index of restore point {} disk {}", m.id, d.name)
        })
    }

    /// The walk of one stream only.
    pub fn walk_stream<'m>(
        &mut self,
        index: &BlobIndex,
        s: &'m vmkeep_core::manifest::StreamRecord,
        visit: &mut dyn FnMut(&Ref<'m>) -> Result<()>,
    ) -> Result<()> {
        let owner = Owner::Stream(&s.name);
        for id in &s.index {
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
