//! The pid of the process listening on a unix socket (SO_PEERCRED of a fresh connection).
//!
//! Linux records the listener's credentials at `connect()`, before the server accepts, so this
//! works even while another client holds a QMP monitor. The probe connection is closed at once;
//! the server later accepts it and reads EOF.

use std::os::fd::AsRawFd;
use std::path::Path;

pub fn listener_pid(socket: &Path) -> Option<u32> {
    let s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}
