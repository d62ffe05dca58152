//! vmkeep-repo: the repository. It turns disks and streams into restore points and back, over
//! the object-store interface of vmkeep-store, with the formats of vmkeep-core.
//!
//! | module | use case |
//! |---|---|
//! | [`repository`] | init, open, keys |
//! | [`backup`] | backup sessions: lease, dedup, parallel pipeline, packer, commit |
//! | [`restore`] | restore a restore point's disks to sparse raw files or any [`DiskWriter`] |
//! | [`check`] | verify structure and data |
//! | [`forget`], [`prune`] | retention, change-map merging, GC |
//! | [`lease`], [`gc`] | the concurrency protocol between backups and GC (checked in `gc/model`) |
//! | [`walk`] | the one walker of what a restore point references |
//! | [`cache`] | the local cache: blob index runs and tree nodes, shared by processes |
//! | `scan`, `spill` | the whole repository in bounded memory, for check and prune |
//! | [`repair`] | rebuilding index objects from pack headers |
//! | [`temporaries`] | temporary files of killed writers (reported by check, removed by prune) |
//!
//! Which operations may run together (FORMAT.md "Concurrency and GC"):
//! backups of any VMs together, and beside one prune or forget; prune and forget exclude each
//! other; check and restore beside anything (they may report a pack a concurrent prune just
//! deleted only if the restore point using it was forgotten meanwhile).

pub mod backup;
mod cache;
pub mod check;
pub mod diff;
mod error;
pub mod forget;
pub mod gc;
pub mod hooks;
pub mod index;
pub mod lease;
pub mod mount;
mod nodes;
mod packer;
pub mod packlist;
pub mod progress;
pub mod prune;
mod relink;
pub mod repair;
pub mod replicate;
pub mod repository;
pub mod restore;
mod scan;
mod sequential;
mod snapshots;
mod spill;
pub mod temporaries;
mod upload;
pub mod verification;
pub mod walk;

pub use backup::{BackupOptions, BackupSession, DiskReader, ImageBackupOptions, ReadPlan};
pub use cache::CacheOptions;
pub use check::{CheckOptions, CheckReport, Damage};
pub use error::{Error, Result};
pub use gc::{GcPreview, GcStats};
#[cfg(feature = "test-hooks")]
pub use hooks::Hooks;
pub use progress::{NoProgress, Progress};
pub use prune::{PruneOptions, PrunePlan, PruneStats};
pub use repository::{InitOptions, Repository, Tuning};
pub use restore::{DiskWriter, RawFileWriter, RestoreOptions, RestoreStats};
pub use temporaries::TemporaryStats;
pub use vmkeep_core::manifest::Manifest;
