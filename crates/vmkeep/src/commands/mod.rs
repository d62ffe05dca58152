//! One module per command; each returns the process exit status.
mod backup;
mod check;
mod diff;
mod init;
mod instant;
mod key;
mod maintenance;
mod mount;
mod onto;
mod recover;
mod recover_libvirt;
mod repair;
mod replicate;
mod restore;
mod schedule;
mod serve;
mod snapshots;
mod verify;
mod verify_libvirt;

use anyhow::Result;

use crate::args::{Cli, Command};

pub fn run(cli: Cli) -> Result<u8> {
    let started = std::time::SystemTime::now();
    let name = command_name(&cli.command);
    let metrics_file = cli.global.metrics_file.clone();
    let result = run_command(cli);
    let Some(path) = metrics_file else {
        return result;
    };
    // A run that failed says so in the file, and fails with its own error.
    let status = match &result {
        Ok(code) => *code,
        Err(_) => 1,
    };
    match (crate::metrics::write(&path, name, status, started), result) {
        (Ok(()), result) => result,
        (Err(e), Ok(_)) => Err(e.context(format!(
            "the {name} itself succeeded, but its metrics were not written"
        ))),
        (Err(e), Err(first)) => {
            tracing::warn!("{e:#}");
            Err(first)
        }
    }
}

/// The command's name in metrics (`backup`, `restore`, ...).
fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Init(_) => "init",
        Command::Key(_) => "key",
        Command::Backup(_) => "backup",
        Command::Snapshots(_) => "snapshots",
        Command::Restore(_) => "restore",
        Command::Diff(_) => "diff",
        Command::Replicate(_) => "replicate",
        Command::Mount(_) => "mount",
        Command::Recover(_) => "recover",
        Command::Verify(_) => "verify",
        Command::Check(_) => "check",
        Command::Forget(_) => "forget",
        Command::Prune(_) => "prune",
        Command::Unlock(_) => "unlock",
        Command::Repair(_) => "repair",
        Command::Serve(_) => "serve",
        Command::Token(_) => "token",
        Command::Schedule(_) => "schedule",
    }
}

fn run_command(cli: Cli) -> Result<u8> {
    let g = &cli.global;
    // Settings read deep in the libraries: a typo fails here, before anything starts.
    vmkeep_qemu::nbd::request_timeout_from_env().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Init(a) => init::run(g, &a),
        Command::Key(k) => key::run(g, &k),
        Command::Backup(b) => backup::run(g, &b),
        Command::Snapshots(a) => snapshots::run(g, &a),
        Command::Restore(a) => restore::run(g, &a),
        Command::Diff(a) => diff::run(g, &a),
        Command::Replicate(a) => replicate::run(g, &a),
        Command::Mount(a) => mount::run(g, &a),
        Command::Recover(a) => recover::run(g, &a),
        Command::Verify(a) => verify::run(g, &a),
        Command::Check(a) => check::run(g, &a),
        Command::Forget(a) => maintenance::forget(g, &a),
        Command::Prune(a) => maintenance::prune(g, &a),
        Command::Unlock(a) => maintenance::unlock(g, &a),
        Command::Repair(r) => repair::run(g, &r),
        Command::Serve(a) => serve::serve(g, &a),
        Command::Token(c) => serve::token(g, &c),
        Command::Schedule(c) => schedule::run(g, &c),
    }
}
