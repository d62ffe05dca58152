//! `vmkeep diff`: what differs between any two restore points, exactly, at the cost of the
//! change (FORMAT.md §10, "Differentials").
//!
//! Choice: the two disk index trees are compared directly ([`tree::differing_chunks`]),
//! descending only where node ids differ. It needs neither the change maps of the points in
//! between nor any of those points (forgotten ones, rescans, races with a forget change
//! nothing), it is exact by construction (equal ids are equal content, so a chunk changed and
//! changed back is not reported), and it costs the nodes on the paths to the differing chunks,
//! which is what confirming change-map candidates against both trees would cost anyway.
//!
//! Sizes: the extents are what differs once an image of `from` has `to`'s size (truncated, or
//! grown with zeros); `zero_extents` is the part of them that reads as zeros in `to`.
//! Memory and other streams: whether they differ (by the ids of their whole content), and how
//! many bytes: for a memory stream the guest-RAM bytes in page-image chunks that differ
//! (compared like disks, so at the images' chunk granularity, 16 KiB by default, and counting
//! RAM, which can exceed the stream's own size: the stream leaves out zero pages), plus its
//! literal part (device state, headers) whole when that differs; a plain stream counts whole
//! when it differs.

use vmkeep_core::manifest::{Manifest, PageImages, StreamRecord};
use vmkeep_core::tree::{self, TreeRef};
use vmkeep_core::{BlobId, SnapshotId};

use crate::error::{Error, Result};
use crate::index::BlobIndex;
use crate::nodes::RepoNodes;
use crate::Repository;

/// The difference between two restore points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    pub from: SnapshotId,
    pub to: SnapshotId,
    pub disks: Vec<DiskDiff>,
    pub streams: Vec<StreamDiff>,
}

/// One disk's difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskDiff {
    pub name: String,
    /// Size in `from` (None: the disk is new in `to`).
    pub size_from: Option<u64>,
    /// Size in `to` (None: the disk is gone in `to`; no extents then).
    pub size_to: Option<u64>,
    /// Byte extents `(offset, length)` whose content differs, ascending, chunk-aligned (the
    /// last may end at the disk's end), adjacent chunks merged.
    pub extents: Vec<(u64, u64)>,
    /// The part of `extents` that reads as zeros in `to`.
    pub zero_extents: Vec<(u64, u64)>,
    /// Sum of the extents' lengths.
    pub changed_bytes: u64,
}

/// One stream's difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamDiff {
    pub name: String,
    pub size_from: Option<u64>,
    pub size_to: Option<u64>,
    pub differs: bool,
    /// Bytes that differ: for a memory stream guest-RAM bytes at chunk granularity (see the
    /// module docs).
    pub changed_bytes: u64,
}

impl Repository {
    /// The difference between restore points `from` and `to` (any two, of one VM or not),
    /// for every disk or only `disk`.
    pub fn diff(&self, from: &Manifest, to: &Manifest, disk: Option<&str>) -> Result<Diff> {
        if from.chunk_size != to.chunk_size {
            return Err(Error::Invalid {
                what: "diff",
                reason: format!(
                    "the restore points have different chunk sizes ({} and {})",
                    from.chunk_size, to.chunk_size
                ),
            });
        }
        if let Some(name) = disk {
            if from.disk(name).is_none() && to.disk(name).is_none() {
                return Err(Error::Invalid {
                    what: "disk",
                    reason: format!(
                        "neither restore point has a disk {name:?} (disks: {})",
                        disk_names(from, to)
                    ),
                });
            }
        }
        let index = BlobIndex::load(self)?;
        let nodes = RepoNodes::new(self, &index);
        let mut names: Vec<&str> = to.disks.iter().map(|d| d.name.as_str()).collect();
        for d in &from.disks {
            if !names.contains(&d.name.as_str()) {
                names.push(&d.name);
            }
        }
        let mut disks = Vec::new();
        for name in names.into_iter().filter(|n| disk.is_none_or(|d| d == *n)) {
            let (a, b) = (from.disk(name), to.disk(name));
            let tree_of = |m: &Manifest, size: u64, root: BlobId| TreeRef {
                root,
                chunks: m.chunks_of(size),
            };
            let ta = a.map_or(
                TreeRef {
                    root: BlobId::ZERO,
                    chunks: 0,
                },
                |d| tree_of(from, d.size, d.root),
            );
            let size_to = b.map(|d| d.size);
            let c = to.chunk_size as u64;
            let (mut extents, mut zero_extents) = (Extents::new(c, 0), Extents::new(c, 0));
            if let Some(b) = b {
                let tb = tree_of(to, b.size, b.root);
                (extents.size, zero_extents.size) = (b.size, b.size);
                let same_edge = match a {
                    Some(a) => self.edge_chunk_same(&index, &nodes, ta, a.size, tb, b.size, c)?,
                    None => None,
                };
                nodes.typed(
                    tree::differing_chunks(&nodes, ta, tb, &mut |i, id| {
                        if same_edge == Some(i) {
                            return Ok(());
                        }
                        extents.push(i);
                        if id.is_zero() {
                            zero_extents.push(i);
                        }
                        Ok(())
                    }),
                    || format!("disk {name} of restore point {:#} or {:#}", from.id, to.id),
                )?;
            }
            let (extents, zero_extents) = (extents.runs, zero_extents.runs);
            disks.push(DiskDiff {
                name: name.to_string(),
                size_from: a.map(|d| d.size),
                size_to,
                changed_bytes: extents.iter().map(|e| e.1).sum(),
                extents,
                zero_extents,
            });
        }
        let streams = if disk.is_some() {
            Vec::new()
        } else {
            self.stream_diffs(&nodes, from, to)?
        };
        Ok(Diff {
            from: from.id,
            to: to.id,
            disks,
            streams,
        })
    }

    /// When the sizes differ, the chunk holding the smaller disk's end has a different length
    /// in the two (a short last chunk in one, a full one in the other), so its ids differ even
    /// where the bytes a resized image would hold are the same. Returns that chunk's index when
    /// its content is the same once brought to `to`'s length (cut, or grown with zeros).
    #[allow(clippy::too_many_arguments)]
    fn edge_chunk_same(
        &self,
        index: &BlobIndex,
        nodes: &RepoNodes<'_>,
        ta: TreeRef,
        size_a: u64,
        tb: TreeRef,
        size_b: u64,
        c: u64,
    ) -> Result<Option<u64>> {
        let edge = size_a.min(size_b);
        if size_a == size_b || edge % c == 0 {
            return Ok(None);
        }
        let i = edge / c;
        let id_of = |t: TreeRef| {
            nodes.typed(tree::chunk_id(nodes, &t.root, t.chunks, i), || {
                format!("chunk {i} of a disk index")
            })
        };
        let (ia, ib) = (id_of(ta)?, id_of(tb)?);
        let len_b = ((i + 1) * c).min(size_b) - i * c;
        let bytes = |id: BlobId| -> Result<Vec<u8>> {
            let mut v = if id.is_zero() {
                Vec::new()
            } else {
                self.read_blob(index, &id)?
            };
            v.resize(len_b as usize, 0);
            Ok(v)
        };
        Ok((bytes(ia)? == bytes(ib)?).then_some(i))
    }

    fn stream_diffs(
        &self,
        nodes: &RepoNodes<'_>,
        from: &Manifest,
        to: &Manifest,
    ) -> Result<Vec<StreamDiff>> {
        let mut names: Vec<&str> = to.streams.iter().map(|s| s.name.as_str()).collect();
        for s in &from.streams {
            if !names.contains(&s.name.as_str()) {
                names.push(&s.name);
            }
        }
        let find = |m: &'_ Manifest, n: &str| m.streams.iter().find(|s| s.name == n).cloned();
        let mut out = Vec::new();
        for name in names {
            let (a, b) = (find(from, name), find(to, name));
            let changed_bytes = match (&a, &b) {
                (_, None) => 0,
                (None, Some(b)) => b.size,
                (Some(a), Some(b)) => stream_changed_bytes(nodes, a, b)?,
            };
            out.push(StreamDiff {
                name: name.to_string(),
                size_from: a.as_ref().map(|s| s.size),
                size_to: b.as_ref().map(|s| s.size),
                differs: match (&a, &b) {
                    (Some(a), Some(b)) => !same_content(a, b),
                    _ => true,
                },
                changed_bytes,
            });
        }
        Ok(out)
    }
}

/// Whether two stream records describe the same bytes (their ids say so without reading).
fn same_content(a: &StreamRecord, b: &StreamRecord) -> bool {
    match (&a.pages, &b.pages) {
        (Some(pa), Some(pb)) => pa.stream_id == pb.stream_id && a.size == b.size,
        (None, None) => a.index == b.index && a.size == b.size,
        _ => false,
    }
}

fn stream_changed_bytes(nodes: &RepoNodes<'_>, a: &StreamRecord, b: &StreamRecord) -> Result<u64> {
    if same_content(a, b) {
        return Ok(0);
    }
    let (Some(pa), Some(pb)) = (&a.pages, &b.pages) else {
        return Ok(b.size);
    };
    if pa.chunk_size != pb.chunk_size {
        return Ok(b.size);
    }
    let mut bytes = 0u64;
    if a.index != b.index {
        bytes += pb.literal_size;
    }
    for img in &pb.images {
        let base = pa.images.iter().find(|i| i.name == img.name);
        bytes += page_image_changed_bytes(nodes, pa, pb, base.map(|i| (i.size, i.root)), img)?;
    }
    Ok(bytes)
}

fn page_image_changed_bytes(
    nodes: &RepoNodes<'_>,
    pa: &PageImages,
    pb: &PageImages,
    base: Option<(u64, BlobId)>,
    img: &vmkeep_core::manifest::PageImage,
) -> Result<u64> {
    let ta = base.map_or(
        TreeRef {
            root: BlobId::ZERO,
            chunks: 0,
        },
        |(size, root)| TreeRef {
            root,
            chunks: pa.chunks_of(size),
        },
    );
    let tb = TreeRef {
        root: img.root,
        chunks: pb.chunks_of(img.size),
    };
    let c = pb.chunk_size as u64;
    let mut bytes = 0u64;
    nodes.typed(
        tree::differing_chunks(nodes, ta, tb, &mut |i, _| {
            bytes += ((i + 1) * c).min(img.size) - i * c;
            Ok(())
        }),
        || format!("page image {:?}", img.name),
    )?;
    Ok(bytes)
}

/// Ascending chunk indexes gathered as merged byte extents, the last clipped to `size`.
struct Extents {
    chunk: u64,
    size: u64,
    runs: Vec<(u64, u64)>,
}

impl Extents {
    fn new(chunk: u64, size: u64) -> Extents {
        Extents {
            chunk,
            size,
            runs: Vec::new(),
        }
    }

    fn push(&mut self, i: u64) {
        let (off, end) = (i * self.chunk, ((i + 1) * self.chunk).min(self.size));
        match self.runs.last_mut() {
            Some((o, l)) if *o + *l == off => *l += end - off,
            _ => self.runs.push((off, end - off)),
        }
    }
}

fn disk_names(a: &Manifest, b: &Manifest) -> String {
    let mut n: Vec<&str> = a
        .disks
        .iter()
        .chain(&b.disks)
        .map(|d| d.name.as_str())
        .collect();
    n.sort_unstable();
    n.dedup();
    n.join(", ")
}

#[cfg(test)]
mod tests {
    use super::Extents;

    #[test]
    fn extents_merge_and_clip() {
        let mut e = Extents::new(10, 95);
        for i in [0, 1, 3, 4, 9] {
            e.push(i);
        }
        assert_eq!(e.runs, vec![(0, 20), (30, 20), (90, 5)]);
    }
}
