//! The stream API of backup sessions (memory state, configuration): content-defined chunks that
//! dedup across insertions, stored next to disks in one restore point, checked by `check`, and
//! read back byte-identical from their stream index.
mod common;

use std::io::Cursor;

use common::*;
use vmkeep_core::stream::{decode_index_blob, CdcParams};
use vmkeep_repo::backup::probe_image;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::{BackupOptions, Manifest, NoProgress, ReadPlan, Repository};

/// Reassemble a stream of a restore point from the repository.
fn read_stream(repo: &Repository, m: &Manifest, name: &str) -> Vec<u8> {
    let rec = m.streams.iter().find(|s| s.name == name).expect("stream");
    let index = BlobIndex::load(repo).unwrap();
    let mut out = Vec::new();
    for id in &rec.index {
        let blob = repo.read_blob(&index, id).unwrap();
        for e in decode_index_blob(&blob).unwrap() {
            let data = repo.read_blob(&index, &e.id).unwrap();
            assert_eq!(data.len(), e.len as usize);
            out.extend_from_slice(&data);
        }
    }
    assert_eq!(out.len() as u64, rec.size);
    out
}

/// 6 MiB of "memory": 4 KiB pages, random, text, or zero.
fn memory(rng: &mut Rng) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 << 20);
    while v.len() < 6 << 20 {
        let page = match rng.below(10) {
            0..=1 => vec![0u8; 4096],
            2..=5 => Chunk::Text(rng.next_u64()).bytes(4096),
            _ => Chunk::Random(rng.next_u64()).bytes(4096),
        };
        v.extend_from_slice(&page);
    }
    v
}

#[test]
fn streams_dedup_across_insertions_and_read_back() {
    for encrypted in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let root = dir.join("repo");
        init_repo(&root, encrypted);
        let repo = open_local(&root, encrypted, 2);
        let mut rng = Rng::new(700 + encrypted as u64);
        let mem1 = memory(&mut rng);
        let config1 = b"<domain><name>vm1</name><memory>6</memory></domain>\n".repeat(50);
        let disk = Spec::mixed(1 << 20, &mut rng);
        let disk_p = disk.write(&dir.join("sys.img"));

        let mut session = repo
            .begin_backup(BackupOptions {
                vm: "vm1".into(),
                ..Default::default()
            })
            .unwrap();
        let rec = session
            .add_stream(
                "memory",
                &mut Cursor::new(&mem1),
                CdcParams::MEMORY,
                &NoProgress,
            )
            .unwrap()
            .clone();
        assert_eq!(rec.size, mem1.len() as u64);
        session
            .add_stream(
                "vm-config",
                &mut Cursor::new(&config1),
                CdcParams::GENERAL,
                &NoProgress,
            )
            .unwrap();
        session
            .add_stream(
                "empty",
                &mut Cursor::new(Vec::new()),
                CdcParams::GENERAL,
                &NoProgress,
            )
            .unwrap();
        assert!(session
            .add_stream(
                "memory",
                &mut Cursor::new(b"x"),
                CdcParams::MEMORY,
                &NoProgress
            )
            .is_err());
        let img = probe_image(&disk_p).unwrap();
        let plan = ReadPlan {
            runs: img.data_runs(CS),
            cbt: vmkeep_core::manifest::ChangeTracking::None,
            ..Default::default()
        };
        session.add_disk("sys", &img, plan, &NoProgress).unwrap();
        let first_new = session.stats().chunks_new;
        let m1 = session.commit().unwrap();
        assert_eq!(m1.streams.len(), 3);
        assert_check_ok(&repo, "first stream backup");
        assert!(read_stream(&repo, &m1, "memory") == mem1);
        assert_eq!(read_stream(&repo, &m1, "vm-config"), config1);
        assert!(read_stream(&repo, &m1, "empty").is_empty());
        assert_restores(&repo, &m1, &disks(&[("sys", &disk_p)]));

        // A slightly changed memory: 1000 bytes inserted at 1 MiB, 8 KiB rewritten at 4 MiB.
        let mut mem2 = mem1.clone();
        let insert: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        mem2.splice(1 << 20..1 << 20, insert);
        Rng::new(1).fill(&mut mem2[4 << 20..(4 << 20) + 8192]);
        let mut session = repo
            .begin_backup(BackupOptions {
                vm: "vm1".into(),
                ..Default::default()
            })
            .unwrap();
        session
            .add_stream(
                "memory",
                &mut Cursor::new(&mem2),
                CdcParams::MEMORY,
                &NoProgress,
            )
            .unwrap();
        let m2 = session.commit().unwrap();
        let s = &m2.stats;
        println!(
            "stream rerun (encrypted={encrypted}): first backup {first_new} new chunks; second {} new, {} reused, {} new bytes of {}",
            s.chunks_new, s.chunks_reused, s.new_bytes, mem2.len()
        );
        assert!(
            s.chunks_reused >= 20 * s.chunks_new,
            "almost everything reused"
        );
        assert!(s.chunks_new >= 1, "the changes are stored");
        assert!(
            s.new_bytes < (mem2.len() / 20) as u64,
            "stores much less than the stream"
        );
        assert_check_ok(&repo, "second stream backup");
        assert!(read_stream(&repo, &m2, "memory") == mem2);
        assert!(read_stream(&repo, &m1, "memory") == mem1);

        // Forgetting the first point keeps the second's stream whole through GC.
        repo.forget(&[m1.id]).unwrap();
        let plan = repo.prune_plan(&Default::default()).unwrap();
        let st = repo.prune(&plan, &NoProgress).unwrap();
        assert!(
            st.gc.reclaimed_bytes > 0,
            "the disk and config of the first point go"
        );
        assert_check_ok(&repo, "after prune");
        assert!(read_stream(&repo, &m2, "memory") == mem2);
    }
}
