//! Opening the repository a command names, with its passphrase.
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use vmkeep_repo::{CacheOptions, Repository, Tuning};
use vmkeep_store::{HttpOptions, HttpStore, LocalStore, S3Options, S3Store, Store};
use zeroize::Zeroizing;

use crate::args::Global;

pub fn repo_location(g: &Global) -> Result<&str> {
    match g.repo.as_deref() {
        Some(r) if !r.is_empty() => Ok(r),
        _ => bail!("no repository given: use --repo REPO or set VMKEEP_REPO"),
    }
}

/// The store behind a repository location: a directory, `s3://BUCKET[/PREFIX]` (configured
/// as the AWS tools are), or `https://HOST[:PORT]/NAME`.
pub fn open_store(g: &Global, location: &str) -> Result<Arc<dyn Store>> {
    if location.starts_with("https://") || location.starts_with("http://") {
        return Ok(Arc::new(http_store(g, location)?));
    }
    if location.starts_with("s3://") {
        let mut opts = S3Options::default();
        if let Some(d) = env_secs("VMKEEP_S3_RETRY_SECS") {
            opts.retry_for = d;
        }
        return Ok(Arc::new(S3Store::open(location, opts)?));
    }
    if location.contains("://") {
        bail!(
            "{location}: repositories are directories, s3://BUCKET[/PREFIX] or \
             https://HOST[:PORT]/NAME"
        );
    }
    let path = Path::new(location);
    if !path.exists() {
        return Err(vmkeep_repo::Error::NotARepository {
            location: location.into(),
        }
        .into());
    }
    Ok(Arc::new(LocalStore::open(path)?))
}

/// A `vmkeep serve` repository, with the token from --token-file or VMKEEP_TOKEN.
pub fn http_store(g: &Global, url: &str) -> Result<HttpStore> {
    let token = match &g.token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?;
            Some(t.trim().to_string())
        }
        None => std::env::var("VMKEEP_TOKEN")
            .ok()
            .map(|t| t.trim().to_string()),
    };
    let mut opts = HttpOptions {
        token,
        tls_fingerprint: g.tls_fingerprint.clone(),
        ..HttpOptions::default()
    };
    if let Some(d) = env_secs("VMKEEP_HTTP_RETRY_SECS") {
        opts.retry_for = d;
    }
    Ok(HttpStore::connect(url, opts)?)
}

/// A passphrase in memory, wiped when dropped.
pub type Passphrase = Zeroizing<Vec<u8>>;

fn read_password_file(path: &Path) -> Result<Passphrase> {
    // Wrapped at once: the buffer is wiped however this function returns.
    let mut s = Zeroizing::new(
        std::fs::read(path)
            .with_context(|| format!("reading the password file {}", path.display()))?,
    );
    // Popping never reallocates, so no unwiped copy is left behind.
    while s.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        s.pop();
    }
    if s.is_empty() {
        bail!("the password file {} is empty", path.display());
    }
    Ok(s)
}

/// The passphrase the user configured: --password-file / VMKEEP_PASSWORD_FILE, then
/// VMKEEP_PASSWORD. Never prompts.
pub fn configured_passphrase(g: &Global) -> Result<Option<Passphrase>> {
    if let Some(f) = &g.password_file {
        return Ok(Some(read_password_file(f)?));
    }
    match std::env::var("VMKEEP_PASSWORD") {
        Ok(p) => Ok(Some(Zeroizing::new(p.into_bytes()))),
        Err(_) => Ok(None),
    }
}

/// The configured passphrase ([`configured_passphrase`]), or a prompt (only when stdin is a
/// terminal). `confirm` asks twice (new passphrases).
pub fn passphrase(g: &Global, confirm: bool) -> Result<Option<Passphrase>> {
    match configured_passphrase(g)? {
        Some(p) => Ok(Some(p)),
        None => prompt("passphrase", confirm),
    }
}

pub fn prompt(what: &str, confirm: bool) -> Result<Option<Passphrase>> {
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let p = Zeroizing::new(rpassword::prompt_password(format!("enter {what}: "))?);
    if confirm {
        let q = Zeroizing::new(rpassword::prompt_password(format!("repeat {what}: "))?);
        if p != q {
            bail!("the passphrases differ");
        }
    }
    if p.is_empty() {
        bail!("an empty passphrase is not allowed");
    }
    Ok(Some(Zeroizing::new(p.as_bytes().to_vec())))
}

fn env_secs(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()?
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Tuning defaults, adjustable by environment for tests and odd setups.
pub fn tuning() -> Tuning {
    let mut t = Tuning::default();
    if let Some(d) = env_secs("VMKEEP_LEASE_TIMEOUT_SECS") {
        t.lease_timeout = d;
    }
    if let Some(d) = env_secs("VMKEEP_LEASE_REFRESH_SECS") {
        t.lease_refresh = d;
    }
    if let Some(n) = std::env::var("VMKEEP_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        t.threads = n.max(1);
    }
    if let Some(n) = std::env::var("VMKEEP_LIST_PACKS_UP_TO")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        t.list_packs_up_to = n;
    }
    if let Some(n) = std::env::var("VMKEEP_SPILL_IDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        t.spill_ids = n.max(1);
    }
    t
}

/// Open the repository. A configured passphrase is always handed over, so that a repository
/// whose config claims to be unencrypted is refused (a user with a passphrase expects
/// encryption); the prompt is offered only when none is configured and the repository needs one.
/// The checkpoint chain of this repository in bitmap and checkpoint names: its id's first 8
/// characters (`vmkeep-<chain>-<token>`).
pub fn chain_of(repo: &Repository) -> String {
    repo.config().id.chars().take(8).collect()
}

pub fn open_repo(g: &Global) -> Result<Repository> {
    open_repo_at(g, repo_location(g)?)
}

/// The repository at `location` (another than --repo: a replica, a replication source), opened
/// with the same passphrase settings.
pub fn open_repo_at(g: &Global, location: &str) -> Result<Repository> {
    let store = open_store(g, location)?;
    let configured = configured_passphrase(g)?;
    let cache = cache_options(g);
    let pass = match Repository::open(store.clone(), configured.as_deref().map(Vec::as_slice)) {
        Ok(r) => return with_cache(r.with_tuning(tuning()), cache.as_ref()),
        Err(vmkeep_repo::Error::PassphraseRequired) if configured.is_none() => {
            prompt("passphrase", false)?
                .ok_or_else(|| anyhow!(vmkeep_repo::Error::PassphraseRequired))?
        }
        Err(e) => return Err(e.into()),
    };
    with_cache(
        Repository::open(store, Some(&pass))?.with_tuning(tuning()),
        cache.as_ref(),
    )
}

/// The local cache: `--cache-dir`, else `$XDG_CACHE_HOME/vmkeep`, else `~/.cache/vmkeep`;
/// none with `--no-cache` or when no folder can be named.
fn cache_options(g: &Global) -> Option<CacheOptions> {
    if g.no_cache {
        return None;
    }
    let dir = g.cache_dir.clone().or_else(|| {
        let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty());
        let home = std::env::var_os("HOME").filter(|v| !v.is_empty());
        xdg.map(PathBuf::from)
            .or_else(|| home.map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("vmkeep"))
    })?;
    let mut opts = CacheOptions::new(dir);
    if let Some(mib) = std::env::var("VMKEEP_CACHE_MAX_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        opts.max_object_bytes = mib << 20;
    }
    if let Some(d) = env_secs("VMKEEP_CACHE_LOCK_SECS") {
        opts.lock_wait = d;
    }
    Some(opts)
}

/// Attach the cache; one that cannot be created is done without, with a warning.
fn with_cache(repo: Repository, cache: Option<&CacheOptions>) -> Result<Repository> {
    let Some(opts) = cache else {
        return Ok(repo);
    };
    match std::fs::create_dir_all(&opts.dir) {
        Ok(()) => Ok(repo.with_cache(Some(opts))?),
        Err(e) => {
            tracing::warn!(dir = %opts.dir.display(), error = %e, "cannot create the cache folder; running without a cache");
            Ok(repo)
        }
    }
}
