//! `vmkeep recover --instant`: the restore point's disks served from the repository over NBD
//! (one socket per disk), a local qcow2 per disk backed by its export, QEMU started on those
//! at once, and the data copied into them in the background (vmkeep-qemu
//! `recover::instant`). The command stays until the copy is complete: QEMU reads through it.
//!
//! **A killed vmkeep is taken over.** The overlays name their export with a reconnect delay
//! ([`RECONNECT_SECS`]), so QEMU holds the guest's reads of data not yet copied while no
//! vmkeep serves them. `DIR/.instant/state.json` says which restore point is served on which
//! socket; running the same `recover --instant` again finds it, serves the same sockets,
//! takes the running QEMU over and goes on with the copy ([`InstantDisks::serve_again`]).
//! The folder is removed when the copy is complete.
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use vmkeep_core::SnapshotId;
use vmkeep_io::ServedDisk;
use vmkeep_qemu::nbd::{Listen, NbdServer, ServeOptions};
use vmkeep_qemu::recover::instant::{create_overlay, instant_backing, mark_zero_clusters};
use vmkeep_repo::mount::{MountOptions, MountStats, MountedDisk};
use vmkeep_repo::{Manifest, Repository};

/// How long QEMU holds the guest's reads while no vmkeep serves them (5 min to run the
/// command again); after that they fail until one does.
pub const RECONNECT_SECS: u64 = 300;
/// An unfinished instant recovery's state, in its target folder.
const STATE_DIR: &str = ".instant";
const STATE_FILE: &str = "state.json";
/// Unix socket paths are limited to 107 bytes.
const SOCKET_PATH_MAX: usize = 100;

/// What a later vmkeep needs to take an instant recovery over.
#[derive(Serialize, Deserialize)]
struct InstantState {
    snapshot: SnapshotId,
    /// Per disk of the restore point, in order: where its export is served.
    sockets: Vec<PathBuf>,
}

/// Every disk of a restore point served, with its local overlay.
pub struct InstantDisks {
    /// The qcow2 files QEMU runs on, one per disk.
    pub images: Vec<PathBuf>,
    disks: Vec<Arc<MountedDisk>>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<vmkeep_qemu::Result<()>>>,
    /// `DIR/.instant`, and the sockets' folder (the same, or one in TMPDIR for a long DIR).
    state_dir: PathBuf,
    socket_dir: PathBuf,
}

/// Whether `target` holds an instant recovery whose copy did not complete.
pub fn unfinished(target: &Path) -> bool {
    target.join(STATE_DIR).join(STATE_FILE).is_file()
}

impl InstantDisks {
    /// Serves every disk of `m` and creates `image_of(disk)` over each, in the new folder
    /// `target`. `wait_out_outages`: reads wait while the repository does not answer
    /// (MountOptions), so the VM's I/O pauses rather than fails.
    pub fn serve(
        repo: &Arc<Repository>,
        m: &Manifest,
        target: &Path,
        wait_out_outages: bool,
        image_of: impl Fn(&str) -> PathBuf,
    ) -> Result<InstantDisks> {
        vmkeep_repo::restore::create_target_dir(target)
            .with_context(|| format!("creating {}", target.display()))?;
        let state_dir = target.join(STATE_DIR);
        private_dir(&state_dir)?;
        let socket_dir = socket_dir(target, m.disks.len())?;
        let state = InstantState {
            snapshot: m.id,
            sockets: (0..m.disks.len())
                .map(|i| socket_dir.join(format!("{i}.sock")))
                .collect(),
        };
        let mut out =
            InstantDisks::start(repo, m, &state, wait_out_outages, state_dir, socket_dir)?;
        for ((d, socket), disk) in m.disks.iter().zip(&state.sockets).zip(&out.disks) {
            let image = image_of(&d.name);
            create_overlay(
                &image,
                &instant_backing(socket, &d.name, RECONNECT_SECS),
                d.size,
            )?;
            // Before QEMU opens it: the zero ranges are the restore point's, and local.
            mark_zero_clusters(&image, &zero_ranges(disk)?)?;
            out.images.push(image);
        }
        // Last: the state names a recovery whose overlays all exist.
        let path = out.state_dir.join(STATE_FILE);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&state)?)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(out)
    }

    /// Serves `m` again for the unfinished instant recovery in `target` (see the module
    /// docs): on the sockets its overlays name, after checking it is of this restore point.
    pub fn serve_again(
        repo: &Arc<Repository>,
        m: &Manifest,
        target: &Path,
        image_of: impl Fn(&str) -> PathBuf,
    ) -> Result<InstantDisks> {
        let state_dir = target.join(STATE_DIR);
        let path = state_dir.join(STATE_FILE);
        let state: InstantState = std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice(&b)?))
            .with_context(|| format!("reading {}", path.display()))?;
        if state.snapshot != m.id {
            bail!(
                "{} holds an unfinished instant recovery of restore point {:#}, not {:#}: \
                 run `recover {:#} --instant` with the same folder to finish it",
                target.display(),
                state.snapshot,
                m.id,
                state.snapshot
            );
        }
        if state.sockets.len() != m.disks.len() {
            bail!(
                "{} does not match the restore point's disks",
                path.display()
            );
        }
        for socket in &state.sockets {
            remove_stale_socket(socket)?;
        }
        let socket_dir = state.sockets[0]
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| state_dir.clone());
        private_dir(&socket_dir)?;
        let mut out = InstantDisks::start(repo, m, &state, true, state_dir, socket_dir)?;
        out.images = m.disks.iter().map(|d| image_of(&d.name)).collect();
        Ok(out)
    }

    /// Opens and serves each disk on its socket.
    fn start(
        repo: &Arc<Repository>,
        m: &Manifest,
        state: &InstantState,
        wait_out_outages: bool,
        state_dir: PathBuf,
        socket_dir: PathBuf,
    ) -> Result<InstantDisks> {
        let mut out = InstantDisks {
            images: Vec::new(),
            disks: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            socket_dir,
            state_dir,
        };
        for (d, socket) in m.disks.iter().zip(&state.sockets) {
            let opts = MountOptions {
                wait_out_outages,
                ..MountOptions::default()
            };
            let disk = MountedDisk::open(repo.clone(), m, Some(&d.name), &opts)?;
            let server = NbdServer::bind(
                &Listen::Unix(socket.clone()),
                disk.clone(),
                ServeOptions {
                    export_name: d.name.clone(),
                    ..ServeOptions::default()
                },
            )?;
            let stop = out.stop.clone();
            out.servers.push(
                std::thread::Builder::new()
                    .name("vmkeep-instant".into())
                    .spawn(move || server.run(&stop))
                    .context("starting an NBD server thread")?,
            );
            out.disks.push(disk);
        }
        Ok(out)
    }

    /// What the servers fetched, over every disk.
    pub fn stats(&self) -> MountStats {
        let mut all = MountStats::default();
        for d in &self.disks {
            all += d.stats();
        }
        all
    }

    /// The servers stop accepting; reads waiting for the repository fail.
    fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for d in &self.disks {
            d.give_up();
        }
    }

    /// Stops serving (once QEMU no longer reads through the exports).
    pub fn stop(mut self) -> Result<()> {
        self.halt();
        for t in self.servers.drain(..) {
            match t.join() {
                Ok(r) => r.context("serving NBD")?,
                Err(_) => anyhow::bail!("an NBD server thread panicked"),
            }
        }
        Ok(())
    }

    /// Stops serving and removes the state: the copy is complete.
    pub fn finished(self) -> Result<()> {
        let (state_dir, socket_dir) = (self.state_dir.clone(), self.socket_dir.clone());
        self.stop()?;
        for dir in [&socket_dir, &state_dir] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
            }
        }
        Ok(())
    }
}

impl Drop for InstantDisks {
    fn drop(&mut self) {
        self.halt();
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
    }
}

/// The ranges of `disk` that read as zeros (ZERO chunks: known from the index alone).
fn zero_ranges(disk: &MountedDisk) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < disk.size() {
        let extents = disk
            .extents(pos, disk.size() - pos)
            .context("reading the restore point's index")?;
        if extents.is_empty() {
            bail!("the restore point's index answered nothing at byte {pos}");
        }
        for e in extents {
            if e.zero {
                match out.last_mut() {
                    Some((o, l)) if *o + *l == pos => *l += e.len,
                    _ => out.push((pos, e.len)),
                }
            }
            pos += e.len;
        }
    }
    Ok(out)
}

/// `DIR/.instant` when its socket paths fit, else a folder in TMPDIR named after DIR (so
/// another vmkeep finds it through the state file).
fn socket_dir(target: &Path, disks: usize) -> Result<PathBuf> {
    let longest = format!("{}.sock", disks.saturating_sub(1));
    let local = target.join(STATE_DIR);
    if local.join(&longest).as_os_str().len() <= SOCKET_PATH_MAX {
        return Ok(local);
    }
    let hash = blake3::hash(target.as_os_str().as_encoded_bytes()).to_hex();
    let dir = std::env::temp_dir().join(format!("vmkeep-instant-{}", &hash[..16]));
    if dir.join(&longest).as_os_str().len() > SOCKET_PATH_MAX {
        bail!(
            "no short path for the NBD sockets: set TMPDIR to a short folder (now {})",
            std::env::temp_dir().display()
        );
    }
    private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` (mode 0700) if needed.
fn private_dir(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
    }
}

/// A socket left by a killed vmkeep is removed; one something listens on is refused.
fn remove_stale_socket(socket: &Path) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "{} is served by another process: is another `recover --instant` of this folder \
             running?",
            socket.display()
        );
    }
    match std::fs::remove_file(socket) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", socket.display())),
    }
}
