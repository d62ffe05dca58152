//! Running a VM again from its [`VmDefinition`]: the QEMU side of `vmkeep recover`.
//!
//! ```no_run
//! # fn demo(def: vmkeep_qemu::vmdef::VmDefinition, state: std::fs::File) -> vmkeep_qemu::Result<()> {
//! use vmkeep_qemu::recover::{self, RecoveryPlan, StartMode};
//! let plan = RecoveryPlan::in_dir(&def, "/srv/recovered/web1".as_ref(), StartMode::Resume);
//! // ... restore every disk to plan.disks[name] (qcow2) and boot file to plan.boot_files[role] ...
//! let qemu = recover::qemu_binary(&def, None);
//! recover::check_qemu(&qemu, &def, plan.mode)?;         // refuses clearly, starts nothing
//! let argv = recover::rewrite(&def, &plan)?;            // the command line for the new place
//! let mut vm = recover::start_qemu(&qemu, &argv, &plan)?; // background; QMP answers
//! let report = vm.load_state(state)?;                   // streams the state, resumes the VM
//! let pid = vm.detach();                                // QEMU outlives us
//! # let _ = (report, pid); Ok(()) }
//! ```
//!
//! - [`mod@rewrite`] ([`rewrite()`]): the definition's command line for the new place (what is
//!   rewritten and what is kept: docs/ARCHITECTURE.md "Recovery").
//! - [`loadable`] ([`check_qemu`], [`check_loadable`]): whether a QEMU binary can run the
//!   recorded machine (architecture, machine type), with a refusal that says what to use.
//! - [`launch`] ([`start_qemu`], [`RunningQemu`]): QEMU in its own session, its log in the
//!   target folder, waiting until its QMP socket answers.
//! - [`load`] ([`RunningQemu::load_state`]): the migration state through a pipe (no temporary
//!   file), `cont` when it was captured paused.
//!
//! - [`libvirt`]: a libvirt restore point as a libvirt domain again (its XML rewritten,
//!   defined, started or restored from a save image streamed through a FIFO).
//!
//! Every failure after QEMU started leaves no QEMU running. The API is blocking (each
//! [`RunningQemu`] has a small runtime for its QMP connection).

pub mod agent;
mod chardev;
pub mod evidence;
pub mod instant;
pub mod launch;
pub mod libvirt;
pub mod libvirt_vitals;
pub mod load;
pub mod loadable;
mod network;
mod place;
pub mod rewrite;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::vmdef::VmDefinition;
pub use launch::{attach, start_qemu, RunningQemu};
pub use load::LoadReport;
pub use loadable::{check_loadable, check_qemu, qemu_binary, QemuInfo};
pub use rewrite::rewrite;

/// How the recovered VM starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// `-incoming defer`, then [`RunningQemu::load_state`]: the VM continues where it was
    /// captured.
    Resume,
    /// Boots from the disks.
    Cold,
}

/// Where the recovered VM's files go, and how it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPlan {
    /// The target folder (chardev sockets and logs of the VM go here too).
    pub target_dir: PathBuf,
    /// New qcow2 image per disk name; every disk of the definition needs one.
    pub disks: BTreeMap<String, PathBuf>,
    /// New file per boot-file role; every boot file of the definition needs one.
    pub boot_files: BTreeMap<String, PathBuf>,
    /// The recovered VM's only monitor (QMP).
    pub qmp_socket: PathBuf,
    /// Where the first serial port writes.
    pub serial_log: PathBuf,
    /// QEMU's own stdout and stderr.
    pub qemu_log: PathBuf,
    /// Keep the network backends as they were (default: cut off, see [`mod@rewrite`]).
    pub network: bool,
    pub mode: StartMode,
    /// Replace the accelerator (`tcg`, `kvm`); `None` keeps the VM's.
    pub accel: Option<String>,
    /// Instant recovery: each disk image is an overlay whose backing file (named in its
    /// header) is the served restore point, so the command line must not cut the backing.
    pub instant: bool,
    /// A second QMP socket, for a probe command run against the VM (`vmkeep verify`).
    pub probe_qmp: Option<PathBuf>,
    /// QEMU is killed when the thread that started it dies, even by SIGKILL
    /// (`PR_SET_PDEATHSIG`): a sandbox (`vmkeep verify`) must not outlive its command. A
    /// recovered VM (false) outlives vmkeep.
    pub die_with_parent: bool,
}

impl RecoveryPlan {
    /// The usual layout in `dir`: `<disk>.qcow2` (as `vmkeep restore --format qcow2` names
    /// them), `boot-<role>`, `qmp.sock`, `serial.log`, `qemu.log`; no network.
    pub fn in_dir(def: &VmDefinition, dir: &Path, mode: StartMode) -> RecoveryPlan {
        RecoveryPlan {
            target_dir: dir.to_path_buf(),
            disks: def
                .disks
                .iter()
                .map(|d| (d.name.clone(), dir.join(format!("{}.qcow2", d.name))))
                .collect(),
            boot_files: def
                .boot_files
                .iter()
                .map(|b| (b.role.clone(), dir.join(b.stream_name())))
                .collect(),
            qmp_socket: dir.join("qmp.sock"),
            serial_log: dir.join("serial.log"),
            qemu_log: dir.join("qemu.log"),
            network: false,
            mode,
            accel: None,
            instant: false,
            probe_qmp: None,
            die_with_parent: false,
        }
    }
}
