//! The vitals of a libvirt domain (`vmkeep verify` of a libvirt restore point): libvirt runs
//! QEMU and holds its monitor, so the signs come from libvirt: the domain's state and its
//! reason (`virsh domstate --reason`), and guest-agent pings through libvirt
//! (`virsh qemu-agent-command`), since libvirt is the agent socket's only client.

use std::time::{Duration, Instant};

use super::evidence::Vitals;
use crate::capture::libvirt::Virsh;

/// At most one `virsh domstate` per this (a call costs ~15 ms of libvirt's time).
const STATE_EVERY: Duration = Duration::from_millis(500);

pub struct LibvirtVitals {
    virsh: Virsh,
    last: Option<Instant>,
}

impl LibvirtVitals {
    pub fn new(virsh: Virsh) -> LibvirtVitals {
        LibvirtVitals { virsh, last: None }
    }

    /// `(state, reason)`, e.g. `("running", "booted")`, `("shut off", "crashed")`.
    fn state(&self) -> Result<(String, String), String> {
        let out = self
            .virsh
            .domain_cmd("domstate", &["--reason"])
            .map_err(|e| match e.to_string() {
                m if m.contains("Domain not found") => {
                    format!("the domain is gone from libvirt (removed by someone else?): {m}")
                }
                m => format!("libvirt does not report the domain's state: {m}"),
            })?;
        Ok(parse_state(&out))
    }
}

/// `virsh domstate --reason` output: `running (booted)`.
fn parse_state(out: &str) -> (String, String) {
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    match line.split_once(" (") {
        Some((state, reason)) => (state.to_string(), reason.trim_end_matches(')').to_string()),
        None => (line.to_string(), String::new()),
    }
}

/// Why a domain in `state` for `reason` is dead or dying; None while it may still live.
fn death(state: &str, reason: &str) -> Option<String> {
    match (state, reason) {
        ("running", _) => None,
        ("paused", "ioerror") => Some("the domain stopped on a disk I/O error".into()),
        ("paused", "crashed") | ("crashed", _) => {
            Some(format!("the guest crashed ({state}, {reason})"))
        }
        ("shut off", "crashed") => Some("the guest crashed (libvirt stopped it)".into()),
        ("shut off", "shutdown") | ("in shutdown", _) => Some("the guest shut itself down".into()),
        ("shut off", "destroyed") => Some("the domain was destroyed (by someone else)".into()),
        ("shut off", r) => Some(format!("the domain stopped (shut off, reason: {r})")),
        // Paused for another reason (a user, a migration): not dead, but not running either;
        // run_state says so when it matters.
        _ => None,
    }
}

impl Vitals for LibvirtVitals {
    fn signs_of_death(&mut self) -> Result<(), String> {
        if self.last.is_some_and(|t| t.elapsed() < STATE_EVERY) {
            return Ok(());
        }
        self.last = Some(Instant::now());
        let (state, reason) = self.state()?;
        match death(&state, &reason) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    fn run_state(&mut self) -> Result<(), String> {
        let (state, reason) = self.state()?;
        if state != "running" {
            return Err(format!("the domain is {state} ({reason}), not running"));
        }
        Ok(())
    }

    fn ping_agent(&mut self, timeout: Duration) -> Result<(), String> {
        let secs = timeout.as_secs().max(1).to_string();
        self.virsh
            .domain_cmd(
                "qemu-agent-command",
                &["--timeout", &secs, r#"{"execute":"guest-ping"}"#],
            )
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_reasons() {
        assert_eq!(
            parse_state("running (booted)\n\n"),
            ("running".into(), "booted".into())
        );
        assert_eq!(
            parse_state("shut off (destroyed)"),
            ("shut off".into(), "destroyed".into())
        );
        assert_eq!(parse_state("running"), ("running".into(), String::new()));
        assert!(death("running", "restored").is_none());
        assert!(death("paused", "user").is_none());
        assert!(death("paused", "ioerror").unwrap().contains("I/O error"));
        assert!(death("shut off", "shutdown")
            .unwrap()
            .contains("shut itself down"));
        assert!(death("shut off", "destroyed")
            .unwrap()
            .contains("destroyed"));
        assert!(death("shut off", "unknown").unwrap().contains("stopped"));
        assert!(death("crashed", "panicked").unwrap().contains("crashed"));
    }
}
