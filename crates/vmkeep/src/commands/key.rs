use anyhow::{bail, Result};
use zeroize::Zeroizing;

use crate::args::{Global, KeyCommand};
use crate::context::{open_repo, prompt};
use crate::output::print_line;

pub fn run(g: &Global, k: &KeyCommand) -> Result<u8> {
    let repo = open_repo(g)?;
    match k {
        KeyCommand::Passwd { new_password_file } => {
            let new = if let Some(f) = new_password_file {
                let mut s = Zeroizing::new(std::fs::read(f)?);
                while s.last().is_some_and(|b| *b == b'\n') {
                    s.pop();
                }
                Some(s)
            } else if let Ok(p) = std::env::var("VMKEEP_NEW_PASSWORD") {
                Some(Zeroizing::new(p.into_bytes()))
            } else {
                prompt("new passphrase", true)?
            };
            let Some(new) = new.filter(|p| !p.is_empty()) else {
                bail!("no new passphrase: use --new-password-file FILE or VMKEEP_NEW_PASSWORD");
            };
            repo.change_passphrase(&new, super::init::kdf_params())?;
            if g.json {
                crate::output::print_json(&serde_json::json!({"changed": true}))?;
            } else {
                print_line("passphrase changed")?;
            }
        }
        KeyCommand::Export => {
            let Some(text) = repo.export_key() else {
                bail!("the repository is not encrypted; it has no key to export");
            };
            if g.json {
                crate::output::print_json(&serde_json::json!({"key": text}))?;
            } else {
                print_line(&text)?;
            }
        }
    }
    Ok(0)
}
