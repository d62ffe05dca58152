//! Repository URLs, `https://HOST[:PORT]/NAME` (docs/PROTOCOL.md §3), and the request paths
//! under them.
use crate::error::{Error, Result};
use crate::key::Key;
use crate::ObjectKind;

/// A parsed, normalised repository URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RepoUrl {
    /// `https://host[:port]`, the host lowercased.
    origin: String,
    /// The repository name.
    name: String,
}

impl RepoUrl {
    pub(crate) fn parse(url: &str) -> Result<RepoUrl> {
        let bad = |reason: &str| Error::InvalidUrl {
            // A URL with user information may carry a password: never echo it.
            url: if url.contains('@') {
                "(not shown)".into()
            } else {
                url.to_string()
            },
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected https://HOST[:PORT]/NAME"))?;
        match scheme.to_ascii_lowercase().as_str() {
            "https" => {}
            "http" => {
                return Err(bad(
                    "plain http is not supported: use https:// (`vmkeep serve` speaks HTTPS only)",
                ))
            }
            _ => return Err(bad("only https:// repository URLs are supported")),
        }
        if rest.contains(['?', '#']) {
            return Err(bad("a query or fragment is not allowed"));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return Err(bad(
                "user names or passwords in the URL are not supported: pass the token with --token-file or VMKEEP_TOKEN",
            ));
        }
        let host_port = parse_authority(authority).map_err(|r| bad(&r))?;
        let name = path.strip_suffix('/').unwrap_or(path);
        if name.is_empty() {
            return Err(bad(
                "the repository name is missing: https://HOST[:PORT]/NAME",
            ));
        }
        if name.contains('/') {
            return Err(bad(
                "expected one path segment, the repository name: https://HOST[:PORT]/NAME",
            ));
        }
        if !valid_repo_name(name) {
            return Err(bad(
                "a repository name is 1-64 of A-Z a-z 0-9 . _ -, not starting with . or -",
            ));
        }
        Ok(RepoUrl {
            origin: format!("https://{host_port}"),
            name: name.to_string(),
        })
    }

    /// The URL as the user names the repository.
    pub(crate) fn location(&self) -> String {
        format!("{}/{}", self.origin, self.name)
    }

    /// `https://host/v1/NAME/<route>`.
    pub(crate) fn route(&self, route: &str) -> String {
        format!("{}/v1/{}/{route}", self.origin, self.name)
    }

    /// `…/o/<kind>/` (a listing).
    pub(crate) fn kind(&self, kind: ObjectKind) -> String {
        self.route(&format!("o/{}/", kind_segment(kind)))
    }

    /// `…/o/<kind>/<name>`.
    pub(crate) fn object(&self, key: &Key) -> String {
        self.route(&format!("o/{}/{}", kind_segment(key.kind), key.name))
    }
}

/// The `{kind}` path segment: the kind's folder, `config` for the config.
pub(crate) fn kind_segment(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Config => "config",
        k => k.folder(),
    }
}

/// A repository name: 1-64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub(crate) fn valid_repo_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `host[:port]` or `[v6]:port`, validated and with the host lowercased.
fn parse_authority(authority: &str) -> std::result::Result<String, String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address in brackets is not closed")?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{v6:?} is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after the IPv6 address")?),
        };
        (format!("[{v6}]"), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !ok {
            return Err(if host.is_empty() {
                "the host is missing".to_string()
            } else {
                format!("{host:?} is not a host name or address")
            });
        }
        (host.to_string(), port)
    };
    let host = host.to_ascii_lowercase();
    match port {
        None => Ok(host),
        Some(p) => {
            let valid = !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok_and(|n| n > 0);
            if !valid {
                return Err(format!("{p:?} is not a port (1-65535)"));
            }
            Ok(format!("{host}:{}", p.parse::<u16>().expect("checked")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(url: &str) -> String {
        match RepoUrl::parse(url) {
            Err(Error::InvalidUrl { reason, .. }) => reason,
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
    }

    #[test]
    fn good_urls_are_normalised() {
        let u = RepoUrl::parse("https://Backup.Example:8443/vms").unwrap();
        assert_eq!(u.location(), "https://backup.example:8443/vms");
        assert_eq!(u.route("flush"), "https://backup.example:8443/v1/vms/flush");
        assert_eq!(
            RepoUrl::parse("HTTPS://host/Repo_1.a-b/")
                .unwrap()
                .location(),
            "https://host/Repo_1.a-b"
        );
        let v6 = RepoUrl::parse("https://[::1]:9000/r").unwrap();
        assert_eq!(v6.location(), "https://[::1]:9000/r");
        assert_eq!(
            RepoUrl::parse("https://10.0.0.1/r").unwrap().location(),
            "https://10.0.0.1/r"
        );
    }

    #[test]
    fn object_paths() {
        let u = RepoUrl::parse("https://h/r").unwrap();
        assert_eq!(u.object(&Key::config()), "https://h/v1/r/o/config/config");
        let k = Key::new(ObjectKind::Pack, "abcd").unwrap();
        assert_eq!(u.object(&k), "https://h/v1/r/o/packs/abcd");
        let g = Key::new(ObjectKind::GcRecord, "01").unwrap();
        assert_eq!(u.object(&g), "https://h/v1/r/o/gc/01");
        assert_eq!(u.kind(ObjectKind::Snapshot), "https://h/v1/r/o/snapshots/");
        assert_eq!(u.kind(ObjectKind::Config), "https://h/v1/r/o/config/");
    }

    #[test]
    fn bad_urls_are_refused_clearly() {
        assert!(reason("http://h/r").contains("plain http"));
        assert!(reason("ftp://h/r").contains("only https"));
        assert!(reason("h/r").contains("expected https://"));
        assert!(reason("https://h").contains("name is missing"));
        assert!(reason("https://h/").contains("name is missing"));
        assert!(reason("https://h/a/b").contains("one path segment"));
        assert!(reason("https://h/r?x=1").contains("query"));
        assert!(reason("https://h/r#x").contains("fragment"));
        assert!(reason("https://h/.r").contains("repository name"));
        assert!(reason("https://h/-r").contains("repository name"));
        assert!(reason("https://h/r%20").contains("repository name"));
        assert!(reason(&format!("https://h/{}", "a".repeat(65))).contains("repository name"));
        assert!(reason("https://h:0/r").contains("port"));
        assert!(reason("https://h:70000/r").contains("port"));
        assert!(reason("https://h:/r").contains("port"));
        assert!(reason("https:///r").contains("host is missing"));
        assert!(reason("https://[::1/r").contains("not closed"));
        assert!(reason("https://[zz]/r").contains("IPv6"));
        assert!(reason("https://h o/r").contains("not a host"));
        match RepoUrl::parse("https://user:secret@h/r") {
            Err(e @ Error::InvalidUrl { .. }) => {
                assert!(!e.to_string().contains("secret"), "{e}");
                assert!(e.to_string().contains("--token-file"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(valid_repo_name(&"a".repeat(64)));
    }
}
