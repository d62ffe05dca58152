//! libvirt's QEMU monitor passthrough (`virsh qemu-monitor-command`), used for the one thing
//! libvirt has no API for: the background snapshot behind `--memory`.
//!
//! libvirt marks a domain tainted ("custom-monitor") the first time a command goes through it,
//! since libvirt can no longer vouch for QEMU's state. vmkeep passes through only migration
//! commands libvirt does not track (capabilities and parameters it puts back, `getfd`,
//! `migrate` to that fd, `query-migrate`, `migrate_cancel`), and only when the user allowed
//! it with `--allow-qmp-passthrough`.

use std::os::fd::BorrowedFd;

use serde_json::{json, Value};

use super::virsh::Virsh;
use crate::error::{Error, Result};

/// The monitor of the domain `virsh` names.
pub struct Monitor<'a> {
    virsh: &'a Virsh,
}

impl<'a> Monitor<'a> {
    pub fn new(virsh: &'a Virsh) -> Monitor<'a> {
        Monitor { virsh }
    }

    /// Runs one QMP command and returns its `return` value.
    pub fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        self.call(command, arguments, None)
    }

    /// [`Monitor::execute`], passing `fd` to QEMU with the command (for `getfd`).
    pub fn execute_passing(
        &self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value> {
        self.call(command, arguments, Some(fd))
    }

    fn call(&self, command: &str, arguments: Value, fd: Option<BorrowedFd<'_>>) -> Result<Value> {
        let mut message = json!({ "execute": command });
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        let message = message.to_string();
        let number = fd.map(|f| std::os::fd::AsRawFd::as_raw_fd(&f).to_string());
        let mut args = vec!["qemu-monitor-command", self.virsh.domain.as_str()];
        if let Some(n) = &number {
            args.extend(["--pass-fds", n.as_str()]);
        }
        args.push(&message);
        let out = self.virsh.run_passing(&args, fd)?;
        parse_reply(command, &out)
    }
}

/// QEMU's reply as virsh prints it: `{"return": ...}` or `{"error": {"class", "desc"}}` (virsh
/// exits 0 for both).
fn parse_reply(command: &str, out: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(out.trim()).map_err(|e| {
        Error::QmpProtocol(format!(
            "libvirt's monitor passthrough answered {command} with something not JSON ({e}): {}",
            out.trim()
        ))
    })?;
    if let Some(err) = v.get("error") {
        return Err(Error::QmpCommand {
            command: command.to_string(),
            class: err["class"].as_str().unwrap_or("unknown").to_string(),
            desc: err["desc"].as_str().unwrap_or("no description").to_string(),
        });
    }
    v.get("return").cloned().ok_or_else(|| {
        Error::QmpProtocol(format!(
            "libvirt's monitor passthrough answered {command} without a return value: {}",
            out.trim()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_give_the_return_value_or_qemus_error() {
        let v = parse_reply(
            "query-status",
            r#"{"return":{"running":true},"id":"libvirt-9"}"#,
        )
        .unwrap();
        assert_eq!(v["running"], true);
        let e = parse_reply(
            "migrate-set-capabilities",
            r#"{"id":"libvirt-482","error":{"class":"GenericError","desc":"Background-snapshot is not supported by host kernel"}}"#,
        )
        .unwrap_err();
        assert!(matches!(&e, Error::QmpCommand { desc, .. } if desc.contains("host kernel")));
        assert!(parse_reply("x", "not json").is_err());
        assert!(parse_reply("x", r#"{"id":"1"}"#).is_err());
    }
}
