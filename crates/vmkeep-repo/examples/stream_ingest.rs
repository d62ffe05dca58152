//! Measures how a stream goes into a repository and back (bench/memory.py drives it).
//!
//! ```text
//! stream_ingest --repo DIR [--init] [--encrypt] --vm NAME --mode MODE [--image-chunk BYTES]
//!               [--cdc MIN,AVG,MAX] [--threads N] [--verify] FILE
//! MODE: memory  page images + literals (parse QEMU's framing)
//!       cdc     content-defined chunks only (no parsing)
//!       disk    the file as a raw disk image (the disk pipeline)
//! ```
//! Prints one JSON object: seconds, MB/s, the backup's stats (stored bytes include metadata),
//! and with --verify the seconds to read the stream back (compared with the file). FILE may be
//! a FIFO that QEMU writes into (`migrate` to `exec:cat > FIFO`); --verify then does nothing.
//! Passphrase of --encrypt repositories: "stream-ingest bench" (Argon2 at its minimum).
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use vmkeep_core::keys::KdfParams;
use vmkeep_core::memory::MemoryLayout;
use vmkeep_core::stream::CdcParams;
use vmkeep_repo::{BackupOptions, ImageBackupOptions, InitOptions, NoProgress, Repository, Tuning};
use vmkeep_store::LocalStore;

const PASS: &[u8] = b"stream-ingest bench";

struct Args {
    repo: PathBuf,
    init: bool,
    encrypt: bool,
    vm: String,
    mode: String,
    layout: MemoryLayout,
    threads: Option<usize>,
    verify: bool,
    file: PathBuf,
}

fn parse() -> Args {
    let mut a = Args {
        repo: PathBuf::new(),
        init: false,
        encrypt: false,
        vm: "bench".into(),
        mode: "memory".into(),
        layout: MemoryLayout::DEFAULT,
        threads: None,
        verify: false,
        file: PathBuf::new(),
    };
    let mut it = std::env::args().skip(1);
    let usage = "see the doc comment of examples/stream_ingest.rs";
    while let Some(arg) = it.next() {
        let mut val = || it.next().expect(usage);
        match arg.as_str() {
            "--repo" => a.repo = val().into(),
            "--init" => a.init = true,
            "--encrypt" => a.encrypt = true,
            "--vm" => a.vm = val(),
            "--mode" => a.mode = val(),
            "--image-chunk" => a.layout.image_chunk = val().parse().expect(usage),
            "--cdc" => {
                let v: Vec<u32> = val().split(',').map(|x| x.parse().expect(usage)).collect();
                a.layout.cdc = CdcParams {
                    min: v[0],
                    avg: v[1],
                    max: v[2],
                };
            }
            "--threads" => a.threads = Some(val().parse().expect(usage)),
            "--verify" => a.verify = true,
            f if !f.starts_with("--") => a.file = f.into(),
            other => panic!("unknown argument {other}: {usage}"),
        }
    }
    a.layout.parse = a.mode == "memory";
    a
}

/// A `Write` that hashes what it is given.
struct HashWriter(blake3::Hasher, u64);

impl Write for HashWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        self.1 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() {
    let a = parse();
    let pass = a.encrypt.then(|| PASS.to_vec().into());
    let store: Arc<dyn vmkeep_store::Store> = if a.init {
        Arc::new(LocalStore::create(&a.repo).expect("create the repository folder"))
    } else {
        Arc::new(LocalStore::open(&a.repo).expect("open the repository folder"))
    };
    let repo = if a.init {
        Repository::init(
            store,
            InitOptions {
                chunk_size: 64 << 10,
                passphrase: pass,
                kdf: KdfParams {
                    m_cost_kib: 64,
                    t_cost: 1,
                    p_cost: 1,
                },
            },
        )
    } else {
        Repository::open(store, a.encrypt.then_some(PASS))
    }
    .expect("repository");
    let mut tuning = Tuning::default();
    if let Some(t) = a.threads {
        tuning.threads = t;
    }
    let repo = repo.with_tuning(tuning);
    let started = Instant::now();
    let opts = BackupOptions {
        vm: a.vm.clone(),
        ..Default::default()
    };
    let (m, pages) = if a.mode == "disk" {
        let m = repo
            .backup_image(
                &ImageBackupOptions {
                    backup: opts,
                    disks: vec![("state".into(), a.file.clone())],
                    full: true,
                },
                &NoProgress,
            )
            .expect("backup");
        (m, None)
    } else {
        let mut s = repo.begin_backup(opts).expect("backup");
        let mut f = File::open(&a.file).expect("the stream file");
        let rec = s
            .add_stream_with("memory", &mut f, a.layout, &NoProgress)
            .expect("stream")
            .clone();
        (s.commit().expect("commit"), rec.pages)
    };
    let seconds = started.elapsed().as_secs_f64();
    // Bytes read (the file may be a FIFO that QEMU writes into).
    let bytes = m.stats.read_bytes;
    let mut verify = serde_json::Value::Null;
    let is_file = std::fs::metadata(&a.file).is_ok_and(|m| m.is_file());
    if a.verify && a.mode != "disk" && is_file {
        let started = Instant::now();
        let mut w = HashWriter(blake3::Hasher::new(), 0);
        repo.read_stream_to(&m, "memory", &mut w, &NoProgress)
            .expect("read back");
        let read_seconds = started.elapsed().as_secs_f64();
        let mut want = blake3::Hasher::new();
        want.update_reader(File::open(&a.file).unwrap()).unwrap();
        assert_eq!(
            w.0.finalize(),
            want.finalize(),
            "the stream read back differs"
        );
        verify =
            serde_json::json!({"seconds": read_seconds, "mbps": w.1 as f64 / read_seconds / 1e6});
    }
    let out = serde_json::json!({
        "mode": a.mode,
        "file": a.file,
        "bytes": bytes,
        "seconds": seconds,
        "mbps": bytes as f64 / seconds / 1e6,
        "threads": repo.tuning().threads,
        "image_chunk": a.layout.image_chunk,
        "cdc": [a.layout.cdc.min, a.layout.cdc.avg, a.layout.cdc.max],
        "stats": m.stats,
        "literal_bytes": pages.as_ref().map(|p| p.literal_size),
        "ops_bytes": pages.as_ref().map(|p| p.ops_size),
        "paged": pages.is_some(),
        "read_back": verify,
    });
    println!("{out}");
}
