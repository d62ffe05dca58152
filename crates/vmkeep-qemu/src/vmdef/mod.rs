//! The VM's definition: what it takes to run this VM again somewhere else.
//!
//! [`capture_definition`] reads it from a running QEMU: the command line (from the process
//! behind the QMP socket, or a file the user gives), the resolved machine type (`pc` is an
//! alias that moves with every QEMU release; the state needs the exact one, e.g.
//! `pc-i440fx-10.0`), QEMU's version, the architecture, the RAM size, which command-line
//! element defines each disk vmkeep backs up, and the files the VM boots from. It is stored as
//! JSON ([`VmDefinition::to_json`], FORMAT.md "VM definition") and read back with
//! [`VmDefinition::from_json`]; `crate::recover` turns it into a command line for a new place.
//!
//! - [`opts`]: one option's value, `key=value` or JSON, edited through dotted paths.
//! - [`cmdline`]: the command line as options with values; unknown options pass through.
//! - `locate`: which `-blockdev`, `-drive` or file option defines a disk or a boot file.
//! - `capture` ([`capture_definition`]): reading all of it from QMP and `/proc`.

mod capture;
pub mod cmdline;
pub(crate) mod locate;
pub mod opts;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use capture::{capture_definition, read_args_file, ArgsSource};

/// Version of the stored JSON; readers refuse others.
/// Name of the stream holding the definition in a restore point (FORMAT.md §11.4).
pub const DEFINITION_STREAM: &str = "vm-definition";
pub const DEFINITION_VERSION: u32 = 1;

/// Largest stored definition a reader accepts (a command line is a few KiB).
pub const DEFINITION_MAX_BYTES: usize = 4 << 20;

/// Everything needed to run the VM again (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    /// [`DEFINITION_VERSION`].
    pub version: u32,
    /// The QEMU that ran the VM (`query-version`).
    pub qemu: QemuVersion,
    /// Its package string (`Debian 1:10.0.2+ds-...`), informational.
    #[serde(default)]
    pub qemu_package: String,
    /// The program that ran (`/proc/PID/exe`, else the command line's first word).
    #[serde(default)]
    pub binary: Option<String>,
    /// Target architecture (`query-target`), e.g. `x86_64`.
    pub arch: String,
    /// The resolved machine type (`qom-get /machine type` without `-machine`).
    pub machine: String,
    /// Guest RAM in bytes (`query-memory-size-summary`: base plus plugged memory).
    pub ram_bytes: u64,
    /// The command line without the program name, as QEMU received it.
    pub args: Vec<String>,
    /// Where `args` came from.
    pub args_source: ArgsOrigin,
    /// The disks vmkeep backs up, in capture order.
    pub disks: Vec<DefinedDisk>,
    /// Files the VM boots from (kernel, initrd, firmware, NVRAM, device tree).
    pub boot_files: Vec<BootFile>,
}

/// Where a definition's command line was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgsOrigin {
    /// `/proc/PID/cmdline` of the process listening on the QMP socket.
    Process { pid: u32 },
    /// A file given by the user (`--vm-config`).
    File { path: String },
}

/// A QEMU version, `major.minor.micro`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
}

impl QemuVersion {
    /// The first `N.N.N` (or `N.N`) in `text`, e.g. in `QEMU emulator version 10.0.2 (Debian ...)`.
    pub fn find_in(text: &str) -> Option<QemuVersion> {
        text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .find_map(|word| {
                let mut parts = word.split('.').map(|p| p.parse::<u64>().ok());
                let major = parts.next()??;
                let minor = parts.next()??;
                let micro = match parts.next() {
                    Some(p) => p?,
                    None => 0,
                };
                Some(QemuVersion {
                    major,
                    minor,
                    micro,
                })
            })
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// One disk vmkeep backs up, and what defines it on the command line. Recovery keeps the node
/// name, drive id and device id: the migration state refers to devices by id, and vmkeep's
/// checkpoint bookkeeping to node names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinedDisk {
    /// The disk's name in restore points (`capture::disks::disk_name`).
    pub name: String,
    /// Root node of the drive (`#blockNNN` for `-drive`: generated anew by every QEMU run).
    pub node: String,
    /// Drive id (`-drive id=`, or QEMU's generated one such as `virtio0`); `None` for
    /// `-blockdev` disks.
    #[serde(default)]
    pub drive_id: Option<String>,
    /// The device's QOM path (`/machine/peripheral/vd0/virtio-backend`).
    #[serde(default)]
    pub qdev: Option<String>,
    /// The device's id (`-device ...,id=`), when it has one.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Format driver of the root node (`qcow2`, `raw`, ...).
    pub format: String,
    /// Image file name as QEMU reports it (`query-block` `inserted.file`).
    pub file: String,
    /// Image file as written on the command line (`None`: not a plain file, e.g. NBD).
    #[serde(default)]
    pub image: Option<String>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Whether a command-line element defines it (false for a hot-plugged disk: a recovery
    /// cannot recreate it and refuses).
    pub on_command_line: bool,
}

/// A file the VM boots from. Stored as the stream `boot-<role>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFile {
    /// `kernel`, `initrd`, `bios`, `dtb`, or `pflash<N>` (firmware code or NVRAM of flash
    /// unit N, when it is not a disk vmkeep backs up).
    pub role: String,
    /// As written on the command line.
    pub path: String,
    /// Where vmkeep found it (relative paths resolved against QEMU's working directory, or
    /// the `--vm-config` file's folder).
    pub host_path: String,
    /// Size in bytes at capture time; `None` when the file could not be read (deleted since
    /// QEMU started, or relative to a daemonized QEMU's working directory `/`).
    pub size: Option<u64>,
}

impl BootFile {
    /// The stream name the file is stored under.
    pub fn stream_name(&self) -> String {
        format!("boot-{}", self.role)
    }
}

impl VmDefinition {
    /// The JSON stored as the `vm-definition` stream.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a VmDefinition serializes")
    }

    /// Reads a stored definition: size-bounded, version-checked.
    pub fn from_json(bytes: &[u8]) -> Result<VmDefinition> {
        if bytes.len() > DEFINITION_MAX_BYTES {
            return Err(Error::Definition(format!(
                "stored definition is {} bytes, more than the {DEFINITION_MAX_BYTES} allowed",
                bytes.len()
            )));
        }
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = serde_json::from_slice(bytes)
            .map_err(|e| Error::Definition(format!("stored definition is not valid: {e}")))?;
        if v.version != DEFINITION_VERSION {
            return Err(Error::Definition(format!(
                "stored definition has version {}, this vmkeep reads version {DEFINITION_VERSION}",
                v.version
            )));
        }
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Definition(format!("stored definition is not valid: {e}")))
    }

    /// The disk called `name`.
    pub fn disk(&self, name: &str) -> Option<&DefinedDisk> {
        self.disks.iter().find(|d| d.name == name)
    }
}

/// A definition of a QEMU 10.0.2 x86_64 VM with command line `args` and no disks, for tests.
#[cfg(test)]
pub(crate) fn test_definition(args: &[&str]) -> VmDefinition {
    VmDefinition {
        version: DEFINITION_VERSION,
        qemu: QemuVersion {
            major: 10,
            minor: 0,
            micro: 2,
        },
        qemu_package: String::new(),
        binary: None,
        arch: "x86_64".into(),
        machine: "pc-i440fx-10.0".into(),
        ram_bytes: 256 << 20,
        args: args.iter().map(|s| s.to_string()).collect(),
        args_source: ArgsOrigin::Process { pid: 1 },
        disks: vec![],
        boot_files: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmDefinition {
        VmDefinition {
            qemu_package: "Debian".into(),
            binary: Some("/usr/bin/qemu-system-x86_64".into()),
            args_source: ArgsOrigin::Process { pid: 42 },
            boot_files: vec![BootFile {
                role: "kernel".into(),
                path: "vmlinuz".into(),
                host_path: "/vm/vmlinuz".into(),
                size: Some(5),
            }],
            ..test_definition(&["-m", "256"])
        }
    }

    #[test]
    fn json_round_trip_and_refusals() {
        let d = sample();
        let json = d.to_json();
        assert_eq!(VmDefinition::from_json(&json).unwrap(), d);
        let text = String::from_utf8(json).unwrap();
        assert!(text.contains("\"process\""), "{text}");
        let v2 = text.replace("\"version\": 1", "\"version\": 2");
        let e = VmDefinition::from_json(v2.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 2"), "{e}");
        assert!(VmDefinition::from_json(b"{\"version\":1}").is_err());
        assert!(VmDefinition::from_json(b"\x00garbage").is_err());
        let huge = vec![b' '; DEFINITION_MAX_BYTES + 1];
        assert!(VmDefinition::from_json(&huge).is_err());
        assert_eq!(d.boot_files[0].stream_name(), "boot-kernel");
    }

    #[test]
    fn versions_from_text() {
        let v = QemuVersion::find_in(
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright",
        )
        .unwrap();
        assert_eq!(v.to_string(), "10.0.2");
        assert_eq!(
            QemuVersion::find_in("version 7.2").unwrap().to_string(),
            "7.2.0"
        );
        assert!(QemuVersion::find_in("no digits here").is_none());
        assert!(QemuVersion::find_in("1.").is_none());
        assert!(QemuVersion::find_in("7.2.0") < QemuVersion::find_in("10.0.2"));
    }
}
