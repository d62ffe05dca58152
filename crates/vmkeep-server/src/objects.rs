//! Who may do what to an object, per kind (PROTOCOL.md §4), and doing it. Every function here
//! is blocking (store and file operations): callers run it in `spawn_blocking`.
use std::time::SystemTime;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use vmkeep_core::config::RepoConfig;
use vmkeep_core::packlist::PackList;
use vmkeep_store::{Key, ObjectKind, ObjectMeta, Store};

use crate::packlists;
use crate::reply::{ApiError, ApiResult};
use crate::state::{lock, Repo};
use crate::tokens::Principal;
use crate::verify;

/// Header carrying an object's size in replies to HEAD.
pub(crate) const SIZE_HEADER: &str = "vmkeep-size";

/// The VM a restore point's pack list names.
pub(crate) enum RefsVm {
    Missing,
    /// It exists but does not parse: in scope only for whole-repository tokens.
    Unreadable,
    Vm(String),
}

impl RefsVm {
    /// Whether `p` may act on the restore point by this pack list (Missing: not decided here).
    fn in_scope(&self, p: &Principal) -> bool {
        match self {
            RefsVm::Vm(vm) => p.vm_in_scope(vm),
            RefsVm::Unreadable | RefsVm::Missing => p.whole_repository(),
        }
    }
}

pub(crate) fn refs_vm(repo: &Repo, snapshot: &str) -> ApiResult<RefsVm> {
    let key = Key::new(ObjectKind::Refs, snapshot)?;
    match packlists::read(&repo.store, &key) {
        Ok(Some(l)) => Ok(RefsVm::Vm(l.vm)),
        Ok(None) => Ok(RefsVm::Unreadable),
        Err(e) if e.is_not_found() => Ok(RefsVm::Missing),
        Err(e) => Err(e.into()),
    }
}

fn exists(store: &dyn Store, key: &Key) -> ApiResult<bool> {
    match store.size(key) {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn status(s: StatusCode) -> Response {
    s.into_response()
}

fn created(yes: bool) -> Response {
    status(if yes {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    })
}

fn out_of_scope(what: &str) -> ApiError {
    ApiError::forbidden(format!("{what} is outside this token's scope"))
}

/// Whether the repository is plain (its blobs and manifests can be verified); 500 when its
/// config is missing or unreadable.
fn plain(repo: &Repo) -> ApiResult<bool> {
    match repo.encrypted()? {
        Some(encrypted) => Ok(!encrypted),
        None => Err(ApiError::internal(
            "the repository's config is missing or unreadable: uploads cannot be verified",
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Reads

/// May `p` read `key` (GET, HEAD)? The token has a right (checked by the caller).
fn authorize_read(repo: &Repo, p: &Principal, key: &Key) -> ApiResult<()> {
    match key.kind {
        ObjectKind::Config
        | ObjectKind::Key
        | ObjectKind::Index
        | ObjectKind::Lock
        | ObjectKind::GcRecord => Ok(()),
        ObjectKind::Pack => {
            if p.whole_repository() || repo.uploaded(&p.id, &key.name) {
                return Ok(());
            }
            let mut lists = lock(&repo.pack_lists);
            lists.ensure_loaded(&repo.store)?;
            if lists.names_pack_for(&key.name, |vm| p.vm_in_scope(vm)) {
                return Ok(());
            }
            // A miss: pack lists may have been written since (by another process): once more.
            lists.refresh(&repo.store)?;
            if lists.names_pack_for(&key.name, |vm| p.vm_in_scope(vm)) {
                Ok(())
            } else {
                Err(ApiError::forbidden(format!(
                    "pack {} is named by no restore point of a VM in this token's scope",
                    key.name
                )))
            }
        }
        ObjectKind::Refs | ObjectKind::Snapshot | ObjectKind::Verification => {
            // The name first, whatever the token: a malformed one is a bad request for all.
            let snapshot = snapshot_of(key)?;
            if p.whole_repository() {
                return Ok(());
            }
            match refs_vm(repo, snapshot)? {
                RefsVm::Vm(vm) if p.vm_in_scope(&vm) => Ok(()),
                RefsVm::Missing if !exists(&repo.store, key)? => {
                    Err(ApiError::not_found(format!("object {key} not found")))
                }
                _ => Err(out_of_scope(&format!("restore point {}", key.name))),
            }
        }
    }
}

/// What a GET asks for beyond the object.
pub(crate) struct ReadRequest {
    pub head: bool,
    /// `Range: bytes=A-B` (B None: to the end).
    pub range: Option<(u64, Option<u64>)>,
    /// `?max=N`.
    pub max: Option<u64>,
}

pub(crate) fn read(repo: &Repo, p: &Principal, key: &Key, req: ReadRequest) -> ApiResult {
    authorize_read(repo, p, key)?;
    let store = &repo.store;
    let bound = key.kind.max_size();
    let size = store.size(key)?;
    if req.head {
        let mut r = status(StatusCode::OK);
        r.headers_mut().insert(SIZE_HEADER, HeaderValue::from(size));
        return Ok(r);
    }
    if let Some((start, end)) = req.range {
        if start >= size {
            return Err(ApiError::short(format!(
                "range starts at {start}, object {key} has {size} bytes"
            )));
        }
        let end = end.unwrap_or(size - 1);
        if end < start {
            return Err(ApiError::bad_request(format!("empty range {start}-{end}")));
        }
        // Past the end first: `end` may be as large as u64::MAX, so the length below cannot
        // overflow only once it is known to lie inside the object.
        if end >= size {
            return Err(ApiError::short(format!(
                "range {start}-{end} is past the end of {key} ({size} bytes)"
            )));
        }
        let len = end - start + 1;
        if len > bound {
            return Err(ApiError::too_large(
                format!(
                    "a range of {len} bytes exceeds the {} bound",
                    key.kind.name()
                ),
                Some((len, bound)),
            ));
        }
        let data = store.get_range(key, start, len)?;
        let mut r = (StatusCode::PARTIAL_CONTENT, Body::from(data)).into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            r.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        return Ok(r);
    }
    let limit = req.max.map_or(bound, |m| m.min(bound));
    if size > limit {
        return Err(ApiError::too_large(
            format!("object {key} is {size} bytes, at most {limit} allowed"),
            Some((size, limit)),
        ));
    }
    let data = store.get(key, limit)?;
    Ok((StatusCode::OK, Body::from(data)).into_response())
}

// ---------------------------------------------------------------------------------------------
// Writes

/// The rights a PUT of `kind` needs (before its body is read): 403 when lacking.
pub(crate) fn may_put(p: &Principal, kind: ObjectKind) -> ApiResult<()> {
    let ok = match kind {
        ObjectKind::Config | ObjectKind::Key | ObjectKind::GcRecord => p.is_admin(),
        ObjectKind::Index
        | ObjectKind::Pack
        | ObjectKind::Refs
        | ObjectKind::Snapshot
        | ObjectKind::Verification
        | ObjectKind::Lock => p.can_append(),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "writing a {} needs the {} right",
            kind.name(),
            if p.can_append() { "admin" } else { "append" }
        )))
    }
}

/// Create (`inm`: only create) or replace.
/// Creates `key` unless it exists meanwhile (412 with If-None-Match, else 409): the last step
/// of a create-only put whose checks found it absent.
fn create_once(store: &dyn Store, key: &Key, bytes: &[u8], inm: bool) -> ApiResult {
    if store.put_if_absent(key, bytes)? {
        Ok(created(true))
    } else if inm {
        Err(ApiError::precondition(format!("{key} exists")))
    } else {
        Err(ApiError::conflict(format!("{key} was created meanwhile")))
    }
}

fn write(store: &dyn Store, key: &Key, bytes: &[u8], inm: bool) -> ApiResult {
    if inm {
        return if store.put_if_absent(key, bytes)? {
            Ok(created(true))
        } else {
            Err(ApiError::precondition(format!("{key} exists")))
        };
    }
    let existed = exists(store, key)?;
    store.put(key, bytes)?;
    Ok(created(!existed))
}

/// Content-addressed kinds (packs, index objects): an existing one is left as it is.
fn write_once(store: &dyn Store, key: &Key, bytes: &[u8], inm: bool) -> ApiResult {
    let exists_reply = || {
        if inm {
            Err(ApiError::precondition(format!("{key} exists")))
        } else {
            Ok(created(false))
        }
    };
    if exists(store, key)? {
        return exists_reply();
    }
    if store.put_if_absent(key, bytes)? {
        Ok(created(true))
    } else {
        exists_reply()
    }
}

pub(crate) fn put(repo: &Repo, p: &Principal, key: &Key, bytes: &[u8], inm: bool) -> ApiResult {
    may_put(p, key.kind)?;
    let store = &repo.store;
    match key.kind {
        ObjectKind::Config => {
            RepoConfig::parse(bytes).map_err(|e| ApiError::verification(format!("config: {e}")))?;
            if store.put_if_absent(key, bytes)? {
                Ok(created(true))
            } else if inm {
                Err(ApiError::precondition("the config exists"))
            } else {
                Err(ApiError::conflict(
                    "the config exists and is never replaced",
                ))
            }
        }
        ObjectKind::Key | ObjectKind::GcRecord => write(store, key, bytes, inm),
        ObjectKind::Index => {
            verify::content_name(key.kind, &key.name, bytes).map_err(ApiError::verification)?;
            write_once(store, key, bytes, inm)
        }
        ObjectKind::Pack => {
            verify::content_name(key.kind, &key.name, bytes).map_err(ApiError::verification)?;
            let r = if exists(store, key)? {
                write_once(store, key, bytes, inm)
            } else {
                if plain(repo)? {
                    verify::plain_pack(bytes).map_err(ApiError::verification)?;
                }
                write_once(store, key, bytes, inm)
            };
            // Its bytes hash to its name: this token holds the pack, it may read it back.
            if r.is_ok() {
                repo.mark_uploaded(&p.id, &key.name);
            }
            r
        }
        ObjectKind::Refs => put_refs(repo, p, key, bytes, inm),
        ObjectKind::Snapshot => put_snapshot(repo, p, key, bytes, inm),
        ObjectKind::Lock => put_lock(repo, p, key, bytes, inm),
        ObjectKind::Verification => put_verification(repo, p, key, bytes, inm),
    }
}

/// The restore point a key belongs to: its name, or for a verification record the part
/// before the dash (`<snapshot id>-<record id>`, FORMAT.md §9.1).
fn snapshot_of(key: &Key) -> ApiResult<&str> {
    if key.kind != ObjectKind::Verification {
        return Ok(&key.name);
    }
    match key.name.split_once('-') {
        Some((snapshot, record)) if is_hex(snapshot, 32) && is_hex(record, 32) => Ok(snapshot),
        _ => Err(ApiError::bad_request(format!(
            "{key}: a verification record is named <snapshot id>-<record id> (32 hex digits each)"
        ))),
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A verification record: created once (never replaced, but by `admin`), for a restore point
/// that exists and is in the token's scope. Its content is not checked: it may be encrypted,
/// and it references no data (a wrong one can only mislead `snapshots`, which is why only a
/// token that may write that VM's restore points may write it).
fn put_verification(repo: &Repo, p: &Principal, key: &Key, bytes: &[u8], inm: bool) -> ApiResult {
    let store = &repo.store;
    let snapshot = snapshot_of(key)?;
    let _writes = lock(&repo.writes);
    if !exists(store, &Key::new(ObjectKind::Snapshot, snapshot)?)? {
        return Err(ApiError::conflict(format!(
            "restore point {snapshot} does not exist: no verification record for it"
        )));
    }
    if !refs_vm(repo, snapshot)?.in_scope(p) {
        return Err(out_of_scope(&format!("restore point {snapshot}")));
    }
    if exists(store, key)? {
        if inm {
            return Err(ApiError::precondition(format!("{key} exists")));
        }
        if !p.is_admin() {
            return Err(ApiError::conflict(format!(
                "{key} exists and this token may not replace it"
            )));
        }
        store.put(key, bytes)?;
        return Ok(created(false));
    }
    create_once(store, key, bytes, inm)
}

fn put_refs(repo: &Repo, p: &Principal, key: &Key, bytes: &[u8], inm: bool) -> ApiResult {
    let store = &repo.store;
    let list = PackList::from_json(bytes)
        .map_err(|e| ApiError::verification(format!("pack list: {e}")))?;
    if list.snapshot.to_hex() != key.name {
        return Err(ApiError::verification(format!(
            "pack list {} names restore point {}",
            key.name, list.snapshot
        )));
    }
    if !p.vm_in_scope(&list.vm) {
        return Err(out_of_scope(&format!("VM {:?}", list.vm)));
    }
    let _writes = lock(&repo.writes);
    let existing = refs_vm(repo, &key.name)?;
    if !matches!(existing, RefsVm::Missing) {
        if !existing.in_scope(p) {
            return Err(out_of_scope(&format!("restore point {}", key.name)));
        }
        if inm {
            return Err(ApiError::precondition(format!("{key} exists")));
        }
    }
    let manifest = Key::new(ObjectKind::Snapshot, key.name.clone())?;
    if !p.is_admin() && exists(store, &manifest)? {
        return Err(ApiError::conflict(format!(
            "restore point {} exists: its pack list is not replaced",
            key.name
        )));
    }
    // Packs that no longer exist are allowed: a backup copies its parent's whole list, and a
    // removed pack in it is how prune finds the lists to rewrite (PROTOCOL.md §5).
    let created_now = if matches!(existing, RefsVm::Missing) {
        if !store.put_if_absent(key, bytes)? {
            return Err(ApiError::conflict(format!("{key} was created meanwhile")));
        }
        true
    } else {
        store.put(key, bytes)?;
        false
    };
    // The epoch as its time: the next refresh reads it again, which costs little.
    let meta = ObjectMeta {
        key: key.clone(),
        size: bytes.len() as u64,
        modified: SystemTime::UNIX_EPOCH,
        version: None,
    };
    let mut lists = lock(&repo.pack_lists);
    if lists.ensure_loaded(store).is_ok() {
        lists.set(&meta, Some(&list));
    }
    Ok(created(created_now))
}

fn put_snapshot(repo: &Repo, p: &Principal, key: &Key, bytes: &[u8], inm: bool) -> ApiResult {
    let store = &repo.store;
    let _writes = lock(&repo.writes);
    let refs = refs_vm(repo, &key.name)?;
    let vm = match &refs {
        RefsVm::Vm(vm) => Some(vm.as_str()),
        _ if p.is_admin() => None,
        _ => {
            return Err(ApiError::forbidden(format!(
                "restore point {} needs its pack list (refs/{}) with a VM in scope first",
                key.name, key.name
            )))
        }
    };
    if !refs.in_scope(p) {
        return Err(out_of_scope(&format!("restore point {}", key.name)));
    }
    let existed = exists(store, key)?;
    if existed && inm {
        return Err(ApiError::precondition(format!("{key} exists")));
    }
    if existed && !p.is_admin() {
        return Err(ApiError::conflict(format!(
            "restore point {} exists and this token may not replace it",
            key.name
        )));
    }
    if plain(repo)? {
        verify::plain_manifest(bytes, &key.name, vm).map_err(ApiError::verification)?;
    }
    if existed {
        store.put(key, bytes)?;
        return Ok(created(false));
    }
    create_once(store, key, bytes, inm)
}

fn put_lock(repo: &Repo, p: &Principal, key: &Key, bytes: &[u8], inm: bool) -> ApiResult {
    let store = &repo.store;
    let _writes = lock(&repo.writes);
    if exists(store, key)? {
        if inm {
            return Err(ApiError::precondition(format!("{key} exists")));
        }
        if !p.is_admin() && repo.owner(&key.name)?.as_deref() != Some(p.id.as_str()) {
            return Err(ApiError::conflict(format!(
                "lease {} was not created by this token",
                key.name
            )));
        }
        store.put(key, bytes)?;
        return Ok(created(false));
    }
    if p.is_admin() {
        repo.remove_owner(&key.name)?;
    } else {
        repo.set_owner(&key.name, &p.id)?;
    }
    match store.put_if_absent(key, bytes) {
        Ok(true) => Ok(created(true)),
        Ok(false) => Err(if inm {
            ApiError::precondition(format!("{key} exists"))
        } else {
            ApiError::conflict(format!("{key} was created meanwhile"))
        }),
        Err(e) => {
            let _ = repo.remove_owner(&key.name);
            Err(e.into())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deletes

/// The rights a DELETE of `kind` needs: 403 when lacking.
pub(crate) fn may_delete(p: &Principal, kind: ObjectKind) -> ApiResult<()> {
    match kind {
        ObjectKind::Config => Err(ApiError::forbidden("the config is never deleted")),
        ObjectKind::Lock if p.can_append() => Ok(()),
        ObjectKind::Lock => Err(ApiError::forbidden(
            "removing a lease needs the append right",
        )),
        _ if p.is_admin() => Ok(()),
        k => Err(ApiError::forbidden(format!(
            "deleting a {} needs the admin right",
            k.name()
        ))),
    }
}

pub(crate) fn delete(repo: &Repo, p: &Principal, key: &Key) -> ApiResult {
    may_delete(p, key.kind)?;
    let store = &repo.store;
    let done = || Ok(status(StatusCode::NO_CONTENT));
    match key.kind {
        ObjectKind::Refs | ObjectKind::Snapshot => {
            let _writes = lock(&repo.writes);
            let refs = refs_vm(repo, &key.name)?;
            let in_scope = match refs {
                // Nothing names a VM: only what is there needs the whole-repository scope.
                RefsVm::Missing => {
                    p.whole_repository()
                        || !exists(store, &Key::new(ObjectKind::Snapshot, key.name.clone())?)?
                }
                _ => refs.in_scope(p),
            };
            if !in_scope {
                return Err(out_of_scope(&format!("restore point {}", key.name)));
            }
            store.delete(key)?;
            let refs_key = Key::new(ObjectKind::Refs, key.name.clone())?;
            if key.kind == ObjectKind::Snapshot {
                store.delete(&refs_key)?;
            }
            lock(&repo.pack_lists).remove(&key.name);
            done()
        }
        ObjectKind::Verification => {
            // A record whose restore point is gone (and its pack list with it) names no VM:
            // only a whole-repository token removes it.
            if !refs_vm(repo, snapshot_of(key)?)?.in_scope(p) {
                return Err(out_of_scope(&format!("verification record {}", key.name)));
            }
            store.delete(key)?;
            done()
        }
        ObjectKind::Lock => {
            let _writes = lock(&repo.writes);
            let mine = repo.owner(&key.name)?.as_deref() == Some(p.id.as_str());
            if !p.is_admin() && !mine && exists(store, key)? {
                return Err(ApiError::forbidden(format!(
                    "lease {} was not created by this token",
                    key.name
                )));
            }
            store.delete(key)?;
            if p.is_admin() || mine {
                repo.remove_owner(&key.name)?;
            }
            done()
        }
        _ => {
            store.delete(key)?;
            done()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lists

/// The objects of `kind` this token may see: pack lists and manifests only of VMs in scope.
pub(crate) fn list(repo: &Repo, p: &Principal, kind: ObjectKind) -> ApiResult<Vec<ObjectMeta>> {
    let mut all = repo.store.list(kind)?;
    if matches!(
        kind,
        ObjectKind::Refs | ObjectKind::Snapshot | ObjectKind::Verification
    ) && !p.whole_repository()
    {
        let mut lists = lock(&repo.pack_lists);
        lists.refresh(&repo.store)?;
        all.retain(|m| {
            let snapshot = snapshot_of(&m.key).unwrap_or("");
            matches!(lists.vm_of(snapshot), Some(Some(vm)) if p.vm_in_scope(vm))
        });
    }
    Ok(all)
}
