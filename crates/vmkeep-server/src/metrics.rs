//! `GET /metrics`: Prometheus metrics of the served repositories (PROTOCOL.md §4.4), in the
//! OpenMetrics text format, for a token with any right. A token sees the VMs of its scope only,
//! as everywhere else: a per-host token scraped by mistake reveals nothing of other hosts.
//!
//! Per repository and VM, from the pack lists (`refs/`, which the server can read even in an
//! encrypted repository): the restore points and when the newest was written (a backup's or a
//! replication's commit), so `time() - vmkeep_last_restore_point_timestamp_seconds` is the
//! age of a VM's protection at this site. Server-wide: requests answered by status class.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::{lock, valid_repo_name, App, STATE_DIR};
use crate::tokens::Principal;

/// Requests answered, by status class (1xx..5xx).
#[derive(Debug, Default)]
pub(crate) struct Requests([AtomicU64; 5]);

impl Requests {
    pub(crate) fn count(&self, status: u16) {
        if let Some(c) = self.0.get((status / 100).saturating_sub(1) as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type Labels = Vec<(String, String)>;

/// The metrics text for `who`.
pub(crate) fn render(app: &App, who: &Principal) -> Result<String, String> {
    let mut registry = Registry::default();
    let points = Family::<Labels, Gauge>::default();
    let newest = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let requests = Family::<Labels, Counter>::default();
    let repos = Gauge::<i64>::default();
    registry.register(
        "vmkeep_restore_points",
        "Restore points of a VM in a served repository",
        points.clone(),
    );
    registry.register(
        "vmkeep_last_restore_point_timestamp_seconds",
        "When the newest restore point of a VM was written to a served repository",
        newest.clone(),
    );
    registry.register(
        "vmkeep_server_repositories",
        "Repositories served",
        repos.clone(),
    );
    registry.register(
        "vmkeep_server_requests",
        "Requests answered since the server started, by status class",
        requests.clone(),
    );
    let mut names: Vec<String> = std::fs::read_dir(&app.dir)
        .map_err(|e| format!("list {}: {e}", app.dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n != STATE_DIR && valid_repo_name(n))
        .collect();
    names.sort();
    let mut served = 0;
    for name in names {
        let Some(repo) = app.repo(&name) else {
            continue;
        };
        served += 1;
        let mut lists = lock(&repo.pack_lists);
        if let Err(e) = lists.refresh(&repo.store) {
            tracing::warn!(repository = %name, error = %e, "metrics: cannot read the pack lists");
            continue;
        }
        for (vm, count, time) in lists.per_vm() {
            if !who.vm_in_scope(&vm) {
                continue;
            }
            let labels = vec![
                ("repository".to_string(), name.clone()),
                ("vm".to_string(), vm),
            ];
            points.get_or_create(&labels).set(count as i64);
            let secs = time
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            newest.get_or_create(&labels).set(secs);
        }
    }
    repos.set(served);
    for (i, c) in app.requests.0.iter().enumerate() {
        requests
            .get_or_create(&vec![("class".to_string(), format!("{}xx", i + 1))])
            .inc_by(c.load(Ordering::Relaxed));
    }
    let mut text = String::new();
    encode(&mut text, &registry).map_err(|e| format!("encode the metrics: {e}"))?;
    Ok(text)
}
