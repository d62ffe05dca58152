//! Exhaustive checks of the protocol model, and of its reverted fixes.
use std::time::Instant;

use super::explore::{explore, Model, Stats};
use super::protocol::{BackupSpec, Config, Host, Protocol, PruneSpec, Variant};

fn max_states() -> u64 {
    if deep() {
        150_000_000
    } else {
        20_000_000
    }
}

fn deep() -> bool {
    std::env::var_os("VMKEEP_MODEL_DEEP").is_some()
}

/// Host 0 and 2 are one machine (two PID namespaces, same host name); host 1 is another
/// machine whose clock runs `skew` ticks apart.
fn hosts(skew: i8) -> Vec<Host> {
    vec![
        Host {
            skew: 0,
            machine: 0,
            hostname: 0,
        },
        Host {
            skew,
            machine: 1,
            hostname: 1,
        },
        Host {
            skew: 0,
            machine: 0,
            hostname: 0,
        },
    ]
}

/// One backup of VM 0 that reuses blob 1 of restore point m0 (which the prune forgets) and
/// writes blob 3, beside one prune on `prune_host`.
fn one_backup(prune_host: usize, variant: Variant) -> Config {
    Config {
        hosts: hosts(1),
        backups: vec![BackupSpec {
            host: 0,
            vm: 0,
            content: [1, 3],
        }],
        prunes: vec![PruneSpec {
            host: prune_host,
            forget: Some(0),
            repack: true,
        }],
        skew_allowance: 1,
        max_time: if deep() { 4 } else { 3 },
        crashes: true,
        stalls: true,
        variant,
    }
}

fn run(name: &str, cfg: Config) -> Result<Stats, String> {
    let t = Instant::now();
    let m = Protocol { cfg };
    match explore(&m, max_states()) {
        Ok(st) => {
            println!(
                "{name}: holds; {} states, {} transitions, {} terminal, depth {}, {:.1} s",
                st.states,
                st.transitions,
                st.terminal_states,
                st.max_depth,
                t.elapsed().as_secs_f64()
            );
            Ok(st)
        }
        Err(v) => {
            let trace: Vec<String> = v.trace.iter().map(|a| format!("{a:?}")).collect();
            let msg = format!(
                "{name}: {} after {} steps: {}",
                v.what,
                trace.len(),
                trace.join(" ")
            );
            println!("{msg} ({:.1} s)", t.elapsed().as_secs_f64());
            Err(msg)
        }
    }
}

fn holds(name: &str, cfg: Config) -> Stats {
    let _ = Protocol { cfg: cfg.clone() }.init();
    run(name, cfg).unwrap_or_else(|e| panic!("{e}"))
}

fn finds(name: &str, cfg: Config, what: &str) {
    match run(name, cfg) {
        Ok(_) => panic!("{name}: the checker found no violation of the reverted protocol"),
        Err(msg) => assert!(msg.contains(what), "{msg}"),
    }
}

#[test]
fn backup_and_prune_on_other_machines_with_clock_skew() {
    let st = holds(
        "backup + prune, other machine",
        one_backup(1, Variant::default()),
    );
    assert!(st.states > 10_000, "the scenario is not trivial");
}

#[test]
fn backup_and_prune_on_one_host() {
    holds(
        "backup + prune, same host",
        one_backup(0, Variant::default()),
    );
}

#[test]
fn backup_and_prune_in_another_pid_namespace() {
    holds(
        "backup + prune, other PID namespace",
        one_backup(2, Variant::default()),
    );
}

#[test]
fn two_backups_and_a_prune() {
    let mut cfg = one_backup(0, Variant::default());
    cfg.backups.push(BackupSpec {
        host: 1,
        vm: 1,
        content: [2, 4],
    });
    // Crashes and stalls of each process are covered above; here the two backups interleave
    // with each other and the prune (crashes too in the deep run).
    cfg.stalls = deep();
    cfg.crashes = deep();
    cfg.max_time = if deep() { 2 } else { 1 };
    holds("two backups + prune", cfg);
}

#[test]
fn two_prunes_never_sweep_at_once() {
    let mut cfg = one_backup(0, Variant::default());
    cfg.hosts = hosts(-1);
    cfg.prunes.push(PruneSpec {
        host: 1,
        forget: None,
        repack: false,
    });
    if deep() {
        // With a backup between them; crashes and stalls as everywhere, less time.
        cfg.max_time = 2;
    } else {
        cfg.backups.clear();
        cfg.crashes = false;
    }
    holds("two prunes", cfg);
}

// The defects of the original protocol, re-introduced one at a time.

#[test]
fn finds_defect_1_backup_finishing_during_mark() {
    let v = Variant {
        stale_mark: true,
        ..Default::default()
    };
    finds(
        "defect 1 (stale mark)",
        one_backup(0, v),
        "in no existing indexed pack",
    );
}

#[test]
fn finds_defect_2_lost_lease_not_sticky() {
    let v = Variant {
        non_sticky_lost: true,
        ..Default::default()
    };
    finds(
        "defect 2 (lost not sticky)",
        one_backup(0, v),
        "in no existing indexed pack",
    );
}

#[test]
fn finds_defect_3_record_time_before_put() {
    let v = Variant {
        record_time_rule: true,
        ..Default::default()
    };
    finds(
        "defect 3 (record time rule)",
        one_backup(0, v),
        "in no existing indexed pack",
    );
}

#[test]
fn finds_defect_4_hostname_identity() {
    let v = Variant {
        hostname_identity: true,
        ..Default::default()
    };
    finds(
        "defect 4 (hostname identity)",
        one_backup(2, v),
        "in no existing indexed pack",
    );
}

#[test]
fn finds_two_prunes_with_ordered_exclusion() {
    let mut cfg = one_backup(
        0,
        Variant {
            ordered_exclusion: true,
            ..Default::default()
        },
    );
    cfg.hosts = hosts(-1);
    cfg.backups.clear();
    cfg.crashes = false;
    cfg.prunes.push(PruneSpec {
        host: 1,
        forget: None,
        repack: false,
    });
    finds(
        "ordered exclusion",
        cfg,
        "hold the maintenance lease at once",
    );
}
