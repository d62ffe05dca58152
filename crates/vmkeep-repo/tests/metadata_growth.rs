//! Metadata grows with change, not with disk size: a restore point of a 1 TiB sparse disk in
//! which 4 MiB changed (64 scattered 64 KiB writes) must add at most 1 MiB of metadata
//! (index tree nodes, index objects, pack headers, manifest).
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vmkeep_core::keys::KdfParams;
use vmkeep_repo::{BackupOptions, ImageBackupOptions, InitOptions, NoProgress, Repository};
use vmkeep_store::LocalStore;

fn backup(repo: &Repository, path: &std::path::Path) -> vmkeep_repo::Manifest {
    let opts = ImageBackupOptions {
        backup: BackupOptions {
            vm: "big".into(),
            ..Default::default()
        },
        disks: vec![("vda".into(), path.to_path_buf())],
        full: false,
    };
    repo.backup_image(&opts, &NoProgress).expect("backup")
}

#[test]
fn one_tib_sparse_disk_with_4_mib_changed_adds_under_1_mib_of_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.set_len(1 << 40).unwrap();
    // Some data spread over the disk, then 64 x 64 KiB changed at other scattered places.
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let block = |n: u64| -> Vec<u8> {
        (0..65536u64)
            .map(|i| ((i * 31 + n * 7) % 251) as u8)
            .collect()
    };
    for i in 0..64u64 {
        f.write_all_at(&block(i), (next() % (1 << 24)) * 65536)
            .unwrap();
    }
    let store = Arc::new(LocalStore::create(dir.path().join("repo")).unwrap());
    let kdf = KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    };
    let repo = Repository::init(
        store,
        InitOptions {
            chunk_size: 65536,
            passphrase: Some(b"pw".to_vec().into()),
            kdf,
        },
    )
    .unwrap();
    let first = backup(&repo, &img);
    for i in 0..64u64 {
        f.write_all_at(&block(1000 + i), (next() % (1 << 24)) * 65536)
            .unwrap();
    }
    let second = backup(&repo, &img);
    let s = &second.stats;
    println!(
        "1 TiB sparse disk, 4 MiB changed: changed {} B, new data {} B, stored {} B, metadata {} B (first backup metadata {} B)",
        s.changed_bytes, s.new_bytes, s.stored_bytes, s.metadata_bytes, first.stats.metadata_bytes
    );
    assert_eq!(
        s.changed_bytes,
        64 * 65536,
        "exactly the 64 written chunks changed"
    );
    assert!(
        s.metadata_bytes <= 1 << 20,
        "metadata {} B exceeds 1 MiB",
        s.metadata_bytes
    );
    assert_eq!(second.disks[0].changes.as_ref().unwrap().count(), 64);
    assert_eq!(second.disks[0].size, 1 << 40);
}

#[test]
fn an_unchanged_image_file_is_not_read_again_and_a_changed_one_is() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&img, &data).unwrap();
    // Let the file's ctime settle (identities of just-written files are not trusted).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let store = Arc::new(LocalStore::create(dir.path().join("repo")).unwrap());
    let kdf = KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    };
    let repo = Repository::init(
        store,
        InitOptions {
            chunk_size: 65536,
            passphrase: None,
            kdf,
        },
    )
    .unwrap();
    let first = backup(&repo, &img);
    assert_eq!(first.stats.read_bytes, 8 << 20);
    assert!(first.disks[0].source_identity.is_some());
    let second = backup(&repo, &img);
    assert_eq!(
        second.stats.read_bytes, 0,
        "unchanged file must not be read"
    );
    assert_eq!(second.disks[0].root, first.disks[0].root);
    assert_eq!(second.disks[0].changes.as_ref().unwrap().count(), 0);
    // A write (even one that restores the old mtime) changes ctime: the file is read again.
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(b"changed", 4 << 20).unwrap();
    drop(f);
    let third = backup(&repo, &img);
    assert_eq!(third.stats.read_bytes, 8 << 20);
    assert_eq!(third.disks[0].changes.as_ref().unwrap().count(), 1);
    let out = dir.path().join("out");
    repo.restore(
        &third,
        &vmkeep_repo::RestoreOptions {
            target: out.clone(),
            disk: None,
        },
        &NoProgress,
    )
    .unwrap();
    let mut expect = data.clone();
    expect[4 << 20..(4 << 20) + 7].copy_from_slice(b"changed");
    assert!(std::fs::read(out.join("vda.raw")).unwrap() == expect);
}
