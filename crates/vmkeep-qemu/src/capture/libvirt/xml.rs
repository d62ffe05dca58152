//! The libvirt XML vmkeep reads (a domain, a checkpoint, a running backup job) and writes (a
//! pull-mode backup and its checkpoint). Input is libvirt's, parsed with roxmltree; anything
//! missing or malformed is an error naming what, never a panic.

use crate::error::{Error, Result};

/// What a capture needs to know about a running domain (`virsh dumpxml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub uuid: String,
    pub disks: Vec<DomainDisk>,
    /// The user and group QEMU runs as (the DAC label, `+UID:+GID`), when libvirt says.
    pub qemu_user: Option<(u32, u32)>,
    /// The domain has a guest agent channel (`org.qemu.guest_agent.0`).
    pub agent: bool,
}

/// One `<disk>` of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainDisk {
    /// The target device name (`vda`): libvirt's name for the disk, and vmkeep's.
    pub target: String,
    /// `disk`, `cdrom`, `floppy` or `lun`.
    pub device: String,
    /// `file`, `block`, `network`, `volume`.
    pub kind: String,
    /// The image file, block device, or network name; None for an empty drive.
    pub source: Option<String>,
    /// The driver's format (`qcow2`, `raw`).
    pub format: Option<String>,
    pub readonly: bool,
}

impl DomainDisk {
    /// Whether vmkeep backs this disk up: a writable disk with a medium. CD-ROMs, floppies,
    /// read-only and empty drives are left out (libvirt cannot checkpoint them either).
    pub fn backed_up(&self) -> bool {
        self.device == "disk" && !self.readonly && self.source.is_some()
    }

    /// Why [`backed_up`](Self::backed_up) is false, for the log.
    pub fn skipped_because(&self) -> &'static str {
        if self.device != "disk" {
            "not a disk (a CD-ROM, floppy or LUN)"
        } else if self.readonly {
            "read-only"
        } else {
            "no medium"
        }
    }
}

pub(crate) fn parse<'x>(xml: &'x str, what: &str) -> Result<roxmltree::Document<'x>> {
    roxmltree::Document::parse(xml)
        .map_err(|e| Error::Refused(format!("libvirt returned {what} that is not XML: {e}")))
}

pub(crate) fn child<'a, 'i>(
    n: roxmltree::Node<'a, 'i>,
    tag: &str,
) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

fn child_text(n: roxmltree::Node<'_, '_>, tag: &str) -> Option<String> {
    child(n, tag)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
}

/// Parses `virsh dumpxml` of a domain.
pub fn parse_domain(xml: &str) -> Result<Domain> {
    let doc = parse(xml, "a domain definition")?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(Error::Refused(format!(
            "libvirt returned <{}> where a <domain> was expected",
            root.tag_name().name()
        )));
    }
    let name = child_text(root, "name")
        .ok_or_else(|| Error::Refused("the domain definition has no <name>".into()))?;
    let uuid = child_text(root, "uuid")
        .ok_or_else(|| Error::Refused("the domain definition has no <uuid>".into()))?;
    let mut disks = Vec::new();
    let mut agent = false;
    if let Some(devices) = child(root, "devices") {
        for d in devices.children().filter(|c| c.has_tag_name("disk")) {
            let target = child(d, "target")
                .and_then(|t| t.attribute("dev"))
                .ok_or_else(|| Error::Refused(format!("domain {name}: a <disk> has no target")))?
                .to_string();
            let source = child(d, "source").and_then(|s| {
                s.attribute("file")
                    .or_else(|| s.attribute("dev"))
                    .or_else(|| s.attribute("name"))
                    .or_else(|| s.attribute("volume"))
                    .map(str::to_string)
            });
            disks.push(DomainDisk {
                target,
                device: d.attribute("device").unwrap_or("disk").to_string(),
                kind: d.attribute("type").unwrap_or("file").to_string(),
                source,
                format: child(d, "driver")
                    .and_then(|x| x.attribute("type"))
                    .map(str::to_string),
                readonly: child(d, "readonly").is_some(),
            });
        }
        agent = devices
            .children()
            .filter(|c| c.has_tag_name("channel"))
            .filter_map(|c| child(c, "target"))
            .any(|t| t.attribute("name") == Some("org.qemu.guest_agent.0"));
    }
    let qemu_user = root
        .children()
        .filter(|c| c.has_tag_name("seclabel") && c.attribute("model") == Some("dac"))
        .find_map(|c| child_text(c, "label"))
        .and_then(|l: String| parse_dac_label(&l));
    Ok(Domain {
        name,
        uuid,
        disks,
        qemu_user,
        agent,
    })
}

/// `+64055:+64055` to (64055, 64055). Named labels (`libvirt-qemu:kvm`) give None.
fn parse_dac_label(label: &str) -> Option<(u32, u32)> {
    let (u, g) = label.split_once(':')?;
    Some((
        u.strip_prefix('+')?.parse().ok()?,
        g.strip_prefix('+')?.parse().ok()?,
    ))
}

/// A checkpoint (`virsh checkpoint-dumpxml --no-domain`): its name, its parent, and the disks
/// it holds a bitmap for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub name: String,
    pub parent: Option<String>,
    pub bitmap_disks: Vec<String>,
}

pub fn parse_checkpoint(xml: &str) -> Result<CheckpointInfo> {
    let doc = parse(xml, "a checkpoint")?;
    let root = doc.root_element();
    let name = child_text(root, "name")
        .ok_or_else(|| Error::Refused("a libvirt checkpoint has no <name>".into()))?;
    let parent = child(root, "parent").and_then(|p| child_text(p, "name"));
    let bitmap_disks = child(root, "disks")
        .map(|ds| {
            ds.children()
                .filter(|d| d.has_tag_name("disk") && d.attribute("checkpoint") == Some("bitmap"))
                .filter_map(|d| d.attribute("name").map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(CheckpointInfo {
        name,
        parent,
        bitmap_disks,
    })
}

/// The bytes changed since a checkpoint, summed over its disks (`checkpoint-dumpxml --size`
/// gives each disk's `size`).
pub fn checkpoint_size(xml: &str) -> Result<u64> {
    let doc = parse(xml, "a checkpoint")?;
    let disks = child(doc.root_element(), "disks");
    Ok(disks
        .into_iter()
        .flat_map(|ds| ds.children())
        .filter(|d| d.has_tag_name("disk"))
        .filter_map(|d| d.attribute("size").and_then(|s| s.parse::<u64>().ok()))
        .sum())
}

/// A running backup job (`virsh backup-dumpxml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupJob {
    pub mode: String,
    /// The NBD server's unix socket (pull mode over a socket).
    pub socket: Option<String>,
    /// (disk, export name, export bitmap) of every disk backed up.
    pub exports: Vec<(String, String, Option<String>)>,
}

pub fn parse_backup_job(xml: &str) -> Result<BackupJob> {
    let doc = parse(xml, "a backup job")?;
    let root = doc.root_element();
    let socket = child(root, "server")
        .and_then(|s| s.attribute("socket"))
        .map(str::to_string);
    let exports = child(root, "disks")
        .map(|ds| {
            ds.children()
                .filter(|d| d.has_tag_name("disk") && d.attribute("backup") != Some("no"))
                .filter_map(|d| {
                    let name = d.attribute("name")?.to_string();
                    let export = d.attribute("exportname").unwrap_or(&name).to_string();
                    Some((
                        name,
                        export,
                        d.attribute("exportbitmap").map(str::to_string),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(BackupJob {
        mode: root.attribute("mode").unwrap_or("push").to_string(),
        socket,
        exports,
    })
}

/// XML attribute text with the five special characters escaped.
pub(crate) fn attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// How one disk takes part in a backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskBackup {
    /// Every block, with a scratch file for the copy-before-write.
    Full { scratch: String },
    /// The blocks changed since the checkpoint.
    Incremental { since: String, scratch: String },
    /// Not part of the backup (nor of the new checkpoint).
    Skip,
}

/// A pull-mode `<domainbackup>` over the unix socket `socket`.
pub fn backup_xml(socket: &str, disks: &[(String, DiskBackup)]) -> String {
    let mut x = format!(
        "<domainbackup mode='pull'>\n  <server transport='unix' socket='{}'/>\n  <disks>\n",
        attr(socket)
    );
    for (name, how) in disks {
        let line = match how {
            DiskBackup::Skip => format!("    <disk name='{}' backup='no'/>\n", attr(name)),
            DiskBackup::Full { scratch } => format!(
                "    <disk name='{}' backup='yes' type='file' backupmode='full'><scratch file='{}'/></disk>\n",
                attr(name),
                attr(scratch)
            ),
            DiskBackup::Incremental { since, scratch } => format!(
                "    <disk name='{}' backup='yes' type='file' backupmode='incremental' incremental='{}'><scratch file='{}'/></disk>\n",
                attr(name),
                attr(since),
                attr(scratch)
            ),
        };
        x.push_str(&line);
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    x
}

/// The `<domaincheckpoint>` created with a backup: a bitmap for each disk backed up.
pub fn checkpoint_xml(name: &str, description: &str, disks: &[(String, bool)]) -> String {
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <description>{}</description>\n  <disks>\n",
        attr(name),
        attr(description)
    );
    for (disk, bitmap) in disks {
        x.push_str(&format!(
            "    <disk name='{}' checkpoint='{}'/>\n",
            attr(disk),
            if *bitmap { "bitmap" } else { "no" }
        ));
    }
    x.push_str("  </disks>\n</domaincheckpoint>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='qemu' id='3'>
  <name>web1</name>
  <uuid>df74d98d-ae38-41bf-8f1c-0db13352ff83</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/a&amp;b.qcow2' index='2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label>
  </seclabel>
</domain>"#;

    #[test]
    fn a_domain_gives_its_disks_user_and_agent() {
        let d = parse_domain(DOMAIN).unwrap();
        assert_eq!(d.name, "web1");
        assert_eq!(d.qemu_user, Some((64055, 64055)));
        assert!(d.agent);
        let kept: Vec<_> = d.disks.iter().filter(|d| d.backed_up()).collect();
        assert_eq!(kept.len(), 2);
        assert_eq!(
            kept[0].source.as_deref(),
            Some("/var/lib/libvirt/images/a&b.qcow2")
        );
        assert_eq!(kept[1].kind, "block");
        assert_eq!(
            d.disks[2].skipped_because(),
            "not a disk (a CD-ROM, floppy or LUN)"
        );
    }

    #[test]
    fn bad_xml_is_an_error_not_a_panic() {
        assert!(parse_domain("<domain><name>x</name>").is_err());
        assert!(parse_domain("<network/>").is_err());
        assert!(parse_domain("<domain><name>x</name></domain>").is_err());
        assert!(parse_checkpoint("<domaincheckpoint/>").is_err());
        assert!(parse_backup_job("not xml").is_err());
        assert_eq!(parse_dac_label("libvirt-qemu:kvm"), None);
    }

    #[test]
    fn checkpoints_and_jobs_parse() {
        let c = parse_checkpoint(
            "<domaincheckpoint><name>vmkeep-ab-2</name><parent><name>vmkeep-ab-1</name></parent>\
             <disks><disk name='vda' checkpoint='bitmap' bitmap='vmkeep-ab-2'/><disk name='sda' checkpoint='no'/></disks></domaincheckpoint>",
        )
        .unwrap();
        assert_eq!(c.parent.as_deref(), Some("vmkeep-ab-1"));
        let sized = "<domaincheckpoint><name>c</name><disks><disk name='vda' checkpoint='bitmap' size='65536'/>\
                     <disk name='vdb' checkpoint='bitmap' size='131072'/></disks></domaincheckpoint>";
        assert_eq!(checkpoint_size(sized).unwrap(), 196608);
        assert_eq!(c.bitmap_disks, vec!["vda".to_string()]);
        let j = parse_backup_job(
            "<domainbackup mode='pull'><server transport='unix' socket='/tmp/x/nbd.sock'/><disks>\
             <disk name='vda' backup='yes' exportname='vda' exportbitmap='backup-vda'/><disk name='sda' backup='no'/></disks></domainbackup>",
        )
        .unwrap();
        assert_eq!(j.socket.as_deref(), Some("/tmp/x/nbd.sock"));
        assert_eq!(
            j.exports,
            vec![("vda".into(), "vda".into(), Some("backup-vda".into()))]
        );
    }

    #[test]
    fn written_xml_escapes_and_round_trips() {
        let x = backup_xml(
            "/tmp/it's/nbd.sock",
            &[
                (
                    "vda".into(),
                    DiskBackup::Incremental {
                        since: "vmkeep-ab-1".into(),
                        scratch: "/tmp/it's/vda".into(),
                    },
                ),
                ("sda".into(), DiskBackup::Skip),
            ],
        );
        let j = parse_backup_job(&x).unwrap();
        assert_eq!(j.socket.as_deref(), Some("/tmp/it's/nbd.sock"));
        assert_eq!(j.exports.len(), 1);
        let c = checkpoint_xml(
            "vmkeep-ab-2",
            "a<b",
            &[("vda".into(), true), ("sda".into(), false)],
        );
        let c = parse_checkpoint(&c).unwrap();
        assert_eq!(c.bitmap_disks, vec!["vda".to_string()]);
    }
}
