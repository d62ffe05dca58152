//! Talking to libvirt: one `virsh` process per call.
//!
//! Why `virsh` and not the `virt` crate (bindings to libvirt.so): the binary then has no link
//! dependency on libvirt, so one vmkeep build runs on hosts with and without it, and the build
//! needs no `libvirt-dev`. A call costs 20-30 ms here (`virsh domjobinfo`, measured on libvirt
//! 9.0); a backup makes about ten, well inside the time an incremental takes anyway.
//! docs/ARCHITECTURE.md records the measurement.

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long one virsh call may take before libvirt counts as not answering.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A connection to one domain: the libvirt URI (`--connect`) and the domain's name or UUID.
#[derive(Clone, Debug)]
pub struct Virsh {
    pub uri: Option<String>,
    pub domain: String,
}

impl Virsh {
    pub fn new(uri: Option<String>, domain: impl Into<String>) -> Virsh {
        Virsh {
            uri,
            domain: domain.into(),
        }
    }

    /// Runs `virsh [-c URI] COMMAND DOMAIN ARGS...` and returns its standard output.
    pub fn domain_cmd(&self, command: &str, args: &[&str]) -> Result<String> {
        let mut all = vec![command, self.domain.as_str()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// The domain's checkpoint names, oldest first (parents before children).
    pub fn checkpoint_names(&self) -> Result<Vec<String>> {
        Ok(self
            .domain_cmd("checkpoint-list", &["--name", "--topological"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Runs `virsh [-c URI] ARGS...` and returns its standard output.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        self.run_passing(args, None)
    }

    /// [`Virsh::run`], with `fd` open in virsh under its own number (for `--pass-fds`).
    pub fn run_passing(&self, args: &[&str], fd: Option<BorrowedFd<'_>>) -> Result<String> {
        let mut cmd = Command::new("virsh");
        if let Some(uri) = &self.uri {
            cmd.args(["-c", uri]);
        }
        if let Some(fd) = fd {
            let raw = fd.as_raw_fd();
            // SAFETY: between fork and exec only fcntl runs, which is async-signal-safe; it
            // clears close-on-exec of an fd the parent keeps open for the call's duration.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = args.join(" ");
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Refused(
                    "virsh not found: vmkeep talks to libvirt through it (Debian: apt install libvirt-clients)".into(),
                )
            } else {
                Error::io("run virsh", e)
            }
        })?;
        // Drain both pipes on threads so a chatty virsh cannot block on a full pipe.
        let mut out_pipe = child.stdout.take().expect("piped");
        let mut err_pipe = child.stderr.take().expect("piped");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out_pipe.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err_pipe.read_to_string(&mut s);
            s
        });
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if start.elapsed() > CALL_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Timeout {
                        what: format!("libvirt to answer `virsh {shown}` (is libvirtd running and responsive?)"),
                        timeout: CALL_TIMEOUT,
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(Error::io("wait for virsh", e)),
            }
        };
        let out = out_reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        if status.success() {
            return Ok(out);
        }
        Err(Error::Libvirt {
            command: args.first().copied().unwrap_or_default().to_string(),
            message: clean_message(&err),
        })
    }
}

/// libvirt's error text without virsh's `error: ` prefixes, on one line, with a hint when the
/// daemon is not there at all.
pub fn clean_message(stderr: &str) -> String {
    let parts: Vec<&str> = stderr
        .lines()
        .map(|l| l.trim())
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .collect();
    let mut msg = if parts.is_empty() {
        "no message".to_string()
    } else {
        parts.join("; ")
    };
    if msg.contains("Failed to connect socket")
        || msg.contains("failed to connect to the hypervisor")
    {
        msg.push_str(" (is libvirtd running? the URI can be chosen with --connect)");
    }
    msg
}

/// The checkpoint and disk a failed incremental `backup-begin` names as broken, from libvirt's
/// "checkpoint inconsistent: missing or broken bitmap 'NAME' for disk 'DISK'".
pub fn broken_bitmap(message: &str) -> Option<(String, String)> {
    let rest = message.split("missing or broken bitmap '").nth(1)?;
    let (bitmap, rest) = rest.split_once('\'')?;
    let disk = rest.split("for disk '").nth(1)?.split('\'').next()?;
    Some((bitmap.to_string(), disk.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_lose_prefixes_and_gain_hints() {
        assert_eq!(
            clean_message("error: Failed to start\nerror: Requested operation is not valid\n"),
            "Failed to start; Requested operation is not valid"
        );
        assert!(clean_message(
            "error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory"
        )
        .ends_with("(is libvirtd running? the URI can be chosen with --connect)"));
        assert_eq!(clean_message(""), "no message");
    }

    #[test]
    fn a_broken_bitmap_is_named() {
        let m = "checkpoint inconsistent: missing or broken bitmap 'vmkeep-abc-2' for disk 'vda'";
        assert_eq!(
            broken_bitmap(m),
            Some(("vmkeep-abc-2".into(), "vda".into()))
        );
        assert_eq!(broken_bitmap("Requested operation is not valid"), None);
    }
}
