//! The guest's huge pages back after a memory capture.
//!
//! QEMU's background snapshot write-protects guest RAM and lifts the protection 4 KiB at a time
//! as it saves pages, which splits every transparent huge page of the guest into 512 small
//! mappings. Left so, the guest runs on small pages until khugepaged collapses them again (by
//! default 16 MiB every 10 s), and the next capture's pause is several times longer: QEMU's
//! populate and write-protect passes, both done while the VM is stopped, walk one page-table
//! entry per 4 KiB instead of one per 2 MiB (bench/memory_capture.py: a 1 GiB guest paused
//! 28-41 ms on split pages, 8-16 ms once collapsed).
//!
//! So once the memory stream is complete, we do at once what khugepaged would do over minutes:
//! `process_madvise(MADV_COLLAPSE)` over the regions QEMU itself asked huge pages for (private
//! anonymous, `hg` in /proc/PID/smaps, not executable: guest RAM). Best effort: it needs
//! CAP_SYS_NICE and ptrace read access to QEMU, and the kernel may lack free huge pages; any
//! refusal is logged and changes nothing else.

use std::time::{Duration, Instant};

use tracing::{debug, info};

/// `MADV_COLLAPSE` (Linux 6.1; not in the libc crate yet).
const MADV_COLLAPSE: libc::c_int = 25;
const HUGE: u64 = 2 << 20;
/// One call per piece, so a failing region costs only its piece.
const PIECE: u64 = 256 << 20;
/// How long to wait for QEMU to unregister its write-protection after the stream ended.
const UNREGISTER_WAIT: Duration = Duration::from_secs(2);

/// What [`collapse`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Bytes of guest RAM asked to be collapsed.
    pub asked: u64,
    /// Bytes the kernel collapsed (or found already huge).
    pub collapsed: u64,
    /// The first refusal, if any.
    pub refused: Option<String>,
}

/// Collapses the huge-page regions of process `pid` (see the module docs). Never fails: what
/// could not be done is in the report.
pub fn collapse(pid: u32) -> Report {
    let started = Instant::now();
    let mut report = Report::default();
    // SAFETY: a plain syscall; the descriptor is owned and closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if pidfd < 0 {
        report.refused = Some(format!("pidfd_open: {}", std::io::Error::last_os_error()));
        return report;
    }
    let pidfd = pidfd as libc::c_int;
    let regions = loop {
        match regions(pid) {
            Ok((r, armed)) if !armed || started.elapsed() > UNREGISTER_WAIT => break Ok(r),
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(e),
        }
    };
    match regions {
        Ok(regions) => {
            'all: for (start, end) in regions {
                let mut at = start;
                while at < end {
                    let len = PIECE.min(end - at);
                    report.asked += len;
                    match advise(pidfd, at, len) {
                        Ok(n) => report.collapsed += n,
                        Err(e) => {
                            let fatal = matches!(
                                e.raw_os_error(),
                                Some(libc::EPERM | libc::ESRCH | libc::ENOSYS)
                            );
                            report.refused.get_or_insert_with(|| e.to_string());
                            if fatal {
                                break 'all;
                            }
                        }
                    }
                    at += len;
                }
            }
        }
        Err(e) => report.refused = Some(format!("read /proc/{pid}/smaps: {e}")),
    }
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(pidfd) };
    let mib = |b: u64| b >> 20;
    match &report.refused {
        None => info!(
            mib = mib(report.collapsed),
            seconds = started.elapsed().as_secs_f64(),
            "guest huge pages restored after the memory capture"
        ),
        Some(why) => debug!(
            asked_mib = mib(report.asked),
            collapsed_mib = mib(report.collapsed),
            why = %why,
            "guest huge pages not (all) restored; khugepaged will in time"
        ),
    }
    report
}

fn advise(pidfd: libc::c_int, start: u64, len: u64) -> std::io::Result<u64> {
    let iov = libc::iovec {
        iov_base: start as *mut libc::c_void,
        iov_len: len as usize,
    };
    // SAFETY: process_madvise only reads the iovec array (one element, alive for the call);
    // the addresses are in the other process and are checked by the kernel.
    let r = unsafe { libc::syscall(libc::SYS_process_madvise, pidfd, &iov, 1, MADV_COLLAPSE, 0) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// The 2 MiB-aligned parts of the process's huge-page guest RAM regions, and whether any of
/// them is still registered for userfaultfd write-protection (QEMU has not finished cleaning
/// up the snapshot; a collapse would be refused).
fn regions(pid: u32) -> std::io::Result<(Vec<(u64, u64)>, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(parse_smaps(&text))
}

fn parse_smaps(text: &str) -> (Vec<(u64, u64)>, bool) {
    let mut out = Vec::new();
    let mut armed = false;
    let mut current: Option<(u64, u64)> = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let flags: Vec<&str> = flags.split_whitespace().collect();
            if let Some((s, e)) = current.take() {
                if flags.contains(&"hg") && !flags.contains(&"ex") {
                    armed |= flags.contains(&"uw");
                    let (s, e) = (s.div_ceil(HUGE) * HUGE, e / HUGE * HUGE);
                    if e > s {
                        out.push((s, e));
                    }
                }
            }
            continue;
        }
        if let Some(range) = vma_header(line) {
            current = Some(range);
        }
    }
    (out, armed)
}

/// `start-end perms offset dev inode [path]` of a private anonymous read-write mapping.
fn vma_header(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    let (range, perms) = (f.next()?, f.next()?);
    let (_offset, _dev, _inode) = (f.next()?, f.next()?, f.next()?);
    let (s, e) = range.split_once('-')?;
    let (s, e) = (
        u64::from_str_radix(s, 16).ok()?,
        u64::from_str_radix(e, 16).ok()?,
    );
    (perms == "rw-p" && f.next().is_none()).then_some((s, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0200000 r-xp 00000000 fd:01 123 /usr/bin/qemu-system-x86_64
Size: 2048 kB
VmFlags: rd ex mr mw me
7f48cbe00000-7f490be00000 rw-p 00000000 00:00 0
Size: 1048576 kB
AnonHugePages: 53248 kB
VmFlags: rd wr mr mw me ac hg mg
7f4914000000-7f4953fff000 rwxp 00000000 00:00 0
VmFlags: rd wr ex mr mw me ac hg
7f4960100000-7f4960500000 rw-p 00000000 00:00 0
VmFlags: rd wr mr mw me ac
7f4970100000-7f4970500000 rw-s 00000000 00:01 77 /memfd:ram (deleted)
VmFlags: rd wr sh mr mw me hg
7f4980100000-7f4980500000 rw-p 00000000 00:00 0
VmFlags: rd wr mr mw me ac hg uw
";

    #[test]
    fn guest_ram_regions_only_aligned_and_armed_seen() {
        let (regions, armed) = parse_smaps(SMAPS);
        assert_eq!(
            regions,
            vec![
                (0x7f48cbe00000, 0x7f490be00000),
                // 0x7f4980100000.. rounded in to 2 MiB boundaries
                (0x7f4980200000, 0x7f4980400000),
            ]
        );
        assert!(armed);
        let (_, armed) = parse_smaps(&SMAPS.replace(" uw", ""));
        assert!(!armed);
    }

    #[test]
    fn a_missing_process_is_a_refusal_not_an_error() {
        let r = collapse(u32::MAX >> 1);
        assert!(r.refused.is_some());
        assert_eq!(r.collapsed, 0);
    }
}
