//! `vmkeep restore SNAP --disk NAME --onto IMAGE`: an existing image made byte-identical to a
//! restore point's disk, writing only the chunks that differ (vmkeep_repo::restore::onto).
//!
//! Beside every regular-file image it finishes, vmkeep writes `IMAGE.vmkeep`: the repository,
//! restore point and disk the image holds, and the image file's identity
//! (`dev:inode:size:mtime_ns:ctime_ns`) taken once the clock has moved past its last change, so
//! that any later write, by anyone, changes the identity (ctime cannot be set by user tools).
//! "Moved past": 20 ms (timestamps are as coarse as a timer tick, at most 10 ms) where the file
//! system keeps sub-second timestamps, a full second where it does not (its ctime has no
//! nanoseconds). When the record still matches, the
//! next `--onto` writes `diff(recorded, SNAP)` without reading the image; otherwise it reads
//! and compares every chunk. The record is removed before the image is touched, so an
//! interrupted run leaves none (the next run compares) and a stale one never matches. Block
//! devices get no record (their writes do not move ctime), nor qcow2 images with a backing
//! file (the backing file could change under them).
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use vmkeep_qemu::qcow2_target::Qcow2Target;
use vmkeep_repo::backup::file_identity;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::restore::onto::{ImageAccess, OntoStats};
use vmkeep_repo::restore::RawFileImage;
use vmkeep_repo::{Manifest, Progress, Repository};

use crate::args::Global;
use crate::output::{print_json, print_line};
use crate::size::human;

/// What `IMAGE.vmkeep` says.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    pub vmkeep_image: u32,
    pub repo: String,
    pub snapshot: String,
    pub disk: String,
    pub identity: String,
}

pub fn record_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".vmkeep");
    PathBuf::from(p)
}

fn is_qcow2(image: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(image).with_context(|| format!("open {}", image.display()))?;
    Ok(f.read(&mut magic)? == 4 && magic == *b"QFI\xfb")
}

/// The restore point the record proves the image holds, or why not.
fn known_point(
    repo: &Repository,
    image: &Path,
    disk: &str,
) -> std::result::Result<Manifest, String> {
    let text =
        std::fs::read(record_path(image)).map_err(|_| "no record of what it holds".to_string())?;
    let rec: ImageRecord = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "its record {} is unreadable ({e})",
            record_path(image).display()
        )
    })?;
    if rec.repo != repo.config().id {
        return Err("its record is of another repository".into());
    }
    if rec.disk != disk {
        return Err(format!("it holds disk {}, not {disk}", rec.disk));
    }
    let meta = std::fs::metadata(image).map_err(|e| e.to_string())?;
    if file_identity(&meta) != rec.identity {
        return Err("it was written since vmkeep recorded what it holds".into());
    }
    repo.resolve(&rec.snapshot)
        .map_err(|_| format!("the restore point it holds ({}) is gone", rec.snapshot))
}

/// Writes the record once the clock has moved past the image's last change (module docs).
pub fn write_record(repo: &Repository, m: &Manifest, disk: &str, image: &Path) -> Result<()> {
    let meta = std::fs::metadata(image)?;
    if !meta.is_file() {
        return Ok(());
    }
    let settle = if meta.ctime_nsec() == 0 {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(20)
    };
    let ctime = std::time::UNIX_EPOCH
        + Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec().max(0) as u32);
    match SystemTime::now().duration_since(ctime) {
        Ok(age) if age >= settle => {}
        Ok(age) => std::thread::sleep(settle - age),
        Err(_) => std::thread::sleep(Duration::from_secs(1)), // ctime ahead: clock skew
    }
    let meta = std::fs::metadata(image)?;
    let rec = ImageRecord {
        vmkeep_image: 1,
        repo: repo.config().id.clone(),
        snapshot: m.id.to_string(),
        disk: disk.to_string(),
        identity: file_identity(&meta),
    };
    let path = record_path(image);
    let partial = vmkeep_qemu::qcow2_target::partial_path(&path);
    std::fs::write(&partial, serde_json::to_vec(&rec)?)
        .and_then(|_| std::fs::File::open(&partial)?.sync_all())
        .and_then(|_| vmkeep_repo::restore::publish(&partial, &path))
        .with_context(|| format!("write {}", path.display()))
}

/// A write lock on the whole image (an open file description lock, as QEMU's image locking
/// uses): refused while a QEMU, qemu-nbd or qemu-img has the image open, and while held, they
/// cannot open it. Returned to be held.
fn lock_image(image: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("open {}", image.display()))?;
    // SAFETY: flock is plain data; all-zero is a valid value, completed below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on a descriptor we own, with a valid flock structure.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
            bail!(
                "{} is in use (QEMU, qemu-nbd or another program has it open and locked): stop \
                 the VM using it before rewriting its disk",
                image.display()
            );
        }
        return Err(e).with_context(|| format!("lock {}", image.display()));
    }
    Ok(f)
}

fn remove_record(image: &Path) -> Result<()> {
    let path = record_path(image);
    vmkeep_io::unpublish(&path).with_context(|| format!("remove {}", path.display()))
}

pub fn run(
    g: &Global,
    repo: &Repository,
    m: &Manifest,
    disk: Option<&str>,
    image: &Path,
    progress: &dyn Progress,
) -> Result<u8> {
    let d = match disk {
        Some(n) => m.disk(n).with_context(|| {
            format!(
                "restore point {:#} has no disk {n} (disks: {})",
                m.id,
                m.disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        None if m.disks.len() == 1 => &m.disks[0],
        None => bail!(
            "restore point {:#} has several disks ({}): say which with --disk",
            m.id,
            m.disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if !image.exists() {
        bail!(
            "{} does not exist: --onto writes into an existing image (restore --target DIR \
             writes new ones)",
            image.display()
        );
    }
    let qcow2 = is_qcow2(image)?;
    // Never under a running VM: rewinding a disk the guest is using would corrupt it.
    let guard = lock_image(image)?;
    let known = known_point(repo, image, &d.name);
    // From here the image changes: the record goes first (see the module docs).
    remove_record(image)?;
    let index = BlobIndex::load(repo)?;
    let (stats, backing) = if qcow2 {
        // qemu-nbd takes QEMU's own image locks for the rest of the work (ours would stop it).
        drop(guard);
        let t = Qcow2Target::open_existing(image, d.size)?;
        let backing = t.backing().map(str::to_owned);
        let base = known.as_ref().ok().filter(|_| backing.is_none());
        let st = repo.restore_onto(&index, m, d, &t as &dyn ImageAccess, base, progress)?;
        t.close()?;
        (st, backing)
    } else {
        let t = RawFileImage::open(image, d.size)?;
        let st = repo.restore_onto(&index, m, d, &t, known.as_ref().ok(), progress)?;
        drop(guard); // held until the image is complete: a QEMU cannot open it meanwhile
        (st, None)
    };
    if backing.is_none() {
        write_record(repo, m, &d.name, image)?;
    }
    let from = known.as_ref().ok().filter(|_| backing.is_none());
    let why = match (&known, &backing) {
        (_, Some(b)) => Some(format!("it has a backing file ({b})")),
        (Err(e), None) => Some(e.clone()),
        (Ok(_), None) => None,
    };
    report(g, m, &d.name, image, from, why.as_deref(), &stats)
}

fn report(
    g: &Global,
    m: &Manifest,
    disk: &str,
    image: &Path,
    from: Option<&Manifest>,
    compared_because: Option<&str>,
    st: &OntoStats,
) -> Result<u8> {
    if g.json {
        print_json(&json!({
            "id": m.id,
            "disk": disk,
            "image": image,
            "from": from.map(|f| f.id),
            "compared_because": compared_because,
            "bytes_read": st.bytes_read,
            "bytes_written": st.bytes_written,
            "chunks_written": st.chunks_written,
            "seconds": st.seconds,
        }))?;
    } else {
        let how = match (from, compared_because) {
            (Some(f), _) => format!(
                "it held restore point {:#}, so only their difference was written",
                f.id
            ),
            (None, Some(why)) => format!("every chunk compared: {why}"),
            (None, None) => "every chunk compared".into(),
        };
        print_line(&format!(
            "{} now holds disk {disk} of restore point {:#}: {} read, {} written ({how})",
            image.display(),
            m.id,
            human(st.bytes_read),
            human(st.bytes_written),
        ))?;
    }
    Ok(0)
}
