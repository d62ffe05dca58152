//! The QEMU guest agent, for `--freeze`: find its socket through QMP, freeze the guest's
//! filesystems right before the cut and thaw them right after.
//!
//! The agent is a `virtserialport` named `org.qemu.guest_agent.0` whose chardev is a unix
//! socket QEMU serves. The protocol is QMP-like JSON lines; `guest-sync-delimited` first
//! discards anything stale (the reply is preceded by a 0xFF byte).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{Error, Result};
use crate::qmp::QmpClient;

const AGENT_PORT: &str = "org.qemu.guest_agent.0";
const MAX_LINE: usize = 1 << 20;

/// The unix socket of the VM's guest-agent channel, if it has one.
pub async fn find_agent_socket(qmp: &QmpClient) -> Result<Option<PathBuf>> {
    let mut label = None;
    for base in ["/machine/peripheral", "/machine/peripheral-anon"] {
        let Ok(children) = qmp.execute("qom-list", json!({ "path": base })).await else {
            continue;
        };
        for c in children.as_array().into_iter().flatten() {
            if c["type"].as_str() != Some("child<virtserialport>") {
                continue;
            }
            let path = format!("{base}/{}", c["name"].as_str().unwrap_or_default());
            let name = qmp
                .execute("qom-get", json!({ "path": path, "property": "name" }))
                .await
                .ok();
            if name.as_ref().and_then(Value::as_str) != Some(AGENT_PORT) {
                continue;
            }
            let chardev = qmp
                .execute("qom-get", json!({ "path": path, "property": "chardev" }))
                .await
                .ok();
            label = chardev.and_then(|v| v.as_str().map(str::to_string));
        }
    }
    let Some(label) = label else {
        return Ok(None);
    };
    let devs = qmp.execute("query-chardev", Value::Null).await?;
    for d in devs.as_array().into_iter().flatten() {
        if d["label"].as_str() != Some(label.as_str()) {
            continue;
        }
        // "unix:/path,server=on", or "disconnected:unix:/path,server=on" while nobody is
        // connected.
        let filename = d["filename"].as_str().unwrap_or_default();
        let filename = filename.strip_prefix("disconnected:").unwrap_or(filename);
        if let Some(rest) = filename.strip_prefix("unix:") {
            let path = rest.split(',').next().unwrap_or_default();
            if !path.is_empty() {
                return Ok(Some(PathBuf::from(path)));
            }
        }
    }
    Ok(None)
}

/// A synchronised connection to a guest agent.
pub struct Agent {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
    path: PathBuf,
}

fn agent_err(path: &Path, what: impl Into<String>) -> Error {
    Error::io(
        format!("guest agent at {}", path.display()),
        std::io::Error::other(what.into()),
    )
}

impl Agent {
    /// Connects and synchronises (`guest-sync-delimited`) within `timeout`: an agent that is
    /// not running in the guest never answers.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Agent> {
        let go = async {
            let s = UnixStream::connect(path)
                .await
                .map_err(|e| Error::io(format!("connect to guest agent {}", path.display()), e))?;
            let (r, w) = s.into_split();
            let mut a = Agent {
                r: BufReader::new(r),
                w,
                path: path.to_path_buf(),
            };
            let id = u64::from(std::process::id()) << 16 | 0x5eed;
            a.send("guest-sync-delimited", json!({ "id": id })).await?;
            // Skip anything up to the 0xFF delimiter, then the reply line.
            loop {
                let b =
                    a.r.read_u8()
                        .await
                        .map_err(|e| Error::io("read from guest agent", e))?;
                if b == 0xff {
                    break;
                }
            }
            let v = a.read_reply().await?;
            if v.as_u64() != Some(id) {
                return Err(agent_err(path, format!("sync answered {v}")));
            }
            Ok(a)
        };
        tokio::time::timeout(timeout, go)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("guest agent at {} to answer", path.display()),
                timeout,
            })?
    }

    async fn send(&mut self, cmd: &str, args: Value) -> Result<()> {
        // The agent refuses `"arguments": null`: omit it when there are none.
        let msg = if args.is_null() {
            json!({ "execute": cmd })
        } else {
            json!({ "execute": cmd, "arguments": args })
        };
        let mut line = serde_json::to_vec(&msg).expect("JSON of a JSON value");
        line.push(b'\n');
        self.w
            .write_all(&line)
            .await
            .map_err(|e| Error::io("write to guest agent", e))
    }

    async fn read_reply(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.r)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| Error::io("read from guest agent", e))?;
            if n == 0 {
                return Err(agent_err(&self.path, "connection closed"));
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{fffd}');
            if text.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(text)
                .map_err(|e| agent_err(&self.path, format!("bad reply {text:?}: {e}")))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(agent_err(&self.path, format!("error {e}")));
            }
        }
    }

    async fn command(&mut self, cmd: &str, timeout: Duration) -> Result<Value> {
        let path = self.path.clone();
        tokio::time::timeout(timeout, async {
            self.send(cmd, Value::Null).await?;
            self.read_reply().await
        })
        .await
        .map_err(|_| Error::Timeout {
            what: format!("guest agent {} ({})", cmd, path.display()),
            timeout,
        })?
    }

    /// `guest-fsfreeze-freeze`: the number of filesystems frozen.
    pub async fn freeze(&mut self) -> Result<u64> {
        let v = self
            .command("guest-fsfreeze-freeze", Duration::from_secs(60))
            .await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed.
    pub async fn thaw(&mut self) -> Result<u64> {
        let v = self
            .command("guest-fsfreeze-thaw", Duration::from_secs(60))
            .await?;
        Ok(v.as_u64().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake agent: stale bytes, then the delimited sync reply, then freeze/thaw answers.
    #[tokio::test]
    async fn sync_freeze_thaw_against_a_fake_agent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qga.sock");
        let l = UnixListener::bind(&p).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut seen = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap() > 0 {
                let v: Value = serde_json::from_str(&line).unwrap();
                line.clear();
                let cmd = v["execute"].as_str().unwrap().to_string();
                // Like qemu-ga: "arguments" must be an object when present.
                assert!(v.get("arguments").is_none_or(Value::is_object), "{v}");
                let reply = match cmd.as_str() {
                    "guest-sync-delimited" => {
                        w.write_all(b"{\"return\": 1}\n garbage").await.unwrap();
                        let mut b = vec![0xff];
                        b.extend_from_slice(
                            format!("{{\"return\": {}}}\n", v["arguments"]["id"]).as_bytes(),
                        );
                        b
                    }
                    "guest-fsfreeze-freeze" => b"{\"return\": 2}\n".to_vec(),
                    "guest-fsfreeze-thaw" => b"{\"return\": 2}\n".to_vec(),
                    _ => b"{\"error\": {\"class\": \"x\", \"desc\": \"y\"}}\n".to_vec(),
                };
                w.write_all(&reply).await.unwrap();
                seen.push(cmd);
            }
            seen
        });
        let mut a = Agent::connect(&p, Duration::from_secs(5)).await.unwrap();
        assert_eq!(a.freeze().await.unwrap(), 2);
        assert_eq!(a.thaw().await.unwrap(), 2);
        drop(a);
        assert_eq!(
            server.await.unwrap(),
            [
                "guest-sync-delimited",
                "guest-fsfreeze-freeze",
                "guest-fsfreeze-thaw"
            ]
        );
    }

    #[tokio::test]
    async fn a_silent_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qga.sock");
        let _l = UnixListener::bind(&p).unwrap(); // never accepts, never answers
        let e = Agent::connect(&p, Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
    }
}
