//! A QEMU command line as a list of options, each with its value, in order.
//!
//! QEMU's own table says which options take a value. We carry the part of it that matters:
//! the options without a value (`FLAGS`) and the ones with (`WITH_VALUE`); an option in
//! neither list takes the next word as its value unless that word starts with `-`. Whatever the
//! guess, every word is kept in order, so options we do not know pass through unchanged.

use super::opts::OptValue;

/// Options that take no value (QEMU 10.0 and the older spellings still seen in the wild).
const FLAGS: &[&str] = &[
    "S",
    "s",
    "h",
    "help",
    "version",
    "daemonize",
    "enable-kvm",
    "enable-sync-profile",
    "full-screen",
    "nographic",
    "nodefaults",
    "no-reboot",
    "no-shutdown",
    "no-user-config",
    "no-fd-bootchk",
    "only-migratable",
    "snapshot",
    "usb",
    "win2k-hack",
    "xen-attach",
    "xen-domid-restrict",
    "mem-prealloc",
    "perfmap",
    "jitdump",
    "preconfig",
    "no-hpet",
    "no-acpi",
    "curses",
    "sdl",
    "alt-grab",
    "ctrl-grab",
    "no-quit",
    "semihosting",
    "singlestep",
    "portrait",
    "no-frame",
    "show-cursor",
    "async-teardown",
    "enable-fips",
    "old-param",
    "no-kvm",
    "no-kvm-irqchip",
    "no-kvm-pit",
    "no-kvm-pit-reinjection",
];

/// Options that always take the next word as their value, even one starting with `-`.
const WITH_VALUE: &[&str] = &[
    "D",
    "L",
    "M",
    "accel",
    "acpitable",
    "action",
    "add-fd",
    "append",
    "audio",
    "audiodev",
    "bios",
    "blockdev",
    "boot",
    "cdrom",
    "chardev",
    "chroot",
    "compat",
    "cpu",
    "d",
    "debugcon",
    "device",
    "dfilter",
    "display",
    "drive",
    "dtb",
    "dump-vmstate",
    "echr",
    "fda",
    "fdb",
    "fsdev",
    "fw_cfg",
    "g",
    "gdb",
    "global",
    "hda",
    "hdb",
    "hdc",
    "hdd",
    "icount",
    "incoming",
    "initrd",
    "iscsi",
    "k",
    "kernel",
    "loadvm",
    "m",
    "machine",
    "mem-path",
    "mon",
    "monitor",
    "msg",
    "mtdblock",
    "name",
    "net",
    "netdev",
    "nic",
    "numa",
    "object",
    "option-rom",
    "overcommit",
    "parallel",
    "pflash",
    "pidfile",
    "plugin",
    "qmp",
    "qmp-pretty",
    "readconfig",
    "rotate",
    "rtc",
    "run-with",
    "runas",
    "sandbox",
    "sd",
    "seed",
    "semihosting-config",
    "serial",
    "set",
    "shim",
    "smbios",
    "smp",
    "spice",
    "tpmdev",
    "trace",
    "usbdevice",
    "uuid",
    "vga",
    "virtfs",
    "vnc",
    "watchdog",
    "watchdog-action",
    "xen-domid",
];

/// Options whose value may be a JSON object (QEMU 10.0).
const JSON_OPTIONS: &[&str] = &[
    "blockdev", "device", "netdev", "object", "audiodev", "display", "compat",
];

/// One word of the command line, or an option with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdArg {
    /// The option's canonical name without dashes (`machine` for `-M`), `None` for a word
    /// that is not an option.
    pub name: Option<String>,
    /// The option as written (`-M`, `--drive`), or the word itself.
    pub spelling: String,
    pub value: Option<String>,
}

impl CmdArg {
    /// An option with a value, spelled `-name`.
    pub fn new(name: &str, value: &str) -> CmdArg {
        CmdArg {
            name: Some(name.to_owned()),
            spelling: format!("-{name}"),
            value: Some(value.to_owned()),
        }
    }

    /// An option without a value.
    pub fn flag(name: &str) -> CmdArg {
        CmdArg {
            name: Some(name.to_owned()),
            spelling: format!("-{name}"),
            value: None,
        }
    }

    pub fn is(&self, name: &str) -> bool {
        self.name.as_deref() == Some(name)
    }

    /// The value parsed as options (JSON where QEMU accepts it for this option).
    pub fn opts(&self) -> Option<OptValue> {
        let v = self.value.as_deref()?;
        let json = self
            .name
            .as_deref()
            .is_some_and(|n| JSON_OPTIONS.contains(&n));
        Some(OptValue::parse(v, json))
    }

    /// Replaces the value with `opts` rendered.
    pub fn set_opts(&mut self, opts: &OptValue) {
        self.value = Some(opts.render());
    }
}

/// A parsed command line (without the program name).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandLine {
    pub args: Vec<CmdArg>,
}

impl CommandLine {
    /// Splits `argv` (without the program) into options and values. Never fails.
    pub fn parse<S: AsRef<str>>(argv: &[S]) -> CommandLine {
        let mut args = Vec::new();
        let mut i = 0;
        while i < argv.len() {
            let word = argv[i].as_ref();
            i += 1;
            let Some(name) = option_name(word) else {
                args.push(CmdArg {
                    name: None,
                    spelling: word.to_owned(),
                    value: None,
                });
                continue;
            };
            let next = argv.get(i).map(AsRef::as_ref);
            let takes_value = if FLAGS.contains(&name) {
                false
            } else if WITH_VALUE.contains(&name) {
                next.is_some()
            } else {
                next.is_some_and(|n| !n.starts_with('-') || n == "-")
            };
            let value = if takes_value {
                i += 1;
                next.map(str::to_owned)
            } else {
                None
            };
            args.push(CmdArg {
                name: Some(canonical(name).to_owned()),
                spelling: word.to_owned(),
                value,
            });
        }
        CommandLine { args }
    }

    /// The words again, options as they were spelled.
    pub fn to_argv(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.args.len() * 2);
        for a in &self.args {
            out.push(a.spelling.clone());
            if let Some(v) = &a.value {
                out.push(v.clone());
            }
        }
        out
    }

    /// Indexes of the options called `name` (canonical), in order.
    pub fn find(&self, name: &str) -> Vec<usize> {
        (0..self.args.len())
            .filter(|&i| self.args[i].is(name))
            .collect()
    }

    /// Whether the command line has the option `name`.
    pub fn has(&self, name: &str) -> bool {
        self.args.iter().any(|a| a.is(name))
    }

    /// The value of the last `name` option (the one QEMU uses for single-valued options).
    pub fn last_value(&self, name: &str) -> Option<&str> {
        self.args
            .iter()
            .rev()
            .find(|a| a.is(name))
            .and_then(|a| a.value.as_deref())
    }

    /// The `-blockdev` whose `node-name` is `node`.
    pub fn blockdev(&self, node: &str) -> Option<usize> {
        (0..self.args.len()).find(|&i| {
            self.args[i].is("blockdev")
                && self.args[i]
                    .opts()
                    .and_then(|o| o.get("node-name"))
                    .as_deref()
                    == Some(node)
        })
    }

    /// Whether any option other than `except` names `id` as a value (`drive=ID`, `file=NODE`,
    /// `chardev:ID`, a JSON string member, ...): the reference scan of the rewrite.
    pub fn mentions(&self, id: &str, except: usize) -> bool {
        let prefixed = format!("chardev:{id}");
        self.args.iter().enumerate().any(|(i, a)| {
            if i == except {
                return false;
            }
            let Some(v) = a.value.as_deref() else {
                return false;
            };
            if v == prefixed {
                return true;
            }
            a.opts().is_some_and(|o| o.strings().contains(&id))
        })
    }
}

/// `-name`/`--name` → `name`; a lone `-` or a word without a leading dash is not an option.
fn option_name(word: &str) -> Option<&str> {
    let rest = word.strip_prefix("--").or_else(|| word.strip_prefix('-'))?;
    (!rest.is_empty()).then_some(rest)
}

fn canonical(name: &str) -> &str {
    match name {
        "M" => "machine",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn options_values_and_unknowns() {
        let argv = [
            "-S",
            "-M",
            "pc,accel=tcg",
            "--kernel",
            "-odd-path",
            "-nodefaults",
            "-future-opt",
            "x",
            "-future-flag",
            "-m",
            "256",
            "stray",
        ];
        let cl = CommandLine::parse(&argv);
        let names: Vec<_> = cl.args.iter().map(|a| a.name.as_deref()).collect();
        assert_eq!(
            names,
            [
                Some("S"),
                Some("machine"),
                Some("kernel"),
                Some("nodefaults"),
                Some("future-opt"),
                Some("future-flag"),
                Some("m"),
                None
            ]
        );
        assert_eq!(cl.last_value("kernel"), Some("-odd-path"));
        assert_eq!(cl.last_value("future-opt"), Some("x"));
        assert_eq!(cl.to_argv(), argv);
        // A value-taking option at the very end keeps its word and gets no value.
        let cl = CommandLine::parse(&["-kernel"]);
        assert_eq!(cl.args[0].value, None);
        assert_eq!(cl.to_argv(), ["-kernel"]);
    }

    #[test]
    fn mentions_scans_values() {
        let cl = CommandLine::parse(&[
            "-blockdev",
            r#"{"driver":"qcow2","node-name":"d0","file":"f0"}"#,
            "-serial",
            "chardev:c0",
            "-device",
            "virtio-blk-pci,drive=d0",
        ]);
        assert!(cl.mentions("f0", 99));
        assert!(cl.mentions("c0", 99));
        assert!(cl.mentions("d0", 0));
        assert!(!cl.mentions("nothing", 99));
        assert_eq!(cl.blockdev("d0"), Some(0));
    }

    proptest! {
        #[test]
        fn any_words_round_trip(words in proptest::collection::vec("-?-?[a-zA-Z0-9=,.{}:]{0,12}", 0..20)) {
            let cl = CommandLine::parse(&words);
            prop_assert_eq!(cl.to_argv(), words);
        }
    }
}
