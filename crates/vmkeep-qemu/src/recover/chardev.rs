//! Character devices of a recovered VM: nothing may point at the old place.
//!
//! The frontends (serial ports, guest-agent channels, ...) stay; their backends move into the
//! target folder:
//! - a socket (unix or TCP, server or client, or an fd passed by a manager) becomes a unix
//!   server socket `chardev-<id>.sock` that does not wait for a client: the original VM may
//!   still listen on the old address;
//! - a file becomes `chardev-<id>.log`;
//! - host devices and pipes (`serial`, `tty`, `parallel`, `parport`, `pipe`, `udp`) become
//!   `null`;
//! - anything else (`pty`, `null`, `stdio`, `ringbuf`, `vc`, ...) stays, without a `logfile`.

use std::path::Path;

use super::super::vmdef::cmdline::CommandLine;
use super::super::vmdef::opts::{KeyVal, OptValue};
use crate::error::{Error, Result};

/// Longest unix socket path (`sun_path` is 108 bytes with its NUL).
pub(crate) const UNIX_PATH_MAX: usize = 107;

/// The id as a file-name part.
fn file_part(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() {
        "x".into()
    } else {
        s
    }
}

/// Where a socket chardev of the recovered VM listens.
pub(crate) fn socket_path(dir: &Path, id: &str) -> std::path::PathBuf {
    dir.join(format!("chardev-{}.sock", file_part(id)))
}

/// The `-chardev` value for the new place (see the module docs).
pub(crate) fn relocate(value: &str, dir: &Path) -> Result<String> {
    let old = KeyVal::parse(value);
    let backend = old.implied().or(old.get("backend")).unwrap_or_default();
    let id = old.get("id").unwrap_or_default().to_owned();
    let mux = old.get("mux").map(str::to_owned);
    let fresh = |backend: &str| {
        let mut kv = KeyVal::parse(backend);
        kv.set("id", &id);
        kv
    };
    let mut new = match backend {
        "socket" => {
            let path = socket_path(dir, &id);
            let path = path.display().to_string();
            if path.len() > UNIX_PATH_MAX {
                return Err(Error::Definition(format!(
                    "socket {path} for character device {id} is longer than {UNIX_PATH_MAX} bytes: \
                     choose a shorter target folder"
                )));
            }
            let mut kv = fresh("socket");
            kv.set("path", &path);
            kv.set("server", "on");
            kv.set("wait", "off");
            kv
        }
        "file" => {
            let mut kv = fresh("file");
            let path = dir.join(format!("chardev-{}.log", file_part(&id)));
            kv.set("path", &path.display().to_string());
            kv
        }
        "serial" | "tty" | "parallel" | "parport" | "pipe" | "udp" => fresh("null"),
        _ => {
            let mut kv = old.clone();
            kv.remove("logfile");
            kv.remove("logappend");
            return Ok(kv.render());
        }
    };
    if let Some(m) = mux {
        new.set("mux", &m);
    }
    Ok(new.render())
}

/// A `-chardev` writing to `log` with the id of `value` (the serial console's backend).
pub(crate) fn to_log_file(value: &str, log: &Path) -> String {
    let old = KeyVal::parse(value);
    let mut kv = KeyVal::parse("file");
    kv.set("id", old.get("id").unwrap_or_default());
    kv.set("path", &log.display().to_string());
    kv.render()
}

/// The id of the chardev a serial device uses when the console is `-device isa-serial`.
pub(crate) fn serial_device_chardev(cl: &CommandLine) -> Option<String> {
    cl.find("device").into_iter().find_map(|i| {
        let o = cl.args[i].opts()?;
        let driver = match &o {
            OptValue::KeyVal(kv) => kv.implied().map(str::to_owned).or(o.get("driver")),
            OptValue::Json(_) => o.get("driver"),
        };
        (driver.as_deref() == Some("isa-serial"))
            .then(|| o.get("chardev"))
            .flatten()
    })
}

/// The `-chardev` option with id `id`.
pub(crate) fn find(cl: &CommandLine, id: &str) -> Option<usize> {
    cl.find("chardev")
        .into_iter()
        .find(|&i| cl.args[i].opts().and_then(|o| o.get("id")).as_deref() == Some(id))
}

/// Removes the chardevs in `ids` that nothing uses any more.
pub(crate) fn drop_unused(cl: &mut CommandLine, ids: &[String]) {
    for id in ids {
        if let Some(i) = find(cl, id) {
            if !cl.mentions(id, i) {
                cl.args.remove(i);
            }
        }
    }
}

/// The chardev id behind a legacy spec (`chardev:ID`), or behind `-mon chardev=ID`.
pub(crate) fn referenced_id(option: &str, value: &str) -> Option<String> {
    if option == "mon" {
        let kv = KeyVal::parse(value);
        return kv.get("chardev").or(kv.implied()).map(str::to_owned);
    }
    value.strip_prefix("chardev:").map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_move_into_the_target() {
        let d = Path::new("/t");
        assert_eq!(
            relocate("socket,id=charchannel0,fd=30,server=on,wait=off", d).unwrap(),
            "socket,id=charchannel0,path=/t/chardev-charchannel0.sock,server=on,wait=off"
        );
        assert_eq!(
            relocate(
                "socket,id=c,host=0.0.0.0,port=4444,server=on,wait=off,mux=on",
                d
            )
            .unwrap(),
            "socket,id=c,path=/t/chardev-c.sock,server=on,wait=off,mux=on"
        );
        assert_eq!(
            relocate("file,id=f/x,path=/old/log,logfile=/old/l", d).unwrap(),
            "file,id=f/x,path=/t/chardev-f_x.log"
        );
        assert_eq!(
            relocate("serial,id=s,path=/dev/ttyS0", d).unwrap(),
            "null,id=s"
        );
        assert_eq!(
            relocate("pty,id=charserial0,logfile=/var/log/x,logappend=on", d).unwrap(),
            "pty,id=charserial0"
        );
        let long = Path::new("/a-very-long-folder-name-for-a-socket-path-that-linux-refuses/and-more-and-more-and-more/and-more-and-more-and-more");
        assert!(relocate("socket,id=c,path=/x", long).is_err());
        assert_eq!(
            to_log_file("pty,id=charserial0", Path::new("/t/serial.log")),
            "file,id=charserial0,path=/t/serial.log"
        );
    }

    #[test]
    fn references() {
        assert_eq!(
            referenced_id("mon", "chardev=m,mode=control").as_deref(),
            Some("m")
        );
        assert_eq!(referenced_id("mon", "m").as_deref(), Some("m"));
        assert_eq!(referenced_id("serial", "chardev:s").as_deref(), Some("s"));
        assert_eq!(referenced_id("serial", "stdio"), None);
        let mut cl = CommandLine::parse(&[
            "-chardev",
            "pty,id=charserial0",
            "-device",
            r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0"}"#,
            "-chardev",
            "socket,id=mon,path=/m",
        ]);
        assert_eq!(serial_device_chardev(&cl).as_deref(), Some("charserial0"));
        drop_unused(&mut cl, &["charserial0".into(), "mon".into()]);
        assert_eq!(cl.args.len(), 2);
    }
}
