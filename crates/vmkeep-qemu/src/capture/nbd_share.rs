//! Sharing an NBD server that someone else started in QEMU.
//!
//! QEMU runs one NBD server at a time, and QMP does not say where a running one listens. When
//! `nbd-server-start` answers "already running", vmkeep finds the server among the unix
//! sockets QEMU's process listens on (its fds matched against `/proc/net/unix`), recognises it
//! by the NBD greeting ("NBDMAGIC"), and adds its own exports there; it never stops that
//! server. The probe connects to each candidate once and closes at once (a QMP monitor greets
//! and sees EOF; a chardev socket sees a client come and go).
//!
//! A server on TCP is named and refused: vmkeep's NBD client speaks unix sockets only.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// How long a candidate may take to greet.
const GREETING_TIMEOUT: Duration = Duration::from_millis(500);

/// The unix socket of the NBD server running in QEMU process `pid`, not counting `exclude`
/// (the monitor vmkeep holds).
pub fn find_server(pid: u32, exclude: &Path) -> Result<PathBuf> {
    let inodes = socket_inodes(pid)?;
    let unix = std::fs::read_to_string("/proc/net/unix")
        .map_err(|e| Error::io("read /proc/net/unix", e))?;
    for path in listening_unix(&unix, &inodes) {
        if Path::new(&path) == exclude {
            continue;
        }
        if greets_as_nbd(Path::new(&path)) {
            return Ok(PathBuf::from(path));
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(t) = std::fs::read_to_string(table) {
            ports.extend(listening_tcp_ports(&t, &inodes));
        }
    }
    ports.sort_unstable();
    ports.dedup();
    let tcp = match ports.as_slice() {
        [] => String::new(),
        p => format!(
            "; QEMU listens on TCP port {}, which may be it: vmkeep reads over unix sockets only",
            p.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
        ),
    };
    Err(Error::Refused(format!(
        "QEMU already runs an NBD server (started by libvirt, another backup tool, or by hand) \
         that vmkeep cannot share: it is on none of the unix sockets QEMU listens on{tcp}. \
         QEMU allows one server: stop it (nbd-server-stop) or wait for that job to end, then \
         run the backup again. Nothing was changed."
    )))
}

/// Inodes of the sockets process `pid` holds.
fn socket_inodes(pid: u32) -> Result<HashSet<u64>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        Error::io(
            format!("list {dir} (vmkeep looks for QEMU's NBD server there)"),
            e,
        )
    })?;
    Ok(entries
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect())
}

/// Paths of listening unix sockets in `/proc/net/unix` text whose inode is in `inodes`.
fn listening_unix(table: &str, inodes: &HashSet<u64>) -> Vec<String> {
    const ACCEPTCON: u32 = 0x10000;
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let inode: u64 = f.get(6)?.parse().ok()?;
            let path = *f.get(7)?;
            // Abstract sockets start with '@' and have no path to connect to.
            (flags & ACCEPTCON != 0 && inodes.contains(&inode) && path.starts_with('/'))
                .then(|| path.to_string())
        })
        .collect()
}

/// Ports of listening TCP sockets in `/proc/net/tcp{,6}` text whose inode is in `inodes`.
fn listening_tcp_ports(table: &str, inodes: &HashSet<u64>) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let listening = *f.get(3)? == "0A";
            let inode: u64 = f.get(9)?.parse().ok()?;
            (listening && inodes.contains(&inode)).then_some(port)
        })
        .collect()
}

/// Whether the server on `path` opens with an NBD greeting.
fn greets_as_nbd(path: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(path) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(GREETING_TIMEOUT));
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_picked_from_procs_tables() {
        let unix = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 101 /run/vm/qmp.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 102 /run/vm/nbd.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 103 /run/vm/qmp.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 104 @abstract\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 999 /run/other.sock\n";
        let mine: HashSet<u64> = [101, 102, 103, 104].into();
        assert_eq!(
            listening_unix(unix, &mine),
            ["/run/vm/qmp.sock", "/run/vm/nbd.sock"]
        );
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:2A29 00000000:0000 0A 00000000:00000000 00:00000000 00000000   0        0 201 1 0 100 0 0 10 0\n\
            1: 0100007F:2A2A 0100007F:9C40 01 00000000:00000000 00:00000000 00000000   0        0 202 1 0 100 0 0 10 0\n";
        let mine: HashSet<u64> = [201, 202].into();
        assert_eq!(listening_tcp_ports(tcp, &mine), [10793]);
        assert!(listening_unix("garbage\nmore garbage", &mine).is_empty());
    }

    #[test]
    fn only_an_nbd_greeting_counts() {
        let dir = tempfile::tempdir().unwrap();
        let nbd = dir.path().join("nbd.sock");
        let other = dir.path().join("other.sock");
        let l1 = std::os::unix::net::UnixListener::bind(&nbd).unwrap();
        let l2 = std::os::unix::net::UnixListener::bind(&other).unwrap();
        let t = std::thread::spawn(move || {
            use std::io::Write;
            let (mut a, _) = l1.accept().unwrap();
            a.write_all(b"NBDMAGICIHAVEOPT").unwrap();
            let (mut b, _) = l2.accept().unwrap();
            b.write_all(b"{\"QMP\": ").unwrap();
        });
        assert!(greets_as_nbd(&nbd));
        assert!(!greets_as_nbd(&other));
        assert!(!greets_as_nbd(&dir.path().join("none.sock")));
        t.join().unwrap();
    }
}
