//! A new qcow2 image as a restore target, written through qemu-nbd.
//!
//! [`Qcow2Target::create`] runs `qemu-img create -f qcow2 PATH.partial SIZE`, serves it with a
//! private `qemu-nbd` (unix socket in a fresh 0700 temporary directory, O_DIRECT where the file
//! system allows: see [`cache_mode`]) and
//! connects one pipelined [`NbdClient`]. A restore writes its chunks in ascending order from
//! one thread ([`vmkeep_io::DiskWriter::wants_ascending_writes`]: qcow2 allocates clusters in
//! the order writes arrive, so the image is laid out in disk order), runs of neighbouring
//! chunks joined into one write; `restore --onto` writes from several threads at once. Each
//! write blocks on the client through a small tokio runtime owned by the target. Ranges never written stay unallocated in the image (they
//! read as zeros), so a sparse disk gives a small qcow2 and no full-size temporary file ever
//! exists. [`Qcow2Target::commit`] flushes (qemu-nbd fsyncs the image), disconnects, waits for
//! qemu-nbd to close the image, fsyncs it, renames `PATH.partial` to `PATH` and fsyncs the
//! folder, so after a power loss `PATH` either does not exist or is complete. Dropping an uncommitted target kills qemu-nbd
//! and removes the partial image.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::nbd::{NbdClient, NbdOptions};

/// Export name used on the private socket.
const EXPORT: &str = "disk";
/// How long qemu-nbd may take to listen, and to exit after the disconnect.
const SERVER_TIMEOUT: Duration = Duration::from_secs(30);

/// A qcow2 image being written; see the module documentation.
pub struct Qcow2Target {
    client: Option<NbdClient>,
    rt: tokio::runtime::Runtime,
    server: Option<Child>,
    /// Holds the socket and qemu-nbd's stderr; removed on drop.
    sockdir: tempfile::TempDir,
    partial: PathBuf,
    path: PathBuf,
    size: u64,
    committed: bool,
    /// An image the user gave (`restore --onto`): written in place, never removed or renamed.
    existing: bool,
    /// What qemu-img reports as the image's backing file, if any.
    backing: Option<String>,
}

impl std::fmt::Debug for Qcow2Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Target")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish()
    }
}

/// The `.partial` name a target at `path` is written under.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Full path of `program` in `PATH`, or an error naming the install script.
pub fn find_program(program: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::io(
                format!(
                    "{program} is required for qcow2 output but is not installed \
                     (install the QEMU tools: scripts/install-deps.sh, as root)"
                ),
                std::io::Error::new(std::io::ErrorKind::NotFound, "not found in PATH"),
            )
        })
}

impl Qcow2Target {
    /// Creates `path.partial` as an empty qcow2 of virtual size `size` and opens it for
    /// writing. `path` itself must not exist (the caller checks; it is only renamed onto).
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let qemu_img = find_program("qemu-img")?;
        let qemu_nbd = find_program("qemu-nbd")?;
        let partial = partial_path(path);
        let _ = std::fs::remove_file(&partial);
        let created = qemu_img_run(
            &qemu_img,
            Command::new(&qemu_img)
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&partial)
                .arg(size.to_string()),
            format!("qemu-img create {}", partial.display()),
        );
        if let Err(e) = created {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        // From here on, Drop cleans up (kills qemu-nbd, removes the partial image).
        Qcow2Target::serve(&qemu_nbd, partial, path, size, false, None)
    }

    /// The target over `partial` (the image qemu-nbd serves), qemu-nbd started and connected.
    fn serve(
        qemu_nbd: &Path,
        partial: PathBuf,
        path: &Path,
        size: u64,
        existing: bool,
        backing: Option<String>,
    ) -> Result<Self> {
        let sockdir = tempfile::Builder::new()
            .prefix("vmkeep-qcow2-")
            .tempdir()
            .map_err(|e| Error::io("create a private directory for the NBD socket", e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("vmkeep-qcow2")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the NBD runtime", e))?;
        let mut t = Qcow2Target {
            client: None,
            rt,
            server: None,
            sockdir,
            partial,
            path: path.to_path_buf(),
            size,
            committed: false,
            existing,
            backing,
        };
        t.start_server(qemu_nbd)?;
        Ok(t)
    }

    fn socket(&self) -> PathBuf {
        self.sockdir.path().join("nbd.sock")
    }

    fn stderr_path(&self) -> PathBuf {
        self.sockdir.path().join("qemu-nbd.err")
    }

    /// What qemu-nbd said on stderr (trimmed, bounded).
    fn server_stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(f) = std::fs::File::open(self.stderr_path()) {
            let _ = f.take(4096).read_to_string(&mut s);
        }
        s.trim().to_owned()
    }

    fn start_server(&mut self, qemu_nbd: &Path) -> Result<()> {
        let sock = self.socket();
        let err = std::fs::File::create(self.stderr_path())
            .map_err(|e| Error::io("create qemu-nbd's log", e))?;
        // Not persistent: qemu-nbd exits once our connection closes, after closing the image.
        // So readiness is probed by our real connection only (connect retries), never by a
        // throwaway connection.
        let child = Command::new(qemu_nbd)
            .args(["-f", "qcow2", "-x", EXPORT, "-e", "2"])
            .arg(cache_mode(&self.partial))
            .args(["--discard=unmap", "--aio=threads"])
            // Zeros written become unallocated clusters (restore --onto zeroes this way).
            .arg("--detect-zeroes=unmap")
            .arg("-k")
            .arg(&sock)
            .arg(&self.partial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| Error::io(format!("start {}", qemu_nbd.display()), e))?;
        self.server = Some(child);
        let start = Instant::now();
        let opts = NbdOptions {
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            max_in_flight: 8,
        };
        let client = loop {
            if let Some(st) = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.server = None;
                return Err(Error::io(
                    format!("qemu-nbd serving {}", self.partial.display()),
                    std::io::Error::other(format!("exited ({st}): {}", self.server_stderr())),
                ));
            }
            if sock.exists() {
                let r = self.rt.block_on(NbdClient::connect_unix_with(
                    &sock,
                    EXPORT,
                    &[],
                    opts.clone(),
                ));
                match r {
                    Ok(c) => break c,
                    // Bound but not yet listening: try again.
                    Err(Error::Io { .. }) if start.elapsed() < SERVER_TIMEOUT => {}
                    Err(e) => return Err(e),
                }
            }
            if start.elapsed() >= SERVER_TIMEOUT {
                return Err(Error::Timeout {
                    what: format!("qemu-nbd to listen on {}", sock.display()),
                    timeout: SERVER_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if client.is_read_only() || client.size() < self.size {
            return Err(Error::io(
                format!("qemu-nbd serving {}", self.partial.display()),
                std::io::Error::other(format!(
                    "export is {} bytes{}, the disk needs {}",
                    client.size(),
                    if client.is_read_only() {
                        " and read-only"
                    } else {
                        ""
                    },
                    self.size
                )),
            ));
        }
        self.client = Some(client);
        Ok(())
    }

    fn client(&self) -> Result<&NbdClient> {
        self.client
            .as_ref()
            .ok_or(Error::NbdClosed { reason: None })
    }

    /// The final path (valid after [`commit`](Self::commit)).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path written until [`commit`](Self::commit).
    pub fn partial(&self) -> &Path {
        &self.partial
    }

    /// Virtual size of the image.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes `data` at `offset`. Safe to call from several threads at once (outside any
    /// tokio runtime).
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let c = self.client()?;
        self.rt.block_on(c.write(offset, data))
    }

    /// Makes every completed write durable in the image file.
    pub fn flush(&self) -> Result<()> {
        let c = self.client()?;
        self.rt.block_on(c.flush())
    }

    /// Flushes, disconnects, waits for qemu-nbd to close the image, fsyncs it, and renames the
    /// partial image to its final path durably (folder fsynced), which it returns.
    pub fn commit(mut self) -> Result<PathBuf> {
        self.shut_down()?;
        vmkeep_io::publish(&self.partial, &self.path)
            .map_err(|e| Error::io(format!("rename to {}", self.path.display()), e))?;
        self.committed = true;
        Ok(self.path.clone())
    }

    /// Flushes, disconnects, waits for qemu-nbd to close the image and fsyncs it.
    fn shut_down(&mut self) -> Result<()> {
        self.flush()?;
        if let Some(c) = self.client.take() {
            self.rt.block_on(c.disconnect())?;
        }
        let mut child = self.server.take().expect("server running until shut down");
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if start.elapsed() < SERVER_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Timeout {
                        what: "qemu-nbd to close the image".into(),
                        timeout: SERVER_TIMEOUT,
                    });
                }
                Err(e) => return Err(Error::io("wait for qemu-nbd", e)),
            }
        };
        if !status.success() {
            return Err(Error::io(
                format!("qemu-nbd serving {}", self.partial.display()),
                std::io::Error::other(format!("exited ({status}): {}", self.server_stderr())),
            ));
        }
        // NBD_CMD_FLUSH made qemu-nbd fsync the image; closing it may still have updated the
        // header (dirty flag, refcounts). Our own fsync covers whatever the close wrote.
        std::fs::File::open(&self.partial)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(format!("fsync {}", self.partial.display()), e))
    }

    /// Opens the existing qcow2 image `path` for reading and writing in place
    /// (`restore --onto`), first resized to `size` (`qemu-img resize`, `--shrink` when smaller).
    pub fn open_existing(path: &Path, size: u64) -> Result<Self> {
        let qemu_img = find_program("qemu-img")?;
        let qemu_nbd = find_program("qemu-nbd")?;
        let info = image_info(&qemu_img, path)?;
        if info["format"].as_str() != Some("qcow2") {
            return Err(Error::io(
                format!("open {}", path.display()),
                std::io::Error::other(format!("not a qcow2 image ({})", info["format"])),
            ));
        }
        // qcow2 sizes are whole 512-byte sectors: a disk of another size lives in the
        // rounded-up image, as `create` makes it, and the tail reads as zeros.
        let virtual_size = size.div_ceil(512) * 512;
        let have = info["virtual-size"].as_u64().unwrap_or(0);
        if have != virtual_size {
            let mut cmd = Command::new(&qemu_img);
            cmd.args(["resize", "-q", "-f", "qcow2"]);
            if virtual_size < have {
                cmd.arg("--shrink");
            }
            qemu_img_run(
                &qemu_img,
                cmd.arg(path).arg(virtual_size.to_string()),
                format!("qemu-img resize {}", path.display()),
            )?;
        }
        let backing = info["backing-filename"].as_str().map(str::to_owned);
        Qcow2Target::serve(&qemu_nbd, path.to_path_buf(), path, size, true, backing)
    }

    /// The image's backing file (qemu-img's name for it), for an image opened in place.
    pub fn backing(&self) -> Option<&str> {
        self.backing.as_deref()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let c = self.client()?;
        let data = self.rt.block_on(c.read(offset, buf.len() as u64))?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Closes an image opened in place: flushed, qemu-nbd gone, fsynced.
    pub fn close(mut self) -> Result<()> {
        self.shut_down()
    }
}

/// `qemu-img info --output=json` of `path` (format, virtual size, backing file).
fn image_info(qemu_img: &Path, path: &Path) -> Result<serde_json::Value> {
    let what = format!("qemu-img info {}", path.display());
    let out = qemu_img_run(
        qemu_img,
        Command::new(qemu_img)
            .args(["info", "--output=json"])
            .arg(path),
        what.clone(),
    )?;
    serde_json::from_slice(&out).map_err(|e| Error::io(what, std::io::Error::other(e.to_string())))
}

/// Runs `cmd` (a qemu-img command) without stdin; its stdout, or its stderr as the error of
/// `what`.
fn qemu_img_run(qemu_img: &Path, cmd: &mut Command, what: String) -> Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("run {}", qemu_img.display()), e))?;
    if !out.status.success() {
        return Err(Error::io(
            what,
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        ));
    }
    Ok(out.stdout)
}

impl Drop for Qcow2Target {
    fn drop(&mut self) {
        // Close the connection before the runtime goes away.
        self.client = None;
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.committed && !self.existing {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

impl vmkeep_io::DiskWriter for Qcow2Target {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        Qcow2Target::write_at(self, data, offset).map_err(std::io::Error::other)
    }

    fn finish(&self) -> std::io::Result<()> {
        self.flush().map_err(std::io::Error::other)
    }

    fn target(&self) -> &Path {
        &self.partial
    }

    /// qcow2 allocates host clusters in the order writes arrive: written as the parallel
    /// workers finish chunks, a restored image was 80-90% fragmented (`qemu-img check`);
    /// written in ascending order it is laid out like the disk.
    fn wants_ascending_writes(&self) -> bool {
        true
    }
}

impl vmkeep_io::ImageAccess for Qcow2Target {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        Qcow2Target::read_at(self, buf, offset).map_err(std::io::Error::other)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        Qcow2Target::write_at(self, data, offset).map_err(std::io::Error::other)
    }
    fn zero_at(&self, offset: u64, len: u64) -> std::io::Result<()> {
        // qemu-nbd runs with --detect-zeroes=unmap: written zeros become unallocated clusters.
        vmkeep_io::write_zeros(offset, len, |z, at| {
            Qcow2Target::write_at(self, z, at).map_err(std::io::Error::other)
        })
    }
    fn flush(&self) -> std::io::Result<()> {
        Qcow2Target::flush(self).map_err(std::io::Error::other)
    }
    fn describe(&self) -> String {
        format!("{} (qcow2)", self.path.display())
    }
}

/// qemu-nbd's cache mode for `image`: O_DIRECT (`none`) where the file system takes it. A
/// restore writes each byte once and reads none back, so the page cache gives nothing, and
/// copying into it was the largest single cost of a qcow2 restore (perf: 30% of all samples,
/// `copy_folio_from_iter_atomic` in qemu-nbd; restore of 1.1 GB: 2.24 s instead of 3.13 s,
/// medians of 3). Durability is the same either way: commit flushes and fsyncs. File systems
/// without O_DIRECT (tmpfs) keep `writeback`.
fn cache_mode(image: &Path) -> &'static str {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(image)
    {
        Ok(_) => "--cache=none",
        Err(_) => "--cache=writeback",
    }
}
