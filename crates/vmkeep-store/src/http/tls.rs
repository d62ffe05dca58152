//! The client's TLS configuration (docs/PROTOCOL.md §1): either the server certificate's
//! SHA-256 is pinned (names and chains are not checked, the handshake signature is), or the
//! system's CA certificates and the host name are checked as any HTTPS client does.
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

use crate::error::{Error, Result};

/// A certificate fingerprint: SHA-256 of the leaf certificate's DER bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint(pub(crate) [u8; 32]);

impl Fingerprint {
    /// 64 hex digits; colons, surrounding white space and case are ignored.
    pub(crate) fn parse(text: &str) -> Result<Fingerprint> {
        let digits: String = text.trim().chars().filter(|&c| c != ':').collect();
        let bad = |reason: String| Error::InvalidFingerprint { reason };
        if let Some(c) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(bad(format!("{c:?} is not a hex digit")));
        }
        if digits.len() != 64 {
            return Err(bad(format!("{} hex digits", digits.len())));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out).expect("64 hex digits checked");
        Ok(Fingerprint(out))
    }

    pub(crate) fn of(der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        Fingerprint(d.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// What the pinning verifier reports through rustls when the certificate is another one.
#[derive(Debug)]
pub(crate) struct FingerprintMismatch {
    pub(crate) actual: Fingerprint,
    pub(crate) expected: Fingerprint,
}

impl fmt::Display for FingerprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server's certificate fingerprint is {}, expected {}",
            self.actual, self.expected
        )
    }
}

impl StdError for FingerprintMismatch {}

/// Accepts exactly the certificate with the pinned fingerprint, and checks that the handshake
/// is signed with its key.
#[derive(Debug)]
struct PinnedVerifier {
    expected: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let actual = Fingerprint::of(end_entity.as_ref());
        // Comparing a public value: no need for constant time.
        if actual == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(FingerprintMismatch {
                actual,
                expected: self.expected,
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client configuration: pinned when `pin` is given, else the system's CA certificates.
pub(crate) fn client_config(pin: Option<Fingerprint>) -> Result<Arc<rustls::ClientConfig>> {
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Tls {
            location: "(configuration)".into(),
            cause: e.to_string(),
        })?;
    let config = match pin {
        Some(expected) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                expected,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        None => builder
            .with_root_certificates(system_roots()?)
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The system's CA certificates (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`).
fn system_roots() -> Result<rustls::RootCertStore> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        let cause = match loaded.errors.first() {
            Some(e) => format!(" ({e})"),
            None => String::new(),
        };
        return Err(Error::NoTrustRoots { cause });
    }
    Ok(roots)
}

/// The rustls error somewhere in a transport error's causes (an `io::Error` hides its inner
/// error from `source()`, so it is unwrapped by hand).
pub(crate) fn find_rustls_error<'a>(
    mut err: Option<&'a (dyn StdError + 'static)>,
) -> Option<&'a rustls::Error> {
    while let Some(e) = err {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            err = Some(inner);
            continue;
        }
        err = e.source();
    }
    None
}

/// The pinning verifier's report inside a rustls error.
pub(crate) fn as_mismatch(e: &rustls::Error) -> Option<&FingerprintMismatch> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<FingerprintMismatch>()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn fingerprints_parse_ignoring_colons_and_case() {
        let a = Fingerprint::parse(HEX).unwrap();
        assert_eq!(a.to_string(), HEX);
        let colons: Vec<String> = HEX
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap().to_uppercase())
            .collect();
        assert_eq!(
            Fingerprint::parse(&format!(" {}\n", colons.join(":"))).unwrap(),
            a
        );
        for (text, why) in [
            ("", "0 hex digits"),
            (&HEX[..62], "62 hex digits"),
            (&format!("{HEX}00"), "66 hex digits"),
            (&format!("{}g", &HEX[..63]), "'g' is not a hex digit"),
        ] {
            match Fingerprint::parse(text) {
                Err(e @ Error::InvalidFingerprint { .. }) => {
                    assert!(e.to_string().contains(why), "{e}");
                    assert!(e.to_string().contains("64 hex digits"), "{e}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn fingerprint_of_is_sha256() {
        // SHA-256 of the empty string.
        assert_eq!(
            Fingerprint::of(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_mismatch_is_found_through_io_errors() {
        let m = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            FingerprintMismatch {
                actual: Fingerprint([1; 32]),
                expected: Fingerprint([2; 32]),
            },
        ))));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let found = find_rustls_error(Some(&io)).and_then(as_mismatch).unwrap();
        assert_eq!(found.actual, Fingerprint([1; 32]));
        assert!(find_rustls_error(Some(&std::io::Error::other("x"))).is_none());
    }
}
