use super::*;

/// Shaped like `virsh dumpxml --migratable` of a libvirt 9.0 domain.
const RUNNING: &str = r#"<domain type='kvm'>
  <name>web1</name>
  <uuid>5f0c4c0e-1b7e-4f58-9a53-0c3bb3f3a001</uuid>
  <memory unit='KiB'>131072</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-10.0'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg/web1-root' index='2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source bridge='br0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <interface type='user'>
      <mac address='52:54:00:aa:bb:cd'/>
      <model type='e1000'/>
      <link state='up'/>
    </interface>
    <serial type='file'>
      <source path='/var/log/web1/serial.log'/>
      <target type='isa-serial' port='0'/>
    </serial>
    <console type='file'>
      <source path='/var/log/web1/serial.log'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/run/web1/agent.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>"#;

fn recovery() -> LibvirtRecovery {
    LibvirtRecovery {
        name: "web1-dr".into(),
        uuid: None,
        dir: "/srv/dr/web1".into(),
        disks: [("vda".to_string(), PathBuf::from("/srv/dr/web1/vda.qcow2"))].into(),
        network: false,
        domain_type: Some("qemu".into()),
        console_to_file: false,
    }
}

#[test]
fn the_definition_moves_to_the_new_place() {
    let out = rewrite_domain(RUNNING, &recovery()).unwrap();
    let doc = roxmltree::Document::parse(&out).expect("still XML");
    let root = doc.root_element();
    assert_eq!(root.attribute("type"), Some("qemu"));
    assert_eq!(child(root, "name").unwrap().text(), Some("web1-dr"));
    assert!(child(root, "uuid").is_none(), "{out}");
    let nvram = child(child(root, "os").unwrap(), "nvram").unwrap();
    assert_eq!(nvram.text(), Some("/srv/dr/web1/nvram.fd"));
    assert_eq!(
        nvram.attribute("template"),
        Some("/usr/share/OVMF/OVMF_VARS.fd")
    );
    let devices = child(root, "devices").unwrap();
    let disks: Vec<_> = devices
        .children()
        .filter(|c| c.has_tag_name("disk"))
        .collect();
    // The backed-up disk is the restored qcow2, its address and cache kept.
    assert_eq!(disks[0].attribute("type"), Some("file"));
    let src = child(disks[0], "source").unwrap();
    assert_eq!(src.attribute("file"), Some("/srv/dr/web1/vda.qcow2"));
    assert_eq!(src.attribute("dev"), None);
    let drv = child(disks[0], "driver").unwrap();
    assert_eq!(
        (drv.attribute("type"), drv.attribute("cache")),
        (Some("qcow2"), Some("none"))
    );
    assert!(child(disks[0], "backingStore").is_none());
    assert_eq!(
        child(disks[0], "address").unwrap().attribute("bus"),
        Some("0x04")
    );
    // The CD-ROM was not backed up: unchanged.
    assert_eq!(
        child(disks[1], "source").unwrap().attribute("file"),
        Some("/iso/install.iso")
    );
    // NICs: the same devices, attached to nothing, links down.
    let nics: Vec<_> = devices
        .children()
        .filter(|c| c.has_tag_name("interface"))
        .collect();
    assert_eq!(nics[0].attribute("type"), Some("ethernet"));
    assert!(child(nics[0], "source").is_none() && child(nics[0], "target").is_none());
    assert_eq!(
        child(nics[0], "mac").unwrap().attribute("address"),
        Some("52:54:00:aa:bb:cc")
    );
    assert_eq!(
        child(nics[0], "address").unwrap().attribute("bus"),
        Some("0x01")
    );
    assert_eq!(nics[1].attribute("type"), Some("user"));
    for n in &nics {
        assert_eq!(child(*n, "link").unwrap().attribute("state"), Some("down"));
    }
    // Serial and its mirroring console share one new file; the agent socket moved too.
    let path_of = |tag: &str| {
        let n = devices.children().find(|c| c.has_tag_name(tag)).unwrap();
        child(n, "source")
            .unwrap()
            .attribute("path")
            .unwrap()
            .to_string()
    };
    assert_eq!(path_of("serial"), "/srv/dr/web1/serial.log");
    assert_eq!(path_of("console"), "/srv/dr/web1/serial.log");
    assert_eq!(path_of("channel"), "/srv/dr/web1/agent.sock");
}

#[test]
fn a_kept_uuid_and_network_stay() {
    let mut r = recovery();
    r.uuid = Some("5f0c4c0e-1b7e-4f58-9a53-0c3bb3f3a001".into());
    r.network = true;
    r.domain_type = None;
    let out = rewrite_domain(RUNNING, &r).unwrap();
    let doc = roxmltree::Document::parse(&out).unwrap();
    let root = doc.root_element();
    assert_eq!(root.attribute("type"), Some("kvm"));
    assert_eq!(
        child(root, "uuid").unwrap().text(),
        Some("5f0c4c0e-1b7e-4f58-9a53-0c3bb3f3a001")
    );
    assert!(out.contains("<source bridge='br0'/>"), "{out}");
    assert!(out.contains("<link state='up'/>"), "{out}");
}

#[test]
fn names_are_escaped_and_garbage_refused() {
    let mut r = recovery();
    r.name = "a<b>'c".into();
    let out = rewrite_domain(RUNNING, &r).unwrap();
    let doc = roxmltree::Document::parse(&out).unwrap();
    assert_eq!(
        child(doc.root_element(), "name").unwrap().text(),
        Some("a<b>'c")
    );
    assert!(rewrite_domain("<x/>", &r).is_err());
    assert!(rewrite_domain("not xml", &r).is_err());
}

#[test]
fn the_save_header_is_libvirts() {
    let h = save_image_header("<domain/>", true);
    assert_eq!(&h[..16], b"LibvirtQemudSave");
    let word = |i: usize| u32::from_ne_bytes(h[16 + 4 * i..20 + 4 * i].try_into().unwrap());
    // version 2, data_len (XML and NUL), was_running, raw format, no cookie
    assert_eq!(
        (word(0), word(1), word(2), word(3), word(4)),
        (2, 10, 1, 0, 0)
    );
    assert_eq!(h.len(), 92 + 10);
    assert_eq!(&h[92..], b"<domain/>\0");
}

#[test]
fn a_sandbox_reads_a_pty_console_from_a_file() {
    let pty = RUNNING
        .replace(
            "<serial type='file'>\n      <source path='/var/log/web1/serial.log'/>",
            "<serial type='pty'>\n      <source path='/dev/pts/3'/>",
        )
        .replace(
            "<console type='file'>\n      <source path='/var/log/web1/serial.log'/>",
            "<console type='pty' tty='/dev/pts/3'>",
        )
        .replace("</devices>", "<serial type='pty'/></devices>");
    assert!(pty.contains("<serial type='pty'>"), "the fixture changed");
    let kept = rewrite_domain(&pty, &recovery()).unwrap();
    assert!(kept.contains("/dev/pts/3"), "only a sandbox rewrites a pty");
    let out = rewrite_domain(
        &pty,
        &LibvirtRecovery {
            console_to_file: true,
            ..recovery()
        },
    )
    .unwrap();
    let doc = roxmltree::Document::parse(&out).expect("still XML");
    let devices = child(doc.root_element(), "devices").unwrap();
    let chardevs: Vec<_> = devices
        .children()
        .filter(|c| c.has_tag_name("serial") || c.has_tag_name("console"))
        .collect();
    assert_eq!(chardevs.len(), 3, "{out}");
    for c in chardevs {
        assert_eq!(c.attribute("type"), Some("file"), "{out}");
        assert_eq!(
            child(c, "source").unwrap().attribute("path"),
            Some("/srv/dr/web1/serial.log"),
            "{out}"
        );
    }
    assert_eq!(
        child(
            devices
                .children()
                .find(|c| c.has_tag_name("console"))
                .unwrap(),
            "target"
        )
        .unwrap()
        .attribute("type"),
        Some("serial"),
        "the console's target is kept"
    );
}
