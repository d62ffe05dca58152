//! Who holds a lease, precisely enough to judge it (FORMAT.md §13 "Host identity").
//!
//! A lease names its process by pid; a pid means something only inside one PID namespace of
//! one running kernel. The hostname cannot tell that: containers share it, cloned VMs and many
//! machines called `localhost` too. So a lease carries:
//! - `boot`: the kernel's boot id (`/proc/sys/kernel/random/boot_id`, random at every boot, so
//!   different on every machine, clones included, and after every reboot);
//! - `pid_ns`: the inode of the holder's PID namespace (`/proc/self/ns/pid`);
//! - `pid` and `pid_start` (the process start time in clock ticks since boot, which tells a
//!   reused pid from the holder);
//! - `machine`: a random id kept per machine in a state file (for people and for grouping
//!   leases by machine; it is cloned with a VM's disk, so it never decides anything alone);
//! - `name`: the hostname, for messages only.
//!
//! A lease's process may be looked up in `/proc` only when boot and PID namespace are ours.
//! The same boot also means the same clock: no clock-skew margin is needed between them.
use std::path::PathBuf;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use vmkeep_core::HostId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostIdentity {
    pub machine: HostId,
    pub boot: String,
    pub pid_ns: u64,
    pub name: String,
}

impl HostIdentity {
    /// This process's identity (computed once).
    pub fn current() -> &'static HostIdentity {
        static ME: OnceLock<HostIdentity> = OnceLock::new();
        ME.get_or_init(|| HostIdentity {
            machine: machine_id(),
            boot: read_trimmed("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
            pid_ns: std::fs::metadata("/proc/self/ns/pid")
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap_or(0),
            name: hostname(),
        })
    }

    /// Whether a pid recorded by `other` can be looked up in our `/proc`: same running kernel,
    /// same PID namespace. Unknown values (empty boot id, namespace 0) never match.
    pub fn shares_pids_with(&self, other: &HostIdentity) -> bool {
        !self.boot.is_empty()
            && self.pid_ns != 0
            && self.boot == other.boot
            && self.pid_ns == other.pid_ns
    }

    /// Same running kernel, hence the same clock.
    pub fn shares_clock_with(&self, other: &HostIdentity) -> bool {
        !self.boot.is_empty() && self.boot == other.boot
    }

    /// For messages: "web1 (machine 3f2a9c1e)".
    pub fn describe(&self) -> String {
        format!("{} (machine {:#})", self.name, self.machine)
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub(crate) fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".into())
}

/// Where this machine's id is kept: `$VMKEEP_STATE_DIR/host-id`, else `/var/lib/vmkeep/host-id`
/// for root, else `$XDG_STATE_HOME/vmkeep/host-id` (default `~/.local/state/vmkeep/host-id`).
fn machine_id_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("VMKEEP_STATE_DIR") {
        return Some(PathBuf::from(d).join("host-id"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/var/lib/vmkeep/host-id"));
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("vmkeep").join("host-id"))
}

/// The machine's id, created on first use. Concurrent first uses agree: the id is written to
/// a temporary file and linked into place, and whoever loses the race reads the winner's.
/// When the file cannot be kept (read-only home), a fresh id per process is used: it is only
/// informational (see the module doc).
fn machine_id() -> HostId {
    let Some(path) = machine_id_path() else {
        return HostId::random();
    };
    if let Some(id) = read_trimmed(&path.to_string_lossy()).and_then(|s| s.parse().ok()) {
        return id;
    }
    let fresh = HostId::random();
    let stored = (|| -> std::io::Result<()> {
        let dir = path.parent().expect("a file path has a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".host-id-{}", std::process::id()));
        std::fs::write(&tmp, format!("{fresh}\n"))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    })();
    if let Err(e) = stored {
        tracing::debug!(path = %path.display(), error = %e, "cannot keep the host id; using one per process");
        return fresh;
    }
    read_trimmed(&path.to_string_lossy())
        .and_then(|s| s.parse().ok())
        .unwrap_or(fresh)
}

/// Start time of process `pid` in clock ticks after boot (field 22 of `/proc/<pid>/stat`), or
/// None when no such process is visible.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: split after it.
    let (_, rest) = stat.rsplit_once(')')?;
    // rest = " S ppid ..." : state is field 3, so starttime (22) is the 20th after the name.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process a same-host lease names still runs: a process with that pid exists
/// and started when the lease says (a pid reused by another process does not count).
pub fn process_alive(pid: u32, start: Option<u64>) -> bool {
    match (process_start(pid), start) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(now), Some(then)) => now == then,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_its_start_is_stable() {
        let me = std::process::id();
        let start = process_start(me).expect("our own stat");
        assert_eq!(process_start(me), Some(start));
        assert!(process_alive(me, Some(start)));
        assert!(
            !process_alive(me, Some(start + 1)),
            "a reused pid is not the holder"
        );
        assert!(!process_alive(u32::MAX - 7, None));
    }

    #[test]
    fn identities_share_pids_only_on_the_same_kernel_and_namespace() {
        let me = HostIdentity::current().clone();
        assert!(!me.boot.is_empty() && me.pid_ns != 0, "{me:?}");
        assert!(me.shares_pids_with(&me));
        let container = HostIdentity {
            pid_ns: me.pid_ns + 1,
            ..me.clone()
        };
        assert!(!me.shares_pids_with(&container));
        assert!(me.shares_clock_with(&container), "one kernel, one clock");
        let clone = HostIdentity {
            boot: "another-boot".into(),
            ..me.clone()
        };
        assert!(
            !me.shares_pids_with(&clone),
            "a cloned VM (same machine id and name)"
        );
        assert!(!me.shares_clock_with(&clone));
        let unknown = HostIdentity {
            boot: String::new(),
            ..me.clone()
        };
        assert!(!unknown.shares_pids_with(&unknown));
    }

    #[test]
    fn the_machine_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("VMKEEP_STATE_DIR", dir.path());
        let a = machine_id();
        let b = machine_id();
        std::env::remove_var("VMKEEP_STATE_DIR");
        assert_eq!(a, b);
        let stored = std::fs::read_to_string(dir.path().join("host-id")).unwrap();
        assert_eq!(stored.trim(), a.to_hex());
    }
}
