use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::json;
use vmkeep_core::keys::KdfParams;
use vmkeep_repo::{InitOptions, Repository};
use vmkeep_store::{LocalStore, Store};

use crate::args::{Global, InitArgs};
use crate::context::{configured_passphrase, passphrase, repo_location};
use crate::output::{print_json, print_line};
use crate::size::parse_size;

pub fn run(g: &Global, a: &InitArgs) -> Result<u8> {
    let location = repo_location(g)?;
    if let Some(src) = &a.replica_of {
        return replica(g, location, src);
    }
    let chunk_size = parse_size(&a.chunk_size).map_err(anyhow::Error::msg)?;
    let chunk_size = u32::try_from(chunk_size).context("chunk size too large")?;
    vmkeep_core::config::RepoConfig::validate_chunk_size(chunk_size)?;
    let pass = if a.encrypt {
        match passphrase(g, true)? {
            Some(p) => Some(p),
            None => bail!("--encrypt needs a passphrase: use --password-file FILE, VMKEEP_PASSWORD, or run on a terminal"),
        }
    } else if configured_passphrase(g)?.is_some() {
        // Opening would refuse an unencrypted repository with a passphrase configured.
        bail!("a passphrase was given (--password-file, VMKEEP_PASSWORD_FILE or VMKEEP_PASSWORD) but not --encrypt: add --encrypt for an encrypted repository, or give no passphrase for an unencrypted one");
    } else {
        None
    };
    let store = new_store(g, location)?;
    let kdf = kdf_params();
    let repo = Repository::init(
        store,
        InitOptions {
            chunk_size,
            passphrase: pass,
            kdf,
        },
    )?;
    let c = repo.config();
    if g.json {
        print_json(
            &json!({"repo": location, "id": c.id, "encrypted": c.encrypted, "chunk_size": c.chunk_size}),
        )?;
    } else {
        print_line(&format!(
            "created {} repository {} at {location} (chunk size {})",
            if c.encrypted {
                "encrypted"
            } else {
                "unencrypted"
            },
            &c.id[..8],
            crate::size::human(c.chunk_size as u64)
        ))?;
        if c.encrypted {
            print_line("keep the passphrase safe, and a paper copy of the key (`vmkeep key export`): without them the data cannot be recovered")?;
        }
    }
    Ok(0)
}

/// The store of a repository to create: a new folder, or a `vmkeep serve` repository (which
/// the server creates when the config lands; an admin token is needed).
fn new_store(g: &Global, location: &str) -> Result<Arc<dyn Store>> {
    if location.contains("://") {
        return crate::context::open_store(g, location);
    }
    let path = Path::new(location);
    if path.join("config").exists() {
        return Err(vmkeep_repo::Error::AlreadyExists {
            location: location.into(),
        }
        .into());
    }
    let store = LocalStore::create(path)
        .with_context(|| format!("creating the repository folder {location}"))?;
    Ok(Arc::new(store))
}

/// Argon2id cost; tests may lower it with VMKEEP_KDF_MEM_KIB (the value is stored in the key file).
pub fn kdf_params() -> KdfParams {
    let mut k = KdfParams::default();
    if let Some(m) = std::env::var("VMKEEP_KDF_MEM_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        k.m_cost_kib = m;
        k.t_cost = 1;
    }
    k
}

/// `init --replica-of SRC`: SRC opened with the configured passphrase, its chunking and key
/// files taken over.
fn replica(g: &Global, location: &str, src: &str) -> Result<u8> {
    let source = crate::context::open_repo_at(g, src)?;
    let store = new_store(g, location)?;
    let repo = Repository::init_replica(store, &source)?;
    let c = repo.config();
    if g.json {
        print_json(
            &json!({"repo": location, "id": c.id, "encrypted": c.encrypted,
            "chunk_size": c.chunk_size, "replica_of": src}),
        )?;
    } else {
        print_line(&format!(
            "created repository {} at {location}, a replica of {src} (same chunk size and keys: \
             `vmkeep --repo {src} replicate --to {location}` fills it)",
            c.id
        ))?;
    }
    Ok(0)
}
