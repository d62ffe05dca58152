//! The libvirt capture driver: a domain libvirt manages, backed up through libvirt's own
//! backup API (pull mode, checkpoints), so libvirt stays in charge of the domain, its block
//! jobs and its checkpoint metadata, and the domain is not tainted (except by `--memory`, which
//! needs libvirt's monitor passthrough: see [`memory`]).
//!
//! Modules, in the order a capture uses them: [`virsh`] (how vmkeep talks to libvirt), [`xml`]
//! (what it reads and writes), [`tracking`] (which checkpoint to trust), [`session`] (the
//! driver, a [`vmkeep_io::VmSource`]), [`memory`] over [`monitor`] (RAM and device state),
//! [`guard`] (the undo if vmkeep dies).

pub mod guard;
pub mod memory;
pub mod monitor;
pub mod session;
pub mod tracking;
pub mod virsh;
pub mod xml;

pub use guard::run_guard;
pub use session::{LibvirtCapture, LibvirtOptions, DOMAIN_XML_STREAM, RUNNING_XML_STREAM};
pub use virsh::Virsh;
