//! Who holds a QMP monitor that does not greet us, and what the user can do about it.
//!
//! A monitor serves one client at a time (qemu-facts.md §6). The client holding it is the peer
//! of QEMU's accepted connection on the socket's path: `ss -xpn` (iproute2, sock_diag) lists
//! every unix connection with its peer's inode and owning process. Without `ss`, or when the
//! holder is in a namespace we cannot see, the message names the monitor alone.

use std::path::Path;
use std::process::{Command, Stdio};

/// The process holding a monitor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub name: String,
    pub pid: u32,
}

/// The process connected to QEMU through the socket `path`, other than this process.
pub fn monitor_holder(path: &Path) -> Option<Holder> {
    let out = Command::new("ss")
        .arg("-xpn")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    holder_in(
        &String::from_utf8_lossy(&out.stdout),
        path,
        std::process::id(),
    )
}

/// [`monitor_holder`] over `ss -xpn` output.
fn holder_in(ss: &str, path: &Path, me: u32) -> Option<Holder> {
    let path = path.to_str()?;
    let rows: Vec<Vec<&str>> = ss.lines().map(|l| l.split_whitespace().collect()).collect();
    // Netid State Recv-Q Send-Q Local Inode Peer PeerInode Process
    let peers: Vec<&str> = rows
        .iter()
        .filter(|r| r.len() >= 8 && r[1] == "ESTAB" && r[4] == path)
        .map(|r| r[7])
        .collect();
    rows.iter()
        .filter(|r| r.len() >= 9 && peers.contains(&r[5]))
        .filter_map(|r| parse_users(&r[8..].join(" ")))
        .find(|h| h.pid != me)
}

/// `users:(("pvestatd",pid=123,fd=7))` to its first process.
fn parse_users(s: &str) -> Option<Holder> {
    let rest = s.strip_prefix("users:((\"")?;
    let (name, rest) = rest.split_once('"')?;
    let pid = rest
        .split("pid=")
        .nth(1)?
        .split([',', ')'])
        .next()?
        .parse()
        .ok()?;
    Some(Holder {
        name: name.to_string(),
        pid,
    })
}

/// What to do when the monitor at `path` is held by `holder`.
pub fn advice(path: &Path, holder: Option<&Holder>) -> String {
    let p = path.to_string_lossy();
    let name = holder.map(|h| h.name.as_str()).unwrap_or("");
    let proxmox = p.contains("/qemu-server/")
        || [
            "pvestatd",
            "pvedaemon",
            "pveproxy",
            "qm",
            "qmeventd",
            "vzdump",
        ]
        .contains(&name);
    let libvirt = p.contains("/libvirt/") || name.starts_with("libvirtd") || name == "virtqemud";
    if libvirt {
        "the VM is managed by libvirt: back it up through libvirt with `vmkeep backup vm --libvirt DOMAIN`".into()
    } else if proxmox {
        "Proxmox uses this monitor (qm, pvestatd): give vmkeep one of its own with `qm set ID --args '-qmp unix:/run/vmkeep/ID.qmp,server=on,wait=off'`, restart the VM, and pass that socket with --qmp".into()
    } else if name == "vmkeep" {
        "another vmkeep is capturing this VM: wait for it to finish".into()
    } else {
        "give vmkeep a monitor of its own (QEMU option `-qmp unix:PATH,server=on,wait=off`), or stop the other client".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SS: &str = "Netid State Recv-Q Send-Q Local Address:Port Peer Address:Port Process
u_str ESTAB 0 0 /var/run/qemu-server/100.qmp 5001 * 5002 users:((\"kvm\",pid=900,fd=12))
u_str ESTAB 0 0 * 5002 * 5001 users:((\"pvestatd\",pid=1234,fd=7))
u_str ESTAB 0 0 /var/run/qemu-server/100.qmp 5003 * 5004 users:((\"kvm\",pid=900,fd=13))
u_str ESTAB 0 0 * 5004 * 5003 users:((\"vmkeep\",pid=77,fd=9))
";

    #[test]
    fn the_holder_is_the_peer_of_qemus_connection_other_than_us() {
        let h = holder_in(SS, Path::new("/var/run/qemu-server/100.qmp"), 77).unwrap();
        assert_eq!(
            h,
            Holder {
                name: "pvestatd".into(),
                pid: 1234
            }
        );
        assert_eq!(holder_in(SS, Path::new("/run/other.qmp"), 77), None);
        assert_eq!(holder_in("garbage\n\n", Path::new("/x"), 1), None);
    }

    #[test]
    fn advice_names_the_way_out_for_each_party() {
        let proxmox = advice(Path::new("/var/run/qemu-server/100.qmp"), None);
        assert!(proxmox.contains("qm set ID --args"), "{proxmox}");
        let lv = Holder {
            name: "libvirtd".into(),
            pid: 1,
        };
        assert!(advice(Path::new("/x.qmp"), Some(&lv)).contains("--libvirt DOMAIN"));
        let other = advice(Path::new("/x.qmp"), None);
        assert!(other.contains("-qmp unix:PATH"), "{other}");
    }
}
