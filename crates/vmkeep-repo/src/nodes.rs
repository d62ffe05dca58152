//! Index tree nodes as repository blobs: [`RepoNodes`] reads them for restore, check and GC;
//! [`SessionNodes`] also writes new ones during a backup (deduplicated, through the packer) and
//! keeps the nodes it wrote in memory so the change map can be computed before they are indexed.
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use crossbeam_channel::Sender;
use vmkeep_core::blob;
use vmkeep_core::keys::BlobKind;
use vmkeep_core::tree::{Node, NodeStore};
use vmkeep_core::BlobId;

use crate::backup::Dedup;
use crate::index::BlobIndex;
use crate::packer::EncodedBlob;
use crate::Repository;

/// Read-only access to stored nodes. The tree walkers of vmkeep-core see only core errors, so a
/// failed load is kept here with its real type (a store I/O error stays an I/O error, a missing
/// blob stays missing) and [`RepoNodes::typed`] gives it back after the walk.
pub struct RepoNodes<'a> {
    pub repo: &'a Repository,
    pub index: &'a BlobIndex,
    failure: RefCell<Option<crate::Error>>,
}

impl<'a> RepoNodes<'a> {
    pub fn new(repo: &'a Repository, index: &'a BlobIndex) -> RepoNodes<'a> {
        RepoNodes {
            repo,
            index,
            failure: RefCell::new(None),
        }
    }

    /// The result of a walk over these nodes, with the load failure's own type when a load
    /// failed, else core errors (malformed trees) as damage to `what`.
    pub fn typed<T>(
        &self,
        r: vmkeep_core::Result<T>,
        what: impl FnOnce() -> String,
    ) -> crate::Result<T> {
        r.map_err(|e| {
            self.failure
                .borrow_mut()
                .take()
                .unwrap_or_else(|| crate::Error::corrupt(what(), e))
        })
    }
}

/// Stand-in core error for a load whose real error waits in `failure`.
fn deferred() -> vmkeep_core::Error {
    vmkeep_core::Error::Corrupt {
        kind: "index node",
        reason: "could not be loaded".into(),
    }
}

impl NodeStore for RepoNodes<'_> {
    fn load(&self, id: &BlobId) -> vmkeep_core::Result<Node> {
        let bytes = self.repo.read_blob(self.index, id).map_err(|e| {
            self.failure.borrow_mut().get_or_insert(e);
            deferred()
        })?;
        Node::decode(&bytes)
    }

    fn store(&mut self, _node: &Node) -> vmkeep_core::Result<BlobId> {
        Err(vmkeep_core::Error::Invalid {
            what: "operation",
            reason: "read-only node store".into(),
        })
    }
}

/// Nodes of a running backup.
pub(crate) struct SessionNodes<'a> {
    pub repo: &'a Repository,
    pub index: Arc<BlobIndex>,
    pub dedup: Arc<Dedup>,
    pub packer: Sender<EncodedBlob>,
    pub written: HashMap<BlobId, Node>,
    /// Set when the packer went away (it failed); the caller fetches its error.
    pub packer_gone: bool,
    /// A load failure with its own type (see [`RepoNodes`]).
    pub failure: RefCell<Option<crate::Error>>,
}

impl NodeStore for SessionNodes<'_> {
    fn load(&self, id: &BlobId) -> vmkeep_core::Result<Node> {
        if let Some(n) = self.written.get(id) {
            return Ok(n.clone());
        }
        let bytes = self.repo.read_blob(&self.index, id).map_err(|e| {
            self.failure.borrow_mut().get_or_insert(e);
            deferred()
        })?;
        Node::decode(&bytes)
    }

    fn store(&mut self, node: &Node) -> vmkeep_core::Result<BlobId> {
        let bytes = node.encode();
        let id = self.repo.keys.blob_id(BlobKind::Tree, &bytes);
        if self.dedup.claim(&id) {
            let data = blob::encode(&self.repo.keys, BlobKind::Tree, &id, &bytes);
            // Kept in the local cache as written (as restic does), so the next backup and
            // restore of this disk read its nodes without a request. Only an indexed node is
            // ever looked up there, so one of a backup that fails is never used.
            if let Some(c) = &self.repo.cache {
                crate::cache::objects::put(c, &id, &data);
            }
            let msg = EncodedBlob {
                kind: BlobKind::Tree,
                id,
                raw_len: bytes.len() as u32,
                data,
            };
            if self.packer.send(msg).is_err() {
                self.packer_gone = true;
                return Err(vmkeep_core::Error::Invalid {
                    what: "repository write",
                    reason: "the packer stopped".into(),
                });
            }
        }
        // Keep the node readable even when another disk of this session claimed (wrote) it:
        // it is not in the index until the session commits.
        self.written.insert(id, node.clone());
        Ok(id)
    }
}

impl Repository {
    /// This repository's tree nodes read through `index`, for tools and benchmarks that walk
    /// trees themselves (`vmkeep_core::tree`).
    pub fn node_reader<'a>(&'a self, index: &'a BlobIndex) -> impl NodeStore + 'a {
        RepoNodes::new(self, index)
    }
}
