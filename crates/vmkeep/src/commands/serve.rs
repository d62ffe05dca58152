//! `vmkeep serve` and `vmkeep token add`: the HTTPS repository server (docs/PROTOCOL.md).
use std::io::Write;

use anyhow::{Context, Result};
use serde_json::json;
use vmkeep_server::{tokens, Right, ServeOptions};

use crate::args::{Global, ServeArgs, TokenAddArgs, TokenCommand};
use crate::output::{print_json, print_line};

pub fn serve(g: &Global, a: &ServeArgs) -> Result<u8> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("creating the folder {}", a.dir.display()))?;
    let opts = ServeOptions {
        listen: a.listen,
        dir: a.dir.clone(),
        tokens: a.tokens.clone(),
        tls_cert: a.tls_cert.clone(),
        tls_key: a.tls_key.clone(),
    };
    let json = g.json;
    let dir = a.dir.display().to_string();
    vmkeep_server::serve(opts, |ready| {
        // One line, flushed: the process runs on, and scripts read the line to learn the port.
        let line = if json {
            json!({"listen": ready.addr.to_string(), "fingerprint": ready.fingerprint, "dir": dir})
                .to_string()
        } else {
            format!(
                "serving {dir} on https://{} (certificate fingerprint {}); clients: --repo https://HOST:{}/NAME --tls-fingerprint {}",
                ready.addr, ready.fingerprint, ready.addr.port(), ready.fingerprint
            )
        };
        let r = print_line(&line).and_then(|_| Ok(std::io::stdout().flush()?));
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not print the start line");
        }
    })
    .context("serving")?;
    Ok(0)
}

pub fn token(g: &Global, c: &TokenCommand) -> Result<u8> {
    match c {
        TokenCommand::Add(a) => token_add(g, a),
    }
}

fn token_add(g: &Global, a: &TokenAddArgs) -> Result<u8> {
    let rights = a
        .rights
        .iter()
        .map(|r| r.parse::<Right>())
        .collect::<Result<Vec<_>, _>>()?;
    let minted = tokens::add(&a.tokens, &a.vms, &rights, a.comment.as_deref())?;
    let rights: Vec<String> = minted.rights.iter().map(|r| r.to_string()).collect();
    if g.json {
        print_json(
            &json!({"token": minted.token, "id": minted.id, "vms": minted.vms, "rights": rights}),
        )?;
    } else {
        print_line(&minted.token)?;
        eprintln!(
            "token {} for VMs {} with rights {}: shown once, kept hashed in {}",
            minted.id,
            minted.vms.join(","),
            rights.join(","),
            a.tokens.display()
        );
    }
    Ok(0)
}
