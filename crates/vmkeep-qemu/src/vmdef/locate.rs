//! Which command-line element defines a disk or a boot file.
//!
//! A disk is a `-blockdev` tree (found by the root node's name), a `-drive` (by its id, the id
//! QEMU generates for it, or its file), or a legacy file option (`-hda`, `-pflash`). A boot
//! file is the value of `-kernel`, `-initrd`, `-bios`, `-dtb`, or the image of a flash unit
//! (`-drive if=pflash`, `-pflash`, `-machine pflashN=NODE`).

use super::cmdline::CommandLine;
use super::opts::OptValue;
use super::DefinedDisk;

/// Where on the command line something is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Site {
    /// A `-blockdev` (the root node of its tree).
    Blockdev(usize),
    /// A `-drive`.
    Drive(usize),
    /// An option whose whole value is the file (`-kernel`, `-hda`, `-pflash`, ...).
    File(usize),
}

#[cfg(test)]
impl Site {
    pub fn arg(self) -> usize {
        match self {
            Site::Blockdev(i) | Site::Drive(i) | Site::File(i) => i,
        }
    }
}

/// A node inside a `-blockdev` tree: the option's index and the dotted path of the node in it
/// (`""` for the option's own node, `file` for an inline child).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeAt {
    pub arg: usize,
    pub prefix: String,
}

impl NodeAt {
    pub fn top(arg: usize) -> NodeAt {
        NodeAt {
            arg,
            prefix: String::new(),
        }
    }

    /// The dotted path of `key` inside this node.
    pub fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }
}

/// Block drivers that sit above the data without changing it; the disk's format is below.
pub(crate) const FILTERS: &[&str] = &[
    "throttle",
    "copy-on-read",
    "preallocate",
    "compress",
    "blkdebug",
    "copy-before-write",
];

/// Image format drivers (everything else is a protocol: file, host_device, nbd, ...).
pub(crate) const FORMATS: &[&str] = &[
    "qcow2",
    "raw",
    "qcow",
    "vmdk",
    "vpc",
    "vhdx",
    "vdi",
    "qed",
    "parallels",
    "luks",
    "bochs",
    "cloop",
    "dmg",
];

/// Deepest chain followed (a cycle or a silly chain stops here).
const MAX_DEPTH: usize = 16;

pub(crate) fn driver(cl: &CommandLine, node: &NodeAt) -> Option<String> {
    cl.args[node.arg].opts()?.get(&node.key("driver"))
}

/// The child `child` (`file`, `backing`) of `node`: inline, or a reference to another
/// `-blockdev`.
pub(crate) fn child(cl: &CommandLine, node: &NodeAt, child: &str) -> Option<NodeAt> {
    let opts = cl.args[node.arg].opts()?;
    let path = node.key(child);
    if opts.is_inline(&path) {
        return Some(NodeAt {
            arg: node.arg,
            prefix: path,
        });
    }
    let name = opts.get(&path)?;
    cl.blockdev(&name).map(NodeAt::top)
}

/// The first node from `node` down that is not a filter: the disk's format (or protocol,
/// when the device sits on a bare file node).
pub(crate) fn below_filters(cl: &CommandLine, mut node: NodeAt) -> Option<NodeAt> {
    for _ in 0..MAX_DEPTH {
        match driver(cl, &node) {
            Some(d) if FILTERS.contains(&d.as_str()) => node = child(cl, &node, "file")?,
            _ => return Some(node),
        }
    }
    None
}

/// The protocol node holding the data of the tree at `node` (following `file` children).
pub(crate) fn protocol_node(cl: &CommandLine, mut node: NodeAt) -> Option<NodeAt> {
    for _ in 0..MAX_DEPTH {
        let d = driver(cl, &node)?;
        if FILTERS.contains(&d.as_str()) || FORMATS.contains(&d.as_str()) {
            node = child(cl, &node, "file")?;
        } else {
            return Some(node);
        }
    }
    None
}

/// The file name of the tree at `node` (`None` for non-file protocols such as NBD).
fn blockdev_file(cl: &CommandLine, node: NodeAt) -> Option<String> {
    let p = protocol_node(cl, node)?;
    cl.args[p.arg].opts()?.get(&p.key("filename"))
}

/// The image file of a site, as written on the command line.
pub(crate) fn image_of(cl: &CommandLine, site: Site) -> Option<String> {
    match site {
        Site::Blockdev(i) => blockdev_file(cl, NodeAt::top(i)),
        Site::Drive(i) => {
            let o = cl.args[i].opts()?;
            o.get("file").or_else(|| o.get("file.filename"))
        }
        Site::File(i) => cl.args[i].value.clone(),
    }
}

/// One drive as QEMU names it: the option, its interface and the drive id (given or generated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DriveEntry {
    pub site: Site,
    pub interface: String,
    /// The unit within the interface (flash unit for `pflash`).
    pub index: u32,
    pub id: String,
    pub explicit_id: bool,
}

/// Every `-drive` and legacy drive option with its id, as QEMU's `drive_new` would name it
/// (for the interfaces whose naming we know; others keep only their explicit id).
pub(crate) fn drives(cl: &CommandLine) -> Vec<DriveEntry> {
    let mut used: Vec<(String, u32)> = Vec::new();
    let mut out = Vec::new();
    for (i, a) in cl.args.iter().enumerate() {
        let name = a.name.as_deref().unwrap_or_default();
        let (site, interface, explicit_index, media_cd, id) = match name {
            "drive" => {
                let Some(OptValue::KeyVal(kv)) = a.opts() else {
                    continue;
                };
                let interface = kv.get("if").unwrap_or("ide").to_owned();
                let index = kv
                    .get("index")
                    .and_then(|v| v.parse::<u32>().ok())
                    .or_else(|| {
                        let unit = kv.get("unit").and_then(|v| v.parse::<u32>().ok());
                        let bus = kv
                            .get("bus")
                            .and_then(|v| v.parse::<u32>().ok())
                            .unwrap_or(0);
                        unit.and_then(|u| bus.checked_mul(per_bus(&interface))?.checked_add(u))
                    });
                let cd = kv.get("media") == Some("cdrom");
                (
                    Site::Drive(i),
                    interface,
                    index,
                    cd,
                    kv.get("id").map(str::to_owned),
                )
            }
            "hda" | "hdb" | "hdc" | "hdd" => {
                let index = u32::from(name.as_bytes()[2] - b'a');
                (Site::File(i), "ide".to_owned(), Some(index), false, None)
            }
            "cdrom" => (Site::File(i), "ide".to_owned(), Some(2), true, None),
            "pflash" => (Site::File(i), "pflash".to_owned(), None, false, None),
            _ => continue,
        };
        let index = explicit_index.unwrap_or_else(|| {
            (0..)
                .find(|n| !used.iter().any(|(f, u)| *f == interface && u == n))
                .unwrap_or(0)
        });
        used.push((interface.clone(), index));
        let explicit_id = id.is_some();
        let id = id.unwrap_or_else(|| generated_id(&interface, index, media_cd));
        out.push(DriveEntry {
            site,
            interface,
            index,
            id,
            explicit_id,
        });
    }
    out
}

fn per_bus(interface: &str) -> u32 {
    match interface {
        "ide" => 2,
        "scsi" => 7,
        _ => 1,
    }
}

fn generated_id(interface: &str, index: u32, cdrom: bool) -> String {
    let media = if cdrom { "-cd" } else { "-hd" };
    match interface {
        "ide" | "scsi" => {
            let n = per_bus(interface);
            format!("{interface}{}{media}{}", index / n, index % n)
        }
        other => format!("{other}{index}"),
    }
}

/// The element defining `disk` (see the module docs), if any.
pub(crate) fn disk_site(cl: &CommandLine, disk: &DefinedDisk) -> Option<Site> {
    match disk.drive_id.as_deref() {
        None => cl.blockdev(&disk.node).map(Site::Blockdev),
        Some(id) => {
            let all = drives(cl);
            all.iter()
                .find(|d| d.id == id)
                .or_else(|| {
                    all.iter()
                        .filter(|d| !d.explicit_id)
                        .find(|d| image_of(cl, d.site).as_deref() == Some(disk.file.as_str()))
                })
                .map(|d| d.site)
        }
    }
}

/// A boot file's role and where it is defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BootSite {
    pub role: String,
    pub site: Site,
}

/// The boot files of a command line; elements in `disk_sites` are disks, not boot files.
pub(crate) fn boot_sites(cl: &CommandLine, disk_sites: &[Site]) -> Vec<BootSite> {
    let mut out = Vec::new();
    for role in ["kernel", "initrd", "bios", "dtb"] {
        if let Some(i) = cl.find(role).into_iter().next_back() {
            if cl.args[i].value.is_some() {
                out.push(BootSite {
                    role: role.to_owned(),
                    site: Site::File(i),
                });
            }
        }
    }
    for d in drives(cl).into_iter().filter(|d| d.interface == "pflash") {
        if !disk_sites.contains(&d.site) && image_of(cl, d.site).is_some() {
            out.push(BootSite {
                role: format!("pflash{}", d.index),
                site: d.site,
            });
        }
    }
    // -machine pflash0=NODE: the flash unit is a -blockdev tree.
    for i in cl.find("machine") {
        let Some(opts) = cl.args[i].opts() else {
            continue;
        };
        for unit in 0..2 {
            let role = format!("pflash{unit}");
            let Some(node) = opts.get(&role) else {
                continue;
            };
            let Some(arg) = cl.blockdev(&node) else {
                continue;
            };
            let site = Site::Blockdev(arg);
            if disk_sites.contains(&site) || out.iter().any(|b: &BootSite| b.role == role) {
                continue;
            }
            if image_of(cl, site).is_some() {
                out.push(BootSite { role, site });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cl(words: &[&str]) -> CommandLine {
        CommandLine::parse(words)
    }

    fn disk(node: &str, drive_id: Option<&str>, file: &str) -> DefinedDisk {
        DefinedDisk {
            name: "d".into(),
            node: node.into(),
            drive_id: drive_id.map(Into::into),
            qdev: None,
            device_id: None,
            format: "qcow2".into(),
            file: file.into(),
            image: None,
            size: 0,
            on_command_line: false,
        }
    }

    #[test]
    fn blockdev_chains_in_both_forms() {
        let c = cl(&[
            "-blockdev",
            "driver=file,filename=/a,,b.qcow2,node-name=f0",
            "-blockdev",
            "driver=qcow2,file=f0,node-name=disk0",
            "-blockdev",
            r#"{"driver":"throttle","node-name":"top","throttle-group":"g","file":{"driver":"qcow2","node-name":"fmt","file":{"driver":"host_device","filename":"/dev/vg/lv"}}}"#,
            "-blockdev",
            "driver=raw,node-name=r,file.driver=nbd,file.server.type=unix,file.server.path=/s",
        ]);
        let d0 = disk_site(&c, &disk("disk0", None, "x")).unwrap();
        assert_eq!(d0, Site::Blockdev(1));
        assert_eq!(image_of(&c, d0).as_deref(), Some("/a,b.qcow2"));
        let top = disk_site(&c, &disk("top", None, "x")).unwrap();
        assert_eq!(image_of(&c, top).as_deref(), Some("/dev/vg/lv"));
        let fmt = below_filters(&c, NodeAt::top(top.arg())).unwrap();
        assert_eq!(fmt.prefix, "file");
        assert_eq!(
            protocol_node(&c, NodeAt::top(top.arg())).unwrap().prefix,
            "file.file"
        );
        let r = disk_site(&c, &disk("r", None, "x")).unwrap();
        assert_eq!(image_of(&c, r), None);
        assert_eq!(disk_site(&c, &disk("missing", None, "x")), None);
    }

    #[test]
    fn a_cycle_ends() {
        let c = cl(&[
            "-blockdev",
            "driver=qcow2,node-name=a,file=b",
            "-blockdev",
            "driver=qcow2,node-name=b,file=a",
        ]);
        assert_eq!(image_of(&c, Site::Blockdev(0)), None);
    }

    #[test]
    fn drive_ids_as_qemu_generates_them() {
        let c = cl(&[
            "-drive",
            "file=v.qcow2,if=virtio",
            "-hda",
            "h.img",
            "-drive",
            "file=n.qcow2,if=none,id=drive1",
            "-drive",
            "if=pflash,format=raw,readonly=on,file=/code.fd",
            "-pflash",
            "/vars.fd",
            "-drive",
            "file=v2.qcow2,if=virtio",
            "-cdrom",
            "x.iso",
            "-drive",
            "file=i.qcow2",
        ]);
        let ids: Vec<_> = drives(&c).into_iter().map(|d| d.id).collect();
        assert_eq!(
            ids,
            [
                "virtio0", "ide0-hd0", "drive1", "pflash0", "pflash1", "virtio1", "ide1-cd0",
                "ide0-hd1"
            ]
        );
        assert_eq!(
            disk_site(&c, &disk("#block1", Some("virtio1"), "v2.qcow2")),
            Some(Site::Drive(5))
        );
        // An id we cannot predict: found by its file.
        assert_eq!(
            disk_site(&c, &disk("#block1", Some("sd0"), "v.qcow2")),
            Some(Site::Drive(0))
        );
        // The writable flash is a disk; the code flash is a boot file.
        let vars = disk_site(&c, &disk("#b", Some("pflash1"), "/vars.fd")).unwrap();
        let boot = boot_sites(&c, &[vars]);
        assert_eq!(
            boot,
            [BootSite {
                role: "pflash0".into(),
                site: Site::Drive(3)
            }]
        );
    }

    #[test]
    fn boot_files_of_every_kind() {
        let c = cl(&[
            "-kernel",
            "old",
            "-kernel",
            "vmlinuz",
            "-initrd",
            "initrd.gz",
            "-bios",
            "/b.bin",
            "-dtb",
            "x.dtb",
            "-blockdev",
            r#"{"driver":"file","filename":"/OVMF_CODE.fd","node-name":"code-file","read-only":true}"#,
            "-blockdev",
            r#"{"driver":"raw","file":"code-file","node-name":"code","read-only":true}"#,
            "-machine",
            "q35,pflash0=code,pflash1=vars",
            "-blockdev",
            "driver=file,filename=/VARS.fd,node-name=vars",
        ]);
        let boot = boot_sites(&c, &[Site::Blockdev(8)]);
        let roles: Vec<_> = boot
            .iter()
            .map(|b| (b.role.as_str(), image_of(&c, b.site).unwrap()))
            .collect();
        assert_eq!(
            roles,
            [
                ("kernel", "vmlinuz".to_owned()),
                ("initrd", "initrd.gz".to_owned()),
                ("bios", "/b.bin".to_owned()),
                ("dtb", "x.dtb".to_owned()),
                ("pflash0", "/OVMF_CODE.fd".to_owned()),
            ]
        );
    }
}
