//! Pointing a disk's or a boot file's command-line element at its new file.
//!
//! A disk becomes a standalone qcow2 image (that is what the restore writes): its format node
//! becomes `qcow2` with no backing chain, data file or encryption, over a `file` node with the
//! new name. Node names, drive ids and every other option are kept. A boot file keeps its
//! format (it is copied byte for byte); only its file name changes.

use super::super::vmdef::cmdline::CommandLine;
use super::super::vmdef::locate::{
    below_filters, child, driver, protocol_node, NodeAt, Site, FORMATS,
};
use super::super::vmdef::opts::OptValue;
use crate::error::{Error, Result};

/// Members every block node has (QAPI `BlockdevOptionsBase`): kept when a node changes driver.
const GENERAL: &[&str] = &[
    "driver",
    "node-name",
    "discard",
    "cache",
    "read-only",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
];

/// Points the disk defined at `site` at the qcow2 image `image`. Node names that only the old
/// chain used (backing files, data files) are added to `orphans` for the caller to remove.
/// `backed`: the image has a backing file of its own (instant recovery's overlay over the
/// served restore point), which QEMU must open from the image header.
pub(crate) fn place_disk(
    cl: &mut CommandLine,
    site: Site,
    image: &str,
    backed: bool,
    orphans: &mut Vec<String>,
) -> Result<()> {
    match site {
        Site::File(i) => {
            cl.args[i].value = Some(image.to_owned());
            Ok(())
        }
        Site::Drive(i) => {
            let Some(OptValue::KeyVal(mut kv)) = cl.args[i].opts() else {
                return Err(Error::Definition("a -drive without options".into()));
            };
            let was_raw = kv.get("format").or(kv.get("driver")) == Some("raw");
            for key in ["file", "backing", "data-file", "encrypt"] {
                kv.remove(key);
            }
            if was_raw {
                kv.remove("offset");
                kv.remove("size");
            }
            kv.set("file", image);
            if kv.get("driver").is_some() {
                kv.set("driver", "qcow2");
            } else {
                kv.set("format", "qcow2");
            }
            cl.args[i].set_opts(&OptValue::KeyVal(kv));
            Ok(())
        }
        Site::Blockdev(i) => {
            let fmt = below_filters(cl, NodeAt::top(i))
                .ok_or_else(|| chain_error(cl, i, "its filter chain does not end"))?;
            let fmt_driver = driver(cl, &fmt).unwrap_or_default();
            if !FORMATS.contains(&fmt_driver.as_str()) {
                // The device sits on a bare protocol node: make it a qcow2 node over a file.
                edit(cl, fmt.arg, |o| {
                    o.retain_members(&fmt.prefix, |k| GENERAL.contains(&k));
                    o.set(&fmt.key("driver"), "qcow2");
                    o.set(&fmt.key("file.driver"), "file");
                    o.set(&fmt.key("file.filename"), image);
                });
                return Ok(());
            }
            let below = child(cl, &fmt, "file");
            edit(cl, fmt.arg, |o| {
                for key in ["data-file", "backing"] {
                    let path = fmt.key(key);
                    if let Some(name) = o.get(&path) {
                        orphans.push(name);
                    }
                    o.remove(&path);
                }
                o.remove(&fmt.key("encrypt"));
                if fmt_driver != "qcow2" {
                    o.retain_members(&fmt.prefix, |k| GENERAL.contains(&k) || k == "file");
                    o.set(&fmt.key("driver"), "qcow2");
                }
                // A restored image has no backing file; say so, or QEMU would look for one.
                // An instant recovery's overlay has one, named in its header: leave it unset.
                if !backed {
                    o.set_null(&fmt.key("backing"));
                }
            });
            match below {
                Some(p) => place_file_node(cl, &p, image),
                None => {
                    // `file` names a node that is not on the command line: give it an inline one.
                    if let Some(name) = cl.args[fmt.arg]
                        .opts()
                        .and_then(|o| o.get(&fmt.key("file")))
                    {
                        orphans.push(name);
                    }
                    edit(cl, fmt.arg, |o| {
                        o.set(&fmt.key("file.driver"), "file");
                        o.set(&fmt.key("file.filename"), image);
                    });
                }
            }
            Ok(())
        }
    }
}

/// Points the boot file defined at `site` at `file`, keeping its format.
pub(crate) fn place_boot(cl: &mut CommandLine, site: Site, file: &str) -> Result<()> {
    match site {
        Site::File(i) => cl.args[i].value = Some(file.to_owned()),
        Site::Drive(i) => {
            if let Some(OptValue::KeyVal(mut kv)) = cl.args[i].opts() {
                kv.remove("file");
                kv.set("file", file);
                cl.args[i].set_opts(&OptValue::KeyVal(kv));
            }
        }
        Site::Blockdev(i) => {
            let p = protocol_node(cl, NodeAt::top(i))
                .ok_or_else(|| chain_error(cl, i, "no file node under it"))?;
            place_file_node(cl, &p, file);
        }
    }
    Ok(())
}

/// Makes the protocol node at `p` a `file` node reading `path` (a host device or a network
/// protocol becomes a file; only the general members are kept then).
fn place_file_node(cl: &mut CommandLine, p: &NodeAt, path: &str) {
    let is_file = matches!(driver(cl, p).as_deref(), Some("file" | "host_device"));
    edit(cl, p.arg, |o| {
        if !is_file {
            o.retain_members(&p.prefix, |k| GENERAL.contains(&k));
        }
        o.set(&p.key("driver"), "file");
        o.set(&p.key("filename"), path);
    });
}

fn edit(cl: &mut CommandLine, arg: usize, f: impl FnOnce(&mut OptValue)) {
    if let Some(mut o) = cl.args[arg].opts() {
        f(&mut o);
        cl.args[arg].set_opts(&o);
    }
}

fn chain_error(cl: &CommandLine, arg: usize, what: &str) -> Error {
    Error::Definition(format!(
        "cannot rewrite -blockdev {}: {what}",
        cl.args[arg].value.as_deref().unwrap_or_default()
    ))
}

/// Removes the `-blockdev` nodes named in `orphans` that nothing references any more, and then
/// the nodes only they referenced.
pub(crate) fn drop_orphan_nodes(cl: &mut CommandLine, mut orphans: Vec<String>) {
    let mut rounds = 0;
    while let Some(name) = orphans.pop() {
        rounds += 1;
        if rounds > 1000 {
            break; // a silly graph; leaving a node is harmless
        }
        let Some(i) = cl.blockdev(&name) else {
            continue;
        };
        if cl.mentions(&name, i) {
            continue;
        }
        if let Some(o) = cl.args[i].opts() {
            for s in o.strings() {
                if s != name && cl.blockdev(s).is_some() {
                    orphans.push(s.to_owned());
                }
            }
        }
        cl.args.remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(cl: &CommandLine) -> Vec<String> {
        cl.to_argv()
    }

    #[test]
    fn blockdev_pair_keyval() {
        let mut cl = CommandLine::parse(&[
            "-blockdev",
            "driver=file,filename=/old/a.qcow2,node-name=f0,cache.direct=on",
            "-blockdev",
            "driver=qcow2,file=f0,node-name=disk0,discard=unmap",
        ]);
        let mut orphans = vec![];
        place_disk(
            &mut cl,
            Site::Blockdev(1),
            "/new/vd0.qcow2",
            false,
            &mut orphans,
        )
        .unwrap();
        assert!(orphans.is_empty());
        assert_eq!(
            argv(&cl),
            [
                "-blockdev",
                "driver=file,filename=/new/vd0.qcow2,node-name=f0,cache.direct=on",
                "-blockdev",
                "driver=qcow2,file=f0,node-name=disk0,discard=unmap,backing="
            ]
        );
    }

    #[test]
    fn libvirt_chain_with_backing_and_raw_format() {
        let mut cl = CommandLine::parse(&[
            "-blockdev",
            r#"{"driver":"file","filename":"/var/base.qcow2","node-name":"libvirt-2-storage"}"#,
            "-blockdev",
            r#"{"node-name":"libvirt-2-format","driver":"qcow2","file":"libvirt-2-storage","backing":null}"#,
            "-blockdev",
            r#"{"driver":"host_device","filename":"/dev/vg/top","node-name":"libvirt-1-storage","aio":"native"}"#,
            "-blockdev",
            r#"{"node-name":"libvirt-1-format","driver":"raw","offset":4096,"file":"libvirt-1-storage","backing":"libvirt-2-format"}"#,
            "-device",
            r#"{"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk0"}"#,
        ]);
        let mut orphans = vec![];
        place_disk(
            &mut cl,
            Site::Blockdev(3),
            "/new/virtio-disk0.qcow2",
            false,
            &mut orphans,
        )
        .unwrap();
        assert_eq!(orphans, ["libvirt-2-format"]);
        drop_orphan_nodes(&mut cl, orphans);
        assert_eq!(
            argv(&cl),
            [
                "-blockdev",
                r#"{"aio":"native","driver":"file","filename":"/new/virtio-disk0.qcow2","node-name":"libvirt-1-storage"}"#,
                "-blockdev",
                r#"{"backing":null,"driver":"qcow2","file":"libvirt-1-storage","node-name":"libvirt-1-format"}"#,
                "-device",
                r#"{"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk0"}"#,
            ]
        );
    }

    #[test]
    fn inline_children_filters_and_bare_protocols() {
        let mut cl = CommandLine::parse(&[
            "-blockdev",
            "driver=throttle,node-name=top,throttle-group=g,file.driver=qcow2,file.file.driver=nbd,file.file.server.type=unix,file.file.server.path=/s,file.file.export=e",
            "-blockdev",
            "driver=file,filename=/old/raw.img,node-name=bare,locking=off",
        ]);
        let mut orphans = vec![];
        place_disk(
            &mut cl,
            Site::Blockdev(0),
            "/n/a.qcow2",
            false,
            &mut orphans,
        )
        .unwrap();
        place_disk(
            &mut cl,
            Site::Blockdev(1),
            "/n/b.qcow2",
            false,
            &mut orphans,
        )
        .unwrap();
        assert_eq!(
            argv(&cl),
            [
                "-blockdev",
                "driver=throttle,node-name=top,throttle-group=g,file.driver=qcow2,file.file.driver=file,file.backing=,file.file.filename=/n/a.qcow2",
                "-blockdev",
                "driver=qcow2,node-name=bare,file.driver=file,file.filename=/n/b.qcow2",
            ]
        );
    }

    #[test]
    fn drives_and_legacy_options() {
        let mut cl = CommandLine::parse(&[
            "-drive",
            "file=/old/a,,b.img,format=raw,offset=512,if=none,id=drive1,cache=none",
            "-hda",
            "/old/h.qcow2",
            "-drive",
            "if=pflash,format=raw,unit=1,file=/old/VARS.fd",
        ]);
        let mut orphans = vec![];
        place_disk(
            &mut cl,
            Site::Drive(0),
            "/n/drive1.qcow2",
            false,
            &mut orphans,
        )
        .unwrap();
        place_disk(&mut cl, Site::File(1), "/n/ide.qcow2", false, &mut orphans).unwrap();
        place_boot(&mut cl, Site::Drive(2), "/n/boot-pflash1").unwrap();
        assert_eq!(
            argv(&cl),
            [
                "-drive",
                "format=qcow2,if=none,id=drive1,cache=none,file=/n/drive1.qcow2",
                "-hda",
                "/n/ide.qcow2",
                "-drive",
                "if=pflash,format=raw,unit=1,file=/n/boot-pflash1",
            ]
        );
    }

    #[test]
    fn flash_blockdev_keeps_its_format() {
        let mut cl = CommandLine::parse(&[
            "-blockdev",
            r#"{"driver":"file","filename":"/usr/share/OVMF/OVMF_CODE.fd","node-name":"code-file","read-only":true}"#,
            "-blockdev",
            r#"{"driver":"raw","file":"code-file","node-name":"code","read-only":true}"#,
        ]);
        place_boot(&mut cl, Site::Blockdev(1), "/n/boot-pflash0").unwrap();
        assert_eq!(
            cl.args[0].value.as_deref(),
            Some(
                r#"{"driver":"file","filename":"/n/boot-pflash0","node-name":"code-file","read-only":true}"#
            )
        );
        assert_eq!(
            cl.args[1].value.as_deref(),
            Some(r#"{"driver":"raw","file":"code-file","node-name":"code","read-only":true}"#)
        );
    }
}
