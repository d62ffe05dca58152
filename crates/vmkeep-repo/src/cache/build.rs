//! Writing a run ([`super::run`]) in bounded memory. Records are kept in memory up to
//! [`SPILL_RECORDS`]; past that they go to 256 partition files by the id's first byte, each
//! then sorted on its own (a one-pass distribution sort: ids are uniformly distributed), so
//! building the run of a 160-million-entry repository needs about 100 MB, not 8 GB.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use vmkeep_core::pack::PackEntry;
use vmkeep_core::PackId;

use super::run::{
    bucket_bits_for, bucket_of, Record, RunEntry, Source, ENTRY_LEN, HEADER_LEN, MAGIC, VERSION,
};
use crate::Error;

/// Records held in memory before spilling to partitions (2 Mi records, about 110 MB).
const SPILL_RECORDS: usize = 2 << 20;
const PARTITIONS: usize = 256;

pub(crate) struct RunBuilder {
    tmp: PathBuf,
    packs: HashMap<PackId, u32>,
    pack_list: Vec<PackId>,
    sources: Vec<Source>,
    memory: Vec<Record>,
    spilled: Option<Vec<BufWriter<File>>>,
    count: u64,
    spill_at: usize,
}

impl RunBuilder {
    /// A builder whose partition files (if it spills) live under `tmp` (removed at the end).
    pub fn new(tmp: PathBuf) -> RunBuilder {
        RunBuilder {
            tmp,
            packs: HashMap::new(),
            pack_list: Vec::new(),
            sources: Vec::new(),
            memory: Vec::new(),
            spilled: None,
            count: 0,
            spill_at: SPILL_RECORDS,
        }
    }

    #[cfg(test)]
    pub fn spill_at(mut self, n: usize) -> RunBuilder {
        self.spill_at = n;
        self
    }

    pub fn add_source(&mut self, name: Source) -> u32 {
        self.sources.push(name);
        (self.sources.len() - 1) as u32
    }

    pub fn pack_ordinal(&mut self, pack: PackId) -> u32 {
        *self.packs.entry(pack).or_insert_with(|| {
            self.pack_list.push(pack);
            (self.pack_list.len() - 1) as u32
        })
    }

    pub fn add_entry(&mut self, pack: PackId, source: u32, e: &PackEntry) -> Result<(), Error> {
        let pack = self.pack_ordinal(pack);
        self.add(RunEntry {
            id: e.id,
            pack,
            source,
            offset: e.offset,
            length: e.length,
            raw_len: e.raw_len,
            kind: e.kind,
        })
    }

    /// Add an entry whose pack and source are ordinals of this builder.
    pub fn add(&mut self, e: RunEntry) -> Result<(), Error> {
        self.count += 1;
        let rec = e.encode();
        if let Some(parts) = &mut self.spilled {
            let part = &mut parts[rec[0] as usize];
            return part
                .write_all(&rec)
                .map_err(|e| Error::cache_io(&self.tmp, "write", e));
        }
        self.memory.push(rec);
        if self.memory.len() >= self.spill_at {
            self.spill()?;
        }
        Ok(())
    }

    fn part_path(&self, i: usize) -> PathBuf {
        self.tmp.join(format!("part-{i:03}"))
    }

    fn spill(&mut self) -> Result<(), Error> {
        std::fs::create_dir_all(&self.tmp).map_err(|e| Error::cache_io(&self.tmp, "create", e))?;
        let mut parts = Vec::with_capacity(PARTITIONS);
        for i in 0..PARTITIONS {
            let p = self.part_path(i);
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&p)
                .map_err(|e| Error::cache_io(&p, "create", e))?;
            parts.push(BufWriter::with_capacity(64 << 10, f));
        }
        for rec in std::mem::take(&mut self.memory) {
            parts[rec[0] as usize]
                .write_all(&rec)
                .map_err(|e| Error::cache_io(&self.tmp, "write", e))?;
        }
        self.spilled = Some(parts);
        Ok(())
    }

    /// Write the run to `out` (created; the caller renames it into place).
    pub fn finish(mut self, out: &Path) -> Result<(), Error> {
        let io = |what: &'static str| move |e: std::io::Error| Error::cache_io(out, what, e);
        let bits = bucket_bits_for(self.count);
        let buckets = 1usize << bits;
        let meta_len = self.pack_list.len() * 32
            + self.sources.len() * super::run::SOURCE_LEN
            + (2 * buckets + 1) * 8;
        let file = File::create(out).map_err(io("create"))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.seek(SeekFrom::Start(HEADER_LEN + meta_len as u64))
            .map_err(io("seek"))?;
        let mut dir = Directory::new(bits);
        if let Some(parts) = self.spilled.take() {
            for (i, part) in parts.into_iter().enumerate() {
                let f = part
                    .into_inner()
                    .map_err(|e| Error::cache_io(out, "write", e.into_error()))?;
                let mut recs = read_records(f, &self.part_path(i))?;
                recs.sort_unstable();
                dir.write(&mut w, &recs).map_err(io("write"))?;
            }
            let _ = std::fs::remove_dir_all(&self.tmp);
        } else {
            let mut recs = std::mem::take(&mut self.memory);
            recs.sort_unstable();
            dir.write(&mut w, &recs).map_err(io("write"))?;
        }
        let (starts, sums) = dir.finish(self.count);
        let mut meta = Vec::with_capacity(meta_len);
        for p in &self.pack_list {
            meta.extend_from_slice(&p.0);
        }
        for s in &self.sources {
            meta.extend_from_slice(&s.encode());
        }
        for v in starts.iter().chain(sums.iter()) {
            meta.extend_from_slice(&v.to_le_bytes());
        }
        let mut h = [0u8; HEADER_LEN as usize];
        h[..4].copy_from_slice(&MAGIC);
        h[4] = VERSION;
        h[5] = bits;
        h[8..16].copy_from_slice(&self.count.to_le_bytes());
        h[16..20].copy_from_slice(&(self.pack_list.len() as u32).to_le_bytes());
        h[20..24].copy_from_slice(&(self.sources.len() as u32).to_le_bytes());
        let mut hasher = blake3::Hasher::new();
        hasher.update(&h[..24]);
        hasher.update(&meta);
        h[24..56].copy_from_slice(hasher.finalize().as_bytes());
        w.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
        w.write_all(&h).map_err(io("write"))?;
        w.write_all(&meta).map_err(io("write"))?;
        w.flush().map_err(io("write"))?;
        Ok(())
    }
}

fn read_records(mut f: File, path: &Path) -> Result<Vec<Record>, Error> {
    f.seek(SeekFrom::Start(0))
        .map_err(|e| Error::cache_io(path, "seek", e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::cache_io(path, "stat", e))?
        .len() as usize;
    let mut recs = Vec::with_capacity(len / ENTRY_LEN);
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut rec = [0u8; ENTRY_LEN];
    for _ in 0..len / ENTRY_LEN {
        r.read_exact(&mut rec)
            .map_err(|e| Error::cache_io(path, "read", e))?;
        recs.push(rec);
    }
    let _ = std::fs::remove_file(path);
    Ok(recs)
}

/// Bucket starts and checksums, computed while the sorted records stream out.
struct Directory {
    bits: u8,
    starts: Vec<u64>,
    sums: Vec<u64>,
    current: usize,
    hasher: blake3::Hasher,
    written: u64,
}

impl Directory {
    fn new(bits: u8) -> Directory {
        Directory {
            bits,
            starts: vec![0],
            sums: Vec::new(),
            current: 0,
            hasher: blake3::Hasher::new(),
            written: 0,
        }
    }

    /// Close buckets up to (not including) `b`.
    fn advance_to(&mut self, b: usize) {
        while self.current < b {
            let h = std::mem::replace(&mut self.hasher, blake3::Hasher::new());
            self.sums.push(u64::from_le_bytes(
                h.finalize().as_bytes()[..8].try_into().expect("8"),
            ));
            self.starts.push(self.written);
            self.current += 1;
        }
    }

    fn write(&mut self, w: &mut impl Write, sorted: &[Record]) -> std::io::Result<()> {
        for rec in sorted {
            self.advance_to(bucket_of(rec, self.bits));
            self.hasher.update(rec);
            w.write_all(rec)?;
            self.written += 1;
        }
        Ok(())
    }

    fn finish(mut self, count: u64) -> (Vec<u64>, Vec<u64>) {
        debug_assert_eq!(self.written, count);
        let buckets = 1usize << self.bits;
        self.advance_to(buckets);
        // `advance_to(buckets)` closed the last bucket and pushed its end as a start.
        debug_assert_eq!(self.starts.len(), buckets + 1);
        debug_assert_eq!(self.sums.len(), buckets);
        (self.starts, self.sums)
    }
}
