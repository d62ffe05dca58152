//! Capture: a VM's disks (and on request its RAM and device state) at one instant, handed to
//! the caller as readers and a byte stream. Capture does not know the repository: the binary
//! wires a capture to a backup session (`BackupSession::add_source` in vmkeep-repo).
//!
//! Every driver implements [`vmkeep_io::VmSource`] (the order of calls is documented there):
//! [`QmpCapture`] for a running VM through its QMP monitor, [`ImageCapture`] for image files
//! through a qemu-storage-daemon we start, and [`libvirt::LibvirtCapture`] for a domain through
//! libvirt's backup API. What is QMP-specific stays behind the trait.
//!
//! Modules, in the order a capture runs them: [`leftovers`] (dead captures undone),
//! [`coexist`] (another party's block job named),
//! [`disks`] and [`cbt`] (what to read), [`scratch`] (private directory, fd-passed images),
//! [`undo`] (the log every step writes first) and [`guard`], [`cut`] (the phases that change
//! the VM; [`nbd_share`] when QEMU already runs an NBD server), [`session`] (the driver), [`executor`] (the one undo).

pub mod agent;
pub mod cbt;
pub mod changed;
pub mod coexist;
pub mod cut;
pub mod disks;
pub mod executor;
pub mod guard;
pub mod hugepages;
pub mod image;
pub mod leftovers;
pub mod libvirt;
pub mod nbd_share;
pub(crate) mod peer;
pub mod scratch;
pub mod session;
pub mod undo;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tracing::warn;

use crate::error::{Error, Result};
use crate::qmp::QmpClient;
pub use cbt::Decision;
pub use disks::VmDisk;
pub use guard::{run_guard, GuardCommand};
pub use image::ImageCapture;
pub use peer::listener_pid;
pub use session::{CaptureOptions, QmpCapture};

/// `--freeze`: guest filesystem freeze around the cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Freeze {
    /// Freeze when the VM has a guest agent; skip silently otherwise.
    #[default]
    Auto,
    /// Require a guest agent.
    On,
    Off,
}

/// A short unique token for this capture's node, export and bitmap names (node names are
/// limited to 31 bytes).
pub(crate) fn token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:08x}{:04x}",
        (nanos as u64 ^ (nanos >> 64) as u64) as u32,
        std::process::id() as u16
    )
}

/// Canonical path when the file exists (so `./a.qcow2` and `/x/a.qcow2` are one source).
pub(crate) fn canonical(file: &str) -> String {
    std::fs::canonicalize(file)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| file.to_string())
}

/// `qemu-img create -f qcow2 PATH SIZE`.
pub fn create_qcow2(path: &Path, size: u64) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("run qemu-img create", e))?;
    if !out.status.success() {
        return Err(Error::io(
            format!("qemu-img create {}", path.display()),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(())
}

/// The guest agent to freeze with: None when not freezing, or (`auto`) when the VM has no
/// agent channel or nothing answers on it; an error for `on` in those cases.
async fn connect_agent(qmp: &QmpClient, freeze: Freeze) -> Result<Option<(PathBuf, agent::Agent)>> {
    if freeze == Freeze::Off {
        return Ok(None);
    }
    let path = match agent::find_agent_socket(qmp).await {
        Ok(Some(p)) => p,
        Ok(None) if freeze == Freeze::On => {
            return Err(Error::Refused(
                "--freeze on: the VM has no guest agent channel (virtserialport org.qemu.guest_agent.0 on a unix socket)".into(),
            ))
        }
        Ok(None) => return Ok(None),
        Err(e) if freeze == Freeze::On => return Err(e),
        Err(e) => {
            warn!(error = %e, "cannot look for a guest agent; not freezing");
            return Ok(None);
        }
    };
    match agent::Agent::connect(&path, Duration::from_secs(3)).await {
        Ok(a) => Ok(Some((path, a))),
        Err(e) if freeze == Freeze::On => Err(Error::Refused(format!(
            "--freeze on: the guest agent does not answer: {e}"
        ))),
        Err(e) => {
            tracing::info!(error = %e, "guest agent not answering; not freezing");
            Ok(None)
        }
    }
}
