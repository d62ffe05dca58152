//! A writable view of a read-only NBD export (`vmkeep mount --writable`): a temporary qcow2
//! overlay whose backing file is the export, served by `qemu-nbd`.
//!
//! ```text
//! client ─NBD─► qemu-nbd (overlay.qcow2: writes land here) ─backing, NBD─► read-only export
//! ```
//!
//! The restore point behind the export never changes: QEMU's block layer copies nothing into
//! the backing file, and the export refuses writes anyway. The overlay lives in the caller's
//! private folder (`vmkeep mount`: a locked scratch folder, removed with it, or by the next
//! mount after a kill); qemu-nbd is stopped first, with SIGTERM, so it closes the image. Reads of unwritten ranges go through to the
//! export, block status included, so zero ranges stay holes for the client.
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::nbd::Listen;
use crate::qcow2_target::find_program;

/// How long qemu-nbd may take to listen, and to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running qemu-nbd serving a discardable overlay over an export; see the module docs.
pub struct WritableOverlay {
    child: Option<Child>,
    /// The caller's private folder, which holds the overlay and qemu-nbd's log.
    dir: PathBuf,
    uri: String,
}

impl WritableOverlay {
    /// Serves a new overlay of `base_uri` (an NBD URI of `size` bytes) as export `export` on
    /// `listen` (a Unix socket that must not exist, or a TCP address; port 0 picks one). The
    /// overlay goes into `dir`, a private folder of the caller's that it removes afterwards.
    pub fn start(
        dir: &Path,
        base_uri: &str,
        size: u64,
        listen: &Listen,
        export: &str,
    ) -> Result<Self> {
        let qemu_nbd = find_program("qemu-nbd")?;
        let dir = dir.to_path_buf();
        let image = dir.join("overlay.qcow2");
        create_overlay(&image, base_uri, size)?;
        let (bind_args, uri) = match listen {
            Listen::Unix(path) => {
                if path.exists() {
                    return Err(Error::io(
                        format!("serving on {}", path.display()),
                        std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "the socket path exists (another mount, or a leftover: remove it)",
                        ),
                    ));
                }
                (
                    vec!["-k".into(), path.display().to_string()],
                    format!("nbd+unix:///{export}?socket={}", path.display()),
                )
            }
            Listen::Tcp(addr) => {
                let addr = with_free_port(*addr)?;
                (
                    vec![
                        "-b".into(),
                        addr.ip().to_string(),
                        "-p".into(),
                        addr.port().to_string(),
                    ],
                    format!("nbd://{addr}/{export}"),
                )
            }
        };
        let log = dir.join("qemu-nbd.err");
        let err = std::fs::File::create(&log).map_err(|e| Error::io("create qemu-nbd's log", e))?;
        // -t: keep serving after a client leaves; -e: clients at once.
        let mut cmd = Command::new(&qemu_nbd);
        // SAFETY: prctl is async-signal-safe. qemu-nbd dies with vmkeep (even by SIGKILL), so
        // no overlay is ever served over a backing export that is gone.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args([
                "-f",
                "qcow2",
                "-x",
                export,
                "-t",
                "-e",
                "16",
                "--cache=writeback",
            ])
            .args(&bind_args)
            .arg(&image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| Error::io(format!("start {}", qemu_nbd.display()), e))?;
        let mut overlay = WritableOverlay {
            child: Some(child),
            dir,
            uri,
        };
        overlay.wait_listening(listen, &log)?;
        Ok(overlay)
    }

    /// The URI clients use.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether qemu-nbd still runs (it should until the overlay is dropped).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn wait_listening(&mut self, listen: &Listen, log: &Path) -> Result<()> {
        let started = Instant::now();
        loop {
            if !self.running() {
                return Err(Error::io(
                    "qemu-nbd serving the overlay",
                    std::io::Error::other(format!("exited: {}", read_log(log))),
                ));
            }
            let up = match listen {
                Listen::Unix(p) => p.exists(),
                Listen::Tcp(_) => self
                    .uri
                    .strip_prefix("nbd://")
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .is_some_and(|a| std::net::TcpStream::connect(a).is_ok()),
            };
            if up {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(Error::io(
                    "qemu-nbd serving the overlay",
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("not listening after {START_TIMEOUT:?}: {}", read_log(log)),
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the overlay image is (in the caller's private folder).
    pub fn image(&self) -> PathBuf {
        self.dir.join("overlay.qcow2")
    }
}

impl Drop for WritableOverlay {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM lets qemu-nbd close the image; SIGKILL only if it does not exit in time.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Creates `image`, a qcow2 of `size` bytes whose backing file is the raw export at
/// `base_uri` (not opened now: `-u`). Writes land in the image; the export is only read.
pub fn create_overlay(image: &Path, base_uri: &str, size: u64) -> Result<()> {
    let qemu_img = find_program("qemu-img")?;
    let out = Command::new(&qemu_img)
        .args([
            "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", base_uri,
        ])
        .arg(image)
        .arg(size.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("run {}", qemu_img.display()), e))?;
    if !out.status.success() {
        return Err(Error::io(
            format!("qemu-img create {}", image.display()),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        ));
    }
    Ok(())
}

/// The cluster size of the overlays [`create_overlay`] makes (qemu-img's default).
pub const OVERLAY_CLUSTER: u64 = 64 << 10;
/// The longest `write -z` given to qemu-io (it refuses more than 2 GiB - 512 bytes).
const ZERO_WRITE_MAX: u64 = 1 << 30;

/// Marks the whole clusters inside each of `zero_ranges` (offset, length) of `image` (an
/// overlay from [`create_overlay`], not in use) as zero clusters: reads of them give zeros
/// without asking the backing file, and the copy skips them (they are allocated in
/// the overlay). For an instant recovery, the restore point's zero chunks are then never
/// read over NBD at all. The backing file is not opened.
pub fn mark_zero_clusters(image: &Path, zero_ranges: &[(u64, u64)]) -> Result<()> {
    let mut script = String::new();
    let mut commands = 0;
    for &(offset, len) in zero_ranges {
        let mut start = offset.div_ceil(OVERLAY_CLUSTER) * OVERLAY_CLUSTER;
        let end = (offset + len) / OVERLAY_CLUSTER * OVERLAY_CLUSTER;
        // qemu-io takes at most 2 GiB - 512 per write.
        while end > start {
            let piece = (end - start).min(ZERO_WRITE_MAX);
            script.push_str(&format!("write -z {start} {piece}\n"));
            commands += 1;
            start += piece;
        }
    }
    if commands == 0 {
        return Ok(());
    }
    script.push_str("quit\n");
    let qemu_io = find_program("qemu-io")?;
    let spec = serde_json::json!({"driver": "qcow2",
        "file": {"driver": "file", "filename": image}, "backing": null});
    let mut child = Command::new(&qemu_io)
        .arg(format!("json:{spec}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("run {}", qemu_io.display()), e))?;
    let mut stdin = child.stdin.take().expect("piped");
    // Written from a thread: qemu-io answers each line, and a full pipe would block both.
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(script.as_bytes())
    });
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("run {}", qemu_io.display()), e))?;
    let written = writer.join().map_err(|_| {
        Error::io(
            "writing qemu-io's commands",
            std::io::Error::other("panicked"),
        )
    })?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Each write that worked says "wrote N/N bytes"; anything else is an error.
    let wrote = said.matches("wrote ").count();
    if !out.status.success() || written.is_err() || wrote != commands {
        return Err(Error::io(
            format!("marking zero clusters in {}", image.display()),
            std::io::Error::other(said.lines().rev().take(3).collect::<Vec<_>>().join("; ")),
        ));
    }
    Ok(())
}

/// `addr`, or with port 0 a port free now (qemu-nbd cannot report the port it picked).
fn with_free_port(addr: SocketAddr) -> Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = TcpListener::bind(addr).map_err(|e| Error::io(format!("binding {addr}"), e))?;
    l.local_addr()
        .map_err(|e| Error::io(format!("binding {addr}"), e))
}

fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(4096).read_to_string(&mut s);
    }
    s.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges longer than qemu-io takes in one write (a 4 GiB disk's 2.5 GiB of zeros), and
    /// unaligned edges left to the copy.
    #[test]
    fn long_and_unaligned_zero_ranges_become_zero_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("o.qcow2");
        let backing = r#"json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"unix","path":"/nonexistent.sock"},"export":"x"}}"#;
        create_overlay(&image, backing, 4 << 30).unwrap();
        let zero = (5u64 << 30) / 2;
        mark_zero_clusters(&image, &[(1000, 4096), (1 << 20, zero)]).unwrap();
        let spec = serde_json::json!({"driver": "qcow2",
            "file": {"driver": "file", "filename": image}, "backing": null});
        let out = Command::new("qemu-img")
            .args(["map", "--output=json", &format!("json:{spec}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let present: Vec<(u64, u64)> = map
            .iter()
            .filter(|e| e["present"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect();
        // The 4 KiB range holds no whole cluster; the long one is whole, in pieces.
        assert_eq!(present, vec![(1 << 20, zero)], "{map:?}");
        assert!(map.iter().all(|e| e["data"] == false));
    }
}
