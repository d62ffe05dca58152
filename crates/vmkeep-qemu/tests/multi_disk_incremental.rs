//! Regression (found by the live backup tests): an incremental of two disks with identical
//! subtrees. The second disk's tree reuses nodes the first disk wrote in the same session;
//! they must stay readable before the session commits.

mod common;

use vmkeep_repo::{BackupOptions, DiskReader, NoProgress, ReadPlan};
struct Mem(std::sync::Mutex<Vec<u8>>);
impl DiskReader for Mem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let v = self.0.lock().unwrap();
        buf.copy_from_slice(&v[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn describe(&self) -> String {
        "mem".into()
    }
}
#[test]
fn incremental_of_two_identical_disks_in_one_session() {
    let d = tempfile::tempdir().unwrap();
    let repo = common::plain_repo(&d.path().join("r"));
    let n = 512u64; // 32 MiB
    let a = Mem(std::sync::Mutex::new(vec![0x5a; (n * 65536) as usize]));
    let b = Mem(std::sync::Mutex::new(vec![0x5a; (n * 65536) as usize]));
    let mut s = repo
        .begin_backup(BackupOptions {
            vm: "g".into(),
            ..Default::default()
        })
        .unwrap();
    s.add_disk(
        "vd0",
        &a,
        ReadPlan {
            runs: vec![(0, n)],
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    s.add_disk(
        "drive1",
        &b,
        ReadPlan {
            runs: vec![(0, n)],
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    let m1 = s.commit().unwrap();
    a.0.lock().unwrap()[5 * 65536] = 1;
    b.0.lock().unwrap()[5 * 65536] = 1;
    let mut s = repo
        .begin_backup(BackupOptions {
            vm: "g".into(),
            ..Default::default()
        })
        .unwrap();
    s.add_disk(
        "vd0",
        &a,
        ReadPlan {
            base: Some(m1.disks[0].root),
            runs: vec![(5, 1)],
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    s.add_disk(
        "drive1",
        &b,
        ReadPlan {
            base: Some(m1.disks[1].root),
            runs: vec![(5, 1)],
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    s.commit().unwrap();
}
