//! `vmkeep schedule add|list|remove|run`: backup jobs as systemd timers.
//!
//! A job is a oneshot service running `vmkeep schedule run NAME` and a timer firing it every
//! period (or every check period with `--when-changed`). systemd never starts a oneshot while
//! it is still active, and the run takes its own lock besides, so a job that overlaps itself
//! is skipped, never run twice. See [`job`] for where things live and [`run`] for a run.

mod job;
mod run;

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::args::{Global, ScheduleAddArgs, ScheduleCommand};
use crate::output::{print_json, print_line};
use job::{Job, LastRun};

pub fn run(g: &Global, c: &ScheduleCommand) -> Result<u8> {
    match c {
        ScheduleCommand::Add(a) => add(g, a),
        ScheduleCommand::List => list(g),
        ScheduleCommand::Remove { name } => remove(g, name),
        ScheduleCommand::Run { name, force } => run::run(g, name, *force),
    }
}

/// Whether systemd runs this machine (not in containers or CI without it).
fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> Result<String> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .context("run systemctl")?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn add(g: &Global, a: &ScheduleAddArgs) -> Result<u8> {
    job::check_name(&a.name)?;
    let repo = crate::context::repo_location(g)?.to_string();
    if g.password_file.is_none() && std::env::var_os("VMKEEP_PASSWORD").is_some() {
        bail!(
            "a scheduled job cannot use VMKEEP_PASSWORD (the passphrase is never written into a unit): give --password-file FILE"
        );
    }
    // The job must work when the timer fires: the repository opens now, with what it will have.
    crate::context::open_repo(g).context("the job's repository does not open")?;
    let keep: Vec<(String, u32)> = [
        ("last", a.keep.keep_last),
        ("hourly", a.keep.keep_hourly),
        ("daily", a.keep.keep_daily),
        ("weekly", a.keep.keep_weekly),
        ("monthly", a.keep.keep_monthly),
        ("yearly", a.keep.keep_yearly),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
    .collect();
    let job = Job {
        version: 1,
        name: a.name.clone(),
        vm: a.source.vm_name(),
        qmp: a.source.qmp.clone(),
        libvirt: a.source.libvirt.clone(),
        connect: a.source.connect.clone(),
        memory: a.memory,
        allow_qmp_passthrough: a.source.allow_qmp_passthrough,
        every_seconds: a.every,
        when_changed_bytes: a.when_changed,
        check_every_seconds: a.check_every,
        keep,
        replicate_to: a.replicate_to.clone(),
        metrics_dir: a.metrics_dir.clone(),
        repo,
        password_file: g.password_file.clone(),
        token_file: g.token_file.clone(),
        tls_fingerprint: g.tls_fingerprint.clone(),
    };
    let exe = std::env::current_exe().context("find vmkeep's own path")?;
    let service = job.service_unit(&exe);
    let timer = job.timer_unit();
    let units = job::unit_dir();
    if a.dry_run {
        if g.json {
            print_json(&json!({"job": job, "service": service, "timer": timer}))?;
        } else {
            print_line(&format!("# {}", units.join(job.service_name()).display()))?;
            print_line(&service)?;
            print_line(&format!("# {}", units.join(job.timer_name()).display()))?;
            print_line(&timer)?;
        }
        return Ok(0);
    }
    if Job::path(&a.name).exists() {
        bail!(
            "job {} exists: remove it first (`vmkeep schedule remove {}`)",
            a.name,
            a.name
        );
    }
    let jobs = job::jobs_dir();
    std::fs::create_dir_all(&jobs).with_context(|| format!("create {}", jobs.display()))?;
    std::fs::create_dir_all(&units).with_context(|| format!("create {}", units.display()))?;
    write(&units.join(job.service_name()), &service)?;
    write(&units.join(job.timer_name()), &timer)?;
    write(&Job::path(&a.name), &serde_json::to_string_pretty(&job)?)?;
    let enabled = if systemd_running() {
        systemctl(&["daemon-reload"])?;
        systemctl(&["enable", "--now", &job.timer_name()])?;
        true
    } else {
        false
    };
    if g.json {
        print_json(
            &json!({"job": job, "units": [units.join(job.service_name()), units.join(job.timer_name())], "enabled": enabled}),
        )?;
    } else {
        print_line(&format!(
            "job {} written: {} and {}",
            a.name,
            units.join(job.service_name()).display(),
            units.join(job.timer_name()).display()
        ))?;
        if enabled {
            print_line(&format!("  timer {} enabled and started", job.timer_name()))?;
        } else {
            print_line(&format!(
                "  systemd is not running here: start the timer where it runs with `systemctl enable --now {}`",
                job.timer_name()
            ))?;
        }
    }
    Ok(0)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// When the timer fires next: systemd's own figure where it runs, else the last run's start
/// plus the timer's period.
fn next_run(job: &Job, last: Option<&LastRun>) -> Option<String> {
    if systemd_running() {
        if let Ok(v) = systemctl(&[
            "show",
            &job.timer_name(),
            "-p",
            "NextElapseUSecRealtime",
            "--value",
        ]) {
            if !v.is_empty() {
                return Some(v);
            }
        }
    }
    let start = chrono::DateTime::parse_from_rfc3339(&last?.start).ok()?;
    Some(
        (start + chrono::Duration::seconds(job.timer_seconds() as i64))
            .with_timezone(&chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

fn list(g: &Global) -> Result<u8> {
    let jobs = Job::all()?;
    let rows: Vec<_> = jobs
        .iter()
        .map(|j| {
            let last = LastRun::load(&j.name);
            (j, next_run(j, last.as_ref()), last)
        })
        .collect();
    if g.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(j, next, last)| {
                // cli-contract: name, next, last_result, last_seconds; the rest is detail.
                json!({
                    "name": j.name, "next": next,
                    "last_result": last.as_ref().map(|l| l.status.clone()),
                    "last_seconds": last.as_ref().map(|l| l.seconds),
                    "vm": j.vm, "every_seconds": j.every_seconds,
                    "when_changed_bytes": j.when_changed_bytes, "last": last,
                })
            })
            .collect();
        print_json(&v)?;
        return Ok(0);
    }
    if rows.is_empty() {
        print_line("no scheduled jobs (add one with `vmkeep schedule add`)")?;
        return Ok(0);
    }
    for (j, next, last) in rows {
        let last = match last {
            Some(l) => format!(
                "last {} at {} ({:.1} s{})",
                l.status,
                l.start,
                l.seconds,
                l.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ),
            None => "never ran".into(),
        };
        print_line(&format!(
            "{}  vm {}  every {}{}  next {}  {}",
            j.name,
            j.vm,
            job::period(j.every_seconds),
            j.when_changed_bytes
                .map(|b| format!(" or {} changed", crate::size::human(b)))
                .unwrap_or_default(),
            next.as_deref().unwrap_or("when its timer starts"),
            last
        ))?;
    }
    Ok(0)
}

fn remove(g: &Global, name: &str) -> Result<u8> {
    let job = Job::load(name)?;
    if systemd_running() {
        if let Err(e) = systemctl(&["disable", "--now", &job.timer_name()]) {
            tracing::warn!(error = %e, "cannot stop the timer");
        }
    }
    let units = job::unit_dir();
    for p in [
        units.join(job.service_name()),
        units.join(job.timer_name()),
        Job::path(name),
        LastRun::path(name),
        job::state_dir().join(format!("{name}.lock")),
    ] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", p.display())),
        }
    }
    if systemd_running() {
        systemctl(&["daemon-reload"])?;
    }
    if g.json {
        print_json(&json!({"removed": name}))?;
    } else {
        print_line(&format!("job {name} removed"))?;
    }
    Ok(0)
}
