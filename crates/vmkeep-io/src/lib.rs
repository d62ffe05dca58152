//! vmkeep-io: the seams between where VM data comes from or goes to and the repository.
//!
//! Capture drivers (vmkeep-qemu: NBD exports of a live VM, qemu-storage-daemon for images) and
//! restore targets (raw files, qcow2 images) implement these; the repository (vmkeep-repo)
//! consumes them; the binary wires the two. Neither side depends on the other.
//!
//! - [`source`]: [`DiskReader`], [`ReadPlan`], [`chunk_runs`], [`zero_chunk_runs`];
//! - [`target`]: [`DiskWriter`], [`publish`] (fsync, rename, fsync the folder);
//! - [`served`]: [`ServedDisk`], a disk served to NBD clients without restoring it;
//! - [`progress`]: the [`Progress`] observer;
//! - [`killpoint`]: named kill points for crash tests of the real binary.

pub mod killpoint;
pub mod progress;
pub mod served;
pub mod source;
pub mod target;

pub use killpoint::kill_point;
pub use progress::{NoProgress, Progress};
pub use served::{ServedDisk, ServedExtent};
pub use source::{
    chunk_runs, zero_chunk_runs, DiskReader, ReadPlan, SourceDisk, SourceError, VmSource,
};
pub use target::{create_target_dir, publish, unpublish, write_zeros, DiskWriter, ImageAccess};
