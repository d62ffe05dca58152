//! Laws relating restore points to the images they came from, over seeded random images and
//! random changes:
//! - a restore point's change map is exactly the set of chunks whose content differs from its
//!   parent's image (zero chunks, holes or written zeros, being equal), and parent + changed
//!   chunks = the new image = a full backup of it;
//! - forgetting a middle point relinks its successor to the forgotten one's parent with a change
//!   map covering the true differences.
mod common;

use std::fs;

use common::*;
use vmkeep_repo::{BackupOptions, Manifest};

/// A random change of a random kind to some chunks (holes, zeros, text, random, one flipped
/// byte, or rewriting a zero chunk as the other kind of zero: no change in content).
fn change(spec: &Spec, rng: &mut Rng) -> Spec {
    let mut s = spec.clone();
    let percent = 5 + rng.below(40);
    for c in s.chunks.iter_mut() {
        if rng.below(100) >= percent {
            continue;
        }
        *c = match rng.below(7) {
            0 => Chunk::Hole,
            1 => Chunk::Zeros,
            2 => Chunk::Text(rng.next_u64()),
            3 => Chunk::Random(rng.next_u64()),
            4 => match *c {
                Chunk::Hole => Chunk::Zeros,
                Chunk::Zeros => Chunk::Hole,
                other => other,
            },
            _ => c.flip(rng.below(CS) as u32),
        };
    }
    s
}

fn data_bytes(spec: &Spec) -> u64 {
    (0..spec.chunks.len())
        .filter(|&i| spec.chunk_bytes(i).iter().any(|&b| b != 0))
        .map(|i| spec.chunk_len(i) as u64)
        .sum()
}

#[test]
fn change_map_is_the_exact_difference_and_parent_plus_changes_is_the_new_image() {
    for seed in 0..6u64 {
        let encrypted = seed % 2 == 1;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut rng = Rng::new(500 + seed);
        // Sizes: whole chunks, or a partial last chunk.
        let size = (16 + rng.below(16)) * CS
            + if seed % 3 == 0 {
                0
            } else {
                1 + rng.below(CS - 1)
            };
        let old = Spec::mixed(size, &mut rng);
        let new = change(&old, &mut rng);
        let other_old = Spec::mixed(size, &mut rng);
        // A second disk that changes size: no change map (every chunk counts as changed).
        let other_new = Spec::mixed(size + CS, &mut rng);
        let old_p = old.write(&dir.join("old.img"));
        let new_p = new.write(&dir.join("new.img"));
        let d_old = disks(&[
            ("sys", &old_p),
            ("other", &other_old.write(&dir.join("o1.img"))),
        ]);
        let d_new = disks(&[
            ("sys", &new_p),
            ("other", &other_new.write(&dir.join("o2.img"))),
        ]);
        let root = dir.join("repo");
        init_repo(&root, encrypted);
        let repo = open_local(&root, encrypted, 2);
        let m1 = backup(&repo, "vm", &d_old).unwrap();
        let m2 = backup(&repo, "vm", &d_new).unwrap();
        assert_eq!(m2.parent, Some(m1.id));

        let truth = differing_chunks(&old_p, &new_p);
        let sys = m2.disk("sys").unwrap();
        let map: Vec<u64> = sys
            .changes
            .as_ref()
            .expect("same size: a change map")
            .iter()
            .collect();
        assert_eq!(
            map, truth,
            "seed {seed}: change map = chunks whose content differs"
        );
        let changed_bytes: u64 = truth
            .iter()
            .map(|&i| new.chunk_len(i as usize) as u64)
            .sum();
        let other_bytes = data_bytes(&other_new);
        assert_eq!(
            m2.stats.changed_bytes,
            changed_bytes + other_bytes,
            "seed {seed}"
        );
        assert_eq!(sys.data_bytes, data_bytes(&new), "seed {seed}: data bytes");
        assert_eq!(
            m2.disk("other").unwrap().changes,
            None,
            "seed {seed}: resized disk"
        );
        assert_eq!(
            m1.disk("sys").unwrap().changes,
            None,
            "seed {seed}: first point"
        );

        // Parent + the changed chunks (taken from the new restore point) = the new image.
        let out = tempfile::tempdir().unwrap();
        let restore = |m: &Manifest, sub: &str| {
            let t = out.path().join(sub);
            repo.restore(
                m,
                &vmkeep_repo::RestoreOptions {
                    target: t.clone(),
                    disk: Some("sys".into()),
                },
                &vmkeep_repo::NoProgress,
            )
            .unwrap();
            fs::read(t.join("sys.raw")).unwrap()
        };
        let mut rebuilt = restore(&m1, "parent");
        let newer = restore(&m2, "new");
        for &i in &map {
            let a = (i * CS) as usize;
            let b = (a + CS as usize).min(newer.len());
            rebuilt[a..b].copy_from_slice(&newer[a..b]);
        }
        assert!(
            rebuilt == fs::read(&new_p).unwrap(),
            "seed {seed}: parent + changes = new image"
        );
        assert!(
            newer == fs::read(&new_p).unwrap(),
            "seed {seed}: restore = new image"
        );
        // A full backup of the new image (no parent) has the very same index tree.
        let full = backup_with(
            &repo,
            BackupOptions {
                vm: "vm".into(),
                no_parent: true,
                ..Default::default()
            },
            &d_new,
        )
        .unwrap();
        assert_eq!(full.parent, None);
        assert_eq!(full.disk("sys").unwrap().changes, None);
        assert_eq!(
            full.disk("sys").unwrap().root,
            sys.root,
            "seed {seed}: same tree"
        );
        assert_eq!(
            full.stats.chunks_new, 0,
            "seed {seed}: all data already stored"
        );
        assert_check_ok(&repo, &format!("seed {seed}"));
    }
}

#[test]
fn forgetting_a_middle_point_relinks_its_successor_with_a_covering_map() {
    for seed in 0..4u64 {
        let encrypted = seed % 2 == 0;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut rng = Rng::new(600 + seed);
        let size = 24 * CS + seed * 1000;
        let a = Spec::mixed(size, &mut rng);
        let b = change(&a, &mut rng);
        let c = change(&b, &mut rng);
        let d = change(&c, &mut rng);
        let paths: Vec<_> = [&a, &b, &c, &d]
            .iter()
            .enumerate()
            .map(|(i, s)| s.write(&dir.join(format!("{i}.img"))))
            .collect();
        let root = dir.join("repo");
        init_repo(&root, encrypted);
        let repo = open_local(&root, encrypted, 2);
        let mut refs = Refs::default();
        let ms: Vec<Manifest> = paths
            .iter()
            .map(|p| {
                let dd = disks(&[("sys", p)]);
                let m = backup(&repo, "vm", &dd).unwrap();
                refs.add(&m, &dd);
                m
            })
            .collect();
        let map_of = |m: &Manifest| -> Vec<u64> {
            m.disk("sys")
                .unwrap()
                .changes
                .as_ref()
                .unwrap()
                .iter()
                .collect()
        };

        // Forget B (between A and C).
        assert_eq!(repo.forget(&[ms[1].id]).unwrap(), vec![ms[1].id]);
        let c_now = repo.load_manifest(&ms[2].id).unwrap();
        assert_eq!(
            c_now.parent,
            Some(ms[0].id),
            "seed {seed}: C's parent is B's parent"
        );
        let merged = map_of(&c_now);
        let truth = differing_chunks(&paths[0], &paths[2]);
        assert!(
            truth.iter().all(|i| merged.contains(i)),
            "seed {seed}: C's map {merged:?} covers A->C differences {truth:?}"
        );
        // Exactly the union of B's and C's maps (a superset, not more).
        let mut union: Vec<u64> = map_of(&ms[1]).into_iter().chain(map_of(&ms[2])).collect();
        union.sort();
        union.dedup();
        assert_eq!(merged, union, "seed {seed}");
        // D is untouched.
        assert_eq!(repo.load_manifest(&ms[3].id).unwrap(), ms[3]);

        // Forget C too: D now hangs off A, its map covering A->D.
        repo.forget(&[ms[2].id]).unwrap();
        let d_now = repo.load_manifest(&ms[3].id).unwrap();
        assert_eq!(d_now.parent, Some(ms[0].id));
        let truth = differing_chunks(&paths[0], &paths[3]);
        let m = map_of(&d_now);
        assert!(
            truth.iter().all(|i| m.contains(i)),
            "seed {seed}: D covers A->D"
        );

        // Forget the first point: D has no parent and no map.
        repo.forget(&[ms[0].id]).unwrap();
        let d_now = repo.load_manifest(&ms[3].id).unwrap();
        assert_eq!(d_now.parent, None);
        assert_eq!(d_now.disk("sys").unwrap().changes, None);
        assert_check_ok(&repo, &format!("seed {seed}"));
        assert_eq!(refs.verify_all(&repo, &format!("seed {seed}")), 1);
    }
}
