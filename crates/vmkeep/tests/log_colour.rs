//! Log lines (tracing's `WARN ...`) are plain text unless stderr is a terminal: a pipe or a
//! file gets no ANSI escape codes, and `NO_COLOR` (https://no-color.org) turns them off on a
//! terminal too. The real binary, a warning it really logs: `snapshots` skipping a damaged
//! restore point.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use common::*;

const ESC: u8 = 0x1b;

/// A repository with two restore points, the first one's manifest truncated: `snapshots`
/// lists the second and warns about the first.
fn repo_with_a_damaged_restore_point(dir: &Path) -> std::path::PathBuf {
    let repo = dir.join("repo");
    init(&repo, &[]);
    let img = dir.join("disk.raw");
    write(&img, &random_bytes(256 * 1024, 1));
    let first = id_of(&backup(&repo, "vm", &[("sda", &img)]));
    patch(&img, 0, &random_bytes(4096, 2));
    backup(&repo, "vm", &[("sda", &img)]);
    let manifest = repo.join("snapshots").join(&first);
    let len = std::fs::metadata(&manifest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&manifest)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    repo
}

#[test]
fn warnings_through_a_pipe_carry_no_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_with_a_damaged_restore_point(dir.path());
    let out = ok(vmkeep(&repo).arg("snapshots"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WARN"), "a warning is logged: {stderr:?}");
    assert!(
        !out.stderr.contains(&ESC),
        "ANSI escape codes in piped stderr: {stderr:?}"
    );
}

/// A pseudo-terminal: (controller, terminal side).
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut controller, mut terminal) = (-1, -1);
    // SAFETY: openpty writes two fds we then own; the name, termios and size are not wanted.
    let r = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fds owned by nobody else.
    unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    }
}

/// Runs `snapshots` with stderr on a terminal; returns what the terminal showed.
fn stderr_on_a_terminal(repo: &Path, no_color: bool) -> Vec<u8> {
    let (controller, terminal) = pty();
    let mut cmd = vmkeep_std(repo);
    cmd.arg("snapshots")
        .stdout(Stdio::null())
        .stderr(Stdio::from(terminal));
    if no_color {
        cmd.env("NO_COLOR", "1");
    } else {
        cmd.env_remove("NO_COLOR");
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // our copy of the terminal side: the controller reads EOF (EIO) once it exits
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
    let mut seen = Vec::new();
    let mut f = File::from(controller);
    let mut buf = [0u8; 4096];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => panic!("reading the terminal: {e}"),
        }
    }
    seen
}

#[test]
fn a_terminal_gets_colour_unless_no_color_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_with_a_damaged_restore_point(dir.path());
    let coloured = stderr_on_a_terminal(&repo, false);
    let text = String::from_utf8_lossy(&coloured);
    assert!(text.contains("WARN"), "{text:?}");
    assert!(coloured.contains(&ESC), "colour on a terminal: {text:?}");
    let plain = stderr_on_a_terminal(&repo, true);
    let text = String::from_utf8_lossy(&plain);
    assert!(text.contains("WARN"), "{text:?}");
    assert!(!plain.contains(&ESC), "NO_COLOR is respected: {text:?}");
}
