//! Cutting a recovered VM off the network without changing its devices.
//!
//! The migration state names every device, and some backends too: a NIC that disappears
//! makes the load fail ("Unknown ramblock 0000:00:02.0/e1000.rom"), and so does a user-mode
//! backend replaced by another one ("Unknown savevm section or instance 'slirp'"; both seen
//! with QEMU 10.0.2). So every NIC stays, and only its backend changes:
//! - `user` (slirp, which has migration state) stays `user` with `restrict=on` (no traffic to
//!   the host or beyond) and without host/guest forwards or an SMB server;
//! - `tap` and `bridge` become a new tap that QEMU creates, down and attached to nothing
//!   (`script=no,downscript=no`, no `vhost`): the guest keeps its vnet header offloads, which
//!   a virtio-net's state may depend on (this needs the right to create tap devices);
//! - every other backend becomes a `hubport` on a hub of its own: frames go nowhere.
//!
//! `-net` backends (on the legacy hub 0) are treated the same, or dropped when nothing can
//! replace them; `-net nic` stays.

use serde_json::Value;

use super::super::vmdef::cmdline::{CmdArg, CommandLine};
use super::super::vmdef::opts::{KeyVal, OptValue};

/// Members a user backend drops: they reach outside the VM.
const USER_OUTSIDE: &[&str] = &["hostfwd", "guestfwd", "smb", "smbserver"];

/// Members a tap backend keeps (everything else names host resources: fds, interfaces,
/// scripts, bridges, vhost devices, which the new host may not have).
const TAP_KEEP: &[&str] = &["type", "id", "queues", "vnet_hdr", "poll-us", "sndbuf"];

/// Members a `-nic` keeps whatever its backend becomes (the device side).
const NIC_DEVICE: &[&str] = &["model", "mac", "id"];

/// Hub ids for isolated backends, above any the command line uses.
pub(crate) struct Hubs {
    next: u64,
}

impl Hubs {
    pub fn new(cl: &CommandLine) -> Hubs {
        let used = cl
            .args
            .iter()
            .filter_map(|a| a.opts()?.get("hubid")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        Hubs {
            next: used.saturating_add(1),
        }
    }

    fn take(&mut self) -> u64 {
        let hub = self.next;
        self.next = self.next.saturating_add(1);
        hub
    }
}

/// The network options of the recovered VM: `arg` isolated, or `None` to drop it.
pub(crate) fn isolate(arg: &CmdArg, hubs: &mut Hubs) -> Option<CmdArg> {
    let name = arg.name.as_deref()?;
    let mut opts = arg.opts()?;
    let kind = backend_type(&opts)?;
    let device_keys: &[&str] = if name == "nic" { NIC_DEVICE } else { &[] };
    match (name, kind.as_str()) {
        ("net", "nic" | "none") | ("nic", "none") => return Some(arg.clone()),
        (_, "user") => {
            for k in USER_OUTSIDE {
                opts.remove(k);
            }
            set_bool(&mut opts, "restrict", true);
        }
        (_, "tap" | "bridge") => {
            opts.retain_members("", |k| TAP_KEEP.contains(&k) || device_keys.contains(&k));
            set_type(&mut opts, "tap");
            opts.set("script", "no");
            opts.set("downscript", "no");
        }
        ("net", _) => return None,
        (_, "hubport") => return Some(arg.clone()),
        _ => {
            opts.retain_members("", |k| k == "type" || k == "id" || device_keys.contains(&k));
            set_type(&mut opts, "hubport");
            let hub = hubs.take();
            match &mut opts {
                OptValue::Json(m) => {
                    m.insert("hubid".into(), Value::from(hub));
                }
                OptValue::KeyVal(kv) => kv.set("hubid", &hub.to_string()),
            }
        }
    }
    let mut out = arg.clone();
    out.set_opts(&opts);
    Some(out)
}

/// `user`, `tap`, ...: the implied first item or `type`.
fn backend_type(opts: &OptValue) -> Option<String> {
    match opts {
        OptValue::KeyVal(kv) => kv
            .implied()
            .map(str::to_owned)
            .or_else(|| kv.get("type").map(str::to_owned)),
        OptValue::Json(_) => opts.get("type"),
    }
}

fn set_type(opts: &mut OptValue, kind: &str) {
    match opts {
        OptValue::KeyVal(kv) if kv.implied().is_some() => kv.set_implied(kind),
        _ => opts.set("type", kind),
    }
}

fn set_bool(opts: &mut OptValue, key: &str, on: bool) {
    match opts {
        OptValue::Json(m) => {
            m.insert(key.to_owned(), Value::Bool(on));
        }
        OptValue::KeyVal(kv) => kv.set(key, if on { "on" } else { "off" }),
    }
}

/// The options that replace QEMU's default network (a NIC on user networking) when the
/// original VM had no network options and no `-nodefaults`.
pub(crate) fn default_network(keep: bool) -> Vec<CmdArg> {
    if keep {
        return Vec::new();
    }
    let mut user = KeyVal::parse("user");
    user.set("restrict", "on");
    vec![
        CmdArg::new("net", "nic"),
        CmdArg::new("net", &user.render()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(words: &[&str]) -> Vec<String> {
        let cl = CommandLine::parse(words);
        let mut hubs = Hubs::new(&cl);
        let out = CommandLine {
            args: cl
                .args
                .iter()
                .filter_map(|a| isolate(a, &mut hubs))
                .collect(),
        };
        out.to_argv()
    }

    #[test]
    fn backends_are_isolated_devices_kept() {
        let got = run(&[
            "-netdev",
            "user,id=n0,hostfwd=tcp::2222-:22,net=10.1.0.0/24",
            "-netdev",
            r#"{"type":"tap","fd":"32","vhost":true,"vhostfd":"34","id":"hostnet0"}"#,
            "-netdev",
            "stream,id=n2,addr.type=unix,addr.path=/run/x.sock",
            "-nic",
            "bridge,br=br0,model=virtio-net-pci,mac=52:54:00:00:00:01",
            "-nic",
            "socket,listen=:1234,model=e1000",
            "-netdev",
            "hubport,id=h,hubid=7",
            "-net",
            "nic,model=e1000",
            "-net",
            "user,hostfwd=tcp::80-:80",
            "-net",
            "socket,connect=1.2.3.4:5",
            "-nic",
            "none",
        ]);
        assert_eq!(
            got,
            [
                "-netdev",
                "user,id=n0,net=10.1.0.0/24,restrict=on",
                "-netdev",
                r#"{"downscript":"no","id":"hostnet0","script":"no","type":"tap"}"#,
                "-netdev",
                "hubport,id=n2,hubid=8",
                "-nic",
                "tap,model=virtio-net-pci,mac=52:54:00:00:00:01,script=no,downscript=no",
                "-nic",
                "hubport,model=e1000,hubid=9",
                "-netdev",
                "hubport,id=h,hubid=7",
                "-net",
                "nic,model=e1000",
                "-net",
                "user,restrict=on",
                "-nic",
                "none",
            ]
        );
    }

    #[test]
    fn default_network_is_a_restricted_nic() {
        assert_eq!(
            CommandLine {
                args: default_network(false)
            }
            .to_argv(),
            ["-net", "nic", "-net", "user,restrict=on"]
        );
        assert!(default_network(true).is_empty());
    }
}
