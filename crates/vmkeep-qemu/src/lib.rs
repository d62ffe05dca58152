//! vmkeep's QEMU side.
//!
//! - [`qmp`]: an async QMP (QEMU Machine Protocol) client over a unix socket: commands with
//!   per-command timeouts, typed errors, an event stream, and file-descriptor passing (`getfd`).
//! - [`nbd`]: an async NBD client (fixed newstyle, structured replies, meta contexts, block
//!   status) that validates every byte the server sends before using it; and a small
//!   read-only NBD server (`nbd::server`) for any `vmkeep_io::ServedDisk` (`vmkeep mount`).
//! - [`overlay`]: a writable, discardable qcow2 overlay over a read-only export (qemu-nbd);
//!   [`kernel_nbd`]: an export attached as `/dev/nbdN`.
//! - [`disk_reader`]: an NBD export as the backup pipeline's `DiskReader`, and read plans from
//!   `base:allocation` and dirty-bitmap block status.
//! - [`capture`]: live backup of a running VM's disks (pause-free fleecing, checkpoint bitmaps,
//!   change-tracking decisions), and of stopped VMs' images through qemu-storage-daemon.
//! - [`qcow2_target`]: a new qcow2 image, written through a private qemu-nbd, as a restore
//!   target (`vmkeep_repo::DiskWriter`).
//! - [`vmdef`]: the VM's definition (command line, resolved machine type, QEMU version, disks
//!   and their devices, boot files), captured from a running QEMU and stored in restore points.
//! - [`recover`]: running a VM again from its definition: the command line rewritten for a new
//!   place, a check that the QEMU at hand can load the state, QEMU started in the background,
//!   and the migration state streamed into it.
//!
//! Both speak to programs we do not control, so every reply is size-bounded and checked;
//! hostile or broken peers produce an [`Error`], never a panic or an unbounded allocation.

pub mod capture;
pub mod disk_reader;
pub mod error;
pub mod kernel_nbd;
pub mod nbd;
pub mod overlay;
pub mod qcow2_target;
pub mod qmp;
pub mod recover;
pub mod vmdef;

pub use error::{Error, Result};
