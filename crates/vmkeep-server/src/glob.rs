//! VM name globs of a token's scope (PROTOCOL.md §2): `*` any run of characters (also none),
//! `?` exactly one character, every other character itself. Names and globs are ASCII.

/// Whether `name` matches `glob`. Linear backtracking over the last `*`: no exponential cases.
pub fn matches(glob: &str, name: &str) -> bool {
    let (g, n) = (glob.as_bytes(), name.as_bytes());
    let (mut gi, mut ni) = (0, 0);
    // The position after the last `*` seen, and the name position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match g.get(gi) {
            Some(b'*') => {
                star = Some((gi + 1, ni));
                gi += 1;
            }
            Some(&c) if c == b'?' || c == n[ni] => {
                gi += 1;
                ni += 1;
            }
            _ => match star {
                Some((after, tried)) => {
                    gi = after;
                    ni = tried + 1;
                    star = Some((after, tried + 1));
                }
                None => return false,
            },
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

/// A glob of `token add --vms`: 1-64 of the VM name characters ([A-Za-z0-9._-]) and `*`, `?`.
pub fn validate(glob: &str) -> Result<(), String> {
    if glob.is_empty() || glob.len() > 64 {
        return Err(format!("{glob:?} must be 1-64 characters long"));
    }
    match glob
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*' | '?')))
    {
        Some(c) => Err(format!(
            "{glob:?} contains {c:?}: only VM name characters, '*' and '?' are allowed"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        for (glob, name, want) in [
            ("*", "web1", true),
            ("*", "", true),
            ("web*", "web", true),
            ("web*", "web1", true),
            ("web*", "db1", false),
            ("web?", "web1", true),
            ("web?", "web", false),
            ("web?", "web12", false),
            ("*1", "web1", true),
            ("*1", "web2", false),
            ("w*b*1", "wxxbyy1", true),
            ("w*b*1", "wxxbyy2", false),
            ("a*a*a", "aaa", true),
            ("a*a*a", "aa", false),
            ("??", "ab", true),
            ("??", "a", false),
            ("web1", "web1", true),
            ("web1", "web10", false),
            ("web1", "Web1", false),
            ("**", "x", true),
            ("*x*", "abc", false),
            ("", "", true),
            ("", "a", false),
        ] {
            assert_eq!(matches(glob, name), want, "{glob:?} vs {name:?}");
        }
    }

    #[test]
    fn long_inputs_stay_linear() {
        let name = "a".repeat(64);
        assert!(!matches("*a*a*a*a*a*a*a*a*b", &name));
    }

    #[test]
    fn validation() {
        assert!(validate("web*").is_ok());
        assert!(validate("db-?.x_1").is_ok());
        for bad in ["", "a/b", "web[1]", "é", &"a".repeat(65)] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }
}
