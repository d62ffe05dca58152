//! Bringing the cached blob index up to date with the index objects the repository lists.
//!
//! Under the cache lock: open the catalog's runs (a damaged one is dropped), read the listed
//! index objects no run covers (in parallel, each verified by its name as always) into a new
//! run, then merge runs so there stay few (the newest into the one before while it is at least
//! half its size; runs whose sources are mostly gone are rewritten without them). A backup of a
//! repository whose index did not change reads no index object at all; one after another
//! host's backup reads just that backup's index objects.
use std::collections::HashSet;
use std::path::Path;

use vmkeep_core::pack::IndexFile;
use vmkeep_store::{Key, ObjectMeta};

use super::build::RunBuilder;
use super::run::{Run, Source};
use super::table::{self, Table};
use super::Cache;
use crate::error::{Error, Result};
use crate::index::{fetch_index_object, Fetched};
use crate::Repository;

/// More runs than this are merged even when their sizes differ.
const MAX_RUNS: usize = 8;

/// The up-to-date table, and the index objects that could not be read.
pub(crate) struct Synced {
    pub table: Table,
    pub damaged: Vec<(Key, vmkeep_core::Error)>,
    /// Index objects read from the repository by this call.
    pub fetched: usize,
    /// Their names (read and verified just now: `check` does not read them again).
    pub fresh: HashSet<[u8; 32]>,
}

/// The listed object as a source: its name, size and time.
fn source_of(m: &ObjectMeta) -> Option<Source> {
    let mut name = [0u8; 32];
    hex::decode_to_slice(&m.key.name, &mut name).ok()?;
    let modified_ns = m
        .modified
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Some(Source {
        name,
        size: m.size,
        modified_ns,
    })
}

pub(crate) fn sync(repo: &Repository, cache: &Cache, listed: &[ObjectMeta]) -> Result<Synced> {
    let _lock = cache.lock()?;
    let mut damaged = Vec::new();
    let mut listed_set = HashSet::with_capacity(listed.len());
    let mut listed_keys = Vec::with_capacity(listed.len());
    for m in listed {
        match source_of(m) {
            Some(b) => {
                listed_set.insert(b);
                listed_keys.push((b, m.key.clone()));
            }
            None => damaged.push((
                m.key.clone(),
                vmkeep_core::Error::Corrupt {
                    kind: "index",
                    reason: "its name is not the BLAKE3 hash of its bytes (renamed or replaced)"
                        .into(),
                },
            )),
        }
    }
    let catalog = table::read_catalog(&cache.dir)?;
    let had_catalog = catalog.is_some();
    let in_catalog = catalog.as_ref().map_or(0, Vec::len);
    let mut runs: Vec<(String, Run)> = Vec::new();
    for name in catalog.unwrap_or_default() {
        match Run::open(&table::run_path(&cache.dir, &name)) {
            Ok(r) => runs.push((name, r)),
            Err(Error::CacheDamaged { path, reason }) => {
                tracing::warn!(path = %path.display(), %reason, "discarding a damaged cache file");
                let _ = std::fs::remove_file(&path);
            }
            Err(Error::CacheIo { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(e) => return Err(e),
        }
    }
    let covered: HashSet<Source> = runs
        .iter()
        .flat_map(|(_, r)| r.sources.iter().copied())
        .collect();
    let missing: Vec<&(Source, Key)> = listed_keys
        .iter()
        .filter(|(b, _)| !covered.contains(b))
        .collect();
    let fetched = missing.len();
    let mut fresh = HashSet::new();
    // A run the catalog names but that could not be opened: the catalog is rewritten without it.
    let mut changed = !had_catalog || in_catalog != runs.len();
    if !missing.is_empty() {
        let name = table::new_run_name();
        let path = table::run_path(&cache.dir, &name);
        let mut builder = RunBuilder::new(cache.dir.join(format!(".tmp-parts-{name}")));
        read_into(repo, &missing, &mut builder, &mut damaged, &mut fresh)?;
        write_run(builder, &path)?;
        runs.push((name.clone(), Run::open(&path)?));
        changed = true;
    }
    let before: Vec<String> = runs.iter().map(|(n, _)| n.clone()).collect();
    let runs = compact(&cache.dir, runs, &listed_set)?;
    if changed || runs.iter().map(|(n, _)| n).ne(before.iter()) {
        let names: Vec<String> = runs.iter().map(|(n, _)| n.clone()).collect();
        table::write_catalog(&cache.dir, &names)?;
        remove_unlisted_runs(&cache.dir, &names);
    }
    super::objects::trim(cache);
    let runs = runs
        .into_iter()
        .map(|(_, r)| {
            let live = table::live_mask(&r, &listed_set);
            (r, live)
        })
        .collect();
    Ok(Synced {
        table: Table { runs },
        damaged,
        fetched,
        fresh,
    })
}

/// Read the index objects in parallel (as many requests as the store serves well) and add
/// their entries to `builder` as they arrive.
fn read_into(
    repo: &Repository,
    missing: &[&(Source, Key)],
    builder: &mut RunBuilder,
    damaged: &mut Vec<(Key, vmkeep_core::Error)>,
    fresh: &mut HashSet<[u8; 32]>,
) -> Result<()> {
    let threads = repo.reader_threads().min(missing.len()).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = crossbeam_channel::bounded::<(usize, Result<Fetched>)>(threads * 2);
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..threads {
            let tx = tx.clone();
            let next = &next;
            s.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((_, key)) = missing.get(i) else {
                    return;
                };
                let r = fetch_index_object(repo, key);
                let stop = r.is_err();
                if tx.send((i, r)).is_err() || stop {
                    return;
                }
            });
        }
        drop(tx);
        let mut first_error = None;
        for (i, r) in rx {
            let (name, key) = missing[i];
            match r {
                Ok(Fetched::Read(f)) => {
                    fresh.insert(name.name);
                    add_file(builder, *name, f)?
                }
                Ok(Fetched::Gone) => {}
                Ok(Fetched::Damaged(e)) => damaged.push((key.clone(), e)),
                Err(e) => {
                    // Stop the others: they find no more work.
                    next.store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

fn add_file(builder: &mut RunBuilder, name: Source, f: IndexFile) -> Result<()> {
    let source = builder.add_source(name);
    for (pack, entries) in &f.packs {
        for e in entries {
            builder.add_entry(*pack, source, e)?;
        }
    }
    Ok(())
}

fn write_run(builder: RunBuilder, path: &Path) -> Result<()> {
    let tmp = super::temp_beside(path);
    let r = builder.finish(&tmp);
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    std::fs::rename(&tmp, path).map_err(|e| Error::cache_io(path, "rename into", e))
}

/// The merging policy (see the module doc). Merged runs drop entries of unlisted sources.
fn compact(
    dir: &Path,
    mut runs: Vec<(String, Run)>,
    listed: &HashSet<Source>,
) -> Result<Vec<(String, Run)>> {
    // Rewrite runs most of whose sources the repository no longer lists (a prune rewrote them).
    for slot in runs.iter_mut() {
        let live = table::live_mask(&slot.1, listed);
        let dead = live.iter().filter(|l| !**l).count();
        if dead > 0 && dead * 2 >= live.len() {
            *slot = merge(dir, &[&slot.1], listed)?;
        }
    }
    runs.retain(|(_, r)| !r.sources.is_empty());
    while runs.len() >= 2 {
        let n = runs.len();
        let (older, newer) = (&runs[n - 2].1, &runs[n - 1].1);
        if newer.entries * 2 < older.entries && n <= MAX_RUNS {
            break;
        }
        let merged = merge(dir, &[older, newer], listed)?;
        runs.truncate(n - 2);
        runs.push(merged);
    }
    Ok(runs)
}

/// One run holding the live entries of `inputs`.
fn merge(dir: &Path, inputs: &[&Run], listed: &HashSet<Source>) -> Result<(String, Run)> {
    let name = table::new_run_name();
    let path = table::run_path(dir, &name);
    let mut b = RunBuilder::new(dir.join(format!(".tmp-parts-{name}")));
    for run in inputs {
        let sources: Vec<Option<u32>> = run
            .sources
            .iter()
            .map(|s| listed.contains(s).then(|| b.add_source(*s)))
            .collect();
        let mut packs: Vec<Option<u32>> = vec![None; run.packs.len()];
        run.for_each(|mut e| {
            let Some(source) = sources[e.source as usize] else {
                return Ok(());
            };
            let pack = match packs[e.pack as usize] {
                Some(p) => p,
                None => {
                    let p = b.pack_ordinal(run.packs[e.pack as usize]);
                    packs[e.pack as usize] = Some(p);
                    p
                }
            };
            e.source = source;
            e.pack = pack;
            b.add(e)
        })?;
    }
    write_run(b, &path)?;
    Ok((name, Run::open(&path)?))
}

/// Delete run files the catalog no longer names (processes that still use one hold it open,
/// which keeps its data until they close it), and leftovers of killed writers.
fn remove_unlisted_runs(dir: &Path, names: &[String]) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let stale_run = table::is_run_name(&n) && !names.contains(&n);
        let leftover = n.starts_with(".tmp-");
        if stale_run {
            let _ = std::fs::remove_file(e.path());
        } else if leftover {
            let p = e.path();
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
        }
    }
}
