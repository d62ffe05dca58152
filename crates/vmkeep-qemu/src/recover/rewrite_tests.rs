use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::recover::RecoveryPlan;
use crate::vmdef::{BootFile, DefinedDisk};

fn def(args: &[&str], disks: Vec<DefinedDisk>, boot: &[&str]) -> VmDefinition {
    VmDefinition {
        disks,
        boot_files: boot
            .iter()
            .map(|r| BootFile {
                role: r.to_string(),
                path: String::new(),
                host_path: String::new(),
                size: Some(1),
            })
            .collect(),
        ..crate::vmdef::test_definition(args)
    }
}

fn disk(name: &str, node: &str, drive_id: Option<&str>, file: &str) -> DefinedDisk {
    DefinedDisk {
        name: name.into(),
        node: node.into(),
        drive_id: drive_id.map(Into::into),
        qdev: None,
        device_id: None,
        format: "qcow2".into(),
        file: file.into(),
        image: None,
        size: 1 << 20,
        on_command_line: true,
    }
}

fn plan(d: &VmDefinition, mode: StartMode) -> RecoveryPlan {
    RecoveryPlan::in_dir(d, Path::new("/t"), mode)
}

#[test]
fn the_test_vm_command_line() {
    let d = def(
        &[
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "256",
            "-no-reboot",
            "-qmp",
            "unix:/old/qmp.sock,server=on,wait=off",
            "-serial",
            "file:/old/serial.log",
            "-kernel",
            "/g/vmlinuz",
            "-initrd",
            "/g/initrd.gz",
            "-append",
            "console=ttyS0 quiet panic=-1 vmkeep.workload=seqwrite",
            "-blockdev",
            "driver=file,filename=/old/a.qcow2,node-name=f0",
            "-blockdev",
            "driver=qcow2,file=f0,node-name=disk0",
            "-device",
            "virtio-blk-pci,drive=disk0,id=vd0",
            "-drive",
            "file=/old/b.qcow2,format=qcow2,if=none,id=drive1",
            "-device",
            "virtio-blk-pci,drive=drive1",
        ],
        vec![
            disk("vd0", "disk0", None, "/old/a.qcow2"),
            disk("drive1", "#block175", Some("drive1"), "/old/b.qcow2"),
        ],
        &["kernel", "initrd"],
    );
    let argv = rewrite(&d, &plan(&d, StartMode::Resume)).unwrap();
    assert_eq!(
        argv,
        [
            "-accel",
            "tcg",
            "-nodefaults",
            "-m",
            "256",
            "-no-reboot",
            "-serial",
            "file:/t/serial.log",
            "-kernel",
            "/t/boot-kernel",
            "-initrd",
            "/t/boot-initrd",
            "-append",
            "console=ttyS0 quiet panic=-1 vmkeep.workload=seqwrite",
            "-blockdev",
            "driver=file,filename=/t/vd0.qcow2,node-name=f0",
            "-blockdev",
            "driver=qcow2,file=f0,node-name=disk0,backing=",
            "-device",
            "virtio-blk-pci,drive=disk0,id=vd0",
            "-drive",
            "format=qcow2,if=none,id=drive1,file=/t/drive1.qcow2",
            "-device",
            "virtio-blk-pci,drive=drive1",
            "-machine",
            "pc-i440fx-10.0",
            "-display",
            "none",
            "-qmp",
            "unix:/t/qmp.sock,server=on,wait=off",
            "-incoming",
            "defer",
        ]
    );
    let cold = rewrite(&d, &plan(&d, StartMode::Cold)).unwrap();
    assert_eq!(&cold[..], &argv[..argv.len() - 2]);
}

#[test]
fn a_libvirt_command_line() {
    let d = def(
        &[
            "-name",
            "guest=web1,debug-threads=on",
            "-S",
            "-object",
            r#"{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-web1/master-key.aes"}"#,
            "-machine",
            "pc-q35-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram,accel=kvm",
            "-m",
            "size=2097152k",
            "-no-user-config",
            "-nodefaults",
            "-chardev",
            "socket,id=charmonitor,fd=31,server=on,wait=off",
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
            "-no-shutdown",
            "-blockdev",
            r#"{"driver":"file","filename":"/var/lib/libvirt/images/web1.qcow2","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}"#,
            "-blockdev",
            r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage","backing":null}"#,
            "-device",
            r#"{"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}"#,
            "-netdev",
            r#"{"type":"tap","fd":"32","vhost":true,"vhostfd":"34","id":"hostnet0"}"#,
            "-device",
            r#"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:12:34:56"}"#,
            "-chardev",
            "pty,id=charserial0",
            "-device",
            r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#,
            "-chardev",
            "socket,id=charchannel0,fd=30,server=on,wait=off",
            "-device",
            r#"{"driver":"virtserialport","chardev":"charchannel0","id":"channel0","name":"org.qemu.guest_agent.0"}"#,
            "-vnc",
            "127.0.0.1:0",
            "-add-fd",
            "set=3,fd=40",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-run-with",
            "async-teardown=on,user=qemu",
            "-msg",
            "timestamp=on",
        ],
        vec![disk(
            "virtio-disk0",
            "libvirt-1-format",
            None,
            "/var/lib/libvirt/images/web1.qcow2",
        )],
        &[],
    );
    let mut p = plan(&d, StartMode::Resume);
    p.accel = Some("tcg".into());
    let argv = rewrite(&d, &p).unwrap();
    assert_eq!(
        argv,
        [
            "-name",
            "guest=web1,debug-threads=on",
            "-object",
            r#"{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-web1/master-key.aes"}"#,
            "-machine",
            "pc-i440fx-10.0,usb=off,dump-guest-core=off,memory-backend=pc.ram",
            "-m",
            "size=2097152k",
            "-no-user-config",
            "-nodefaults",
            "-no-shutdown",
            "-blockdev",
            r#"{"auto-read-only":true,"discard":"unmap","driver":"file","filename":"/t/virtio-disk0.qcow2","node-name":"libvirt-1-storage"}"#,
            "-blockdev",
            r#"{"backing":null,"driver":"qcow2","file":"libvirt-1-storage","node-name":"libvirt-1-format","read-only":false}"#,
            "-device",
            r#"{"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}"#,
            "-netdev",
            r#"{"downscript":"no","id":"hostnet0","script":"no","type":"tap"}"#,
            "-device",
            r#"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:12:34:56"}"#,
            "-chardev",
            "file,id=charserial0,path=/t/serial.log",
            "-device",
            r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#,
            "-chardev",
            "socket,id=charchannel0,path=/t/chardev-charchannel0.sock,server=on,wait=off",
            "-device",
            r#"{"driver":"virtserialport","chardev":"charchannel0","id":"channel0","name":"org.qemu.guest_agent.0"}"#,
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-run-with",
            "async-teardown=on",
            "-msg",
            "timestamp=on",
            "-accel",
            "tcg",
            "-display",
            "none",
            "-qmp",
            "unix:/t/qmp.sock,server=on,wait=off",
            "-incoming",
            "defer",
        ]
    );
}

#[test]
fn defaults_monitors_and_serials() {
    // No -nodefaults: QEMU's default serial and NIC exist and must stay (one serial, one NIC
    // with a user backend, which has migration state).
    let d = def(
        &[
            "-M",
            "pc,accel=kvm",
            "-nographic",
            "-chardev",
            "stdio,mux=on,id=c0,signal=off",
            "-mon",
            "chardev=c0",
            "-monitor",
            "unix:/old/hmp,server,nowait",
            "-gdb",
            "tcp::1234",
            "-daemonize",
            "-pidfile",
            "/run/vm.pid",
            "-incoming",
            "tcp:0:4444",
            "-run-with",
            "user=nobody",
            "-hda",
            "/old/disk.img",
        ],
        vec![disk(
            "ide0-hd0",
            "#block1",
            Some("ide0-hd0"),
            "/old/disk.img",
        )],
        &[],
    );
    let argv = rewrite(&d, &plan(&d, StartMode::Cold)).unwrap();
    assert_eq!(
        argv,
        [
            "-M",
            "pc-i440fx-10.0,accel=kvm",
            "-hda",
            "/t/ide0-hd0.qcow2",
            "-display",
            "none",
            "-serial",
            "file:/t/serial.log",
            "-net",
            "nic",
            "-net",
            "user,restrict=on",
            "-qmp",
            "unix:/t/qmp.sock,server=on,wait=off",
        ]
    );
    // Several serial ports: the first logs, the others go nowhere, `none` stays none.
    let d = def(
        &[
            "-nodefaults",
            "-serial",
            "none",
            "-serial",
            "chardev:s1",
            "-serial",
            "pty",
            "-chardev",
            "socket,id=s1,path=/old/s1",
            "-parallel",
            "/dev/parport0",
            "-nic",
            "user,hostfwd=tcp::2222-:22",
        ],
        vec![],
        &[],
    );
    let mut p = plan(&d, StartMode::Cold);
    p.network = true;
    let argv = rewrite(&d, &p).unwrap();
    assert_eq!(
        argv,
        [
            "-nodefaults",
            "-serial",
            "none",
            "-serial",
            "file:/t/serial.log",
            "-serial",
            "null",
            "-parallel",
            "null",
            "-nic",
            "user,hostfwd=tcp::2222-:22",
            "-machine",
            "pc-i440fx-10.0",
            "-display",
            "none",
            "-qmp",
            "unix:/t/qmp.sock,server=on,wait=off",
        ]
    );
}

#[test]
fn refusals() {
    let args = [
        "-nodefaults",
        "-blockdev",
        "driver=file,filename=/a,node-name=d0",
    ];
    let d = def(&args, vec![disk("d0", "d0", None, "/a")], &[]);
    let mut p = plan(&d, StartMode::Cold);
    p.disks.clear();
    let e = rewrite(&d, &p).unwrap_err().to_string();
    assert!(e.contains("no new image given for disk d0"), "{e}");

    let mut p = plan(&d, StartMode::Cold);
    p.disks.insert("other".into(), "/t/o.qcow2".into());
    let e = rewrite(&d, &p).unwrap_err().to_string();
    assert!(e.contains("no disk called other"), "{e}");

    let d2 = def(&args, vec![disk("hot", "hot0", None, "/h")], &[]);
    let e = rewrite(&d2, &plan(&d2, StartMode::Cold))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("disk hot (node hot0) is not on the VM's command line"),
        "{e}"
    );

    let d3 = def(&args, vec![], &["kernel"]);
    let e = rewrite(&d3, &plan(&d3, StartMode::Cold))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("boot file kernel is not on the VM's command line"),
        "{e}"
    );

    let long = Path::new("/a-very-long-folder-name-for-a-socket-path-that-linux-refuses/and-more-and-more-and-more/and-more-and-more-and-more");
    let e = rewrite(&d, &RecoveryPlan::in_dir(&d, long, StartMode::Cold))
        .unwrap_err()
        .to_string();
    assert!(e.contains("longer than 107 bytes"), "{e}");

    // A bare file node under the device becomes a qcow2 node over the new file.
    let argv = rewrite(&d, &plan(&d, StartMode::Cold)).unwrap();
    assert_eq!(
        argv[1..3],
        [
            "-blockdev",
            "driver=qcow2,node-name=d0,file.driver=file,file.filename=/t/d0.qcow2"
        ]
    );
}

/// Fragments that make random command lines hit the disk, drive and network code paths.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("-drive".to_string()),
        Just("-blockdev".to_string()),
        Just("-netdev".to_string()),
        Just("-nic".to_string()),
        Just("-hda".to_string()),
        Just("-pflash".to_string()),
        Just("-machine".to_string()),
        Just("node-name=d0,driver=qcow2,file=f0".to_string()),
        Just("driver=file,node-name=f0,filename=/x".to_string()),
        Just("driver=qcow2,node-name=d0,file=d0,backing=d0".to_string()),
        Just(r#"{"node-name":"d0","driver":"raw","file":{"driver":"nbd","x":[1]}}"#.to_string()),
        Just(r#"{"node-name":"d0","driver":"throttle","file":"d0"}"#.to_string()),
        Just("file=/x,if=ide,bus=4294967295,unit=4294967295,id=drv".to_string()),
        Just("file=/x,if=pflash,index=4294967295".to_string()),
        Just("hubport,id=h,hubid=18446744073709551615".to_string()),
        Just(r#"{"type":"socket","id":"n","hubid":18446744073709551615}"#.to_string()),
        Just("q35,pflash0=d0,pflash1=f0".to_string()),
        "[a-z0-9=,.:{}\"/ -]{0,16}",
    ]
}

proptest! {
    #[test]
    fn never_panics_with_disks(
        words in proptest::collection::vec(fragment(), 0..16),
        which in 0u8..64,
    ) {
        let args: Vec<&str> = words.iter().map(String::as_str).collect();
        let disks = [
            disk("d0", "d0", None, "/x"),
            disk("drv", "#b", Some("drv"), "/x"),
            disk("ide", "#c", Some("ide0-hd0"), "/x"),
        ];
        let roles = ["kernel", "pflash0", "pflash1"];
        let disks = disks.into_iter().enumerate().filter(|(i, _)| which & (1 << i) != 0);
        let roles: Vec<&str> = roles
            .into_iter()
            .enumerate()
            .filter(|(i, _)| which & (8 << i) != 0)
            .map(|(_, r)| r)
            .collect();
        let d = def(&args, disks.map(|(_, d)| d).collect(), &roles);
        let _ = rewrite(&d, &plan(&d, StartMode::Resume));
    }

    #[test]
    fn never_panics(words in proptest::collection::vec(
        prop_oneof![
            Just("-drive".to_string()), Just("-blockdev".to_string()), Just("-machine".to_string()),
            Just("-chardev".to_string()), Just("-netdev".to_string()), Just("-nic".to_string()),
            Just("-serial".to_string()), Just("-mon".to_string()), Just("-net".to_string()),
            Just("-run-with".to_string()), Just("-add-fd".to_string()), Just("-kernel".to_string()),
            "[a-z=,.:{}\"/ -]{0,24}",
        ], 0..24)) {
        let args: Vec<&str> = words.iter().map(String::as_str).collect();
        let d = def(&args, vec![], &[]);
        let _ = rewrite(&d, &plan(&d, StartMode::Resume));
    }
}

/// `vmkeep verify --probe`: a second monitor beside ours, both new; the VM's own ones dropped.
#[test]
fn a_probe_gets_a_monitor_of_its_own() {
    let d = def(
        &["-qmp", "unix:/old/qmp.sock,server=on,wait=off", "-m", "256"],
        vec![],
        &[],
    );
    let mut p = plan(&d, StartMode::Cold);
    p.probe_qmp = Some("/t/probe-qmp.sock".into());
    let argv = rewrite(&d, &p).unwrap();
    let monitors: Vec<&String> = argv
        .iter()
        .zip(argv.iter().skip(1))
        .filter(|(k, _)| *k == "-qmp")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        monitors,
        [
            "unix:/t/qmp.sock,server=on,wait=off",
            "unix:/t/probe-qmp.sock,server=on,wait=off"
        ]
    );
}
