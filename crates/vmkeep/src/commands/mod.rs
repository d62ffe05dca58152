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
mod repair;
mod replicate;
mod restore;
mod serve;
mod snapshots;
mod verify;

use anyhow::Result;

use crate::args::{Cli, Command};

pub fn run(cli: Cli) -> Result<u8> {
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
    }
}
