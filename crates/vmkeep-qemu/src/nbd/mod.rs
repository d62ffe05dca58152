//! Async NBD client for reading exports (QEMU fleecing nodes, qemu-nbd, qemu-storage-daemon)
//! and writing writable ones ([`NbdClient::write`], [`NbdClient::flush`]); and a small
//! read-only NBD server ([`NbdServer`], blocking threads) serving any `vmkeep_io::ServedDisk`.
//!
//! ```no_run
//! # async fn demo() -> vmkeep_qemu::Result<()> {
//! use vmkeep_qemu::nbd::NbdClient;
//! let c = NbdClient::connect_unix("/run/nbd.sock", "backup",
//!     &["base:allocation", "qemu:dirty-bitmap:bm0"]).await?;
//! let dirty = c.block_status("qemu:dirty-bitmap:bm0", 0, c.size()).await?;
//! let first = c.read(0, 65536).await?;
//! c.disconnect().await?;
//! # let _ = (dirty, first); Ok(()) }
//! ```
//!
//! Flags in `base:allocation`: bit 0 = hole (unallocated), bit 1 = reads as zeros.
//! In `qemu:dirty-bitmap:NAME`: bit 0 = dirty.

mod client;
mod handshake;
pub mod proto;
pub mod server;
mod timeout;

pub use client::{
    request_timeout_from_env, NbdClient, NbdOptions, SparseRead, DEFAULT_REQUEST_TIMEOUT,
    TIMEOUT_ENV,
};
pub use proto::{BlockSize, Extent};
pub use server::{Listen, NbdServer, ServeOptions};

/// `base:allocation` flag: the range is a hole (not allocated).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME` flag: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

/// Name of the meta context exposing QEMU dirty bitmap `name`.
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}
