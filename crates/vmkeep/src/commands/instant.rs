//! `vmkeep recover --instant`: the restore point's disks served from the repository over NBD
//! (one private socket per disk), a local qcow2 per disk backed by its export, QEMU started on
//! those at once, and the data copied into them in the background (vmkeep-qemu
//! `recover::instant`). The command stays until the copy is complete: QEMU reads through it.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use vmkeep_qemu::nbd::{Listen, NbdServer, ServeOptions};
use vmkeep_qemu::recover::instant::create_overlay;
use vmkeep_repo::mount::{MountOptions, MountStats, MountedDisk};
use vmkeep_repo::{Manifest, Repository};

/// Every disk of a restore point served, with its local overlay created.
pub struct InstantDisks {
    /// The qcow2 files QEMU runs on, one per disk.
    pub images: Vec<PathBuf>,
    disks: Vec<Arc<MountedDisk>>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<vmkeep_qemu::Result<()>>>,
    /// Holds the sockets (a short path: Unix socket paths are limited to 107 bytes).
    _sockets: tempfile::TempDir,
}

impl InstantDisks {
    /// Serves every disk of `m` and creates `image_of(disk)` over each. `wait_out_outages`:
    /// reads wait while the repository does not answer (MountOptions), so the VM's I/O
    /// pauses rather than fails.
    pub fn serve(
        repo: &Arc<Repository>,
        m: &Manifest,
        target: &Path,
        wait_out_outages: bool,
        image_of: impl Fn(&str) -> PathBuf,
    ) -> Result<InstantDisks> {
        vmkeep_repo::restore::create_target_dir(target)
            .with_context(|| format!("creating {}", target.display()))?;
        let sockets = tempfile::Builder::new()
            .prefix("vmkeep-instant-")
            .tempdir()
            .context("creating a private folder for the NBD sockets")?;
        let mut out = InstantDisks {
            images: Vec::new(),
            disks: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            _sockets: sockets,
        };
        for (i, d) in m.disks.iter().enumerate() {
            let opts = MountOptions {
                wait_out_outages,
                ..MountOptions::default()
            };
            let disk = MountedDisk::open(repo.clone(), m, Some(&d.name), &opts)?;
            let server = NbdServer::bind(
                &Listen::Unix(out._sockets.path().join(format!("{i}.sock"))),
                disk.clone(),
                ServeOptions {
                    export_name: d.name.clone(),
                    ..ServeOptions::default()
                },
            )?;
            let image = image_of(&d.name);
            create_overlay(&image, &server.uri(), d.size)?;
            let stop = out.stop.clone();
            out.servers.push(
                std::thread::Builder::new()
                    .name("vmkeep-instant".into())
                    .spawn(move || server.run(&stop))
                    .context("starting an NBD server thread")?,
            );
            out.images.push(image);
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
}

impl Drop for InstantDisks {
    fn drop(&mut self) {
        self.halt();
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
    }
}
