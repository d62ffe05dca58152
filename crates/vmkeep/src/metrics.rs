//! `--metrics-file FILE`: Prometheus text-format metrics of one run, for the node exporter's
//! textfile collector (or anything that reads the format). Every command writes the run's
//! outcome; commands that know more (backup, restore, replicate) add their figures with
//! [`gauge`] while they run. The file is written whole under a temporary name and renamed,
//! so a collector never reads half of it; one file per job (`backup-web1.prom`), since each
//! run replaces it.
//!
//! `vmkeep_last_success_timestamp_seconds` outlives failures: a failed run copies it from
//! the file it replaces, so "no success for a day" stays an alert a failing job cannot hide.
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label pairs of one sample.
type Labels = Vec<(String, String)>;
type GaugeFamily = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// What this run recorded: its VM (when it has one) and the samples, in order.
struct Recorded {
    vm: Option<String>,
    samples: Vec<Sample>,
}

struct Sample {
    name: &'static str,
    help: &'static str,
    labels: Labels,
    value: f64,
}

static RUN: Mutex<Recorded> = Mutex::new(Recorded {
    vm: None,
    samples: Vec::new(),
});

const LAST_SUCCESS: &str = "vmkeep_last_success_timestamp_seconds";

fn run() -> std::sync::MutexGuard<'static, Recorded> {
    RUN.lock().unwrap_or_else(|p| p.into_inner())
}

/// The VM this run is about: every sample gets a `vm` label.
pub fn set_vm(vm: &str) {
    run().vm = Some(vm.to_owned());
}

/// Records `name` (with `vmkeep_` prefix, as Prometheus names go) = `value`, with `labels`
/// besides the run's `vm`.
pub fn gauge(name: &'static str, help: &'static str, labels: &[(&str, &str)], value: f64) {
    run().samples.push(Sample {
        name,
        help,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        value,
    });
}

/// Writes the run's metrics to `path`: its outcome (`status` 0 is a success), when it ended
/// and how long it took, and what the command recorded.
pub fn write(path: &Path, command: &str, status: u8, started: SystemTime) -> Result<()> {
    let now = SystemTime::now();
    let at = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let recorded = run();
    let mut base: Labels = vec![("command".into(), command.into())];
    if let Some(vm) = &recorded.vm {
        base.push(("vm".into(), vm.clone()));
    }
    let ok = status == 0;
    let last_success = match ok {
        true => Some(at(now)),
        false => previous_value(path, LAST_SUCCESS, &base),
    };
    let mut samples = vec![
        Sample {
            name: "vmkeep_run_success",
            help: "1 when the run succeeded (exit status 0), else 0",
            labels: Vec::new(),
            value: if ok { 1.0 } else { 0.0 },
        },
        Sample {
            name: "vmkeep_run_exit_status",
            help: "The run's exit status (3: check found damage, verify saw a point fail)",
            labels: Vec::new(),
            value: status.into(),
        },
        Sample {
            name: "vmkeep_run_timestamp_seconds",
            help: "When the run ended (Unix time)",
            labels: Vec::new(),
            value: at(now),
        },
        Sample {
            name: "vmkeep_run_duration_seconds",
            help: "How long the run took",
            labels: Vec::new(),
            value: now
                .duration_since(started)
                .unwrap_or_default()
                .as_secs_f64(),
        },
    ];
    if let Some(t) = last_success {
        samples.push(Sample {
            name: LAST_SUCCESS,
            help: "When a run of this command last succeeded (Unix time; kept across failures)",
            labels: Vec::new(),
            value: t,
        });
    }
    let mut registry = Registry::default();
    let mut families: Vec<(&'static str, GaugeFamily)> = Vec::new();
    for s in samples.iter().chain(&recorded.samples) {
        let family = match families.iter().find(|(n, _)| *n == s.name) {
            Some((_, f)) => f.clone(),
            None => {
                let f = GaugeFamily::default();
                // prometheus-client adds no prefix or suffix to a gauge's name.
                registry.register(s.name, s.help, f.clone());
                families.push((s.name, f.clone()));
                f
            }
        };
        let mut labels = base.clone();
        labels.extend(s.labels.iter().cloned());
        family.get_or_create(&labels).set(s.value);
    }
    let mut text = String::new();
    encode(&mut text, &registry).context("encoding the metrics")?;
    // Named by process: two runs given one file (a mistake) each rename a whole file.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("writing the metrics file {}", path.display()))
}

/// The value of `name` with exactly the labels `labels` in the metrics file at `path`, if
/// it has one (a file another program wrote, or none at all: nothing).
fn previous_value(path: &Path, name: &str, labels: &Labels) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let want = format!(
        "{name}{{{}}}",
        labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",")
    );
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series == want).then(|| value.parse().ok()).flatten()
    })
}

/// A label value as the text format writes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
