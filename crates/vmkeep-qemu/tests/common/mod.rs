//! What the vmkeep-qemu integration tests use from the shared test kit (crates/vmkeep-testkit:
//! required programs, children that die with the test, the one-QEMU-at-a-time lock, test VMs,
//! qemu-img / qemu-io / nbdinfo), plus these tests' repositories and NBD extent arithmetic.
#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::sync::Arc;

use vmkeep_core::manifest::Manifest;
use vmkeep_repo::{InitOptions, NoProgress, Repository, RestoreOptions};
use vmkeep_store::LocalStore;

pub use vmkeep_testkit::process::{require, run, wait_for_socket, ChildGuard};
pub use vmkeep_testkit::tools::{make_qcow2, nbdinfo_flag, nbdinfo_map, qemu_io, raw_content};
pub use vmkeep_testkit::vm::{qemu_lock, QemuLock, Vm, VmBuilder};

/// Turns extents into `(offset, length, flags)` starting at `start`.
pub fn with_offsets(start: u64, ext: &[vmkeep_qemu::nbd::Extent]) -> Vec<(u64, u64, u32)> {
    let mut o = start;
    ext.iter()
        .map(|e| {
            let r = (o, e.length, e.flags);
            o += e.length;
            r
        })
        .collect()
}

/// A new unencrypted repository at `path` with 64 KiB chunks.
pub fn plain_repo(path: &Path) -> Repository {
    let store = Arc::new(LocalStore::create(path).unwrap());
    Repository::init(
        store,
        InitOptions {
            chunk_size: 65536,
            passphrase: None,
            kdf: Default::default(),
        },
    )
    .unwrap()
}

/// Restores every disk of `m` into `dir`; returns each disk's name and bytes.
pub fn restore_disks(repo: &Repository, m: &Manifest, dir: &Path) -> Vec<(String, Vec<u8>)> {
    let stats = repo
        .restore(
            m,
            &RestoreOptions {
                target: dir.to_path_buf(),
                disk: None,
            },
            &NoProgress,
        )
        .unwrap();
    stats
        .disks
        .iter()
        .map(|d| (d.name.clone(), std::fs::read(&d.path).unwrap()))
        .collect()
}

/// What the tests back up a running VM with (the capture options plus the VM's name).
#[derive(Clone, Debug, Default)]
pub struct VmBackupOptions {
    pub qmp: std::path::PathBuf,
    pub vm: String,
    pub full: bool,
    pub suspend: bool,
    pub memory: bool,
    pub freeze: vmkeep_qemu::capture::Freeze,
}

pub type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A capture wired to a backup session, as the binary does (commands/backup.rs), without the
/// binary's retry.
pub fn capture_into(
    repo: &vmkeep_repo::Repository,
    vm: &str,
    start: impl FnOnce(
        Option<&vmkeep_core::manifest::Manifest>,
    ) -> AnyResult<Box<dyn vmkeep_io::VmSource>>,
    progress: &dyn vmkeep_repo::Progress,
) -> AnyResult<vmkeep_core::manifest::Manifest> {
    let mut session = repo.begin_backup(vmkeep_repo::BackupOptions {
        vm: vm.to_string(),
        ..Default::default()
    })?;
    let mut capture = start(session.parent())?;
    session.add_source(&mut *capture, progress)?;
    let committed = session.commit();
    capture.finish(committed.is_ok())?;
    Ok(committed?)
}

fn capture_options(
    repo: &vmkeep_repo::Repository,
    full: bool,
) -> vmkeep_qemu::capture::CaptureOptions {
    vmkeep_qemu::capture::CaptureOptions {
        full,
        chain: repo.config().id.chars().take(8).collect(),
        chunk_size: repo.config().chunk_size as u64,
        ..Default::default()
    }
}

/// Backs up the running VM behind `opts.qmp` (no guard).
pub fn backup_vm(
    repo: &vmkeep_repo::Repository,
    opts: &VmBackupOptions,
    progress: &dyn vmkeep_repo::Progress,
) -> AnyResult<vmkeep_core::manifest::Manifest> {
    let o = vmkeep_qemu::capture::CaptureOptions {
        qmp: opts.qmp.clone(),
        suspend: opts.suspend,
        memory: opts.memory,
        freeze: opts.freeze,
        ..capture_options(repo, opts.full)
    };
    capture_into(
        repo,
        &opts.vm,
        |parent| {
            Ok(Box::new(vmkeep_qemu::capture::QmpCapture::start(
                o, parent,
            )?))
        },
        progress,
    )
}

/// Backs up image files through qemu-storage-daemon.
pub fn backup_images(
    repo: &vmkeep_repo::Repository,
    backup: vmkeep_repo::BackupOptions,
    images: &[(String, std::path::PathBuf)],
    full: bool,
    progress: &dyn vmkeep_repo::Progress,
) -> AnyResult<vmkeep_core::manifest::Manifest> {
    let o = capture_options(repo, full);
    capture_into(
        repo,
        &backup.vm,
        |parent| {
            Ok(Box::new(vmkeep_qemu::capture::ImageCapture::start(
                images, o, parent,
            )?))
        },
        progress,
    )
}
