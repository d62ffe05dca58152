//! `vmkeep verify SNAP... [--all-new]`: each restore point resumed (memory) or booted (cold)
//! in a sandbox, watched for evidence of life, its result recorded beside it (FORMAT.md §9.1).
//!
//! The sandbox is an instant recovery into a private temporary folder: the disks served from
//! the repository behind throwaway qcow2 overlays, the network cut off (every NIC kept, its
//! backend going nowhere: vmkeep-qemu `recover::network`), chardev sockets and logs moved into
//! the folder. Nothing of the VM outlives the run: QEMU is stopped and the folder removed,
//! whatever happened. A console screenshot is saved where the VM has a display.
//!
//! A restore point that does not come back is a result (exit status 3), not an error: every
//! failure on the way (no usable QEMU, a memory state that does not load, a disk read error
//! in the guest, no evidence before the timeout) becomes its reason.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::Utc;
use serde_json::{json, Value};
use vmkeep_qemu::recover::agent::agent_socket;
use vmkeep_qemu::recover::evidence::{Evidence, Probe, SerialPattern, Verdict};
use vmkeep_qemu::recover::{self, RecoveryPlan, StartMode};
use vmkeep_qemu::vmdef::DEFINITION_STREAM;
use vmkeep_repo::backup::MEMORY_STREAM;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::verification::{ScreenshotInfo, VerificationRecord, VerifyMode};
use vmkeep_repo::{Manifest, NoProgress, Repository};

use super::instant::InstantDisks;
use super::recover::{definition, write_stream};
use crate::args::{Global, VerifyArgs};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::scratch::ScratchDir;
use crate::signals::{stop_on_signals, stop_requested, STOP};
use crate::EXIT_DAMAGE;

pub fn run(g: &Global, a: &VerifyArgs) -> Result<u8> {
    // Checked before anything starts.
    let serial = match &a.serial {
        Some(p) => Some(
            regex::Regex::new(p)
                .with_context(|| format!("--serial {p:?} is not a regular expression"))?,
        ),
        None => None,
    };
    if a.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    let screenshots = screenshot_dir(a)?;
    stop_on_signals()?;
    let repo = Arc::new(open_repo(g)?);
    // A prune meanwhile keeps what the restore points being verified reference.
    let _lease = repo.read_lease();
    let (targets, skipped) = select(&repo, a)?;
    if targets.is_empty() && !g.json {
        print_line("no restore point to verify")?;
    }
    let index = BlobIndex::load(&repo)?;
    let mut results = Vec::new();
    let mut unrecorded = Vec::new();
    for m in &targets {
        if !g.json {
            print_line(&format!(
                "verifying restore point {:#} of VM {} ...",
                m.id, m.vm
            ))?;
        }
        let Some(rec) = verify_one(&repo, &index, m, a, serial.as_ref(), &screenshots) else {
            bail!(
                "interrupted while verifying {:#}: nothing recorded for it{}",
                m.id,
                match results.len() {
                    0 => String::new(),
                    n => format!(" ({n} earlier result(s) recorded)"),
                }
            );
        };
        // A run that failed while the repository did not answer proves nothing about the
        // restore point: it is not recorded as a failure.
        if !rec.ok {
            if let Err(e) = repo.answers() {
                bail!(
                    "the repository does not answer ({e}) after verifying {:#} failed ({}): \
                     nothing recorded for it; run verify again when it answers",
                    m.id,
                    rec.reason.as_deref().unwrap_or("no reason")
                );
            }
        }
        let recorded = match repo.record_verification(&rec) {
            Ok(_) => true,
            Err(e) => {
                unrecorded.push(format!("{:#}: {e:#}", m.id));
                false
            }
        };
        if !g.json {
            print_line(&human(&rec, &screenshots))?;
        }
        results.push(result_json(&rec, &screenshots, recorded));
    }
    let all_ok = results.iter().all(|r| r["ok"] == true);
    if g.json {
        print_json(&json!({"results": results, "skipped": skipped}))?;
    } else {
        for s in &skipped {
            print_line(&format!("skipped {}: {}", s["id"], s["reason"]))?;
        }
    }
    if !unrecorded.is_empty() {
        bail!(
            "could not record the result of {} (the results above stand; run verify again to \
             record them)",
            unrecorded.join("; ")
        );
    }
    Ok(if all_ok { 0 } else { EXIT_DAMAGE })
}

/// The restore points named, then (with --all-new) every one without a record; and those
/// --all-new passed over, with why.
fn select(repo: &Repository, a: &VerifyArgs) -> Result<(Vec<Manifest>, Vec<Value>)> {
    let mut out: Vec<Manifest> = Vec::new();
    for s in &a.snapshots {
        let m = repo.resolve(s)?;
        if !out.iter().any(|o| o.id == m.id) {
            out.push(m);
        }
    }
    let mut skipped = Vec::new();
    if a.all_new {
        let verified = repo.verifications()?;
        for m in repo.snapshots()? {
            if a.vm.as_deref().is_some_and(|vm| vm != m.vm)
                || verified.by_snapshot.contains_key(&m.id)
                || out.iter().any(|o| o.id == m.id)
            {
                continue;
            }
            if !m.streams.iter().any(|s| s.name == DEFINITION_STREAM)
                && !super::verify_libvirt::is_libvirt(&m)
            {
                skipped.push(json!({"id": m.id, "reason":
                    "no VM definition or libvirt domain XML (an image backup): nothing to start"}));
                continue;
            }
            out.push(m);
        }
    }
    Ok((out, skipped))
}

/// Runs one restore point in the sandbox; every failure becomes the record's reason. `None`
/// when interrupted (SIGINT, SIGTERM): no result either way.
fn verify_one(
    repo: &Arc<Repository>,
    index: &BlobIndex,
    m: &Manifest,
    a: &VerifyArgs,
    serial: Option<&regex::Regex>,
    screenshots: &Path,
) -> Option<VerificationRecord> {
    let has_memory = m.streams.iter().any(|s| s.name == MEMORY_STREAM);
    let mode = if a.cold || !has_memory {
        VerifyMode::Boot
    } else {
        VerifyMode::Resume
    };
    let mut rec = VerificationRecord::new(m.id, &m.vm, Utc::now(), mode);
    let started = Instant::now();
    let run = match super::verify_libvirt::is_libvirt(m) {
        true => super::verify_libvirt::sandbox(repo, index, m, a, mode, serial, started),
        false => sandbox(repo, index, m, a, mode, serial, started),
    };
    match run {
        Ok(run) => {
            match run.verdict {
                Verdict::Alive(evidence) => {
                    rec.ok = true;
                    rec.evidence = Some(evidence);
                }
                Verdict::Failed(reason) => rec.reason = Some(reason),
                Verdict::Interrupted => return None,
            }
            rec.seconds = run.seconds;
            if let Some(png) = run.screenshot {
                match keep_screenshot(&png, screenshots, &rec) {
                    Ok(info) => rec.screenshot = Some(info),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "screenshot not kept"),
                }
            }
        }
        Err(_) if stop_requested() => return None,
        Err(e) => {
            rec.reason = Some(format!("{e:#}"));
            rec.seconds = started.elapsed().as_secs_f64();
        }
    }
    Some(rec)
}

/// What one sandboxed run found.
pub(super) struct Run {
    pub(super) verdict: Verdict,
    /// Seconds from the start to the verdict.
    pub(super) seconds: f64,
    /// The screenshot's bytes (PNG), when the VM has a display.
    pub(super) screenshot: Option<Vec<u8>>,
}

/// The evidence asked for: `agent` when the VM has a guest agent that must answer; `env` for
/// the probe, whose output goes to `log`.
pub(super) fn evidence(
    a: &VerifyArgs,
    serial: Option<&regex::Regex>,
    agent: bool,
    env: Vec<(String, String)>,
    log: &Path,
    resumed: bool,
) -> Evidence {
    Evidence {
        serial: serial.map(|re| {
            let re = re.clone();
            SerialPattern {
                describe: format!("{:?}", re.as_str()),
                matches: Box::new(move |line: &str| re.is_match(line)),
            }
        }),
        agent,
        probe: a.probe.as_ref().map(|command| Probe {
            command: command.clone(),
            env,
            log: log.to_path_buf(),
        }),
        settle: Duration::from_secs(a.settle),
        resumed,
        cancel: Some(&STOP),
    }
}

fn sandbox(
    repo: &Arc<Repository>,
    index: &BlobIndex,
    m: &Manifest,
    a: &VerifyArgs,
    mode: VerifyMode,
    serial: Option<&regex::Regex>,
    started: Instant,
) -> Result<Run> {
    let def = definition(repo, index, m)?;
    let start_mode = match mode {
        VerifyMode::Resume => StartMode::Resume,
        VerifyMode::Boot => StartMode::Cold,
    };
    let qemu = recover::qemu_binary(&def, a.qemu.as_deref());
    recover::check_qemu(&qemu, &def, start_mode)?;
    // Removed when this returns, whatever happened (QEMU is stopped before); after a kill,
    // by the next verify.
    let dir = ScratchDir::create("vmkeep-verify-").context("creating the sandbox folder")?;
    let target = dir.path().join("vm");
    let mut plan = RecoveryPlan::in_dir(&def, &target, start_mode);
    plan.network = false;
    plan.instant = true;
    // Killed with this process, even by SIGKILL: a sandbox never runs on unattended.
    plan.die_with_parent = true;
    plan.accel = a.accel.clone();
    if a.probe.is_some() {
        plan.probe_qmp = Some(target.join("probe-qmp.sock"));
    }
    // A repository outage fails the guest's reads (and so the run, with the reason): a
    // sandbox must not wait unattended.
    let disks = InstantDisks::serve(repo, m, &target, false, |name| {
        target.join(format!("{name}.qcow2"))
    })?;
    for b in def.boot_files.iter().filter(|b| b.size.is_some()) {
        if let Some(path) = plan.boot_files.get(&b.role) {
            write_stream(repo, index, m, &b.stream_name(), path)?;
        }
    }
    let argv = recover::rewrite(&def, &plan)?;
    let mut vm = recover::start_qemu(&qemu, &argv, &plan)?;
    let events = vm.qmp().events();
    if start_mode == StartMode::Resume {
        let (repo_ref, index_ref) = (repo, index);
        vm.load_state_with(move |pipe| {
            repo_ref
                .read_stream_with(index_ref, m, MEMORY_STREAM, pipe, &NoProgress)
                .map_err(std::io::Error::other)
        })
        .context("the memory state did not load")?;
    }
    let agent_at = agent_socket(&def, &target).filter(|p| p.exists());
    let agent = agent_at.clone().filter(|_| !a.no_agent);
    let mut env = vec![
        ("VMKEEP_SERIAL".to_string(), path_str(&plan.serial_log)),
        ("VMKEEP_SNAPSHOT".to_string(), m.id.to_hex()),
        ("VMKEEP_VM".to_string(), m.vm.clone()),
    ];
    if let Some(q) = &plan.probe_qmp {
        env.push(("VMKEEP_QMP".to_string(), path_str(q)));
    }
    if let Some(s) = &agent_at {
        env.push(("VMKEEP_AGENT".to_string(), path_str(s)));
    }
    let evidence = evidence(
        a,
        serial,
        agent.is_some(),
        env,
        &dir.path().join("probe.log"),
        start_mode == StartMode::Resume,
    );
    let deadline = started + Duration::from_secs(a.timeout);
    let verdict = vm.watch_for_life(events, agent, &evidence, deadline);
    let seconds = started.elapsed().as_secs_f64();
    let shot = dir.path().join("screen.png");
    let screenshot = match vm.screenshot(&shot) {
        Ok(true) => std::fs::read(&shot).ok(),
        Ok(false) => None,
        Err(e) => {
            tracing::debug!(error = %e, "no screenshot (QEMU gone?)");
            None
        }
    };
    vm.shut_down();
    disks.stop()?;
    Ok(Run {
        verdict,
        seconds,
        screenshot,
    })
}

pub(super) fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// `--screenshots`, or `$XDG_STATE_HOME/vmkeep/screenshots` (default `~/.local/state/...`).
fn screenshot_dir(a: &VerifyArgs) -> Result<PathBuf> {
    if let Some(d) = &a.screenshots {
        return Ok(d.clone());
    }
    let state = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(s) => PathBuf::from(s),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h).join(".local/state"),
            None => bail!("neither XDG_STATE_HOME nor HOME is set: give --screenshots DIR"),
        },
    };
    Ok(state.join("vmkeep/screenshots"))
}

/// Saves the PNG as `<snapshot>-<time>.png` in `dir`.
fn keep_screenshot(png: &[u8], dir: &Path, rec: &VerificationRecord) -> Result<ScreenshotInfo> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let file = format!(
        "{}-{}.png",
        rec.snapshot.to_hex(),
        rec.time.format("%Y%m%dT%H%M%SZ")
    );
    let path = dir.join(&file);
    std::fs::write(&path, png).with_context(|| format!("write {}", path.display()))?;
    Ok(ScreenshotInfo {
        file,
        bytes: png.len() as u64,
        blake3: blake3::hash(png).to_hex().to_string(),
    })
}

fn result_json(rec: &VerificationRecord, screenshots: &Path, recorded: bool) -> Value {
    json!({
        "id": rec.snapshot,
        "vm": rec.vm,
        "ok": rec.ok,
        "mode": rec.mode.name(),
        "seconds": (rec.seconds * 100.0).round() / 100.0,
        "reason": rec.reason,
        "evidence": rec.evidence,
        "screenshot": rec.screenshot.as_ref().map(|s| screenshots.join(&s.file)),
        "recorded": recorded,
    })
}

fn human(rec: &VerificationRecord, screenshots: &Path) -> String {
    let shot = rec
        .screenshot
        .as_ref()
        .map(|s| format!("\n  screenshot: {}", screenshots.join(&s.file).display()))
        .unwrap_or_default();
    let how = match rec.mode {
        VerifyMode::Resume => "resumed",
        VerifyMode::Boot => "booted",
    };
    if rec.ok {
        format!(
            "  ok: {how} and alive after {:.1} s: {}{shot}",
            rec.seconds,
            rec.evidence.as_deref().unwrap_or("")
        )
    } else {
        format!(
            "  FAILED ({how}, after {:.1} s): {}{shot}",
            rec.seconds,
            rec.reason.as_deref().unwrap_or("no reason recorded")
        )
    }
}
