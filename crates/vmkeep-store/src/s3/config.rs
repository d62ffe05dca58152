//! Where an `s3://BUCKET[/PREFIX]` repository is and how to reach it, resolved the way the AWS
//! command-line tools resolve it: environment variables first (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
//! `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`), then the profile (`AWS_PROFILE`, else `default`)
//! in the shared credentials and config files (`AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`,
//! else `~/.aws/credentials` and `~/.aws/config`). Secrets never reach `Debug` or a message.
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `s3://BUCKET[/PREFIX]`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Without leading or trailing slashes; empty for the bucket's root.
    pub prefix: String,
}

impl S3Url {
    pub fn parse(url: &str) -> Result<S3Url> {
        let bad = |reason: &str| Error::InvalidUrl {
            url: url.into(),
            reason: reason.into(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("an object-storage repository is s3://BUCKET[/PREFIX]"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's bucket naming rules (3-63 of [a-z0-9.-]), which every compatible store accepts.
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(bad(
                "the bucket name must be 3-63 characters of lowercase letters, digits, '.' and '-'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        let prefix_ok = prefix.split('/').all(|part| {
            prefix.is_empty()
                || (!part.is_empty()
                    && part != "."
                    && part != ".."
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        });
        if !prefix_ok {
            return Err(bad(
                "the prefix must be folders of letters, digits, '-', '_' and '.' separated by '/'",
            ));
        }
        Ok(S3Url {
            bucket: bucket.into(),
            prefix: prefix.into(),
        })
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// A secret string: kept out of `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Static credentials. None of them set means: let the client find some (instance metadata,
/// container credentials, web identity), as the AWS tools do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    /// Where they came from, for messages ("environment", "profile default in ~/.aws/credentials").
    pub source: String,
}

/// How to reach the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Config {
    pub region: String,
    /// A non-AWS store (Garage, MinIO, Ceph RGW, ...): its URL.
    pub endpoint: Option<String>,
    /// `bucket.host/key` rather than `host/bucket/key`. Path style is the default with an
    /// endpoint (what self-hosted stores need), virtual-hosted without (AWS); the profile's
    /// `s3 = addressing_style = path|virtual` overrides.
    pub virtual_hosted: bool,
    pub credentials: Option<Credentials>,
    /// The profile read, when a file supplied anything.
    pub profile: String,
}

/// Reads the environment and the shared files.
pub fn resolve() -> Result<S3Config> {
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .collect();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    resolve_from(&env, home.as_deref())
}

/// [`resolve`] with the environment and home folder given (tests).
pub fn resolve_from(env: &HashMap<String, String>, home: Option<&Path>) -> Result<S3Config> {
    let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
    let explicit_profile = get("AWS_PROFILE");
    let profile = explicit_profile.clone().unwrap_or_else(|| "default".into());
    let file = |var: &str, default: &str| {
        get(var)
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(".aws").join(default)))
    };
    let cred_path = file("AWS_SHARED_CREDENTIALS_FILE", "credentials");
    let conf_path = file("AWS_CONFIG_FILE", "config");
    let creds_file = read_ini(cred_path.as_deref())?;
    let conf_file = read_ini(conf_path.as_deref())?;
    let from_creds = creds_file.get(&profile);
    let conf_section = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    let from_conf = conf_file.get(&conf_section);
    if explicit_profile.is_some() && from_creds.is_none() && from_conf.is_none() {
        return Err(Error::S3Config {
            reason: format!(
                "AWS_PROFILE={profile} is in neither {} nor {}",
                shown(cred_path.as_deref()),
                shown(conf_path.as_deref())
            ),
        });
    }
    let in_profile = |k: &str| {
        from_creds
            .and_then(|s| s.get(k))
            .or_else(|| from_conf.and_then(|s| s.get(k)))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let credentials = match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => Some(Credentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: get("AWS_SESSION_TOKEN").map(Secret::new),
            source: "the environment".into(),
        }),
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::S3Config {
                reason: "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together".into(),
            })
        }
        (None, None) => match (
            in_profile("aws_access_key_id"),
            in_profile("aws_secret_access_key"),
        ) {
            (Some(id), Some(secret)) => Some(Credentials {
                access_key_id: id,
                secret_access_key: Secret::new(secret),
                session_token: in_profile("aws_session_token").map(Secret::new),
                source: format!("profile {profile}"),
            }),
            _ => None,
        },
    };
    let region = get("AWS_REGION")
        .or_else(|| get("AWS_DEFAULT_REGION"))
        .or_else(|| in_profile("region"))
        .unwrap_or_else(|| "us-east-1".into());
    let endpoint = get("AWS_ENDPOINT_URL_S3")
        .or_else(|| get("AWS_ENDPOINT_URL"))
        .or_else(|| in_profile("s3.endpoint_url"))
        .or_else(|| in_profile("endpoint_url"));
    if let Some(e) = &endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(Error::S3Config {
                reason: format!("the endpoint {e:?} must start with http:// or https://"),
            });
        }
    }
    let virtual_hosted = match in_profile("s3.addressing_style").as_deref() {
        Some("path") => false,
        Some("virtual") => true,
        _ => endpoint.is_none(),
    };
    Ok(S3Config {
        region,
        endpoint,
        virtual_hosted,
        credentials,
        profile,
    })
}

fn shown(p: Option<&Path>) -> String {
    p.map_or("(no home folder)".into(), |p| p.display().to_string())
}

type Ini = HashMap<String, HashMap<String, String>>;

/// The AWS INI dialect: `[section]`, `key = value`, `#`/`;` comments, and one level of nested
/// keys (`s3 =` followed by indented `key = value` lines), read as `s3.key`. A missing file is
/// empty.
fn read_ini(path: Option<&Path>) -> Result<Ini> {
    let Some(path) = path else {
        return Ok(Ini::new());
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ini::new()),
        Err(e) => return Err(Error::io("reading", path, e)),
    };
    Ok(parse_ini(&text))
}

fn parse_ini(text: &str) -> Ini {
    let mut out = Ini::new();
    let mut section: Option<String> = None;
    let mut nested: Option<String> = None;
    for line in text.lines() {
        let indented = line.starts_with([' ', '\t']);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.split_whitespace().collect::<Vec<_>>().join(" "));
            nested = None;
            continue;
        }
        let (Some(sec), Some((k, v))) = (&section, line.split_once('=')) else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
        let entries = out.entry(sec.clone()).or_default();
        match (&nested, indented) {
            (Some(parent), true) => {
                entries.insert(format!("{parent}.{k}"), v);
            }
            _ if v.is_empty() => nested = Some(k),
            _ => {
                nested = None;
                entries.insert(k, v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn urls() {
        let u = S3Url::parse("s3://backups/site-a/vmkeep/").unwrap();
        assert_eq!(u.bucket, "backups");
        assert_eq!(u.prefix, "site-a/vmkeep");
        assert_eq!(u.to_string(), "s3://backups/site-a/vmkeep");
        assert_eq!(S3Url::parse("s3://abc").unwrap().prefix, "");
        for bad in [
            "s3://",
            "s3://ab",
            "s3://Upper",
            "s3://b_u",
            "s3://bucket/a/../b",
            "s3://bucket/a//b",
            "https://bucket",
            "s3://bucket/a b",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn environment_wins_over_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "[default]\nregion = eu-west-3\n",
        )
        .unwrap();
        let c = resolve_from(&env(&[]), Some(dir.path())).unwrap();
        let creds = c.credentials.clone().unwrap();
        assert_eq!(creds.access_key_id, "FILEKEY");
        assert_eq!(creds.secret_access_key.expose(), "filesecret");
        assert_eq!(c.region, "eu-west-3");
        assert!(c.virtual_hosted);
        let c = resolve_from(
            &env(&[
                ("AWS_ACCESS_KEY_ID", "ENVKEY"),
                ("AWS_SECRET_ACCESS_KEY", "envsecret"),
                ("AWS_REGION", "garage"),
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:3900"),
            ]),
            Some(dir.path()),
        )
        .unwrap();
        assert_eq!(c.credentials.as_ref().unwrap().access_key_id, "ENVKEY");
        assert_eq!(c.region, "garage");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert!(!c.virtual_hosted, "an endpoint means path style");
        // Secrets never show in Debug.
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("envsecret") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn named_profile_with_nested_s3_settings() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::write(
            &conf,
            "# comment\n[profile garage]\nregion = garage\naws_access_key_id = GK1\n\
             aws_secret_access_key = s1\ns3 =\n  endpoint_url = http://10.0.0.1:3900\n  \
             addressing_style = virtual\noutput = json\n",
        )
        .unwrap();
        let c = resolve_from(
            &env(&[
                ("AWS_PROFILE", "garage"),
                ("AWS_CONFIG_FILE", conf.to_str().unwrap()),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(c.region, "garage");
        assert_eq!(c.endpoint.as_deref(), Some("http://10.0.0.1:3900"));
        assert!(c.virtual_hosted);
        assert_eq!(c.credentials.unwrap().access_key_id, "GK1");
        let e = resolve_from(
            &env(&[
                ("AWS_PROFILE", "nope"),
                ("AWS_CONFIG_FILE", conf.to_str().unwrap()),
            ]),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("AWS_PROFILE=nope"), "{e}");
    }

    #[test]
    fn half_a_key_pair_and_bad_endpoints_are_refused() {
        assert!(resolve_from(&env(&[("AWS_ACCESS_KEY_ID", "x")]), None).is_err());
        assert!(resolve_from(&env(&[("AWS_ENDPOINT_URL", "127.0.0.1:3900")]), None).is_err());
        let c = resolve_from(&env(&[]), None).unwrap();
        assert!(c.credentials.is_none());
        assert_eq!(c.region, "us-east-1");
    }
}
