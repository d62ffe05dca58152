//! The undo executor, over every prefix of a capture's steps: a `backup vm --memory` is killed
//! right after recording step k (before doing it), for every k, and its guard undoes the log.
//! The VM must be exactly as before: nodes, devices' attachments, bitmaps (name, recording,
//! persistence), exports, block jobs, fd sets, migration capabilities and bandwidth, no migration
//! running, run state. A step recorded but never done (the last one each time) must undo
//! harmlessly; the steps before it were done.
//!
//! The real binary, the real test guest. One QEMU at a time.

mod common;
#[path = "common/qemu.rs"]
mod qemu;

use common::*;
use qemu::*;
use serde_json::{json as j, Value};

/// Everything a capture may change, in a comparable form.
fn vm_state(vm: &Vm) -> Value {
    let mut nodes: Vec<Value> = vm
        .execute("query-named-block-nodes", j!({"flat": true}))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let mut bitmaps: Vec<Value> = n["dirty-bitmaps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| j!([b["name"], b["recording"], b["persistent"]]))
                .collect();
            bitmaps.sort_by_key(|b| b.to_string());
            j!({"node": n["node-name"], "drv": n["drv"], "bitmaps": bitmaps})
        })
        .collect();
    nodes.sort_by_key(|n| n.to_string());
    let devices: Vec<Value> = vm
        .execute("query-block", Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| j!([b["qdev"], b["inserted"]["node-name"]]))
        .collect();
    let migrating = vm.execute("query-migrate", Value::Null)["status"].clone();
    j!({
        "nodes": nodes,
        "devices": devices,
        "exports": vm.execute("query-block-exports", Value::Null),
        "jobs": vm.execute("query-block-jobs", Value::Null),
        "fdsets": vm.execute("query-fdsets", Value::Null),
        "caps": vm.execute("query-migrate-capabilities", Value::Null),
        "max_bandwidth": vm.execute("query-migrate-parameters", Value::Null)["max-bandwidth"],
        "migration_active": matches!(migrating.as_str(), Some("setup" | "active" | "device" | "cancelling")),
        "running": vm.running(),
    })
}

/// The one vmkeep bitmap of the state.
fn checkpoint(state: &Value) -> String {
    let names: Vec<String> = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n["bitmaps"].as_array().unwrap().iter())
        .filter_map(|b| b[0].as_str())
        .filter(|n| n.starts_with("vmkeep-"))
        .map(String::from)
        .collect();
    assert_eq!(names.len(), 1, "{state}");
    names[0].clone()
}

#[test]
fn undo_after_every_prefix_leaves_the_vm_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(3);
    // A first restore point, so later captures have a previous checkpoint to disable.
    json(
        vmkeep(&repo)
            .env("TMPDIR", &tmp)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    let before = vm_state(&vm);
    let mut k = 1;
    loop {
        let point = format!("undo-step-{k}");
        let out = vmkeep_std(&repo)
            .env("TMPDIR", &tmp)
            .env("VMKEEP_KILL_AT", &point)
            .args(["backup", "vm", "--memory", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            // Fewer steps than k: every prefix was tried.
            assert!(k > 10, "only {} steps? {err}", k - 1);
            break;
        }
        assert!(err.contains(&point), "{point}: {err}");
        let at = vm.progress();
        vm.wait_progress(at + 1);
        let after = vm_state(&vm);
        if snapshot_ids(&repo).len() == 1 {
            assert_eq!(after, before, "after {point}: {err}");
        } else {
            // Killed right after its commit: the new restore point's checkpoint replaced the
            // old one; everything else is as before.
            let renamed = |v: &Value| {
                v.to_string()
                    .replace(&checkpoint(&before), "CP")
                    .replace(&checkpoint(v), "CP")
            };
            assert_ne!(checkpoint(&after), checkpoint(&before), "{point}");
            assert_eq!(renamed(&after), renamed(&before), "after {point}: {err}");
            assert!(err.contains("retired"), "{point}: {err}");
        }
        assert_eq!(
            std::fs::read_dir(&tmp).unwrap().count(),
            0,
            "{point}: {err}"
        );
        k += 1;
    }
    eprintln!("{} prefixes undone", k - 1);
}
