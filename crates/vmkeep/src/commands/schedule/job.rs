//! A scheduled job: its definition (JSON, written by `schedule add`), its last result (JSON,
//! written by `schedule run`), and its systemd units.
//!
//! Where they live (each overridable for tests and unprivileged use):
//! - definitions: `$VMKEEP_SCHEDULE_DIR` (default `/etc/vmkeep/schedule`), `NAME.json`;
//! - results and run locks: `$VMKEEP_STATE_DIR/schedule` (default `/var/lib/vmkeep`);
//! - units: `$VMKEEP_UNIT_DIR` (default `/etc/systemd/system`), `vmkeep-NAME.{service,timer}`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// What a job does, as `schedule add` recorded it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub version: u32,
    pub name: String,
    pub vm: String,
    pub qmp: Option<PathBuf>,
    pub libvirt: Option<String>,
    pub connect: Option<String>,
    pub memory: bool,
    /// `--allow-qmp-passthrough` (libvirt with memory).
    #[serde(default)]
    pub allow_qmp_passthrough: bool,
    pub every_seconds: u64,
    pub when_changed_bytes: Option<u64>,
    pub check_every_seconds: Option<u64>,
    /// `--keep-daily 7` and the like, as prune takes them.
    pub keep: Vec<(String, u32)>,
    pub replicate_to: Option<String>,
    pub metrics_dir: Option<PathBuf>,
    /// The repository and how to open it (never a passphrase itself).
    pub repo: String,
    pub password_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub tls_fingerprint: Option<String>,
}

/// What the last run did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LastRun {
    /// `ok`, `failed`, `skipped` (the previous run still ran), `not-due`.
    pub status: String,
    pub start: String,
    pub seconds: f64,
    /// Why it ran: `timer`, `changed <size>`, `forced`.
    pub trigger: Option<String>,
    pub restore_point: Option<String>,
    pub message: Option<String>,
    /// The start of the last run that backed up (for --when-changed's period).
    pub last_backup_start: Option<String>,
}

fn env_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

pub fn jobs_dir() -> PathBuf {
    env_dir("VMKEEP_SCHEDULE_DIR", "/etc/vmkeep/schedule")
}

/// vmkeep's state folder (also where the host id lives).
fn state_root() -> PathBuf {
    env_dir("VMKEEP_STATE_DIR", "/var/lib/vmkeep")
}

pub fn state_dir() -> PathBuf {
    state_root().join("schedule")
}

pub fn unit_dir() -> PathBuf {
    env_dir("VMKEEP_UNIT_DIR", "/etc/systemd/system")
}

pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        bail!("job name {name:?}: use 1-64 letters, digits, `-`, `_` or `.`");
    }
    Ok(())
}

impl Job {
    pub fn path(name: &str) -> PathBuf {
        jobs_dir().join(format!("{name}.json"))
    }

    pub fn load(name: &str) -> Result<Job> {
        check_name(name)?;
        let p = Job::path(name);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "no job {name} ({}): see `vmkeep schedule list`",
                p.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("job file {} is damaged", p.display()))
    }

    pub fn all() -> Result<Vec<Job>> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(jobs_dir()) else {
            return Ok(out);
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".json")
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        for n in names {
            out.push(Job::load(&n)?);
        }
        Ok(out)
    }

    /// How often the timer fires: the check period with --when-changed, else the period.
    pub fn timer_seconds(&self) -> u64 {
        match self.when_changed_bytes {
            Some(_) => self
                .check_every_seconds
                .unwrap_or(60)
                .min(self.every_seconds),
            None => self.every_seconds,
        }
    }

    pub fn service_name(&self) -> String {
        format!("vmkeep-{}.service", self.name)
    }

    pub fn timer_name(&self) -> String {
        format!("vmkeep-{}.timer", self.name)
    }

    fn what(&self) -> String {
        let mut s = format!("back up {} every {}", self.vm, period(self.every_seconds));
        if let Some(b) = self.when_changed_bytes {
            s.push_str(&format!(", or once {} changed", crate::size::human(b)));
        }
        s
    }

    /// The service: one `vmkeep schedule run NAME`, a oneshot, so systemd never starts it
    /// while it still runs (the run's own lock covers manual runs too).
    pub fn service_unit(&self, exe: &Path) -> String {
        let mut env = String::new();
        for (var, dir, default) in [
            ("VMKEEP_SCHEDULE_DIR", jobs_dir(), "/etc/vmkeep/schedule"),
            ("VMKEEP_STATE_DIR", state_root(), "/var/lib/vmkeep"),
        ] {
            if dir != Path::new(default) {
                env.push_str(&format!("Environment=\"{var}={}\"\n", dir.display()));
            }
        }
        format!(
            "# Written by `vmkeep schedule add {name}`; remove with `vmkeep schedule remove {name}`.\n\
             [Unit]\n\
             Description=vmkeep job {name}: {what}\n\
             Wants=network-online.target\n\
             After=network-online.target\n\
             \n\
             [Service]\n\
             Type=oneshot\n\
             {env}ExecStart={exe} schedule run {name}\n",
            name = self.name,
            what = self.what(),
            exe = exe.display(),
        )
    }

    pub fn timer_unit(&self) -> String {
        let p = period(self.timer_seconds());
        format!(
            "# Written by `vmkeep schedule add {name}`.\n\
             [Unit]\n\
             Description=vmkeep job {name}: {what}\n\
             \n\
             [Timer]\n\
             OnBootSec={p}\n\
             OnUnitActiveSec={p}\n\
             AccuracySec=1s\n\
             Unit={service}\n\
             \n\
             [Install]\n\
             WantedBy=timers.target\n",
            name = self.name,
            what = self.what(),
            service = self.service_name(),
        )
    }
}

/// Seconds as systemd writes a time span: 90 -> `90s`, 3600 -> `1h`.
pub fn period(s: u64) -> String {
    if s % 86400 == 0 {
        format!("{}d", s / 86400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}min", s / 60)
    } else {
        format!("{s}s")
    }
}

impl LastRun {
    pub fn path(name: &str) -> PathBuf {
        state_dir().join(format!("{name}.json"))
    }

    pub fn load(name: &str) -> Option<LastRun> {
        serde_json::from_str(&std::fs::read_to_string(LastRun::path(name)).ok()?).ok()
    }

    /// Written aside, then renamed: a reader never sees half a file.
    pub fn save(&self, name: &str) -> Result<()> {
        let p = LastRun::path(name);
        let dir = p.parent().expect("a file has a folder");
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("write {}", p.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_read_as_systemd_writes_them() {
        assert_eq!(period(15), "15s");
        assert_eq!(period(300), "5min");
        assert_eq!(period(3600), "1h");
        assert_eq!(period(86400 * 2), "2d");
        assert_eq!(period(90), "90s");
    }

    #[test]
    fn names_are_unit_safe() {
        assert!(check_name("web1-hourly").is_ok());
        for bad in ["", "a/b", "a b", ".hidden", "x;rm"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
