//! Whether a libvirt checkpoint can be trusted for this backup (pure: no I/O).
//!
//! The same rules as [`crate::capture::cbt`] for QMP captures, in libvirt's terms. Each
//! repository has its own chain of checkpoints, named `vmkeep-<chain>-<token>`. A disk is read
//! incrementally only since the checkpoint the latest restore point of this VM in this
//! repository recorded for it, and only when that checkpoint still exists with a bitmap for the
//! disk, the disk is the same image of the same domain, and it kept its size.
//!
//! libvirt's checkpoints of all chains form one line. An incremental backup since checkpoint C
//! gets the union of C's bitmap and every later checkpoint's, whichever chain made them. So
//! chains of several repositories (or of other tools that leave earlier checkpoints alone)
//! interleave without a gap. Deleting a checkpoint merges its bitmap into its parent's, which
//! keeps every other chain exact.

use std::collections::HashMap;

use vmkeep_core::manifest::{ChangeTracking, Manifest};
use vmkeep_core::BlobId;

use super::xml::CheckpointInfo;
pub use crate::capture::cbt::of_chain;

/// Prefix of every checkpoint vmkeep creates (the same as its QMP bitmaps).
pub const CHECKPOINT_PREFIX: &str = crate::capture::cbt::BITMAP_PREFIX;

/// What a disk's checkpoint is recorded as: `libvirt:<domain uuid>:<image>`.
pub fn source_identity(domain_uuid: &str, source: &str) -> String {
    format!("libvirt:{domain_uuid}:{source}")
}

/// The facts about one disk.
#[derive(Clone, Debug)]
pub struct DiskFacts<'a> {
    pub name: &'a str,
    pub size: u64,
    /// [`source_identity`] of the disk now.
    pub identity: &'a str,
    /// Whether libvirt can keep a checkpoint bitmap for it (qcow2 images only).
    pub bitmaps: bool,
}

/// What to do for one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub cbt: ChangeTracking,
    pub reason: Option<String>,
    /// The checkpoint to back up incrementally from (`cbt` is `Used`).
    pub since: Option<String>,
    /// Tree of the parent's disk supplying unread chunks (`cbt` is `Used`).
    pub base: Option<BlobId>,
}

impl Decision {
    fn read_all(cbt: ChangeTracking, reason: impl Into<String>) -> Decision {
        Decision {
            cbt,
            reason: Some(reason.into()),
            since: None,
            base: None,
        }
    }

    /// The checkpoint's bitmap turned out broken when the backup began.
    pub fn broken(checkpoint: &str) -> Decision {
        Decision::read_all(
            ChangeTracking::Rescan,
            format!(
                "the bitmap of libvirt checkpoint {checkpoint} is missing or broken (QEMU stopped without saving it)"
            ),
        )
    }
}

pub fn decide(
    disk: &DiskFacts<'_>,
    parent: Option<&Manifest>,
    full: bool,
    checkpoints: &HashMap<String, CheckpointInfo>,
) -> Decision {
    let rescan = |why: String| Decision::read_all(ChangeTracking::Rescan, why);
    let Some(parent) = parent else {
        return Decision::read_all(ChangeTracking::None, "first backup");
    };
    let Some(pd) = parent.disk(disk.name) else {
        return rescan("new disk".into());
    };
    let Some(cp) = &pd.checkpoint else {
        return rescan("no previous checkpoint".into());
    };
    if !cp.source.starts_with("libvirt:") {
        return rescan("the previous restore point was not taken through libvirt".into());
    }
    let Some(info) = checkpoints.get(&cp.bitmap) else {
        return rescan(format!(
            "libvirt checkpoint {} is gone (deleted, or the domain was redefined or was transient and stopped)",
            cp.bitmap
        ));
    };
    if !info.bitmap_disks.iter().any(|d| d == disk.name) {
        return rescan(format!(
            "libvirt checkpoint {} has no bitmap for this disk",
            cp.bitmap
        ));
    }
    if cp.source != disk.identity {
        return rescan(format!(
            "disk image changed (was {}, now {})",
            cp.source, disk.identity
        ));
    }
    if pd.size != disk.size {
        return rescan(format!("disk resized ({} to {} bytes)", pd.size, disk.size));
    }
    if full {
        return Decision::read_all(ChangeTracking::None, "full backup requested (--full)");
    }
    if !disk.bitmaps {
        return rescan("libvirt keeps checkpoints only in qcow2 images".into());
    }
    Decision {
        cbt: ChangeTracking::Used,
        reason: None,
        since: Some(cp.bitmap.clone()),
        base: Some(pd.root),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkeep_core::manifest::{Checkpoint, DiskEntry};

    fn parent(size: u64, checkpoint: Option<(&str, &str)>) -> Manifest {
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
            name: "vda".into(),
            size,
            root: BlobId([7; 32]),
            cbt: ChangeTracking::None,
            cbt_reason: None,
            changes: None,
            data_bytes: 0,
            checkpoint: checkpoint.map(|(name, source)| Checkpoint {
                bitmap: name.into(),
                node: "vda".into(),
                granularity: 0,
                source: source.into(),
            }),
            source_identity: None,
        });
        m
    }

    fn cps(names: &[(&str, &[&str])]) -> HashMap<String, CheckpointInfo> {
        names
            .iter()
            .map(|(n, disks)| {
                (
                    n.to_string(),
                    CheckpointInfo {
                        name: n.to_string(),
                        parent: None,
                        bitmap_disks: disks.iter().map(|d| d.to_string()).collect(),
                    },
                )
            })
            .collect()
    }

    const ID: &str = "libvirt:u1:/img/a.qcow2";

    fn facts(size: u64) -> DiskFacts<'static> {
        DiskFacts {
            name: "vda",
            size,
            identity: ID,
            bitmaps: true,
        }
    }

    #[test]
    fn a_live_checkpoint_of_the_same_disk_is_used() {
        let p = parent(100, Some(("vmkeep-c1-a", ID)));
        let d = decide(
            &facts(100),
            Some(&p),
            false,
            &cps(&[("vmkeep-c1-a", &["vda"])]),
        );
        assert_eq!(d.cbt, ChangeTracking::Used);
        assert_eq!(d.since.as_deref(), Some("vmkeep-c1-a"));
        assert_eq!(d.base, Some(p.disks[0].root));
    }

    #[test]
    fn every_doubt_reads_the_whole_disk_with_a_reason() {
        let live = cps(&[("vmkeep-c1-a", &["vda"])]);
        let p = parent(100, Some(("vmkeep-c1-a", ID)));
        let cases: Vec<(Decision, ChangeTracking, &str)> = vec![
            (
                decide(&facts(100), None, false, &live),
                ChangeTracking::None,
                "first backup",
            ),
            (
                decide(&facts(100), Some(&p), true, &live),
                ChangeTracking::None,
                "--full",
            ),
            (
                decide(&facts(200), Some(&p), false, &live),
                ChangeTracking::Rescan,
                "resized",
            ),
            (
                decide(&facts(100), Some(&p), false, &cps(&[])),
                ChangeTracking::Rescan,
                "is gone",
            ),
            (
                decide(
                    &facts(100),
                    Some(&p),
                    false,
                    &cps(&[("vmkeep-c1-a", &["vdb"])]),
                ),
                ChangeTracking::Rescan,
                "no bitmap for this disk",
            ),
            (
                decide(&facts(100), Some(&parent(100, None)), false, &live),
                ChangeTracking::Rescan,
                "no previous checkpoint",
            ),
            (
                decide(
                    &facts(100),
                    Some(&parent(100, Some(("vmkeep-c1-a", "qcow2:/img/a.qcow2")))),
                    false,
                    &live,
                ),
                ChangeTracking::Rescan,
                "not taken through libvirt",
            ),
            (
                decide(
                    &facts(100),
                    Some(&parent(
                        100,
                        Some(("vmkeep-c1-a", "libvirt:u2:/img/a.qcow2")),
                    )),
                    false,
                    &live,
                ),
                ChangeTracking::Rescan,
                "disk image changed",
            ),
        ];
        for (d, cbt, why) in cases {
            assert_eq!(d.cbt, cbt, "{why}");
            assert!(
                d.reason.as_deref().unwrap().contains(why),
                "{why}: {:?}",
                d.reason
            );
            assert_eq!(d.since, None);
        }
        let mut other = p.clone();
        other.disks[0].name = "vdb".into();
        let d = decide(&facts(100), Some(&other), false, &live);
        assert_eq!(d.reason.as_deref(), Some("new disk"));
        let raw = DiskFacts {
            bitmaps: false,
            ..facts(100)
        };
        let d = decide(&raw, Some(&p), false, &live);
        assert!(d.reason.unwrap().contains("only in qcow2"));
    }
}
