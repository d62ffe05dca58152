//! QEMU migration streams for tests: streams built in QEMU's framing (with pages, zero pages,
//! device state), real ones taken from a running test VM through a pipe, and streams loaded
//! into a VM started with `-incoming defer` through a pipe.
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::vm::Vm;

const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;

/// Builds a stream the way QEMU 10's background snapshot writes it: header, configuration,
/// the RAM section's setup, RAM parts of page and zero-page records, device state, the end
/// marker and the JSON description.
pub struct StreamBuilder {
    pub out: Vec<u8>,
    blocks: Vec<(String, u64)>,
    last: Option<usize>,
}

impl StreamBuilder {
    /// `blocks`: (idstr, size) of the RAM blocks.
    pub fn new(blocks: &[(&str, u64)]) -> StreamBuilder {
        let mut b = StreamBuilder {
            out: Vec::new(),
            blocks: blocks.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
            last: None,
        };
        b.out.extend_from_slice(b"QEVM\0\0\0\x03");
        b.out.push(0x07);
        b.out.extend_from_slice(&14u32.to_be_bytes());
        b.out.extend_from_slice(b"pc-i440fx-10.0");
        b.section(0x01, 1, "ram", 4);
        let total: u64 = b.blocks.iter().map(|(_, s)| s).sum();
        b.out
            .extend_from_slice(&(total | FLAG_MEM_SIZE).to_be_bytes());
        for (name, size) in b.blocks.clone() {
            b.out.push(name.len() as u8);
            b.out.extend_from_slice(name.as_bytes());
            b.out.extend_from_slice(&size.to_be_bytes());
        }
        b.end_part();
        b
    }

    fn section(&mut self, typ: u8, sid: u32, idstr: &str, version: u32) {
        self.out.push(typ);
        self.out.extend_from_slice(&sid.to_be_bytes());
        self.out.push(idstr.len() as u8);
        self.out.extend_from_slice(idstr.as_bytes());
        self.out.extend_from_slice(&0u32.to_be_bytes());
        self.out.extend_from_slice(&version.to_be_bytes());
    }

    /// Starts a part of the RAM section.
    pub fn part(&mut self) {
        self.out.push(0x02);
        self.out.extend_from_slice(&1u32.to_be_bytes());
    }

    fn header(&mut self, block: usize, page: u64, flag: u64) {
        let cont = if self.last == Some(block) {
            FLAG_CONTINUE
        } else {
            0
        };
        self.out
            .extend_from_slice(&((page * 4096) | flag | cont).to_be_bytes());
        if cont == 0 {
            let name = self.blocks[block].0.clone();
            self.out.push(name.len() as u8);
            self.out.extend_from_slice(name.as_bytes());
            self.last = Some(block);
        }
    }

    pub fn page(&mut self, block: usize, page: u64, data: &[u8]) {
        assert_eq!(data.len(), 4096);
        self.header(block, page, FLAG_PAGE);
        self.out.extend_from_slice(data);
    }

    pub fn zero(&mut self, block: usize, page: u64) {
        self.header(block, page, FLAG_ZERO);
        self.out.push(0);
    }

    /// Ends a part of the RAM section (end-of-section flag and footer).
    pub fn end_part(&mut self) {
        self.out.extend_from_slice(&FLAG_EOS.to_be_bytes());
        self.out.push(0x7e);
        self.out.extend_from_slice(&1u32.to_be_bytes());
    }

    /// Device state (`state`, as one FULL section), the end marker, the JSON description.
    pub fn finish(mut self, state: &[u8]) -> Vec<u8> {
        self.section(0x04, 2, "timer", 2);
        self.out.extend_from_slice(state);
        self.out.push(0x7e);
        self.out.extend_from_slice(&2u32.to_be_bytes());
        self.out.push(0x00);
        self.out.push(0x06);
        let json = br#"{"page_size":4096,"devices":[{"name":"timer","instance_id":0}]}"#;
        self.out
            .extend_from_slice(&(json.len() as u32).to_be_bytes());
        self.out.extend_from_slice(json);
        self.out
    }
}

/// Takes a background snapshot of `vm`'s RAM and device state while it runs: QEMU writes the
/// stream into a pipe (`exec:cat > FIFO`, the FIFO in `dir`) and `consume` reads it as it
/// comes. Waits until QEMU reports the migration completed; panics if it failed.
pub fn capture<R>(vm: &Vm, dir: &Path, consume: impl FnOnce(&mut dyn Read) -> R) -> R {
    let fifo = dir.join("migration.fifo");
    make_fifo(&fifo);
    let mut q = vm.connect();
    q.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "background-snapshot", "state": true},
            {"capability": "events", "state": true},
        ]}),
    );
    q.execute(
        "migrate",
        json!({"uri": format!("exec:cat > {}", fifo.display())}),
    );
    let out = {
        let mut f = File::open(&fifo).expect("open the migration pipe");
        consume(&mut f)
    };
    wait_completed(&mut q, "migration");
    let _ = std::fs::remove_file(&fifo);
    out
}

/// Loads a migration stream into `vm` (started with `-incoming defer`): QEMU reads it from a
/// pipe (`exec:cat FIFO`, the FIFO in `dir`) that `produce` writes. Waits until QEMU reports
/// the migration completed and returns `query-status`'s `status`; panics if it failed.
pub fn load(vm: &Vm, dir: &Path, produce: impl FnOnce(&mut dyn Write)) -> String {
    let fifo = dir.join("incoming.fifo");
    make_fifo(&fifo);
    let mut q = vm.connect();
    q.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    q.execute(
        "migrate-incoming",
        json!({"uri": format!("exec:cat {}", fifo.display())}),
    );
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open the incoming pipe");
        produce(&mut f);
    }
    wait_completed(&mut q, "incoming migration");
    let _ = std::fs::remove_file(&fifo);
    q.execute("query-status", Value::Null)["status"]
        .as_str()
        .expect("query-status: status")
        .to_string()
}

/// A new FIFO at `path` (an old file there removed first).
fn make_fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Polls `query-migrate` until the migration completed (60 s at most); panics if it failed.
fn wait_completed(q: &mut crate::qmp::Qmp, what: &str) {
    let started = Instant::now();
    loop {
        let st = q.execute("query-migrate", Value::Null);
        match st["status"].as_str() {
            Some("completed") => return,
            Some("failed") | Some("cancelled") => panic!("{what} failed: {st}"),
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} did not complete: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
