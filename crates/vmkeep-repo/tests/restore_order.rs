//! A target that wants ascending writes (qcow2) gets a disk's chunks in ascending order, joined
//! into runs, zero chunks never written, even when the restore point's chunks lie in packs out
//! of disk order (an incremental backup); a damaged blob or a failing target ends the restore
//! with that error instead of a hang.
mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::*;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::{DiskWriter, Error, Manifest, NoProgress, Repository};

/// Records every write; fails the one at `fail_at`.
struct Recorder {
    ascending: bool,
    writes: Mutex<Vec<(u64, Vec<u8>)>>,
    fail_at: Option<u64>,
}

impl Recorder {
    fn new(ascending: bool) -> Recorder {
        Recorder {
            ascending,
            writes: Mutex::new(Vec::new()),
            fail_at: None,
        }
    }
}

impl DiskWriter for Recorder {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if self.fail_at == Some(offset) {
            return Err(std::io::Error::other("no space left"));
        }
        self.writes.lock().unwrap().push((offset, data.to_vec()));
        Ok(())
    }
    fn finish(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn target(&self) -> &Path {
        Path::new("recorder")
    }
    fn wants_ascending_writes(&self) -> bool {
        self.ascending
    }
}

/// A repository at `dir/repo` whose latest restore point of a 256-chunk disk (mixed holes,
/// zeros and data) has a third of its chunks from a later pack than their neighbours.
fn incremental(dir: &Path, threads: usize) -> (Repository, Manifest, Spec, PathBuf) {
    let root = dir.join("repo");
    init_repo(&root, true);
    let repo = open_local(&root, true, threads);
    let mut rng = Rng::new(31);
    let img = dir.join("vda.raw");
    let base = Spec::mixed(256 * CS + 4096, &mut rng);
    base.write(&img);
    backup(&repo, "vm", &disks(&[("vda", &img)])).unwrap();
    let spec = base.mutate(33, &mut rng);
    spec.write(&img);
    let m = backup(&repo, "vm", &disks(&[("vda", &img)])).unwrap();
    (repo, m, spec, root)
}

/// The restore's writes, checked: `ascending` ones strictly ascending and disjoint.
fn restore(repo: &Repository, m: &Manifest, w: &Recorder) -> vmkeep_repo::Result<u64> {
    let index = BlobIndex::load(repo)?;
    repo.restore_disk_to(&index, &m.disks[0], w, &NoProgress)
}

#[test]
fn an_ordered_target_restore_is_written_in_ascending_runs_without_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, m, spec, _) = incremental(dir.path(), 4);
    let w = Recorder::new(true);
    let n = restore(&repo, &m, &w).unwrap();
    let writes = w.writes.into_inner().unwrap();
    let mut end = 0;
    let mut image = vec![0u8; spec.size as usize];
    for (offset, data) in &writes {
        assert!(
            *offset >= end,
            "write at {offset} after one ending at {end}"
        );
        assert_eq!(offset % CS, 0);
        end = offset + data.len() as u64;
        image[*offset as usize..end as usize].copy_from_slice(data);
        for (k, piece) in data.chunks(CS as usize).enumerate() {
            let i = (offset / CS) as usize + k;
            assert!(
                piece.iter().any(|&b| b != 0),
                "zero chunk {i} written ({:?})",
                spec.chunks[i]
            );
        }
    }
    let want: Vec<u8> = (0..spec.chunks.len())
        .flat_map(|i| spec.chunk_bytes(i))
        .collect();
    assert!(image == want, "the written image differs from the backup");
    assert_eq!(n, writes.iter().map(|w| w.1.len() as u64).sum::<u64>());
    let data_chunks = (0..spec.chunks.len())
        .filter(|&i| spec.chunk_bytes(i).iter().any(|&b| b != 0))
        .count();
    assert!(
        writes.len() < data_chunks,
        "{} writes for {data_chunks} data chunks: neighbours not joined",
        writes.len()
    );

    // An ordinary target gets the same bytes, written as the workers finish them.
    let w = Recorder::new(false);
    assert_eq!(restore(&repo, &m, &w).unwrap(), n);
    assert_eq!(w.writes.into_inner().unwrap().len(), data_chunks);
}

#[test]
fn an_ordered_target_restore_stops_on_a_damaged_blob() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, m, spec, root) = incremental(dir.path(), 2);
    // Damage a data chunk in the middle of the disk.
    let i = (100..spec.chunks.len())
        .find(|&i| spec.chunk_bytes(i).iter().any(|&b| b != 0))
        .unwrap();
    let id = chunk_id(&repo, &spec.chunk_bytes(i));
    let loc = BlobIndex::load(&repo).unwrap().get(&id).unwrap();
    flip_byte(
        &pack_path(&root, &loc.pack),
        u64::from(loc.offset + loc.length / 2),
    );
    let w = Recorder::new(true);
    match restore(&repo, &m, &w) {
        Err(Error::CorruptObject { .. }) => {}
        other => panic!("{other:?}"),
    }
    // What was written lies before the damaged chunk.
    let writes = w.writes.into_inner().unwrap();
    assert!(
        writes
            .iter()
            .all(|(o, d)| o + d.len() as u64 <= i as u64 * CS),
        "written past chunk {i}"
    );
}

#[test]
fn an_ordered_target_restore_stops_on_a_write_error() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, m, spec, _) = incremental(dir.path(), 2);
    // Fail the first write: at the first data chunk.
    let first = (0..spec.chunks.len())
        .find(|&i| spec.chunk_bytes(i).iter().any(|&b| b != 0))
        .unwrap();
    let w = Recorder {
        fail_at: Some(first as u64 * CS),
        ..Recorder::new(true)
    };
    match restore(&repo, &m, &w) {
        Err(Error::TargetWrite { path, cause }) => {
            assert_eq!(path, Path::new("recorder"));
            assert_eq!(cause.to_string(), "no space left");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.writes.into_inner().unwrap().is_empty());
}
