//! A repository on a full filesystem: a backup that does not fit fails with a one-line "no space
//! left" error, leaves no restore point, and leaves the repository intact; prune then reclaims
//! what the failed backup wrote. Needs root to mount a small filesystem (CI runs as root): the
//! test fails, not skips, without it.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MIB: usize = 1 << 20;

/// A mounted filesystem, unmounted on drop (also when the test panics).
struct Mount {
    dir: PathBuf,
    kind: &'static str,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{cmd:?}: {} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

/// Mount a 24 MiB tmpfs at `dir`, or else a loop-mounted 32 MiB ext4 image kept in `work`.
fn mount_small_fs(dir: &Path, work: &Path) -> Mount {
    std::fs::create_dir_all(dir).unwrap();
    let tmpfs = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(dir));
    if tmpfs.is_ok() {
        return Mount {
            dir: dir.to_path_buf(),
            kind: "tmpfs 24 MiB",
        };
    }
    let image = work.join("fs.ext4");
    let ext4 = std::fs::File::create(&image)
        .and_then(|f| f.set_len(32 << 20))
        .map_err(|e| e.to_string())
        .and_then(|_| run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image)))
        .and_then(|_| {
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(dir))
        });
    match ext4 {
        Ok(()) => Mount {
            dir: dir.to_path_buf(),
            kind: "ext4 32 MiB (loop)",
        },
        Err(e) => panic!(
            "disk_full needs root: it mounts a small filesystem to fill it (CI runs as root). \
             Mounting failed: tmpfs: {}; loop ext4: {e}",
            tmpfs.unwrap_err()
        ),
    }
}

fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statvfs {}", path.display());
    st.f_bavail as u64 * st.f_frsize as u64
}

#[test]
fn backup_larger_than_free_space() {
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("small");
    let mount = mount_small_fs(&mnt, work.path());
    println!("repository on {}", mount.kind);
    let repo = mnt.join("repo");
    init(&repo, &[]);

    // An earlier, small restore point.
    let small = work.path().join("small.img");
    write(&small, &random_bytes(MIB, 1));
    let s1 = id_of(&backup(&repo, "vm", &[("sda", &small)]));

    // An image larger than the free space, incompressible.
    let big = work.path().join("big.img");
    write(&big, &random_bytes(40 * MIB, 2));
    let free = free_bytes(&mnt);
    assert!(free < 40 * MIB as u64, "{free} bytes free");
    let t = std::time::Instant::now();

    let out = vmkeep(&repo)
        .args(["backup", "image", "--vm", "vm", "--disk"])
        .arg(format!("sda={}", big.display()))
        .output()
        .unwrap();
    let line = one_line_error(&out, 1);
    assert!(line.contains("no space left"), "{line}");
    assert!(out.stdout.is_empty());
    println!("failed backup after {:?}: {line}", t.elapsed());
    let free = free_bytes(&mnt);

    // No new restore point; the repository is intact; the earlier point restores.
    assert_eq!(snapshot_ids(&repo), [s1.as_str()]);
    let c = json(vmkeep(&repo).arg("check"));
    assert_eq!(c["ok"], true, "{c}");
    let c = json(vmkeep(&repo).args(["check", "--read-data"]));
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["snapshots_checked"], 1);
    assert_restores(&repo, &s1, "sda", &small, work.path());
    let hidden: Vec<_> = walk(&repo)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
        })
        .collect();
    assert!(hidden.is_empty(), "no temporaries left: {hidden:?}");

    // Prune reclaims what the failed backup wrote; the space comes back.
    let p = json(vmkeep(&repo).arg("prune"));
    assert!(p["reclaimed_bytes"].as_u64().unwrap() > 0, "{p}");
    let after = free_bytes(&mnt);
    assert!(after > free, "space is back: {free} -> {after}");
    let c = json(vmkeep(&repo).args(["check", "--read-data"]));
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["warnings"], serde_json::json!([]), "{c}");

    println!("checked, restored and pruned after {:?}", t.elapsed());

    // A backup that fits still works.
    let mid = work.path().join("mid.img");
    write(&mid, &random_bytes(4 * MIB, 3));
    let s2 = id_of(&backup(&repo, "vm", &[("sda", &mid)]));
    assert_eq!(snapshot_ids(&repo), [s1.clone(), s2.clone()]);
    assert_restores(&repo, &s2, "sda", &mid, work.path());
    assert_restores(&repo, &s1, "sda", &small, work.path());
    drop(mount);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
