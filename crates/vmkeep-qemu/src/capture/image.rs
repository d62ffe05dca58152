//! Images of a stopped VM (qcow2 and other formats) through a `qemu-storage-daemon` we start:
//! each image opened read-write (bitmaps rotate, so qcow2 images keep incremental backups
//! across restore points and across live/offline backups: both name the bitmap's home
//! `qcow2:<canonical path>`), then the same capture as a live VM ([`QmpCapture`]), minus what
//! only a running guest needs (no device writes to these disks: no stop, no filter). The
//! daemon quits cleanly at the end so persistent bitmaps are written back to the images.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmkeep_core::manifest::Manifest;

use super::session::runtime;
use super::{disks, CaptureOptions, QmpCapture, VmDisk};
use crate::error::{Error, Result};
use crate::qmp::QmpClient;
use vmkeep_io::{SourceDisk, SourceError, VmSource};

/// A child killed and reaped on drop (after a clean `quit` it has already exited).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Format and virtual size by `qemu-img info`.
pub fn image_info(path: &Path) -> Result<(String, u64)> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("run qemu-img info", e))?;
    if !out.status.success() {
        return Err(Error::Refused(format!(
            "qemu-img info {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Refused(format!("qemu-img info output: {e}")))?;
    let format = v["format"].as_str().unwrap_or("raw").to_string();
    let size = v["virtual-size"].as_u64().unwrap_or(0);
    Ok((format, size))
}

/// A capture of image files of a stopped VM (see the module docs).
pub struct ImageCapture {
    inner: Option<QmpCapture>,
    qmp_sock: PathBuf,
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl ImageCapture {
    /// Opens `images` (name, path) in a qemu-storage-daemon and cuts them.
    pub fn start(
        images: &[(String, PathBuf)],
        mut opts: CaptureOptions,
        parent: Option<&Manifest>,
    ) -> Result<ImageCapture> {
        if images.is_empty() {
            return Err(Error::Refused("no --disk given".into()));
        }
        let mut infos = Vec::new();
        for (name, path) in images {
            vmkeep_core::manifest::validate_name("disk name", name)
                .map_err(|e| Error::Refused(e.to_string()))?;
            let (format, size) = image_info(path)?;
            let canon = std::fs::canonicalize(path)
                .map_err(|e| Error::io(format!("resolve {}", path.display()), e))?;
            infos.push((name.clone(), canon, format, size));
        }
        let dir = tempfile::Builder::new()
            .prefix("vmkeep-qsd-")
            .tempdir()
            .map_err(|e| Error::io("create a scratch directory", e))?;
        let qmp_sock = dir.path().join("qmp.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        for (i, (_, path, format, _)) in infos.iter().enumerate() {
            cmd.arg("--blockdev").arg(
                json!({"driver": "file", "filename": path, "node-name": format!("vmkeep-f{i}")})
                    .to_string(),
            );
            cmd.arg("--blockdev").arg(
                json!({"driver": format, "file": format!("vmkeep-f{i}"),
                       "node-name": format!("vmkeep-d{i}")})
                .to_string(),
            );
        }
        let sock_opt = qmp_sock.display().to_string().replace(',', ",,");
        cmd.arg("--chardev")
            .arg(format!(
                "socket,path={sock_opt},server=on,wait=off,id=vmkeep-m0"
            ))
            .args(["--monitor", "chardev=vmkeep-m0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .map_err(|e| Error::io("start qemu-storage-daemon", e))?;
        let mut daemon = Daemon(child);
        let pid = daemon.0.id();
        let rt = runtime()?;
        let qmp = connect_daemon(&rt, &qmp_sock, &mut daemon)?;
        let mut vm_disks = Vec::new();
        for (i, (name, path, format, size)) in infos.iter().enumerate() {
            let node = format!("vmkeep-d{i}");
            let info = rt
                .block_on(qmp.query_named_block_nodes())?
                .into_iter()
                .find(|n| n.node_name == node);
            vm_disks.push(VmDisk {
                name: name.clone(),
                not_persistent: disks::not_persistent(format, info.as_ref()),
                bitmaps: info.map(|n| n.dirty_bitmaps).unwrap_or_default(),
                node,
                format: format.clone(),
                file: path.display().to_string(),
                size: *size,
                qdev: None,
            });
        }
        opts.qmp = qmp_sock.clone();
        opts.guard = None;
        opts.memory = false;
        opts.freeze = super::Freeze::Off;
        let inner = QmpCapture::start_on(rt, qmp, vm_disks, Some(pid), opts, parent)?;
        Ok(ImageCapture {
            inner: Some(inner),
            qmp_sock,
            daemon,
            _dir: dir,
        })
    }

    fn inner(&mut self) -> &mut QmpCapture {
        self.inner.as_mut().expect("capture open")
    }

    /// A clean quit writes persistent bitmaps back to the images.
    fn quit(&mut self) {
        let Ok(rt) = runtime() else { return };
        if let Ok(qmp) = rt.block_on(QmpClient::connect(&self.qmp_sock)) {
            let _ = rt.block_on(qmp.quit());
            rt.block_on(qmp.close());
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.daemon.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl VmSource for ImageCapture {
    fn disks(&self) -> Vec<SourceDisk> {
        self.inner.as_ref().map(|c| c.disks()).unwrap_or_default()
    }
    fn cut(&mut self) -> Result<(), SourceError> {
        Ok(self.inner().cut()?)
    }
    fn take_memory(&mut self) -> Option<Box<dyn std::io::Read + Send>> {
        None
    }
    fn memory_done(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    fn open_disk(
        &mut self,
        i: usize,
    ) -> Result<(Box<dyn vmkeep_io::DiskReader + Send>, vmkeep_io::ReadPlan), SourceError> {
        Ok(self.inner().open_disk(i)?)
    }
    fn release(&mut self) -> Result<(), SourceError> {
        Ok(self.inner().release()?)
    }
    fn pause_ms(&self) -> u64 {
        0
    }
    fn finish(mut self: Box<Self>, committed: bool) -> Result<(), SourceError> {
        if let Some(c) = self.inner.take() {
            c.finish(committed);
        }
        self.quit();
        Ok(())
    }
}

impl Drop for ImageCapture {
    fn drop(&mut self) {
        if let Some(c) = self.inner.take() {
            drop(c); // undoes the capture over its own connection
            self.quit();
        }
    }
}

/// The daemon's monitor once it accepts connections. The socket's path appears at `bind`,
/// a moment before `listen`: a connect in between is refused, so that is retried (seen in CI
/// under load; reproduced with `strace -e inject=listen:delay_enter=300000`).
fn connect_daemon(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    daemon: &mut Daemon,
) -> Result<QmpClient> {
    let start = Instant::now();
    loop {
        if path.exists() {
            match rt.block_on(QmpClient::connect(path)) {
                Ok(q) => return Ok(q),
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::ConnectionRefused
                        && start.elapsed() < Duration::from_secs(30) => {}
                Err(e) => return Err(e),
            }
        }
        if let Ok(Some(st)) = daemon.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = daemon.0.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            let hint = if err.contains("lock") {
                " (is the image in use by a running VM? back it up with `vmkeep backup vm`)"
            } else {
                ""
            };
            return Err(Error::Refused(format!(
                "qemu-storage-daemon exited ({st}): {}{hint}",
                err.trim()
            )));
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(Error::Refused(
                "qemu-storage-daemon did not start within 30 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
