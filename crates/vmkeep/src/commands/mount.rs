//! `vmkeep mount`: a restore point's disk served read-only over NBD from the repository
//! (vmkeep-repo `mount`, vmkeep-qemu `nbd::server`), until SIGINT or SIGTERM.
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::json;
use vmkeep_io::ServedDisk;
use vmkeep_qemu::kernel_nbd::KernelNbd;
use vmkeep_qemu::nbd::{Listen, NbdServer, ServeOptions};
use vmkeep_qemu::overlay::WritableOverlay;
use vmkeep_repo::mount::{MountOptions, MountedDisk};

use crate::args::{Global, MountArgs};
use crate::output::{print_json, print_line};
use crate::scratch::ScratchDir;
use crate::signals::{stop_on_signals, STOP};
use crate::size::human;

pub fn run(g: &Global, a: &MountArgs) -> Result<u8> {
    let repo = Arc::new(crate::context::open_repo(g)?);
    // Held while it serves: a prune meanwhile keeps what it references.
    let _lease = repo.read_lease();
    let m = repo.resolve(&a.snapshot)?;
    let opts = MountOptions {
        cache_bytes: a.cache,
        ..MountOptions::default()
    };
    let disk = MountedDisk::open(repo, &m, a.disk.as_deref(), &opts)?;
    let listen = match (&a.socket, a.listen) {
        (Some(path), _) => Listen::Unix(path.clone()),
        (None, Some(addr)) => Listen::Tcp(addr),
        (None, None) => unreachable!("clap: --socket or --listen"),
    };
    // With --writable the restore point is served on a private socket, and qemu-nbd serves
    // the overlay over it where the user asked.
    // A killed mount's folder (and overlay) is removed by the next mount.
    let private = ScratchDir::create("vmkeep-mount-")?;
    let serve_on = match a.writable {
        true => Listen::Unix(private.path().join("base.sock")),
        false => listen.clone(),
    };
    let export = disk.name().to_string();
    let server = NbdServer::bind(
        &serve_on,
        disk.clone(),
        ServeOptions {
            export_name: export.clone(),
            description: Some(format!("vmkeep restore point {:#}, disk {export}", m.id)),
            ..ServeOptions::default()
        },
    )?;
    stop_on_signals()?;
    let served = std::thread::scope(|s| -> Result<()> {
        let serving = s.spawn(|| server.run(&STOP));
        let r = serve_until_stopped(g, a, &m, &disk, &server, &listen, private.path());
        STOP.store(true, Ordering::SeqCst);
        let stopped = serving.join();
        r?;
        match stopped {
            Ok(served) => served.context("serving NBD"),
            Err(_) => anyhow::bail!("the NBD server panicked"),
        }
    });
    served?;
    let stats = disk.stats();
    if g.json {
        print_json(&json!({"stopped": true, "stats": stats}))?;
    } else {
        print_line(&format!(
            "stopped: {} chunks ({}) fetched and verified, {} read ahead, {} cache hits, {} read errors",
            stats.chunks_fetched,
            human(stats.bytes_fetched),
            stats.chunks_read_ahead,
            stats.cache_hits,
            stats.read_errors
        ))?;
    }
    Ok(0)
}

/// Starts the overlay when asked, prints the start line, and waits for SIGINT or SIGTERM (or
/// the overlay's qemu-nbd dying). The overlay (in `private`) is stopped and discarded on
/// return.
fn serve_until_stopped(
    g: &Global,
    a: &MountArgs,
    m: &vmkeep_repo::Manifest,
    disk: &MountedDisk,
    server: &NbdServer,
    listen: &Listen,
    private: &std::path::Path,
) -> Result<()> {
    let export = disk.name();
    let mut overlay = match a.writable {
        true => Some(WritableOverlay::start(
            private,
            &server.uri(),
            disk.size(),
            listen,
            export,
        )?),
        false => None,
    };
    let uri = overlay
        .as_ref()
        .map_or_else(|| server.uri(), |o| o.uri().to_string());
    let device = match &a.nbd_device {
        Some(d) => Some(KernelNbd::attach(d, &uri, a.writable)?),
        None => None,
    };
    let line = if g.json {
        let mut v = json!({"id": m.id, "disk": export, "export": export, "uri": uri,
            "writable": a.writable, "nbd_device": device.as_ref().map(|d| d.device())});
        match listen {
            Listen::Unix(p) => v["socket"] = json!(p),
            Listen::Tcp(_) => {
                let addr = uri
                    .trim_start_matches("nbd://")
                    .split('/')
                    .next()
                    .unwrap_or("");
                v["listen"] = json!(addr);
            }
        }
        v.to_string()
    } else {
        let mode = match a.writable {
            true => "writable (writes go to a temporary overlay, discarded at stop)",
            false => "read-only",
        };
        let attached = device
            .as_ref()
            .map(|d| format!(" and as {}", d.device().display()))
            .unwrap_or_default();
        format!(
            "serving disk {export} of restore point {:#} ({}) {mode} at {uri}{attached}; stop with Ctrl-C",
            m.id,
            human(disk.size()),
        )
    };
    // One line, flushed: the process runs on, and scripts read the line to learn the address.
    print_line(&line)?;
    std::io::stdout().flush()?;
    while !STOP.load(Ordering::SeqCst) {
        if let Some(o) = overlay.as_mut() {
            if !o.running() {
                anyhow::bail!("qemu-nbd serving the writable overlay exited");
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The device goes first: it reads through the overlay or the server.
    drop(device);
    drop(overlay);
    Ok(())
}
