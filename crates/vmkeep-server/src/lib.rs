//! vmkeep-server: `vmkeep serve`, repositories over HTTPS with scoped tokens. The protocol is
//! docs/PROTOCOL.md; this crate is its server side (the client is `vmkeep_store::HttpStore`).
//!
//! A request goes: TLS (rustls, ring) -> hyper HTTP/1.1 -> axum routes ([`routes`]) ->
//! authentication against the tokens file ([`tokens`]) -> the per-kind rules of PROTOCOL.md §4
//! (`objects`), which verify uploads (`verify`) -> the repository's `LocalStore` in
//! `DIR/NAME`, run on tokio's blocking threads.
//!
//! The server keeps its own files in `DIR/.vmkeep-serve/`: `tls/` (the self-signed certificate
//! when none is given) and `owners/<repo>/<lock name>` (which token created a lease).

mod auth;
mod error;
pub mod glob;
mod metrics;
mod objects;
mod packlists;
mod reply;
mod routes;
mod state;
pub mod tls;
pub mod tokens;
mod verify;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use error::{Error, Result};
pub use tls::fingerprint_of_pem;
pub use tokens::{Minted, Right};
/// The pack list format (`refs/<snapshot id>`), defined in vmkeep-core.
pub use vmkeep_core::packlist::PackList;

/// How long a graceful stop waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);
/// A TLS handshake or a request's headers taking longer than this drop the connection.
const HANDSHAKE: Duration = Duration::from_secs(10);
const HEADERS: Duration = Duration::from_secs(30);

/// What `vmkeep serve` was asked for.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// The folder whose subfolders are the served repositories.
    pub dir: PathBuf,
    /// The tokens file.
    pub tokens: PathBuf,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The server is listening.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The bound address (port 0 resolved).
    pub addr: SocketAddr,
    /// SHA-256 of the leaf certificate's DER bytes, 64 lowercase hex digits.
    pub fingerprint: String,
}

/// Serve until SIGTERM or SIGINT, then stop accepting and let requests in flight finish (up to
/// 10 s). Blocking: runs its own tokio runtime. `on_ready` is called once, when listening.
pub fn serve(opts: ServeOptions, on_ready: impl FnOnce(&Ready)) -> Result<()> {
    serve_until(opts, on_ready, async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers: stop the server with SIGKILL");
                std::future::pending::<()>().await
            }
        }
        tracing::info!("stopping: finishing requests in flight");
    })
}

/// [`serve`], stopping gracefully when `shutdown` completes instead of on a signal.
pub fn serve_until(
    opts: ServeOptions,
    on_ready: impl FnOnce(&Ready),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if opts.tls_cert.is_some() != opts.tls_key.is_some() {
        return Err(Error::TlsHalfGiven);
    }
    let meta = std::fs::metadata(&opts.dir).map_err(|e| Error::io("open", &opts.dir, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            "open",
            &opts.dir,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let tokens = tokens::TokenStore::open(&opts.tokens)?;
    let identity = tls::identity(
        opts.tls_cert.as_deref(),
        opts.tls_key.as_deref(),
        &opts.dir.join(state::STATE_DIR),
    )?;
    let fingerprint = identity.fingerprint.clone();
    let acceptor = TlsAcceptor::from(tls::server_config(identity)?);
    let app = Arc::new(state::App::new(opts.dir.clone(), tokens));
    let router = routes::router(app);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let result = runtime.block_on(async move {
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|cause| Error::Bind {
                addr: opts.listen,
                cause,
            })?;
        let addr = listener.local_addr().map_err(|cause| Error::Bind {
            addr: opts.listen,
            cause,
        })?;
        tracing::info!("serving {} on https://{addr}", opts.dir.display());
        on_ready(&Ready { addr, fingerprint });
        accept_loop(listener, acceptor, router, shutdown).await;
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    conns.spawn(connection(tcp, peer, acceptor.clone(), router.clone(), stop_rx.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            "{} connections still busy after {DRAIN:?}: closed",
            conns.len()
        );
        conns.abort_all();
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake with {peer}: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake with {peer} timed out");
            return;
        }
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADERS)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(router));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection from {peer}: {e}");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.as_mut().await;
        }
    }
}
