//! vmkeep-core: the pure part of vmkeep. Everything here is a plain synchronous function of its
//! inputs: no files, no sockets, no threads. The modules mirror docs/FORMAT.md section by section.
//!
//! Data flow through this crate during a backup:
//! bytes of a disk chunk -> [`keys::Keys::chunk_id`] -> [`blob::encode`] (compress, encrypt)
//! -> packed by the repository -> chunk ids assembled by [`tree::TreeBuilder`] into a disk index
//! -> [`manifest::Manifest`] sealed by [`object::seal`] as the commit point.

pub mod blob;
pub mod changes;
pub mod config;
pub mod error;
pub mod id;
pub mod keys;
pub mod kind;
pub mod manifest;
pub mod memory;
pub mod object;
pub mod pack;
pub mod packlist;
pub mod retention;
pub mod stream;
pub mod tree;
#[cfg(test)]
mod vectors;

pub use error::{Error, Result};
pub use id::{BlobId, GcRecordId, HostId, LeaseId, PackId, SnapshotId};
pub use kind::ObjectKind;
