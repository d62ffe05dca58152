//! Damage at rest: a flipped byte in a stored data blob or index node, a truncated manifest.
//! `check --read-data` must name exactly the restore points (and disks) that use the damaged
//! data, and nothing else; restoring a damaged point fails cleanly (an error, no panic, no file
//! that looks complete).
mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use common::*;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::{Manifest, NoProgress, Repository, RestoreOptions};

struct Scene {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    repo: Repository,
    /// (restore point, specs of its disks by name)
    points: Vec<(Manifest, Vec<(String, Spec)>)>,
    refs: Refs,
}

/// vm "a": A1 (sys + data), A2 (sys changed except chunk 5), A3 (chunk 5 changed too);
/// vm "b": B1, unrelated content.
fn scene(encrypted: bool) -> Scene {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let root = dir.join("repo");
    init_repo(&root, encrypted);
    let repo = open_local(&root, encrypted, 2);
    let mut rng = Rng::new(400 + encrypted as u64);
    let mut a1 = Spec::mixed(2 << 20, &mut rng);
    a1.chunks[5] = Chunk::Random(rng.next_u64());
    let mut a2 = a1.rewrite(10..20, &mut rng);
    a2.chunks[5] = a1.chunks[5];
    let a3 = a2.rewrite(0..8, &mut rng);
    let data = Spec::mixed(1 << 20, &mut rng);
    let b1 = Spec::mixed(2 << 20, &mut rng);
    let mut points = Vec::new();
    let mut refs = Refs::default();
    for (i, (vm, sys)) in [("a", &a1), ("a", &a2), ("a", &a3), ("b", &b1)]
        .into_iter()
        .enumerate()
    {
        let sp = sys.write(&dir.join(format!("sys{i}.img")));
        let dp = data.write(&dir.join(format!("data{i}.img")));
        let d = disks(&[("sys", &sp), ("data", &dp)]);
        let m = backup(&repo, vm, &d).unwrap();
        refs.add(&m, &d);
        points.push((
            m,
            vec![
                ("sys".to_string(), sys.clone()),
                ("data".to_string(), data.clone()),
            ],
        ));
    }
    assert_check_ok(&repo, "scene");
    Scene {
        _tmp: tmp,
        root,
        repo,
        points,
        refs,
    }
}

fn damaged_set(r: &vmkeep_repo::CheckReport) -> BTreeSet<(String, Option<String>)> {
    r.damaged
        .iter()
        .map(|d| (d.snapshot.clone(), d.disk.clone()))
        .collect()
}

/// Restore `m` and expect a clean failure: a damage error, and neither `<disk>.raw` nor
/// `<disk>.raw.partial` of the failing disk left behind.
fn assert_restore_fails(repo: &Repository, m: &Manifest, disk: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    let r = repo.restore(
        m,
        &RestoreOptions {
            target: target.clone(),
            disk: Some(disk.into()),
        },
        &NoProgress,
    );
    let e = r.expect_err("restore of a damaged disk fails");
    assert!(e.is_damage(), "a damage error: {e}");
    assert!(
        !target.join(format!("{disk}.raw")).exists(),
        "no complete-looking file"
    );
    assert!(
        !target.join(format!("{disk}.raw.partial")).exists(),
        "the partial file is removed"
    );
}

fn restore_one_disk(repo: &Repository, m: &Manifest, disk: &str, reference: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    repo.restore(
        m,
        &RestoreOptions {
            target: target.clone(),
            disk: Some(disk.into()),
        },
        &NoProgress,
    )
    .unwrap();
    assert!(fs::read(target.join(format!("{disk}.raw"))).unwrap() == fs::read(reference).unwrap());
}

#[test]
fn flipped_byte_in_a_data_blob_names_exactly_the_points_using_it() {
    for encrypted in [false, true] {
        let sc = scene(encrypted);
        let repo = &sc.repo;
        let (a1, a1_specs) = &sc.points[0];
        let target = a1_specs[0].1.chunk_bytes(5);
        let id = chunk_id(repo, &target);
        let index = BlobIndex::load(repo).unwrap();
        let loc = index.get(&id).expect("the chunk is stored");
        flip_byte(
            &pack_path(&sc.root, &loc.pack),
            loc.offset as u64 + loc.length as u64 / 2,
        );

        // Expected: every (point, disk) whose image holds that chunk content, from the images.
        let mut expected = BTreeSet::new();
        for (m, specs) in &sc.points {
            for (disk, spec) in specs {
                if (0..spec.chunks.len()).any(|i| spec.chunk_bytes(i) == target) {
                    expected.insert((m.id.to_hex(), Some(disk.clone())));
                }
            }
        }
        assert_eq!(
            expected.len(),
            2,
            "A1 and A2 share the chunk, A3 and B1 do not"
        );

        let r = check(repo);
        println!(
            "check after a flipped data byte (encrypted={encrypted}): {:?}",
            r.damaged
        );
        assert!(!r.ok);
        assert_eq!(damaged_set(&r), expected);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("does not hash to its name")),
            "{:?}",
            r.warnings
        );

        assert_restore_fails(repo, a1, "sys");
        assert_restore_fails(repo, &sc.points[1].0, "sys");
        // The undamaged disk of a damaged point, and the undamaged points, restore.
        restore_one_disk(repo, a1, "data", &sc.refs.0[&a1.id][1].1);
        for (m, _) in &sc.points[2..] {
            assert_restores(repo, m, &sc.refs.0[&m.id]);
        }
    }
}

#[test]
fn flipped_byte_in_an_index_node_damages_that_disk() {
    for encrypted in [false, true] {
        let sc = scene(encrypted);
        let repo = &sc.repo;
        let (b1, _) = &sc.points[3];
        let root = b1.disk("sys").unwrap().root;
        let loc = BlobIndex::load(repo).unwrap().get(&root).unwrap();
        flip_byte(&pack_path(&sc.root, &loc.pack), loc.offset as u64 + 3);
        let r = check(repo);
        println!("check after a flipped index node byte: {:?}", r.damaged);
        assert!(!r.ok);
        assert_eq!(
            damaged_set(&r),
            BTreeSet::from([(b1.id.to_hex(), Some("sys".to_string()))])
        );
        // A warm cache may hold a verified copy of the node (read when a later backup read its
        // parent's tree): restores are then whole. Without one, as on another host:
        if let Some(dir) = repo.cache_dir() {
            fs::remove_dir_all(dir).unwrap();
        }
        assert_restore_fails(repo, b1, "sys");
        for (m, _) in &sc.points[..3] {
            assert_restores(repo, m, &sc.refs.0[&m.id]);
        }
    }
}

#[test]
fn truncated_manifest_is_reported() {
    for encrypted in [false, true] {
        let sc = scene(encrypted);
        let repo = &sc.repo;
        let a2 = &sc.points[1].0;
        let path = snapshot_path(&sc.root, &a2.id);
        let len = fs::metadata(&path).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);

        let r = check(repo);
        println!("check after a truncated manifest: {:?}", r.damaged);
        assert!(!r.ok);
        assert_eq!(damaged_set(&r), BTreeSet::from([(a2.id.to_hex(), None)]));
        let e = repo.load_manifest(&a2.id).expect_err("unreadable");
        assert!(e.is_damage(), "{e}");
        // The others are listed and restore; A3's parent is the damaged one, which changes
        // nothing for its data.
        let listed: Vec<_> = repo.snapshots().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(listed.len(), 3);
        assert!(!listed.contains(&a2.id));
        for (m, _) in sc.points.iter().filter(|(m, _)| m.id != a2.id) {
            assert_restores(repo, m, &sc.refs.0[&m.id]);
        }
    }
}
