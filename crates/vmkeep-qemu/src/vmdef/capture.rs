//! Capturing a [`VmDefinition`] from a running QEMU.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{debug, warn};

use super::cmdline::CommandLine;
use super::locate::{boot_sites, disk_site, image_of};
use super::{ArgsOrigin, BootFile, DefinedDisk, QemuVersion, VmDefinition, DEFINITION_VERSION};
use crate::capture::disks::list_disks;
use crate::error::{Error, Result};
use crate::qmp::QmpClient;

/// Largest `--vm-config` file or `/proc/PID/cmdline` read.
const ARGS_MAX_BYTES: u64 = 1 << 20;

/// Where to read the VM's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgsSource {
    /// `/proc/PID/cmdline` of the process listening on the QMP socket (SO_PEERCRED). Fails in
    /// another PID namespace or for a process we may not inspect: then use `File`.
    QmpPeer,
    /// `/proc/PID/cmdline` of a QEMU whose pid the caller already knows (a capture found it
    /// once; every probe leaves a connection in the monitor's tiny listen backlog).
    Process(u32),
    /// A file (`--vm-config`): either a JSON array of strings, or one argument per line (no
    /// quoting; empty lines are skipped; a line is taken as it is, spaces included). The first
    /// element is the program when it does not start with `-`. Relative paths in it are
    /// resolved against the file's folder.
    File(PathBuf),
}

/// Reads the VM's definition: QMP for what QEMU resolved, the command line for how it was
/// built. Works on a running or paused VM and changes nothing in it.
pub async fn capture_definition(qmp: &QmpClient, source: &ArgsSource) -> Result<VmDefinition> {
    let (argv, origin, binary, base) = match source {
        ArgsSource::QmpPeer => peer_args(qmp.path())?,
        ArgsSource::Process(pid) => pid_args(*pid)?,
        ArgsSource::File(path) => {
            let (binary, args) = read_args_file(path)?;
            let base = path
                .canonicalize()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf));
            let origin = ArgsOrigin::File {
                path: path.display().to_string(),
            };
            (args, origin, binary, base)
        }
    };

    let machine_qom = qmp
        .execute("qom-get", json!({ "path": "/machine", "property": "type" }))
        .await?;
    let machine_qom = machine_qom.as_str().unwrap_or_default();
    let machine = machine_qom
        .strip_suffix("-machine")
        .unwrap_or(machine_qom)
        .to_owned();
    if machine.is_empty() {
        return Err(Error::Definition(
            "QEMU reported no machine type (qom-get /machine type)".into(),
        ));
    }

    #[derive(Deserialize)]
    struct Version {
        qemu: QemuVersion,
        #[serde(default)]
        package: String,
    }
    let version: Version = qmp.execute_as("query-version", Value::Null).await?;
    #[derive(Deserialize)]
    struct Target {
        arch: String,
    }
    let target: Target = qmp.execute_as("query-target", Value::Null).await?;
    #[derive(Deserialize)]
    struct Memory {
        #[serde(rename = "base-memory", default)]
        base: u64,
        #[serde(rename = "plugged-memory", default)]
        plugged: u64,
    }
    let memory: Memory = qmp
        .execute_as("query-memory-size-summary", Value::Null)
        .await?;

    let cl = CommandLine::parse(&argv);
    let disks = defined_disks(qmp, &cl).await?;
    let disk_sites: Vec<_> = disks.iter().filter_map(|d| disk_site(&cl, d)).collect();
    let boot_files = boot_sites(&cl, &disk_sites)
        .into_iter()
        .filter_map(|b| {
            let path = image_of(&cl, b.site)?;
            Some(boot_file(b.role, path, base.as_deref()))
        })
        .collect();

    let def = VmDefinition {
        version: DEFINITION_VERSION,
        qemu: version.qemu,
        qemu_package: version.package.trim().to_owned(),
        binary,
        arch: target.arch,
        machine,
        ram_bytes: memory.base.saturating_add(memory.plugged),
        args: argv,
        args_source: origin,
        disks,
        boot_files,
    };
    debug!(machine = %def.machine, disks = def.disks.len(), boot_files = def.boot_files.len(),
        "VM definition captured");
    Ok(def)
}

/// The disks of [`list_disks`] (same names) with their devices and command-line elements.
async fn defined_disks(qmp: &QmpClient, cl: &CommandLine) -> Result<Vec<DefinedDisk>> {
    let listed = list_disks(qmp).await?;
    let blocks = qmp.query_block().await?;
    let mut out = Vec::with_capacity(listed.len());
    for d in listed {
        let block = blocks
            .iter()
            .find(|b| b.inserted.as_ref().and_then(|i| i.node_name.as_deref()) == Some(&d.node));
        let drive_id = block.map(|b| b.device.clone()).filter(|s| !s.is_empty());
        let qdev = block.and_then(|b| b.qdev.clone()).filter(|s| !s.is_empty());
        let device_id = qdev.as_deref().and_then(device_id_of);
        let mut disk = DefinedDisk {
            name: d.name,
            node: d.node,
            drive_id,
            qdev,
            device_id,
            format: d.format,
            file: d.file,
            image: None,
            size: d.size,
            on_command_line: false,
        };
        match disk_site(cl, &disk) {
            Some(site) => {
                disk.on_command_line = true;
                disk.image = image_of(cl, site);
            }
            None => warn!(disk = %disk.name, node = %disk.node,
                "disk not found on the VM's command line (hot-plugged?): a recovery cannot recreate it"),
        }
        out.push(disk);
    }
    Ok(out)
}

/// `vd0` from `/machine/peripheral/vd0/virtio-backend`.
fn device_id_of(qdev: &str) -> Option<String> {
    let rest = qdev.strip_prefix("/machine/peripheral/")?;
    rest.split('/')
        .next()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn boot_file(role: String, path: String, base: Option<&Path>) -> BootFile {
    let p = Path::new(&path);
    let host = match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p.to_path_buf(),
    };
    let size = match std::fs::metadata(&host) {
        Ok(m) if m.is_file() => Some(m.len()),
        Ok(_) => {
            warn!(role, path = %host.display(), "boot file is not a regular file");
            None
        }
        Err(e) => {
            warn!(role, path = %host.display(), error = %e, "boot file cannot be read");
            None
        }
    };
    BootFile {
        role,
        path,
        host_path: host.display().to_string(),
        size,
    }
}

type PeerArgs = (Vec<String>, ArgsOrigin, Option<String>, Option<PathBuf>);

/// The command line, program and working directory of the process behind `socket`.
fn peer_args(socket: &Path) -> Result<PeerArgs> {
    let pid = crate::capture::peer::listener_pid(socket).ok_or_else(|| {
        Error::Definition(format!(
            "cannot find the process listening on {} (another PID namespace?): give the VM's \
             command line with --vm-config FILE",
            socket.display()
        ))
    })?;
    pid_args(pid)
}

/// The command line, program and working directory of process `pid`.
fn pid_args(pid: u32) -> Result<PeerArgs> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let raw = read_bounded(&proc.join("cmdline")).map_err(|e| {
        Error::Definition(format!(
            "cannot read the command line of QEMU (pid {pid}): {e}; give it with --vm-config FILE"
        ))
    })?;
    let mut words = split_nul(&raw)
        .map_err(|e| Error::Definition(format!("command line of QEMU (pid {pid}): {e}")))?;
    if words.is_empty() {
        return Err(Error::Definition(format!(
            "QEMU (pid {pid}) has an empty command line; give it with --vm-config FILE"
        )));
    }
    let argv0 = words.remove(0);
    let binary = std::fs::read_link(proc.join("exe"))
        .ok()
        .map(|p| p.display().to_string())
        .or(Some(argv0));
    let cwd = std::fs::read_link(proc.join("cwd")).ok();
    Ok((words, ArgsOrigin::Process { pid }, binary, cwd))
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(ARGS_MAX_BYTES + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > ARGS_MAX_BYTES {
        return Err(std::io::Error::other(format!(
            "longer than {ARGS_MAX_BYTES} bytes"
        )));
    }
    Ok(buf)
}

fn split_nul(raw: &[u8]) -> std::result::Result<Vec<String>, String> {
    let raw = raw.strip_suffix(b"\0").unwrap_or(raw);
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    raw.split(|b| *b == 0)
        .map(|w| String::from_utf8(w.to_vec()).map_err(|_| "an argument is not UTF-8".to_owned()))
        .collect()
}

/// Reads a `--vm-config` file (see [`ArgsSource::File`]): the program (if the first element
/// is one) and the arguments.
pub fn read_args_file(path: &Path) -> Result<(Option<String>, Vec<String>)> {
    let what = || format!("--vm-config {}", path.display());
    let raw = read_bounded(path).map_err(|e| Error::Definition(format!("{}: {e}", what())))?;
    let text = String::from_utf8(raw)
        .map_err(|_| Error::Definition(format!("{}: not UTF-8 text", what())))?;
    let mut words: Vec<String> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| {
            Error::Definition(format!("{}: not a JSON array of strings: {e}", what()))
        })?
    } else {
        text.lines()
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    };
    if words.is_empty() {
        return Err(Error::Definition(format!("{}: no arguments", what())));
    }
    let binary = (!words[0].starts_with('-')).then(|| words.remove(0));
    Ok((binary, words))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_files_in_both_forms() {
        let dir = tempfile::tempdir().unwrap();
        let lines = dir.path().join("vm.args");
        std::fs::write(
            &lines,
            "/usr/bin/qemu-system-x86_64\r\n-name\nweb 1\n\n-append\nconsole=ttyS0 quiet\n",
        )
        .unwrap();
        let (bin, args) = read_args_file(&lines).unwrap();
        assert_eq!(bin.as_deref(), Some("/usr/bin/qemu-system-x86_64"));
        assert_eq!(args, ["-name", "web 1", "-append", "console=ttyS0 quiet"]);

        let json = dir.path().join("vm.json");
        std::fs::write(&json, r#" ["-m", "256", "-name", "a b"]"#).unwrap();
        let (bin, args) = read_args_file(&json).unwrap();
        assert_eq!(bin, None);
        assert_eq!(args, ["-m", "256", "-name", "a b"]);

        std::fs::write(&json, r#"["-m", 256]"#).unwrap();
        assert!(read_args_file(&json).is_err());
        std::fs::write(&json, "\n\n").unwrap();
        assert!(read_args_file(&json).is_err());
        assert!(read_args_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn proc_cmdline_split() {
        assert_eq!(
            split_nul(b"qemu\0-m\0\0x\0").unwrap(),
            ["qemu", "-m", "", "x"]
        );
        assert_eq!(split_nul(b"").unwrap(), Vec::<String>::new());
        assert!(split_nul(b"\xff\0").is_err());
    }

    #[test]
    fn device_ids() {
        assert_eq!(
            device_id_of("/machine/peripheral/vd0/virtio-backend").as_deref(),
            Some("vd0")
        );
        assert_eq!(device_id_of("/machine/peripheral-anon/device[0]/x"), None);
        assert_eq!(device_id_of("/machine/peripheral/"), None);
    }
}
