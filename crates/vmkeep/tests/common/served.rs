//! A real `vmkeep serve` for the command-line tests: started on a free port of 127.0.0.1 with
//! its own folder and tokens file, killed when dropped. Clients are the real binary with
//! `--repo https://…/NAME`, a token in VMKEEP_TOKEN and the server's pinned fingerprint.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use serde_json::Value;

use crate::common::*;

pub struct Served {
    child: Child,
    pub addr: String,
    pub fingerprint: String,
    pub dir: PathBuf,
    pub tokens: PathBuf,
}

impl Served {
    /// `vmkeep serve --listen 127.0.0.1:0 --dir DIR --tokens DIR/../tokens.json`.
    pub fn start(dir: &Path) -> Served {
        let tokens = dir.with_extension("tokens.json");
        Served::start_with(dir, &tokens, &[])
    }

    /// Serving on `ip` port 0, in network namespace `netns` when given (`ip netns exec`).
    pub fn start_in(dir: &Path, netns: Option<&str>, ip: &str) -> Served {
        let tokens = dir.with_extension("tokens.json");
        Served::spawn(dir, &tokens, &[], netns, ip)
    }

    pub fn start_with(dir: &Path, tokens: &Path, env: &[(&str, &str)]) -> Served {
        Served::spawn(dir, tokens, env, None, "127.0.0.1")
    }

    fn spawn(
        dir: &Path,
        tokens: &Path,
        env: &[(&str, &str)],
        netns: Option<&str>,
        ip: &str,
    ) -> Served {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin());
                c
            }
            None => std::process::Command::new(bin()),
        };
        // An address with a port is used as it is (a restart); else port 0.
        let listen = match ip.parse::<std::net::SocketAddr>() {
            Ok(addr) => addr.to_string(),
            Err(_) => format!("{ip}:0"),
        };
        cmd.args(["--json", "serve", "--listen", &listen, "--dir"])
            .arg(dir)
            .arg("--tokens")
            .arg(tokens)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Its stderr goes to DIR.log, not the test's: a server left behind must not hold the
        // harness's pipe open.
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        cmd.stderr(log).env("VMKEEP_LOG", "debug");
        let mut child = cmd.spawn().expect("starting vmkeep serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                let _ = child.kill();
                panic!("serve's start line {line:?}: {e}");
            }
        };
        Served {
            child,
            addr: v["listen"].as_str().unwrap().to_string(),
            fingerprint: v["fingerprint"].as_str().unwrap().to_string(),
            dir: dir.to_path_buf(),
            tokens: tokens.to_path_buf(),
        }
    }

    pub fn url(&self, name: &str) -> String {
        format!("https://{}/{name}", self.addr)
    }

    /// `vmkeep token add`: the new token.
    pub fn token(&self, vms: &str, rights: &str) -> String {
        let v = json(
            vmkeep_bare()
                .args(["token", "add", "--tokens"])
                .arg(&self.tokens)
                .args(["--vms", vms, "--rights", rights]),
        );
        v["token"].as_str().unwrap().to_string()
    }

    /// The real binary against `url` with `token` (and a passphrase: tests use encrypted
    /// repositories).
    pub fn client(&self, url: &str, token: &str) -> assert_cmd::Command {
        let mut c = vmkeep_bare();
        c.arg("--repo")
            .arg(url)
            .args(["--tls-fingerprint", &self.fingerprint])
            .env("VMKEEP_TOKEN", token)
            .env("VMKEEP_PASSWORD", "served-test-passphrase");
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server (its clients see refused connections).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again at the same address (the same certificate: it is kept in DIR).
    pub fn restart(&mut self) {
        self.kill();
        let again = Served::spawn(&self.dir, &self.tokens, &[], None, &self.addr);
        assert_eq!(again.fingerprint, self.fingerprint);
        *self = again; // the old child, reaped above, is not killed twice
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
