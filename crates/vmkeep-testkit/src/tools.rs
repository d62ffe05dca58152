//! Disk images through qemu-img / qemu-io, and nbdinfo as the reference NBD peer.
use std::path::Path;
use std::process::Command;

use crate::process::{require, run};

/// Creates an empty qcow2 image of `size` (qemu-img syntax: "8M").
pub fn make_qcow2(path: &Path, size: &str) {
    run(Command::new(require("qemu-img"))
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size));
}

/// Applies qemu-io commands ("write -P 0xaa 0 64k") to a qcow2 image.
pub fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut c = Command::new(require("qemu-io"));
    c.args(["-f", "qcow2"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(path);
    run(&mut c);
}

/// The image's guest-visible content as raw bytes (converted into `dir`).
pub fn raw_content(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join(format!(
        "{}.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    run(Command::new(require("qemu-img"))
        .args(["convert", "-U", "-O", "raw"])
        .arg(img)
        .arg(&raw));
    std::fs::read(&raw).unwrap()
}

/// `nbdinfo --map[=CONTEXT]` as `(offset, length, flags)`, adjacent equal flags merged.
pub fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let map = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".into(),
    };
    let out = run(Command::new(require("nbdinfo")).arg(map).arg(uri));
    let mut v: Vec<(u64, u64, u32)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (o, l, t) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        match v.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => v.push((o, l, t)),
        }
    }
    v
}

/// One boolean from `nbdinfo URI` output (e.g. `can_multi_conn`).
pub fn nbdinfo_flag(uri: &str, key: &str) -> bool {
    let out = run(Command::new(require("nbdinfo")).arg(uri));
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("nbdinfo did not print {key}:\n{out}"));
    line.trim().ends_with("true")
}
