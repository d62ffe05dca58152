//! The QMP client against a real `qemu-system-x86_64 -machine none` (and a fake monitor for
//! malformed input).

mod common;

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmkeep_qemu::qmp::{QmpClient, QmpOptions};
use vmkeep_qemu::Error;

/// QEMU with no machine at all (running: no -S), just its monitor.
fn start_qemu(dir: &Path) -> (QemuLock, Vm, PathBuf) {
    let lock = qemu_lock();
    let vm = VmBuilder::new(dir, "")
        .unpaused()
        .args(["-machine", "none"])
        .boot();
    let sock = vm.qmp.clone();
    (lock, vm, sock)
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[tokio::test]
async fn greeting_status_errors_events_and_getfd() {
    let dir = tempfile::tempdir().unwrap();
    let (_lock, _qemu, sock) = start_qemu(dir.path());
    let qmp = QmpClient::connect(&sock).await.unwrap();
    assert_eq!(qmp.greeting().version.0, 10, "{:?}", qmp.greeting());

    let st = qmp.query_status().await.unwrap();
    assert!(st.running, "{st:?}");

    // Error replies carry QEMU's class and description.
    let e = qmp
        .execute("no-such-command", serde_json::Value::Null)
        .await
        .unwrap_err();
    assert_eq!(e.qmp_class(), Some("CommandNotFound"), "{e}");
    let e = qmp.blockdev_del("no-such-node").await.unwrap_err();
    match &e {
        Error::QmpCommand {
            command,
            class,
            desc,
        } => {
            assert_eq!(
                (command.as_str(), class.as_str()),
                ("blockdev-del", "GenericError")
            );
            assert!(desc.contains("no-such-node"), "{desc}");
        }
        other => panic!("unexpected {other:?}"),
    }

    // Events: subscribe first, then cause them; any event is delivered in order.
    let mut events = qmp.events();
    qmp.stop().await.unwrap();
    let first = events.next().await.unwrap();
    assert_eq!(first.event, "STOP");
    assert!(first.timestamp.0 > 0);
    assert_eq!(qmp.query_status().await.unwrap().status, "paused");
    qmp.cont().await.unwrap();
    events
        .wait_for("RESUME", |_| true, Duration::from_secs(5))
        .await
        .unwrap();
    // wait_event times out with a typed error.
    let e = qmp
        .wait_event("NEVER_HAPPENS", |_| true, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");

    // getfd really passes an fd: without one QEMU refuses, with one it accepts it.
    let e = qmp
        .execute("getfd", serde_json::json!({"fdname": "nofd"}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("SCM_RIGHTS"), "{e}");
    let (_r, w) = pipe();
    qmp.getfd("fd1", w.as_fd()).await.unwrap();
    qmp.closefd("fd1").await.unwrap();
    assert!(qmp.closefd("fd1").await.is_err());

    // Many commands in flight at once are matched by id.
    let (a, b, c) = tokio::join!(qmp.query_status(), qmp.query_block(), qmp.query_migrate());
    assert!(a.unwrap().running);
    assert!(b.unwrap().is_empty());
    let _ = c.unwrap();

    // quit: the connection then reports closed.
    let mut events = qmp.events();
    qmp.quit().await.unwrap();
    let r = events
        .wait_for("NEVER", |_| true, Duration::from_secs(5))
        .await;
    assert!(matches!(r, Err(Error::QmpClosed { .. })), "{r:?}");
    let e = qmp.query_status().await.unwrap_err();
    assert!(matches!(e, Error::QmpClosed { .. }), "{e}");
}

#[tokio::test]
async fn monitor_held_by_another_client_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (_lock, _qemu, sock) = start_qemu(dir.path());
    let first = QmpClient::connect(&sock).await.unwrap();
    let opts = QmpOptions {
        greeting_timeout: Duration::from_millis(800),
        ..QmpOptions::default()
    };
    let start = Instant::now();
    let e = QmpClient::connect_with(&sock, opts.clone())
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(e, Error::QmpBusy { .. }), "{e}");
    let msg = e.to_string();
    // The holder is this test process itself, which the message does not name (it looks for
    // a process other than the one connecting); the way out is always there.
    assert!(msg.contains("is held by another client: "), "{msg}");
    assert!(msg.contains("a monitor of its own"), "{msg}");
    assert!(msg.contains(&sock.display().to_string()), "{msg}");
    // Once the holder goes away, the monitor is free again.
    first.close().await;
    let again = QmpClient::connect_with(&sock, opts).await.unwrap();
    assert!(again.query_status().await.unwrap().running);
}

/// A fake monitor that answers `qmp_capabilities` with malformed JSON.
#[tokio::test]
async fn malformed_json_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let l = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 10, \"minor\": 0, \"micro\": 2}, \"package\": \"\"}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).await;
        s.write_all(b"{\"return\": {}, \"id\": 1, oops}\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let e = QmpClient::connect(&sock).await.unwrap_err();
    assert!(matches!(e, Error::QmpProtocol(_)), "{e}");
}

/// A fake monitor that sends no greeting at all, then closes: connect must not hang.
#[tokio::test]
async fn not_a_monitor() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let l = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"hello, I am not QEMU\n").await.unwrap();
    });
    let e = QmpClient::connect(&sock).await.unwrap_err();
    assert!(matches!(e, Error::QmpProtocol(_)), "{e}");
}
