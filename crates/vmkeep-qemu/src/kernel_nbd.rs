//! An NBD export attached as a kernel block device (`vmkeep mount --nbd-device /dev/nbdN`), so
//! a filesystem in a restore point can be mounted and single files copied out.
//!
//! `qemu-nbd --connect` does the attaching: it opens the export as its image and hands the
//! device to the kernel's nbd driver; `qemu-nbd --disconnect` detaches it. Both need root and
//! the `nbd` module; without them the attach is refused before anything is started.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::qcow2_target::find_program;

/// A kernel nbd device attached to an export; detached on drop.
pub struct KernelNbd {
    device: PathBuf,
    qemu_nbd: PathBuf,
}

impl KernelNbd {
    /// Attaches `device` (`/dev/nbdN`) to the export at `uri`, read-only unless `writable`.
    pub fn attach(device: &Path, uri: &str, writable: bool) -> Result<KernelNbd> {
        let name = device
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.starts_with("nbd") && n[3..].parse::<u32>().is_ok())
            .ok_or_else(|| refused(device, "not an nbd device name (want /dev/nbdN)"))?;
        if !Path::new("/sys/block").join(name).exists() || !device.exists() {
            return Err(refused(
                device,
                "no such nbd device: load the kernel's nbd module first (`modprobe nbd`, as root)",
            ));
        }
        let qemu_nbd = find_program("qemu-nbd")?;
        let mut cmd = Command::new(&qemu_nbd);
        cmd.args(["-f", "raw", "--cache=none"]);
        if !writable {
            cmd.arg("--read-only");
        }
        let out = cmd
            .arg("--connect")
            .arg(device)
            .arg(uri)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io(format!("run {}", qemu_nbd.display()), e))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(refused(device, &format!("qemu-nbd --connect: {why}")));
        }
        Ok(KernelNbd {
            device: device.to_path_buf(),
            qemu_nbd,
        })
    }

    pub fn device(&self) -> &Path {
        &self.device
    }
}

impl Drop for KernelNbd {
    fn drop(&mut self) {
        let r = Command::new(&self.qemu_nbd)
            .arg("--disconnect")
            .arg(&self.device)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(r, Ok(s) if s.success()) {
            tracing::warn!(
                "could not detach {} (run `qemu-nbd --disconnect {}`)",
                self.device.display(),
                self.device.display()
            );
        }
    }
}

fn refused(device: &Path, why: &str) -> Error {
    Error::io(
        format!("attaching {}", device.display()),
        std::io::Error::other(why.to_owned()),
    )
}
