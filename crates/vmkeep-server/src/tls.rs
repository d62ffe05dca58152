//! The server certificate (PROTOCOL.md §1): the one given (`--tls-cert`/`--tls-key`, PEM), or a
//! self-signed one generated at first start and kept in `DIR/.vmkeep-serve/tls/` so its
//! fingerprint (SHA-256 of the leaf certificate's DER bytes) survives restarts. rustls with the
//! ring provider; TLS 1.2 and 1.3; HTTP/1.1 only.
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// SHA-256 of a certificate's DER bytes, as 64 lowercase hex digits.
pub fn fingerprint_of_der(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// The fingerprint of the first (leaf) certificate of a PEM file's bytes.
pub fn fingerprint_of_pem(cert_pem: &[u8]) -> Result<String> {
    let certs = parse_certs(cert_pem, Path::new("<pem>"))?;
    Ok(fingerprint_of_der(&certs[0]))
}

fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?
        .ok_or_else(|| Error::Tls(format!("{}: no private key in it", path.display())))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::io("read", path, e))
}

/// The certificate chain and key to serve, and the leaf's fingerprint.
pub(crate) struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub fingerprint: String,
}

/// The given pair, or the persisted self-signed one under `state_dir/tls` (generated once).
pub(crate) fn identity(
    cert: Option<&Path>,
    key: Option<&Path>,
    state_dir: &Path,
) -> Result<Identity> {
    let (cert_path, key_path) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf()),
        (None, None) => self_signed(&state_dir.join("tls"))?,
        _ => return Err(Error::TlsHalfGiven),
    };
    let certs = parse_certs(&read(&cert_path)?, &cert_path)?;
    let key = parse_key(&read(&key_path)?, &key_path)?;
    let fingerprint = fingerprint_of_der(&certs[0]);
    Ok(Identity {
        certs,
        key,
        fingerprint,
    })
}

/// The host name, when it is a usable DNS name.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and we stop at the first NUL.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(&buf[..end]).ok()?.to_ascii_lowercase();
    let ok = !name.is_empty()
        && name != "localhost"
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then_some(name)
}

/// `dir/cert.pem` and `dir/key.pem`, generated (SANs localhost, the host name, 127.0.0.1)
/// when absent; the key is written with mode 0600.
fn self_signed(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let mut names = vec!["localhost".to_string()];
    names.extend(hostname());
    names.push("127.0.0.1".into());
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| Error::Tls(format!("cannot generate a certificate: {e}")))?;
    // Key first: a certificate without its key is never left behind as if complete.
    write_new(
        &key,
        generated.signing_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&cert, generated.cert.pem().as_bytes(), 0o644)?;
    tracing::info!("generated a self-signed certificate in {}", dir.display());
    Ok((cert, key))
}

/// Write via a temporary file, fsync, rename.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let r = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    r.map_err(|e| Error::io("write", path, e))
}

/// rustls server config: ring provider, TLS 1.3 and 1.2, ALPN http/1.1.
pub(crate) fn server_config(id: Identity) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(id.certs, id.key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn self_signed_is_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = identity(None, None, dir.path()).unwrap();
        let b = identity(None, None, dir.path()).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint.len(), 64);
        let pem = fs::read(dir.path().join("tls/cert.pem")).unwrap();
        assert_eq!(fingerprint_of_pem(&pem).unwrap(), a.fingerprint);
        let mode = fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(server_config(a).is_ok());
        let cert = dir.path().join("tls/cert.pem");
        assert!(matches!(
            identity(Some(&cert), None, dir.path()),
            Err(Error::TlsHalfGiven)
        ));
        assert!(fingerprint_of_pem(b"not pem").is_err());
    }
}
