//! A guest-agent ping (qemu-guest-agent's protocol: one JSON command per line on the
//! virtio-serial port `org.qemu.guest_agent.0`, whose host end the recovered VM serves as a
//! unix socket, [`super::chardev`]).
//!
//! `guest-sync` with a random id comes first: replies left over from an earlier client (the
//! agent answers whoever is connected) are skipped until the one carrying our id, then
//! `guest-ping` must return. Replies are bounded ([`REPLY_MAX`]) and the whole exchange by a
//! timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::super::vmdef::cmdline::CommandLine;
use super::super::vmdef::opts::OptValue;
use super::super::vmdef::VmDefinition;

/// The port name qemu-guest-agent listens on.
pub const AGENT_PORT: &str = "org.qemu.guest_agent.0";
/// Longest reply line read.
const REPLY_MAX: u64 = 64 << 10;

/// One ping; `Err` says what went wrong.
pub fn ping(socket: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    let id = u32::from_le_bytes(vmkeep_core::SnapshotId::random().0[..4].try_into().unwrap())
        & 0x7fff_ffff;
    send(
        &mut writer,
        &json!({"execute": "guest-sync", "arguments": {"id": id}}),
    )?;
    loop {
        let reply = read_reply(&mut reader, deadline)?;
        if reply.get("return") == Some(&json!(id)) {
            break;
        }
    }
    send(&mut writer, &json!({"execute": "guest-ping"}))?;
    let reply = read_reply(&mut reader, deadline)?;
    match reply.get("return") {
        Some(_) => Ok(()),
        None => Err(format!("guest-ping answered {reply}")),
    }
}

fn send(w: &mut UnixStream, cmd: &Value) -> Result<(), String> {
    let mut line = cmd.to_string();
    line.push('\n');
    w.write_all(line.as_bytes())
        .map_err(|e| format!("send: {e}"))
}

fn read_reply(r: &mut BufReader<UnixStream>, deadline: Instant) -> Result<Value, String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no reply in time".into());
        }
        r.get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take(REPLY_MAX)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    "no reply in time".to_string()
                }
                _ => format!("read: {e}"),
            })?;
        if n == 0 {
            return Err("the agent closed the connection".into());
        }
        if !line.ends_with(b"\n") && n as u64 >= REPLY_MAX {
            return Err(format!("a reply longer than {REPLY_MAX} bytes"));
        }
        // The agent may send a 0xFF sentinel or blank lines between replies.
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{FFFD}');
        if text.is_empty() {
            continue;
        }
        return serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {text:?}"));
    }
}

/// The chardev id of the VM's guest-agent port, if it has one
/// (`-device virtserialport,...,name=org.qemu.guest_agent.0,chardev=ID`, or its JSON form).
pub fn agent_chardev(def: &VmDefinition) -> Option<String> {
    let cl = CommandLine::parse(&def.args);
    cl.args.iter().filter(|a| a.is("device")).find_map(|a| {
        let opts = a.opts()?;
        let driver = match &opts {
            OptValue::KeyVal(kv) => kv.implied().or(kv.get("driver")).map(str::to_string),
            OptValue::Json(_) => opts.get("driver"),
        }?;
        if driver != "virtserialport" || opts.get("name").as_deref() != Some(AGENT_PORT) {
            return None;
        }
        opts.get("chardev")
    })
}

/// Where the recovered VM serves its guest agent, when it has one on a socket (chardevs move
/// into the target folder, [`super::chardev`]).
pub fn agent_socket(def: &VmDefinition, target_dir: &Path) -> Option<std::path::PathBuf> {
    agent_chardev(def).map(|id| super::chardev::socket_path(target_dir, &id))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::vmdef::test_definition as def;

    #[test]
    fn the_agent_port_is_found_in_either_syntax() {
        let kv = def(&[
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
        assert_eq!(agent_chardev(&kv).as_deref(), Some("qga0"));
        let js = def(&[
            "-device",
            r#"{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"charchannel0","id":"channel0","name":"org.qemu.guest_agent.0"}"#,
        ]);
        assert_eq!(agent_chardev(&js).as_deref(), Some("charchannel0"));
        let other = def(&["-device", "virtserialport,chardev=c,name=com.example.x"]);
        assert_eq!(agent_chardev(&other), None);
    }
}
