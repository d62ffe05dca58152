//! Command-line arguments (docs/cli-contract: names and outputs are stable).
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "vmkeep",
    version,
    about = "Live backup, replication and disaster recovery of QEMU/KVM virtual machines"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Repository: a directory path, or https://HOST[:PORT]/NAME (a `vmkeep serve` endpoint)
    #[arg(long, global = true, env = "VMKEEP_REPO", value_name = "REPO")]
    pub repo: Option<String>,
    /// File holding the bearer token for an https:// repository (or set VMKEEP_TOKEN to the
    /// token itself)
    #[arg(long, global = true, env = "VMKEEP_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Trust the https:// server whose certificate has this SHA-256 fingerprint (64 hex
    /// digits, as `vmkeep serve` prints it) instead of the system's CAs
    #[arg(
        long,
        global = true,
        env = "VMKEEP_TLS_FINGERPRINT",
        value_name = "HEX"
    )]
    pub tls_fingerprint: Option<String>,
    /// File holding the repository passphrase (or set VMKEEP_PASSWORD)
    #[arg(long, global = true, env = "VMKEEP_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Local cache folder (index runs and tree nodes, one folder per repository; safe to
    /// delete at any time) [default: $XDG_CACHE_HOME/vmkeep or ~/.cache/vmkeep]
    #[arg(long, global = true, env = "VMKEEP_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Use no local cache: read every index object into memory on each run
    #[arg(long, global = true, env = "VMKEEP_NO_CACHE")]
    pub no_cache: bool,
    /// Print one JSON document on stdout instead of human text
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Write Prometheus text-format metrics of this run to FILE (for the node exporter's
    /// textfile collector): its outcome, duration, and what it read, stored and sent
    #[arg(long, global = true, env = "VMKEEP_METRICS_FILE", value_name = "FILE")]
    pub metrics_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a repository
    Init(InitArgs),
    /// Manage the repository key
    #[command(subcommand)]
    Key(KeyCommand),
    /// Back up a VM
    #[command(subcommand)]
    Backup(BackupCommand),
    /// List restore points, oldest first
    Snapshots(SnapshotsArgs),
    /// Write a restore point's disks to files
    Restore(RestoreArgs),
    /// What differs between two restore points: byte extents per disk, exact
    Diff(DiffArgs),
    /// Serve a restore point's disk over NBD straight from the repository, without restoring
    /// it (read-only; runs until interrupted)
    Mount(MountArgs),
    /// Copy restore points to (or from) a replica, sending only the data it lacks
    Replicate(ReplicateArgs),
    /// Bring a VM back from a restore point: disks, boot files and definition into a folder,
    /// QEMU started in the background, resumed from its memory (or booted with --cold)
    Recover(RecoverArgs),
    /// Prove restore points come back: resume (or boot) each in a sandbox without network,
    /// wait for evidence of life, record the result beside it
    Verify(VerifyArgs),
    /// Verify the repository
    Check(CheckArgs),
    /// Drop restore points (space returns with a later prune)
    Forget(ForgetArgs),
    /// Apply a retention policy and reclaim unreferenced data
    Prune(PruneArgs),
    /// Remove stale locks left by killed vmkeep processes
    Unlock(UnlockArgs),
    /// Repair the repository's metadata
    #[command(subcommand)]
    Repair(RepairCommand),
    /// Serve repositories over HTTPS to remote hosts and DR sites (docs/PROTOCOL.md)
    Serve(ServeArgs),
    /// Manage the tokens of `vmkeep serve`
    #[command(subcommand)]
    Token(TokenCommand),
    /// Scheduled backup jobs as systemd timers: add, list, remove, run
    #[command(subcommand)]
    Schedule(ScheduleCommand),
}

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Write a job's systemd service and timer (and enable the timer where systemd runs)
    Add(Box<ScheduleAddArgs>),
    /// The jobs: next run, last result and duration
    List,
    /// Stop and delete a job's units
    Remove {
        /// The job's name
        name: String,
    },
    /// Run a job now, as its timer does: backup, prune, replicate; skipped when the previous
    /// run still runs, or (with --when-changed) when it is not due
    Run {
        /// The job's name
        name: String,
        /// Run even if --when-changed finds too little change
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Debug)]
pub struct ScheduleAddArgs {
    /// The job's name (letters, digits, `-`, `_`, `.`): units vmkeep-NAME.service/.timer
    pub name: String,
    #[command(flatten)]
    pub source: VmSourceArgs,
    /// How often: 15s, 5m, 1h, 1d
    #[arg(long, value_name = "PERIOD", value_parser = parse_period)]
    pub every: u64,
    /// Also back up early once the guest wrote this much since the last backup (the dirty
    /// bitmaps' counts, checked every --check-every)
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    pub when_changed: Option<u64>,
    /// With --when-changed: how often to look at the amount of change [default: 1m, or
    /// --every if shorter]
    #[arg(long, value_name = "PERIOD", value_parser = parse_period, requires = "when_changed")]
    pub check_every: Option<u64>,
    /// Capture RAM and device state too
    #[arg(long)]
    pub memory: bool,
    #[command(flatten)]
    pub keep: KeepArgs,
    /// After each backup, replicate the VM's restore points to this repository
    #[arg(long, value_name = "REPO")]
    pub replicate_to: Option<String>,
    /// Write each step's --metrics-file here (vmkeep-NAME-backup.prom, ...), e.g. the node
    /// exporter's textfile directory
    #[arg(long, value_name = "DIR")]
    pub metrics_dir: Option<PathBuf>,
    /// Print the units and write nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// `15s`, `5m`, `1h`, `1d` (or plain seconds) to seconds.
fn parse_period(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a period (try 15s, 5m, 1h, 1d)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?} has an unknown unit (use s, m, h or d)")),
    };
    match n.checked_mul(mult) {
        Some(v) if v >= 15 => Ok(v),
        Some(_) => Err(format!("{s:?} is shorter than 15 s, the shortest period")),
        None => Err(format!("{s:?} is too long")),
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:8443 (port 0: any free port, printed at start)
    #[arg(long, value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Folder holding the repositories: https://HOST:PORT/NAME is DIR/NAME
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The tokens file (`vmkeep token add` writes it; reread when it changes)
    #[arg(long, value_name = "FILE")]
    pub tokens: PathBuf,
    /// Certificate (PEM); without it a self-signed one is made once and kept in DIR
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Mint a token: printed once, stored hashed in the tokens file
    Add(TokenAddArgs),
}

#[derive(Args, Debug)]
pub struct TokenAddArgs {
    /// The tokens file of `vmkeep serve` (created when absent)
    #[arg(long, value_name = "FILE")]
    pub tokens: PathBuf,
    /// VM names the token covers: globs (`*`, `?`), comma-separated
    #[arg(long, value_name = "GLOB", value_delimiter = ',', required = true)]
    pub vms: Vec<String>,
    /// Rights, comma-separated: read, append (add restore points, never delete), admin
    #[arg(long, value_name = "RIGHTS", value_delimiter = ',', required = true)]
    pub rights: Vec<String>,
    /// A note kept with the token (who or what it is for)
    #[arg(long)]
    pub comment: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum RepairCommand {
    /// Rebuild the index objects from the pack headers (lost or damaged index objects, or index
    /// entries naming packs that are gone)
    Index,
    /// Write the pack list (docs/PROTOCOL.md §5) of every restore point that lacks one or
    /// whose list is stale: once after serving a repository made locally, or after a local prune
    Refs {
        /// Rewrite every list, not only missing and stale ones
        #[arg(long)]
        all: bool,
    },
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Encrypt the repository (asks for a passphrase, or reads --password-file / VMKEEP_PASSWORD)
    #[arg(long)]
    pub encrypt: bool,
    /// Fixed chunk size for disks: a power of two from 64K to 4M
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    pub chunk_size: String,
    /// A replica of the repository SRC (its chunk size and keys, so `replicate` copies blobs
    /// as they are; opened with SRC's passphrase)
    #[arg(long, value_name = "SRC", conflicts_with_all = ["encrypt", "chunk_size"])]
    pub replica_of: Option<String>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("direction").required(true).args(["to", "from"])))]
pub struct ReplicateArgs {
    /// Copy from --repo to this replica (push)
    #[arg(long, value_name = "REPO")]
    pub to: Option<String>,
    /// Copy from this repository into --repo, a replica of it (pull)
    #[arg(long, value_name = "REPO")]
    pub from: Option<String>,
    /// Only this VM
    #[arg(long)]
    pub vm: Option<String>,
    /// Every restore point the destination lacks (default: those newer than its newest)
    #[arg(long)]
    pub all: bool,
    /// Only say what would be copied and how many bytes the destination lacks
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Change the passphrase (new one from --new-password-file, VMKEEP_NEW_PASSWORD or a prompt)
    Passwd {
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// Print the master key for safekeeping on paper
    Export,
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Back up disk image files or block devices of a stopped VM (raw read directly; qcow2 and
    /// other formats through qemu-storage-daemon, with change tracking)
    Image(BackupImageArgs),
    /// Back up a running QEMU VM through its QMP socket (all disks at one instant, no pause)
    Vm(BackupVmArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FreezeMode {
    /// Freeze guest filesystems when the VM has a guest agent; skip otherwise
    #[default]
    Auto,
    /// Require the guest agent
    On,
    /// Never freeze
    Off,
}

#[derive(Args, Debug)]
pub struct BackupVmArgs {
    #[command(flatten)]
    pub source: VmSourceArgs,
    /// Ignore change tracking: read every allocated chunk (tracking restarts from this backup)
    #[arg(long)]
    pub full: bool,
    /// Guest filesystem freeze through the QEMU guest agent
    #[arg(long, value_enum, default_value = "auto")]
    pub freeze: FreezeMode,
    /// Keep the VM stopped from the cut until its disks are read (by default it is paused only
    /// for the milliseconds of the cut)
    #[arg(long, conflicts_with = "libvirt")]
    pub suspend: bool,
    /// Also capture RAM and device state at the same instant (restore point that `recover`
    /// resumes)
    #[arg(long)]
    pub memory: bool,

    /// With --memory: limit QEMU's memory stream to RATE per second (e.g. 200M). Default: no
    /// limit, so the guest's RAM is write-protected (its writes slowed) for the shortest time
    #[arg(long, value_name = "RATE", requires = "memory", value_parser = parse_rate)]
    pub memory_bandwidth: Option<u64>,
    /// Where the capture's scratch images go (default: $TMPDIR or /tmp); they hold the old
    /// contents of blocks the guest rewrites while the backup reads
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// The VM's QEMU command line (a JSON array, or one argument per line) when it cannot be
    /// read from the QEMU process (another PID namespace, another user)
    #[arg(long, value_name = "FILE", conflicts_with = "libvirt")]
    pub vm_config: Option<PathBuf>,
    /// Internal: run as the capture guard of a vmkeep process (state on stdin)
    #[arg(long, hide = true)]
    pub guard: bool,
}

/// Which running VM: through its QMP monitor, or a libvirt domain (backup vm, schedule add).
#[derive(Args, Debug, Clone)]
pub struct VmSourceArgs {
    /// The VM's QMP socket (a unix socket no other client holds)
    #[arg(
        long,
        value_name = "SOCKET",
        required_unless_present = "libvirt",
        conflicts_with = "libvirt"
    )]
    pub qmp: Option<PathBuf>,
    /// A libvirt domain (name or UUID), backed up through libvirt's backup API
    #[arg(long, value_name = "DOMAIN")]
    pub libvirt: Option<String>,
    /// libvirt's connection URI (default: virsh's, usually qemu:///system)
    #[arg(long, value_name = "URI", requires = "libvirt")]
    pub connect: Option<String>,
    /// VM name (with --libvirt: the domain's name by default)
    #[arg(long, required_unless_present = "libvirt")]
    pub vm: Option<String>,
    /// With --libvirt --memory: allow libvirt's QEMU monitor passthrough, which the memory
    /// snapshot needs (libvirt then marks the domain tainted: "custom-monitor")
    #[arg(long, requires = "libvirt")]
    pub allow_qmp_passthrough: bool,
}

impl VmSourceArgs {
    /// The VM's name in the repository: `--vm`, or the libvirt domain's.
    pub fn vm_name(&self) -> String {
        self.vm
            .clone()
            .or_else(|| self.libvirt.clone())
            .unwrap_or_default()
    }
}

#[derive(Args, Debug)]
pub struct BackupImageArgs {
    /// VM name
    #[arg(long)]
    pub vm: String,
    /// NAME=PATH of a disk (repeat for every disk)
    #[arg(long = "disk", value_name = "NAME=PATH", required = true)]
    pub disks: Vec<String>,
    /// Read every image in full, even files unchanged since the last restore point
    #[arg(long)]
    pub full: bool,
    /// Where qcow2 images' capture scratch goes (default: $TMPDIR or /tmp)
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The earlier (or any) restore point: id prefix or VM@latest
    pub from: String,
    /// The restore point to compare it with
    pub to: String,
    /// Only this disk
    #[arg(long, value_name = "NAME")]
    pub disk: Option<String>,
}

#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// Only this VM's restore points
    #[arg(long)]
    pub vm: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Sparse raw files DISK.raw
    Raw,
    /// qcow2 images DISK.qcow2 (written through qemu-nbd; needs qemu-img and qemu-nbd)
    Qcow2,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Restore point: id, unique prefix (>= 6 hex digits) or VM@latest
    pub snapshot: String,
    /// Directory to write DISK.raw files into
    #[arg(long, value_name = "DIR", required_unless_present = "onto")]
    pub target: Option<PathBuf>,
    /// Make this existing image (raw file, block device or qcow2) hold the disk, writing only
    /// the chunks that differ (rewind or roll forward); with --disk unless there is one disk
    #[arg(long, value_name = "IMAGE", conflicts_with_all = ["target", "format", "memory_file"])]
    pub onto: Option<PathBuf>,
    /// Only this disk
    #[arg(long)]
    pub disk: Option<String>,
    /// Output format
    #[arg(long, value_enum, default_value = "raw")]
    pub format: Format,
    /// Also write the captured RAM and device state (a QEMU migration stream) to FILE, for
    /// QEMU's `-incoming file:FILE` (`vmkeep recover` does all of this for you)
    #[arg(long, value_name = "FILE")]
    pub memory_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Restore point: id, unique prefix (>= 6 hex digits) or VM@latest
    pub snapshot: String,
    /// The disk to serve (needed when the restore point has several)
    #[arg(long)]
    pub disk: Option<String>,
    /// Serve on this Unix socket (created; must not exist)
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "listen",
        conflicts_with = "listen"
    )]
    pub socket: Option<PathBuf>,
    /// Serve on this TCP address, e.g. 127.0.0.1:10809 (port 0: any free port, printed at
    /// start). NBD has no encryption or authentication here: keep it on a trusted network
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Accept writes: they go to a temporary qcow2 overlay (served by qemu-nbd), discarded
    /// when the mount stops; the restore point never changes
    #[arg(long)]
    pub writable: bool,
    /// Also attach it as this kernel block device (needs root and the nbd module), so a
    /// filesystem in it can be mounted and files copied out; detached at stop
    #[arg(long, value_name = "/dev/nbdN")]
    pub nbd_device: Option<PathBuf>,
    /// Memory for verified chunks, e.g. 64M
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = crate::size::parse_size)]
    pub cache: u64,
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// Restore point: id, unique prefix (>= 6 hex digits) or VM@latest
    pub snapshot: String,
    /// A new (or empty) folder for the VM's disks (DISK.qcow2), boot files, QMP socket and logs
    #[arg(long, value_name = "DIR")]
    pub target: PathBuf,
    /// Boot from the disks instead of resuming from the captured memory
    #[arg(long)]
    pub cold: bool,
    /// Start at once on the restore point served from the repository, and copy the disks
    /// into DIR in the background while the VM runs (the command returns when the copy is
    /// complete; the VM keeps its writes)
    #[arg(long)]
    pub instant: bool,
    /// The QEMU to run (default: the one named in the VM's definition, found on PATH)
    #[arg(long, value_name = "BINARY")]
    pub qemu: Option<PathBuf>,
    /// Keep the VM's network backends (default: cut off, so a recovered copy never talks to
    /// the network as the original)
    #[arg(long)]
    pub network: bool,
    /// Accelerator for the recovered VM (e.g. tcg on a host without KVM); default: the VM's
    #[arg(long)]
    pub accel: Option<String>,
    /// A restore point of a libvirt domain (`backup vm --libvirt`) as a libvirt domain again:
    /// defined, then booted, or restored from its memory (libvirt manages it from then on)
    #[arg(long, conflicts_with_all = ["instant", "qemu"])]
    pub libvirt: bool,
    /// With --libvirt: libvirt's connection URI (default: virsh's)
    #[arg(long, value_name = "URI", requires = "libvirt")]
    pub connect: Option<String>,
    /// With --libvirt: the recovered domain's name (default: the original's)
    #[arg(long, value_name = "NAME", requires = "libvirt")]
    pub name: Option<String>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Restore points: id, unique prefix (>= 6 hex digits) or VM@latest
    #[arg(value_name = "SNAP", required_unless_present = "all_new")]
    pub snapshots: Vec<String>,
    /// Also every restore point that has no verification record yet (e.g. after each
    /// replication at a DR site); those without a VM definition or libvirt domain XML are
    /// skipped
    #[arg(long)]
    pub all_new: bool,
    /// With --all-new: only this VM's restore points
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// Boot from the disks even when the restore point has its memory
    #[arg(long)]
    pub cold: bool,
    /// Evidence: a serial-console line matching this regular expression
    #[arg(long, value_name = "REGEX")]
    pub serial: Option<String>,
    /// Evidence: this shell command exits 0 (run again every 2 s until the timeout). It gets
    /// VMKEEP_QMP (a QMP socket of the VM), VMKEEP_SERIAL (its console log), VMKEEP_AGENT (its
    /// guest-agent socket, when it has one), VMKEEP_SNAPSHOT and VMKEEP_VM; for a libvirt
    /// restore point VMKEEP_DOMAIN (the sandbox domain's name) and VMKEEP_CONNECT instead of
    /// VMKEEP_QMP and VMKEEP_AGENT
    #[arg(long, value_name = "CMD")]
    pub probe: Option<String>,
    /// Do not ping the guest agent (by default it must answer when the VM has one)
    #[arg(long)]
    pub no_agent: bool,
    /// Seconds to wait for the evidence, per restore point
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
    /// With no --serial, --probe or guest agent: seconds the VM must run without a sign of
    /// failure
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub settle: u64,
    /// Where console screenshots go (default: $XDG_STATE_HOME/vmkeep/screenshots)
    #[arg(long, value_name = "DIR")]
    pub screenshots: Option<PathBuf>,
    /// The QEMU to run (default: the one named in the VM's definition, found on PATH)
    #[arg(long, value_name = "BINARY")]
    pub qemu: Option<PathBuf>,
    /// Accelerator for the sandboxed VM (e.g. tcg on a host without KVM); default: the VM's
    #[arg(long)]
    pub accel: Option<String>,
    /// For restore points of libvirt domains (run in a transient libvirt domain): libvirt's
    /// connection URI (default: virsh's)
    #[arg(long, value_name = "URI")]
    pub connect: Option<String>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Also read and verify every chunk
    #[arg(long)]
    pub read_data: bool,
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Restore points to drop
    #[arg(required = true, value_name = "SNAP")]
    pub snapshots: Vec<String>,
}

/// The retention policy's `--keep-*` counts (prune, and scheduled jobs).
#[derive(Args, Debug, Clone, Copy)]
pub struct KeepArgs {
    /// Keep the N newest restore points (`unlimited`: all)
    #[arg(long, value_name = "N", value_parser = parse_keep_count)]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the N newest hours that have one (`unlimited`: all)
    #[arg(long, value_name = "N", value_parser = parse_keep_count)]
    pub keep_hourly: Option<u32>,
    /// Keep the newest point of each of the N newest days (UTC) that have one
    #[arg(long, value_name = "N", value_parser = parse_keep_count)]
    pub keep_daily: Option<u32>,
    /// Keep the newest point of each of the N newest ISO weeks that have one
    #[arg(long, value_name = "N", value_parser = parse_keep_count)]
    pub keep_weekly: Option<u32>,
    /// Keep the newest point of each of the N newest months that have one
    #[arg(long, value_name = "N", value_parser = parse_keep_count)]
    pub keep_monthly: Option<u32>,
    /// Keep the newest point of each of the N newest years that have one
    #[arg(long, value_name = "N", value_parser = parse_keep_count)]
    pub keep_yearly: Option<u32>,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Only this VM's restore points
    #[arg(long)]
    pub vm: Option<String>,
    #[command(flatten)]
    pub keep: KeepArgs,
    /// Print the plan and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// A `--keep-*` count: a positive number or `unlimited` (as restic). 0 is refused rather than
/// silently ignored (restic treats it as "rule not given").
fn parse_rate(s: &str) -> Result<u64, String> {
    match crate::size::parse_size(s)? {
        0 => Err("the rate must be above 0 (leave --memory-bandwidth out for no limit)".into()),
        n => Ok(n),
    }
}

fn parse_keep_count(s: &str) -> Result<u32, String> {
    if s == "unlimited" {
        return Ok(vmkeep_core::retention::RetentionPolicy::UNLIMITED);
    }
    match s.parse::<u32>() {
        Ok(0) => Err("0 is not a count; leave the option out (restic ignores --keep-* 0)".into()),
        Ok(n) if n != vmkeep_core::retention::RetentionPolicy::UNLIMITED => Ok(n),
        _ => Err(format!("{s:?} is not a positive number or `unlimited`")),
    }
}

#[derive(Args, Debug)]
pub struct UnlockArgs {
    /// Remove every lock, not only those of dead processes (make sure nothing runs)
    #[arg(long)]
    pub remove_all: bool,
}
