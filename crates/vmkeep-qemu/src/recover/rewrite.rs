//! The definition's command line, rewritten for the new place.
//!
//! Rewritten: disk and boot-file paths (`place.rs`); the machine type pinned to the
//! resolved one; every monitor replaced by one QMP socket; the first serial port into the
//! serial log; chardev backends moved into the target folder (`chardev.rs`); network
//! backends cut off unless asked (`network.rs`); displays replaced by `-display none`;
//! what belongs to the old process dropped (`-daemonize`, `-pidfile`, `-incoming`, `-S`,
//! `-loadvm`, `-preconfig`, `-D`, `-gdb`/`-s`, `-chroot`/`-runas`, `-run-with user=/chroot=`,
//! `-add-fd` sets nothing uses). Kept: everything else, in order, as written, and in
//! particular device ids, node names and drive ids (the migration state refers to devices by
//! id, vmkeep's checkpoints to node names) and the device set itself.

use std::path::Path;

use super::chardev;
use super::network::{self, Hubs};
use super::place::{drop_orphan_nodes, place_boot, place_disk};
use super::{RecoveryPlan, StartMode};
use crate::error::{Error, Result};
use crate::vmdef::cmdline::{CmdArg, CommandLine};
use crate::vmdef::locate::{boot_sites, disk_site};
use crate::vmdef::opts::{KeyVal, OptValue};
use crate::vmdef::VmDefinition;

/// Options of the old process that have no meaning (or a harmful one) in the new one.
const DROPPED: &[&str] = &[
    "daemonize",
    "pidfile",
    "incoming",
    "S",
    "loadvm",
    "preconfig",
    "D",
    "gdb",
    "s",
    "chroot",
    "runas",
];

/// Internal name of the serial console's `-chardev` while the others are relocated.
const SERIAL_CHARDEV: &str = " serial chardev";

/// Monitors: replaced by our one QMP socket.
const MONITORS: &[&str] = &["qmp", "qmp-pretty", "mon", "monitor"];

/// Displays: a recovered VM runs headless (the original may hold the VNC or SPICE port).
const DISPLAYS: &[&str] = &[
    "display",
    "vnc",
    "spice",
    "nographic",
    "sdl",
    "curses",
    "full-screen",
];

/// The command line (without the program) that runs `def` as `plan` says.
pub fn rewrite(def: &VmDefinition, plan: &RecoveryPlan) -> Result<Vec<String>> {
    check_plan(def, plan)?;
    let mut cl = CommandLine::parse(&def.args);

    // Disks and boot files first: their sites are indexes into the original command line.
    let mut disk_sites = Vec::new();
    for d in &def.disks {
        let site = disk_site(&cl, d).ok_or_else(|| {
            Error::Definition(format!(
                "disk {} (node {}) is not on the VM's command line (hot-plugged?): cannot recreate it",
                d.name, d.node
            ))
        })?;
        disk_sites.push((site, &plan.disks[&d.name]));
    }
    let boots = boot_sites(&cl, &disk_sites.iter().map(|(s, _)| *s).collect::<Vec<_>>());
    let mut orphans = Vec::new();
    for (site, image) in &disk_sites {
        place_disk(
            &mut cl,
            *site,
            &path_text(image)?,
            plan.instant,
            &mut orphans,
        )?;
    }
    for b in &def.boot_files {
        let site = boots.iter().find(|s| s.role == b.role).ok_or_else(|| {
            Error::Definition(format!(
                "boot file {} is not on the VM's command line",
                b.role
            ))
        })?;
        place_boot(&mut cl, site.site, &path_text(&plan.boot_files[&b.role])?)?;
    }

    let defaults = !cl.has("nodefaults");
    let serial_device = if cl.has("serial") {
        None
    } else {
        chardev::serial_device_chardev(&cl)
    };
    let default_serial = defaults && !cl.has("serial") && serial_device.is_none();
    let default_net = defaults && !cl.has("net") && !cl.has("netdev") && !cl.has("nic");
    let mut hubs = Hubs::new(&cl);
    let mut unused_chardevs = Vec::new();
    let mut first_serial = true;
    let mut pinned = false;
    let mut args = Vec::with_capacity(cl.args.len() + 8);
    for mut arg in cl.args {
        let name = arg.name.clone().unwrap_or_default();
        let value = arg.value.clone().unwrap_or_default();
        match name.as_str() {
            n if DROPPED.contains(&n) || DISPLAYS.contains(&n) => continue,
            n if MONITORS.contains(&n) => {
                unused_chardevs.extend(chardev::referenced_id(n, &value));
                continue;
            }
            "accel" | "enable-kvm" | "no-kvm" if plan.accel.is_some() => continue,
            "run-with" => {
                let mut kv = KeyVal::parse(&value);
                kv.retain_keys(|k| k == "async-teardown");
                if kv.values().next().is_none() {
                    continue;
                }
                arg.value = Some(kv.render());
            }
            "machine" => {
                let mut kv = KeyVal::parse(&value);
                if kv.implied().is_some() {
                    kv.set_implied(&def.machine);
                    pinned = true;
                } else if kv.get("type").is_some() {
                    kv.set("type", &def.machine);
                    pinned = true;
                }
                if plan.accel.is_some() {
                    kv.remove("accel");
                }
                if kv.values().next().is_none() {
                    continue;
                }
                arg.value = Some(kv.render());
            }
            "serial" => {
                unused_chardevs.extend(chardev::referenced_id("serial", &value));
                if value != "none" {
                    let spec = if first_serial {
                        format!("file:{}", path_text(&plan.serial_log)?)
                    } else {
                        "null".to_owned()
                    };
                    first_serial = false;
                    arg.value = Some(spec);
                }
            }
            "parallel" | "debugcon" if value != "none" => {
                unused_chardevs.extend(chardev::referenced_id(&name, &value));
                arg.value = Some("null".to_owned());
            }
            "chardev" => {
                let id = KeyVal::parse(&value).get("id").map(str::to_owned);
                if id.is_some() && id == serial_device {
                    arg.value = Some(chardev::to_log_file(&value, &plan.serial_log));
                    arg.name = Some(SERIAL_CHARDEV.to_owned()); // not relocated below
                }
            }
            "netdev" | "nic" | "net" if !plan.network => {
                if let Some(OptValue::KeyVal(kv)) = arg.opts() {
                    unused_chardevs.extend(kv.get("chardev").map(str::to_owned));
                }
                match network::isolate(&arg, &mut hubs) {
                    Some(a) => arg = a,
                    None => continue,
                }
            }
            _ => {}
        }
        args.push(arg);
    }
    let mut cl = CommandLine { args };
    chardev::drop_unused(&mut cl, &unused_chardevs);
    drop_orphan_nodes(&mut cl, orphans);
    drop_unused_fd_sets(&mut cl);
    // Only the chardevs still in use move (a dropped monitor's socket need not fit anywhere).
    for arg in &mut cl.args {
        if arg.is("chardev") {
            let value = arg.value.as_deref().unwrap_or_default();
            arg.value = Some(chardev::relocate(value, &plan.target_dir)?);
        } else if arg.is(SERIAL_CHARDEV) {
            arg.name = Some("chardev".to_owned());
        }
    }

    if !pinned {
        cl.args.push(CmdArg::new("machine", &def.machine));
    }
    if let Some(accel) = &plan.accel {
        cl.args.push(CmdArg::new("accel", accel));
    }
    cl.args.push(CmdArg::new("display", "none"));
    if default_serial {
        let spec = format!("file:{}", path_text(&plan.serial_log)?);
        cl.args.push(CmdArg::new("serial", &spec));
    }
    if default_net {
        cl.args.extend(network::default_network(plan.network));
    }
    let mut qmp = KeyVal::parse(&format!("unix:{}", path_text(&plan.qmp_socket)?));
    qmp.set("server", "on");
    qmp.set("wait", "off");
    cl.args.push(CmdArg::new("qmp", &qmp.render()));
    // A second monitor for a user's probe (`vmkeep verify --probe`): ours stays connected.
    if let Some(probe) = &plan.probe_qmp {
        let mut qmp = KeyVal::parse(&format!("unix:{}", path_text(probe)?));
        qmp.set("server", "on");
        qmp.set("wait", "off");
        cl.args.push(CmdArg::new("qmp", &qmp.render()));
    }
    if plan.mode == StartMode::Resume {
        cl.args.push(CmdArg::new("incoming", "defer"));
    }
    Ok(cl.to_argv())
}

/// Every disk and boot file has a new path, and nothing else is named.
fn check_plan(def: &VmDefinition, plan: &RecoveryPlan) -> Result<()> {
    for d in &def.disks {
        if !plan.disks.contains_key(&d.name) {
            return Err(Error::Definition(format!(
                "no new image given for disk {}",
                d.name
            )));
        }
    }
    if let Some(n) = plan.disks.keys().find(|n| def.disk(n).is_none()) {
        return Err(Error::Definition(format!("the VM has no disk called {n}")));
    }
    for b in &def.boot_files {
        if !plan.boot_files.contains_key(&b.role) {
            return Err(Error::Definition(format!(
                "no new file given for boot file {}",
                b.role
            )));
        }
    }
    if let Some(r) = plan
        .boot_files
        .keys()
        .find(|r| !def.boot_files.iter().any(|b| &b.role == *r))
    {
        return Err(Error::Definition(format!("the VM has no boot file {r}")));
    }
    let sock = path_text(&plan.qmp_socket)?;
    if sock.len() > chardev::UNIX_PATH_MAX {
        return Err(Error::Definition(format!(
            "QMP socket path {sock} is longer than {} bytes: choose a shorter target folder",
            chardev::UNIX_PATH_MAX
        )));
    }
    Ok(())
}

fn path_text(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Definition(format!("path {} is not UTF-8", p.display())))
}

/// `-add-fd` passed descriptors from the process that started QEMU: gone now. A set that a
/// remaining option still uses (`/dev/fdset/N`) is kept, and QEMU says what is missing.
fn drop_unused_fd_sets(cl: &mut CommandLine) {
    let used = |cl: &CommandLine, set: &str| {
        let needle = format!("/dev/fdset/{set}");
        cl.args
            .iter()
            .any(|a| a.value.as_deref().is_some_and(|v| v.contains(&needle)))
    };
    let mut i = 0;
    while i < cl.args.len() {
        if cl.args[i].is("add-fd") {
            let set = cl.args[i]
                .value
                .as_deref()
                .and_then(|v| KeyVal::parse(v).get("set").map(str::to_owned))
                .unwrap_or_default();
            if !used(cl, &set) {
                cl.args.remove(i);
                continue;
            }
        }
        i += 1;
    }
}

#[cfg(test)]
#[path = "rewrite_tests.rs"]
mod tests;
