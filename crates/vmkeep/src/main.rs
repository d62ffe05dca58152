//! vmkeep: the command-line front end. The only crate that knows both the user and the
//! repository: it parses arguments, opens repositories, draws progress and prints results.
mod args;
mod commands;
mod context;
mod metrics;
mod output;
mod progress;
mod scratch;
mod signals;
mod size;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

/// Exit status when `check` found damage.
pub const EXIT_DAMAGE: u8 = 3;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    init_tracing();
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if output::is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("vmkeep: error: {}", output::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMKEEP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_on_stderr())
        .with_target(false)
        .init();
}

/// Colour codes only for a person at a terminal: never into a pipe, a file or a journal, and
/// not when NO_COLOR is set to anything (https://no-color.org).
fn colour_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
