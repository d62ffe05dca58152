//! Whether a disk's change tracking can be trusted for this backup (pure: no I/O).
//!
//! A dirty bitmap is used only when it provably belongs to the latest restore point of this VM
//! in this repository: that restore point recorded a checkpoint for the disk, the bitmap of that
//! name exists on the disk's node, is consistent and recording, lives in the same image (and,
//! for non-persistent bitmaps, the same QEMU process), and the disk kept its size. Otherwise the
//! disk is read in full ("rescan", or "none" for the VM's first backup / `--full`) and a fresh
//! checkpoint starts. Tracking problems never fail a backup.

use vmkeep_core::manifest::{ChangeTracking, Manifest};
use vmkeep_core::BlobId;

use crate::qmp::DirtyBitmapInfo;

/// Prefix of every bitmap vmkeep creates.
pub const BITMAP_PREFIX: &str = "vmkeep-";

/// Whether the bitmap (or libvirt checkpoint) `name` is of the chain `chain`:
/// `vmkeep-<chain>-<token>`.
pub fn of_chain(name: &str, chain: &str) -> bool {
    name.strip_prefix(BITMAP_PREFIX)
        .and_then(|rest| rest.strip_prefix(chain))
        .is_some_and(|rest| rest.starts_with('-'))
}

/// What to do for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub cbt: ChangeTracking,
    pub reason: Option<String>,
    /// The frozen bitmap to export and read dirty chunks from (`cbt` is `Used`).
    pub export_bitmap: Option<String>,
    /// A valid previous checkpoint bitmap: disabled in the cut, removed after the commit,
    /// re-enabled (with the new writes merged in) if the backup fails.
    pub previous: Option<String>,
    /// Tree of the parent's disk supplying unread chunks (`cbt` is `Used`).
    pub base: Option<BlobId>,
    /// Bitmaps to remove before the cut: inconsistent `vmkeep-*` ones (unusable forever).
    pub remove_stale: Vec<String>,
    /// Recording bitmaps of dead captures to merge into `previous` (which they left disabled)
    /// before the cut, after which `previous` records again and covers every write since its
    /// restore point. When the merge fails the disk is rescanned instead.
    pub repair: Vec<String>,
}

/// The facts about one disk the decision needs.
#[derive(Debug, Clone)]
pub struct DiskFacts<'a> {
    pub name: &'a str,
    pub size: u64,
    /// Bitmaps currently on the disk's node.
    pub bitmaps: &'a [DirtyBitmapInfo],
    /// Canonical image path and the QEMU process, for [`source_identity`].
    pub file: &'a str,
    pub pid: Option<u32>,
    /// Why this disk's bitmaps cannot be persistent (None: they can), for reasons.
    pub not_persistent: Option<&'a str>,
    /// The bitmap name of this capture: `vmkeep-<chain>-<token>` (see executor::same_chain).
    pub new_bitmap: &'a str,
}

/// Identity of where a checkpoint bitmap lives: the qcow2 image for persistent bitmaps, the
/// QEMU process (and image) for non-persistent ones, which die with the process.
pub fn source_identity(persistent: bool, file: &str, qemu_pid: Option<u32>) -> String {
    if persistent {
        format!("qcow2:{file}")
    } else {
        match qemu_pid {
            Some(pid) => format!("qemu-pid:{pid}:{file}"),
            None => format!("qemu-pid:unknown:{file}"),
        }
    }
}

pub fn decide(disk: &DiskFacts<'_>, parent: Option<&Manifest>, full: bool) -> Decision {
    let ours = |b: &&DirtyBitmapInfo| super::executor::same_chain(disk.new_bitmap, &b.name);
    let remove_stale: Vec<String> = disk
        .bitmaps
        .iter()
        .filter(ours)
        .filter(|b| b.inconsistent)
        .map(|b| b.name.clone())
        .collect();
    let mut d = Decision {
        cbt: ChangeTracking::Rescan,
        reason: None,
        export_bitmap: None,
        previous: None,
        base: None,
        remove_stale,
        repair: Vec::new(),
    };
    let rescan = |mut d: Decision, why: &str| {
        d.cbt = ChangeTracking::Rescan;
        d.reason = Some(why.to_string());
        d
    };
    let Some(parent) = parent else {
        d.cbt = ChangeTracking::None;
        d.reason = Some("first backup".into());
        return d;
    };
    let Some(pd) = parent.disk(disk.name) else {
        return rescan(d, "new disk");
    };
    let Some(cp) = &pd.checkpoint else {
        return rescan(d, "no previous checkpoint");
    };
    let bm = disk.bitmaps.iter().find(|b| b.name == cp.bitmap);
    let Some(bm) = bm else {
        if cp.source.starts_with("qemu-pid:")
            && cp.source != source_identity(false, disk.file, disk.pid)
        {
            let why = format!(
                "QEMU restarted (the checkpoint bitmap could not be persistent: {})",
                disk.not_persistent.unwrap_or("non-persistent bitmap")
            );
            return rescan(d, &why);
        }
        let others = disk
            .bitmaps
            .iter()
            .filter(ours)
            .any(|b| !b.inconsistent && b.recording);
        return rescan(
            d,
            if others {
                "previous restore point forgotten (its checkpoint bitmap is gone)"
            } else {
                "bitmap missing (QEMU killed or image replaced?)"
            },
        );
    };
    if bm.inconsistent {
        return rescan(d, "bitmap inconsistent (QEMU was killed)");
    }
    if bm.busy {
        return rescan(d, "bitmap busy (in use by another job)");
    }
    // From here the old bitmap is healthy: retire it with this restore point.
    d.previous = Some(bm.name.clone());
    if !bm.recording {
        // A capture that died after its cut left it disabled, and its own bitmap recording
        // every write since: together they are exact again.
        d.repair = disk
            .bitmaps
            .iter()
            .filter(ours)
            .filter(|b| b.name != bm.name && b.recording && !b.inconsistent && !b.busy)
            .map(|b| b.name.clone())
            .collect();
        if d.repair.is_empty() {
            return rescan(
                d,
                "bitmap not recording (an earlier backup was interrupted)",
            );
        }
    }
    if cp.source != source_identity(bm.persistent, disk.file, disk.pid) {
        return rescan(d, "disk image changed");
    }
    if pd.size != disk.size {
        return rescan(d, "disk resized");
    }
    if full {
        d.cbt = ChangeTracking::None;
        d.reason = Some("full backup requested (--full)".into());
        return d;
    }
    d.cbt = ChangeTracking::Used;
    d.export_bitmap = Some(bm.name.clone());
    d.base = Some(pd.root);
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkeep_core::manifest::{Checkpoint, DiskEntry};

    fn bm(name: &str, recording: bool, inconsistent: bool) -> DirtyBitmapInfo {
        DirtyBitmapInfo {
            name: name.into(),
            recording,
            persistent: true,
            busy: false,
            granularity: 65536,
            count: 0,
            inconsistent,
        }
    }

    fn parent(size: u64, cp: Option<&str>, source: &str) -> Manifest {
        let mut m = Manifest {
            version: vmkeep_core::manifest::MANIFEST_VERSION,
            id: vmkeep_core::SnapshotId::random(),
            vm: "v".into(),
            time: serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).unwrap(),
            parent: None,
            hostname: "h".into(),
            tool_version: "0".into(),
            chunk_size: 65536,
            disks: Vec::new(),
            streams: Vec::new(),
            stats: Default::default(),
            pause_ms: 0,
        };
        m.disks.push(DiskEntry {
            name: "vd0".into(),
            size,
            root: BlobId([7; 32]),
            changes: None,
            data_bytes: 0,
            cbt: ChangeTracking::None,
            cbt_reason: None,
            checkpoint: cp.map(|b| Checkpoint {
                bitmap: b.into(),
                node: "disk0".into(),
                granularity: 65536,
                source: source.into(),
            }),
            source_identity: None,
        });
        m
    }

    fn facts<'a>(bitmaps: &'a [DirtyBitmapInfo], source: &'a str) -> DiskFacts<'a> {
        // "qcow2:/a.qcow2" or "qemu-pid:N:/a.raw"
        let (file, pid) = match source.strip_prefix("qemu-pid:") {
            Some(rest) => {
                let (pid, file) = rest.split_once(':').unwrap();
                (file, pid.parse().ok())
            }
            None => (source.strip_prefix("qcow2:").unwrap(), None),
        };
        DiskFacts {
            name: "vd0",
            size: 1 << 20,
            bitmaps,
            file,
            pid,
            not_persistent: None,
            new_bitmap: "vmkeep-c-new",
        }
    }

    #[test]
    fn chains_are_told_apart_by_name() {
        assert!(of_chain("vmkeep-c1-abc", "c1"));
        assert!(!of_chain("vmkeep-c10-abc", "c1"));
        assert!(!of_chain("vmkeep-c1", "c1"));
        assert!(!of_chain("virtnbdbackup.0", "c1"));
    }

    #[test]
    fn a_disabled_checkpoint_is_repaired_only_from_recording_orphans() {
        let src = "qcow2:/a.qcow2";
        let p = parent(1 << 20, Some("vmkeep-c-1"), src);
        // A dead capture disabled vmkeep-c-1 and left vmkeep-c-2 recording.
        let left = [
            bm("vmkeep-c-1", false, false),
            bm("vmkeep-c-2", true, false),
            bm("vmkeep-other-3", true, false),
        ];
        let d = decide(&facts(&left, src), Some(&p), false);
        assert_eq!(d.cbt, ChangeTracking::Used);
        assert_eq!(d.repair, vec!["vmkeep-c-2".to_string()]);
        assert_eq!(d.previous.as_deref(), Some("vmkeep-c-1"));
        // Disabled with nothing recording the writes since: never trusted.
        let alone = [
            bm("vmkeep-c-1", false, false),
            bm("vmkeep-other-3", true, false),
        ];
        let d = decide(&facts(&alone, src), Some(&p), false);
        assert_eq!(d.cbt, ChangeTracking::Rescan);
        assert!(d.repair.is_empty());
        assert!(d.reason.unwrap().contains("not recording"));
    }

    #[test]
    fn decisions() {
        let src = "qcow2:/a.qcow2";
        let good = [bm("vmkeep-1", true, false)];
        let p = parent(1 << 20, Some("vmkeep-1"), src);
        let d = decide(&facts(&good, src), Some(&p), false);
        assert_eq!(d.cbt, ChangeTracking::Used);
        assert_eq!(d.export_bitmap.as_deref(), Some("vmkeep-1"));
        assert_eq!(d.base, Some(BlobId([7; 32])));

        let d = decide(&facts(&good, src), Some(&p), true);
        assert_eq!(
            (d.cbt, d.previous.as_deref()),
            (ChangeTracking::None, Some("vmkeep-1"))
        );
        assert!(d.export_bitmap.is_none());

        let d = decide(&facts(&good, src), None, false);
        assert_eq!(d.cbt, ChangeTracking::None);

        let bad = [bm("vmkeep-1", false, true), bm("other", true, true)];
        let d = decide(&facts(&bad, src), Some(&p), false);
        assert_eq!(d.cbt, ChangeTracking::Rescan);
        assert!(d.reason.unwrap().contains("inconsistent"));
        assert_eq!(d.remove_stale, vec!["vmkeep-1".to_string()]);
        assert!(d.previous.is_none());

        let d = decide(&facts(&[], src), Some(&p), false);
        assert!(d.reason.unwrap().contains("missing"));
        let newer = [bm("vmkeep-2", true, false)];
        let d = decide(&facts(&newer, src), Some(&p), false);
        assert!(d.reason.unwrap().contains("forgotten"));

        let raw = parent(1 << 20, Some("vmkeep-1"), "qemu-pid:1:/a.raw");
        let d = decide(&facts(&[], "qemu-pid:2:/a.raw"), Some(&raw), false);
        assert!(d.reason.unwrap().contains("QEMU restarted"));

        let p2 = parent(2 << 20, Some("vmkeep-1"), src);
        let d = decide(&facts(&good, src), Some(&p2), false);
        assert_eq!(d.reason.as_deref(), Some("disk resized"));
        assert_eq!(d.previous.as_deref(), Some("vmkeep-1"));

        let p3 = parent(1 << 20, None, src);
        let d = decide(&facts(&good, src), Some(&p3), false);
        assert_eq!(d.reason.as_deref(), Some("no previous checkpoint"));

        let mut other = facts(&good, src);
        other.name = "vd1";
        assert_eq!(
            decide(&other, Some(&p), false).reason.as_deref(),
            Some("new disk")
        );
    }
}
