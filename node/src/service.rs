//! Running under systemd: `Type=notify` services tell the service manager
//! when they are ready and what they are doing through the datagram socket
//! named by `NOTIFY_SOCKET` (sd_notify(3)). A node says `READY=1` once it
//! has caught up with the cluster (what `/readyz` checks, the write fence
//! aside), so `systemctl restart` returns only when the node serves current
//! data: a rolling upgrade can go on to the next node safely. Without
//! `NOTIFY_SOCKET` every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends one notification (`READY=1`, `STATUS=…`, `STOPPING=1`); errors are
/// logged, never fatal: the service manager is a spectator.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify_to(&path, state) {
        tracing::warn!(socket = ?path, "sd_notify {state:?}: {e}");
    }
}

/// Sends `state` to the notification socket at `path` (`@name`: abstract).
pub fn notify_to(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let addr = match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(path)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_reaches_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1\nSTATUS=caught up").unwrap();
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=caught up");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("syncnode-test-{}", std::process::id());
        let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        notify_to(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
