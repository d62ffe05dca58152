//! Can this QEMU run the recorded VM?
//!
//! A migration state loads into a QEMU that emulates the same architecture and knows the
//! machine type it was saved with (QEMU keeps old machine types for years, so a newer QEMU
//! loads an older state; an older QEMU does not know newer machine types). The version
//! itself is only reported. We ask the binary, not a table: `--version`, `-machine help`, and
//! `query-target` over QMP on stdio with `-machine none` (no CPU runs; KVM first, because a
//! distribution's TCG may be a module that only loads into the QEMU it was built with).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::StartMode;
use crate::error::{Error, Result};
use crate::vmdef::{QemuVersion, VmDefinition};

/// How long one probe of the binary may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a QEMU binary says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuInfo {
    pub binary: PathBuf,
    pub version: QemuVersion,
    /// Machine types it knows (aliases such as `pc` included).
    pub machines: Vec<String>,
    /// Target architecture (`query-target`).
    pub arch: String,
}

/// The QEMU to use: `given` (`--qemu`), else the program that ran the VM if it still exists,
/// else `qemu-system-<arch>` from `PATH`.
pub fn qemu_binary(def: &VmDefinition, given: Option<&Path>) -> PathBuf {
    if let Some(g) = given {
        return g.to_path_buf();
    }
    if let Some(b) = def.binary.as_deref() {
        if Path::new(b).is_absolute() && Path::new(b).is_file() {
            return PathBuf::from(b);
        }
    }
    PathBuf::from(format!("qemu-system-{}", def.arch))
}

/// [`check_qemu`] for resuming a saved state.
pub fn check_loadable(qemu: &Path, def: &VmDefinition) -> Result<QemuInfo> {
    check_qemu(qemu, def, StartMode::Resume)
}

/// Refuses, with the way out, when `qemu` cannot run `def` (see the module docs).
pub fn check_qemu(qemu: &Path, def: &VmDefinition, mode: StartMode) -> Result<QemuInfo> {
    let info = qemu_info(qemu)?;
    let what = match mode {
        StartMode::Resume => "load a state saved by",
        StartMode::Cold => "boot the VM recorded by",
    };
    let head = format!(
        "QEMU {} at {} cannot {what} QEMU {} with machine {}",
        info.version,
        qemu.display(),
        def.qemu,
        def.machine
    );
    if info.arch != def.arch {
        return Err(Error::NotLoadable(format!(
            "{head}: it emulates {}, the VM is {}; use qemu-system-{} (--qemu BINARY)",
            info.arch, def.arch, def.arch
        )));
    }
    if !info.machines.iter().any(|m| m == &def.machine) {
        let advice = match machine_version(&def.machine) {
            Some((maj, min)) if (info.version.major, info.version.minor) < (maj, min) => {
                format!("use a QEMU >= {maj}.{min} (--qemu BINARY)")
            }
            None if info.version < def.qemu => format!(
                "use a QEMU >= {}.{} (--qemu BINARY)",
                def.qemu.major, def.qemu.minor
            ),
            _ => "use a QEMU that still provides it (--qemu BINARY)".to_owned(),
        };
        return Err(Error::NotLoadable(format!(
            "{head}: that machine type is unknown to it; {advice}"
        )));
    }
    Ok(info)
}

/// `(10, 0)` from `pc-i440fx-10.0` or `virt-9.2`.
fn machine_version(machine: &str) -> Option<(u64, u64)> {
    let tail = machine.rsplit('-').next()?;
    let (maj, min) = tail.split_once('.')?;
    Some((maj.parse().ok()?, min.parse().ok()?))
}

/// Asks `qemu` for its version, machine types and architecture.
pub fn qemu_info(qemu: &Path) -> Result<QemuInfo> {
    let qmp = concat!(
        "{\"execute\":\"qmp_capabilities\"}\n",
        "{\"execute\":\"query-target\"}\n",
        "{\"execute\":\"quit\"}\n"
    );
    let target_args = [
        "-machine",
        "none",
        "-accel",
        "kvm",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-qmp",
        "stdio",
    ];
    // Three independent runs of the binary, side by side: they are most of `recover`'s
    // start-up time otherwise.
    let (version_text, machines_text, out) = std::thread::scope(|s| {
        let version = s.spawn(|| probe(qemu, &["--version"], None));
        let machines = s.spawn(|| probe(qemu, &["-machine", "help"], None));
        let target = probe(qemu, &target_args, Some(qmp.as_bytes()));
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<String>>| {
            h.join()
                .unwrap_or_else(|_| Err(Error::NotLoadable("a QEMU probe panicked".into())))
        };
        (join(version), join(machines), target)
    });
    let version_text = version_text?;
    let version = QemuVersion::find_in(&version_text).ok_or_else(|| {
        Error::NotLoadable(format!(
            "{} is not a QEMU system emulator: `--version` printed {:?}",
            qemu.display(),
            first_line(&version_text)
        ))
    })?;
    let machines = parse_machines(&machines_text?);
    let out = out?;
    let arch = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["return"]["arch"].as_str().map(str::to_owned))
        .ok_or_else(|| {
            Error::NotLoadable(format!(
                "QEMU {version} at {} did not say which architecture it emulates (query-target): {:?}",
                qemu.display(),
                first_line(&out)
            ))
        })?;
    Ok(QemuInfo {
        binary: qemu.to_path_buf(),
        version,
        machines,
        arch,
    })
}

/// Machine names of `-machine help` (the first word of each line after the heading).
fn parse_machines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim_end().ends_with(':'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// Runs `qemu args` (stdin `input` or nothing), returning stdout; fails on a non-zero exit, a
/// missing binary or [`PROBE_TIMEOUT`].
fn probe(qemu: &Path, args: &[&str], input: Option<&[u8]>) -> Result<String> {
    let describe = || format!("{} {}", qemu.display(), args.join(" "));
    let mut child = Command::new(qemu)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::NotLoadable(format!("cannot run QEMU {}: {e}", qemu.display())))?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        // A QEMU that exits early closes its stdin: the error shows in its exit status.
        let _ = stdin.write_all(input);
    }
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.by_ref().take(1 << 20).read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.by_ref().take(64 << 10).read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() < PROBE_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::NotLoadable(format!(
                    "`{}` did not finish within {PROBE_TIMEOUT:?}",
                    describe()
                )));
            }
        }
    };
    let out = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    if !status.success() {
        return Err(Error::NotLoadable(format!(
            "`{}` failed ({status}): {}",
            describe(),
            err.trim()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_lists_and_versions() {
        let help = "Supported machines are:\nmicrovm              microvm (i386)\npc                   Standard PC (alias of pc-i440fx-10.0)\npc-i440fx-10.0       Standard PC (default)\n\n";
        assert_eq!(parse_machines(help), ["microvm", "pc", "pc-i440fx-10.0"]);
        assert_eq!(machine_version("pc-i440fx-10.0"), Some((10, 0)));
        assert_eq!(machine_version("virt-9.2"), Some((9, 2)));
        assert_eq!(machine_version("microvm"), None);
        assert_eq!(machine_version("none"), None);
    }
}
