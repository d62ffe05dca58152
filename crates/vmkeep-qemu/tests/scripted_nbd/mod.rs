//! A scripted NBD server for the client's misbehaviour tests: one connection on a unix socket
//! in a temporary folder, answered by a test's own script, with the protocol's building blocks.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use vmkeep_qemu::nbd::proto::*;
use vmkeep_qemu::nbd::NbdOptions;

/// Client options with short timeouts: a misbehaving server fails a test quickly.
pub fn opts() -> NbdOptions {
    NbdOptions {
        handshake_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(500),
        max_in_flight: 4,
    }
}

/// Starts a one-connection server running `script`; returns the socket path (and the dir).
pub fn serve<F, Fut>(script: F) -> (tempfile::TempDir, PathBuf)
where
    F: FnOnce(UnixStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let l = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        if let Ok((s, _)) = l.accept().await {
            script(s).await;
        }
    });
    (dir, path)
}

/// The fixed-newstyle server greeting.
pub fn greeting() -> Vec<u8> {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// One option reply of type `t` to option `opt`.
pub fn opt_reply(opt: u32, t: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&t.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// The client's next option: its number and data.
pub async fn read_option(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.unwrap();
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut d = vec![0; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (opt, d)
}

/// Sends the greeting and reads the client's flags.
pub async fn greet(s: &mut UnixStream) {
    s.write_all(&greeting()).await.unwrap();
    let mut f = [0u8; 4];
    s.read_exact(&mut f).await.unwrap();
}
