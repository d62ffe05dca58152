//! `vmkeep recover --libvirt`: a libvirt restore point running again as a libvirt domain.
//!
//! The domain XML recorded with the restore point is rewritten for the new place
//! ([`rewrite_domain`]) and defined; then the domain is started (cold), or, when the restore
//! point has memory, restored from a libvirt save image that vmkeep writes on the fly into a
//! FIFO ([`restore_streamed`]): libvirt's header, the running definition, then the migration
//! stream from the repository. libvirt reads a save image sequentially, so no temporary copy
//! of the guest's RAM is ever written to disk; libvirt starts QEMU with `-incoming`, feeds it
//! the stream, and resumes the guest, which libvirt then manages like any other.
//!
//! What the rewrite changes, and why:
//! - `<name>` (the chosen one) and `<uuid>` (kept unless libvirt already has it);
//! - each backed-up disk becomes the restored qcow2 file (`type='file'`, driver `qcow2`, no
//!   backing chain); other disks (CD-ROMs, read-only images) are kept as they were;
//! - chardevs written to files (serial console logs) and bound unix sockets move into the
//!   target folder, so the copy never writes the original's files;
//! - unless `network`: every NIC stays (the memory state names each device) with its model,
//!   MAC and address, but attached to nothing (`type='ethernet'`, a tap libvirt creates on no
//!   bridge; a `user` NIC stays `user`), and its link down;
//! - `domain_type` (`qemu` for TCG, `kvm`) when asked;
//! - with `console_to_file` (a sandbox): serial ports and consoles on a pseudo-terminal write
//!   to a file in the target folder instead;
//! - `<nvram>` moves into the target folder (libvirt fills it from its template: the NVRAM
//!   contents are not part of a restore point).
//!
//! Kernel, initrd and firmware paths are kept: they must exist on the recovering host.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::capture::libvirt::xml::{attr, child, parse};
use crate::capture::libvirt::Virsh;
use crate::error::{Error, Result};

/// The new place of a recovered domain.
#[derive(Clone, Debug)]
pub struct LibvirtRecovery {
    pub name: String,
    /// Kept when Some; libvirt makes one when None.
    pub uuid: Option<String>,
    /// The target folder (disks, logs, sockets, NVRAM).
    pub dir: PathBuf,
    /// Restored image of each backed-up disk, by target name (`vda`).
    pub disks: BTreeMap<String, PathBuf>,
    /// Keep NICs attached as they were.
    pub network: bool,
    /// `<domain type=...>`: `qemu` (TCG) or `kvm`; None keeps the recorded one.
    pub domain_type: Option<String>,
    /// A serial port or console on a pseudo-terminal writes to `dir/serial.log` instead (a
    /// sandbox reads its console from there).
    pub console_to_file: bool,
}

/// Byte-range edits of an XML text, applied back to front (they must not overlap).
#[derive(Default)]
struct Edits(Vec<(Range<usize>, String)>);

impl Edits {
    fn replace(&mut self, r: Range<usize>, with: impl Into<String>) {
        self.0.push((r, with.into()));
    }
    fn insert(&mut self, at: usize, text: impl Into<String>) {
        self.0.push((at..at, text.into()));
    }
    fn apply(mut self, text: &str) -> String {
        self.0
            .sort_by_key(|(r, _)| std::cmp::Reverse((r.start, r.end)));
        let mut out = text.to_string();
        for (r, with) in self.0 {
            out.replace_range(r, &with);
        }
        out
    }
}

/// Where a node's content starts: just after its start tag.
fn content_start(n: roxmltree::Node<'_, '_>, text: &str) -> usize {
    let r = n.range();
    r.start + text[r.clone()].find('>').map(|i| i + 1).unwrap_or(0)
}

/// Replaces a child element whole (or adds it as the first child).
fn set_child(e: &mut Edits, text: &str, parent: roxmltree::Node<'_, '_>, tag: &str, xml: String) {
    match child(parent, tag) {
        Some(c) => e.replace(c.range(), xml),
        None if text[parent.range()].ends_with("/>") => {
            // `<x .../>` has no content to add to: rewrite it as an open element.
            let r = parent.range();
            let head = text[r.clone()].trim_end_matches("/>").to_string();
            e.replace(r, format!("{head}>{xml}</{}>", parent.tag_name().name()));
        }
        None => e.insert(content_start(parent, text), xml),
    }
}

/// Sets an attribute of an element (which must have it, or any attribute at all).
fn set_attr(e: &mut Edits, n: roxmltree::Node<'_, '_>, name: &str, value: &str) {
    match n.attributes().find(|a| a.name() == name) {
        Some(a) => e.replace(a.range_value(), attr(value)),
        None => {
            // After the tag name.
            let at = n.range().start + 1 + n.tag_name().name().len();
            e.insert(at, format!(" {name}='{}'", attr(value)));
        }
    }
}

/// The recorded domain XML for the new place; see the module docs.
pub fn rewrite_domain(xml: &str, r: &LibvirtRecovery) -> Result<String> {
    let doc = parse(xml, "a recorded domain definition")?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(Error::Refused(
            "the restore point's libvirt definition is not a <domain>".into(),
        ));
    }
    let mut e = Edits::default();
    let name = child(root, "name")
        .ok_or_else(|| Error::Refused("the recorded domain definition has no <name>".into()))?;
    e.replace(name.range(), format!("<name>{}</name>", attr(&r.name)));
    match (child(root, "uuid"), &r.uuid) {
        (Some(u), Some(id)) => e.replace(u.range(), format!("<uuid>{}</uuid>", attr(id))),
        (Some(u), None) => e.replace(u.range(), ""),
        (None, Some(id)) => e.insert(name.range().end, format!("<uuid>{}</uuid>", attr(id))),
        (None, None) => {}
    }
    if let Some(t) = &r.domain_type {
        set_attr(&mut e, root, "type", t);
    }
    if let Some(os) = child(root, "os") {
        if let Some(nv) = child(os, "nvram") {
            let path = r.dir.join("nvram.fd").display().to_string();
            let keep: String = nv
                .attributes()
                .filter(|a| a.name() == "template" || a.name() == "format")
                .map(|a| format!(" {}='{}'", a.name(), attr(a.value())))
                .collect();
            e.replace(nv.range(), format!("<nvram{keep}>{}</nvram>", attr(&path)));
        }
    }
    let devices = child(root, "devices");
    let mut chardev_paths: BTreeMap<String, String> = BTreeMap::new();
    for d in devices
        .iter()
        .flat_map(|d| d.children())
        .filter(|c| c.is_element())
    {
        match d.tag_name().name() {
            "disk" => rewrite_disk(&mut e, xml, d, r),
            "serial" | "console"
                if r.console_to_file && d.attribute("type").unwrap_or("pty") == "pty" =>
            {
                console_to_file(&mut e, xml, d, &r.dir, &mut chardev_paths)
            }
            "serial" | "console" | "channel" | "parallel" => {
                rewrite_chardev(&mut e, d, &r.dir, &mut chardev_paths)
            }
            "interface" if !r.network => isolate_nic(&mut e, xml, d),
            _ => {}
        }
    }
    Ok(e.apply(xml))
}

fn rewrite_disk(e: &mut Edits, text: &str, d: roxmltree::Node<'_, '_>, r: &LibvirtRecovery) {
    let Some(target) = child(d, "target").and_then(|t| t.attribute("dev")) else {
        return;
    };
    let Some(image) = r.disks.get(target) else {
        return;
    };
    set_attr(e, d, "type", "file");
    set_child(
        e,
        text,
        d,
        "source",
        format!("<source file='{}'/>", attr(&image.display().to_string())),
    );
    if let Some(drv) = child(d, "driver") {
        set_attr(e, drv, "type", "qcow2");
    }
    for b in d.children().filter(|c| c.has_tag_name("backingStore")) {
        e.replace(b.range(), "");
    }
}

/// A pty serial port or console becomes a file: every one of them the same file, which is
/// `serial.log` unless a file chardev took that name first.
fn console_to_file(
    e: &mut Edits,
    text: &str,
    d: roxmltree::Node<'_, '_>,
    dir: &Path,
    paths: &mut BTreeMap<String, String>,
) {
    let n = paths.len();
    let path = paths
        .entry("\0pty".into())
        .or_insert_with(|| {
            let file = match n {
                0 => "serial.log".to_string(),
                n => format!("chardev-{n}.log"),
            };
            dir.join(file).display().to_string()
        })
        .clone();
    let source = format!("<source path='{}'/>", attr(&path));
    if text[d.range()].ends_with("/>") {
        // Nothing inside to keep: a new element (two edits of one empty element would overlap).
        let tag = d.tag_name().name();
        e.replace(d.range(), format!("<{tag} type='file'>{source}</{tag}>"));
        return;
    }
    set_attr(e, d, "type", "file");
    set_child(e, text, d, "source", source);
}

/// File and bound-socket chardevs move into `dir`; the same original path keeps one new path
/// (a console that mirrors a serial port must stay the same file).
fn rewrite_chardev(
    e: &mut Edits,
    d: roxmltree::Node<'_, '_>,
    dir: &Path,
    paths: &mut BTreeMap<String, String>,
) {
    let kind = d.attribute("type").unwrap_or("");
    let Some(src) = child(d, "source") else {
        return;
    };
    let Some(path) = src.attributes().find(|a| a.name() == "path") else {
        return;
    };
    let new = match kind {
        "file" => {
            let n = paths.len();
            paths
                .entry(path.value().to_string())
                .or_insert_with(|| {
                    let file = if n == 0 {
                        "serial.log".to_string()
                    } else {
                        format!("chardev-{n}.log")
                    };
                    dir.join(file).display().to_string()
                })
                .clone()
        }
        "unix" if src.attribute("mode") == Some("bind") => {
            let base = Path::new(path.value())
                .file_name()
                .map(|b| b.to_string_lossy().into_owned())
                .unwrap_or_else(|| "chardev.sock".into());
            dir.join(base).display().to_string()
        }
        _ => return,
    };
    e.replace(path.range_value(), attr(&new));
}

/// A NIC attached to nothing, link down, device unchanged; see the module docs.
fn isolate_nic(e: &mut Edits, text: &str, n: roxmltree::Node<'_, '_>) {
    const HOST_SIDE: &[&str] = &[
        "source",
        "virtualport",
        "vlan",
        "bandwidth",
        "filterref",
        "target",
        "ip",
        "route",
        "portForward",
        "teaming",
        "tune",
        "coalesce",
        "backend",
    ];
    if n.attribute("type") != Some("user") {
        set_attr(e, n, "type", "ethernet");
        for c in n
            .children()
            .filter(|c| c.is_element() && HOST_SIDE.contains(&c.tag_name().name()))
        {
            e.replace(c.range(), "");
        }
    }
    set_child(e, text, n, "link", "<link state='down'/>".to_string());
}

/// libvirt's save-image header (`virQEMUSaveHeader`, version 2, raw format) and the domain XML
/// that follows it; the migration stream comes right after.
pub fn save_image_header(xml: &str, running: bool) -> Vec<u8> {
    const MAGIC: &[u8; 16] = b"LibvirtQemudSave";
    let data_len = xml.len() as u32 + 1; // the XML and its NUL
    let mut h = Vec::with_capacity(92 + xml.len() + 1);
    h.extend_from_slice(MAGIC);
    for v in [2u32, data_len, running as u32, 0, 0] {
        h.extend_from_slice(&v.to_ne_bytes());
    }
    h.extend_from_slice(&[0u8; 14 * 4]);
    h.extend_from_slice(xml.as_bytes());
    h.push(0);
    h
}

/// `virsh define` of `xml` (written to `dir/domain.xml`); returns the domain's UUID.
pub fn define(virsh: &Virsh, dir: &Path, xml: &str) -> Result<String> {
    let path = dir.join("domain.xml");
    std::fs::write(&path, xml).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    virsh.run(&["define", &path.display().to_string()])?;
    Ok(virsh.domain_cmd("domuuid", &[])?.trim().to_string())
}

/// `virsh restore` of a save image written into a FIFO: `head` (from [`save_image_header`]),
/// then what `write_state` writes (the migration stream). Returns when libvirt has resumed the
/// domain; an error when libvirt or the writer failed (the writer's error first).
pub fn restore_streamed(
    virsh: &Virsh,
    head: Vec<u8>,
    write_state: impl FnOnce(&mut dyn Write) -> std::io::Result<()> + Send,
) -> Result<()> {
    // A directory only root can enter: the FIFO carries the guest's RAM.
    let private = tempfile::Builder::new()
        .prefix("vmkeep-restore-")
        .tempdir()
        .map_err(|e| Error::io("create a private directory for the save image", e))?;
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("make the save image's directory private", e))?;
    let fifo = private.path().join("state.save");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Refused("the temporary path holds a NUL byte".into()))?;
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(Error::io(
            format!("create FIFO {}", fifo.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| -> std::io::Result<()> {
            let Some(mut f) = open_when_read(&fifo, &stop)? else {
                return Ok(()); // libvirt never opened it: its own error says why
            };
            f.write_all(&head)?;
            write_state(&mut f)?;
            f.flush()
        });
        let restored = virsh.run(&["restore", &fifo.display().to_string()]);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the writer panicked")));
        match (written, restored) {
            (Err(e), _) => Err(Error::io("stream the memory state to libvirt", e)),
            (Ok(()), r) => r.map(drop),
        }
    })
}

/// Opens the FIFO for writing once a reader (libvirt) has opened it; None when `stop` is set
/// first. A plain open would block forever if libvirt failed before opening it.
fn open_when_read(
    fifo: &Path,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<Option<std::fs::File>> {
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
        {
            Ok(f) => {
                // Blocking writes from here: QEMU reads at its own pace.
                let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                // SAFETY: fcntl on an fd we own.
                unsafe {
                    let flags = libc::fcntl(fd, libc::F_GETFL);
                    libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
                }
                return Ok(Some(f));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
#[path = "libvirt_tests.rs"]
mod tests;
