//! `vmkeep schedule run NAME`: one run of a job, as its timer starts it.
//!
//! 1. The job's run lock (`STATE/schedule/NAME.lock`, flock): held means the previous run
//!    still runs, and this one is skipped (recorded, exit 0): a job never runs twice at once.
//! 2. With `--when-changed`: due when the period has passed since the last backup, or when
//!    the dirty bitmaps of this repository's chain count that much change (mechanism 22;
//!    `vmkeep_qemu::capture::changed`). A VM never backed up, or whose change cannot be
//!    measured, is due: protection comes first.
//! 3. The steps, each the vmkeep binary itself with the job's repository settings: `backup
//!    vm`, then `prune --vm` when the job keeps by policy, then `replicate --to --vm`. The first
//!    failing step ends the run with its exit status.
//! 4. The result (`STATE/schedule/NAME.json`) for `schedule list`.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result};

use super::job::{self, Job, LastRun};
use crate::args::Global;
use crate::output::{print_json, print_line};
use crate::size::human;

pub fn run(g: &Global, name: &str, force: bool) -> Result<u8> {
    let job = Job::load(name)?;
    let dir = job::state_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let lock_path = dir.join(format!("{name}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    let previous = LastRun::load(name);
    let now = chrono::Utc::now();
    let stamp = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let msg = format!("skipped: the previous run of job {name} is still running");
        LastRun {
            status: "skipped".into(),
            start: stamp,
            message: Some(msg.clone()),
            last_backup_start: previous.and_then(|p| p.last_backup_start),
            ..Default::default()
        }
        .save(name)?;
        say(
            g,
            &msg,
            serde_json::json!({"job": name, "status": "skipped", "message": msg}),
        )?;
        return Ok(0);
    }
    let trigger = match due(g, &job, previous.as_ref(), now, force)? {
        Some(t) => t,
        None => return Ok(0),
    };
    let t0 = Instant::now();
    let outcome = steps(&job);
    let seconds = t0.elapsed().as_secs_f64();
    let (status, code, restore_point, message) = match &outcome {
        Ok(id) => ("ok", 0u8, id.clone(), None),
        Err((code, msg)) => ("failed", *code, None, Some(msg.clone())),
    };
    // A failed run does not count as a backup: --when-changed retries at the next check.
    let last_backup_start = if code == 0 {
        Some(stamp.clone())
    } else {
        previous.as_ref().and_then(|p| p.last_backup_start.clone())
    };
    let result = LastRun {
        status: status.into(),
        start: stamp,
        seconds,
        trigger: Some(trigger.clone()),
        restore_point: restore_point.clone(),
        message: message.clone(),
        last_backup_start,
    };
    result.save(name)?;
    let line = match outcome {
        Ok(_) => format!(
            "job {name}: restore point {} ({trigger}) in {seconds:.1} s",
            restore_point.as_deref().unwrap_or("?")
        ),
        Err((_, msg)) => format!("job {name} failed: {msg}"),
    };
    let mut v = serde_json::to_value(&result)?;
    v["job"] = name.into();
    say(g, &line, v)?;
    drop(lock);
    Ok(code)
}

/// Why the job runs now, or None (printed) when it is not due.
fn due(
    g: &Global,
    job: &Job,
    previous: Option<&LastRun>,
    now: chrono::DateTime<chrono::Utc>,
    force: bool,
) -> Result<Option<String>> {
    if force {
        return Ok(Some("forced".into()));
    }
    let Some(threshold) = job.when_changed_bytes else {
        return Ok(Some("timer".into()));
    };
    let last = previous
        .and_then(|p| p.last_backup_start.as_deref())
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
    let Some(last) = last else {
        return Ok(Some("first run".into()));
    };
    if now.signed_duration_since(last).num_seconds() >= job.every_seconds as i64 {
        return Ok(Some(format!("{} passed", job::period(job.every_seconds))));
    }
    let changed = match measure(g, job) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(Some("no checkpoint of this repository yet".into())),
        Err(e) => return Ok(Some(format!("change unknown ({e:#})"))),
    };
    if changed >= threshold {
        return Ok(Some(format!("{} changed", human(changed))));
    }
    let next = (last + chrono::Duration::seconds(job.every_seconds as i64))
        .with_timezone(&chrono::Utc)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    say(
        g,
        &format!(
            "job {}: not due ({} changed of {}, next by time {next})",
            job.name,
            human(changed),
            human(threshold),
        ),
        serde_json::json!({"job": job.name, "status": "not-due", "changed_bytes": changed,
                           "when_changed_bytes": threshold, "next_by_time": next}),
    )?;
    Ok(None)
}

/// A line for people, or with --json one document for scripts.
fn say(g: &Global, line: &str, v: serde_json::Value) -> Result<()> {
    if g.json {
        print_json(&v)
    } else {
        print_line(line)
    }
}

/// Bytes the guest wrote since this repository's latest checkpoint.
fn measure(g: &Global, job: &Job) -> Result<Option<u64>> {
    let mut settings = g.clone();
    settings.repo = Some(job.repo.clone());
    settings.password_file = job.password_file.clone();
    settings.token_file = job.token_file.clone();
    settings.tls_fingerprint = job.tls_fingerprint.clone();
    let repo = crate::context::open_repo(&settings)?;
    let chain = crate::context::chain_of(&repo);
    let changed = match (&job.qmp, &job.libvirt) {
        (Some(qmp), _) => vmkeep_qemu::capture::changed::since_checkpoint_qmp(qmp, &chain)?,
        (None, Some(domain)) => {
            let virsh = vmkeep_qemu::capture::libvirt::Virsh::new(job.connect.clone(), domain);
            vmkeep_qemu::capture::changed::since_checkpoint_libvirt(&virsh, &chain)?
        }
        (None, None) => None,
    };
    Ok(changed)
}

/// The job's steps; the restore point's id, or the failing step's exit status and message.
fn steps(job: &Job) -> Result<Option<String>, (u8, String)> {
    let mut backup = vec!["backup".to_string(), "vm".into()];
    match (&job.qmp, &job.libvirt) {
        (Some(q), _) => backup.extend(["--qmp".into(), q.display().to_string()]),
        (None, Some(d)) => {
            backup.extend(["--libvirt".into(), d.clone()]);
            if let Some(c) = &job.connect {
                backup.extend(["--connect".into(), c.clone()]);
            }
        }
        (None, None) => return Err((2, "the job names no VM source".into())),
    }
    backup.extend(["--vm".into(), job.vm.clone()]);
    if job.memory {
        backup.push("--memory".into());
        if job.allow_qmp_passthrough {
            backup.push("--allow-qmp-passthrough".into());
        }
    }
    let out = step(job, "backup", &backup)?;
    let id = serde_json::from_slice::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string));
    if !job.keep.is_empty() {
        let mut prune = vec!["prune".to_string(), "--vm".into(), job.vm.clone()];
        for (k, n) in &job.keep {
            prune.push(format!("--keep-{k}"));
            prune.push(
                if *n == vmkeep_core::retention::RetentionPolicy::UNLIMITED {
                    "unlimited".into()
                } else {
                    n.to_string()
                },
            );
        }
        step(job, "prune", &prune)?;
    }
    if let Some(to) = &job.replicate_to {
        step(
            job,
            "replicate",
            &[
                "replicate".into(),
                "--to".into(),
                to.clone(),
                "--vm".into(),
                job.vm.clone(),
            ],
        )?;
    }
    Ok(id)
}

/// `vmkeep --repo ... --json -q ARGS`: its stdout, or its exit status and last error line.
fn step(job: &Job, what: &str, args: &[String]) -> Result<Vec<u8>, (u8, String)> {
    let exe = std::env::current_exe().map_err(|e| (1, format!("find vmkeep's own path: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.args(["--repo", &job.repo, "--json", "-q"]);
    if let Some(p) = &job.password_file {
        cmd.arg("--password-file").arg(p);
    }
    if let Some(p) = &job.token_file {
        cmd.arg("--token-file").arg(p);
    }
    if let Some(f) = &job.tls_fingerprint {
        cmd.args(["--tls-fingerprint", f]);
    }
    if let Some(d) = &job.metrics_dir {
        cmd.arg("--metrics-file")
            .arg(d.join(format!("vmkeep-{}-{what}.prom", job.name)));
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| (1, format!("{what}: cannot start vmkeep: {e}")))?;
    // The step's own log lines go on to the job's log (the journal under systemd).
    let err = String::from_utf8_lossy(&out.stderr);
    eprint!("{err}");
    if out.status.success() {
        return Ok(out.stdout);
    }
    let line = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim_start_matches("vmkeep: error: ")
        .to_string();
    Err((
        out.status.code().unwrap_or(1).clamp(1, 255) as u8,
        format!("{what}: {line}"),
    ))
}
