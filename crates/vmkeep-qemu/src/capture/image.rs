//! Images of a stopped VM (qcow2 and other formats) through a `qemu-storage-daemon` we start:
//! each image opened read-write (bitmaps rotate, so qcow2 images keep incremental backups
//! across restore points and across live/offline backups: both name the bitmap's home
//! `qcow2:<canonical path>`), then the same cut/read/commit sequence as a live VM. The daemon
//! quits cleanly at the end so persistent bitmaps are written back to the images.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmkeep_core::manifest::Manifest;
use vmkeep_repo::{BackupOptions, Progress, Repository};

use super::{capture, disks, runtime, CaptureError, CutOptions, Result, VmDisk};
use crate::qmp::QmpClient;

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
        .map_err(|e| crate::Error::io("run qemu-img info", e))?;
    if !out.status.success() {
        return Err(CaptureError::Refused(format!(
            "qemu-img info {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CaptureError::Refused(format!("qemu-img info output: {e}")))?;
    let format = v["format"].as_str().unwrap_or("raw").to_string();
    let size = v["virtual-size"].as_u64().unwrap_or(0);
    Ok((format, size))
}

/// Back up image files of a stopped VM as one restore point (see the module docs).
pub fn backup_images(
    repo: &Repository,
    backup: BackupOptions,
    images: &[(String, PathBuf)],
    full: bool,
    progress: &dyn Progress,
) -> Result<Manifest> {
    if images.is_empty() {
        return Err(CaptureError::Refused("no --disk given".into()));
    }
    let mut infos = Vec::new();
    for (name, path) in images {
        vmkeep_core::manifest::validate_name("disk name", name)
            .map_err(|e| CaptureError::Refused(e.to_string()))?;
        let (format, size) = image_info(path)?;
        let canon = std::fs::canonicalize(path)
            .map_err(|e| crate::Error::io(format!("resolve {}", path.display()), e))?;
        infos.push((name.clone(), canon, format, size));
    }
    let dir = tempfile::Builder::new()
        .prefix("vmkeep-qsd-")
        .tempdir()
        .map_err(|e| crate::Error::io("create a scratch directory", e))?;
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
        .map_err(|e| crate::Error::io("start qemu-storage-daemon", e))?;
    let mut daemon = Daemon(child);
    let pid = daemon.0.id();
    wait_for_socket(&qmp_sock, &mut daemon)?;

    let rt = runtime()?;
    let qmp = rt.block_on(QmpClient::connect(&qmp_sock))?;
    let r = (|| {
        let mut disks_v = Vec::new();
        for (i, (name, path, format, size)) in infos.iter().enumerate() {
            let node = format!("vmkeep-d{i}");
            let bitmaps = rt.block_on(disks::node_bitmaps(&qmp, &node))?;
            disks_v.push(VmDisk {
                name: name.clone(),
                node,
                format: format.clone(),
                file: path.display().to_string(),
                size: *size,
                bitmaps,
            });
        }
        let session = repo.begin_backup(backup.clone())?;
        let opts = CutOptions {
            full,
            suspend: false,
            qmp_path: qmp_sock.clone(),
            guard: None,
            freeze: super::Freeze::Off,
        };
        capture(&rt, &qmp, disks_v, Some(pid), session, &opts, progress)
    })();
    // A clean quit writes persistent bitmaps back to the images.
    let _ = rt.block_on(qmp.quit());
    rt.block_on(qmp.close());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = daemon.0.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    r
}

fn wait_for_socket(path: &Path, daemon: &mut Daemon) -> Result<()> {
    let start = Instant::now();
    loop {
        if path.exists() {
            return Ok(());
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
            return Err(CaptureError::Refused(format!(
                "qemu-storage-daemon exited ({st}): {}{hint}",
                err.trim()
            )));
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(CaptureError::Refused(
                "qemu-storage-daemon did not start within 30 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
